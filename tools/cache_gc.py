"""Garbage-collect the stages' caches (extract's features, download's per-file results): keep only what is in use.

    python -m tools.cache_gc                     # params.yaml, data/convert, .cache/extract, .cache/download
    python -m tools.cache_gc --dry-run           # say what would go

The cache (`pipelines/feature_cache.py`) grows with every base, input size, batch size, runtime and edit of
the decode it has seen, and keeps images that have left the dataset. This keeps the namespace of the
current params (`conv_base`, `extract`; computed as the extract stage computes it) and, in it, the entries
of the images in the current convert records; it deletes every other namespace and entry. The next
`dvc repro` therefore extracts nothing it would not have extracted anyway.

OpenVINO's converted models (extract's under the feature cache, evaluate's under `.cache/openvino`) are
deleted, the current ones too: a conversion is redone in seconds at its next use, and their keys would pile up.

The download stage's cache (`pipelines/download_cache.py`) likewise keeps the namespace of the current
`download` limits and, in it, the results of the files now at the source (`dataset`; read and hashed as
the stage reads them), so the next download decodes nothing it would not have decoded anyway.

Run it when no stage runs (a nightly retrain: after `tools.retrain`); it refuses to start while a stage
holds either cache's lock (`pipelines.cache_lock`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

from components import conv_base, download, extract
from components.cli import configure_logging, run_main
from pipelines import cache_lock, download_cache, feature_cache, normalise, record_checks, records, runtimes

log = logging.getLogger(__name__)


def used_keys(convert_dir: Path) -> set[str]:
    """The cache keys (SHA-256 of the encoded bytes) of every image in the convert stage's records."""
    import tensorflow as tf

    def parse(serialized):
        return tf.io.parse_single_example(serialized, records.image_record_spec())["image"]

    keys = set()
    for split in ("train", "val", "test"):  # split_files: an error if a split has no shard file
        files = records.split_files(convert_dir / "records", split)
        with record_checks.damaged_named(files):  # a damaged shard named (nothing is deleted): not a DataLossError
            for blob in tf.data.TFRecordDataset(files).map(parse):
                keys.add(feature_cache.image_key(blob.numpy()))
    return keys


def current_namespace(params_path: Path, weights: Path | None = None) -> str:
    """The namespace extract computes for these params; with `weights: imagenet`, from the base_weights stage's
    file in `weights`, as `dvc repro` runs extract (a missing one is an error: the namespace Keras's cache would
    give is not one extract uses, and the one it uses would not be kept)."""
    config = extract.load_config(params_path)
    if weights is not None:  # with `weights: imagenet` and no such folder: an error, not Keras's cache
        config = dataclasses.replace(config, conv_base=conv_base.imagenet_from(config.conv_base, weights))
    return feature_cache.namespace_of(extract.cache_namespace(config))


def recorded_namespace(metrics: Path) -> str | None:
    """The namespace the current features came from, as extract recorded it: kept too, so a collection run in
    another environment than `dvc repro` (cron without its OMP_NUM_THREADS) never deletes what the next
    repro reads."""
    try:
        return json.loads(metrics.read_text(encoding="utf-8")).get("cache_namespace")
    except (OSError, ValueError, AttributeError):
        return None


def source_keys(config: download.Config) -> set[str]:
    """The download cache's keys (SHA-256 of the file) of every file now at the source."""
    offline = lambda: False  # noqa: E731 - a clean-up never downloads a dataset (tfds would fetch one it lacks)
    return {
        normalise.content_hash(item.data)
        for item in download.source_items(config.dataset, offline)
        if item.data is not None
    }


def collect_download_cache(params_path: Path, cache: str, dry_run: bool, locked: bool = True) -> dict:
    """`locked`: whether this run holds the cache's lock; a cache absent when it was taken is left alone
    (a download that created it since holds its own lock, which this run does not see)."""
    config = download.load_config(params_path)
    namespace = feature_cache.namespace_of(download.cache_namespace(config))
    if not locked:  # no cache: the source need not be readable
        return {"namespace_kept": namespace, "files_at_source": 0, **feature_cache.nothing_collected()}
    keys = source_keys(config)
    report = feature_cache.collect_garbage(cache, namespace, keys, dry_run, suffixes=download_cache.SUFFIXES)
    return {"namespace_kept": namespace, "files_at_source": len(keys), **report}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--convert", type=Path, default=Path("data/convert"), help="the convert stage's output")
    parser.add_argument("--cache", default=".cache/extract", help="the feature cache (extract's --cache)")
    parser.add_argument(
        "--download-cache", default=".cache/download", help="the download stage's cache (download's --cache)"
    )
    parser.add_argument(
        "--metrics", type=Path, default=Path("metrics/extract.json"), help="extract's metrics: its cache namespace"
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=Path("data/base_weights"),
        help="the base_weights stage's output (extract's --weights)",
    )
    parser.add_argument(
        "--converted",
        default=".cache/openvino",
        help="evaluate's converted models (its --cache's openvino folder); extract's are in --cache's",
    )
    parser.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")
    args = parser.parse_args(argv)
    configure_logging()
    # every cache locked first (`CacheBusy` while a stage uses one), then the download cache: it reads the
    # source, which may fail, and then nothing is deleted at all. A folder absent when its lock is taken is not
    # locked (none is made for it) and is left alone: a stage that starts meanwhile creates it and holds its own
    # lock, which this run would not see.
    for root in (args.download_cache, args.cache, args.converted):
        if "://" in str(root):  # no lock there (held() yields False), and nothing to collect here: refused, not skipped
            raise ValueError(
                f"{root}: garbage collection runs on a local cache folder (use the bucket's lifecycle rules)"
            )
    with (
        cache_lock.held(args.download_cache, exclusive=True) as download_locked,
        cache_lock.held(args.cache, exclusive=True) as cache_locked,
        cache_lock.held(args.converted, exclusive=True) as converted_locked,  # evaluate's, while it converts
    ):
        namespace = current_namespace(args.params, args.weights)  # may fail: before anything is deleted
        download_report = collect_download_cache(args.params, args.download_cache, args.dry_run, download_locked)
        recorded = recorded_namespace(args.metrics)
        keys = used_keys(args.convert)
        report = (
            feature_cache.collect_garbage(args.cache, {namespace} | {recorded} - {None}, keys, dry_run=args.dry_run)
            if cache_locked
            else feature_cache.nothing_collected()
        )
        converted = {
            folder: (
                feature_cache.collect_converted(folder, args.dry_run)
                if locked
                else feature_cache.nothing_converted_collected()
            )
            for folder, locked in ((runtimes.local_cache(args.cache), cache_locked), (args.converted, converted_locked))
            if folder
        }
    reports = {
        "dry_run": args.dry_run,
        "extract": {
            "namespace_kept": namespace,
            "namespace_of_outputs": recorded,
            "images_in_use": len(keys),
            **report,
        },
        "download": download_report,
        "converted": converted,
    }
    print(json.dumps(reports, indent=2))
    for cache in ("extract", "download"):
        report = reports[cache]
        log.info(
            "cache_gc: %s cache: %s %d namespaces and %d entries (%.1f MB); kept %d entries of namespace %s",
            cache,
            "would remove" if args.dry_run else "removed",
            len(report["namespaces_removed"]),
            report["entries_removed"],
            report["bytes_freed"] / 1e6,
            report["entries_kept"],
            report["namespace_kept"],
        )
    return 0


if __name__ == "__main__":
    run_main(main)
