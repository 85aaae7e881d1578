import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components.params import load_yaml
from tests.test_dvc_pipeline import REPO, commit, dvc, run, tool_env
from tools import audit


def rows(*items):
    return [{"sha256": sha, "split": split, "label": label} for sha, split, label in items]


def test_an_image_in_two_splits_is_found():
    assert audit.split_conflicts(rows(("a", "train", "cat"), ("b", "test", "dog"), ("a", "test", "cat"))) == ["a"]
    assert audit.split_conflicts(rows(("a", "train", "cat"), ("b", "test", "dog"))) == []


def test_a_manifest_without_pixel_hashes_is_compared_on_file_hashes():
    old = rows(("a", "train", "cat"), ("b", "test", "dog"))  # written before download recorded pixel hashes
    new = [dict(r, pixels_sha256=f"pixels-{r['sha256']}") for r in rows(("a", "train", "cat"), ("b", "train", "dog"))]
    assert audit.moved_splits(old, new) == [{"sha256": "b", "from": "test", "to": "train"}]


def test_an_image_that_moved_split_between_revisions_is_found():
    old = rows(("a", "train", "cat"), ("b", "test", "dog"))
    new = rows(("a", "train", "cat"), ("b", "train", "dog"), ("c", "test", "dog"))  # c is new: not a move
    assert audit.moved_splits(old, new) == [{"sha256": "b", "from": "test", "to": "train"}]


@pytest.mark.parametrize("order", [1, -1])
def test_an_image_the_old_revision_had_in_two_splits_is_a_move_whichever_row_came_last(order):
    """The old rows were kept as a dict of the last split listed: x in train and test, then in test only, was
    no move when the test row came last, and the old model had trained on a test image."""
    old = rows(("x", "train", "cat"), ("x", "test", "cat"), ("a", "val", "dog"))[::order]
    new = rows(("x", "test", "cat"), ("a", "val", "dog"))
    assert audit.moved_splits(old, new) == [{"sha256": "x", "from": "test, train", "to": "test"}]


def test_label_map_order_changes_are_found():
    assert audit.label_order_changes(["cat", "dog"], ["cat", "dog", "fox"]) == []
    assert audit.label_order_changes(["cat", "dog"], ["ant", "cat", "dog"]) == [
        "'cat': index 0 -> 1",
        "'dog': index 1 -> 2",
    ]
    assert audit.label_order_changes(["cat", "dog"], ["cat"]) == ["'dog': removed"]


def test_counts_and_diffs():
    from components import manifest

    assert manifest.split_counts(rows(("a", "train", "cat"), ("b", "train", "dog"), ("c", "train", "cat"))) == {
        "train": {"cat": 2, "dog": 1}
    }
    assert audit.diff_flat({"x": {"lr": 1, "n": 2}}, {"x": {"lr": 3, "n": 2}, "y": 1}) == {
        "x.lr": [1, 3],
        "y": [None, 1],
    }
    # a key present on one side only differs even where the other side's value is null
    assert audit.diff_flat({"x": {"layer": None}}, {"x": {}}) == {"x.layer": [None, None]}
    assert audit.diff_flat({"x": {}}, {"x": {"path": None}}) == {"x.path": [None, None]}


def test_serving_lineage_must_name_the_revisions_manifest_and_model():
    lineage = {"manifest_sha256": "m", "model_sha256": "k"}
    assert audit.lineage_checks(lineage, "m", "k") == []
    assert len(audit.lineage_checks(lineage, "other", "k")) == 1
    assert audit.lineage_checks(lineage, "m", "another model") == [
        "the serving model's lineage names another fine-tuned model than the revision's"
    ]
    assert audit.lineage_checks(None, "m", "k") == ["the serving model carries no lineage record"]


def test_a_rebuilt_output_with_another_digest_is_named():
    recorded = {"data/finetune/model.keras": "aaa", "evaluation/metrics.json": "ccc", "data/export/serving/": "sss"}
    assert audit.rebuild_mismatches(recorded, dict(recorded)) == []
    rebuilt = {**recorded, "data/finetune/model.keras": "zzz"}
    del rebuilt["evaluation/metrics.json"]
    assert audit.rebuild_mismatches(recorded, rebuilt) == [
        "rebuild: data/finetune/model.keras is zzz after re-training, aaa as recorded",
        "rebuild: evaluation/metrics.json is None after re-training, ccc as recorded",
    ]
    assert audit.rebuild_mismatches({}, {"new.json": "x"}) == [
        "rebuild: new.json is x after re-training, None as recorded"
    ]
    with pytest.raises(RuntimeError, match="the output nowhere is not in"):
        audit.content_digests(Path("/tmp"), ["nowhere"])


def test_a_rebuilt_history_differs_only_in_its_machine_record_or_not_at_all(tmp_path):
    """`trained_on` is left out of the rebuild's comparison, and nothing else: a history whose bytes differ in another
    way (a number spelt otherwise, a key given twice) compared equal after both were parsed and written again."""
    one, two = tmp_path / "a" / "history.json", tmp_path / "b" / "history.json"
    one.parent.mkdir()
    two.parent.mkdir()
    record = {"best_epoch": 2, "val_loss": [0.5, 0.1]}
    one.write_text(json.dumps({**record, "trained_on": {"cpu": "x86"}}, indent=2) + "\n")
    two.write_text(json.dumps({**record, "trained_on": {"cpu": "arm"}}, indent=2) + "\n")
    assert audit.without_machine(one) == audit.without_machine(two) != one.read_bytes()
    for other in (
        two.read_text().replace("0.1", "1e-1"),
        two.read_text().replace('"best_epoch": 2,', '"best_epoch": 1, "best_epoch": 2,'),
    ):
        two.write_text(other)
        assert audit.without_machine(one) != audit.without_machine(two), other


def test_a_rebuild_on_another_machine_type_says_so(tmp_path):
    """Two cores and one give other last bits (a k-fold head's score in the sixth digit, seen 2026-12-06): a rebuild
    on another machine failed naming only the outputs, as if the revision could not be rebuilt."""
    from components import training

    here = training.trained_on()
    assert here["cpus"] >= 1 and here["machine"] and "environment" in here
    (tmp_path / "data" / "train_head").mkdir(parents=True)
    history = tmp_path / "data" / "train_head" / "history.json"
    history.write_text(json.dumps({"epochs_run": 3, "trained_on": {**here, "cpus": here["cpus"] + 1}}, indent=2) + "\n")
    (tmp_path / "data" / "export").mkdir()  # an output without a history
    recorded = audit.trained_on(tmp_path, ["data/train_head", "data/export"])
    assert recorded == {"data/train_head/history.json": {**here, "cpus": here["cpus"] + 1}}
    rebuilt = {"data/train_head/history.json": here}
    assert audit.machine_differences(recorded, rebuilt) == [
        f"rebuild: data/train_head/history.json was trained on another machine type than this rebuild's (cpus "
        f"{here['cpus'] + 1} there, {here['cpus']} here): TensorFlow's last bits follow the machine, so rebuild on "
        "the one it names"
    ]
    assert audit.machine_differences(rebuilt, rebuilt) == []
    assert audit.machine_differences({}, rebuilt) == []  # a revision from before the record: nothing to say
    # A GPU, named only where there is one (as Keras's config only where not the default): missing is none.
    gpu = {"data/train_head/history.json": {**here, "gpus": [{"name": "/physical_device:GPU:0"}]}}
    assert audit.machine_differences(gpu, rebuilt) == [
        "rebuild: data/train_head/history.json was trained on another machine type than this rebuild's (gpus "
        "[{'name': '/physical_device:GPU:0'}] there, None here): TensorFlow's last bits follow the machine, so "
        "rebuild on the one it names"
    ]
    # The record is no difference itself: a rebuild whose bits are the same passes wherever it ran.
    digest = audit.content_digests(tmp_path, ["data/train_head"])
    history.write_text(json.dumps({"epochs_run": 3, "trained_on": here}, indent=2) + "\n")
    assert audit.content_digests(tmp_path, ["data/train_head"]) == digest
    history.write_text(json.dumps({"epochs_run": 4, "trained_on": here}, indent=2) + "\n")
    assert audit.content_digests(tmp_path, ["data/train_head"]) != digest


EXPORT = """
import sys
import keras
import numpy as np
from pipelines import serving
keras.utils.set_random_seed(1)
inputs = keras.Input((8, 8, 3))
x = keras.layers.BatchNormalization(name="norm")(keras.layers.Conv2D(4, 3, name="conv")(inputs))
model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="out")(keras.layers.Flatten()(x)))
if sys.argv[2] == "nudged":
    weights = model.get_weights()
    weights[-1] = weights[-1] + np.float32(1e-3)  # one bias
    model.set_weights(weights)
names = ["dogs", "cats"] if sys.argv[2] == "swapped" else ["cats", "dogs"]
serving.export(model, names, (8, 8), sys.argv[1])
"""


