"""Garbage-collect the extract stage's feature cache: keep only the entries the current outputs use.

    python -m tools.cache_gc                     # params.yaml, data/convert, .cache/extract
    python -m tools.cache_gc --dry-run           # say what would go

The cache (`pipelines/feature_cache.py`) grows with every base, input size, batch size, runtime and edit of
the decode it has seen, and keeps images that have left the dataset. This keeps the namespace of the
current params (`conv_base`, `extract`; computed as the extract stage computes it) and, in it, the entries
of the images in the current convert records; it deletes every other namespace and entry. The next
`dvc repro` therefore extracts nothing it would not have extracted anyway. Run it when no extract runs
(a nightly retrain: after `tools.retrain`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

from components import extract
from components.cli import configure_logging, run_main
from pipelines import feature_cache, records

log = logging.getLogger(__name__)


def used_keys(convert_dir: Path) -> set[str]:
    """The cache keys (SHA-256 of the encoded bytes) of every image in the convert stage's records."""
    import tensorflow as tf

    def parse(serialized):
        return tf.io.parse_single_example(serialized, records.image_record_spec())["image"]

    keys = set()
    for split in ("train", "val", "test"):  # split_files: an error if a split has no shard file
        for blob in tf.data.TFRecordDataset(records.split_files(convert_dir / "records", split)).map(parse):
            keys.add(feature_cache.image_key(blob.numpy()))
    return keys


def current_namespace(params_path: Path) -> str:
    return feature_cache.namespace_of(extract.cache_namespace(extract.load_config(params_path)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--convert", type=Path, default=Path("data/convert"), help="the convert stage's output")
    parser.add_argument("--cache", default=".cache/extract", help="the feature cache (extract's --cache)")
    parser.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")
    args = parser.parse_args(argv)
    configure_logging()
    namespace = current_namespace(args.params)
    keys = used_keys(args.convert)
    report = feature_cache.collect_garbage(args.cache, namespace, keys, dry_run=args.dry_run)
    report = {"namespace_kept": namespace, "images_in_use": len(keys), "dry_run": args.dry_run, **report}
    print(json.dumps(report, indent=2))
    log.info(
        "cache_gc: %s %d namespaces and %d entries (%.1f MB); kept %d entries of namespace %s",
        "would remove" if args.dry_run else "removed",
        len(report["namespaces_removed"]),
        report["entries_removed"],
        report["bytes_freed"] / 1e6,
        report["entries_kept"],
        namespace,
    )
    return 0


if __name__ == "__main__":
    run_main(main)
