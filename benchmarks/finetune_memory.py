"""Peak memory of the finetune stage with its decoded-image cache in memory and on disk, in one script.

    python -m benchmarks.finetune_memory CONVERT_DIR HEAD.keras BASE.keras [--size 160] [--epochs 2]

CONVERT_DIR is a convert stage's output (e.g. the work folder of `benchmarks.extract_throughput`),
HEAD.keras a head trained on that base's features. Runs the stage's command line in a fresh process
twice, the same params: without `--cache` (decoded images kept in memory between epochs) and with
`--cache DIR` (in files there, deleted after the run), and reports each run's peak RSS and wall time,
and whether the two models are the same bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import stage_env, tracked_base

# The stage's command line with its decoded-image cache in memory: since 2026-12-07 the command line never keeps it
# there (without --cache its files go beside the output), so `run` is called without a folder, as a library would.
IN_MEMORY = (
    "import sys; from components import finetune; from components.cli import run_main; real = finetune.run; "
    "finetune.run = lambda *args: real(*args[:-1], None); run_main(finetune.main)"
)


def run_stage(params: Path, convert_dir: Path, head: Path, out: Path, cache: Path | None) -> tuple[float, float]:
    stage = ["-m", "components.finetune"] if cache is not None else ["-c", IN_MEMORY]
    cmd = [sys.executable, *stage, "--params", str(params), "--convert", str(convert_dir)]
    cmd += ["--head", str(head), "--out", str(out / "finetune"), "--live", str(out / "live")]
    if cache is not None:
        cmd += ["--cache", str(cache)]
    code = (
        "import resource,subprocess,sys; r=subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode); "
        "r.returncode and print(r.stderr[-3000:])"
    )
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code, *cmd], capture_output=True, text=True, cwd=params.parent, env=stage_env()
    )
    elapsed = time.perf_counter() - started
    kb, rc = result.stdout.split()[:2]
    if rc != "0":
        raise RuntimeError(result.stdout[-3000:])
    return int(kb) / 1024, elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("convert", type=Path)
    parser.add_argument("head", type=Path)
    parser.add_argument("base", type=Path)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_finetune_memory_"))
    params = work / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "common": {"seed": 1337},
                "conv_base": {
                    "name": None,
                    "path": tracked_base(work, args.base),
                    "weights": "imagenet",
                    "input_size": [args.size, args.size],
                    "pooling": "avg",
                    "layer": None,
                },
                "finetune": {  # presets/real_lite0.yaml's recipe
                    "unfreeze_from": "block11_expand_conv",
                    "unfreeze_top": None,
                    "train_batch_norm": False,
                    "optimizer": "adam",
                    "learning_rate": 5e-5,
                    "epochs": args.epochs,
                    "batch_size": 32,
                    "patience": 4,
                    "cache": True,
                    "keep_better_start": True,
                    "deterministic": True,
                    "augment": {
                        "flip": "horizontal",
                        "rotation": 0.1,
                        "zoom": 0.2,
                        "translation": 0.2,
                        "contrast": 0.0,
                    },
                },
            }
        )
    )
    convert_dir, head = args.convert.resolve(), args.head.resolve()  # the stage runs in `work`
    memory_mb, memory_s = run_stage(params, convert_dir, head, work / "memory", None)
    disk_mb, disk_s = run_stage(params, convert_dir, head, work / "disk", work / "cache")
    summary = json.loads((args.convert / "summary.json").read_text())["records"]
    same = (work / "memory" / "finetune" / "model.keras").read_bytes() == (
        work / "disk" / "finetune" / "model.keras"
    ).read_bytes()
    print(
        json.dumps(
            {
                "images": {"train": summary["train"], "val": summary["val"]},
                "size": args.size,
                "epochs": args.epochs,
                "peak_rss_mb": {"memory_cache": round(memory_mb, 1), "disk_cache": round(disk_mb, 1)},
                "seconds": {"memory_cache": round(memory_s, 1), "disk_cache": round(disk_s, 1)},
                "disk_over_memory_time": round(disk_s / memory_s, 3),
                "same_model_bytes": same,
                "cache_left": sorted(p.name for p in (work / "cache").iterdir()),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
