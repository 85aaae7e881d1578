"""sweep: run the pipeline once per variant (a base, a size, a tap) as DVC experiments and write a leaderboard.

    python -m tools.sweep sweeps/real_lite0.yaml --out leaderboard
    python -m tools.sweep sweeps/real_lite0.yaml --out leaderboard --collect   # table only

A sweep file names variants; each is a preset-style set of overrides
(``conv_base: {name: vgg16, input_size: [150, 150]}``). Every variant is
validated against every stage's params before anything runs.

Each variant runs as ``dvc exp run -n <sweep>-<variant> -S ...`` in the
workspace, one after another, so unchanged stages (download, convert) run once
and every variant is an experiment DVC keeps (``dvc exp show``, ``dvc exp apply``).
Every variant sets every key any variant overrides (the others at the
baseline's value), so overrides never leak from one variant into the next. A
variant whose experiment already exists on this commit is not run again. At the
end the workspace goes back to the baseline commit's params and outputs.

The leaderboard (``leaderboard.json`` and ``leaderboard.md`` under ``--out``),
best fine-tuned validation accuracy first (then the head's): per variant the
base, input size, pooling, tapped layer, feature size, extraction images/s
(from ``metrics/extract.json``; marked when the feature cache served images),
and head and fine-tuned accuracy and ROC-AUC on val and on test
(``evaluation/metrics.json``). Variants are ranked on val only; the test
figures are reported beside them and never choose.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import pydantic

from components import cli
from components.cli import configure_logging, run_main, sh
from components.params import ParamsError, load_yaml, read_params
from tools import outputs_in_git, preset, retrain

log = logging.getLogger(__name__)

EXTRACT_METRICS = "metrics/extract.json"
EVALUATION_METRICS = "evaluation/metrics.json"
RESTORED = ("params.yaml", "dvc.lock", "metrics", "evaluation", "dvclive", "quality")
# sections that decide which images are in val: variants that set them would be ranked on different images
# (`common` holds the seed, which draws the hash split)
SAME_DATA = ("dataset", "download", "common")


class SweepRefused(RuntimeError):
    """The sweep cannot start or rank as asked; the message says what to do."""

    user_facing = True  # components.cli.run_main: the message and exit 2, not a traceback


class SweepFile(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    variants: dict[str, dict[str, Any]] = pydantic.Field(min_length=1)

    @pydantic.field_validator("variants")
    @classmethod
    def _names(cls, variants):
        for name in variants:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(
                    f"variant name {name!r}: letters, digits, '-' and '_' only (it becomes an experiment name)"
                )
        return variants


def load_sweep(path: Path) -> SweepFile:
    loaded = preset.read_yaml_file(path) or {}
    try:
        return SweepFile.model_validate(loaded)
    except pydantic.ValidationError as exc:
        raise ParamsError(f"{path}: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None


def lookup(params: Mapping, dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        value = value[part]
    return value


def variant_values(sweep: SweepFile, baseline: Mapping) -> dict[str, dict[str, Any]]:
    """Per variant, {dotted key: value}: its own overrides, and the baseline's value for keys only others override
    (a key the baseline lacks, such as an option under `beam.options: {}`, only where the variant sets it)."""
    keys = sorted({key for overrides in sweep.variants.values() for key, _ in preset.leaves(overrides)})
    values = {}
    for name, overrides in sweep.variants.items():
        own = dict(preset.leaves(overrides))
        values[name] = {}
        for key in keys:
            if key in own:
                values[name][key] = own[key]
            elif preset.has_key(baseline, key):
                value = lookup(baseline, key)
                # the baseline's mapping where another variant replaces it (`beam.options: {}`): key by key, as
                # DVC's -S refuses a mapping in JSON (quoted keys) after the others had run
                values[name].update(
                    preset.leaves({key: value}) if isinstance(value, Mapping) and value else {key: value}
                )
    return values


def variant_args(values: Mapping[str, Mapping[str, Any]], baseline: Mapping) -> dict[str, list[str]]:
    """`-S` arguments per variant, from its `variant_values` (``+key=`` for a key the baseline lacks)."""
    return {
        name: [
            arg for key, value in pairs.items() for arg in preset.set_arg(key, value, not preset.has_key(baseline, key))
        ]
        for name, pairs in values.items()
    }


def stale_params(exp: Mapping, values: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (the experiment's value, the variant's now)} where an existing experiment ran with other params."""
    stale = {}
    for key, value in values.items():
        try:
            ran = lookup(exp["params"], key)
        except (KeyError, TypeError):
            ran = None
        if ran != value:
            stale[key] = (ran, value)
    return stale


