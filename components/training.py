"""What the training stages (train_head, finetune, quality) share: a seeded, deterministic TensorFlow,
compiling a classifier, the head on the cached features, and logging epochs to dvclive.

Training is bit-reproducible: the same inputs and params give the same weights,
byte for byte (`outputs.save_keras` keeps the saved file's bytes a function of
the weights). That takes a seed for every random draw (weights, shuffling,
augmentation, dropout) and TensorFlow's deterministic kernels. On this CPU
they cost a head epoch nothing and a fine-tuning epoch 14-19%
(`benchmarks/determinism_cost.py`), so finetune has a `deterministic` param.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Literal, Sequence

import keras
import numpy as np
import pydantic
import tensorflow as tf

from components import outputs
from components.params import Section
from pipelines import fingerprint

log = logging.getLogger(__name__)


def trained_on() -> dict:
    """The machine a model is trained on, as far as it decides the model's last bits (the architecture, its
    instruction sets, the cores TensorFlow's kernels split their sums over, the thread and oneDNN settings; and,
    where they are not the defaults, Keras's config from `~/.keras/keras.json` and the GPUs TensorFlow would run
    the kernels on, as the feature cache's namespaces record them: nothing more on a machine without a GPU, so
    the records made before they were named stay as they were): recorded in the training stages' histories, so
    that a rebuild elsewhere can say why its bits differ."""
    return fingerprint.compute_record()


class Diverged(RuntimeError):
    """Training ended with weights, or a validation loss, that are not finite numbers."""

    user_facing = True  # components.cli prints the message and exits 2, no traceback


def finite_or_none(values) -> list[float | None]:
    """An epoch history for JSON: a NaN or infinite loss (a diverged epoch) is null. Written as it was, Python's
    json module put a bare NaN in history.json, which JSON forbids (other languages' readers, and strict ones,
    refuse the file)."""
    return [float(v) if math.isfinite(float(v)) else None for v in values]


def check_converged(model, val_loss: float, val_losses: Sequence[float], stage: str, rate_key: str) -> None:
    """Refuse a model to keep whose weights or validation loss are not finite, before anything is written: a
    diverged run (a learning rate too high, a NaN in the inputs) saved a NaN model with exit 0, which the next
    stages scored (argmax of a NaN row is class 0) and a retrain could register."""
    weights_finite = all(np.isfinite(w).all() for w in model.get_weights())
    if weights_finite and math.isfinite(float(val_loss)):
        return
    epochs = ", ".join(f"{v:.4g}" if math.isfinite(float(v)) else str(float(v)) for v in val_losses)
    what = "validation loss" if weights_finite else "weights"
    raise Diverged(
        f"{stage}: training diverged: the {what} of the model it would keep are not finite (validation loss "
        f"{float(val_loss)}; by epoch: {epochs}), so nothing was written. Lower {rate_key}, or look for NaN or "
        "infinite values in the inputs."
    )


@contextlib.contextmanager
def run_scratch(parent: str | Path, prefix: str, legacy: str | None = None) -> Iterator[Path]:
    """A scratch folder of this run's own under `parent` (`<prefix><pid>-<letters>`), removed when the run ends,
    errors included; killed runs' (which no clean-up reached) are swept first, live runs' never (`outputs.remove_stale`,
    `legacy`: an older release's names)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    outputs.remove_stale(Path(parent), prefix, legacy=legacy)
    scratch = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


ABSENT = ".absent"  # in a run's moved-aside dvclive folder: there was no previous folder to put back


@contextlib.contextmanager
def live_folder(final: str | Path) -> Iterator[Path]:
    """dvclive's folder for a run, written in place, so what a user watches under `dvclive/<stage>` (`dvc plots
    show`, an editor's live plots) is this run's epochs as they come; the previous run's is moved aside first and
    put back if the run fails, so the folder never describes a run whose model was not kept (deleted up front, a
    failed run left its own metrics beside the previous run's model). Enter it outside the model's
    `outputs.staged_dir`, so the model is committed before the previous metrics go, and a failed commit puts them
    back. A killed run's moved-aside folder (its process gone) is put back by the next run before anything else:
    swept, the only copy of the kept model's metrics went, and the killed run's half-written ones were taken for the
    previous run's (what a failure of that next run put back). The one gap is a run killed between its model's
    commit and its own clean-up, two renames apart: its old metrics come back beside its new model."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.prev-"
    for entry in outputs.stale_entries(final.parent, prefix):
        log.warning("%s: a killed run's metrics; putting back the previous run's (%s)", final, entry.name)
        _put_back(entry, final)
    previous = final.parent / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if final.exists() or final.is_symlink():
        os.replace(final, previous)
    else:  # nothing to put back, but a killed run must still be told from a finished one
        previous.mkdir()
        (previous / ABSENT).touch()
    try:
        yield final
    except BaseException:
        _put_back(previous, final)
        raise
    outputs.remove_entry(previous, ignore_errors=True)


def _put_back(previous: Path, final: Path) -> None:
    """`final` as it was before the run that moved it aside to `previous`: that folder, or none."""
    outputs.remove_entry(final, ignore_errors=True)
    if (previous / ABSENT).is_file() and not previous.is_symlink():
        outputs.remove_entry(previous, ignore_errors=True)
    elif previous.exists() or previous.is_symlink():
        os.replace(previous, final)


def make_deterministic(seed: int, ops: bool = True) -> None:
    """Seed Python, NumPy, TensorFlow and Keras, and (with `ops`) make TensorFlow's ops deterministic.

    Op determinism is a process-wide TensorFlow setting (there is no scoped form);
    each stage runs in its own process.
    """
    keras.utils.set_random_seed(seed)
    if ops:
        tf.config.experimental.enable_op_determinism()


def compile_head(model, num_classes: int, optimizer: str, learning_rate: float, weighted: bool = False) -> None:
    """Compile a classifier (a head, or base + head): sigmoid cross-entropy for two classes, else sparse softmax.

    `weighted` (class weights in use): the accuracy weighs each example by its sample weight, as the loss does,
    so a validation set given its class weights (`weighted_by_class`) reports the class-weighted accuracy; without
    sample weights it is the plain accuracy either way."""
    optimizers = {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop, "sgd": keras.optimizers.SGD}
    loss = "binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy"
    metrics = {"weighted_metrics": ["accuracy"]} if weighted else {"metrics": ["accuracy"]}
    # A fixed optimizer name: Keras numbers unnamed ones per process (adam, adam_1, ...), which would
    # make the saved file depend on what ran before in the process.
    model.compile(optimizer=optimizers[optimizer](learning_rate=learning_rate, name=optimizer), loss=loss, **metrics)


def class_weights(counts, mode: str) -> dict[int, float] | None:
    """Per-class loss weights from the training split's class counts: ``balanced`` gives class c the weight
    n / (k * n_c) (scikit-learn's), so every class weighs the same in the loss; ``none``: None (unweighted)."""
    if mode == "none":
        return None
    if mode != "balanced":
        raise ValueError(f"unknown class weighting {mode!r}: none | balanced")
    counts = [int(c) for c in counts]
    empty = [i for i, c in enumerate(counts) if c == 0]
    if empty:
        raise ValueError(f"classes {empty} have no training images: balanced class weights need every class")
    total, k = sum(counts), len(counts)
    return {i: total / (k * c) for i, c in enumerate(counts)}


def weighted_by_class(ds: tf.data.Dataset, weights: dict[int, float] | None) -> tf.data.Dataset:
    """(x, label) batches -> (x, label, weight) with each example's class weight; unchanged without weights.

    Keras applies `class_weight` to the training batches only: the validation loss and accuracy that early
    stopping and the best epoch go by would stay unweighted, so with unbalanced classes the model would be
    chosen on the majority class while it is trained to weigh every class the same. The validation batches
    carry the same weights instead (the accuracy becomes the class-weighted one)."""
    if weights is None:
        return ds
    table = tf.constant([weights[i] for i in range(len(weights))], tf.float32)

    def add(x, label):
        return x, label, tf.gather(table, tf.reshape(tf.cast(label, tf.int32), [-1]))

    return ds.map(add)  # one call at a time: order kept


def live_callback(live):
    """A Keras 3 callback that logs every epoch's metrics to dvclive under Keras's own names.

    Not dvclive's `DVCLiveCallback`: it subclasses `tf.keras.callbacks.Callback`, which is tf_keras
    (not Keras 3) in any process where tensorflow_transform was imported (it sets
    TF_USE_LEGACY_KERAS=1), and it renames the metrics (``val_loss`` -> ``eval/loss``), which would
    move every plot and metric DVC tracks (tests/components/test_train_head.py shows both).
    """

    class LiveLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            for name, value in (logs or {}).items():
                live.log_metric(name, float(value))
            live.next_step()

    return LiveLogger()


class TrainHeadParams(Section):
    hidden_units: int = pydantic.Field(256, ge=0)  # 0: no hidden layer (logistic/softmax regression)
    dropout: float = pydantic.Field(0.5, ge=0.0, lt=1.0)
    optimizer: Literal["adam", "rmsprop", "sgd"] = "adam"
    learning_rate: float = pydantic.Field(1e-3, gt=0.0, le=1.0)
    epochs: int = pydantic.Field(30, ge=1)
    batch_size: int = pydantic.Field(32, ge=1)
    patience: int = pydantic.Field(5, ge=1)
    # balanced: each class's loss weighted n / (k * n_c) over the training split, for unbalanced classes
    class_weight: Literal["none", "balanced"] = "none"


def build_head(feature_size: int, num_classes: int, params: TrainHeadParams):
    """Flat features -> class probabilities: sigmoid for two classes, softmax for more."""
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, the label vocabulary has {num_classes}")
    inputs = keras.Input((feature_size,), name="features")
    x = inputs
    if params.hidden_units:
        x = keras.layers.Dense(params.hidden_units, activation="relu", name="hidden")(x)
    if params.dropout:
        x = keras.layers.Dropout(params.dropout, name="dropout")(x)
    if num_classes == 2:
        outputs_ = keras.layers.Dense(1, activation="sigmoid", name="probability")(x)
    else:
        outputs_ = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs_, name="head")