@pytest.mark.slow
def test_saved_model_digest_is_what_the_model_computes_not_its_byte_order(tmp_path):
    for name, variant in (("a", "same"), ("b", "same"), ("c", "nudged"), ("e", "swapped")):  # a process each
        subprocess.run(
            [sys.executable, "-c", EXPORT, str(tmp_path / name), variant],
            cwd=REPO,
            env=tool_env(),
            check=True,
            capture_output=True,
        )
    files = audit.content_digests(tmp_path, ["a", "b"])
    assert set(files) == {"a/", "b/"} and files["a/"] == files["b/"]
    assert audit.saved_model_digest(tmp_path / "c") != files["a/"]
    # the class names it answers with: a constant the serving function captures, outside its function body
    assert audit.saved_model_digest(tmp_path / "e") != files["a/"]
    (tmp_path / "b" / "stray.txt").write_text("x")  # a file in the model's folder that is no part of its graph
    assert audit.content_digests(tmp_path, ["b"])["b/stray.txt"] == hashlib.sha256(b"x").hexdigest()
    (tmp_path / "b" / "stray.txt").unlink()
    for name, record in (("a", b"{1}"), ("b", b"{2}")):  # the lineage record beside the graph counts by its bytes
        (tmp_path / name / "assets.extra").mkdir()
        (tmp_path / name / "assets.extra" / "lineage.json").write_bytes(record)
    files = audit.content_digests(tmp_path, ["a", "b"])
    assert files["a/"] == files["b/"] and files["a/assets.extra/lineage.json"] != files["b/assets.extra/lineage.json"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    assert audit.content_digests(tmp_path, ["d"]) == {"d/notes.txt": hashlib.sha256(b"x").hexdigest()}


LOCK = {
    "stages": {
        "download": {
            "deps": [{"path": "images", "md5": "s.dir"}],
            "outs": [{"path": "data/download", "md5": "d1.dir"}],
        },
        "extract": {
            "deps": [{"path": "data/download", "md5": "d1.dir"}],
            "outs": [{"path": "data/extract", "md5": "e.dir"}],
        },
        "quality": {
            "deps": [{"path": "data/download", "md5": "d0.dir"}, {"path": "data/extract", "md5": "e.dir"}],
            "outs": [{"path": "quality/near_duplicates.json", "md5": hashlib.md5(b"[]").hexdigest()}],
        },
    }
}


def test_a_lock_that_is_not_one_consistent_run_is_found():
    assert audit.lock_inconsistencies(LOCK, ["download", "extract", "quality", "export"]) == [
        "stage export is in dvc.yaml but not in dvc.lock: run `dvc repro` and commit",
        "stage quality was run on data/download d0.dir, but download recorded d1.dir: its outputs are stale; "
        "run `dvc repro` and commit",
    ]
    consistent = json.loads(json.dumps(LOCK))
    consistent["stages"]["quality"]["deps"][0]["md5"] = "d1.dir"
    assert audit.lock_inconsistencies(consistent, ["download", "extract", "quality"]) == []


def test_inputs_no_stage_makes_are_checked_against_what_the_revision_holds():
    # code, a base in models/ or source data changed and committed without `dvc repro`: the commit's inputs did
    # not make its outputs
    lock = {
        "stages": {
            "download": {
                "deps": [
                    {"path": "sources/photos", "md5": "s.dir", "nfiles": 10},
                    {"path": "components/download.py", "md5": "c1"},
                ],
                "outs": [{"path": "data/download", "md5": "d1.dir"}],
            },
            "extract": {
                "deps": [{"path": "data/download", "md5": "d1.dir"}, {"path": "models", "md5": "m.dir", "nfiles": 3}],
                "outs": [{"path": "data/extract", "md5": "e.dir"}],
            },
        }
    }
    assert audit.sources(lock) == ["components/download.py", "models", "sources/photos"]
    held = {"components/download.py": ("c1", 1), "models": ("m.dir", 3), "sources/photos": ("s.dir", 10)}
    assert audit.source_problems(lock, held.get) == ([], [])
    # an edited file; a folder holding as many files as the run saw (git's alone, or with DVC's) but other ones
    edited = {**held, "components/download.py": ("c2", 1), "models": ("m2.dir", 3)}
    assert audit.source_problems(lock, edited.get) == (
        [
            "stage download was run on components/download.py c1, but the revision holds c2 there: the committed "
            "input did not make its outputs (changed without `dvc repro`); run `dvc repro` and commit",
            "stage extract was run on models m.dir, but the revision holds m2.dir there: the committed input did not "
            "make its outputs (changed without `dvc repro`); run `dvc repro` and commit",
        ],
        [],
    )
    # a folder of which the revision holds fewer files than the run hashed (a tfds download beside git's README,
    # a base copied in by hand beside an imported one), or nothing there: reported, not checkable
    unversioned = {**held, "sources/photos": (None, 0), "models": ("readme-only.dir", 2)}
    assert audit.source_problems(lock, unversioned.get) == (
        [],
        [
            "models (stage extract: m.dir, 3 files; the revision holds 2)",
            "sources/photos (stage download: s.dir, 10 files; the revision holds 0)",
        ],
    )
    # a folder the revision versions whole (`dvc add`-ed or imported; no count): any difference fails, files
    # deleted from it and re-added included
    (problem,) = audit.source_problems(lock, {**held, "sources/photos": ("s2.dir", None)}.get)[0]
    assert problem.startswith("stage download was run on sources/photos s.dir, but the revision holds s2.dir")
    # unreadable (None): noted by the caller, which fails the audit
    assert audit.source_problems(lock, {**held, "models": None}.get) == ([], [])
    # a file input (code) deleted from the commit without `dvc repro`: a problem, not an unversioned folder
    (problem,), listed = audit.source_problems(lock, {**held, "components/download.py": (None, 0)}.get)
    assert listed == [] and problem.startswith(
        "stage download was run on the file components/download.py c1, which the revision does not hold"
    )


def test_a_folder_a_dropped_stage_made_is_a_problem_where_the_revision_does_not_version_it():
    """A review on 2026-12-07: download deleted from dvc.yaml (its lock entry left): data/download became a source
    of extract that the revision holds nothing of, listed as unversioned and passed, though nothing rebuilds it and
    `dvc pull` does not restore it."""
    lock = {
        "stages": {
            "download": {
                "deps": [{"path": "sources", "md5": "s.dir"}],
                "outs": [{"path": "data/download", "md5": "d.dir"}],
            },
            "extract": {
                "deps": [
                    {"path": "data/download", "md5": "d.dir", "nfiles": 4},
                    {"path": "data/download/x", "md5": "x"},
                ],
                "outs": [{"path": "data/extract", "md5": "e.dir"}],
            },
        }
    }
    dropped = audit.dropped_outputs(lock, ["extract"])
    assert dropped == {"data/download": "download"}
    lock = audit.declared_only(lock, ["extract"])
    assert audit.sources(lock) == ["data/download", "data/download/x"]
    nothing = {"data/download": (None, 0), "data/download/x": (None, 0)}
    problems, listed = audit.source_problems(lock, nothing.get, dropped)
    assert listed == [] and [p.split(",")[0] for p in problems] == [
        "stage extract was run on data/download d.dir",
        "stage extract was run on the file data/download/x x",  # a file the revision does not hold: as before
    ]
    assert "output of stage download, which dvc.yaml no longer declares" in problems[0]
    assert audit.source_problems(lock, nothing.get)[1] == [
        "data/download (stage extract: d.dir, 4 files; the revision holds 0)"
    ]
    # `dvc add`-ed since (the revision versions it whole, with the recorded hash): nothing to say
    added = {"data/download": ("d.dir", None), "data/download/x": ("x", None)}
    assert audit.source_problems(lock, added.get, dropped) == ([], [])


@pytest.mark.integration
def test_an_input_git_holds_as_a_symbolic_link_cannot_be_checked_and_says_so(tmp_path):
    """A review on 2026-12-07: git holds a link as the path it points to, DVC hashed the target's bytes, so an up to
    date revision with a base linked into models/ failed as "changed without `dvc repro`"."""
    run(["git", "init", "-q"], tmp_path)
    dvc("init", "-q", cwd=tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "in.txt").write_text("x\n")
    (tmp_path / "link.txt").symlink_to("in.txt")
    (tmp_path / "models" / "base.keras").symlink_to("../in.txt")
    commit(tmp_path, "inputs")
    head = run(["git", "rev-parse", "HEAD"], tmp_path).stdout.strip()
    unreadable = []
    found = audit.versioned_inputs(tmp_path, head, ["in.txt", "link.txt", "models"], unreadable)
    assert found["in.txt"] == (hashlib.md5(b"x\n").hexdigest(), 1)
    assert found["link.txt"] is None and found["models"] is None
    assert [line.split(",")[0] for line in unreadable] == [
        f"link.txt at {head[:12]}",
        f"models at {head[:12]}",
    ] and "(models/base.keras)" in unreadable[1], unreadable


def test_an_input_is_hashed_from_the_revision_as_dvc_hashes_it_in_the_workspace(tmp_path):
    # models/ as a preset leaves it: git's README, .gitignore and .dvc file beside a DVC-tracked base; a source
    # folder `dvc add`-ed whole; a file git holds; and a path the revision holds nothing at
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build

    run(["git", "init", "-q"], tmp_path)
    dvc("init", "-q", cwd=tmp_path)
    (tmp_path / "sources" / "photos").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "sources" / "photos" / f"{i}.jpg").write_bytes(bytes([i]) * 10)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base.keras").write_bytes(b"weights")
    (tmp_path / "models" / "README.md").write_text("bases\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    dvc("add", "-q", "sources/photos", "models/base.keras", cwd=tmp_path)
    commit(tmp_path, "inputs")
    head = run(["git", "rev-parse", "HEAD"], tmp_path).stdout.strip()
    paths = ["sources/photos", "models", "models/base.keras", "code.py"]
    unreadable = []
    found = audit.versioned_inputs(tmp_path, head, [*paths, "generated"], unreadable)
    with Repo(str(tmp_path)) as repo:  # what `dvc repro` records for each as a stage's input (md5, nfiles)
        for path in paths:
            _, meta, obj = build(repo.cache.local, str(tmp_path / path), repo.fs, "md5", ignore=repo.dvcignore)
            assert found[path][0] == obj.hash_info.value, path
    # files counted where the revision may not version all of them; None where it versions the input whole
    assert [found[path][1] for path in paths] == [None, 4, None, 1]  # models: README, .gitignore, .dvc, base
    assert found["generated"] == (None, 0) and unreadable == []


@pytest.mark.integration
def test_a_freshly_reproduced_revision_with_small_float_params_passes_the_lock_checks(tmp_path):
    # DVC writes 0.00001 into dvc.lock as `1e-05`, which YAML 1.1 reads as a string
    run(["git", "init", "-q"], tmp_path)
    dvc("init", "-q", cwd=tmp_path)
    (tmp_path / "params.yaml").write_text("finetune:\n  learning_rate: 0.00001\n  decay: 1.0e-06\n")
    stage = {"cmd": "echo done > out.txt", "params": ["finetune.learning_rate", "finetune"], "outs": ["out.txt"]}
    (tmp_path / "dvc.yaml").write_text(json.dumps({"stages": {"s": stage}}))
    dvc("repro", "-q", cwd=tmp_path)
    assert "1e-05" in (tmp_path / "dvc.lock").read_text()
    commit(tmp_path, "reproduced")
    record = audit.collect(tmp_path, "HEAD")
    assert record["lock_problems"] == [], record["lock_problems"]  # (a toy project: no model to report on)
    assert not [u for u in record["unreadable"] if "out.txt" in u or u.startswith("the data of")]
    (tmp_path / "params.yaml").write_text("finetune:\n  learning_rate: 0.0001\n  decay: 1.0e-06\n")
    commit(tmp_path, "edited, no repro")
    (problem,) = audit.collect(tmp_path, "HEAD")["lock_problems"]
    assert "finetune.learning_rate: 1e-05 -> 0.0001" in problem, problem


def test_params_and_stage_definitions_changed_without_repro_are_found():
    lock = {
        "stages": {
            "finetune": {
                "cmd": "python -m components.finetune",
                "deps": [{"path": "a.py", "md5": "1"}],
                "params": {"params.yaml": {"common": {"seed": 1}, "finetune.learning_rate": 5e-05}},
                "outs": [{"path": "data/finetune", "md5": "f.dir"}],
            }
        }
    }
    params = "common: {seed: 1}\nfinetune: {learning_rate: 5.0e-05, epochs: 3}\n"
    assert audit.params_changes(lock, {"params.yaml": params}.get) == []
    # read as DVC reads and writes them: its lock's `5e-05` and a params file's `0.00005` are one number
    written = audit.load_yaml("params.yaml:\n  common:\n    seed: 1\n  finetune.learning_rate: 5e-05\n")
    dvc_lock = {"stages": {"finetune": {**lock["stages"]["finetune"], "params": written}}}
    for spelling in ("0.00005", "5e-05"):
        assert audit.params_changes(dvc_lock, {"params.yaml": params.replace("5.0e-05", spelling)}.get) == []
    (problem,) = audit.params_changes(lock, {"params.yaml": "common: [unclosed\n"}.get)
    assert problem.startswith("stage finetune's params file params.yaml cannot be read as YAML")
    (problem,) = audit.params_changes(
        lock, {"params.yaml": "common: {seed: 1, seed: 2}\n"}.get
    )  # a problem, not a crash
    assert problem.startswith("stage finetune's params file params.yaml cannot be read as YAML (duplicate key 'seed'")
    (problem,) = audit.params_changes(lock, {"params.yaml": params.replace("seed: 1", "seed: 2")}.get)
    assert problem == (
        "stage finetune was run with other params than the revision's params.yaml (common.seed: 1 -> 2): its "
        "outputs are stale; run `dvc repro` and commit"
    )
    (problem,) = audit.params_changes(lock, {"params.yaml": "common: {seed: 1}\n"}.get)
    assert "(finetune.learning_rate removed)" in problem
    # a section key set to null is not a key that is absent (a default need not be null), either way round
    nulls = {
        "stages": {
            "finetune": {
                **lock["stages"]["finetune"],
                "params": {"params.yaml": {"common": {"seed": 1, "layer": None}}},
            }
        }
    }
    (problem,) = audit.params_changes(nulls, {"params.yaml": "common: {seed: 1}\n"}.get)
    assert "(common.layer: None -> (absent))" in problem
    (problem,) = audit.params_changes(
        lock, {"params.yaml": "common: {seed: 1, path: null}\nfinetune: {learning_rate: 5.0e-05}\n"}.get
    )
    assert "(common.path: (absent) -> None)" in problem
    (problem,) = audit.params_changes(lock, {}.get)
    assert problem == "stage finetune was run with params from params.yaml, which the revision does not hold"
    definition = {
        "cmd": "python -m components.finetune",
        "deps": ["a.py"],
        "outs": ["data/finetune"],
        "params": {"params.yaml": ["common", "finetune.learning_rate"]},
    }
    assert audit.definition_changes(lock, {"finetune": definition}) == []
    for change, named in (
        ({"cmd": "python -m components.finetune --fast"}, "cmd"),
        ({"deps": ["a.py", "b.py"]}, "deps"),
        ({"outs": ["data/finetune", "extra"]}, "outs"),
        ({"params": {"params.yaml": ["common"]}}, "params"),
        ({"params": {}}, "params"),
    ):
        (problem,) = audit.definition_changes(lock, {"finetune": {**definition, **change}})
        assert problem.startswith(f"stage finetune's {named} in dvc.yaml are not those dvc.lock recorded"), problem
    # a params file tracked whole (no keys listed in dvc.yaml): the values of the keys dvc.lock recorded are
    # checked by params_changes; a key added to the file later is not (no stage here tracks a file whole)
    assert audit.definition_changes(lock, {"finetune": {**definition, "params": {"params.yaml": None}}}) == []
    # an empty mapping is a value: one added or removed is a change, as `dvc status` has it
    with_options = {"params.yaml": {"common": {"seed": 1}, "finetune.learning_rate": 5e-05, "beam": {"options": {}}}}
    options_lock = {"stages": {"finetune": {**lock["stages"]["finetune"], "params": with_options}}}
    params = "common: {seed: 1}\nfinetune: {learning_rate: 5.0e-05}\nbeam: {options: {}}\n"
    assert audit.params_changes(options_lock, {"params.yaml": params}.get) == []
    (problem,) = audit.params_changes(options_lock, {"params.yaml": params.replace("options: {}", "runner: x")}.get)
    assert "beam.options removed" in problem or "beam.options: {} -> (absent)" in problem, problem
    assert audit.diff_flat({"beam": {"options": {}}}, {"beam": {}}) == {"beam.options": [{}, None]}
    # a params file tracked whole added to dvc.yaml since the run (a review on 2026-12-07: only files gone from it
    # were seen; `dvc status` says "changed deps: new: extra.yaml")
    added = {**definition, "params": {**definition["params"], "extra.yaml": None}}
    (problem,) = audit.definition_changes(lock, {"finetune": added})
    assert problem.startswith("stage finetune's params in dvc.yaml are not those dvc.lock recorded"), problem


def test_a_git_tracked_output_committed_from_another_run_is_found():
    committed = {"quality/near_duplicates.json": b"[]"}
    uncached = {"quality/near_duplicates.json"}
    no_tree = lambda path: None  # noqa: E731
    assert audit.git_tracked_mismatches(LOCK, uncached, committed.get, no_tree) == []
    committed["quality/near_duplicates.json"] = b'[{"a_id": "stale"}]'
    (problem,) = audit.git_tracked_mismatches(LOCK, uncached, committed.get, no_tree)
    assert problem.startswith("quality/near_duplicates.json as committed is not the file dvc.lock records for stage")
    (problem,) = audit.git_tracked_mismatches(LOCK, uncached, {}.get, no_tree)  # never committed: not a pass
    assert problem.startswith("quality/near_duplicates.json is not in the commit, but dvc.lock records it")
    assert audit.git_tracked_mismatches(LOCK, set(), {}.get, no_tree) == []  # DVC-cached: checked through DVC


def test_a_git_tracked_folder_is_checked_file_by_file_against_dvcs_folder_hash():
    files = {"a.png": b"a", "sub/b.png": b"bb", "sub-c.png": b"c"}
    md5s = {name: hashlib.md5(blob).hexdigest() for name, blob in files.items()}
    # what `dvc repro` (DVC 3.67) recorded in dvc.lock for a folder output holding these three files
    assert audit.dir_md5(md5s) == "4ecc7626505ab46d9462523aabbebca8.dir"
    # which is the md5 of DVC's listing, relative paths sorted as text
    listing = [{"md5": md5s[name], "relpath": name} for name in sorted(files)]
    assert audit.dir_md5(md5s) == hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"
    lock = {"stages": {"evaluate": {"outs": [{"path": "evaluation/gradcam", "md5": audit.dir_md5(md5s)}]}}}
    uncached = {"evaluation/gradcam"}
    check = lambda tree: audit.git_tracked_mismatches(lock, uncached, {}.get, lambda path: tree)  # noqa: E731
    assert check(dict(files)) == []
    for tree in ({**files, "a.png": b"other"}, {**files, "extra.png": b"x"}, {"a.png": b"a"}):
        (problem,) = check(tree)
        assert problem.startswith("evaluation/gradcam as committed is not the folder dvc.lock records"), problem
    (problem,) = check(None)
    assert problem.startswith("evaluation/gradcam is not in the commit"), problem
    empty = {"stages": {"evaluate": {"outs": [{"path": "evaluation/gradcam", "md5": audit.dir_md5({})}]}}}
    assert audit.git_tracked_mismatches(empty, uncached, {}.get, lambda path: None) == []


def test_an_input_inside_another_stages_output_folder_is_checked():
    lock = {
        "stages": {
            "train_head": {"outs": [{"path": "data/train_head", "md5": "h.dir"}]},
            "finetune": {"deps": [{"path": "data/train_head/head.keras", "md5": "old"}], "outs": []},
        }
    }
    (problem,) = audit.lock_inconsistencies(lock, ["train_head", "finetune"], {"data/train_head/head.keras": "new"}.get)
    assert problem == (
        "stage finetune was run on data/train_head/head.keras old, but train_head recorded new: its outputs are "
        "stale; run `dvc repro` and commit"
    )
    assert audit.lock_inconsistencies(lock, [], {"data/train_head/head.keras": "old"}.get) == []
    with pytest.raises(ValueError, match="needs file_md5"):  # never silently unchecked
        audit.lock_inconsistencies(lock, [])


@pytest.mark.integration
def test_a_folder_input_inside_another_stages_output_folder_is_checked(tmp_path):
    # Stage b reads a sub-folder of stage a's output: its hash comes from a's recorded listing, not from
    # reading the folder as a file (which failed every audit of such a project).
    run(["git", "init", "-q"], tmp_path)
    dvc("init", "-q", cwd=tmp_path)
    # a's output: `sub/x`, `sub/z` and `y`, or only `y` when src says "gone"; c's, `reports`, is left to git
    write = (
        f"{sys.executable} -c \"import os,shutil; text = open('src').read(); shutil.rmtree('{{out}}', True); "
        "os.makedirs('{out}/sub' if text != 'gone' else '{out}'); "
        "[open(f'{out}/' + n, 'w').write(text + n) for n in (('sub/x', 'sub/z', 'y') if text != 'gone' else ('y',))]\""
    )
    stages = {
        "a": {"cmd": write.format(out="data/a"), "deps": ["src"], "outs": ["data/a"]},
        "b": {
            "cmd": f"{sys.executable} -c \"open('out.txt', 'w').write('b')\"",
            "deps": ["data/a/sub"],
            "outs": ["out.txt"],
        },
        "c": {"cmd": write.format(out="reports"), "deps": ["src"], "outs": [{"reports": {"cache": False}}]},
        "d": {
            "cmd": f"{sys.executable} -c \"open('d.txt', 'w').write('d')\"",
            "deps": ["reports/sub"],
            "outs": ["d.txt"],
        },
    }
    (tmp_path / "dvc.yaml").write_text(json.dumps({"stages": stages}))
    (tmp_path / "src").write_text("one")
    (tmp_path / ".gitignore").write_text("/data/\n")
    dvc("repro", "-q", cwd=tmp_path)
    commit(tmp_path, "consistent")
    record = audit.collect(tmp_path, "HEAD")  # d's input is in a git-tracked folder: hashed from its bytes
    assert record["lock_problems"] == [] and not [u for u in record["unreadable"] if "data/a" in u or "reports" in u]
    (tmp_path / "src").write_text("two")
    dvc("repro", "-q", "--single-item", "a", cwd=tmp_path)  # b not re-run: its lock entry is stale
    commit(tmp_path, "a re-run alone")
    record = audit.collect(tmp_path, "HEAD")
    problem, source = record["lock_problems"]
    assert problem.startswith("stage b was run on data/a/sub ") and problem.endswith(
        "its outputs are stale; run `dvc repro` and commit"
    )
    assert source.startswith("stage c was run on src ")  # c was not re-run either: the committed src is another
    assert not [u for u in record["unreadable"] if "data/a" in u]  # (this toy project has no model to report on)
    (tmp_path / "src").write_text("gone")
    dvc("repro", "-q", "--single-item", "a", cwd=tmp_path)  # data/a/sub is gone: b's input is stale, not unreadable
    commit(tmp_path, "a re-run alone, without sub")
    record = audit.collect(tmp_path, "HEAD")
    problem, source = record["lock_problems"]
    assert source.startswith("stage c was run on src ")
    assert (
        problem.startswith("stage b was run on data/a/sub ")
        and "a recorded d751713988987e9331980363e24189ce.dir" in problem
    )
    assert not [u for u in record["unreadable"] if "data/a" in u]


def test_the_stages_and_git_tracked_outputs_a_dvc_yaml_declares_as_dvc_resolves_them(tmp_path):
    run(["git", "init", "-q"], tmp_path)
    dvc("init", "-q", cwd=tmp_path)
    dvc_yaml = {
        "vars": [{"reports": "reports"}],
        "stages": {
            "s": {
                "cmd": "true",
                "outs": ["data/s", {"data/t": {"persist": True}}, {"report": {"cache": False}}],
                "metrics": [{"m.json": {"cache": False}}, "n.json"],
                "plots": [{"p.json": {"cache": False, "x": "a"}}, "q.json"],
            },
            "per_split": {  # a foreach stage with templated paths: one stage per item
                "foreach": ["train", "val"],
                "do": {"cmd": "true", "outs": [{"${reports}/${item}.json": {"cache": False}}, "data/${item}"]},
            },
        },
    }
    (tmp_path / "dvc.yaml").write_text(json.dumps(dvc_yaml))
    commit(tmp_path, "stages")
    head = run(["git", "rev-parse", "HEAD"], tmp_path).stdout.strip()
    stages, uncached = audit.declared_stages(tmp_path, head)
    assert stages == ["s", "per_split@train", "per_split@val"]
    assert uncached == {"report", "m.json", "p.json", "reports/train.json", "reports/val.json"}
    (tmp_path / "dvc.yaml").write_text(json.dumps({"stages": {"s": {"cmd": "true", "outs": ["${missing}/x"]}}}))
    commit(tmp_path, "a dvc.yaml DVC cannot resolve")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    run(["git", "add", "dvc.lock"], tmp_path)
    commit(tmp_path, "lock")
    record = audit.collect(tmp_path, "HEAD")
    assert len(record["lock_problems"]) == 1 and "cannot be resolved by DVC" in record["lock_problems"][0]
    assert record["unrecorded"] == audit.unrecorded_facts({"stages": {}})
    assert set(record["unrecorded"]) <= set(audit.audit(tmp_path, "HEAD")["problems"])  # the audit fails on them


def test_facts_from_files_no_recorded_stage_made_fail_the_audit():
    """A revision whose dvc.yaml and dvc.lock have no stages, its manifest, labels, model and lineage committed to
    git by hand, passed: every lock check was vacuous. The facts must come from outputs of a recorded run."""
    assert audit.unrecorded_facts({"schema": "2.0", "stages": {}}) == [
        f"{path} is no output of a stage in dvc.lock that dvc.yaml declares: the audit's facts must come from a "
        "recorded run (`dvc repro` and commit)"
        for path in audit.DVC_FILES
    ]
    outs = {"download": "data/download", "convert": "data/convert", "finetune": audit.MODEL, "export": "data/export"}
    lock = {"stages": {stage: {"outs": [{"path": path, "md5": "x"}]} for stage, path in outs.items()}}
    assert audit.unrecorded_facts(lock) == [] == audit.unrecorded_facts(lock, list(outs))
    # A stage deleted from dvc.yaml by hand keeps its lock entry, which vouched for a manifest committed by hand
    # after it (the audit passed, reporting that manifest's splits).
    assert audit.unrecorded_facts(lock, ["convert", "finetune", "export"]) == [
        audit.unrecorded_facts({"stages": {}})[0]
    ]
    del lock["stages"]["export"]
    assert audit.unrecorded_facts(lock) == [audit.unrecorded_facts({"stages": {}})[2]]  # the lineage's


def test_the_repositorys_own_git_tracked_outputs_are_found():
    head = run(["git", "rev-parse", "HEAD"], REPO).stdout.strip()
    stages, uncached = audit.declared_stages(REPO, head)
    assert stages[:4] == ["download", "convert", "base_weights", "extract"]
    assert uncached >= {"evaluation/gradcam", "evaluation/metrics.json", "dvclive/finetune/metrics.json"}


def test_workspace_outputs_of_another_run_are_found(tmp_path):
    (tmp_path / "dvc.lock").write_text(json.dumps(LOCK))
    assert audit.workspace_lock_changes(tmp_path, audit.stage_outputs(LOCK)) == []
    other = json.loads(json.dumps(LOCK))
    other["stages"]["extract"]["outs"][0]["md5"] = "e2.dir"  # the audited revision's extract was another run
    (problem,) = audit.workspace_lock_changes(tmp_path, audit.stage_outputs(other))
    assert problem.startswith("workspace: stage extract's outputs in dvc.lock are not the audited revision's")


def test_a_revision_without_dvc_lock_is_a_clear_error(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "README").write_text("x")
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "x"], cwd=tmp_path, check=True)
    with pytest.raises(SystemExit, match="HEAD has no dvc.lock: nothing was reproduced and committed there"):
        audit.main(["--rev", "HEAD", "--repo", str(tmp_path), "--out", str(tmp_path / "audit")])