def unusable(found: Mapping[str, dict], names: Sequence[str]) -> list[str]:
    """The experiments among `names` that did not finish: queued, running or failed (DVC lists them too, a
    failed one with metrics that may be the baseline's)."""
    return [
        f"{name} ({found[name]['state']}{': ' + found[name]['error'] if found[name]['error'] else ''})"
        for name in names
        if name in found and (found[name]["state"] not in (None, "success") or found[name]["error"])
    ]


def nested_overrides(sweep: SweepFile) -> list[str]:
    """Where one variant sets a whole mapping (``beam: {options: {}}``) and another a key inside it: each variant sets
    every key any variant sets, so the first got the other's key back at the baseline's value after its own mapping
    (DVC's -S applied both: the experiment ran and recorded a mapping the variant did not name)."""
    owners: dict[str, list[str]] = {}
    for name, overrides in sweep.variants.items():
        for key, _ in preset.leaves(overrides):
            owners.setdefault(key, []).append(name)
    return [
        f"{outer} (variant {', '.join(owners[outer])}) and {inner} (variant {', '.join(owners[inner])})"
        for outer in sorted(owners)
        for inner in sorted(owners)
        if inner.startswith(f"{outer}.")
    ]


def validate_variants(
    sweep: SweepFile, params_path: Path, running: bool = True, baseline: Mapping | None = None
) -> None:
    """Every variant's params as every stage loads them; `running`: the variants are about to run (`--collect` only
    reads what ran, which a sweep refused now may have run before); `baseline`: the params they run from (the
    file's by default)."""
    nested = nested_overrides(sweep) if running else []
    if nested:
        raise ParamsError(
            f"variants set a mapping and a key inside it: {'; '.join(nested)}; set that key in every variant "
            "instead (at the value that means unset where a variant clears it, such as Beam's default), or sweep "
            "them separately"
        )
    data = sorted({f"{name}: {section}" for name, o in sweep.variants.items() for section in o if section in SAME_DATA})
    if data:  # the ranking compares val accuracies: of the same images only (a review on 2026-12-07)
        raise ParamsError(
            f"variants set {', '.join(data)}: which images are in val (and test) would differ between them, and the "
            "leaderboard ranks them by val accuracy (common.seed draws the hash split); sweep models on one "
            "dataset and split (set them in params.yaml)"
        )
    baseline = read_params(params_path) if baseline is None else baseline
    for name, overrides in sweep.variants.items():
        try:
            preset.validate(preset.merge(baseline, overrides), params_path)
        except ParamsError as exc:
            raise ParamsError(f"variant {name}: {exc}") from None


def experiments(repo: Path) -> dict[str, dict]:
    """The baseline commit's experiments by name: {name: {"rev", "params", "metrics"}}."""
    shown = json.loads(dvc(["exp", "show", "--json"], repo))
    found = {}
    for entry in shown:
        if entry.get("rev") == "workspace":
            continue
        for exp in entry.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            for row in exp.get("revs") or []:
                if row.get("name"):
                    data = row.get("data") or {}
                    error = row.get("error")
                    found[row["name"]] = {
                        "rev": row.get("rev"),
                        "state": state,
                        "error": (error.get("msg") or error.get("type") or "error") if error else None,
                        "params": ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {},
                        "metrics": {
                            path: value.get("data") or {} for path, value in (data.get("metrics") or {}).items()
                        },
                    }
    return found


def leaderboard_row(variant: str, exp: Mapping) -> dict:
    base = exp["params"].get("conv_base", {})
    extracted = exp["metrics"].get(EXTRACT_METRICS, {})
    evaluation = exp["metrics"].get(EVALUATION_METRICS, {})
    return {
        "variant": variant,
        "experiment": exp.get("rev"),
        "base": base.get("name") or Path(base.get("path") or "?").name,
        "weights": base.get("weights") if base.get("name") else "saved file",
        "input_size": base.get("input_size"),
        "pooling": base.get("pooling"),
        "layer": base.get("layer"),
        "feature_size": extracted.get("feature_size"),
        "extract_images_per_s": extracted.get("images_per_s"),
        "extract_from_cache": extracted.get("from_cache"),
        **{
            f"{model}_{split}_{metric}": scores(evaluation, model, split).get(metric)
            for model in ("head", "finetune")
            for split in ("val", "test")
            for metric in ("accuracy", "roc_auc")
        },
        "val_images": scores(evaluation, "finetune", "val").get("images"),
        "test_images": scores(evaluation, "finetune", "test").get("images"),
    }


