"""Calibrating `quality.near_duplicate_threshold` on real photos: the feature cosine between a photo and its
resized, re-encoded and cropped copies (which download's pixel hash cannot catch) against the cosine between
distinct photos of the same set.

    python -m benchmarks.near_duplicate_threshold ../shared/data/cats_vs_dogs_2000 \\
        ../shared/models/efficientnet_lite0_imagenet_notop.keras --per-class 150 --size 224

For each of the first N photos of every class (sorted names) it makes, with Pillow: a half-size copy, a JPEG
re-encoding at quality 50, a 90% centre crop, and a horizontal flip (a different picture for a classifier:
reported, not a copy). Features: the pipeline's decode and resize, the base, average pooling. Prints, per copy
kind, the lowest and median cosine to its original, and for distinct photos the highest cosine and the number of
pairs at or above each candidate threshold: the threshold should sit below every copy and above (nearly) every
distinct pair.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

COPIES = ("half_size", "jpeg_q50", "crop_90", "flipped")


def variants(data: bytes) -> dict[str, bytes]:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    out = {}

    def encode(image, quality=90):
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()

    out["half_size"] = encode(img.resize((max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.LANCZOS))
    out["jpeg_q50"] = encode(img, quality=50)
    dx, dy = img.width // 20, img.height // 20
    out["crop_90"] = encode(img.crop((dx, dy, img.width - dx, img.height - dy)))
    out["flipped"] = encode(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="class sub-folders of photos")
    parser.add_argument("base", type=Path, help="a saved .keras conv base (raw RGB 0..255 in)")
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--thresholds", default="0.85,0.88,0.9,0.93,0.95,0.97")
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    from pipelines import image
    from pipelines.near_duplicates import unit_rows

    base = keras.saving.load_model(args.base, compile=False)
    pooled = keras.Model(base.input, keras.layers.GlobalAveragePooling2D()(base.output))
    files = [
        path
        for folder in sorted(p for p in args.folder.iterdir() if p.is_dir())
        for path in sorted(folder.glob("*.jpg"))[: args.per_class]
    ]
    started = time.perf_counter()
    originals, copies = [], {kind: [] for kind in COPIES}
    for path in files:
        data = path.read_bytes()
        originals.append(data)
        for kind, blob in variants(data).items():
            copies[kind].append(blob)

    def features(blobs):
        rows = []
        for start in range(0, len(blobs), 32):
            batch = tf.stack(
                [image.decode_and_resize(tf.constant(b), (args.size, args.size)) for b in blobs[start : start + 32]]
            )
            rows.append(pooled.predict_on_batch(batch))
        return unit_rows(np.concatenate(rows))

    base_units = features(originals)
    thresholds = [float(x) for x in args.thresholds.split(",")]
    print(f"{len(files)} photos from {args.folder}, base {args.base.name} at {args.size}")
    for kind in COPIES:
        cos = np.sum(base_units * features(copies[kind]), axis=1)
        found = ", ".join(f"{t}: {np.mean(cos >= t):.1%}" for t in thresholds)
        print(f"  {kind:10s} copies found at threshold {found}")
        print(
            f"  {kind:10s} cosine to its original: min {cos.min():.4f}, 1st pct {np.percentile(cos, 1):.4f}, median {np.median(cos):.4f}"
        )
    sims = base_units @ base_units.T
    distinct = sims[np.triu_indices(len(files), k=1)]
    print(
        f"  distinct photos ({len(distinct)} pairs): max {distinct.max():.4f}, 99.99th pct {np.percentile(distinct, 99.99):.4f}, median {np.median(distinct):.4f}"
    )
    for t in thresholds:
        print(f"  threshold {t}: distinct pairs at or above {int(np.sum(distinct >= t))}")
    order = np.argsort(-distinct)[:5]
    rows, cols = np.triu_indices(len(files), k=1)
    for k in order:
        print(
            f"    {distinct[k]:.4f} {files[rows[k]].relative_to(args.folder)} ~ {files[cols[k]].relative_to(args.folder)}"
        )
    print(f"  {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