# ---- end to end: real DVC revisions, every failure mode ------------------------------------------


# Stages that only copy prepared files into the paths the audit reads: the audit sees real dvc.lock
# entries, DVC cache objects and revisions, without training anything.
LAYOUT = {"download": audit.MANIFEST, "convert": audit.LABELS, "finetune": audit.MODEL, "export": audit.LINEAGE}
QUALITY = {"near_duplicates": audit.NEAR_DUPLICATES, "label_issues": audit.LABEL_ISSUES}


def write_revision(project, manifest_rows, labels, lineage_override=None, near_duplicates=()):
    src = project / "src"
    src.mkdir(exist_ok=True)
    manifest = "".join(json.dumps(r, sort_keys=True) + "\n" for r in manifest_rows).encode()
    model = b"model weights " + manifest[:16]
    lineage = {
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "model_sha256": hashlib.sha256(model).hexdigest(),
    }
    lineage.update(lineage_override or {})
    blobs = {
        "download": manifest,
        "convert": json.dumps(labels).encode(),
        "finetune": model,
        "export": json.dumps(lineage).encode(),
    }
    for stage, blob in blobs.items():
        (src / stage).write_bytes(blob)
    (src / "near_duplicates").write_text(json.dumps(list(near_duplicates)))
    (src / "sheets" / "suspects").mkdir(parents=True, exist_ok=True)
    (src / "sheets" / "suspects" / "1.png").write_bytes(b"a contact sheet")
    (src / "label_issues").write_text(
        json.dumps(
            [
                {
                    "id": "c" * 20,
                    "split": "train",
                    "source": "cat/3.jpg",
                    "given": "cat",
                    "suggested": "dog",
                    "score": 0.01,
                }
            ]
        )
    )


