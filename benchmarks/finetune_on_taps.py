"""Fine-tuning on concatenated taps: the head on the pooled features of several layers of the base (the seeds'
other reuse pattern), then base + head fine-tuned with the project's recipe, scored on val (test only reported).

    python -m benchmarks.finetune_on_taps top_relu+block10_add --out /tmp/taps

Run it in a project whose pipeline has run once (`data/convert`, `params.yaml`: for example after
``python -m tools.preset presets/real_flowers.yaml --run``); it reads the params' `conv_base`, `train_head`,
`finetune` and `common` sections. The extractor is the stage's (the saved base, its preprocessing, in inference
mode) with every tap average-pooled and concatenated; the head is `benchmarks.head_on_taps.fit_head` (train_head's
layers and params, early stopping on val loss); fine-tuning is `components.finetune.run` itself with that
extractor in place of the stage's (`build_extractor`), so the unfreeze point, augmentation, learning rate, epochs
and best-epoch rule are the preset's. It prints the head's and the fine-tuned model's val and test accuracy, the
latter with and without both flips (`tta.flip: both`). The pipeline taps one layer (`conv_base.layer`); this
measures whether a concatenated tap would pay for being built in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import keras
import numpy as np

from benchmarks.head_on_taps import fit_head
from components import finetune, train_head, training
from pipelines import bases, records
from pipelines.bases import InferenceMode


def concatenated_extractor(taps: list[str], size: tuple[int, int]):
    """A `conv_base.build_extractor` whose features are the average-pooled outputs of `taps`, concatenated."""

    def build(params, imagenet_weights_sha256=None):
        base, preprocessing = bases.load_conv_base(params.name, params.path, params.weights, params.input_size)
        tapped = keras.Model(base.inputs, [base.get_layer(t).output for t in taps], name=base.name)
        tapped.trainable = False
        inputs = keras.Input((*size, 3), name="image")
        x = preprocessing(inputs) if preprocessing is not None else inputs
        maps = InferenceMode(tapped, name="conv_base")(x)
        maps = maps if isinstance(maps, (list, tuple)) else [maps]
        pooled = [keras.layers.GlobalAveragePooling2D(name=f"avg_pool_{i}")(m) for i, m in enumerate(maps)]
        features = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name="taps")(pooled)
        model = keras.Model(inputs, features, name="feature_extractor")
        model.trainable = False
        return model

    return build


def scored(model, files: list[str], size, binary: bool) -> tuple[int, int, int]:
    """(correct without TTA, correct with both flips, images)."""
    plain = flipped = total = 0
    for pixels, label in records.image_dataset(files, size, 32, binary=False):
        x, y = np.asarray(pixels), label.numpy()
        views = [np.asarray(model.predict_on_batch(v)) for v in (x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1])]
        pick = (lambda p: (p[:, 0] > 0.5).astype(int)) if binary else (lambda p: p.argmax(axis=1))
        plain += int(np.sum(pick(views[0]) == y))
        flipped += int(np.sum(pick(sum(views) / 4) == y))
        total += len(y)
    return plain, flipped, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("taps", help="layer names joined by +, e.g. top_relu+block10_add")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--convert", default="data/convert")
    parser.add_argument("--out", required=True, help="a scratch folder for the head and the fine-tuned model")
    args = parser.parse_args()
    taps, out, convert = args.taps.split("+"), Path(args.out), Path(args.convert)
    out.mkdir(parents=True, exist_ok=True)
    config = finetune.load_config(args.params)
    head_params = train_head.load_config(args.params).train_head
    size = tuple(config.conv_base.input_size)
    names = json.loads((convert / "labels.json").read_text(encoding="utf-8"))
    binary = len(names) == 2
    build = concatenated_extractor(taps, size)
    files = {split: records.split_files(convert / "records", split) for split in ("train", "val", "test")}
    training.make_deterministic(config.common.seed, ops=False)
    extractor = build(config.conv_base)
    data = {}
    for split, split_files in files.items():
        xs, ys = [], []
        for pixels, label in records.image_dataset(split_files, size, 32, binary=False):
            xs.append(np.asarray(extractor.predict_on_batch(pixels)))
            ys.append(label.numpy())
        data[split] = (np.concatenate(xs), np.concatenate(ys))
    head = fit_head(data["train"], data["val"], len(names), config.common.seed, head_params)
    for split in ("val", "test"):
        p = head.predict(data[split][0], verbose=0)
        predicted = (p[:, 0] > 0.5).astype(int) if binary else p.argmax(axis=1)
        correct = int(np.sum(predicted == data[split][1]))
        print(f"head on {args.taps} ({data[split][0].shape[1]} features): {split} {correct}/{len(predicted)}")
    head.save(out / "head.keras")
    finetune.build_extractor = build  # the stage's fine-tuning, with this extractor
    record = finetune.run(config, convert, out / "head.keras", out / "finetune", out / "dvclive")
    model = keras.saving.load_model(out / "finetune" / "model.keras", compile=False)
    print(f"fine-tuned: best epoch {record['best_epoch']} of {record['epochs_run']}")
    for split in ("val", "test"):
        plain, flipped, total = scored(model, files[split], size, binary)
        print(
            f"fine-tuned {split}: {plain}/{total} ({plain / total:.2%}), both flips {flipped}/{total} ({flipped / total:.2%})"
        )


if __name__ == "__main__":
    main()
