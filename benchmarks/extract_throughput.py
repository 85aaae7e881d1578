"""Extraction throughput, peak memory and head accuracy on real data, in one script.

    python -m benchmarks.extract_throughput ../shared/data/cats_vs_dogs_2000 \
        ../shared/models/efficientnet_lite0_imagenet_notop.keras [--size 160] [--work DIR]

Prepares download + convert of the folder (not timed), then times, on the same images:
  stage  the extract stage (Beam, DirectRunner; decode, resize, batches of 32, the
         frozen base), wall time of `extract.run` including model load and Beam start;
  (a)    a bare `predict_on_batch` loop over the same images already decoded and
         resized in memory (pure inference, batches of 32);
  (b)    the seed's loop: tf_keras `ImageDataGenerator().flow_from_directory(...)`
         over the same folder with `model.predict(batch)` per batch.
Then the extract stage's peak RSS in a fresh process at 500 and at 2,000 images,
and trains the head (train_head stage, logistic head) to report its test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 32


def prepare(folder: Path, work: Path, limit: int | None = None) -> Path:
    from components import convert, download

    dl_out = work / "download"
    if not dl_out.exists():
        preset = download.DownloadParams(
            fractions=download.Fractions(train=0.5, val=0.25, test=0.25)
        )  # presets/real_lite0.yaml
        download.run(
            download.Config(download.CommonParams(), download.DatasetParams(source="folder", dir=str(folder)), preset),
            dl_out,
        )
    if limit is None:
        target, src = work / "convert", dl_out
    else:
        src = work / f"download_{limit}"
        shutil.copytree(dl_out, src)
        rows = (src / "manifest.jsonl").read_text().splitlines()
        step = max(1, len(rows) // limit)  # every k-th row: all splits and classes
        (src / "manifest.jsonl").write_text("\n".join(rows[::step][:limit]) + "\n")
        target = work / f"convert_{limit}"
    convert.run(convert.Config(convert.ConvertParams()), src, target)
    return target


def bare_predict(model, convert_dir: Path, size) -> tuple[float, int]:
    import numpy as np

    from pipelines import records

    paths = sorted((convert_dir / "records").glob("*.tfrecord"))
    pixels = [p.numpy() for path in paths for p, _ in records.image_dataset([str(path)], size, BATCH, binary=False)]
    images = np.concatenate(pixels)
    model.predict_on_batch(images[:BATCH])  # warm-up (trace)
    started = time.perf_counter()
    for i in range(0, len(images), BATCH):
        model.predict_on_batch(images[i : i + BATCH])
    return time.perf_counter() - started, len(images)


def seed_loop(model, folder: Path, size) -> tuple[float, int]:
    from tf_keras.preprocessing.image import ImageDataGenerator

    generator = ImageDataGenerator().flow_from_directory(
        str(folder), target_size=size, batch_size=BATCH, class_mode="binary", shuffle=False
    )
    started, count = time.perf_counter(), 0
    for i in range(len(generator)):
        inputs, _ = generator[i]
        model.predict(inputs, verbose=0)
        count += len(inputs)
    return time.perf_counter() - started, count


def peak_rss_mb(convert_dir: Path, out: Path, params: Path) -> float:
    cmd = [
        sys.executable,
        "-m",
        "components.extract",
        "--params",
        str(params),
        "--convert",
        str(convert_dir),
        "--out",
        str(out),
    ]
    code = "import resource,subprocess,sys; r=subprocess.run(sys.argv[1:]); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
    result = subprocess.run(
        [sys.executable, "-c", code, *cmd], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    kb, rc = result.stdout.split()[-2:]
    if rc != "0":
        raise RuntimeError(result.stderr[-3000:])
    return int(kb) / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("base", type=Path, help="a saved .keras conv base (raw RGB 0..255 in)")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging

    logging.basicConfig(level=logging.WARNING)
    import yaml

    from components import conv_base, extract, train_head
    from components.params import CommonParams

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_extract_"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    size = (args.size, args.size)
    convert_dir = prepare(args.folder, work)
    base = conv_base.ConvBaseParams(name=None, path=str(args.base.resolve()), input_size=size, pooling="avg")
    config = extract.Config(base, extract.ExtractParams(batch_size=BATCH))

    started = time.perf_counter()
    record = extract.run(config, convert_dir, work / "extract")
    stage_s = time.perf_counter() - started
    n = sum(record["records"].values())
    model = conv_base.build_extractor(base)
    bare_s, bare_n = bare_predict(model, convert_dir, size)
    seed_s, seed_n = seed_loop(model, args.folder, size)

    params = work / "params.yaml"
    params.write_text(
        yaml.safe_dump({"conv_base": json.loads(base.model_dump_json()), "extract": {"batch_size": BATCH}})
    )
    convert_500 = prepare(args.folder, work, limit=500)
    rss = {
        500: peak_rss_mb(convert_500, work / "rss500", params),
        n: peak_rss_mb(convert_dir, work / "rss_all", params),
    }

    head_params = train_head.TrainHeadParams(hidden_units=0, dropout=0.2, epochs=60, patience=8)  # the preset's head
    history = train_head.run(
        train_head.Config(CommonParams(), head_params),
        work / "extract",
        convert_dir / "labels.json",
        work / "head",
        work / "live",
    )
    test_accuracy = head_test_accuracy(work / "head" / "head.keras", work / "extract")

    stage_ips, bare_ips, seed_ips = n / stage_s, bare_n / bare_s, seed_n / seed_s
    print(
        json.dumps(
            {
                "images": n,
                "size": list(size),
                "stage_s": round(stage_s, 2),
                "stage_images_per_s": round(stage_ips, 1),
                # of which: checking params and loading the base before Beam starts, then the Beam job itself
                "stage_setup_s": round(stage_s - record["seconds"], 2),
                "stage_beam_s": record["seconds"],
                "bare_predict_s": round(bare_s, 2),
                "bare_predict_images_per_s": round(bare_ips, 1),
                "seed_loop_s": round(seed_s, 2),
                "seed_loop_images_per_s": round(seed_ips, 1),
                "stage_over_bare": round(stage_ips / bare_ips, 3),
                "stage_over_seed_loop": round(stage_ips / seed_ips, 3),
                "peak_rss_mb": {str(k): round(v, 1) for k, v in rss.items()},
                "head_val_accuracy": round(history["val_accuracy"], 4),
                "head_test_accuracy": round(test_accuracy, 4),
            },
            indent=2,
        )
    )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def head_test_accuracy(head_path: Path, extract_dir: Path) -> float:
    import keras
    import numpy as np

    from components.train_head import feature_dataset

    meta = json.loads((extract_dir / "features.json").read_text())
    files = sorted(str(p) for p in (extract_dir / "features").glob("test-*.tfrecord"))
    head = keras.saving.load_model(head_path)
    correct = total = 0
    for features, labels in feature_dataset(files, meta["feature_size"], 2, 256, None):
        predicted = (np.asarray(head.predict_on_batch(features)).ravel() > 0.5).astype(int)
        correct += int((predicted == labels.numpy().astype(int)).sum())
        total += len(predicted)
    return correct / total


if __name__ == "__main__":
    from components.cli import run_main

    run_main(main)