@pytest.fixture
def audited_project(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    run(["git", "init", "-q"], project)
    dvc("init", "-q", cwd=project)
    stages = {
        stage: {
            "cmd": f"{sys.executable} -c \"import os,shutil; os.makedirs(os.path.dirname('{path}'), exist_ok=True); "
            f"shutil.copy('src/{stage}', '{path}')\"",
            "deps": [f"src/{stage}"],
            "outs": [path],
        }
        for stage, path in LAYOUT.items()
    }
    stages["download"]["outs"] = ["data/download"]  # a folder holding the manifest, as the real stage's
    stages["extract"] = {  # a cached output the audit never reads (the real extract's features)
        "cmd": f"{sys.executable} -c \"import os,shutil; os.makedirs('data/extract', exist_ok=True); "
        "shutil.copy('src/extract', 'data/extract/features.bin')\"",
        "deps": ["src/extract"],
        "outs": ["data/extract"],
    }
    (project / "src").mkdir()
    (project / "src" / "extract").write_bytes(b"features")
    copies = "; ".join(f"shutil.copy('src/{name}', '{path}')" for name, path in QUALITY.items())
    sheets = "shutil.rmtree('quality/sheets', ignore_errors=True); shutil.copytree('src/sheets', 'quality/sheets')"
    stages["quality"] = {  # git-tracked outputs (cache: false), a folder among them, as the real stage's
        "cmd": f"{sys.executable} -c \"import os,shutil; os.makedirs('quality', exist_ok=True); {copies}; {sheets}\"",
        "deps": [f"src/{name}" for name in QUALITY] + ["src/sheets", audit.MANIFEST],  # a file in download's folder
        "outs": [{path: {"cache": False}} for path in (*QUALITY.values(), "quality/sheets")],
    }
    (project / "dvc.yaml").write_text(json.dumps({"stages": stages}))  # JSON is YAML
    (project / ".gitignore").write_text("/data/\n")

    def revision(message, rows, labels, **kwargs):
        write_revision(project, rows, labels, **kwargs)
        dvc("repro", "-q", cwd=project)
        commit(project, message)
        return run(["git", "rev-parse", "HEAD"], project).stdout.strip()

    return project, revision


def manifest_rows(*items):
    return [
        {"id": p[:20], "sha256": f"file-{p}", "pixels_sha256": p, "split": split, "label": label}
        for p, split, label in items
    ]


def audit_of(project, rev, against=None):
    args = ["--rev", rev, "--repo", str(project), "--out", str(project / "audit")] + (
        ["--against", against] if against else []
    )
    code = audit.main(args)
    return code, json.loads((project / "audit" / "audit.json").read_text())["problems"]


# a resized copy in test of a train image, as the quality stage lists it (other pixels: only the features see it)
NEAR_COPY = {
    "similarity": 0.991,
    "a_split": "train",
    "a_id": "a" * 20,
    "a_source": "cat/1.jpg",
    "b_split": "test",
    "b_id": "d" * 20,
    "b_source": "cat/1_small.png",
}


@pytest.mark.integration
def test_every_audit_failure_mode_on_real_revisions(audited_project):
    project, revision = audited_project
    good = revision("good", manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "test", "dog")), ["cat", "dog"])
    assert audit_of(project, good) == (0, [])

    two_splits = revision(
        "a re-encoded copy in test",
        manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "test", "dog"), ("a" * 64, "test", "cat")),
        ["cat", "dog"],
    )
    code, problems = audit_of(project, two_splits)
    assert code == 1 and problems == [f"image {'a' * 12} is in two splits"]

    pair = dict(NEAR_COPY)
    near_copy = revision(
        "a resized copy in test (other pixels: only the features see it)",
        manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "test", "dog"), ("d" * 64, "test", "cat")),
        ["cat", "dog"],
        near_duplicates=[pair],
    )
    code, problems = audit_of(project, near_copy)
    assert code == 1 and problems == [
        "near-duplicate across splits: train cat/1.jpg and test cat/1_small.png "
        f"(feature cosine 0.9910; ids {'a' * 20}, {'d' * 20}: list one in download.exclude)"
    ]
    report = (project / "audit" / "audit.md").read_text()
    assert "near-duplicate pairs across splits: 1" in report and "suspected label errors (train + val): 1" in report
    assert "excluded by download.exclude: 0" in report and "download.keep_together: 0" in report

    stale = revision(
        "serving model from another manifest",
        manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "test", "dog")),
        ["cat", "dog"],
        lineage_override={"manifest_sha256": "0" * 64},
    )
    code, problems = audit_of(project, stale)
    assert code == 1 and problems == ["the serving model's lineage names another manifest than the revision's"]

    # a re-run finds a pair, but only dvc.lock is committed: the committed (git-tracked) list is the old one
    write_revision(
        project,
        manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "test", "dog")),
        ["cat", "dog"],
        near_duplicates=[pair],
    )
    dvc("repro", "-q", cwd=project)
    run(["git", "add", "dvc.lock"], project)
    commit_only_lock = "stale report"
    run(["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", commit_only_lock], project)
    code, problems = audit_of(project, "HEAD")
    assert code == 1 and problems[0].startswith(
        f"{audit.NEAR_DUPLICATES} as committed is not the file dvc.lock records for stage quality"
    ), problems
    run(["git", "checkout", "-q", "--", "."], project)  # back to the committed files

    again = revision(
        "one run again", manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "test", "dog")), ["cat", "dog"]
    )
    assert audit_of(project, again) == (0, [])
    # a git-tracked folder output (the real quality stage's contact sheets, evaluate's Grad-CAM) changed by hand
    (project / "quality" / "sheets" / "suspects" / "1.png").write_bytes(b"retouched")
    commit(project, "a retouched sheet")
    code, problems = audit_of(project, "HEAD")
    assert code == 1 and len(problems) == 1, problems
    assert problems[0].startswith("quality/sheets as committed is not the folder dvc.lock records for stage quality")
    run(["git", "rm", "-rq", "quality/sheets"], project)
    commit(project, "the sheets never committed")
    code, problems = audit_of(project, "HEAD")
    assert code == 1 and len(problems) == 1 and problems[0].startswith("quality/sheets is not in the commit"), problems

    # new data, but only download re-run: quality's input is a file inside download's output folder
    write_revision(project, manifest_rows(("a" * 64, "train", "cat"), ("e" * 64, "test", "dog")), ["cat", "dog"])
    dvc("repro", "-q", "--single-item", "download", cwd=project)
    commit(project, "download alone re-run")
    code, problems = audit_of(project, "HEAD")
    assert code == 1, problems
    assert [p for p in problems if p.startswith("stage quality was run on")] == [
        f"stage quality was run on {audit.MANIFEST} "
        + hashlib.md5(
            "".join(
                json.dumps(r, sort_keys=True) + "\n"
                for r in manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "test", "dog"))
            ).encode()
        ).hexdigest()
        + ", but download recorded "
        + hashlib.md5((project / audit.MANIFEST).read_bytes()).hexdigest()
        + ": its outputs are stale; run `dvc repro` and commit"
    ], problems

    # code (an input no stage makes) edited and committed without `dvc repro`
    (project / "src" / "finetune").write_bytes(b"other model code")
    commit(project, "finetune's input edited, no repro")
    code, problems = audit_of(project, "HEAD")
    assert code == 1 and [p for p in problems if p.startswith("stage finetune was run on src/finetune")], problems
    # dvc.yaml edited and committed without `dvc repro`
    dvc_yaml = json.loads((project / "dvc.yaml").read_text())
    dvc_yaml["stages"]["finetune"]["cmd"] += " # changed"
    (project / "dvc.yaml").write_text(json.dumps(dvc_yaml))
    commit(project, "finetune's command edited, no repro")
    code, problems = audit_of(project, "HEAD")
    assert code == 1 and [p for p in problems if p.startswith("stage finetune's cmd in dvc.yaml")], problems

    moved = revision(
        "b moved to train, labels reordered",
        manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "train", "dog")),
        ["dog", "cat"],
    )
    code, problems = audit_of(project, moved, against=good)
    assert code == 1 and problems == [
        f"image {'b' * 12} moved from test to train",
        "label map changed: 'cat': index 0 -> 1",
        "label map changed: 'dog': index 1 -> 0",
    ]

    # The quality stage no longer outputs its list, which git still holds from the runs before: that file is no
    # run's list (it would pass for one), so the audit fails.
    spec = json.loads((project / "dvc.yaml").read_text())
    outs = spec["stages"]["quality"]["outs"]
    spec["stages"]["quality"]["outs"] = [out for out in outs if audit.NEAR_DUPLICATES not in out]
    (project / "dvc.yaml").write_text(json.dumps(spec))
    dvc("repro", "-q", "--force", "--single-item", "quality", cwd=project)  # DVC sees no change in a removed out
    commit(project, "quality without its list")
    code, problems = audit_of(project, "HEAD")
    assert (code, problems) == (
        1,
        [f"{audit.NEAR_DUPLICATES}: the quality stage in dvc.lock does not output it: no list to check"],
    )

    # A pipeline without the quality stage: no list to check near-duplicates against, which the report says (the
    # audit has nothing to fail on: it reads the stage's list, and the revision's pipeline never made one).
    dvc("remove", "quality", cwd=project)
    commit(project, "no quality stage")
    assert audit_of(project, "HEAD") == (0, [])
    report = json.loads((project / "audit" / "audit.json").read_text())
    quality = report["revision_record"]["quality"]
    assert quality["checked"] is False and "near_duplicates" not in quality
    assert "- not checked: this revision has no quality stage" in (project / "audit" / "audit.md").read_text()


