"""Benchmark: one fine-tuning epoch, the finetune stage's input pipeline against the seed's loop.

    python -m benchmarks.finetune_epoch ../shared/data/cats_vs_dogs_2000 \
        ../shared/models/efficientnet_lite0_imagenet_notop.keras [--unfreeze-from block11_expand_conv]

One model (the base plus a logistic head, top of the base unfrozen, compiled
once) trains on the same training images, in the same process, fed by:
  (a) the finetune stage's pipeline: convert's TFRecords -> parallel decode
      (`pipelines.image`) -> in-memory cache -> shuffle -> batch -> Keras
      augmentation layers on whole batches -> prefetch;
  (b) the seed's loop (Deep Learning with Python, ch. 5): tf_keras
      `ImageDataGenerator(rotation, shifts, zoom, flip).flow_from_directory(...)`
      over a class-folder view of the same images, passed to `fit`;
  (c) (a) without the cache (decode every epoch), to show what the cache buys.
Each is warmed up with one epoch (tracing, the cache fill, the file cache); then
rounds alternate a, b, c so that load drifts hit all three alike. Epochs train
only (no validation pass). Prints seconds per epoch (median) and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

BATCH = 32


def class_folder_view(download_dir: Path, split: str, target: Path) -> int:
    """target/<label>/<file> symlinks to the download stage's images of one split."""
    from components.manifest import read_jsonl

    count = 0
    for row in read_jsonl(download_dir / "manifest.jsonl"):
        if row["split"] != split:
            continue
        folder = target / row["label"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / Path(row["file"]).name).symlink_to((download_dir / row["file"]).resolve())
        count += 1
    return count


def seed_batches(folder: Path, size, seed: int):
    from tf_keras.preprocessing.image import ImageDataGenerator

    generator = ImageDataGenerator(
        rotation_range=36,
        width_shift_range=0.2,
        height_shift_range=0.2,
        zoom_range=0.2,
        horizontal_flip=True,
        fill_mode="reflect",
    ).flow_from_directory(str(folder), target_size=size, batch_size=BATCH, class_mode="binary", seed=seed)

    def forever():
        while True:
            for i in range(len(generator)):
                x, y = generator[i]
                yield x.astype("float32"), y.astype("float32")
            generator.on_epoch_end()

    return forever(), len(generator)


def timed_epoch(model, data, steps=None) -> float:
    started = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    return time.perf_counter() - started


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The arguments of the fine-tuning benchmarks (this one and determinism_cost.py)."""
    parser.add_argument("folder", type=Path)
    parser.add_argument("base", type=Path, help="a saved .keras conv base (raw RGB 0..255 in)")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--unfreeze-from", default="block11_expand_conv")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)


def preset_model(base_path: Path, size: tuple[int, int], head_path: Path, unfreeze_from: str):
    """The real-data preset's classifier: the saved base with the head, top unfrozen, compiled (Adam 1e-5).
    Returns (model, finetune params, unfrozen layers)."""
    from components import finetune, training
    from components.conv_base import ConvBaseParams

    base = ConvBaseParams(name=None, path=str(base_path.resolve()), input_size=size, pooling="avg")
    model = finetune.build_classifier(base, head_path)
    params = finetune.FinetuneParams(
        unfreeze_from=unfreeze_from, optimizer="adam", learning_rate=1e-5, batch_size=BATCH
    )
    unfrozen = finetune.prepare_for_finetuning(model, base, params)
    training.compile_head(model, 2, params.optimizer, params.learning_rate)
    return model, params, unfrozen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from benchmarks.extract_throughput import prepare
    from components import finetune, train_head
    from pipelines import records

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    work.mkdir(parents=True, exist_ok=True)
    size = (args.size, args.size)
    convert_dir = work / "convert"
    if not convert_dir.exists():
        prepare(args.folder, work)
    view = work / "train_view"
    shutil.rmtree(view, ignore_errors=True)
    n = class_folder_view(work / "download", "train", view)

    head = train_head.build_head(1280, 2, train_head.TrainHeadParams(hidden_units=0, dropout=0.2))
    head.save(work / "head.keras")
    model, params, unfrozen = preset_model(args.base, size, work / "head.keras", args.unfreeze_from)

    files = records.split_files(convert_dir / "records", "train")
    augment = finetune.build_augmentation(params.augment, seed=1)
    stage = records.image_dataset(files, size, BATCH, binary=True, shuffle_seed=1, augment=augment, cache=True)
    uncached = records.image_dataset(files, size, BATCH, binary=True, shuffle_seed=1, augment=augment, cache=False)
    seed_data, seed_steps = seed_batches(view, size, seed=1)

    designs = {
        "stage": lambda: timed_epoch(model, stage),
        "seed_loop": lambda: timed_epoch(model, seed_data, seed_steps),
        "stage_no_cache": lambda: timed_epoch(model, uncached),
    }
    warm = {name: run() for name, run in designs.items()}
    times: dict[str, list[float]] = {name: [] for name in designs}
    for _ in range(args.rounds):
        for name, run in designs.items():
            times[name].append(run())
    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        json.dumps(
            {
                "train_images": n,
                "size": list(size),
                "batch": BATCH,
                "unfreeze_from": args.unfreeze_from,
                "unfrozen_layers_with_weights": len(unfrozen),
                "jit_compile": bool(getattr(model, "jit_compile", False)),
                "first_epoch_s": {k: round(v, 2) for k, v in warm.items()},
                "epoch_s": {k: [round(v, 2) for v in values] for k, values in times.items()},
                "median_epoch_s": {k: round(v, 2) for k, v in median.items()},
                "images_per_s": {k: round(n / v, 1) for k, v in median.items()},
                "seed_loop_over_stage": round(median["seed_loop"] / median["stage"], 3),
                "no_cache_over_stage": round(median["stage_no_cache"] / median["stage"], 3),
            },
            indent=2,
        )
    )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    from components.cli import run_main

    run_main(main)
