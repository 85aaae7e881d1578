import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from components.params import ParamsError, parse_section
from tests.conftest import repo_params, tree_bytes
from tests.test_dvc_pipeline import REPO, commit, dvc, run, tool_env
from tools.retrain import RetrainParams, decide, mcnemar_worse_p, metric_of, paired, withdrawn_by

PARAMS = RetrainParams(threshold=0.9, alpha=0.05)


def test_mcnemar_exact_p_by_hand():
    assert mcnemar_worse_p(5, 0) == pytest.approx(1 / 32)  # all 5 disagreements against the candidate
    assert mcnemar_worse_p(3, 1) == pytest.approx((4 + 1) / 16)  # P(X >= 3), X ~ Bin(4, 1/2)
    assert mcnemar_worse_p(0, 0) == 1.0 and mcnemar_worse_p(0, 7) == 1.0
    assert mcnemar_worse_p(12, 2) == pytest.approx((math.comb(14, 12) + 14 + 1) / 2**14)


def right(n, wrong):
    out = np.ones(n, bool)
    out[list(wrong)] = False
    return out


@pytest.mark.parametrize(
    "candidate, candidate_wrong, promoted_wrong, expected, why",
    [
        (0.95, range(5), None, True, "nothing was promoted before"),
        (0.85, range(15), None, False, "below the threshold 0.9000"),
        (0.95, range(5), range(5, 8), True, "not significantly worse"),  # 5 vs 3 disagreements: p = 0.36
        (0.94, range(6), [], False, "significantly worse"),  # all 6 disagreements go to the promoted: p = 1/64
        (0.89, range(11), range(50), False, "below the threshold"),  # far better than the promoted, not good enough
        (None, range(5), None, False, "has no finetune val accuracy"),
        (float("nan"), range(5), None, False, "not a number"),  # NaN < threshold is False: must not pass
        (float("nan"), range(5), range(5), False, "not a number"),
    ],
)
def test_promotion_gate(candidate, candidate_wrong, promoted_wrong, expected, why):
    comparison = None if promoted_wrong is None else paired(right(100, candidate_wrong), right(100, promoted_wrong))
    promote, reason = decide(candidate, comparison, PARAMS)
    assert promote is expected and why in reason, reason


def test_a_comparison_too_small_to_find_the_candidate_worse_does_not_promote():
    # 3 images only the promoted model gets right and none the other way: at best p = 1/8, never below alpha
    comparison = paired(right(100, range(3)), right(100, []))
    assert comparison["p_worse"] == pytest.approx(1 / 8)
    promote, reason = decide(0.97, comparison, PARAMS)
    assert not promote and "right on none of the images where the two disagree and wrong on 3" in reason
    # the same few disagreements in the candidate's favour, or none at all (an unchanged model): promoted
    assert decide(0.97, paired(right(100, []), right(100, range(3))), PARAMS)[0]
    assert decide(0.97, paired(right(100, range(3)), right(100, range(3))), PARAMS)[0]
    # 5 against it: p = 1/32 can be reached, and is: significantly worse
    promote, reason = decide(0.95, paired(right(100, range(5)), right(100, [])), PARAMS)
    assert not promote and "significantly worse" in reason


def test_a_worse_candidate_is_never_promoted_where_a_better_one_is_held():
    """The gate held a candidate behind on 4 or fewer disagreements, so 3 against 1 was held and the worse
    4 against 1 promoted. Held candidates must stay held as the candidate loses more images or wins fewer."""
    held = {}
    for against in range(13):
        for won in range(13):
            comparison = paired(right(100, range(against)), right(100, range(against, against + won)))
            held[against, won] = not decide(0.97, comparison, PARAMS)[0]
    for (against, won), is_held in held.items():
        if is_held and against < 12:
            assert held[against + 1, won], (against, won)
        if is_held and won > 0:
            assert held[against, won - 1], (against, won)
    assert held[3, 1] is False and held[4, 1] is False and held[7, 1] is True  # p = 0.31, 0.19, 0.035


def test_a_file_the_promoted_model_trained_on_is_left_out_under_a_new_id():
    # ids are the hash of the decoded pixels: a decode change gives the same file a new id, which may land in val
    from tools.retrain import unseen_by

    seen = ({"old-id", "other"}, {"file-a"})  # the promoted model's train split: ids and file hashes
    ids = ["new-id", "fresh", "other", "no-hash"]
    files = {"new-id": "file-a", "fresh": "file-b", "other": "file-c"}  # the current manifest; "no-hash": none
    assert unseen_by(ids, seen, files).tolist() == [False, True, False, True]


def test_images_of_a_class_one_model_does_not_know_are_left_out():
    from tools.retrain import known_to_both

    labels = ["cat", "dogs", "cat", "fox"]
    assert known_to_both(labels, ["cat", "dogs", "fox"], ["cat", "dog", "fox"]).tolist() == [True, False, True, True]
    assert known_to_both(labels, ["cat", "dogs", "fox"], ["cat", "dogs", "fox"]).all()


ROLLBACK = r"""
import json, sys, time
from gto import api
from tools.retrain import RetrainParams, promoted_version
repo, commits = sys.argv[1], sys.argv[2:]
seen = [promoted_version(repo, RetrainParams())]  # nothing registered
api.register(repo, "classifier", commits[0])
seen.append(promoted_version(repo, RetrainParams()))  # registered, never assigned
for step in (
    lambda: api.assign(repo, "classifier", "prod", version="v0.0.1"),
    lambda: api.register(repo, "classifier", commits[1]),
    lambda: api.assign(repo, "classifier", "prod", version="v0.0.2"),
    lambda: api.assign(repo, "classifier", "prod", version="v0.0.1", force=True),  # rolled back
):
    time.sleep(1.1)  # GTO orders its tags by their time, to the second
    step()
    seen.append(promoted_version(repo, RetrainParams()))
def refused(stage):  # a stage that never held a version while another did, or one emptied since: no promotion
    try:
        promoted_version(repo, RetrainParams(stage=stage))
    except RuntimeError as exc:
        return str(exc)
seen.append(refused("production"))
time.sleep(1.1)
for version in ("v0.0.1", "v0.0.2"):  # both were assigned to prod: unassigning the last leaves the other there
    api.unassign(repo, "classifier", version=version, stage="prod")
seen.append(refused("prod"))
time.sleep(1.1)
api.assign(repo, "classifier", "prod", version="v0.0.2", force=True)
time.sleep(1.1)
api.deregister(repo, "classifier", version="v0.0.2")  # the version in prod deregistered: none to compare with
seen.append(refused("prod"))
time.sleep(1.1)
api.deprecate(repo, "classifier")  # the whole artifact retired
seen.append(refused("prod"))
print(json.dumps(seen))
"""


