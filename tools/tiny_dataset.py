"""Generate a tiny class-folder dataset (coloured noise, one colour per class) for the tiny preset.

Run: ``python -m tools.tiny_dataset --out tiny_data [--per-class 12] [--classes cats dogs]``

Not a DVC stage: it makes the source folder that ``presets/tiny.yaml`` points
``dataset.dir`` at, so the whole pipeline runs on a CPU in a minute or two.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

CLASS_COLORS = {"cats": (200, 60, 40), "dogs": (40, 60, 200), "birds": (40, 180, 60)}
# other class names take these, by their position: every class its own colour, so there is something to learn
OTHER_COLORS = ((200, 200, 40), (40, 200, 200), (200, 40, 200), (120, 120, 120), (230, 140, 30), (30, 90, 60))


def image_array(seed: int, color=(128, 128, 128), size=(24, 32)) -> np.ndarray:
    """A small noisy image around `color`; distinct seeds give distinct images."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-50, 50, (size[0], size[1], 3))
    return np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def class_color(position: int, name: str) -> tuple[int, int, int]:
    """A class's colour: its own for the named classes, then the table by position, then (past the table: 7 or
    more classes, where the table repeated, so two classes could not be told apart) a colour of a wheel of hues,
    a different one for every position."""
    if name in CLASS_COLORS:
        return CLASS_COLORS[name]
    if position < len(OTHER_COLORS):
        return OTHER_COLORS[position]
    import colorsys

    hue = (position * 0.6180339887) % 1.0  # the golden ratio: hues spread, none repeats
    value = 0.9 if position % 2 else 0.6
    return tuple(int(round(255 * x)) for x in colorsys.hsv_to_rgb(hue, 0.8, value))


def make_class_folder(root: Path, per_class: int = 6, classes=("cats", "dogs"), start: int = 0, size=(24, 32)) -> Path:
    """root/<class>/<class>_<i>.jpg with distinct, class-coloured JPEGs."""
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names repeat: {list(classes)} (each class is one folder)")
    for c, name in enumerate(classes):
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            color = class_color(c, name)
            (folder / f"{name}_{i}.jpg").write_bytes(jpeg(image_array(1000 * c + i, color, size)))
    return Path(root)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--classes", nargs="+", default=["cats", "dogs"])
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error(f"--per-class: {args.per_class}: one image a class or more")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        # another run's images stayed beside these (other classes, more images): not the dataset this run printed
        parser.error(f"--out: {args.out} exists and is not an empty folder; remove it or choose another")
    try:
        make_class_folder(args.out, args.per_class, tuple(args.classes), size=(48, 48))
    except ValueError as exc:  # repeated class names, refused before anything is written
        parser.error(f"--classes: {exc}")
    print(f"wrote {args.per_class * len(args.classes)} images under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
