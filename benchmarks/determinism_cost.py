"""Benchmark: what TensorFlow's deterministic ops cost a fine-tuning epoch and a head epoch.

    python -m benchmarks.determinism_cost ../shared/data/cats_vs_dogs_2000 \
        ../shared/models/efficientnet_lite0_imagenet_notop.keras [--rounds 2]

Op determinism is a process-wide TensorFlow setting, so each measurement runs
in a child process of this script: the same model (the base plus a logistic
head, blocks from `--unfreeze-from` up unfrozen, as the real-data preset
fine-tunes) trains on the same records through the finetune stage's own input
pipeline, with `components.training.make_deterministic` (deterministic) or
only the seed (default kernels). Children alternate, deterministic first, so
load drifts hit both alike. Each child runs one warm-up epoch (tracing, cache
fill), then `--epochs` timed ones. Also times train_head's epoch on the
extracted features. Prints the median seconds per epoch and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 32


def child(work: Path, base_path: Path, size: int, unfreeze_from: str, deterministic: bool, epochs: int) -> dict:
    from benchmarks.finetune_epoch import preset_model
    from components import finetune, train_head, training
    from pipelines import records

    training.make_deterministic(1, ops=deterministic)
    model, params, _ = preset_model(base_path, (size, size), work / "head.keras", unfreeze_from)
    files = records.split_files(work / "convert" / "records", "train")
    data = records.image_dataset(
        files,
        (size, size),
        BATCH,
        binary=True,
        shuffle_seed=1,
        augment=finetune.build_augmentation(params.augment, seed=1),
        cache=True,
    )
    model.fit(data, epochs=1, verbose=0)  # warm-up: tracing and the cache fill
    finetune_s = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.fit(data, epochs=1, verbose=0)
        finetune_s.append(time.perf_counter() - started)

    meta = json.loads((work / "extract" / "features.json").read_text())
    head = train_head.build_head(
        int(meta["feature_size"]), 2, train_head.TrainHeadParams(hidden_units=256, dropout=0.5)
    )
    training.compile_head(head, 2, "adam", 1e-3)
    features = train_head.feature_dataset(
        records.split_files(work / "extract" / "features", "train"), int(meta["feature_size"]), 2, BATCH, shuffle_seed=1
    )
    head.fit(features, epochs=1, verbose=0)
    head_s = []
    for _ in range(epochs):
        started = time.perf_counter()
        head.fit(features, epochs=1, verbose=0)
        head_s.append(time.perf_counter() - started)
    return {"finetune_s": finetune_s, "head_s": head_s}


def main(argv=None) -> int:
    from benchmarks.finetune_epoch import add_common_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per child")
    parser.add_argument("--child", choices=["deterministic", "default"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.child:
        result = child(
            args.work, args.base.resolve(), args.size, args.unfreeze_from, args.child == "deterministic", args.epochs
        )
        print("RESULT " + json.dumps(result))
        return 0

    from benchmarks.extract_throughput import prepare
    from components import conv_base, extract, train_head

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_determinism_"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "convert").exists():
        prepare(args.folder, work)
    base = conv_base.ConvBaseParams(
        name=None, path=str(args.base.resolve()), input_size=(args.size, args.size), pooling="avg"
    )
    if not (work / "extract").exists():
        extract.run(extract.Config(base, extract.ExtractParams(batch_size=BATCH)), work / "convert", work / "extract")
    train_head.build_head(1280, 2, train_head.TrainHeadParams(hidden_units=0, dropout=0.2)).save(work / "head.keras")

    runs: dict[str, list[dict]] = {"deterministic": [], "default": []}
    for _ in range(args.rounds):
        for mode in runs:
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.determinism_cost",
                str(args.folder),
                str(args.base),
                "--child",
                mode,
                "--work",
                str(work),
                "--size",
                str(args.size),
                "--unfreeze-from",
                args.unfreeze_from,
                "--epochs",
                str(args.epochs),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    median = {
        mode: {part: statistics.median(s for r in results for s in r[part]) for part in ("finetune_s", "head_s")}
        for mode, results in runs.items()
    }
    print(
        json.dumps(
            {
                "size": args.size,
                "batch": BATCH,
                "unfreeze_from": args.unfreeze_from,
                "rounds": args.rounds,
                "epochs_per_child": args.epochs,
                "epoch_s": {
                    mode: {part: [round(s, 2) for r in results for s in r[part]] for part in ("finetune_s", "head_s")}
                    for mode, results in runs.items()
                },
                "median_epoch_s": {mode: {k: round(v, 3) for k, v in m.items()} for mode, m in median.items()},
                "deterministic_over_default": {
                    part: round(median["deterministic"][part] / median["default"][part], 3)
                    for part in ("finetune_s", "head_s")
                },
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