def scores(evaluation: Mapping, model: str, split: str) -> Mapping:
    return ((evaluation.get(model) or {}).get(split)) or {}


def check_scored(rows: list[dict]) -> None:
    """Refuse a leaderboard with a variant that has no val accuracy: ranked as 0, it would sit among the others
    with numbers it does not have."""
    unscored = [r["variant"] for r in rows if r["finetune_val_accuracy"] is None or r["head_val_accuracy"] is None]
    if unscored:
        raise SweepRefused(f"variants without val accuracies in {EVALUATION_METRICS}: {unscored}")
    counts = {r["variant"]: r.get("val_images") for r in rows}
    if len(set(counts.values())) > 1:  # a backstop: val splits that differ by any other way are not ranked
        raise SweepRefused(f"the variants were scored on different val splits (images: {counts}): not ranked")


def rank(rows: list[dict]) -> list[dict]:
    """Best first on the validation split: fine-tuned accuracy, then the head's. Test figures only report."""
    key = lambda r: (-(r["finetune_val_accuracy"] or 0.0), -(r["head_val_accuracy"] or 0.0), r["variant"])  # noqa: E731
    return sorted(rows, key=key)


def markdown(rows: list[dict], sweep_name: str) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    def speed(r):
        if r["extract_images_per_s"] is None:
            return "n/a"
        cached = f" ({r['extract_from_cache']} from cache)" if r["extract_from_cache"] else ""
        return f"{r['extract_images_per_s']:.1f}{cached}"

    lines = [
        f"# Leaderboard: {sweep_name}",
        "",
        "Ranked on the validation split; the test split only reports.",
        "",
        "| # | variant | base | input | pooling / layer | feature size | extract images/s | head val acc | fine-tuned val acc "
        "| head test acc | fine-tuned test acc | fine-tuned test ROC-AUC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        size = "x".join(map(str, r["input_size"])) if r["input_size"] else "?"
        tap = r["pooling"] + (f" @ {r['layer']}" if r["layer"] else "") if r["pooling"] else "?"
        auc = "n/a" if r["finetune_test_roc_auc"] is None else f"{r['finetune_test_roc_auc']:.4f}"
        lines.append(
            f"| {i} | {r['variant']} | {r['base']} ({r['weights']}) | {size} | {tap} | {r['feature_size']} | "
            f"{speed(r)} | {pct(r['head_val_accuracy'])} | {pct(r['finetune_val_accuracy'])} | "
            f"{pct(r['head_test_accuracy'])} | {pct(r['finetune_test_accuracy'])} | {auc} |"
        )
    return "\n".join(lines) + "\n"


def dvc(args: list[str], repo: Path) -> str:
    return cli.dvc(*args, cwd=repo).stdout


def changed_inputs(repo: Path) -> list[str]:
    """Data that a committed .dvc file tracks (`dvc add`-ed photos, a preset's `dvc import-url`) and that
    differs from what the file records, or .dvc files changed since the commit: the variants would run on
    data no commit holds, and DVC's checkout at the sweep's end would put the recorded data back over it."""
    changed = sh("git", "diff", "--name-only", "--relative", "HEAD", "--", "*.dvc", cwd=repo).splitlines()
    outs = set()
    for name in sh("git", "ls-files", "--", "*.dvc", cwd=repo).splitlines():
        spec = load_yaml((repo / name).read_text(encoding="utf-8")) or {}
        outs |= {(Path(name).parent / out["path"]).as_posix() for out in spec.get("outs") or []}
    if outs:
        uncommitted = json.loads(dvc(["data", "status", "--json"], repo) or "{}").get("uncommitted", {})
        changed += [path.rstrip("/") for paths in uncommitted.values() for path in paths if path.rstrip("/") in outs]
    return sorted(set(changed))


def restore_baseline(repo: Path) -> None:
    """Params, lock and metrics back to the commit, then the outputs from the DVC cache.

    A commit without a dvc.lock (nothing reproduced yet) gets none back.
    """

    def tracked(path: str) -> bool:
        return (
            subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=repo, capture_output=True).returncode == 0
        )

    sh("git", "checkout", "-q", "HEAD", "--", *[p for p in RESTORED if tracked(p)], cwd=repo)
    # ... and no file the commit lacks there: a variant's Grad-CAM images (their names hold the run's probabilities)
    # stayed, so evaluate's git-tracked output differed from the lock (`dvc status`, the next repro re-ran it); the
    # files git ignores are DVC's, put back below
    sh("git", "clean", "-fdq", "--", *[p for p in RESTORED if p not in ("params.yaml", "dvc.lock")], cwd=repo)
    if not tracked("dvc.lock"):
        (repo / "dvc.lock").unlink(missing_ok=True)
    else:  # the pipeline's outputs only: data a .dvc file tracks is the user's (the sweep refused changed data)
        dvc(["checkout", "--force", "--quiet", "dvc.yaml"], repo)


