"""train_head stage: a dense classifier trained on the cached features of the frozen conv base.

Inputs
    the extract stage's folder (``features/``, ``features.json``), the convert
    stage's ``labels.json``; params.yaml sections ``common`` (seed) and ``train_head``.
Outputs
    ``<out>/head.keras``     the head (flat features in; sigmoid for two classes,
                             softmax for more)
    ``<out>/history.json``   per-epoch loss and accuracy on train and val, best epoch
    ``<out>/params.json``    the resolved params
    ``<live>/``              dvclive metrics and per-epoch curves (``dvc metrics show``,
                             ``dvc plots show``)

Run: ``python -m components.train_head --extract data/extract --labels data/convert/labels.json
--out data/train_head --live dvclive/train_head``

Validation on the val split every epoch, early stopping with best-weights
restore, a fixed seed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import keras
import tensorflow as tf
from dvclive import Live

from components import outputs, training
from components.cli import configure_logging, run_main
from components.params import CommonParams, Section, log_resolved, read_params, section, write_resolved
from components.training import TrainHeadParams, build_head
from pipelines import features as fk
from pipelines import record_checks, records

log = logging.getLogger(__name__)

HEAD = "head.keras"
HISTORY = "history.json"
DECLARED_OUTPUTS = (HEAD, HISTORY, "params.json")


@dataclasses.dataclass(frozen=True)
class Config:
    common: CommonParams
    train_head: TrainHeadParams

    def sections(self) -> dict[str, Section]:
        return {"common": self.common, "train_head": self.train_head}


def load_config(params_path: str | Path) -> Config:
    data = read_params(params_path)
    return Config(
        common=section(data, CommonParams, "common", params_path),
        train_head=section(data, TrainHeadParams, "train_head", params_path),
    )


def feature_dataset(
    files: list[str],
    feature_size: int,
    num_classes: int,
    batch_size: int,
    shuffle_seed: int | None,
    *,
    resources: contextlib.ExitStack | None = None,
):
    """(features, label) batches; labels float for the sigmoid head. Each epoch reads the records from the
    files again (a new seeded permutation of all of them with `shuffle_seed`): memory does not grow with the
    number of images. `resources` closes the files when it exits (`records.serialized_batches`)."""

    def parse(serialized):
        ex = tf.io.parse_example(serialized, fk.features_feature_spec(feature_size))
        label = ex[fk.LABEL]
        return ex[fk.FEATURES], tf.cast(label, tf.float32) if num_classes == 2 else label

    ds = records.serialized_batches(files, batch_size, shuffle_seed, resources=resources)
    return ds.map(parse, num_parallel_calls=2, deterministic=True).prefetch(2)


def check_labels(files: list[str], num_classes: int, split: str = "train") -> list[int]:
    """Every label must index the vocabulary (a clear error instead of a NaN loss); the count of each class (the
    feature records' labels read as finetune reads the image records', `record_checks.check_record_labels`)."""
    return record_checks.check_record_labels(files, num_classes, f"train_head: the {split} features").tolist()


class FiniteEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's EarlyStopping (the best weights restored at the end), except that a NaN (diverged) epoch is never an
    improvement: Keras took a NaN first epoch as the best (nothing compares below NaN), stopped after `patience`
    epochs that were improving and kept the NaN weights, while `best_epoch_of` named another epoch. Finite losses
    stop and restore exactly as Keras's does."""

    def _is_improvement(self, monitor_value, reference_value):
        if monitor_value is None or not math.isfinite(float(monitor_value)):
            return False  # so the best (the reference) is never NaN either
        return super()._is_improvement(monitor_value, reference_value)


def best_epoch_of(val_losses: list[float]) -> int:
    """The index of the lowest val loss, the earliest on a tie; a NaN (diverged) epoch is never the best, as for
    EarlyStopping, whose weights the stage keeps (compared as NaN, nothing was below a NaN first epoch, so the
    record and quality's epoch count said epoch 1)."""
    return int(min(range(len(val_losses)), key=lambda i: (math.isnan(val_losses[i]), val_losses[i])))


