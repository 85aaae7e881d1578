"""Integration: real `dvc repro` / `dvc exp run` of the pipeline on the tiny preset in a temporary git repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components import manifest as mf
from tests.conftest import keras_imagenet_file, make_class_folder

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = (
    "components",
    "pipelines",
    "tools",
    "presets",
    "sweeps",
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
    ".gitignore",
    ".dvc/config",
    ".dvc/.gitignore",
    "tfds_data",
    "models",
    "constraints.txt",  # the pinned versions the audit reports
)

pytestmark = pytest.mark.integration


def tool_env() -> dict[str, str]:
    """The environment of every command the tests run: this venv first, no analytics, a git identity."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
    )
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        cmd, cwd=cwd, env={**tool_env(), **(env or {})}, capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def dvc(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd, env).stdout


def make_project(tmp_path: Path) -> Path:
    """A copy of the project on the tiny preset, exactly as the README's tiny run sets it up."""
    project = tmp_path / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        src = REPO / name
        dst = project / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    run([sys.executable, "-m", "tools.tiny_dataset", "--out", "tiny_data", "--per-class", "8"], project)
    run([sys.executable, "-m", "tools.preset", "presets/tiny.yaml", "--write"], project)
    run(["git", "init", "-q"], project)  # .dvc/ (config, .gitignore) came with the project files
    commit(project, "tiny preset")  # dvclive needs a commit (it fails on an empty git repo)
    return project


def commit(project: Path, message: str) -> None:
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", message], project)


def out_hashes_from(lock: dict) -> dict[str, str]:
    """Each stage's data output (data/<stage>) hash (evaluate writes only its report, under evaluation/)."""
    return {
        stage: out["md5"]
        for stage, entry in lock["stages"].items()
        for out in entry["outs"]
        if out["path"] == f"data/{stage}"
    }


def out_hashes(project: Path) -> dict[str, str]:
    return out_hashes_from(yaml.safe_load((project / "dvc.lock").read_text()))