def in_child(script: str, *args: str):
    """What a script run in a child process prints last (JSON): GTO imported into pytest's breaks its capture."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO, env=tool_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_gate_compares_with_the_version_assigned_to_the_stage_last(tmp_path):
    # A rollback (an older version assigned again with --force) is what `gto show` and `dvc artifacts get --stage`
    # deploy: the gate must compare with it, not with the highest version number in the stage. (GTO runs in a
    # child process: imported into pytest's, it breaks its output capture.)
    run(["git", "init", "-q"], tmp_path)
    commits = []
    for i in range(2):
        (tmp_path / f"f{i}").write_text(str(i))
        commit(tmp_path, f"c{i}")
        commits.append(run(["git", "rev-parse", "HEAD"], tmp_path).stdout.strip())
    seen = in_child(ROLLBACK, str(tmp_path), *commits)
    none, registered, first, second_registered, second, rolled_back, misspelled, emptied, deregistered, retired = seen
    assert deregistered.startswith("retrain.stage 'prod' held versions of classifier before but holds none now")
    assert retired.startswith("retrain.artifact 'classifier' is deprecated in the registry"), retired
    assert misspelled.startswith("retrain.stage 'production': no version of classifier was ever assigned to it")
    assert emptied.startswith("retrain.stage 'prod' held versions of classifier before but holds none now")
    assert none == registered == [None, None]
    assert first == second_registered == ["v0.0.1", commits[0]]
    assert second == ["v0.0.2", commits[1]]
    assert rolled_back == ["v0.0.1", commits[0]]


def test_no_image_left_to_compare_on_does_not_promote():
    # every current val image was in the promoted model's training split (the seed or fractions changed)
    comparison = {**paired(right(0, []), right(0, [])), "left_out_trained_on": 400}
    promote, reason = decide(0.99, comparison, PARAMS)
    assert not promote and "no val image is left to compare" in reason and "400 left out" in reason, reason


def test_paired_counts_and_p_value():
    c = paired(right(10, [0, 1, 2]), right(10, [2, 3]))
    assert c == {
        "images": 10,
        "candidate_accuracy": 0.7,
        "promoted_accuracy": 0.8,
        "only_promoted_right": 2,
        "only_candidate_right": 1,
        "p_worse": pytest.approx(4 / 8),
    }
    with pytest.raises(ValueError, match="paired scores"):
        paired(right(10, []), right(9, []))


def test_the_gate_reads_the_validation_split_never_the_test_split():
    metrics = {"finetune": {"val": {"accuracy": 0.9}, "test": {"accuracy": 0.99}}}
    assert metric_of(metrics, PARAMS) == 0.9
    assert metric_of(metrics, PARAMS, "test") == 0.99  # reported beside the decision
    assert metric_of({"finetune": {"test": {"accuracy": 0.99}}}, PARAMS) is None  # no val: no decision from test
    assert metric_of({"head": {"val": {"accuracy": 0.9}}}, PARAMS) is None
    promote, reason = decide(metric_of(metrics, PARAMS), None, RetrainParams(threshold=0.95))
    assert not promote and "finetune val accuracy 0.9000 is below the threshold" in reason  # though test is 0.99


def test_metric_lookup_and_params():
    with pytest.raises(ParamsError, match=r"retrain\.metric"):
        parse_section(RetrainParams, "retrain", {"metric": "loss"})  # lower is better: not a gate metric
    with pytest.raises(ParamsError, match=r"retrain\.alpha"):
        parse_section(RetrainParams, "retrain", {"alpha": 0})


# ---- the scheduler's command end to end: the paired gate, exit codes, --pull and --push --------------

# A stand-in pipeline with the real pipeline's interfaces: convert writes val TFRecords (image bytes and
# label names), evaluate writes a real TensorFlow SavedModel with the serving signature (its predictions
# come from a table) and evaluation/metrics.json with its honest val accuracy. The real DVC, git, GTO
# and `dvc artifacts get` steps of a retrain run; nothing is trained. The day's records and serving model are
# built here, in a process that has TensorFlow loaded already, and committed with the day's data: the stages
# copy them, so no stage process imports TensorFlow (seconds each, three stages a retrain, ~20 retrains).
PIPELINE = r"""
import json, os, shutil, sys
day = json.load(open("src/day.json"))
if sys.argv[1] == "download":
    os.makedirs("data/download", exist_ok=True)
    rows = [{"id": i, "split": "val"} for i, _ in day["records"]] + [{"id": i, "split": "train"} for i in day["train"]]
    open("data/download/manifest.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in rows))
elif sys.argv[1] == "convert":
    os.makedirs("data/convert/records", exist_ok=True)
    shutil.copyfile("src/records.tfrecord", "data/convert/records/val-00000-of-00001.tfrecord")
else:
    shutil.copytree("src/serving", "data/evaluate/serving")
    right = [day["predictions"].get(image) == label for image, label in day["records"]]
    os.makedirs("evaluation", exist_ok=True)
    json.dump({"finetune": {"val": {"accuracy": sum(right) / len(right)}, "test": {"accuracy": 0.5}}},
              open("evaluation/metrics.json", "w"))
    sys.exit(day.get("fail", 0))
"""


def write_records(path, records) -> None:
    import tensorflow as tf

    def feature(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))

    with tf.io.TFRecordWriter(str(path)) as writer:
        for image, label in records:
            example = {"id": feature(image), "image": feature(image), "label_name": feature(label)}
            writer.write(tf.train.Example(features=tf.train.Features(feature=example)).SerializeToString())


def serving_model(predictions: dict, classes, root: Path) -> Path:
    """A SavedModel whose `serving_default` predicts each image id's class from a table, as the real one's does
    from pixels (its `predicted` and `classes` outputs); built once under `root` for each (predictions, classes), so
    a day that repeats repeats its bytes."""
    import hashlib

    import tensorflow as tf

    key = hashlib.sha256(json.dumps([predictions, list(classes)], sort_keys=True).encode()).hexdigest()[:16]
    path = root / key / "serving"
    if not path.exists():
        keys, values = zip(*sorted(predictions.items()))

        class Served(tf.Module):
            def __init__(self):
                self.table = tf.lookup.StaticHashTable(
                    tf.lookup.KeyValueTensorInitializer(list(keys), list(values)), "?"
                )

            @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
            def serve(self, images):
                names = tf.tile(tf.constant([list(classes)]), [tf.shape(images)[0], 1])
                return {"predicted": self.table.lookup(images), "classes": names}

        served = Served()
        tf.saved_model.save(served, str(path), signatures={"serving_default": served.serve})
    return path


def test_a_damaged_gate_shard_is_an_error_naming_it(tmp_path):
    """The gate read the val records through tf.data: a damaged shard was TensorFlow's DataLossError, naming no file
    (a review on 2026-12-07)."""
    from tools.retrain import served_right

    records = [[f"img{i}", ("cat", "dog")[i % 2]] for i in range(6)]
    shard = tmp_path / "val-00000-of-00001.tfrecord"
    write_records(shard, records)
    model = serving_model({image: label for image, label in records}, ("cat", "dog"), tmp_path / "models")
    assert served_right(model, [str(shard)])[0] == [image for image, _ in records]
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(ValueError, match=rf"{shard}: a damaged or truncated TFRecord"):
        served_right(model, [str(shard)])


def write_day(project, images, wrong=(), fail=0, train=(), classes=("cat", "dog")):
    """The day's val records (`images`, indices; labels alternate between the two `classes`), the images of its
    train split, and the model built today, which knows those classes, predicts every image there is and gets
    those in `wrong` wrong."""
    label = lambda i: classes[i % 2]  # noqa: E731
    records = [[f"img{i}", label(i)] for i in images]
    predictions = {f"img{i}": label(i + 1) if i in set(wrong) else label(i) for i in range(300)}
    (project / "src").mkdir(exist_ok=True)
    day = {"records": records, "predictions": predictions, "fail": fail, "train": [f"img{i}" for i in train]}
    (project / "src" / "day.json").write_text(json.dumps({**day, "classes": list(classes)}))
    write_records(project / "src" / "records.tfrecord", records)
    shutil.rmtree(project / "src" / "serving", ignore_errors=True)
    shutil.copytree(serving_model(predictions, classes, project.parent / "serving-models"), project / "src" / "serving")
    if (project / ".git" / "refs" / "heads" / "main").exists():  # the day's data arrives as a commit (a retrain
        commit(project, "the day's data")  # refuses inputs git tracks that differ from HEAD: a model no one rebuilds)


def retrain_cli(project, *args):
    proc = subprocess.run(
        [sys.executable, "-m", "tools.retrain", *args],
        cwd=project,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, (json.loads(lines[-1]) if lines else None), proc.stderr


@pytest.fixture
def scheduled(tmp_path):
    server, storage, project = tmp_path / "server.git", tmp_path / "storage", tmp_path / "project"
    run(["git", "init", "-q", "--bare", "--initial-branch=main", str(server)], tmp_path)
    run(["git", "clone", "-q", str(server), str(project)], tmp_path)
    run(["git", "checkout", "-q", "-b", "main"], project)
    dvc("init", "-q", cwd=project)
    dvc("remote", "add", "-d", "storage", str(storage), cwd=project)
    (project / "src").mkdir()
    (project / "src" / "pipeline.py").write_text(PIPELINE)

    def stage(name, outs, **more):
        return {
            "cmd": f"{sys.executable} src/pipeline.py {name}",
            "deps": [
                "src/day.json",
                "src/pipeline.py",
                *{"convert": ["src/records.tfrecord"], "evaluate": ["src/serving"]}.get(name, []),
            ],
            "outs": outs,
            **more,
        }

    (project / "dvc.yaml").write_text(
        json.dumps(
            {
                "stages": {
                    "download": stage("download", ["data/download"]),
                    "convert": stage("convert", ["data/convert"]),
                    "evaluate": stage(
                        "evaluate", ["data/evaluate"], metrics=[{"evaluation/metrics.json": {"cache": False}}]
                    ),
                },
                "artifacts": {"classifier": {"path": "data/evaluate/serving", "type": "model"}},
            }
        )
    )
    (project / "params.yaml").write_text(
        json.dumps({"retrain": repo_params({"retrain": {"threshold": 0.75, "alpha": 0.05}})["retrain"]})
    )
    write_day(project, range(20), wrong=[0, 1])
    commit(project, "pipeline")
    run(["git", "push", "-q", "-u", "origin", "main"], project)
    return server, storage, project


@pytest.mark.integration
def test_the_gate_compares_both_models_on_the_same_images(scheduled):
    _, _, project = scheduled
    # Day 1: 20 images; v0.0.1 gets 16 right (recorded val accuracy 0.80). It is also wrong on
    # images 200-249, which are not in today's split, and it trained on 290-299.
    write_day(project, range(20), wrong=[0, 1, 2, 3, *range(200, 250)], train=range(290, 300))
    code, first, _ = retrain_cli(project)
    assert (code, first["decision"], first["candidate"]) == (0, "promoted", 0.8), first

    # Day 2: 100 images. The candidate gets 86 right; the promoted model, on the same images, 96. A gate
    # on recorded figures would promote (0.86 against the 0.80 recorded on day 1's images); on the same
    # images the candidate is worse on 12 of 14 disagreements: rejected.
    write_day(project, range(100), wrong=[0, 1, *range(10, 22)])  # right on 2 and 3, where v0.0.1 is wrong
    code, second, _ = retrain_cli(project)
    assert second["candidate"] == 0.86 >= first["candidate"] - 0.005  # what a recorded-figure gate would accept
    assert (code, second["decision"]) == (3, "rejected"), second
    assert second["paired"] == {
        "images": 100,
        "candidate_accuracy": 0.86,
        "promoted_accuracy": 0.96,
        "only_promoted_right": 12,
        "only_candidate_right": 2,
        "p_worse": pytest.approx((math.comb(14, 12) + 14 + 1) / 2**14),
        "left_out_trained_on": 0,
        "left_out_other_classes": 0,
    }
    assert "significantly worse on the same 100 val images" in second["reason"]
    message = run(["git", "log", "-1", "--format=%s"], project).stdout
    assert message.startswith("retrain: rejected: ") and "McNemar p=0.00647" in message and "promoted 0.9600" in message

    # The reverse, day 3: 100 harder images (200-299). The candidate gets 78 right, below the 0.80 recorded
    # for v0.0.1, which a recorded-figure gate would reject. The 10 images v0.0.1 trained on (290-299) are
    # left out; on the other 90 it gets 40 right, and none the candidate gets wrong: promoted.
    write_day(project, range(200, 300), wrong=range(200, 222))
    code, third, _ = retrain_cli(project)
    assert third["candidate"] == 0.78 < first["candidate"] - 0.005
    c = third["paired"]
    assert (c["images"], c["left_out_trained_on"], c["only_promoted_right"]) == (90, 10, 0)
    assert c["promoted_accuracy"] == pytest.approx(40 / 90) and c["candidate_accuracy"] == pytest.approx(68 / 90)
    assert "10 left out: the promoted model trained on them" in third["reason"]
    assert (code, third["decision"], third["stage"]) == (0, "promoted", "prod"), third

    # Day 4: the class folder `dog` renamed `dogs`. The candidate knows cat and dogs and misses 8 cats; the
    # promoted model knows cat and dog, so it is wrong on every `dogs` image. Counted on them, the candidate
    # would look better (58 disagreements, 50 its way); on the images of the classes both know (the cats), it
    # is wrong on 8 the promoted model gets right: rejected.
    write_day(project, range(100, 200), wrong=range(100, 116, 2), classes=("cat", "dogs"))
    code, fourth, _ = retrain_cli(project)
    c = fourth["paired"]
    assert (c["images"], c["left_out_other_classes"], c["only_promoted_right"], c["only_candidate_right"]) == (
        50,
        50,
        8,
        0,
    ), fourth
    assert (code, fourth["decision"]) == (
        3,
        "rejected",
    ) and "50 left out: of a class one of the models does not know" in (fourth["reason"]), fourth


@pytest.mark.integration
def test_retrain_pushes_a_promotion_that_another_machine_pulls(scheduled, tmp_path):
    server, storage, project = scheduled
    code, record, _ = retrain_cli(project, "--pull", "--push")
    assert (code, record["decision"], record["version"], record["stage"]) == (0, "promoted", "v0.0.1", "prod"), record
    assert (record["candidate"], record["candidate_test"]) == (0.9, 0.5)
    remote_tags = run(["git", "ls-remote", "--tags", str(server)], tmp_path).stdout
    assert "refs/tags/classifier@v0.0.1" in remote_tags and "refs/tags/classifier#prod#1" in remote_tags
    assert run(["git", "ls-remote", str(server), "main"], tmp_path).stdout.split()[0] == record["commit"]
    assert any(p.is_file() for p in storage.rglob("*"))  # the model's data is in the DVC remote

    # Another machine: --pull brings the commit and the model; nothing changed, nothing is re-run, and the
    # promoted model restored from the remote scores exactly as the candidate (they are the same model).
    other = tmp_path / "other"
    run(["git", "clone", "-q", str(server), str(other)], tmp_path)
    code, again, _ = retrain_cli(other, "--pull")
    assert (code, again["version"], again["commit"]) == (0, "v0.0.1", record["commit"]), again
    assert again["paired"]["only_promoted_right"] == again["paired"]["only_candidate_right"] == 0
    saved = "data/evaluate/serving/saved_model.pb"
    assert (other / saved).read_bytes() == (project / saved).read_bytes()

    # A consumer of the registry (examples/deploy): the model in prod, fetched from the git server and the
    # DVC remote into an empty folder with `dvc artifacts get`, is byte for byte what was promoted.
    fetch = REPO / "examples" / "deploy" / "fetch_prod.sh"
    deployed = tmp_path / "deploy" / "serving"
    deployed.parent.mkdir()
    run(["bash", str(fetch), str(server), str(deployed)], deployed.parent)
    promoted = project / "data" / "evaluate" / "serving"
    assert tree_bytes(deployed) == tree_bytes(promoted) and tree_bytes(deployed)
    empty = tmp_path / "deploy" / "empty"  # an empty folder given: the model in it, not in empty/serving (a review)
    empty.mkdir()
    run(["bash", str(fetch), str(server), str(empty)], deployed.parent)
    assert tree_bytes(empty) == tree_bytes(promoted)
    assert (
        "examples/deploy/fetch_prod.sh . serving"
        in (REPO / "examples" / "deploy" / "github-actions-deploy.yml").read_text()
    )

    # The registry and the params are the server's. An operator deletes a tag there (GTO's undo; here v0.0.1's
    # assignment to prod) and pushes a higher threshold with the day's data: the scheduler's next --pull --push gates
    # with the pulled threshold, and the deleted tag stays deleted. Before, the params were read before the pull (the
    # old threshold promoted what the new one rejects), `git pull` kept the deleted tag (the gate compared with a
    # model no longer in prod) and `git push --tags` put it back on the server.
    operator = tmp_path / "operator"  # a clone without outputs in its workspace: only the edits are committed
    run(["git", "clone", "-q", str(server), str(operator)], tmp_path)
    run(["git", "push", "-q", "origin", ":refs/tags/classifier#prod#1"], operator)
    params = json.loads((operator / "params.yaml").read_text())
    params["retrain"]["threshold"] = 0.99
    (operator / "params.yaml").write_text(json.dumps(params))
    write_day(operator, range(20), wrong=[0])  # commits both: a candidate at 0.95
    run(["git", "push", "-q"], operator)
    code, third, _ = retrain_cli(project, "--pull", "--push")
    assert (code, third["decision"], third["promoted_before"]) == (3, "rejected", {"version": None}), third
    assert "0.9500 is below the threshold 0.9900" in third["reason"], third
    assert "classifier#prod#1" not in run(["git", "tag"], project).stdout
    server_tags = run(["git", "ls-remote", "--tags", str(server)], tmp_path).stdout
    assert "classifier#prod#1" not in server_tags and f"classifier@{third['version']}" in server_tags, server_tags
    run(["git", "pull", "-q", "--ff-only"], other)

    # --pull's failing paths (in this test, which has a pushed promotion to pull: a fixture less to build).
    # A DVC remote that cannot be read (here a file where its folder should be): the run fails before any stage
    # runs, rather than training on whatever the machine's cache holds (a missing object is allowed, an
    # unreadable remote is not).
    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", str(server), str(fresh)], tmp_path)
    shutil.rmtree(storage)
    storage.write_text("not a remote")
    code, failed, _ = retrain_cli(fresh, "--pull")
    assert (code, failed) == (1, {"decision": "failed", "reason": failed["reason"]}), failed
    assert failed["reason"].startswith("dvc pull exited "), failed
    assert not (fresh / "data").exists()  # nothing ran
    # Another machine pushed a commit while this one has a commit of its own: `git pull --ff-only` cannot
    # merge them, so the run fails (exit 1, a failed record naming the pull) before any stage runs.
    (other / "notes.txt").write_text("theirs")
    commit(other, "theirs")
    run(["git", "push", "-q"], other)
    (project / "notes.txt").write_text("ours")
    commit(project, "ours")
    tags = run(["git", "tag"], project).stdout
    code, failed, _ = retrain_cli(project, "--pull")
    assert (code, failed["decision"]) == (1, "failed") and "git pull --ff-only" in failed["reason"], failed
    assert run(["git", "tag"], project).stdout == tags  # nothing registered


@pytest.mark.integration
def test_retrain_exit_codes(scheduled):
    _, _, project = scheduled
    assert retrain_cli(project)[0] == 0  # v0.0.1 promoted at val 0.9
    write_day(project, range(20), wrong=range(8))  # 0.60: below the threshold
    code, record, _ = retrain_cli(project)
    assert (code, record["decision"], record["stage"]) == (3, "rejected", None)
    assert "finetune val accuracy 0.6000 is below the threshold 0.7500" in record["reason"]
    # Code edited but not committed: the lock would record its hash in a commit without it (a model nobody could
    # rebuild, registered and promoted all the same); the run fails before any stage runs, naming the file.
    pipeline = project / "src" / "pipeline.py"
    pipeline.write_text(pipeline.read_text() + "# an edit\n")
    tags = run(["git", "tag"], project).stdout
    code, record, stderr = retrain_cli(project)
    assert (code, record["decision"]) == (1, "failed") and "src/pipeline.py" in record["reason"], record
    assert "Running stage" not in stderr and run(["git", "tag"], project).stdout == tags
    commit(project, "an edit")
    # A new file a stage reads that is in no commit (dvc.yaml committed, the module forgotten): the same refusal.
    (project / "src" / "extra.py").write_text("# new\n")
    spec = json.loads((project / "dvc.yaml").read_text())
    spec["stages"]["download"]["deps"].append("src/extra.py")
    (project / "dvc.yaml").write_text(json.dumps(spec))
    run(["git", "commit", "-qm", "download reads src/extra.py", "--", "dvc.yaml"], project)
    code, record, stderr = retrain_cli(project)
    assert (code, record["decision"]) == (1, "failed") and "DVC holds as they are: src/extra.py;" in record["reason"]
    assert "Running stage" not in stderr
    commit(project, "the module")
    # A base in a folder git ignores (as models/), never `dvc add`-ed: neither git nor DVC holds it; refused, until
    # it is added (its .dvc file committed).
    (project / "bases").mkdir()
    (project / "bases" / ".gitignore").write_text("*\n!.gitignore\n!*.dvc\n")
    (project / "bases" / "base.keras").write_text("weights")
    spec = json.loads((project / "dvc.yaml").read_text())
    spec["stages"]["convert"]["deps"].append("bases")
    (project / "dvc.yaml").write_text(json.dumps(spec))
    commit(project, "convert reads bases/")
    code, record, stderr = retrain_cli(project)
    assert (code, record["decision"]) == (1, "failed") and "as they are: bases/base.keras;" in record["reason"]
    assert "Running stage" not in stderr
    dvc("add", "-q", "bases/base.keras", cwd=project)
    commit(project, "the base, versioned")
    # New images in a `dvc add`-ed source folder: `dvc repro` saves its .dvc file again, which the retrain commits
    # with the lock (left out, the next retrain would refuse it, and the commit would not hold the data's version).
    (project / "photos").mkdir()
    (project / "photos" / "a.txt").write_text("a")
    dvc("add", "-q", "photos", cwd=project)
    spec = json.loads((project / "dvc.yaml").read_text())
    spec["stages"]["download"]["deps"].append("photos")
    (project / "dvc.yaml").write_text(json.dumps(spec))
    commit(project, "a versioned source folder")
    (project / "photos" / "b.txt").write_text("b")
    # ... and a change staged by hand whose file was put back in the working tree: the run reads the file as it is
    # (as committed), so the staged change is not the retrain's to commit, and stays staged.
    as_committed = pipeline.read_text()
    pipeline.write_text(as_committed + "# staged, not run\n")
    run(["git", "add", "src/pipeline.py"], project)
    pipeline.write_text(as_committed)
    code, record, stderr = retrain_cli(project)
    assert (
        code in (0, 3) and run(["git", "status", "--porcelain", "--", "photos.dvc", "dvc.lock"], project).stdout == ""
    )
    assert "nfiles: 2" in run(["git", "show", "HEAD:photos.dvc"], project).stdout, stderr[-2000:]
    assert "# staged, not run" not in run(["git", "show", "HEAD:src/pipeline.py"], project).stdout
    assert run(["git", "diff", "--cached", "--name-only"], project).stdout.split() == ["src/pipeline.py"]
    run(["git", "reset", "-q", "--", "src/pipeline.py"], project)
    write_day(project, range(20), wrong=[0], fail=1)  # the pipeline fails
    code, record, _ = retrain_cli(project)
    assert (code, record["decision"]) == (1, "failed") and record["reason"].startswith("dvc repro exited ")
    (project / "params.yaml").write_text(json.dumps({"retrain": {"metric": "loss"}}))
    code, record, stderr = retrain_cli(project)
    assert code == 2 and record is None and "retrain.metric" in stderr
    # a misspelt artifact: a bad param before any work, not a new artifact registered on a first run
    misspelt = {**repo_params({"retrain": {"threshold": 0.75, "alpha": 0.05}})["retrain"], "artifact": "clasifier"}
    (project / "params.yaml").write_text(json.dumps({"retrain": misspelt}))
    head = run(["git", "rev-parse", "HEAD"], project).stdout
    code, record, stderr = retrain_cli(project)
    assert code == 2 and record is None and "dvc.yaml has no artifact 'clasifier'" in stderr, stderr
    assert run(["git", "rev-parse", "HEAD"], project).stdout == head and "Running stage" not in stderr


def test_the_gate_reads_the_served_models_metric_only():
    with pytest.raises(ParamsError, match=r"retrain\.model"):  # export serves the fine-tuned model, never the head
        parse_section(RetrainParams, "retrain", {"model": "head"})


def test_an_error_of_any_kind_is_a_failed_decision_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Only RuntimeError became the failed JSON line: a serving model that could not be loaded (an OSError or a
    TensorFlow error) left the scheduler a traceback and no decision."""
    import tools.retrain as retrain_tool

    retrain_section = (
        "retrain: {artifact: classifier, stage: prod, model: finetune, metric: accuracy, threshold: 0.5, alpha: 0.05}\n"
    )
    (tmp_path / "params.yaml").write_text(retrain_section)

    def unloadable(*args, **kwargs):
        raise OSError("SavedModel file does not exist at: serving/{saved_model.pbtxt|saved_model.pb}\nmore lines")

    monkeypatch.setattr(retrain_tool, "retrain", unloadable)
    assert retrain_tool.main(["--repo", str(tmp_path)]) == retrain_tool.FAILED
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record == {
        "decision": "failed",
        "reason": "OSError: SavedModel file does not exist at: serving/{saved_model.pbtxt|saved_model.pb}",
    }


def test_uncommitted_inputs_are_read_from_git_as_named(tmp_path):
    """git's porcelain status quoted and escaped names (`"my code/s p.py"`, `"\303\251"`), which then matched
    nothing, and read pathspecs as globs."""
    from tools.retrain import uncommitted_inputs

    run(["git", "init", "-q"], tmp_path)
    names = ["my code/s p.py", "é.py", "a[1].py", "params.yaml", "photos.dvc", "same.py"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("one")
    (tmp_path / "a1.py").write_text("one")
    commit(tmp_path, "inputs")
    for name in [*names[:-1], "a1.py"]:
        (tmp_path / name).write_text("two")
    # params.yaml is the retrain's own to commit, and so are the data sources' .dvc files it is given
    assert uncommitted_inputs(tmp_path, names, ["photos.dvc"]) == ["a[1].py", "my code/s p.py", "é.py"]
    # In no commit: a new file the pipeline names, or a new one in a folder it reads, unless git ignores it.
    for name in ("new [x].py", "my code/new.py", "my code/ignored.py", "not read.py"):
        (tmp_path / name).write_text("new")
    (tmp_path / ".gitignore").write_text("ignored.py\n")
    # Ignored by git, and in no output DVC caches: in neither, so named too; in one (a `dvc add`-ed file or folder,
    # a stage's output), DVC's to hold.
    read = [*names, "new [x].py", "my code"]
    named = ["a[1].py", "my code/ignored.py", "my code/new.py", "my code/s p.py", "new [x].py", "é.py"]
    assert uncommitted_inputs(tmp_path, read, ["photos.dvc"]) == named
    assert uncommitted_inputs(tmp_path, read, ["photos.dvc"], cached=["data", "my"]) == named
    assert uncommitted_inputs(tmp_path, read, ["photos.dvc"], cached=["my code/ignored.py"]) == [
        n for n in named if n != "my code/ignored.py"
    ]
    assert uncommitted_inputs(tmp_path, read, ["photos.dvc"], cached=["my code"]) == [
        n for n in named if n != "my code/ignored.py"
    ]


def test_every_output_git_holds_is_one_the_retrain_commits():
    """The retrain commits COMMITTED with the lock: an output `cache: false` outside it (git's to hold) would be
    left out of the commit whose lock records it."""
    from tools.retrain import COMMITTED

    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    in_git = [
        path
        for stage in spec["stages"].values()
        for kind in ("outs", "metrics", "plots")
        for entry in stage.get(kind, [])
        if isinstance(entry, dict)
        for path, options in entry.items()
        if (options or {}).get("cache") is False
    ]
    assert len(in_git) >= 10
    assert [p for p in in_git if not any(p == c or p.startswith(f"{c}/") for c in COMMITTED)] == []


def test_unversioned_inputs_of_a_dvc_project(tmp_path):
    """What a retrain refuses, as DVC resolves the project: a base git ignores and DVC does not track, and an input
    outside the repository; not a `dvc add`-ed base, files `.dvcignore` leaves out (DVC hashes none of them), an
    import's source (its output is the version held), or a tfds `data_dir` (tfds fetches it again by name)."""
    from tools.retrain import unversioned_inputs

    project, outside = tmp_path / "project", tmp_path / "outside"
    for folder in (project / "code" / "__pycache__", project / "tfds_data" / "cats" / "1.0", project / "models"):
        folder.mkdir(parents=True)
    outside.mkdir()
    (outside / "photo.jpg").write_text("not in the repository")
    (outside / "base.keras").write_text("imported")
    run(["git", "init", "-q"], project)
    dvc("init", "-q", cwd=project)
    (project / ".gitignore").write_text("__pycache__/\n")
    for folder in ("tfds_data", "models"):  # the project's own ignore files there: everything but the .dvc files
        shutil.copy(REPO / folder / ".gitignore", project / folder / ".gitignore")
    (project / ".dvcignore").write_text("__pycache__/\n")
    (project / "code" / "a.py").write_text("code")
    (project / "code" / "__pycache__" / "a.pyc").write_text("bytecode")
    (project / "tfds_data" / "README.md").write_text("the tfds data_dir")
    (project / "tfds_data" / "cats" / "1.0" / "x.tfrecord").write_text("a tfds download")
    (project / "models" / "base.keras").write_text("copied by hand")
    (project / "models" / "added.keras").write_text("versioned")
    dvc("add", "-q", "models/added.keras", cwd=project)
    dvc("import-url", "-q", "--no-exec", str(outside / "base.keras"), "imported.keras", cwd=project)
    deps = ["code", "tfds_data", "models", "imported.keras", str(outside / "photo.jpg")]
    (project / "dvc.yaml").write_text(json.dumps({"stages": {"s": {"cmd": "true", "deps": deps, "outs": ["o"]}}}))
    (project / "params.yaml").write_text(json.dumps({"dataset": {"source": "tfds", "dir": "tfds_data"}}))
    commit(project, "a project")
    root, sources, found = unversioned_inputs(project)
    assert sorted(sources) == ["imported.keras.dvc", "models/added.keras.dvc"]
    assert found == ["models/base.keras", os.path.realpath(outside / "photo.jpg")]
    (project / "params.yaml").write_text(json.dumps({"dataset": {"source": "folder", "dir": "tfds_data"}}))
    assert unversioned_inputs(project)[2] == [
        "models/base.keras",
        "tfds_data/cats/1.0/x.tfrecord",
        os.path.realpath(outside / "photo.jpg"),
    ]
    # the data_dir through a link (git-ignored) to another disk, tfds by default (no dataset.source): not refused
    (outside / "tfds").mkdir()
    (outside / "tfds" / "x.tfrecord").write_text("a tfds download")
    (project / "linked_tfds").symlink_to(outside / "tfds")
    with (project / ".gitignore").open("a") as handle:
        handle.write("/linked_tfds\n")
    spec = json.loads((project / "dvc.yaml").read_text())
    spec["stages"]["s"]["deps"].append("linked_tfds")
    (project / "dvc.yaml").write_text(json.dumps(spec))
    (project / "params.yaml").write_text(json.dumps({"dataset": {"dir": "linked_tfds"}}))
    commit(project, "the data_dir elsewhere")
    assert unversioned_inputs(project)[2] == [
        "models/base.keras",
        "tfds_data/cats/1.0/x.tfrecord",
        os.path.realpath(outside / "photo.jpg"),
    ]


# ---- the registry steps after the gate, on git repositories with the pipeline and the comparison stood in for ----

# GTO's register and assign, git and the decision are real; `dvc repro`, the DVC project checks and the paired
# comparison (a tie on 50 val images) are stood in for. In a child process: GTO imported into pytest's breaks its
# output capture.
REGISTRY_STEPS = """
import json, subprocess, sys, time
from pathlib import Path
import numpy as np
from gto import api
from components.params import ParamsError
from tools import retrain as rt

root = Path(sys.argv[1])
real_run = subprocess.run
state = {"metrics": None}
tick = lambda: time.sleep(1.1)  # GTO orders assignments by their tags' times (seconds)


def new_repo(name):
    repo = root / name
    (repo / "evaluation").mkdir(parents=True)
    git = lambda *args: real_run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    git("init", "-q", "-b", "main")
    write(repo, 0.9)
    git("add", "-A")
    git("commit", "-qm", "c1")
    return repo, git


def write(repo, accuracy):  # a new model: its metrics, and the hash dvc.lock records for the artifact
    metrics = {"finetune": {"val": {"accuracy": accuracy}, "test": {"accuracy": 0.5}}}
    (repo / "evaluation" / "metrics.json").write_text(json.dumps(metrics))
    # as the project's: the artifact, data/export/serving, lies inside export's output folder
    lock = {"stages": {"export": {"outs": [{"path": "data/export", "md5": f"{accuracy}.dir"}]}}}
    (repo / "dvc.lock").write_text(json.dumps(lock))


def run_or_stand_in(cmd, *args, **kwargs):
    if list(cmd)[1:4] == ["-m", "dvc", "repro"]:
        if state["metrics"] is not None:
            write(Path(kwargs["cwd"]), state["metrics"])
        if state.get("evaluate_only"):  # evaluate re-ran alone (an evaluate param): other metrics, the same model
            path = Path(kwargs["cwd"]) / "evaluation" / "metrics.json"
            metrics = json.loads(path.read_text())
            metrics["finetune"]["test"]["accuracy"] += 0.01
            path.write_text(json.dumps(metrics))
        return subprocess.CompletedProcess(cmd, 0)
    return real_run(cmd, *args, **kwargs)


def follow(repo, record):  # the reason's `gto ...` command, run as an operator would, with GTO's command line
    words = record["reason"].split("`")[1].split()
    assert words[0] == "gto", words
    real_run([str(Path(sys.executable).parent / "gto"), *words[1:]], cwd=repo, check=True, capture_output=True)
    tick()


def registered_twice(name):  # v0.0.1 in prod; one new model registered as v0.0.2, then again as v0.0.3 at a commit
    # that re-ran nothing (registered before a retrain looked for its model's deregistrations)
    repo, git = new_repo(name)
    api.register(str(repo), "classifier", git("rev-parse", "HEAD")); tick()
    api.assign(str(repo), "classifier", "prod", version="v0.0.1")
    write(repo, 0.91); git("commit", "-qam", "c2"); tick()
    api.register(str(repo), "classifier", git("rev-parse", "HEAD")); tick()
    (repo / "README.md").write_text("an edit"); git("add", "README.md"); git("commit", "-qm", "no new model"); tick()
    api.register(str(repo), "classifier", git("rev-parse", "HEAD")); tick()
    return repo, git


rt.subprocess.run = run_or_stand_in
rt.pipeline_paths = lambda repo, artifact: (repo / "data/export/serving", repo / "r", "data/m")
rt.outputs_in_git.git_tracked_cached_outputs = lambda repo: []
rt.unversioned_inputs = lambda repo: (repo, [], [])
tie = {**rt.paired(np.ones(50, bool), np.ones(50, bool)), "left_out_trained_on": 0, "left_out_other_classes": 0}
rt.compare_with_promoted = lambda *args: tie
params = rt.RetrainParams(threshold=0.5)
prod = lambda repo: rt.promoted_version(repo, params)[0]
seen = {}

# a rollback (`gto assign --force` of the older version) and a run with nothing new
repo, git = new_repo("rollback")
api.register(str(repo), "classifier", git("rev-parse", "HEAD")); tick()
api.assign(str(repo), "classifier", "prod", version="v0.0.1")
write(repo, 0.91); git("commit", "-qam", "c2"); tick()
api.register(str(repo), "classifier", git("rev-parse", "HEAD")); tick()
api.assign(str(repo), "classifier", "prod", version="v0.0.2"); tick()
api.assign(str(repo), "classifier", "prod", version="v0.0.1", force=True); tick()
code, record = rt.retrain(repo, params)
seen["rollback"] = [code, record["version"], record["reason"], prod(repo)]
(repo / "README.md").write_text("an edit"); git("add", "README.md"); git("commit", "-qm", "no new model"); tick()
code, record = rt.retrain(repo, params)  # a new commit, the same model: still rolled back
seen["rollback_later"] = [code, record["version"], record["reason"], prod(repo)]
state["evaluate_only"] = True  # the run commits (new metrics) what the rollback check then rejects
code, record = rt.retrain(repo, params)
seen["rollback_committed"] = [code, record["version"], git("log", "-1", "--format=%s"), git("tag", "--points-at", "HEAD")]
state["evaluate_only"] = False
write(repo, 0.92); git("commit", "-qam", "new data, a new model"); tick()
code, record = rt.retrain(repo, params)
seen["rollback_new_model"] = [code, prod(repo)]

# superseded, not rolled back: v0.0.1 then v0.0.2 promoted; the data goes back to v0.0.1's (its model again)
repo, git = new_repo("superseded")
api.register(str(repo), "classifier", git("rev-parse", "HEAD")); tick()
api.assign(str(repo), "classifier", "prod", version="v0.0.1")
write(repo, 0.91); git("commit", "-qam", "c2"); tick()
api.register(str(repo), "classifier", git("rev-parse", "HEAD")); tick()
api.assign(str(repo), "classifier", "prod", version="v0.0.2"); tick()
state["metrics"] = 0.9
code, record = rt.retrain(repo, params)
seen["superseded"] = [code, record["version"], prod(repo)]
state["metrics"] = None

# a stage GTO refuses, or one `.gto` does not allow, on a run with new data
repo, git = new_repo("stage")
state["metrics"] = 0.93
refused = []
for stage in ("prod stage", "production"):
    if stage == "production":
        (repo / ".gto").write_text("stages: [dev, prod]\\n"); git("add", ".gto"); git("commit", "-qm", "stages")
    head = git("rev-parse", "HEAD")
    try:
        rt.retrain(repo, rt.RetrainParams(threshold=0.5, stage=stage))
        refused.append(None)
    except ParamsError as exc:
        refused.append([str(exc), git("rev-parse", "HEAD") == head, git("tag")])
seen["stage"] = refused
state["metrics"] = None

# HEAD registered, a higher version registered by hand on another branch, nothing new
repo, git = new_repo("release")
api.register(str(repo), "classifier", git("rev-parse", "HEAD")); tick()
api.assign(str(repo), "classifier", "prod", version="v0.0.1")
git("checkout", "-qb", "release"); (repo / "notes").write_text("x"); git("add", "notes"); git("commit", "-qm", "r")
api.register(str(repo), "classifier", "HEAD", version="v1.0.0")
git("checkout", "-q", "main"); tick()
code, record = rt.retrain(repo, params)
seen["release"] = [code, record["version"]]

# --push that fails (no DVC project to push from) on a run with new data
repo, git = new_repo("push")
api.register(str(repo), "classifier", git("rev-parse", "HEAD")); tick()
api.assign(str(repo), "classifier", "prod", version="v0.0.1"); tick()
state["metrics"] = 0.95
try:
    rt.retrain(repo, params, push=True)
    seen["push"] = None
except RuntimeError as exc:
    seen["push"] = [str(exc)[:40], prod(repo)]
state["metrics"] = None

# HEAD's version deregistered by hand (a model taken back), then runs with nothing new
repo, git = new_repo("deregistered")
api.register(str(repo), "classifier", git("rev-parse", "HEAD")); tick()
api.assign(str(repo), "classifier", "prod", version="v0.0.1")
write(repo, 0.91); git("commit", "-qam", "c2"); tick()
api.register(str(repo), "classifier", git("rev-parse", "HEAD")); tick()
api.deregister(str(repo), "classifier", version="v0.0.2"); tick()
tags = lambda: sorted(git("tag").split())
before = tags()
code, record = rt.retrain(repo, params)
seen["deregistered"] = [code, record["version"], record["reason"], prod(repo), tags() == before]
(repo / "README.md").write_text("an edit"); git("add", "README.md"); git("commit", "-qm", "no new model"); tick()
code, record = rt.retrain(repo, params)  # a new commit, the same model: not registered anew either
seen["deregistered_later"] = [code, record["version"], record["reason"], prod(repo), tags() == before]
follow(repo, record)  # the hint's command, run by hand: HEAD registered as a new version
code, record = rt.retrain(repo, params)  # revived by hand: the gate decides again
seen["revived"] = [code, record["version"], prod(repo)]
write(repo, 0.92); git("commit", "-qam", "new data, a new model"); tick()
code, record = rt.retrain(repo, params)
seen["deregistered_new_model"] = [code, record["version"], prod(repo)]

# the same model registered twice (a commit that re-ran nothing, registered before this check), one deregistered
repo, git = registered_twice("twice")
api.deregister(str(repo), "classifier", version="v0.0.2"); tick()
code, record = rt.retrain(repo, params)  # HEAD's own v0.0.3 is active, but its model was withdrawn
seen["twice"] = [code, record["version"], record["reason"], prod(repo)]
follow(repo, record)  # the hint: the deregistered v0.0.2 registered again (HEAD's own v0.0.3 is active)
holding = rt.model_versions(repo, params, git("rev-parse", "HEAD"), rt.artifact_versions(repo, "classifier"))
seen["twice_hint"] = rt.withdrawn_by(holding) is None
api.deregister(str(repo), "classifier", version="v0.0.3"); tick()
code, record = rt.retrain(repo, params)
seen["twice_both"] = [code, record["version"], record["reason"], prod(repo)]
follow(repo, record)
code, record = rt.retrain(repo, params)  # the last deregistration revived by hand: the gate decides again
seen["twice_revived"] = [code, record["version"], prod(repo)]

# HEAD's version deregistered before the other version of its model; then the highest version deregistered, new data
repo, git = registered_twice("reversed")
api.deregister(str(repo), "classifier", version="v0.0.3"); tick()
api.deregister(str(repo), "classifier", version="v0.0.2"); tick()
code, record = rt.retrain(repo, params)
follow(repo, record)  # names HEAD, whose own v0.0.3 comes back
code, record = rt.retrain(repo, params)
seen["reversed_revived"] = [code, record["version"], prod(repo)]
api.deregister(str(repo), "classifier", version="v0.0.3", simple=False); tick()  # the highest version deregistered
state["metrics"] = 0.94
code, record = rt.retrain(repo, params)  # new data, a new model: past every version, v0.0.3 included
seen["after_highest_deregistered"] = [code, record["version"], prod(repo)]
state["metrics"] = None
print(json.dumps(seen))
"""


def test_the_registry_steps_after_the_gate(tmp_path):
    """Found by a review on 2026-12-06, each a failed or wrong scheduled run:
    - after a rollback (`gto assign --force` of the older version, the README's way), a run with nothing new had the
      rolled-back version as its candidate; GTO refused to assign it again, and every run failed until new data came
      (and after any commit that re-ran nothing, the same model was registered anew and put back in the stage);
    - a stage GTO refuses was found only at `gto assign`: after the pipeline, a commit saying "promoted" and a version
      tag, exit 1, and every later run repeated it (a first promotion again);
    - HEAD's version was compared with the highest version number: one registered by hand on another branch made every
      run without new data register HEAD again, which GTO refuses;
    - the stage tag was made before the pushes: a failed push reported "failed" with the model in the stage here."""
    seen = in_child(REGISTRY_STEPS, str(tmp_path))
    code, version, reason, prod = seen["rollback"]
    assert (code, version, prod) == (3, "v0.0.2", "v0.0.1") and "(a rollback): not assigned again" in reason
    code, version, reason, prod = seen["rollback_later"]  # any commit that re-ran nothing: the same model
    assert (code, version, prod) == (3, "v0.0.3", "v0.0.1") and reason.startswith(
        "the candidate is the model of v0.0.2"
    )
    # ... and one that commits (new metrics, the same model): its commit said "promoted", the gate's decision before
    # the registry's checks turned it (found by a review on 2026-12-06); the amended commit is the one registered
    code, version, message, tags = seen["rollback_committed"]
    assert (code, version, tags) == (3, "v0.0.4", "classifier@v0.0.4"), seen["rollback_committed"]
    assert message.startswith("retrain: rejected: the candidate is the model of v0.0.2"), message
    assert seen["rollback_new_model"] == [0, "v0.0.5"]  # new data after a rollback: a new model, promoted
    assert seen["superseded"] == [0, "v0.0.3", "v0.0.3"]  # not a rollback: the gate decides, as for any model
    bad_name, unknown = seen["stage"]
    assert "stage 'prod stage': Invalid value" in bad_name[0] and bad_name[1:] == [True, ""]
    assert "stage 'production'" in unknown[0] and unknown[1:] == [True, ""]  # nothing committed or registered
    assert seen["release"] == [0, "v0.0.1"]
    assert seen["push"][0].startswith("dvc push failed") and seen["push"][1] == "v0.0.1"  # not assigned
    # HEAD's version deregistered (found by a review on 2026-12-06): GTO's register refused the commit (its tag exists),
    # so every run failed with a traceback until new data came; a commit that re-ran nothing registered the
    # deregistered model anew and could put it in the stage
    code, version, reason, prod, untouched = seen["deregistered"]
    assert (code, version, prod, untouched) == (3, None, "v0.0.1", True), seen["deregistered"]
    assert reason.startswith("the candidate is the model of v0.0.2, which was deregistered"), reason
    code, version, reason, prod, untouched = seen["deregistered_later"]
    assert (code, version, prod, untouched) == (3, None, "v0.0.1", True), seen["deregistered_later"]
    assert "gto register classifier " in reason and "--simple false" in reason, reason
    assert seen["revived"] == [0, "v0.0.3", "v0.0.3"]  # the hint's command works, and the gate decides again
    assert seen["deregistered_new_model"] == [0, "v0.0.4", "v0.0.4"]
    # found by a second review that day: a deregistered model came back through another version of it (HEAD's own,
    # registered before the deregistration), and the hint named a version whose revival left another deregistered
    code, version, reason, prod = seen["twice"]
    assert (code, version, prod) == (3, "v0.0.3", "v0.0.1") and reason.startswith(
        "the candidate is the model of v0.0.2"
    )
    assert seen["twice_hint"]  # GTO took the hint's command (HEAD's active version: the deregistered one's commit)
    code, version, reason, prod = seen["twice_both"]
    assert (code, version, prod) == (3, None, "v0.0.1") and reason.startswith("the candidate is the model of v0.0.3")
    assert seen["twice_revived"] == [0, "v0.0.3", "v0.0.3"]
    # and a third review: the hint named another commit than HEAD, whose revival left HEAD's version deregistered (GTO
    # refused its tag again); after the highest version was deregistered, GTO proposed its number for a new model
    assert seen["reversed_revived"] == [0, "v0.0.3", "v0.0.3"]
    assert seen["after_highest_deregistered"] == [0, "v0.0.4", "v0.0.4"]


class Event:
    def __init__(self, second):
        self.created_at = second


class Held:  # a registry version as withdrawn_by reads it
    def __init__(self, name, active, registered=(), deregistered=()):
        self.version, self.is_active = name, active
        self.registrations = [Event(t) for t in registered]
        self.deregistrations = [Event(t) for t in deregistered]


def test_a_model_is_withdrawn_when_its_last_registry_event_is_a_deregistration():
    assert withdrawn_by([]) is None
    assert withdrawn_by([Held("v1", True, [1])]) is None
    gone = Held("v1", False, [1], [3])
    assert withdrawn_by([gone, Held("v2", True, [2])]) is gone  # another version of it registered before
    assert withdrawn_by([gone, Held("v2", True, [4])]) is None  # ... or registered again by hand after
    # at the same second (GTO's times are whole seconds), a version GTO holds active wins: registered by hand
    assert withdrawn_by([gone, Held("v2", True, [3])]) is None
    assert withdrawn_by([Held("v1", False, [3], [3])]).version == "v1"  # one version, GTO's own order