def committed_params(repo: Path, params_path: Path) -> Mapping:
    """The params file as the current commit holds it (the baseline every variant ran from); the file itself where
    the commit has none."""
    relative = os.path.relpath(Path(params_path).resolve(), Path(repo).resolve())
    shown = subprocess.run(  # `./`: relative to the project, which may be a folder of a larger git repository
        ["git", "show", f"HEAD:./{Path(relative).as_posix()}"], cwd=repo, capture_output=True, text=True
    )
    return load_yaml(shown.stdout) or {} if shown.returncode == 0 else read_params(params_path)


def check_current(sweep: SweepFile, names: Mapping[str, str], baseline: Mapping, done: Mapping[str, dict]) -> None:
    """An experiment of a variant that ran with other params than the variant has now is an error: it would be
    reused (not run again) or ranked as the variant."""
    for variant, name in names.items():
        if name not in done:
            continue
        # every key, not only those some variant overrides now: an override removed from the sweep file since
        # the experiment ran puts the baseline's value back, and that too is another run
        expected = dict(preset.leaves(preset.merge(baseline, sweep.variants[variant])))
        stale = stale_params(done[name], expected)
        # a key the baseline lacks that the experiment set (a `+key=`), no longer in the file
        stale |= {k: (v, None) for k, v in preset.leaves(done[name]["params"]) if k not in expected}
        if stale:
            raise SweepRefused(
                f"experiment {name} ran with other params than variant {variant} has now "
                f"({ {k: f'{old!r} -> {new!r}' for k, (old, new) in stale.items()} }): remove it "
                f"(`dvc exp remove {name}`) or name the variant anew"
            )


def changed_code(repo: Path) -> list[str]:
    """The files the pipeline reads (dvc.yaml, every stage's local dependencies: its code, a saved base) that
    neither git nor DVC holds as they are (the retrain's check, `retrain.unversioned_inputs`: changed since the
    commit, in none, git-ignored and in no DVC output, or outside the repository): `dvc exp run` would run the
    variants with them and the leaderboard rank them as runs of one commit (a review, 2026-12-07). Not the params
    and outputs the sweep restores; the data `.dvc` files track is `changed_inputs`'."""
    _, _, unversioned = retrain.unversioned_inputs(repo)
    return sorted(path for path in unversioned if not retrain.under(path, RESTORED))


