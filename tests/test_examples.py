"""The scheduler examples do what their comments say."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def crontab_command() -> str:
    lines = (REPO / "examples" / "scheduler" / "crontab").read_text().splitlines()
    line = next(each for each in lines if each.startswith("0 3 "))
    return line.split(None, 5)[5]  # after the five time fields


@pytest.mark.parametrize("code, mailed", [(0, False), (3, True), (1, True), (2, True)])
def test_crontab_prints_only_when_retrain_does_not_promote(tmp_path, code, mailed):
    project = tmp_path / "srv"
    (project / ".venv" / "bin").mkdir(parents=True)
    fake = project / ".venv" / "bin" / "python"  # stands in for `python -m tools.retrain --pull --push`
    fake.write_text(f"#!/bin/sh\necho 'retrain says hello'\nexit {code}\n")
    fake.chmod(0o755)
    command = crontab_command().replace("/srv/transfer-pipeline", str(project))
    out = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True)
    assert out.returncode == 0
    printed = out.stdout + out.stderr  # what cron would mail
    assert bool(printed) == mailed, printed
    if mailed:
        assert f"retrain exited {code}" in printed and "retrain says hello" in printed
    assert "retrain says hello" in (project / "retrain.log").read_text()  # every run is logged
