"""Benchmark: `dvc repro` after new images arrive, with the feature cache, against a cold extraction.

    python -m benchmarks.incremental_extract ../shared/data/cats_vs_dogs_2000 \
        ../shared/models/efficientnet_lite0_imagenet_notop.keras [--new 100] [--work DIR]

In one script, on a temporary git + DVC copy of the project on the real-data
preset (the folder's images copied in, the saved base in ``models/``):
  1. cold: ``dvc repro -s`` download, convert, extract on the original images;
  2. N new images arrive (mirrored, cropped copies of N originals: new content,
     half per class), then ``dvc repro -s`` download, convert, extract again;
     the feature cache in ``.cache/extract`` serves the rest;
  3. the cold reference on the same images: the cache deleted, ``dvc repro -f -s extract``.
Each step is timed as the wall time of its `dvc` command, and the extract
stage's own seconds (``metrics/extract.json``: Beam pipeline, without Python and
TensorFlow start) are read too. Prints the times, the warm/cold ratios, and
whether the warm and cold outputs have the same DVC hash. Training stages are not
run: they retrain on all images whatever the cache does.
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

import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = (
    "components",
    "pipelines",
    "tools",
    "presets",
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
    ".gitignore",
    ".dvc/config",
    ".dvc/.gitignore",
    "tfds_data",
)


def env() -> dict[str, str]:
    e = dict(os.environ, DVC_NO_ANALYTICS="1", TF_CPP_MIN_LOG_LEVEL="2")
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e.update(
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@example.com",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@example.com",
    )
    return e


def sh(cmd: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def dvc(*args: str, cwd: Path) -> float:
    return sh([sys.executable, "-m", "dvc", *args], cwd)


def make_project(work: Path, images: Path | None, base: Path, changes: dict | None = None) -> Path:
    """A git copy of the project on the real-data preset with `base` in ``models/``, the `images` folder
    copied to ``images/`` (None: the caller fills it), and `changes` merged into the params."""
    from tools import preset

    project = work / "project"
    project.mkdir(parents=True)
    for name in PROJECT_FILES:
        src, dst = REPO / name, project / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    if images is not None:
        shutil.copytree(images, project / "images")
    (project / "models").mkdir(exist_ok=True)
    shutil.copy2(base, project / "models" / base.name)
    overrides = yaml.safe_load((REPO / "presets" / "real_lite0.yaml").read_text())
    overrides.pop("inputs", None)  # the images and the base are copied in below
    overrides["dataset"]["dir"] = "images"
    overrides["conv_base"]["path"] = f"models/{base.name}"
    params = preset.merge(preset.merge(yaml.safe_load((project / "params.yaml").read_text()), overrides), changes or {})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with (project / ".gitignore").open("a") as handle:
        handle.write("/images/\n/models/*.keras\n")
    sh(["git", "init", "-q"], project)
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-qm", "real preset"], project)
    # extract's input from the base_weights stage (a record only, for a saved base): made once, not timed
    dvc("repro", "--single-item", "base_weights", cwd=project)
    return project


def add_images(project: Path, count: int) -> int:
    """`count` new images: mirrored, 90%-cropped copies of existing ones (new bytes, same classes)."""
    from PIL import Image, ImageOps

    classes = sorted(p for p in (project / "images").iterdir() if p.is_dir())
    originals = {folder: sorted(folder.glob("*.jpg")) for folder in classes}  # before any new file is written
    added = 0
    for i in range(count):
        folder = classes[i % len(classes)]
        source = originals[folder][i // len(classes)]
        with Image.open(source) as img:
            img = ImageOps.mirror(img.convert("RGB"))
            w, h = img.size
            img = img.crop((w // 20, h // 20, w - w // 20, h - h // 20))
            img.save(folder / f"arrived_{i:04d}.jpg", quality=90)
        added += 1
    return added


def extract_run(project: Path) -> dict:
    return json.loads((project / "metrics" / "extract.json").read_text())


def extract_hash(project: Path) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"]["extract"]["outs"] if o["path"] == "data/extract")


def data_stages(project: Path, force: bool = False) -> dict[str, float]:
    """Wall time of `dvc repro -s` per data stage; `force`: extract alone, re-run (`-f`)."""
    stages = ("extract",) if force else ("download", "convert", "extract")
    return {stage: dvc("repro", *(["-f"] if force else []), "-s", stage, cwd=project) for stage in stages}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path, help="a class-per-folder image folder")
    parser.add_argument("base", type=Path, help="a saved .keras conv base")
    parser.add_argument("--new", type=int, default=100)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_incremental_"))
    project = make_project(work, args.images.resolve(), args.base.resolve())

    cold = data_stages(project)
    cold_run = extract_run(project)
    added = add_images(project, args.new)
    warm = data_stages(project)
    warm_run = extract_run(project)
    if warm_run["images"] != cold_run["images"] + added:
        raise SystemExit(
            f"download kept {warm_run['images'] - cold_run['images']} of the {added} new images (see its quarantine)"
        )
    warm_hash = extract_hash(project)
    shutil.rmtree(project / ".cache" / "extract")
    reference = data_stages(project, force=True)
    reference_run = extract_run(project)
    same = extract_hash(project) == warm_hash

    result = {
        "images_before": cold_run["images"],
        "images_added": added,
        "images_after": warm_run["images"],
        "cold_2000": {"stage_wall_s": cold, "extract_stage_s": cold_run["seconds"], "computed": cold_run["computed"]},
        "warm_after_new": {
            "stage_wall_s": warm,
            "extract_stage_s": warm_run["seconds"],
            "computed": warm_run["computed"],
            "from_cache": warm_run["from_cache"],
        },
        "cold_reference_same_images": {
            "extract_wall_s": reference["extract"],
            "extract_stage_s": reference_run["seconds"],
            "computed": reference_run["computed"],
        },
        "warm_output_equals_cold": same,
        "ratio_extract_wall_warm_over_cold": round(warm["extract"] / reference["extract"], 3),
        "ratio_extract_stage_warm_over_cold": round(warm_run["seconds"] / reference_run["seconds"], 3),
        "ratio_data_stages_wall_warm_over_cold": round(
            sum(warm.values()) / (sum(cold.values()) - cold["extract"] + reference["extract"]), 3
        ),
    }
    print(json.dumps(result, indent=2))
    print(
        f"extract after +{added} images: {warm['extract']:.1f}s wall ({warm_run['seconds']:.1f}s in the stage), "
        f"cold on the same {warm_run['images']}: {reference['extract']:.1f}s wall ({reference_run['seconds']:.1f}s in the stage): "
        f"{result['ratio_extract_wall_warm_over_cold']:.3f}x wall, {result['ratio_extract_stage_warm_over_cold']:.3f}x in-stage; "
        f"outputs identical: {same}"
    )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