def run_sweep(sweep_path: Path, out: Path, repo: Path, params_path: Path, collect_only: bool) -> list[dict]:
    sweep = load_sweep(sweep_path)
    # --collect: against the committed params, which the experiments ran from (an uncommitted edit since, such as
    # `dvc exp apply` of the winner, is no other run)
    baseline = committed_params(repo, params_path) if collect_only else None
    validate_variants(sweep, params_path, running=not collect_only, baseline=baseline)
    prefix = sweep_path.stem
    names = {variant: f"{prefix}-{variant}" for variant in sweep.variants}
    if not collect_only:
        # committed files changed, and a dvc.lock or params.yaml never committed (git diff alone missed those: the
        # end of the sweep deleted such a lock). Untracked files in the output folders are outputs the variants'
        # runs write over anyway (a first sweep leaves some), and git-ignored ones DVC's, which it puts back.
        # (paths relative to the project: it may be a folder of a larger git repository)
        modified = sh("git", "diff", "--name-only", "--relative", "HEAD", "--", *RESTORED, cwd=repo).splitlines()
        untracked = sh("git", "ls-files", "--others", "--exclude-standard", "--", "dvc.lock", "params.yaml", cwd=repo)
        changed = modified + untracked.splitlines()
        if changed:
            raise SweepRefused(
                f"uncommitted changes in {', '.join(RESTORED)} ({changed[0]}{', ...' if len(changed) > 1 else ''}): "
                "commit them first (every variant runs from "
                "the committed baseline, and the sweep puts the committed files back when it ends)"
            )
        code = changed_code(repo)
        if code:
            raise SweepRefused(
                f"files the runs use that no commit holds as they are ({', '.join(code[:3])}{', ...' if len(code) > 3 else ''}): "
                "commit them first (dvc exp run would run every variant with them, and the leaderboard ranks the "
                "variants as runs of one commit)"
            )
        inputs = changed_inputs(repo)
        if inputs:
            raise SweepRefused(
                f"data tracked by .dvc files differs from the commit ({', '.join(inputs[:3])}"
                f"{', ...' if len(inputs) > 3 else ''}): `dvc add` it and commit the .dvc file (or `dvc checkout` "
                "it back) first: every variant runs from the committed baseline"
            )
        in_git = outputs_in_git.git_tracked_cached_outputs(repo)
        if in_git:  # DVC would fail their stages only after training them
            raise SweepRefused(outputs_in_git.advice(in_git))
        baseline = read_params(params_path)
        values = variant_values(sweep, baseline)
        args = variant_args(values, baseline)
        done = experiments(repo)
        not_finished = unusable(done, list(names.values()))
        if not_finished:
            raise SweepRefused(
                f"experiments that did not finish: {not_finished}; remove them (`dvc exp remove NAME`, a queued "
                "one `dvc queue remove NAME`) and run the sweep again"
            )
        check_current(sweep, names, baseline, done)
        try:
            for variant, name in names.items():
                if name in done:
                    log.info("sweep: %s exists on this commit (%s); not run again", name, done[name]["rev"])
                    continue
                # `dvc exp run` leaves its -S edits in params.yaml: a `+key=` of the last variant stayed (its lock and
                # outputs may stay: DVC re-runs what this variant's params change, no more)
                sh("git", "checkout", "-q", "HEAD", "--", str(params_path), cwd=repo)
                log.info("sweep: dvc exp run -n %s %s", name, " ".join(args[variant]))
                proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-n", name, *args[variant]], cwd=repo)
                if proc.returncode != 0:
                    raise RuntimeError(f"variant {variant}: dvc exp run failed ({proc.returncode})")
        finally:
            restore_baseline(repo)
    found = experiments(repo)
    missing = [name for name in names.values() if name not in found]
    if missing:
        raise SweepRefused(f"no experiment for {missing} on this commit: run the sweep without --collect first")
    not_finished = unusable(found, list(names.values()))
    if not_finished:
        raise SweepRefused(f"experiments that did not finish cannot be ranked: {not_finished}")
    if collect_only:  # (a sweep checked them before its runs) against the committed params, which the experiments
        # ran from (an uncommitted edit since, such as `dvc exp apply` of the winner, is no other run)
        check_current(sweep, names, committed_params(repo, params_path), found)
    rows = rank([leaderboard_row(variant, found[name]) for variant, name in names.items()])
    check_scored(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.json").write_text(
        json.dumps({"sweep": prefix, "rows": rows}, indent=2) + "\n", encoding="utf-8"
    )
    (out / "leaderboard.md").write_text(markdown(rows, prefix), encoding="utf-8")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a sweep file, e.g. sweeps/real_lite0.yaml")
    parser.add_argument("--out", type=Path, default=Path("leaderboard"), help="folder for leaderboard.json and .md")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--collect", action="store_true", help="only write the leaderboard from existing experiments")
    args = parser.parse_args(argv)
    configure_logging()
    rows = run_sweep(args.sweep, args.out, Path.cwd(), args.params, args.collect)
    print((args.out / "leaderboard.md").read_text(encoding="utf-8"), end="")
    log.info("sweep: %d variants; leaderboard in %s", len(rows), args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
