"""finetune stage: the conv base plus the trained head, top of the base unfrozen, trained on augmented images.

Inputs
    the convert stage's folder (``records/``, ``labels.json``), the train_head
    stage's ``head.keras``; params.yaml sections ``common`` (seed), ``conv_base``
    (the same base extract used) and ``finetune``.
Outputs
    ``<out>/model.keras``    the fine-tuned classifier: raw RGB 0..255 pixels in,
                             class probabilities out (sigmoid for two classes)
    ``<out>/history.json``   per-epoch loss and accuracy on train and val, best
                             epoch (0: no epoch beat the starting point), the unfrozen layers
    ``<out>/params.json``    the resolved params
    ``<live>/``              dvclive metrics and per-epoch curves

Run: ``python -m components.finetune --convert data/convert --head data/train_head/head.keras
--weights data/base_weights --out data/finetune --live dvclive/finetune --cache .cache/finetune``
(without ``--cache`` the decoded-image cache files go beside the output, never in memory)

The method (keras.io transfer-learning guide; Deep Learning with Python, ch. 5):
fine-tune only after the head has converged on the frozen features, so start
from train_head's weights; unfreeze only the top of the base; keep batch norm in
inference mode (the base is called with ``training=False``); recompile after
changing ``trainable``; a very low learning rate; augmentation on the training
split only, in the input pipeline, so every epoch sees new variants; early
stopping on val (`finetune.monitor`: the val loss, or the val accuracy and then the
loss) with the best weights restored, where the starting point
(the trained head on the frozen base) counts as epoch 0: fine-tuning that neither
matches nor beats it on val keeps it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Iterator, Literal, Sequence

import keras
import pydantic
from dvclive import Live

from components import outputs, training
from components.cli import configure_logging, run_main
from components.conv_base import ConvBaseParams, build_extractor, check_tracked, imagenet_from
from components.params import CommonParams, ParamsError, Section, log_resolved, read_params, section, write_resolved
from pipelines import bases, classifier, record_checks, records

log = logging.getLogger(__name__)

MODEL = "model.keras"
HISTORY = "history.json"
DECLARED_OUTPUTS = (MODEL, HISTORY, "params.json")


class AugmentParams(Section):
    flip: Literal["none", "horizontal", "vertical", "both"] = "horizontal"
    rotation: float = pydantic.Field(0.1, ge=0.0, le=0.5)  # fraction of a full turn (0.1: up to 36 degrees)
    zoom: float = pydantic.Field(0.2, ge=0.0, lt=1.0)  # up to this fraction in or out
    translation: float = pydantic.Field(0.2, ge=0.0, le=1.0)  # fraction of height / width
    contrast: float = pydantic.Field(0.0, ge=0.0, le=1.0)


class FinetuneParams(Section):
    # The first layer of the base to train; null: the registry's top block
    # (vgg16: block5_conv1). Or unfreeze_top: the top N layers of the base.
    unfreeze_from: str | None = pydantic.Field(None, min_length=1)  # "" would mean the default, silently
    unfreeze_top: int | None = pydantic.Field(None, ge=1)
    train_batch_norm: bool = False  # scale/offset of unfrozen BN layers; their statistics never move
    optimizer: Literal["adam", "rmsprop", "sgd"] = "rmsprop"
    learning_rate: float = pydantic.Field(1e-5, gt=0.0, le=1.0)
    epochs: int = pydantic.Field(20, ge=1)
    batch_size: int = pydantic.Field(32, ge=1)
    patience: int = pydantic.Field(4, ge=1)
    # Decode the images once and keep the (pre-augmentation) pixels between epochs: in files with --cache
    # (memory flat in the dataset size), else in memory (H x W x 3 x 4 bytes an image). Each epoch is a new
    # seeded permutation of the whole training split whatever the cache (pipelines/records.image_dataset).
    cache: bool = True
    # What picks the best epoch (early stopping, restored weights, keep_better_start): val loss, or val
    # accuracy (ties: the lower val loss) where a small val set's loss follows confidence more than errors.
    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"
    # balanced: each class's loss weighted n / (k * n_c) over the training split (convert's summary.json)
    class_weight: Literal["none", "balanced"] = "none"
    keep_better_start: bool = True  # no epoch beats the starting point on the monitor: keep the starting weights
    # TensorFlow's deterministic ops: bit-reproducible models (`audit --rebuild`) for 14-19% more time an
    # epoch on the real-data preset (benchmarks/determinism_cost.py); false trades that for speed.
    deterministic: bool = True
    augment: AugmentParams = AugmentParams()

    @pydantic.model_validator(mode="after")
    def _one_point(self) -> "FinetuneParams":
        if self.unfreeze_from and self.unfreeze_top:
            raise ValueError("set at most one of unfreeze_from and unfreeze_top")
        return self


@dataclasses.dataclass(frozen=True)
class Config:
    common: CommonParams
    conv_base: ConvBaseParams
    finetune: FinetuneParams

    def sections(self) -> dict[str, Section]:
        return {"common": self.common, "conv_base": self.conv_base, "finetune": self.finetune}


def load_config(params_path: str | Path) -> Config:
    data = read_params(params_path)
    config = Config(
        common=section(data, CommonParams, "common", params_path),
        conv_base=section(data, ConvBaseParams, "conv_base", params_path),
        finetune=section(data, FinetuneParams, "finetune", params_path),
    )
    check_unfreeze_point(config.conv_base, config.finetune)
    return config


def check_unfreeze_point(conv_base: ConvBaseParams, params: FinetuneParams) -> None:
    """A saved or tapped base has no default unfreeze point: refused with the params (`tools.preset`, `tools.sweep`
    and `tools.data_fixes` validate through here before any stage runs; a plain `dvc repro` or `dvc exp run -S`
    still runs the stages before finetune, which then stops at its start, before building the model)."""
    reason = no_default_unfreeze_point(conv_base)
    if reason and not params.unfreeze_from and params.unfreeze_top is None:
        raise ParamsError(f"finetune.unfreeze_from: {reason}; set unfreeze_from to a layer name or unfreeze_top")


def no_default_unfreeze_point(conv_base: ConvBaseParams) -> str | None:
    """Why the base has no registry default to unfreeze from (a saved base, a tapped one), or None."""
    if not conv_base.name:
        return "a saved base (conv_base.path) has no registry default"
    if conv_base.layer:
        spec = bases.REGISTRY.get(conv_base.name)  # an unknown name is the base's own error, not a KeyError here
        default = f" ({spec.top_block})" if spec else ""
        return (
            f"the base is tapped at conv_base.layer={conv_base.layer!r}, so {conv_base.name}'s default{default} "
            "need not lie below the tap"
        )
    return None


def build_augmentation(params: AugmentParams, seed: int):
    """A batch of float32 pixels -> randomly flipped/rotated/zoomed/translated pixels (training only).

    Keras preprocessing layers, run in the tf.data pipeline on the training split
    after the decode cache, so each epoch draws new variants; None when every
    strength is zero.
    """
    layers = []
    if params.flip in ("horizontal", "vertical"):
        layers.append(keras.layers.RandomFlip(params.flip, seed=seed))
    elif params.flip == "both":
        # Two draws: Keras's "horizontal_and_vertical" draws one per image for both axes, so an image was kept or
        # turned a half turn, never mirrored alone (the views tta.flip: both averages over)
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
        layers.append(keras.layers.RandomFlip("vertical", seed=seed + 5))
    if params.rotation:
        layers.append(keras.layers.RandomRotation(params.rotation, fill_mode="reflect", seed=seed + 1))
    if params.zoom:
        layers.append(keras.layers.RandomZoom(params.zoom, fill_mode="reflect", seed=seed + 2))
    if params.translation:
        layers.append(
            keras.layers.RandomTranslation(params.translation, params.translation, fill_mode="reflect", seed=seed + 3)
        )
    if params.contrast:
        layers.append(keras.layers.RandomContrast(params.contrast, value_range=(0, 255), seed=seed + 4))
    if not layers:
        return None
    pipeline = keras.Sequential(layers, name="augmentation")

    def augment(pixels):
        return pipeline(pixels, training=True)

    return augment


class BestEpoch(keras.callbacks.Callback):
    """Keeps the weights of the best epoch on val: the lowest loss, or the highest accuracy and then the lowest loss.

    ``start``: (val loss, val accuracy) before training, epoch 0, which an epoch must match or beat to be
    kept; None: the best trained epoch whatever the start. Among trained epochs the earlier wins a tie.
    ``patience``: stop after this many epochs in a row without a better trained epoch, by the same rule
    (Keras' EarlyStopping on val_accuracy alone would stop while lower losses at the same accuracy still
    improve the epoch this keeps); with val_loss it stops where EarlyStopping does.
    """

    def __init__(self, monitor: str, start: tuple[float, float] | None, patience: int | None = None):
        super().__init__()
        self.monitor = monitor
        self.best = None if start is None else self.key(*start)
        self.epoch = 0
        self.weights = None
        self.patience = patience
        self.trained_best, self.trained_epoch = None, 0

    def key(self, loss: float, accuracy: float) -> tuple[float, ...]:
        # NaN (a diverged epoch) is worse than any number: compared as NaN, nothing was ever below it, so a NaN
        # first epoch stayed the best for good
        loss = math.inf if math.isnan(loss) else loss
        accuracy = -math.inf if math.isnan(accuracy) else accuracy
        return (loss,) if self.monitor == "val_loss" else (-accuracy, loss)

    def on_train_begin(self, logs=None):
        self.weights = self.model.get_weights()

    def on_epoch_end(self, epoch, logs=None):
        key = self.key(float(logs["val_loss"]), float(logs["val_accuracy"]))
        if self.best is None or key < self.best or (self.epoch == 0 and key == self.best):
            self.best, self.epoch, self.weights = key, epoch + 1, self.model.get_weights()
        if self.trained_best is None or key < self.trained_best:
            self.trained_best, self.trained_epoch = key, epoch + 1
        if self.patience is not None and epoch + 1 - self.trained_epoch >= self.patience:
            self.model.stop_training = True


def build_classifier(conv_base: ConvBaseParams, head_path: str | Path):
    """The conv base (fresh from its params, as extract built it) plus the trained head."""
    head = keras.saving.load_model(head_path, compile=False)
    extractor = build_extractor(conv_base)
    return classifier.assemble(extractor, head)


def prepare_for_finetuning(model, conv_base: ConvBaseParams, params: FinetuneParams) -> list[str]:
    """Unfreeze the top of the base (errors name the param); returns the trainable layers of the base."""
    base = classifier.find_base(model)
    no_default = no_default_unfreeze_point(conv_base)
    default = None if no_default else bases.REGISTRY[conv_base.name].top_block
    try:
        why = {"no_default": no_default} if no_default else {}  # the registry's default otherwise
        start = classifier.unfreeze_index(base, params.unfreeze_from, params.unfreeze_top, default, **why)
    except classifier.UnfreezeError as exc:
        raise ParamsError(f"finetune.{exc}") from None
    return classifier.unfreeze(model, start, params.train_batch_norm)


def run(
    config: Config,
    convert_dir: str | Path,
    head_path: str | Path,
    out_dir: str | Path,
    live_dir: str | Path,
    cache_dir: str | Path | None = None,
) -> dict:
    """Fine-tune; with `cache_dir` the decoded images are cached in files there for this run (deleted after),
    else in memory (float32 pixels: 307 KB an image at 160)."""
    with decoded_image_cache(config.finetune.cache, cache_dir) as cache:
        return _run(config, convert_dir, head_path, out_dir, live_dir, cache)


@contextlib.contextmanager
def decoded_image_cache(enabled: bool, cache_dir: str | Path | None) -> Iterator[dict[str, bool | str]]:
    """`records.image_dataset`'s `cache` per split: off, in memory, or files in a per-run folder of `cache_dir`."""
    if not enabled or cache_dir is None:
        yield {"train": enabled, "val": enabled}
        return
    # killed runs' caches, and older releases' (named without a process id); live runs' stay
    with training.run_scratch(cache_dir, "finetune-", legacy=outputs.MKDTEMP_LEGACY) as scratch:
        yield {split: str(scratch / split) for split in ("train", "val")}


