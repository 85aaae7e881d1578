"""Which layer of a conv base to read features from: a head trained on pooled features of each tap, and of taps
concatenated, ranked on the val split (test only reported).

    python -m benchmarks.head_on_taps data/convert models/efficientnet_lite0_imagenet_notop.keras \\
        --size 224 --taps top_relu block15_project_bn block14_add top_relu+block15_project_bn

The convert folder is a convert stage's output (``records/``, ``labels.json``): run the pipeline once on the data
(for example ``python -m tools.preset presets/real_flowers.yaml --run``). The base runs once over every image with
all the tapped layers as outputs, each average-pooled; for each tap set, the project's head
(``train_head.build_head``, seeded, early stopping on val loss with the best weights) is trained on train and
scored on val and test. ``a+b`` is the concatenation of two taps' pooled features (the seeds' other reuse pattern).
Pipeline figures come from ``dvc exp run -S conv_base.layer=...``; this script only compares taps side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import keras
import numpy as np

from components import train_head, training
from pipelines import records


def pooled_features(base, layers: list[str], files: list[str], size, batch_size: int):
    """(labels, {layer: [n, channels] average-pooled features}) over the records in file order."""
    outputs = [keras.layers.GlobalAveragePooling2D()(base.get_layer(name).output) for name in layers]
    model = keras.Model(base.inputs, outputs)
    labels, found = [], {name: [] for name in layers}
    for pixels, label in records.image_dataset(files, size, batch_size, binary=False):
        labels.append(label.numpy())
        values = model.predict_on_batch(pixels)
        for name, value in zip(layers, values if len(layers) > 1 else [values]):
            found[name].append(np.asarray(value))
    return np.concatenate(labels), {name: np.concatenate(v) for name, v in found.items()}


def fit_head(train, val, num_classes: int, seed: int, params: train_head.TrainHeadParams):
    (x, y), (vx, vy) = train, val
    training.make_deterministic(seed, ops=False)
    head = train_head.build_head(x.shape[1], num_classes, params)
    training.compile_head(head, num_classes, params.optimizer, params.learning_rate)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=params.patience, restore_best_weights=True)
    target = (lambda v: v.astype(np.float32)) if num_classes == 2 else (lambda v: v)
    head.fit(
        x,
        target(y),
        validation_data=(vx, target(vy)),
        epochs=params.epochs,
        batch_size=params.batch_size,
        callbacks=[stop],
        verbose=0,
        shuffle=True,
    )
    return head


def accuracy(head, x, y, num_classes: int) -> float:
    p = head.predict(x, verbose=0)
    predicted = (p[:, 0] > 0.5).astype(int) if num_classes == 2 else p.argmax(axis=1)
    return float(np.mean(predicted == y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("convert", help="a convert stage's output folder")
    parser.add_argument("base", help="a saved .keras conv base (raw RGB 0..255 in)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--taps", nargs="+", default=["top_relu"], help="layer names; a+b concatenates two")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--hidden-units", type=int, default=0)
    parser.add_argument("--dropout", type=float, default=0.2)
    args = parser.parse_args()

    convert = Path(args.convert)
    names = json.loads((convert / "labels.json").read_text(encoding="utf-8"))
    base = keras.saving.load_model(args.base, compile=False)
    layers = sorted({layer for tap in args.taps for layer in tap.split("+")})
    size = (args.size, args.size)
    data, started = {}, time.perf_counter()
    for split in ("train", "val", "test"):
        data[split] = pooled_features(
            base, layers, records.split_files(convert / "records", split), size, args.batch_size
        )
    print(
        f"features of {sum(len(d[0]) for d in data.values())} images at {args.size} in {time.perf_counter() - started:.1f} s"
    )
    params = train_head.TrainHeadParams(
        hidden_units=args.hidden_units, dropout=args.dropout, epochs=60, patience=8, learning_rate=1e-3
    )
    rows = []
    for tap in args.taps:
        parts = tap.split("+")
        x = {split: np.concatenate([data[split][1][p] for p in parts], axis=1) for split in data}
        y = {split: data[split][0] for split in data}
        head = fit_head((x["train"], y["train"]), (x["val"], y["val"]), len(names), args.seed, params)
        rows.append(
            (
                tap,
                x["train"].shape[1],
                accuracy(head, x["val"], y["val"], len(names)),
                accuracy(head, x["test"], y["test"], len(names)),
            )
        )
    rows.sort(key=lambda r: -r[2])
    print(
        f"{'taps':44s} {'features':>8s} {'val':>7s} {'test':>7s}   (ranked on val; n = {len(y['val'])}, {len(y['test'])})"
    )
    for tap, width, val, test in rows:
        print(f"{tap:44s} {width:8d} {val:7.2%} {test:7.2%}")


if __name__ == "__main__":
    main()
