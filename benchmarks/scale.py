"""Scale benchmark: `dvc repro` of the real-data preset (one fine-tuning epoch) at N images and at 10x N,
per stage: wall time, images/s and peak RSS; then +1% new images and the incremental repro per stage.

    python -m benchmarks.scale ../shared/data/cats_vs_dogs_2000 \\
        ../shared/models/efficientnet_lite0_imagenet_notop.keras --sizes 2500 25000 [--size 160] [--work DIR]
        [--stages K]   # the first K stages only (3: download, convert, extract)

For each N, N distinct images are generated from the real photos, deterministically: image i is photo
i mod P (P photos, sorted) under variant i div P: a crop (90-100% of each side, its offset from the
variant), a mirror on odd variants, a resize of the long side to 200-320 px and a JPEG quality of 70-95:
distinct bytes and pixels, the source's label. A project copy (git + DVC, the preset's params with
`finetune.epochs: 1`, `quality.near_duplicate_threshold: 0.999` so the variants of one photo are not all
listed as pairs) runs each stage alone with `dvc repro --single-item`, inside a fresh Python process whose
RUSAGE_CHILDREN max RSS is the stage's peak (the largest of dvc and the stage's own process). Then 1% new
images (new variants) are added and every stage runs again.

Prints a table per N, the ratios the issue's targets name (peak RSS and seconds per image at the larger N
against the smaller), and the incremental download + convert + extract as a fraction of their cold time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import incremental_extract
from benchmarks.incremental_extract import env

STAGES = ("download", "convert", "extract", "train_head", "quality", "finetune", "evaluate", "export")
MEASURE = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": proc.returncode, "seconds": time.perf_counter() - started,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "tail": (proc.stdout + proc.stderr)[-3000:]}))
"""


def variant(source: Path, k: int, out: Path) -> None:
    from PIL import Image, ImageOps

    with Image.open(source) as img:
        img = img.convert("RGB")
        w, h = img.size
        keep = 0.90 + 0.10 * ((k * 7) % 11) / 10  # 90-100% of each side
        cw, ch = max(16, int(w * keep)), max(16, int(h * keep))
        x, y = ((k * 13) % 5) * (w - cw) // 4, ((k * 17) % 5) * (h - ch) // 4
        img = img.crop((x, y, x + cw, y + ch))
        if k % 2:
            img = ImageOps.mirror(img)
        side = 200 + (k * 37) % 121  # long side 200-320 px
        scale = side / max(img.size)
        img = img.resize((max(16, round(img.width * scale)), max(16, round(img.height * scale))))
        img.save(out, format="JPEG", quality=70 + (k * 5) % 26)


def generate(photos: list[tuple[Path, str]], start: int, stop: int, folder: Path) -> None:
    for i in range(start, stop):
        source, label = photos[i % len(photos)]
        k = i // len(photos)
        (folder / label).mkdir(parents=True, exist_ok=True)
        variant(source, k, folder / label / f"{source.stem}_v{k:03d}.jpg")


def make_project(work: Path, base: Path, size: int) -> Path:
    """The real-data preset at `size`, one fine-tuning epoch, the images generated into it afterwards."""
    changes = {
        "conv_base": {"input_size": [size, size]},
        "finetune": {"epochs": 1},
        "quality": {"near_duplicate_threshold": 0.999},
    }
    return incremental_extract.make_project(work, None, base, changes)


def run_stage(project: Path, stage: str) -> dict:
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    result = json.loads(subprocess.run(cmd, cwd=project, env=env(), capture_output=True, text=True).stdout)
    if result["rc"] != 0:
        raise SystemExit(f"dvc repro -s {stage} failed:\n{result['tail']}")
    return result


def run_all(project: Path, images: int, label: str, stages: tuple[str, ...] = STAGES) -> dict[str, dict]:
    rows = {}
    for stage in stages:
        r = run_stage(project, stage)
        rows[stage] = {
            "seconds": r["seconds"],
            "peak_rss_mb": r["peak_rss_mb"],
            "per_image_ms": 1e3 * r["seconds"] / images,
        }
        print(
            f"  {label:>12s} {stage:10s} {r['seconds']:8.1f} s {images / r['seconds']:8.1f} img/s "
            f"{r['peak_rss_mb']:8.0f} MB peak",
            flush=True,
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="a class-per-folder folder of real photos")
    parser.add_argument("base", type=Path, help="a saved .keras conv base")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 25000])
    parser.add_argument("--size", type=int, default=160, help="the base's input size")
    parser.add_argument("--work", type=Path)
    parser.add_argument(
        "--stages", type=int, default=len(STAGES), help=f"run the first K stages only ({', '.join(STAGES)})"
    )
    args = parser.parse_args(argv)
    if not 3 <= args.stages <= len(STAGES):
        parser.error(f"--stages takes 3 to {len(STAGES)}: download, convert and extract at least")
    stages = STAGES[: args.stages]
    photos = [
        (path, folder.name)
        for folder in sorted(p for p in args.photos.iterdir() if p.is_dir())
        for path in sorted(folder.glob("*.jpg"))
    ]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    results = {}
    for n in args.sizes:
        project = make_project(work / str(n), args.base.resolve(), args.size)
        started = time.perf_counter()
        generate(photos, 0, n, project / "images")
        print(f"N = {n}: generated in {time.perf_counter() - started:.1f} s under {project / 'images'}", flush=True)
        cold = run_all(project, n, f"{n} cold", stages)
        extra = max(1, n // 100)
        generate(photos, n, n + extra, project / "images")
        warm = run_all(project, n + extra, f"+{extra} new", stages)
        data = ("download", "convert", "extract")
        fraction = sum(warm[s]["seconds"] for s in data) / sum(cold[s]["seconds"] for s in data)
        print(f"  +1% images: download + convert + extract took {fraction:.2f}x their cold time", flush=True)
        results[n] = {"cold": cold, "incremental": warm, "incremental_fraction": fraction}
    if len(args.sizes) >= 2:
        small, large = min(args.sizes), max(args.sizes)
        print(f"ratios at {large} against {small}: peak RSS, seconds per image")
        for stage in stages:
            a, b = results[small]["cold"][stage], results[large]["cold"][stage]
            print(
                f"  {stage:10s} RSS {b['peak_rss_mb'] / a['peak_rss_mb']:5.2f}x   "
                f"per image {b['per_image_ms'] / a['per_image_ms']:5.2f}x"
            )
    (work / "scale.json").write_text(json.dumps(results, indent=2))
    print(f"results: {work / 'scale.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