@pytest.mark.integration
def test_a_quality_list_of_a_stage_dvc_yaml_no_longer_declares_is_not_read(audited_project):
    """The quality stage deleted from dvc.yaml by hand leaves its dvc.lock entry, and git holds its list: the audit
    read that list, which no check compares with the lock (only declared stages' outputs are), so a list emptied by
    hand hid a cross-split near-duplicate and the audit passed with the near-duplicates "checked"."""
    project, revision = audited_project
    pair = dict(NEAR_COPY)
    rows = manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "test", "dog"), ("d" * 64, "test", "cat"))
    rev = revision("a near copy", rows, ["cat", "dog"], near_duplicates=[pair])
    code, problems = audit_of(project, rev)
    assert code == 1 and problems[0].startswith("near-duplicate across splits"), problems
    spec = json.loads((project / "dvc.yaml").read_text())
    del spec["stages"]["quality"]
    (project / "dvc.yaml").write_text(json.dumps(spec))
    (project / audit.NEAR_DUPLICATES).write_text("[]")
    commit(project, "quality dropped from dvc.yaml by hand, its list emptied")
    assert "quality" in load_yaml((project / "dvc.lock").read_text())["stages"]
    audit_of(project, "HEAD")
    quality = json.loads((project / "audit" / "audit.json").read_text())["revision_record"]["quality"]
    assert quality["checked"] is False and "near_duplicates" not in quality
    assert "- not checked: this revision has no quality stage" in (project / "audit" / "audit.md").read_text()


