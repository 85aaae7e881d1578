import pytest

from components.params import ParamsError, parse_section
from components.retrain import RetrainParams, decide, metric_of

PARAMS = RetrainParams(threshold=0.9, tolerance=0.01)


@pytest.mark.parametrize(
    "candidate, promoted, expected, why",
    [
        (0.95, None, True, "nothing was promoted before"),
        (0.85, None, False, "below the threshold 0.9000"),
        (0.95, 0.955, True, "within 0.01"),  # a drop inside the tolerance
        (0.95, 0.97, False, "regresses beyond the tolerance 0.01 from the promoted 0.9700"),
        (0.99, 0.97, True, "above"),
        (0.89, 0.80, False, "below the threshold"),  # better than the promoted one, still not good enough
        (None, 0.9, False, "has no finetune val accuracy"),
    ],
)
def test_promotion_gate(candidate, promoted, expected, why):
    promote, reason = decide(candidate, promoted, PARAMS)
    assert promote is expected and why in reason


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


# ---- the scheduler's command end to end: exit codes, --pull and --push ------------------------------

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from tests.test_dvc_pipeline import commit, dvc, run, tool_env  # noqa: E402

# One stage that "evaluates" by copying prepared metrics and writing a model file: the real DVC,
# git and GTO steps of a retrain, without training anything.
EVALUATE = ("import json, os, sys; m = json.load(open('src/metrics.json')); os.makedirs('evaluation', exist_ok=True); "
            "os.makedirs('data', exist_ok=True); json.dump(m, open('evaluation/metrics.json', 'w')); "
            "open('data/model.bin', 'w').write(json.dumps(m)); sys.exit(m.get('fail', 0))")


def write_metrics(project, val, test=0.5, fail=0):
    (project / "src").mkdir(exist_ok=True)
    (project / "src" / "metrics.json").write_text(json.dumps(
        {"finetune": {"val": {"accuracy": val}, "test": {"accuracy": test}}, "fail": fail}))


def retrain_cli(project, *args):
    proc = subprocess.run([sys.executable, "-m", "components.retrain", *args], cwd=project, env=tool_env(),
                          capture_output=True, text=True, timeout=600)
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
    (project / "dvc.yaml").write_text(json.dumps({
        "stages": {"evaluate": {"cmd": f'{sys.executable} -c "{EVALUATE}"', "deps": ["src/metrics.json"],
                                "outs": ["data/model.bin"], "metrics": [{"evaluation/metrics.json": {"cache": False}}]}},
        "artifacts": {"classifier": {"path": "data/model.bin", "type": "model"}},
    }))
    (project / "params.yaml").write_text(json.dumps({"retrain": {"threshold": 0.8, "tolerance": 0.0}}))
    write_metrics(project, val=0.9)
    commit(project, "pipeline")
    run(["git", "push", "-q", "-u", "origin", "main"], project)
    return server, storage, project


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

    # Another machine: --pull brings the commit and the model; nothing changed, nothing is re-run.
    other = tmp_path / "other"
    run(["git", "clone", "-q", str(server), str(other)], tmp_path)
    code, again, _ = retrain_cli(other, "--pull")
    assert (code, again["version"], again["commit"]) == (0, "v0.0.1", record["commit"]), again
    assert (other / "data" / "model.bin").read_bytes() == (project / "data" / "model.bin").read_bytes()


@pytest.mark.integration
def test_retrain_exit_codes(scheduled):
    _, _, project = scheduled
    assert retrain_cli(project)[0] == 0  # v0.0.1 promoted at val 0.9
    write_metrics(project, val=0.85, test=0.99)  # better on test, worse on val: rejected
    code, record, _ = retrain_cli(project)
    assert (code, record["decision"], record["stage"]) == (3, "rejected", None)
    assert "finetune val accuracy 0.8500 regresses beyond the tolerance 0.0 from the promoted 0.9000" in record["reason"]
    write_metrics(project, val=0.95, fail=1)  # the pipeline fails
    code, record, _ = retrain_cli(project)
    assert (code, record["decision"]) == (1, "failed") and record["reason"].startswith("dvc repro exited ")
    (project / "params.yaml").write_text(json.dumps({"retrain": {"metric": "loss"}}))
    code, record, stderr = retrain_cli(project)
    assert code == 2 and record is None and "retrain.metric" in stderr
