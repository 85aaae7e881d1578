"""retrain: the scheduler's command. Reproduce, compare with the promoted model, promote only if it passes.

Run (cron, CI): ``python -m components.retrain [--pull] [--push]``

1. ``--pull``: ``git pull --ff-only`` and ``dvc pull`` (what another machine produced).
2. ``dvc repro``: new images in the source folder re-run the pipeline from
   download (existing images keep their split); unchanged inputs run nothing.
3. The candidate's validation metric (``retrain.model``, ``retrain.metric`` on
   the ``val`` split in ``evaluation/metrics.json``: the gate chooses, so it
   never reads the test split) against the model currently in
   ``retrain.stage`` of DVC's model registry (GTO tags on the ``artifacts:``
   entry ``retrain.artifact`` of ``dvc.yaml``): promote only if it reaches
   ``retrain.threshold`` and does not fall more than ``retrain.tolerance``
   below the promoted one.
4. Commit ``dvc.lock`` and the metrics, register the commit as a new version
   of the artifact (``gto register``), and on success assign it to the stage
   (``gto assign``). A rejected model stays registered and in the DVC cache,
   but is not promoted. ``--push`` pushes data (``dvc push``) and git tags.

Exit codes: 0 promoted, 3 rejected, 1 failed (the pipeline or a step failed),
2 bad params. The decision is printed as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Literal, Sequence

import pydantic

from components.cli import configure_logging, sh
from components.params import Section, log_resolved, parse_section, read_params, section

log = logging.getLogger(__name__)

PROMOTED, REJECTED, FAILED = 0, 3, 1
METRICS = "evaluation/metrics.json"
COMMITTED = ("dvc.lock", "evaluation", "dvclive", "metrics", "params.yaml")


class RetrainParams(Section):
    artifact: str = "classifier"  # the `artifacts:` entry of dvc.yaml
    stage: str = "prod"  # the registry stage a passing model is assigned to
    model: Literal["finetune", "head"] = "finetune"
    metric: Literal["accuracy", "macro_f1", "roc_auc"] = "accuracy"  # higher is better
    threshold: float = pydantic.Field(0.95, ge=0.0, le=1.0)  # the candidate must reach this
    tolerance: float = pydantic.Field(0.005, ge=0.0, le=1.0)  # and may fall at most this far below the promoted model


def decide(candidate: float | None, promoted: float | None, params: RetrainParams) -> tuple[bool, str]:
    """Promote or not, and why."""
    name = f"{params.model} {GATE_SPLIT} {params.metric}"
    if candidate is None:
        return False, f"the candidate has no {name}"
    if candidate < params.threshold:
        return False, f"{name} {candidate:.4f} is below the threshold {params.threshold:.4f}"
    if promoted is not None and candidate < promoted - params.tolerance:
        return False, f"{name} {candidate:.4f} regresses beyond the tolerance {params.tolerance} from the promoted {promoted:.4f}"
    if promoted is None:
        return True, f"{name} {candidate:.4f} reaches the threshold {params.threshold:.4f}; nothing was promoted before"
    return True, f"{name} {candidate:.4f} reaches the threshold and is within {params.tolerance} of (or above) the promoted {promoted:.4f}"


GATE_SPLIT = "val"  # the split the gate decides on; the test split only reports


def metric_of(metrics: dict, params: RetrainParams, split: str = GATE_SPLIT) -> float | None:
    value = ((metrics.get(params.model) or {}).get(split) or {}).get(params.metric)
    return None if value is None else float(value)


def promoted_version(repo: Path, params: RetrainParams) -> tuple[str | None, str | None]:
    """(version, commit) of the model in the stage, or (None, None)."""
    from gto import api
    from gto.exceptions import ArtifactNotFound

    try:
        found = api.find_versions_in_stage(str(repo), params.artifact, params.stage)
    except ArtifactNotFound:  # no version registered yet
        return None, None
    if not found:
        return None, None
    version = found[0] if isinstance(found, list) else found
    return version.version, version.commit_hexsha


def promoted_metric(repo: Path, commit: str | None, params: RetrainParams) -> float | None:
    if commit is None:
        return None
    shown = subprocess.run(["git", "show", f"{commit}:{METRICS}"], cwd=repo, capture_output=True, text=True)
    return metric_of(json.loads(shown.stdout), params) if shown.returncode == 0 else None


def retrain(repo: Path, params: RetrainParams, pull: bool = False, push: bool = False) -> tuple[int, dict]:
    from gto import api
    from gto.exceptions import ArtifactNotFound

    python = sys.executable
    if pull:
        sh("git", "pull", "--ff-only", cwd=repo)
        subprocess.run([python, "-m", "dvc", "pull", "--allow-missing"], cwd=repo)  # a first run has nothing to pull
    repro = subprocess.run([python, "-m", "dvc", "repro"], cwd=repo)
    if repro.returncode != 0:
        return FAILED, {"decision": "failed", "reason": f"dvc repro exited {repro.returncode}"}
    metrics = json.loads((repo / METRICS).read_text())
    candidate = metric_of(metrics, params)
    previous, previous_commit = promoted_version(repo, params)
    promoted = promoted_metric(repo, previous_commit, params)
    promote, reason = decide(candidate, promoted, params)

    sh("git", "add", "--", *[p for p in COMMITTED if (repo / p).exists()], cwd=repo)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=repo).returncode != 0:
        sh("git", "commit", "-q", "-m", f"retrain: {'promoted' if promote else 'rejected'}: {reason}", cwd=repo)
    head = sh("git", "rev-parse", "HEAD", cwd=repo).strip()
    try:
        registered = api.find_latest_version(str(repo), params.artifact)
    except ArtifactNotFound:
        registered = None
    if registered is not None and registered.commit_hexsha == head:
        version = registered.version  # nothing changed since the last registration
    else:
        version = api.register(str(repo), params.artifact, head, message=reason).version
    if promote and version != previous:
        api.assign(str(repo), params.artifact, params.stage, version=version, message=reason)
    if push:
        sh(python, "-m", "dvc", "push", cwd=repo)
        sh("git", "push", "--follow-tags", cwd=repo)
        sh("git", "push", "--tags", cwd=repo)
    record = {
        "decision": "promoted" if promote else "rejected", "reason": reason, "candidate": candidate,
        "candidate_test": metric_of(metrics, params, "test"),  # reported, never decides
        "promoted_before": {"version": previous, "value": promoted}, "version": version, "commit": head,
        "stage": params.stage if promote else None,
    }
    return (PROMOTED if promote else REJECTED), record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (section retrain)")
    parser.add_argument("--repo", default=".", help="the project's git repository")
    parser.add_argument("--pull", action="store_true", help="git pull and dvc pull first")
    parser.add_argument("--push", action="store_true", help="dvc push and push git tags afterwards")
    args = parser.parse_args(argv)
    configure_logging()
    params_path = Path(args.repo) / args.params
    params = parse_section(RetrainParams, "retrain", section(read_params(params_path), "retrain", params_path))
    log_resolved("retrain", {"retrain": params})
    try:
        code, record = retrain(Path(args.repo), params, args.pull, args.push)
    except RuntimeError as exc:
        code, record = FAILED, {"decision": "failed", "reason": str(exc)}
    print(json.dumps(record, sort_keys=True))
    log.info("retrain: %s (%s)", record["decision"], record["reason"])
    return code


if __name__ == "__main__":
    from components.cli import run_main

    run_main(main)