@pytest.mark.integration
def test_an_audit_of_data_that_was_never_pushed_fails_closed(audited_project, monkeypatch):
    project, revision = audited_project
    git_tracked_reads = []  # (revision, path) of each git-tracked output the lock checks read
    for name in ("git_blob", "git_tree"):
        reader = getattr(audit, name)
        monkeypatch.setattr(
            audit,
            name,
            lambda repo, commit, path, reader=reader: (
                git_tracked_reads.append((commit, path)) or reader(repo, commit, path)
            ),
        )
    old = revision("old", manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "test", "dog")), ["cat", "dog"])
    new = revision(
        "new",
        manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "test", "dog"), ("c" * 64, "val", "dog")),
        ["cat", "dog"],
    )
    assert audit_of(project, new, against=old)[0] == 0
    # The lock checks ran on the audited revision only: the one compared against is audited on its own.
    assert {commit for commit, path in git_tracked_reads if path.startswith("quality/sheets")} == {new}
    shutil.rmtree(project / ".dvc" / "cache")  # the old revision's data was never pushed and is gone
    dvc("commit", "-f", "-q", cwd=project)  # the workspace (the new revision) is back in the cache
    code, problems = audit_of(project, new, against=old)
    assert code == 1 and problems, problems
    missing = [p for p in problems if p.startswith("cannot read")]
    # labels and model are the same bytes in both revisions, so the workspace put them back in the cache
    assert {p.split(" at ")[0] for p in missing} == {f"cannot read {path}" for path in (audit.MANIFEST, audit.LINEAGE)}
    assert all(f"at {old[:12]}" in p and "dvc pull" in p for p in missing)
    # the data of an output the audit does not read (as the real extract's features, the head, the serving
    # model's variables) gone from every cache: the revision cannot be restored, so no pass either
    assert audit_of(project, new) == (0, [])
    lock = __import__("yaml").safe_load((project / "dvc.lock").read_text())
    (features,) = (o["md5"] for o in lock["stages"]["extract"]["outs"])
    cache = project / ".dvc" / "cache" / "files" / "md5"
    for entry in json.loads((cache / features[:2] / features[2:]).read_text()):
        (cache / entry["md5"][:2] / entry["md5"][2:]).unlink()
    unrestorable = (
        f"the data of data/extract at {new[:12]} (1 object) is in neither the local DVC cache nor the default "
        f"remote: `git checkout {new[:12]} && dvc pull` cannot restore it; push it from a clone that has it, or "
        "reproduce that revision and `dvc push`"
    )
    assert audit_of(project, new) == (1, [unrestorable])
    (cache / features[:2] / features[2:]).unlink()  # its listing too: DVC's own collection skips such a folder
    assert audit_of(project, new) == (1, [unrestorable])


@pytest.mark.integration
def test_a_rebuild_that_re_trained_nothing_is_not_a_pass(audited_project, monkeypatch):
    project, revision = audited_project
    good = revision("good", manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "test", "dog")), ["cat", "dog"])
    monkeypatch.setattr(
        audit, "rebuild", lambda repo, commit: ([], {}, {}, {"recorded": {}, "rebuilt": {}})
    )  # no training stage
    report = audit.audit(project, good, rebuilt=True)
    assert report["rebuild"]["identical"] is False
    assert report["problems"] == [
        f"rebuild: {good[:12]} has none of the stages {', '.join(audit.REBUILT)} in its dvc.lock: nothing was "
        "re-trained, so nothing is shown to rebuild"
    ]


@pytest.mark.integration
def test_a_rebuild_that_trains_other_bytes_fails_the_audit(audited_project):
    """The failing side of `--rebuild` itself: a stage whose re-run writes other bytes (here, the time) fails,
    naming the output and both digests; only a stubbed rebuild was tested failing before."""
    project, revision = audited_project
    spec = json.loads((project / "dvc.yaml").read_text())
    spec["stages"]["finetune"]["cmd"] = (
        f"{sys.executable} -c \"import os,time; os.makedirs(os.path.dirname('{audit.MODEL}'), exist_ok=True); "
        f"open('{audit.MODEL}', 'wb').write(open('src/finetune', 'rb').read() + str(time.time_ns()).encode())\""
    )
    (project / "dvc.yaml").write_text(json.dumps(spec))
    rev = revision(
        "unreproducible", manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "test", "dog")), ["cat", "dog"]
    )
    report = audit.audit(project, rev, rebuilt=True)
    assert report["rebuild"]["identical"] is False and report["rebuild"]["stages"] == ["quality", "finetune", "export"]
    mismatches = [p for p in report["problems"] if p.startswith("rebuild: ")]
    assert len(mismatches) == 1 and mismatches[0].startswith(f"rebuild: {audit.MODEL} is "), report["problems"]
    assert "after re-training" in mismatches[0] and "as recorded" in mismatches[0]
    # The same stage frozen (`frozen: true`): DVC never runs a frozen stage, --force or not, so the rebuild compared
    # the checked-out outputs with themselves and passed. The audit unfreezes it in its scratch worktree.
    spec["stages"]["finetune"]["frozen"] = True
    (project / "dvc.yaml").write_text(json.dumps(spec))
    commit(project, "frozen")
    frozen = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    report = audit.audit(project, frozen, rebuilt=True)
    assert report["rebuild"]["identical"] is False, report["rebuild"]
    assert [p for p in report["problems"] if p.startswith(f"rebuild: {audit.MODEL} is ")], report["problems"]
    assert json.loads((project / "dvc.yaml").read_text())["stages"]["finetune"]["frozen"]  # the project's own stays