def kill_during(project: Path, command: list[str], stage: str, signal_line: str, timeout: float = 600) -> str:
    """Start `command` (it runs `dvc repro`), SIGKILL its whole process group as soon as `stage` logs
    `signal_line` (its own sign that it is at work, whatever the machine's speed); returns its output."""
    import signal
    import time

    log = project.parent / "killed_repro.log"
    with log.open("w") as handle:
        proc = subprocess.Popen(
            command, cwd=project, env=tool_env(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout

        def at_work() -> bool:
            text = log.read_text()
            started = text.find(f"Running stage '{stage}'")
            return started >= 0 and signal_line in text[started:]

        while not at_work():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{stage} never logged {signal_line!r}"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Its `dvc repro` child is reaped by init, not by us: wait until the whole group is gone,
        # or DVC's lock still names a live (zombie) PID and the next run is refused as "busy".
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
    return log.read_text()


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


ALL_STAGES = {
    "download",
    "convert",
    "base_weights",
    "extract",
    "train_head",
    "quality",
    "finetune",
    "evaluate",
    "export",
}


def test_dvc_repro_on_the_tiny_preset(tmp_path):
    project = make_project(tmp_path)
    first = dvc("repro", cwd=project)
    assert stages_run(first) == ALL_STAGES
    manifest = mf.read_jsonl(project / "data" / "download" / mf.MANIFEST)
    summary = json.loads((project / "data" / "convert" / "summary.json").read_text())
    assert sum(summary["records"].values()) == len(manifest) == 16
    features = json.loads((project / "data" / "extract" / "features.json").read_text())
    assert features["records"] == summary["records"] and features["feature_shape"] == [1280]
    assert (project / "data" / "train_head" / "head.keras").exists()
    assert (project / "data" / "finetune" / "model.keras").exists()
    assert (project / "data" / "export" / "serving" / "saved_model.pb").exists()
    metrics = json.loads((project / "evaluation" / "metrics.json").read_text())
    assert metrics["head"]["test"]["images"] == metrics["finetune"]["test"]["images"] == summary["records"]["test"]
    assert metrics["head"]["val"]["images"] == metrics["finetune"]["val"]["images"] == summary["records"]["val"]
    assert list((project / "evaluation" / "gradcam").glob("*.png"))
    assert (project / "dvclive" / "finetune" / "metrics.json").exists()
    # The comparing charts: both models on one ROC and one precision-recall chart, train against val per stage.
    shown = json.loads(dvc("plots", "show", "--json", cwd=project))
    overlays = {
        "roc": ("roc_head.json", "roc_finetune.json"),
        "precision_recall": ("precision_recall_head.json", "precision_recall_finetune.json"),
        "train_head_loss": ("loss.tsv::loss", "val_loss.tsv::val_loss"),
        "finetune_accuracy": ("accuracy.tsv::accuracy", "val_accuracy.tsv::val_accuracy"),
    }
    for plot, files in overlays.items():
        text = json.dumps(shown["data"][plot])
        assert all(name in text for name in files), (plot, text[:500])
    assert "quality/label_suspects.png" in json.dumps(shown)  # the contact sheet is an image plot
    # The quality stage's cross-validated accuracy is a DVC metric beside evaluate's (dvc exp show lists both).
    quality_metrics = json.loads((project / "quality" / "metrics.json").read_text())
    assert quality_metrics["head_cv"]["images"] == summary["records"]["train"] + summary["records"]["val"]
    assert quality_metrics["near_duplicates"]["pairs"] == 0  # distinct generated images (the tiny threshold)
    assert '"head_cv"' in dvc("metrics", "show", "--json", cwd=project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    # Version it: a local directory remote, commit, push.
    storage = tmp_path / "storage"
    dvc("remote", "add", "-d", "storage", str(storage), cwd=project)
    commit(project, "first model")
    first_rev = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    dvc("push", cwd=project)
    first_model = (project / "data" / "finetune" / "model.keras").read_bytes()
    first_serving = (project / "data" / "export" / "serving" / "saved_model.pb").read_bytes()
    assert set(lock["stages"]) == ALL_STAGES

    again = dvc("repro", cwd=project)
    assert stages_run(again) == set()
    # Bit-reproducible training: the audit re-trains this commit's models from its recorded inputs in
    # a scratch worktree, and every output (models, metrics, plots, serving model) has the recorded hash.
    run([sys.executable, "-m", "tools.audit", "--rev", "HEAD", "--rebuild", "--out", "audit_rebuild"], project)
    rebuilt = json.loads((project / "audit_rebuild" / "audit.json").read_text())
    assert rebuilt["problems"] == [], rebuilt["problems"]
    assert rebuilt["rebuild"]["identical"] and rebuilt["rebuild"]["stages"] == [
        "train_head",
        "quality",
        "finetune",
        "evaluate",
        "export",
    ]
    assert (
        rebuilt["rebuild"]["outputs"] >= 10
    )  # models, histories, dvclive metrics and plots, evaluation, the serving model
    assert len(run(["git", "worktree", "list"], project).stdout.splitlines()) == 1  # the scratch worktree is gone
    # An edit to a shared module makes exactly the stages that import it dirty (dvc.yaml's deps are complete).
    records_py = project / "pipelines" / "records.py"
    original = records_py.read_text()
    records_py.write_text(original + "\n# an edit\n")
    dirty = json.loads(dvc("status", "--json", cwd=project))
    assert set(dirty) == {"extract", "train_head", "quality", "finetune", "evaluate", "export"}, dirty
    records_py.write_text(original)
    assert json.loads(dvc("status", "--json", cwd=project)) == {}

    # Forced re-runs with the same inputs give byte-identical outputs (same DVC hashes).
    for stage in ("download", "convert"):
        dvc("repro", "--force", "--single-item", stage, cwd=project)
    assert {k: v for k, v in out_hashes(project).items() if k in ("download", "convert")} == {
        k: v for k, v in out_hashes_from(lock).items() if k in ("download", "convert")
    }

    # The source folder versioned, as presets/tiny.yaml has it (git ignores it here: a retrain refuses inputs neither
    # git nor DVC holds), then new data arrives.
    dvc("add", "-q", "tiny_data", cwd=project)
    commit(project, "track the source data")
    make_class_folder(project / "tiny_data", per_class=3, start=100, size=(48, 48))
    # The scheduler's retrain re-runs the pipeline from download; this one is killed (SIGKILL, no
    # clean-up) while extract works: no partial output is left for DVC or the next stage to accept,
    # and the next retrain redoes only what did not finish.
    set_params(project, "retrain", threshold=0.0)
    killed = kill_during(project, [sys.executable, "-m", "tools.retrain"], "extract", "extract: base ready")
    assert "extract: base ready" in killed and "extract: 22 images" not in killed  # killed inside the Beam job
    assert stages_run(killed) == {"download", "convert", "extract"}
    extract_out = project / "data" / "extract"
    assert not extract_out.exists() or (extract_out / "features.json").exists()
    assert "extract" in dvc("status", cwd=project)
    assert "classifier@" not in run(["git", "tag"], project).stdout  # nothing was registered

    # The next scheduled retrain finishes the pipeline and, with nothing promoted yet and a
    # gate of 0, promotes the model in DVC's registry (GTO tags).
    code, first, output = retrain(project)
    assert stages_run(output) == ALL_STAGES - {"download", "convert", "base_weights"}
    assert (code, first["decision"], first["version"], first["stage"]) == (0, "promoted", "v0.0.1", "prod")
    tags = run(["git", "tag"], project).stdout.split()
    assert "classifier@v0.0.1" in tags and "classifier#prod#1" in tags
    assert not list((project / "data").glob(".*.tmp-*"))  # the killed run's staging folder is cleaned up
    # Only the new images went through the base (the killed run may have cached a few of them first) ...
    extract_run = json.loads((project / "metrics" / "extract.json").read_text())
    assert extract_run["images"] == 22 and extract_run["computed"] <= 6 and extract_run["from_cache"] >= 16
    recovered = out_hashes(project)["extract"]
    # ... and the result is what an uninterrupted cold run (empty feature cache) writes.
    shutil.rmtree(project / ".cache")
    dvc("repro", "--force", "--single-item", "extract", cwd=project)
    assert json.loads((project / "metrics" / "extract.json").read_text())["computed"] == 22
    assert out_hashes(project)["extract"] == recovered
    new_manifest = mf.read_jsonl(project / "data" / "download" / mf.MANIFEST)
    assert len(new_manifest) == 22
    new_split = {row["sha256"]: row["split"] for row in new_manifest}
    assert all(new_split[row["sha256"]] == row["split"] for row in manifest)  # existing images keep their split

    # A param change re-runs only the stages that read it (the last stage's: a retrain that trains nothing,
    # which keeps this test's time down; other params, other stages: test_dvc_deps and the status check above);
    # the gate is set where this model cannot pass.
    set_params(project, "export", serving_check=3)
    set_params(project, "retrain", threshold=1.0)
    code, second, output = retrain(project)
    assert stages_run(output) == {"export"}
    assert (code, second["decision"], second["stage"]) == (3, "rejected", None), second
    assert second["candidate"] < 1.0 and "below the threshold" in second["reason"]
    assert second["version"] == "v0.0.2" and second["promoted_before"]["version"] == "v0.0.1"
    # The promoted v0.0.1 came back from the registry (dvc artifacts get) and both serving models scored
    # the same current val records.
    val_records = json.loads((project / "data" / "convert" / "summary.json").read_text())["records"]["val"]
    assert second["paired"]["images"] == val_records
    tags = run(["git", "tag"], project).stdout.split()
    assert "classifier@v0.0.2" in tags and not any(
        t.startswith("classifier#prod#") and t != "classifier#prod#1" for t in tags
    )
    shown = run([str(Path(sys.executable).parent / "gto"), "show", "classifier", "--json"], project).stdout
    assert '"prod"' in shown and "v0.0.1" in shown
    # The rejected model is committed (and its data cached): its commit restores it.
    assert run(["git", "log", "-1", "--format=%s"], project).stdout.startswith("retrain: rejected")
    assert "up to date" in dvc("status", cwd=project)
    dvc("push", cwd=project)
    assert (project / "data" / "finetune" / "model.keras").read_bytes() != first_model

    # The audit of the new revision against the first: lineage, diff, and the checks pass.
    run(
        [
            sys.executable,
            "-m",
            "tools.audit",
            "--rev",
            "HEAD",
            "--against",
            first_rev,
            "--workspace",
            "--out",
            "audit_out",
        ],
        project,
    )
    report = json.loads((project / "audit_out" / "audit.json").read_text())
    assert report["problems"] == []
    record = report["revision_record"]
    assert record["images"] == {s: c for s, c in record["serving_lineage"]["images"].items()}
    assert sum(sum(c.values()) for c in record["images"].values()) == 22
    assert report["diff"]["images"] == {"added": 6, "removed": 0, "kept": 16}
    assert report["diff"]["params"]["export.export.serving_check"] == [4, 3]
    assert "| train |" in (project / "audit_out" / "audit.md").read_text()
    # A workspace output that no longer matches dvc.lock fails the audit, naming the stage.
    with (project / "data" / "train_head" / "history.json").open("a") as handle:
        handle.write(" ")
    failed = subprocess.run(
        [sys.executable, "-m", "tools.audit", "--rev", "HEAD", "--workspace", "--out", "audit_bad"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "workspace: stage train_head differs from dvc.lock" in failed.stderr

    # An auditor gets the first model back in a fresh clone (empty cache) of its commit: pull from the remote.
    auditor = tmp_path / "auditor"
    run(["git", "clone", "-q", str(project), str(auditor)], tmp_path)
    run(["git", "checkout", "-q", first_rev], auditor)
    assert not (auditor / ".dvc" / "cache").exists()
    dvc("pull", cwd=auditor)
    assert (auditor / "data" / "finetune" / "model.keras").read_bytes() == first_model
    assert (auditor / "data" / "export" / "serving" / "saved_model.pb").read_bytes() == first_serving
    assert len(mf.read_jsonl(auditor / "data" / "download" / mf.MANIFEST)) == 16  # the first data
    run([sys.executable, "-m", "tools.audit", "--rev", first_rev, "--out", "audit_out"], auditor)
    first_report = json.loads((auditor / "audit_out" / "audit.json").read_text())
    assert first_report["problems"] == [] and first_report["revision_record"]["revision"] == first_rev
    # What the report names: the data source's version as dvc.lock recorded it, which the first revision did not
    # version (git ignored tiny_data, DVC did not track it yet), so it is listed as checked by that hash alone;
    # the pinned libraries.
    first_record = first_report["revision_record"]
    source = next(dep for dep in lock["stages"]["download"]["deps"] if dep["path"] == "tiny_data")
    assert first_record["data_source"]["dependency"] == [source] and source["nfiles"] == 16
    assert [item.split(";")[0] for item in first_record["unversioned_inputs"]] == [
        f"tiny_data (stage download: {source['md5']}, 16 files"
    ]
    markdown = (auditor / "audit_out" / "audit.md").read_text()
    assert f"- source version: `tiny_data` {source['md5']} (16 files)" in markdown
    assert "- not versioned by the revision, so checked only by the hash dvc.lock recorded: `tiny_data" in markdown
    lines = (REPO / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))
    assert first_record["libraries"]["tensorflow"] == pins["tensorflow"]


def test_imagenet_weights_are_a_versioned_output_that_an_offline_clone_rebuilds_from(tmp_path):
    """`weights: imagenet` came from Keras's download cache, which no stage declared: another file there changed
    the features while `dvc status` saw nothing, and a clone could not rebuild without downloading them again."""
    project = make_project(tmp_path)
    keras_home = {"KERAS_HOME": str(tmp_path / "keras_home")}  # this machine's Keras download cache
    keras_imagenet_file(tmp_path / "keras_home", 96, seed=1)
    set_params(project, "conv_base", weights="imagenet", input_size=[96, 96])
    dvc("remote", "add", "-d", "storage", str(tmp_path / "storage"), cwd=project)
    # Up to extract, which runs the base (finetune builds it from the same file: test_base_weights; its deps, below).
    first = dvc("repro", "extract", cwd=project, env=keras_home)
    assert stages_run(first) == {"download", "convert", "base_weights", "extract"}
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert "data/base_weights" in {dep["path"] for dep in lock["stages"]["extract"]["deps"]}
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    assert "data/base_weights" in spec["stages"]["finetune"]["deps"]
    assert lock["stages"]["base_weights"]["outs"][0]["nfiles"] == 2  # the record and the weights
    made = out_hashes(project)
    commit(project, "imagenet base")
    dvc("push", cwd=project)

    # An auditor's clone on a machine with an empty Keras cache and no network (every download through a dead
    # proxy): the weights are pulled, and extract re-run from them (with no feature cache there) gives the recorded
    # bytes; base_weights re-run keeps the pulled weights instead of fetching.
    auditor = tmp_path / "auditor"
    run(["git", "clone", "-q", str(project), str(auditor)], tmp_path)
    dvc("pull", "--with-deps", "extract", cwd=auditor)
    offline = {
        "KERAS_HOME": str(tmp_path / "empty_keras_home"),
        **{name: "http://127.0.0.1:9" for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
    }
    for stage in ("base_weights", "extract"):
        again = dvc("repro", "--force", "--single-item", stage, cwd=auditor, env=offline)
        assert stages_run(again) == {stage}
    assert json.loads((auditor / "metrics" / "extract.json").read_text())["computed"] == 16  # no feature cache
    rebuilt = out_hashes(auditor)
    assert {s: rebuilt[s] for s in ("base_weights", "extract")} == {s: made[s] for s in ("base_weights", "extract")}
    assert not list((tmp_path / "empty_keras_home").rglob("*.h5"))  # nothing was fetched


def test_base_sweep_then_queued_experiments_then_exp_metrics_and_plots(tmp_path):
    """One project for the experiment tools, so the later runs restore the earlier ones' stages from DVC's run
    cache (as a user's would) instead of training them again."""
    import time

    project = make_project(tmp_path)
    dvc("add", "-q", "tiny_data", cwd=project)  # the source folder is a versioned input, as presets/tiny.yaml says
    commit(project, "track the source data")
    params_before = (project / "params.yaml").read_text()
    # Two variants (two bases) as DVC experiments, then the leaderboard.
    swept = run([sys.executable, "-m", "tools.sweep", "sweeps/tiny.yaml", "--out", "board"], project)
    board = json.loads((project / "board" / "leaderboard.json").read_text())
    rows = {row["variant"]: row for row in board["rows"]}
    assert set(rows) == {"mobilenet", "effnet"}
    assert (rows["mobilenet"]["base"], rows["effnet"]["base"]) == ("mobilenet_v2", "efficientnet_b0")
    for row in rows.values():
        assert row["feature_size"] == 1280 and row["extract_images_per_s"] > 0 and row["extract_from_cache"] == 0
        # The figures are the experiment's own evaluation, read here from its commit rather than through the sweep.
        evaluation = json.loads(run(["git", "show", f"{row['experiment']}:evaluation/metrics.json"], project).stdout)
        for model in ("head", "finetune"):
            for split in ("val", "test"):
                assert row[f"{model}_{split}_accuracy"] == evaluation[model][split]["accuracy"]
        assert row["val_images"] > 0 and row["test_images"] > 0
    assert rows["mobilenet"]["test_images"] == rows["effnet"]["test_images"]  # same data, two bases
    assert "| 1 |" in (project / "board" / "leaderboard.md").read_text() and "| 1 |" in swept.stdout
    # The workspace is the baseline again; the experiments stay, named, with their own params.
    assert (project / "params.yaml").read_text() == params_before and not (project / "dvc.lock").exists()
    shown = json.loads(dvc("exp", "show", "--json", cwd=project))
    baseline = next(entry for entry in shown if entry["rev"] != "workspace")
    experiments = {row["name"]: row for exp in baseline["experiments"] or [] for row in exp["revs"]}
    assert set(experiments) == {"tiny-mobilenet", "tiny-effnet"}
    exp_params = experiments["tiny-effnet"]["data"]["params"]["params.yaml"]["data"]
    # DVC writes 0.00002 as `2e-05`, which the stages read as a float; the other variant keeps the baseline's.
    assert exp_params["finetune"]["learning_rate"] == 2e-05
    assert experiments["tiny-mobilenet"]["data"]["params"]["params.yaml"]["data"]["finetune"]["learning_rate"] == 1e-4
    # A second sweep runs nothing again and gives the same table.
    again = run([sys.executable, "-m", "tools.sweep", "sweeps/tiny.yaml", "--out", "board2"], project)
    assert "Running stage" not in again.stdout + again.stderr
    assert json.loads((project / "board2" / "leaderboard.json").read_text()) == board

    # Queued experiments (`dvc exp run --queue`, each in a temporary copy of the repo) have the inputs, since they
    # are DVC-tracked: download (an in-place output, never restored from the run cache) reads the source folder
    # there, and the stages after it are restored from the runs above. One through the preset command (arguments
    # as a list, no shell): the baseline's params, the mobilenet variant's. One with dvc's own -S: the effnet
    # variant's. Each gives its twin's figures.
    run([sys.executable, "-m", "tools.preset", "presets/tiny.yaml", "--run", "--queue", "-n", "q-preset"], project)
    dvc(
        "exp",
        "run",
        "--queue",
        "-n",
        "q-effnet",
        "-S",
        "conv_base.name=efficientnet_b0",
        "-S",
        "finetune.learning_rate=0.00002",
        cwd=project,
    )
    dvc("queue", "start", "-j", "1", cwd=project)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = dvc("queue", "status", cwd=project)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert "Failed" not in status and "Success" in status, status
    shown = json.loads(dvc("exp", "show", "--json", cwd=project))
    baseline = next(entry for entry in shown if entry["rev"] != "workspace")
    done = {row["name"]: row for exp in baseline["experiments"] or [] for row in exp["revs"] if row.get("name")}
    assert set(done) == {"tiny-mobilenet", "tiny-effnet", "q-preset", "q-effnet"}, status
    for name, rate in (("q-preset", 0.0001), ("q-effnet", 2e-05)):
        data = done[name]["data"]
        assert data["params"]["params.yaml"]["data"]["finetune"]["learning_rate"] == rate
        metrics = data["metrics"]["evaluation/metrics.json"]["data"]
        assert metrics["finetune"]["val"]["images"] == rows["mobilenet"]["val_images"]
        assert "accuracy" in metrics["head"]["test"]
    assert done["q-preset"]["data"]["metrics"] == done["tiny-mobilenet"]["data"]["metrics"]
    logs = dvc("queue", "logs", "q-preset", cwd=project)  # nothing trained again: every stage DVC can run-cache is
    assert {stage for stage in ALL_STAGES if f"Stage '{stage}' is cached" in logs} == ALL_STAGES - {
        "download",
        "base_weights",
    }, logs[-4000:]
    assert done["q-effnet"]["data"]["metrics"] == done["tiny-effnet"]["data"]["metrics"]

    # One experiment into the workspace: metrics and plots from it and against the baseline commit.
    dvc("exp", "apply", "tiny-effnet", cwd=project)
    assert "2e-05" in (project / "params.yaml").read_text()
    metrics = json.loads(dvc("metrics", "show", "--json", cwd=project))
    flat = json.dumps(metrics)
    assert "val_accuracy" in flat and "dvclive/train_head/metrics.json" in flat and "metrics/extract.json" in flat
    assert "evaluation/metrics.json" in flat and "macro_f1_low" in flat and "dvclive/finetune/metrics.json" in flat
    dvc("plots", "show", "-o", "plots_html", cwd=project)
    html = (project / "plots_html" / "index.html").read_text()
    assert "val_loss" in html
    for plot in ("confusion_finetune", "roc_head", "precision_recall_finetune", "per_class_finetune", "gradcam"):
        assert plot in html, plot
    dvc("plots", "diff", "HEAD", "-o", "plots_diff", cwd=project)
    assert "confusion_head" in (project / "plots_diff" / "index.html").read_text()


def set_params(project: Path, section: str, **values) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def retrain(project: Path) -> tuple[int, dict, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "tools.retrain"],
        cwd=project,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode in (0, 3), proc.stderr[-4000:]
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout
