"""Turn the quality stage's findings into explicit, versioned params: ``download.exclude`` and
``download.keep_together``. Nothing is dropped or moved until you run this and commit params.yaml.

    python -m tools.data_fixes --keep-together              # each near-duplicate pair in one split
    python -m tools.data_fixes --exclude-copies             # drop the val/test side of each pair
    python -m tools.data_fixes --exclude-suspects 5         # drop the 5 most suspect labels (look first:
                                                            # quality/label_suspects.png)
    ... --write                                             # merge into params.yaml (else print -S args)

The lists in params.yaml are extended (never shrunk) and deduplicated, and the result is validated with
every stage's config, as a preset is. Then ``dvc repro`` (or ``dvc exp run`` with the printed ``-S``
arguments) re-runs from download; ``summary.json`` and the audit report what the lists did.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Sequence

from components.cli import configure_logging, run_main
from components.manifest import MANIFEST, iter_jsonl
from components.params import read_params, write_params
from pipelines import sources, split
from tools import preset

QUARANTINE = "quarantine.jsonl"  # download's, beside its manifest
NEAR_DUPLICATES = "near_duplicates.json"
LABEL_ISSUES = "label_issues.json"


def refuse_given_splits(dataset: dict, project: Path = Path(".")) -> None:
    """download.keep_together moves images between hash-split splits only: refuse it, before writing anything,
    where the source fixes the splits (what download would refuse at the next run, after reading every image): a
    tfds source mapping its slices, a folder of train/val/test folders used as they are (`project`: where the
    stages run, dataset.dir's base)."""
    if dataset.get("source", "tfds") == "tfds" and isinstance((dataset.get("tfds") or {}).get("splits", {}), dict):
        raise SystemExit(
            "--keep-together: the tfds source maps its own slices to train/val/test (dataset.tfds.splits), which "
            "download keeps; give dataset.tfds.splits one slice (hash-split by download.fractions), or use "
            "--exclude-copies"
        )
    if dataset.get("source") == "folder" and dataset.get("existing_splits", "use") == "use" and dataset.get("dir"):
        root = project / str(dataset["dir"])
        try:
            given = any(split for _, split in sources._detect_layout(root, "use"))
        except (OSError, ValueError):  # no such folder, or a layout download refuses with its own message
            return
        if given:
            raise SystemExit(
                f"--keep-together: {dataset['dir']} has train/val/test folders, which download keeps "
                "(dataset.existing_splits: use); move the files between them, set dataset.existing_splits: ignore "
                "to hash-split, or use --exclude-copies"
            )


def fixes(
    near_duplicates: list[dict],
    label_issues: list[dict],
    *,
    keep_together: bool = False,
    exclude_copies: bool = False,
    exclude_suspects: int = 0,
) -> dict[str, list]:
    """The ids to exclude and the groups to keep together, from the quality stage's two lists."""
    exclude, groups = [], []
    if keep_together:
        groups = [sorted((pair["a_id"], pair["b_id"])) for pair in near_duplicates]
    if exclude_copies:  # b is in the later split (train < val < test): keep the training copy
        exclude += [pair["b_id"] for pair in near_duplicates]
    exclude += [row["id"] for row in label_issues[:exclude_suspects]]
    return {"exclude": exclude, "keep_together": groups}


def check_current(found: dict[str, list], manifest: Path, excluded: Sequence[str] = ()) -> None:
    """The ids the lists name must be images of the current download: in its manifest, or quarantined by it (an image
    `download.exclude` took out since the lists were made, or another rule), or listed in `excluded` (a review on
    2026-12-07: a quality folder from another run or dataset was merged into download.exclude without a word, and
    download only listed its ids as not found)."""
    named = {*found["exclude"], *(i for group in found["keep_together"] for i in group)}
    known = {row.get("id") for row in iter_jsonl(manifest)} | set(excluded)
    quarantine = manifest.with_name(QUARANTINE)
    if quarantine.is_file():
        known |= {split.image_id(row["pixels_sha256"]) for row in iter_jsonl(quarantine) if row.get("pixels_sha256")}
    unknown = sorted(named - known)
    if unknown:
        raise SystemExit(
            f"data_fixes: {len(unknown)} of the ids the quality lists name are no image of {manifest.parent} "
            f"({unknown[0]}...): the lists come from another run or dataset; run `dvc repro quality` first"
        )


def merged_download(current: dict, found: dict[str, list]) -> dict:
    """params.yaml's download section with the found ids and groups appended (existing ones first, no repeats)."""
    section = dict(current)
    exclude = list(section.get("exclude") or [])
    exclude += [i for i in dict.fromkeys(found["exclude"]) if i not in exclude]
    groups = [list(g) for g in section.get("keep_together") or []]
    known = {tuple(sorted(g)) for g in groups}
    for group in found["keep_together"]:
        if tuple(sorted(group)) not in known:
            known.add(tuple(sorted(group)))
            groups.append(list(group))
    section["exclude"], section["keep_together"] = exclude, groups  # both keys, so older params files validate
    return section


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=Path("quality"), help="the quality stage's folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--manifest",
        type=Path,
        help="download's manifest the lists must name (default: data/download's beside --params)",
    )
    parser.add_argument("--keep-together", action="store_true", help="each near-duplicate pair in one split")
    parser.add_argument("--exclude-copies", action="store_true", help="exclude the later split's image of each pair")
    parser.add_argument("--exclude-suspects", type=int, default=0, metavar="N", help="exclude the N most suspect")
    parser.add_argument("--write", action="store_true", help="merge into --params instead of printing -S args")
    args = parser.parse_args(argv)
    configure_logging()
    if args.keep_together and args.exclude_copies:
        parser.error("--keep-together and --exclude-copies are two answers to the same pairs: choose one")
    if args.exclude_suspects < 0:
        parser.error(f"--exclude-suspects takes a count of 0 or more, got {args.exclude_suspects}")
    near = json.loads((args.report / NEAR_DUPLICATES).read_text(encoding="utf-8"))
    issues = json.loads((args.report / LABEL_ISSUES).read_text(encoding="utf-8"))
    found = fixes(
        near,
        issues,
        keep_together=args.keep_together,
        exclude_copies=args.exclude_copies,
        exclude_suspects=args.exclude_suspects,
    )
    params = read_params(args.params)
    manifest = args.manifest or Path(args.params).resolve().parent / "data" / "download" / MANIFEST
    if args.manifest and not manifest.is_file():
        parser.error(f"--manifest {manifest}: no such file")
    if manifest.is_file():
        check_current(found, manifest, (params.get("download") or {}).get("exclude") or [])
    if args.keep_together:
        refuse_given_splits(params.get("dataset") or {}, Path(args.params).resolve().parent)
    download = merged_download(params.get("download") or {}, found)
    merged = {**params, "download": download}
    preset.validate(merged, args.params)
    if args.write:
        write_params(args.params, merged)
        print(
            f"{args.params}: download.exclude {len(download['exclude'])} ids, "
            f"download.keep_together {len(download['keep_together'])} groups"
        )
    else:
        changed = {k: download[k] for k in ("exclude", "keep_together")}
        print(" ".join(shlex.quote(arg) for arg in preset.set_args({"download": changed}, params)))
    return 0


if __name__ == "__main__":
    run_main(main)