@pytest.mark.integration
def test_a_dvc_added_input_whose_listing_is_gone_fails_the_audit(audited_project):
    """A `dvc add`-ed source folder (not a stage's output) whose listing is in no cache: the revision cannot be
    restored, so the audit fails, naming the folder."""
    project, revision = audited_project
    (project / "photos" / "sub").mkdir(parents=True)
    for name in ("a", "b"):
        (project / "photos" / "sub" / name).write_text(name)
    dvc("add", "-q", "photos", cwd=project)
    spec = json.loads((project / "dvc.yaml").read_text())
    spec["stages"]["extract"]["deps"].append("photos/sub")  # a folder inside a DVC-tracked one: read by listing
    (project / "dvc.yaml").write_text(json.dumps(spec))
    rev = revision("photos", manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "test", "dog")), ["cat", "dog"])
    assert audit_of(project, rev) == (0, [])
    listing = __import__("yaml").safe_load((project / "photos.dvc").read_text())["outs"][0]["md5"]
    (project / ".dvc" / "cache" / "files" / "md5" / listing[:2] / listing[2:]).unlink()
    code, problems = audit_of(project, rev)
    # read through DVC's own index of the folder (still there), but `dvc pull` of the revision could not restore
    # it: the audit passed before, the listing of a `dvc add`-ed folder being left out as a stage's was
    assert (code, problems) == (
        1,
        [
            f"the data of photos at {rev[:12]} (1 object) is in neither the local DVC cache nor the default remote: "
            f"`git checkout {rev[:12]} && dvc pull` cannot restore it; push it from a clone that has it, or reproduce "
            "that revision and `dvc push`"
        ],
    )


@pytest.mark.integration
def test_a_file_gone_from_the_remote_and_the_cache_fails_the_audit_though_its_folder_listing_is_there(
    audited_project, tmp_path
):
    """With a remote, DVC's status trusts its index of the remote: a folder whose listing is there counts all its
    files as there, so one file in neither the remote nor the cache passed the audit (and `dvc pull` failed)."""
    import hashlib

    project, revision = audited_project
    (project / "photos").mkdir()
    for name in ("a", "b", "c"):
        (project / "photos" / name).write_text(name)
    dvc("add", "-q", "photos", cwd=project)
    dvc("remote", "add", "-d", "storage", str(tmp_path / "storage"), cwd=project)  # committed with the revision
    rev = revision("photos", manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "test", "dog")), ["cat", "dog"])
    dvc("push", "-q", cwd=project)
    assert audit_of(project, rev) == (0, [])  # the remote's index now lists the folder
    gone = hashlib.md5(b"b").hexdigest()
    for root in (project / ".dvc" / "cache", tmp_path / "storage"):
        (root / "files" / "md5" / gone[:2] / gone[2:]).unlink()
    assert audit_of(project, rev) == (
        1,
        [
            f"the data of photos at {rev[:12]} (1 object) is in neither the local DVC cache nor the default remote: "
            f"`git checkout {rev[:12]} && dvc pull` cannot restore it; push it from a clone that has it, or reproduce "
            "that revision and `dvc push`"
        ],
    )


def test_data_dvc_2_hashed_in_the_local_cache_is_found_without_a_remote(tmp_path):
    """Without a remote the local cache was looked in as DVC 3's only (`.dvc/cache/files/md5`): an object DVC 2
    hashed (`md5-dos2unix`, a .dvc entry without `hash: md5`, kept in `.dvc/cache/xx/`) was reported missing, naming
    no path, though `dvc checkout` restores it."""
    run(["git", "init", "-q"], tmp_path)
    dvc("init", "-q", cwd=tmp_path)
    (tmp_path / "g.txt").write_text("hello\n")
    dvc("add", "-q", "g.txt", cwd=tmp_path)
    md5 = hashlib.md5(b"hello\n").hexdigest()
    (tmp_path / ".dvc" / "cache" / md5[:2]).mkdir()
    (tmp_path / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).rename(
        tmp_path / ".dvc" / "cache" / md5[:2] / md5[2:]
    )
    dvc_file = tmp_path / "g.txt.dvc"
    dvc_file.write_text("".join(line for line in dvc_file.read_text().splitlines(True) if "hash: md5" not in line))
    commit(tmp_path, "data DVC 2 added")
    rev = run(["git", "rev-parse", "HEAD"], tmp_path).stdout.strip()
    (tmp_path / "g.txt").unlink()
    dvc("checkout", "-q", cwd=tmp_path)
    assert (tmp_path / "g.txt").read_text() == "hello\n"  # DVC restores it from its legacy cache
    assert audit.unavailable_outputs(tmp_path, rev, {"stages": {}}, set(), []) == []
    (tmp_path / ".dvc" / "cache" / md5[:2] / md5[2:]).unlink()  # gone: reported, naming the file
    [problem] = audit.unavailable_outputs(tmp_path, rev, {"stages": {}}, set(), [])
    assert problem.startswith(f"the data of g.txt at {rev[:12]} (1 object) is in neither")


def test_a_file_missing_from_a_folder_dvc_2_hashed_is_reported_by_the_folder(tmp_path):
    """A DVC 2 folder's listing is in the legacy cache too, where the audit did not look: a file gone from the
    folder was reported as "an output (<hash>)", not as the folder `dvc pull` cannot restore."""
    run(["git", "init", "-q"], tmp_path)
    dvc("init", "-q", cwd=tmp_path)
    (tmp_path / "photos").mkdir()
    for name in ("a", "b"):
        (tmp_path / "photos" / f"{name}.jpg").write_bytes(name.encode())
    dvc("add", "-q", "photos", cwd=tmp_path)
    cache = tmp_path / ".dvc" / "cache"
    for obj in list((cache / "files" / "md5").rglob("*")):  # DVC 2's layout: .dvc/cache/xx/rest
        if obj.is_file():
            (cache / obj.parent.name).mkdir(exist_ok=True)
            obj.rename(cache / obj.parent.name / obj.name)
    dvc_file = tmp_path / "photos.dvc"
    dvc_file.write_text("".join(line for line in dvc_file.read_text().splitlines(True) if "hash: md5" not in line))
    commit(tmp_path, "a folder DVC 2 added")
    rev = run(["git", "rev-parse", "HEAD"], tmp_path).stdout.strip()
    assert audit.unavailable_outputs(tmp_path, rev, {"stages": {}}, set(), []) == []
    gone = hashlib.md5(b"b").hexdigest()
    (cache / gone[:2] / gone[2:]).unlink()
    [problem] = audit.unavailable_outputs(tmp_path, rev, {"stages": {}}, set(), [])
    assert problem.startswith(f"the data of photos at {rev[:12]} (1 object) is in neither"), problem


@pytest.mark.integration
def test_a_quality_stage_without_its_near_duplicate_list_fails_the_audit(audited_project):
    """The README's promise: a revision whose dvc.lock has the quality stage but not its list of near-duplicates
    is not a pass with no pairs (the audit reads the list, and a list it cannot read fails it)."""
    project, revision = audited_project
    spec = json.loads((project / "dvc.yaml").read_text())
    quality_stage = spec["stages"]["quality"]
    quality_stage["outs"] = [o for o in quality_stage["outs"] if audit.NEAR_DUPLICATES not in o]
    quality_stage["cmd"] = quality_stage["cmd"].replace(
        f"shutil.copy('src/near_duplicates', '{audit.NEAR_DUPLICATES}'); ", ""
    )
    assert audit.NEAR_DUPLICATES not in quality_stage["cmd"]
    (project / "dvc.yaml").write_text(json.dumps(spec))
    rev = revision("no list", manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "test", "dog")), ["cat", "dog"])
    code, problems = audit_of(project, rev)
    assert code == 1 and any(audit.NEAR_DUPLICATES in p for p in problems), problems


@pytest.mark.integration
def test_a_revision_that_dropped_its_dvc_yaml_says_so(audited_project):
    """dvc.yaml deleted, dvc.lock kept: nothing declared the lock's stages, and the audit failed only through
    files it then could not find, saying they were in no cache; it names the cause now."""
    project, revision = audited_project
    revision("good", manifest_rows(("a" * 64, "train", "cat"), ("b" * 64, "test", "dog")), ["cat", "dog"])
    run(["git", "rm", "-q", "dvc.yaml"], project)
    commit(project, "dvc.yaml removed")
    rev = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    code, problems = audit_of(project, rev)
    assert code == 1
    cause = f"dvc.yaml at {rev[:12]} cannot be resolved by DVC (the revision has no dvc.yaml)"
    assert any(p.startswith(cause) for p in problems), problems


def test_every_frozen_stage_is_thawed_templated_ones_included(tmp_path):
    """`dvc unfreeze` cannot write a templated stage back, and a frozen `foreach` stage was not found by name."""
    spec = {
        "vars": [{"model": "data/m"}],
        "stages": {
            "plain": {"cmd": "true", "frozen": True, "outs": ["${model}"]},
            "each": {"foreach": ["a", "b"], "do": {"cmd": "echo ${item}", "frozen": True}},
            "free": {"cmd": "echo 0o10", "params": [{"params.yaml": ["x"]}]},
        },
    }
    path = tmp_path / "dvc.yaml"
    path.write_text(json.dumps(spec))
    audit.thaw(path)
    thawed = audit.load_yaml(path.read_text())
    assert "frozen" not in thawed["stages"]["plain"] and "frozen" not in thawed["stages"]["each"]["do"]
    del spec["stages"]["plain"]["frozen"], spec["stages"]["each"]["do"]["frozen"]
    assert thawed == spec  # nothing else changed (`0o10` stays a string)


