"""Outputs committed to git while `cache: false`, cached since: found, untracked, and refused before any work."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_dvc_pipeline import REPO, commit, dvc, run, tool_env
from tools import outputs_in_git, sweep

STAGE = {
    "cmd": "echo",
    "deps": ["src.txt"],
    "outs": ["a.json", {"b.json": {"cache": False}}, "curves"],
    "metrics": [{"m.json": {"cache": False}}],
}


@pytest.fixture
def project(tmp_path):
    run(["git", "init", "-q"], tmp_path)
    dvc("init", "-q", cwd=tmp_path)
    (tmp_path / "dvc.yaml").write_text(json.dumps({"stages": {"s": STAGE}}))
    for name in ("src.txt", "a.json", "b.json", "m.json", "curves/loss.tsv"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    commit(tmp_path, "outputs committed while they were cache: false")
    return tmp_path


def retrain_pipeline(project, stage):
    """A pipeline tools.retrain accepts (download's and convert's outputs, the artifact) around `stage`."""
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    (project / "dvc.yaml").write_text(
        json.dumps(
            {
                "stages": {
                    "download": {"cmd": "false", "deps": ["src.txt"], "outs": ["data/download"]},
                    "convert": {"cmd": "false", "deps": ["data/download"], "outs": ["data/convert"]},
                    "s": stage,
                },
                "artifacts": {"classifier": {"path": "a.json", "type": "model"}},
            }
        )
    )
    commit(project, "pipeline")


def test_cached_outputs_that_git_tracks_are_found_and_untracked_keeping_the_files(project):
    assert outputs_in_git.cached_outputs(project) == ["a.json", "curves"]
    assert outputs_in_git.git_tracked_cached_outputs(project) == ["a.json", "curves"]
    assert outputs_in_git.main(["--repo", str(project)]) == 1
    assert outputs_in_git.main(["--repo", str(project), "--untrack"]) == 0
    assert outputs_in_git.git_tracked_cached_outputs(project) == []
    assert outputs_in_git.main(["--repo", str(project)]) == 0
    commit(project, "outputs DVC caches")  # `git add -A` first: ignored as DVC would ignore them, not tracked again
    tracked = run(["git", "ls-files"], project).stdout.split()
    assert {"b.json", "m.json", ".gitignore"} <= set(tracked) and not {"a.json", "curves/loss.tsv"} & set(tracked)
    assert (project / "a.json").read_text() == "a.json" and (project / "curves" / "loss.tsv").exists()
    dvc("commit", "-f", "-q", cwd=project)  # DVC takes them now (it refuses outputs git tracks)


def test_a_retrain_stops_before_the_pipeline_runs(project):
    retrain_pipeline(project, STAGE)
    proc = subprocess.run(
        [sys.executable, "-m", "tools.retrain"], cwd=project, env=tool_env(), capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["decision"] == "failed" and "python -m tools.outputs_in_git --untrack" in record["reason"]
    assert "a.json" in record["reason"] and not (project / "dvc.lock").exists()  # nothing ran


def test_a_sweep_stops_before_any_experiment(project, tmp_path_factory):
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    commit(project, "params")
    sweep_file = tmp_path_factory.mktemp("sweep") / "one.yaml"
    sweep_file.write_text("variants:\n  small:\n    train_head: {hidden_units: 4}\n")
    with pytest.raises(RuntimeError, match=r"a\.json, curves .*python -m tools\.outputs_in_git --untrack"):
        sweep.run_sweep(sweep_file, project / "board", project, project / "params.yaml", collect_only=False)
    assert "Queued" not in dvc("exp", "show", cwd=project) and not list(Path(project).glob("board*"))


def test_a_preset_run_stops_before_dvc_runs_anything(project, tmp_path_factory, capsys):
    from tools import preset

    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    commit(project, "params")
    preset_file = tmp_path_factory.mktemp("preset") / "small.yaml"
    preset_file.write_text("train_head: {hidden_units: 4}\n")
    assert preset.main([str(preset_file), "--params", str(project / "params.yaml"), "--run"]) == 1
    assert "python -m tools.outputs_in_git --untrack" in capsys.readouterr().err
    assert "Queued" not in dvc("exp", "show", cwd=project) and not (project / "dvc.lock").exists()


def test_a_dvc_yaml_dvc_cannot_load_is_a_failed_retrain_with_its_record(project):
    retrain_pipeline(project, {**STAGE, "cmd": "echo ${nowhere}"})  # an undefined variable: DVC cannot load it
    proc = subprocess.run(
        [sys.executable, "-m", "tools.retrain"], cwd=project, env=tool_env(), capture_output=True, text=True
    )
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1 and record["decision"] == "failed", proc.stderr[-2000:]
    assert record["reason"].startswith("DVC cannot load the project") and "nowhere" in record["reason"]
