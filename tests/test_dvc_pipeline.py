"""Integration: real `dvc repro` of the data stages in a temporary git repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components import download as dl
from tests.conftest import make_class_folder

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = (
    "components", "pipelines", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore",
    ".dvc/config", ".dvc/.gitignore", "tfds_data",
)

pytestmark = pytest.mark.integration


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def dvc(*args: str, cwd: Path) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd).stdout


def make_project(tmp_path: Path, source: Path) -> Path:
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
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dataset"].update(source="folder", dir=str(source))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], project)  # .dvc/ (config, .gitignore) came with the project files
    return project


def out_hashes_from(lock: dict) -> dict[str, str]:
    return {stage: entry["outs"][0]["md5"] for stage, entry in lock["stages"].items()}


def out_hashes(project: Path) -> dict[str, str]:
    return out_hashes_from(yaml.safe_load((project / "dvc.lock").read_text()))


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_dvc_repro_download_and_convert(tmp_path):
    source = make_class_folder(tmp_path / "source", per_class=8)
    project = make_project(tmp_path, source)
    first = dvc("repro", cwd=project)
    assert stages_run(first) == {"download", "convert"}
    manifest = dl.read_jsonl(project / "data" / "download" / dl.MANIFEST)
    summary = json.loads((project / "data" / "convert" / "summary.json").read_text())
    assert sum(summary["records"].values()) == len(manifest) == 16
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"download", "convert"}

    again = dvc("repro", cwd=project)
    assert stages_run(again) == set()
    assert "up to date" in dvc("status", cwd=project)

    # Forced re-runs with the same inputs give byte-identical outputs (same DVC hashes).
    for stage in ("download", "convert"):
        dvc("repro", "--force", "--single-item", stage, cwd=project)
    assert out_hashes(project) == out_hashes_from(lock)

    make_class_folder(source, per_class=3, start=100)  # new data arrives
    third = dvc("repro", cwd=project)
    assert stages_run(third) == {"download", "convert"}
    new_manifest = dl.read_jsonl(project / "data" / "download" / dl.MANIFEST)
    assert len(new_manifest) == 22
    new_split = {row["sha256"]: row["split"] for row in new_manifest}
    assert all(new_split[row["sha256"]] == row["split"] for row in manifest)

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["convert"]["shards"]["train"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = dvc("repro", cwd=project)
    assert stages_run(fourth) == {"convert"}
    assert len(list((project / "data" / "convert" / "records").glob("train-*-of-00003.tfrecord"))) == 3