def run(
    config: Config, extract_dir: str | Path, labels_path: str | Path, out_dir: str | Path, live_dir: str | Path
) -> dict:
    extract_dir = Path(extract_dir)
    meta = json.loads((extract_dir / "features.json").read_text())
    labels = json.loads(Path(labels_path).read_text(encoding="utf-8"))
    size, num_classes, params = int(meta["feature_size"]), len(labels), config.train_head
    files = {split: records.split_files(extract_dir / "features", split) for split in ("train", "val")}
    counts = {split: check_labels(names, num_classes, split) for split, names in files.items()}
    if not sum(counts["val"]):  # the best epoch is chosen on val: no records, nothing to choose on
        raise ValueError(f"train_head: the val split of {extract_dir} has no records: re-run download and extract")
    weights = training.class_weights(counts["train"], params.class_weight)
    training.make_deterministic(config.common.seed)
    head = build_head(size, num_classes, params)
    training.compile_head(head, num_classes, params.optimizer, params.learning_rate, weights is not None)
    with (
        contextlib.ExitStack() as opened,  # the datasets' files, closed when training is done
        training.live_folder(live_dir) as live_path,  # as it was if the run fails, the model's commit included
        outputs.staged_dir(out_dir) as tmp,
        Live(dir=str(live_path), save_dvc_exp=False, dvcyaml=None) as live,
    ):
        seed = config.common.seed
        train = feature_dataset(files["train"], size, num_classes, params.batch_size, seed, resources=opened)
        val = feature_dataset(files["val"], size, num_classes, params.batch_size, None, resources=opened)
        val = training.weighted_by_class(val, weights)  # the best epoch weighs the classes as training does
        stop = FiniteEarlyStopping(monitor="val_loss", patience=params.patience, restore_best_weights=True)
        history = head.fit(
            train,
            validation_data=val,
            epochs=params.epochs,
            class_weight=weights,
            callbacks=[stop, training.live_callback(live)],
            verbose=2,
        )
        val_loss, val_accuracy = head.evaluate(val, verbose=0)
        training.check_converged(head, val_loss, history.history["val_loss"], "train_head", "train_head.learning_rate")
        best_epoch = best_epoch_of(history.history["val_loss"])
        live.summary = {"val_loss": float(val_loss), "val_accuracy": float(val_accuracy), "best_epoch": best_epoch + 1}
        outputs.save_keras(head, tmp / HEAD)
        record = {
            "epochs_run": len(history.history["loss"]),
            "trained_on": training.trained_on(),  # a rebuild on another machine type names the difference
            "best_epoch": best_epoch + 1,
            "val_loss": float(val_loss),
            "val_accuracy": float(val_accuracy),
            "labels": labels,
            "class_weight": None if weights is None else {labels[i]: w for i, w in weights.items()},
            "feature_size": size,
            "history": {k: training.finite_or_none(values) for k, values in history.history.items()},
        }
        if weights is not None:  # val loss and accuracy weighted by class, as the training loss; no key unweighted,
            record["val_weighted"] = True  # so unweighted runs write the bytes they always did
        (tmp / HISTORY).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        write_resolved(tmp, config.sections())
        outputs.require_outputs(tmp, DECLARED_OUTPUTS)
    log.info("train_head: val accuracy %.4f, val loss %.4f (best epoch %d)", val_accuracy, val_loss, best_epoch + 1)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (sections common, train_head)")
    parser.add_argument("--extract", required=True, help="the extract stage's output folder")
    parser.add_argument("--labels", required=True, help="the convert stage's labels.json")
    parser.add_argument("--out", required=True, help="output folder (declared in dvc.yaml)")
    parser.add_argument("--live", required=True, help="dvclive folder (metrics and plots, declared in dvc.yaml)")
    args = parser.parse_args(argv)
    configure_logging()
    config = load_config(args.params)
    log_resolved("train_head", config.sections())
    run(config, args.extract, args.labels, args.out, args.live)
    return 0


if __name__ == "__main__":
    run_main(main)
