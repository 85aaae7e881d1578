"""Convert-stage throughput against a plain single-process loop, and the on-disk form of images.

    python -m benchmarks.convert_throughput ../shared/data/cats_vs_dogs_2000 [--work DIR] [beam args]

1. Runs the download stage on the folder (not part of the comparison).
2. Times the convert stage (Beam + tf.Transform, DirectRunner unless beam args
   say otherwise) and a plain Python loop that writes the same TFRecords (same
   label indices, shard assignment and order), checks the files are
   byte-identical, and prints images/s of both and the ratio.
3. Prints the size on disk of the TFRecords against the source JPEGs.
4. Compares candidate on-disk forms of the image (the encoded bytes as stored,
   raw uint8 pixels at 160x160, JPEG re-encoded at 160x160): bytes per image
   and read speed of a tf.data pipeline that yields 160x160 float batches.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

SIZE = (160, 160)


def plain_loop(download_dir: Path, out_dir: Path, shards: dict[str, int]) -> int:
    """The baseline: one process, no Beam, the same records in the same files."""
    import tensorflow as tf

    from components.manifest import SPLITS, read_jsonl
    from pipelines import convert as graph
    from pipelines import features as fk

    manifest = read_jsonl(download_dir / "manifest.jsonl")
    labels = sorted({row["label"] for row in manifest if row["split"] == "train"})
    index = {name: i for i, name in enumerate(labels)}
    out_dir.mkdir(parents=True)
    for split in SPLITS:
        n = shards[split]
        buckets = collections.defaultdict(list)
        for row in manifest:
            if row["split"] != split:
                continue
            data = (download_dir / row["file"]).read_bytes()
            example = graph.to_example(
                {
                    fk.IMAGE: data,
                    fk.LABEL: index[row["label"]],
                    fk.LABEL_NAME: row["label"].encode(),
                    fk.ID: row["id"].encode(),
                }
            )
            buckets[graph.shard_of(row["id"], n)].append((row["id"].encode(), example))
        for i in range(n):
            with tf.io.TFRecordWriter(graph.shard_path(str(out_dir / split), i, n)) as writer:
                for _, example in sorted(buckets[i]):
                    writer.write(example)
    return len(manifest)


def read_speed(files: list[str], parse, repeats: int = 2) -> float:
    """Images/s of TFRecords -> decoded 160x160 float batches (parallel, prefetching)."""
    import tensorflow as tf

    def pipeline():
        return (
            tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
            .map(parse, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(64)
            .prefetch(tf.data.AUTOTUNE)
        )

    count = sum(int(b.shape[0]) for b in pipeline())  # warm-up, and the count
    started = time.perf_counter()
    for _ in range(repeats):
        for _ in pipeline():
            pass
    return count * repeats / (time.perf_counter() - started)


def compare_forms(records_dir: Path, work: Path) -> dict:
    import numpy as np
    import tensorflow as tf

    from pipelines import features as fk
    from pipelines import image

    files = sorted(str(p) for p in records_dir.glob("*.tfrecord"))
    spec = {fk.IMAGE: tf.io.FixedLenFeature([], tf.string)}
    raw_path, jpeg_path = work / "raw160.tfrecord", work / "jpeg160.tfrecord"
    with tf.io.TFRecordWriter(str(raw_path)) as raw_w, tf.io.TFRecordWriter(str(jpeg_path)) as jpg_w:
        for serialized in tf.data.TFRecordDataset(files):
            encoded = tf.io.parse_single_example(serialized, spec)[fk.IMAGE]
            pixels = tf.cast(tf.round(image.decode_and_resize(encoded, SIZE)), tf.uint8)
            for writer, payload in (
                (raw_w, pixels.numpy().tobytes()),
                (jpg_w, tf.io.encode_jpeg(pixels, quality=90).numpy()),
            ):
                ex = tf.train.Example(
                    features=tf.train.Features(
                        feature={fk.IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[payload]))}
                    )
                )
                writer.write(ex.SerializeToString())

    def parse_encoded(s):
        return image.decode_and_resize(tf.io.parse_single_example(s, spec)[fk.IMAGE], SIZE)

    def parse_raw(s):
        raw = tf.io.decode_raw(tf.io.parse_single_example(s, spec)[fk.IMAGE], tf.uint8)
        return tf.cast(tf.reshape(raw, [SIZE[0], SIZE[1], 3]), tf.float32)

    n = sum(1 for _ in tf.data.TFRecordDataset(files))
    size_encoded = sum(os.path.getsize(f) for f in files)
    forms = {
        "encoded as stored (chosen)": (size_encoded, read_speed(files, parse_encoded)),
        "raw uint8 160x160": (raw_path.stat().st_size, read_speed([str(raw_path)], parse_raw)),
        "JPEG q90 re-encoded 160x160": (jpeg_path.stat().st_size, read_speed([str(jpeg_path)], parse_encoded)),
    }
    del np
    return {
        name: {"kB_per_image": size / n / 1000, "read_images_per_s": speed} for name, (size, speed) in forms.items()
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a folder of class sub-folders")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side (best is reported)")
    args, beam_args = parser.parse_known_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging

    logging.basicConfig(level=logging.WARNING)
    from components import convert, download

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dl_config = download.Config(
        download.CommonParams(),
        download.DatasetParams(source="folder", dir=str(args.folder)),
        download.DownloadParams(),
    )
    started = time.perf_counter()
    summary = download.run(dl_config, work / "download")
    download_s = time.perf_counter() - started
    n = summary["kept"]
    config = convert.Config(convert.ConvertParams())
    shards = config.convert.shards.model_dump()

    beam_times, loop_times = [], []
    for r in range(args.repeats):
        started = time.perf_counter()
        convert.run(config, work / "download", work / f"beam{r}", beam_args)
        beam_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        plain_loop(work / "download", work / f"loop{r}", shards)
        loop_times.append(time.perf_counter() - started)

    # Marginal cost per image: the warm Beam stage on a quarter of the manifest.
    quarter = work / "download_quarter"
    shutil.copytree(work / "download", quarter)
    rows = (quarter / "manifest.jsonl").read_text().splitlines()
    (quarter / "manifest.jsonl").write_text("\n".join(rows[::4]) + "\n")
    started = time.perf_counter()
    convert.run(config, quarter, work / "beam_quarter", beam_args)
    quarter_s = time.perf_counter() - started
    n_quarter = len(rows[::4])

    beam_files = sorted((work / "beam0" / "records").glob("*.tfrecord"))
    identical = all((work / "loop0" / f.name).read_bytes() == f.read_bytes() for f in beam_files)
    records_bytes = sum(f.stat().st_size for f in beam_files)
    source_bytes = sum(p.stat().st_size for p in args.folder.rglob("*") if p.is_file())
    beam_s, loop_s = min(beam_times), min(loop_times)
    result = {
        "images": n,
        "download_s": round(download_s, 2),
        "beam_args": beam_args,
        "convert_beam_s": [round(t, 2) for t in beam_times],
        "plain_loop_s": [round(t, 2) for t in loop_times],
        "convert_beam_images_per_s": round(n / beam_s, 1),
        "plain_loop_images_per_s": round(n / loop_s, 1),
        "ratio_beam_over_loop_throughput": round(loop_s / beam_s, 3),
        "beam_s_at_quarter": {"images": n_quarter, "s": round(quarter_s, 2)},
        "beam_marginal_ms_per_image": round(1000 * (beam_s - quarter_s) / (n - n_quarter), 3),
        "loop_ms_per_image": round(1000 * loop_s / n, 3),
        "records_identical_to_loop": identical,
        "tfrecords_MB": round(records_bytes / 1e6, 2),
        "source_MB": round(source_bytes / 1e6, 2),
        "tfrecords_over_source": round(records_bytes / source_bytes, 4),
        "forms": compare_forms(work / "beam0" / "records", work),
    }
    print(json.dumps(result, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    from components.cli import run_main

    run_main(main)