def _run(config: Config, convert_dir, head_path, out_dir, live_dir, cache: dict) -> dict:
    convert_dir = Path(convert_dir)
    labels = json.loads((convert_dir / "labels.json").read_text(encoding="utf-8"))
    num_classes, params, size = len(labels), config.finetune, tuple(config.conv_base.input_size)
    files = {split: records.split_files(convert_dir / "records", split) for split in ("train", "val")}
    summary = json.loads((convert_dir / "summary.json").read_text(encoding="utf-8"))
    for split in ("train", "val"):  # before the model is built: a label past labels.json trained without a word
        record_checks.check_record_labels(files[split], num_classes, f"finetune: the {split} records")
    weights = training.class_weights([summary["per_class"]["train"].get(n, 0) for n in labels], params.class_weight)
    # Before the build: loading the head (and a base) creates its dropout layers' seed generators, which
    # draw their seeds from the global random state when they are made; seeded after the build, they
    # differed from process to process and so did every fine-tuned model (an untrained base's own init
    # is seeded per weight, pipelines/bases.seeded_initialisation, whatever the global state).
    training.make_deterministic(config.common.seed, ops=params.deterministic)
    model = build_classifier(config.conv_base, head_path)
    if int(model.output_shape[-1]) != (1 if num_classes == 2 else num_classes):
        raise ValueError(f"the head's output {model.output_shape} does not fit the {num_classes} labels of labels.json")
    unfrozen = prepare_for_finetuning(model, config.conv_base, params)
    # after changing trainable
    training.compile_head(model, num_classes, params.optimizer, params.learning_rate, weights is not None)
    log.info(
        "finetune: %d trainable weights in %d unfrozen base layers (%s .. %s)",
        len(model.trainable_weights),
        len(unfrozen),
        unfrozen[0] if unfrozen else "-",
        unfrozen[-1] if unfrozen else "-",
    )
    binary = num_classes == 2
    with (
        contextlib.ExitStack() as opened,  # the datasets' files and decoded pixels, freed when training is done
        training.live_folder(live_dir) as live_path,  # as it was if the run fails, the model's commit included
        outputs.staged_dir(out_dir) as tmp,
        Live(dir=str(live_path), save_dvc_exp=False, dvcyaml=None) as live,
    ):
        train = records.image_dataset(
            files["train"],
            size,
            params.batch_size,
            binary=binary,
            shuffle_seed=config.common.seed,
            augment=build_augmentation(params.augment, config.common.seed),
            cache=cache["train"],
            resources=opened,
        )
        val = records.image_dataset(
            files["val"], size, params.batch_size, binary=binary, cache=cache["val"], resources=opened
        )
        val = training.weighted_by_class(val, weights)  # the best epoch weighs the classes as training does
        before_loss, before_accuracy = model.evaluate(val, verbose=0)
        start = (before_loss, before_accuracy) if params.keep_better_start else None
        best = BestEpoch(params.monitor, start, params.patience)  # also stops early, by the same rule
        started = time.monotonic()
        history = model.fit(
            train,
            validation_data=val,
            epochs=params.epochs,
            class_weight=weights,
            callbacks=[best, training.live_callback(live)],
            verbose=2,
        )
        elapsed = time.monotonic() - started
        best_epoch = best.epoch
        model.set_weights(best.weights)
        if best_epoch == 0:
            # No epoch beat the converged head on val: BestEpoch kept the starting point (epoch 0)
            # rather than a worse model.
            log.warning(
                "finetune: no epoch improved %s (start: loss %.4f, accuracy %.4f); keeping the starting weights",
                params.monitor,
                before_loss,
                before_accuracy,
            )
        val_loss, val_accuracy = model.evaluate(val, verbose=0)
        training.check_converged(model, val_loss, history.history["val_loss"], "finetune", "finetune.learning_rate")
        live.summary = {"val_loss": float(val_loss), "val_accuracy": float(val_accuracy), "best_epoch": best_epoch}
        outputs.save_keras(model, tmp / MODEL)
        record = {
            "epochs_run": len(history.history["loss"]),
            "trained_on": training.trained_on(),  # a rebuild on another machine type names the difference
            "best_epoch": best_epoch,
            "val_before": {"loss": float(before_loss), "accuracy": float(before_accuracy)},
            "val_loss": float(val_loss),
            "val_accuracy": float(val_accuracy),
            "unfrozen_layers": unfrozen,
            "labels": labels,
            "class_weight": None if weights is None else {labels[i]: w for i, w in weights.items()},
            "input_size": list(size),
            "history": {k: training.finite_or_none(values) for k, values in history.history.items()},
        }
        if weights is not None:  # val loss and accuracy weighted by class, as the training loss; no key unweighted,
            record["val_weighted"] = True  # so unweighted runs write the bytes they always did
        (tmp / HISTORY).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        write_resolved(tmp, config.sections())
        outputs.require_outputs(tmp, DECLARED_OUTPUTS)
    log.info(
        "finetune: val accuracy %.4f -> %.4f, val loss %.4f -> %.4f (best epoch %d, %.1f s/epoch)",
        before_accuracy,
        val_accuracy,
        before_loss,
        val_loss,
        best_epoch,
        elapsed / record["epochs_run"],
    )
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (sections common, conv_base, finetune)")
    parser.add_argument("--convert", required=True, help="the convert stage's output folder")
    parser.add_argument("--head", required=True, help="the train_head stage's head.keras")
    parser.add_argument(
        "--weights", help="the base_weights stage's folder: the file `conv_base.weights: imagenet` loads"
    )
    parser.add_argument("--out", required=True, help="output folder (declared in dvc.yaml)")
    parser.add_argument("--live", required=True, help="dvclive folder (metrics and plots, declared in dvc.yaml)")
    parser.add_argument(
        "--cache",
        default=None,
        help="a folder for this run's decoded-image cache files (default: a hidden folder beside the output, "
        "removed after; in memory only when `run` is called without one)",
    )
    args = parser.parse_args(argv)
    configure_logging()
    config = load_config(args.params)
    check_tracked(config.conv_base)
    if args.weights:  # the versioned ImageNet weights, not Keras's download cache
        config = dataclasses.replace(config, conv_base=imagenet_from(config.conv_base, args.weights))
    log_resolved("finetune", config.sections())
    # never in memory from the command line (307 KB an image at 160: it grew with the dataset): without a folder
    # (dvc.yaml names .cache/finetune), one of its own beside the output, removed after if empty; never the output's
    # parent itself, where sweeping killed runs' scratch folders would take a user's `finetune-<anything>` with them
    out = Path(args.out).resolve()
    cache = Path(args.cache) if args.cache is not None else out.parent / f".{out.name}.image_cache"
    try:
        run(config, args.convert, args.head, args.out, args.live, cache)
    finally:
        if args.cache is None:
            with contextlib.suppress(OSError):  # another run's scratch in it, or never made
                cache.rmdir()
    return 0


if __name__ == "__main__":
    run_main(main)