GOOD_ROWS = (("a" * 64, "train", "cat"), ("b" * 64, "test", "dog"))


@pytest.mark.integration
def test_an_input_a_dropped_stage_made_is_checked_against_what_the_revision_holds(audited_project):
    """A stage deleted from dvc.yaml by hand leaves its dvc.lock entry: what it recorded as its output was taken as
    "produced", so a declared stage's input there was compared with that entry alone, never with what the revision
    holds, and the audit passed on an input committed with other bytes, or not versioned at all."""
    project, revision = audited_project
    spec = json.loads((project / "dvc.yaml").read_text())
    spec["stages"]["gen"] = {
        "cmd": f"{sys.executable} -c \"import shutil; shutil.copy('src/gen', 'gen.txt')\"",
        "deps": ["src/gen"],
        "outs": ["gen.txt"],
    }
    spec["stages"]["finetune"]["deps"].append("gen.txt")
    (project / "dvc.yaml").write_text(json.dumps(spec))
    (project / "src" / "gen").write_text("features v1\n")
    rev = revision("gen", manifest_rows(*GOOD_ROWS), ["cat", "dog"])
    assert audit_of(project, rev) == (0, [])
    recorded = hashlib.md5(b"features v1\n").hexdigest()
    del spec["stages"]["gen"]
    (project / "dvc.yaml").write_text(json.dumps(spec))
    gitignore = project / ".gitignore"
    gitignore.write_text(gitignore.read_text().replace("/gen.txt\n", ""))
    (project / "gen.txt").write_text("features v2\n")
    commit(project, "gen dropped by hand, gen.txt committed with other bytes")
    assert "gen" in load_yaml((project / "dvc.lock").read_text())["stages"]
    code, problems = audit_of(project, "HEAD")
    assert code == 1 and problems == [
        f"stage finetune was run on gen.txt {recorded}, but the revision holds "
        f"{hashlib.md5(b'features v2' + bytes([10])).hexdigest()} there: the committed input did not make its "
        "outputs (changed without `dvc repro`); run `dvc repro` and commit"
    ], problems
    run(["git", "rm", "-q", "gen.txt"], project)
    commit(project, "gen.txt not versioned at all")
    code, problems = audit_of(project, "HEAD")
    assert (
        code == 1
        and len(problems) == 1
        and problems[0].startswith(
            f"stage finetune was run on the file gen.txt {recorded}, which the revision does not hold"
        )
    ), problems


@pytest.mark.integration
def test_metrics_no_declared_stage_outputs_are_not_reported_and_fail_the_audit(audited_project):
    """The report's metrics were read from their paths in git whatever made them: evaluate deleted from dvc.yaml by
    hand, its metrics edited, the audit passed and printed the edited figures."""
    project, revision = audited_project
    spec = json.loads((project / "dvc.yaml").read_text())
    spec["stages"]["evaluate"] = {
        "cmd": f"{sys.executable} -c \"import os,shutil; os.makedirs('evaluation', exist_ok=True); "
        "shutil.copy('src/metrics', 'evaluation/metrics.json')\"",
        "deps": ["src/metrics", audit.MODEL],
        "metrics": [{"evaluation/metrics.json": {"cache": False}}],
    }
    (project / "dvc.yaml").write_text(json.dumps(spec))
    figures = {"finetune": {"test_accuracy": 0.61, "test": {"per_class": {"cat": {"f1": 0.37, "support": 1}}}}}
    (project / "src" / "metrics").write_text(json.dumps(figures))
    rev = revision("evaluate", manifest_rows(*GOOD_ROWS), ["cat", "dog"])
    assert audit_of(project, rev) == (0, [])
    reported = json.loads((project / "audit" / "audit.json").read_text())["revision_record"]["metrics"]
    assert reported == {"evaluation/metrics.json": figures}
    # the markdown lists the figures but not the per-class ones (evaluate's keys: finetune.test.per_class.cat.f1)
    markdown = (project / "audit" / "audit.md").read_text()
    assert "finetune.test_accuracy 0.6100" in markdown and "per_class" not in markdown and "0.37" not in markdown
    del spec["stages"]["evaluate"]
    (project / "dvc.yaml").write_text(json.dumps(spec))
    (project / "evaluation" / "metrics.json").write_text(json.dumps({"finetune": {"test_accuracy": 0.99}}))
    commit(project, "evaluate dropped by hand, its metrics edited")
    code, problems = audit_of(project, "HEAD")
    assert (code, problems) == (
        1,
        [
            "evaluation/metrics.json is in the revision but no stage its dvc.yaml declares outputs it: no recorded "
            "run vouches for its figures, so they are not reported"
        ],
    )
    assert json.loads((project / "audit" / "audit.json").read_text())["revision_record"]["metrics"] == {}
    assert "0.99" not in (project / "audit" / "audit.md").read_text()


@pytest.mark.integration
def test_an_imported_folder_whose_listing_is_gone_fails_the_audit_naming_it(audited_project, tmp_path):
    """`dvc import-url`-ed data (the real presets' sources/ and models/) was left out of the check of `dvc add`-ed
    outputs: with its listing in no cache, `dvc pull` of the revision fails, and the audit passed."""
    project, revision = audited_project
    source = tmp_path / "elsewhere"
    source.mkdir()
    for name in ("a", "b"):
        (source / f"{name}.jpg").write_text(f"photo {name}\n")
    dvc("import-url", "-q", str(source), "photos", cwd=project)
    spec = json.loads((project / "dvc.yaml").read_text())
    spec["stages"]["extract"]["deps"].append("photos")
    (project / "dvc.yaml").write_text(json.dumps(spec))
    rev = revision("photos imported", manifest_rows(*GOOD_ROWS), ["cat", "dog"])
    assert audit_of(project, rev) == (0, [])
    listing = load_yaml((project / "photos.dvc").read_text())["outs"][0]["md5"]
    (project / ".dvc" / "cache" / "files" / "md5" / listing[:2] / listing[2:]).unlink()
    assert audit_of(project, rev) == (
        1,
        [
            f"the data of photos at {rev[:12]} (1 object) is in neither the local DVC cache nor the default remote: "
            f"`git checkout {rev[:12]} && dvc pull` cannot restore it; push it from a clone that has it, or reproduce "
            "that revision and `dvc push`"
        ],
    )


@pytest.mark.integration
def test_a_rebuild_that_cannot_restore_the_revision_reports_every_problem(audited_project):
    """A `--rebuild` whose `dvc pull` failed ended in a traceback: the problems found before it were not reported,
    and the earlier run's passing audit.json stayed in place."""
    project, revision = audited_project
    rev = revision("good", manifest_rows(*GOOD_ROWS), ["cat", "dog"])
    assert audit_of(project, rev) == (0, [])
    model = next(o["md5"] for o in load_yaml((project / "dvc.lock").read_text())["stages"]["finetune"]["outs"])
    (project / ".dvc" / "cache" / "files" / "md5" / model[:2] / model[2:]).unlink()
    code = audit.main(["--rev", rev, "--repo", str(project), "--out", str(project / "audit"), "--rebuild"])
    report = json.loads((project / "audit" / "audit.json").read_text())
    assert code == 1 and report["rebuild"] == {"stages": [], "outputs": 0, "identical": False}
    problems = report["problems"]
    assert any(p.startswith(f"the data of {audit.MODEL} at {rev[:12]}") for p in problems), problems
    assert problems[-1].startswith(f"rebuild: {rev[:12]} could not be restored and re-run (dvc pull failed"), problems


def test_a_revision_that_is_no_commit_or_a_lock_dvc_did_not_write_is_a_clear_error(tmp_path):
    run(["git", "init", "-q"], tmp_path)
    out = tmp_path / "audit"
    out.mkdir()
    (out / "audit.json").write_text('{"problems": []}')  # an earlier run's passing report
    with pytest.raises(SystemExit, match="audit: nosuchrev is not a commit of"):
        audit.main(["--rev", "nosuchrev", "--repo", str(tmp_path), "--out", str(out)])
    assert not (out / "audit.json").exists()  # not left to be read as this run's
    for text, reason in (
        ("stages: [", "cannot be read as YAML"),
        ("", "records no stages"),
        ("schema: '2.0'\n", "records no stages"),
    ):
        with pytest.raises(SystemExit, match=reason):
            audit.read_lock(text, "HEAD")
    assert audit.read_lock("schema: '2.0'\nstages: {}\n", "HEAD")["stages"] == {}


def test_a_key_new_in_a_params_file_a_stage_tracks_whole_is_found():
    """`params: [train.yaml:]` tracks every key of the file: a key the lock does not record is a change (DVC's
    status says `new`), which only the keys the lock recorded were compared for."""
    lock = {"stages": {"finetune": {"params": {"train.yaml": {"finetune": {"learning_rate": 0.001}}}}}}
    text = "finetune:\n  learning_rate: 0.001\nfinetune_extra:\n  epochs: 50\n"
    assert audit.params_changes(lock, lambda path: text) == []  # keys listed in dvc.yaml: another key is not read
    assert audit.params_changes(lock, lambda path: text, {("finetune", "train.yaml")}) == [
        "stage finetune was run with other params than the revision's train.yaml (finetune_extra.epochs: (absent) "
        "-> 50): its outputs are stale; run `dvc repro` and commit"
    ]
