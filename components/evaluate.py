"""evaluate stage: val and test metrics and plots of the head-only and the fine-tuned model, and Grad-CAM.

Inputs
    the convert stage's folder (test ``records/``, ``labels.json``), the extract
    stage's folder (test features), train_head's ``head.keras``, finetune's
    ``model.keras``, download's ``manifest.jsonl`` (source file names); params.yaml
    section ``evaluate``. The test split was never trained or tuned on.
Outputs (the serving model is the export stage's)
    ``<report>/metrics.json``      per model and split (``val``, ``test``): accuracy,
                                   loss, per-class precision / recall / F1, macro
                                   F1, ROC-AUC (DVC metrics); the sweep and the
                                   retrain gate choose on ``val``, ``test`` reports
    ``<report>/plots/``            confusion rows, ROC and precision-recall curves
                                   per model (DVC plots)
    ``<report>/gradcam/``          Grad-CAM overlays (PNG) of correct and wrong test
                                   images of the fine-tuned model (DVC image plots)
    ``<report>/misclassified.json`` every wrong test prediction of each model, with
                                   its probabilities and source file
    ``<report>/params.json``       the resolved params

Run: ``python -m components.evaluate --convert data/convert --extract data/extract
--head data/train_head/head.keras --model data/finetune/model.keras
--manifest data/download/manifest.jsonl --report evaluation``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Literal, Sequence

import keras
import numpy as np
import pydantic
import tensorflow as tf
from PIL import Image

import pipelines.bases  # noqa: F401 - registers the preprocessing layer the saved model uses
from components import outputs
from components.cli import configure_logging, run_main
from components.manifest import rows_of
from components.params import Section, TtaParams, log_resolved, read_params, section, write_resolved
from components.stats import wilson_interval
from pipelines import cache_lock, classifier, record_checks, records, runtimes, serving

log = logging.getLogger(__name__)

REPORT_OUTPUTS = ("metrics.json", "misclassified.json", "plots", "gradcam", "params.json")
MODELS = ("head", "finetune")


class EvaluateParams(Section):
    batch_size: int = pydantic.Field(32, ge=1)
    gradcam_correct: int = pydantic.Field(3, ge=0)  # Grad-CAM overlays of correctly classified test images
    gradcam_wrong: int = pydantic.Field(3, ge=0)  # ... and of misclassified ones (the most confident first)
    gradcam_per_class: int = pydantic.Field(1, ge=0)  # ... and of the most confident right ones of each class
    runtime: Literal["tensorflow", "openvino"] = "tensorflow"  # what scores both models (Grad-CAM: TensorFlow)
    most_confused: int = pydantic.Field(5, ge=0)  # the (actual, predicted) class pairs listed, most errors first
    bootstrap: int = pydantic.Field(1000, ge=0)  # resamples of the test images for macro F1's interval (0: none)


@dataclasses.dataclass(frozen=True)
class Config:
    evaluate: EvaluateParams
    tta: TtaParams = TtaParams()  # the fine-tuned model's test-time augmentation (export serves the same)

    def sections(self) -> dict[str, Section]:
        return {"evaluate": self.evaluate, "tta": self.tta}


def load_config(params_path: str | Path) -> Config:
    data = read_params(params_path)
    return Config(
        evaluate=section(data, EvaluateParams, "evaluate", params_path),
        tta=section(data, TtaParams, "tta", params_path),
    )


# ---- metrics: pure functions of labels and probabilities -------------------------------------


def as_probabilities(outputs: np.ndarray) -> np.ndarray:
    """Model outputs -> [n, classes] float64 (a sigmoid's [n, 1] becomes [1 - p, p]), as the serving model gives them."""
    return np.asarray(serving.probabilities_of(np.asarray(outputs, dtype=np.float64)), dtype=np.float64)


def log_loss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, eps, 1.0))))


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: actual class; columns: predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def per_class_scores(matrix: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Precision, recall, F1 and support per class (0 where one is undefined, as scikit-learn's `zero_division=0`); a
    class the split lacks and the model never predicts is no evidence either way, as in `macro_f1_of`: its precision,
    recall and F1 are None (null), not a 0 that reads as a failure on it."""
    scores = {}
    for i, name in enumerate(names):
        tp, predicted, actual = matrix[i, i], matrix[:, i].sum(), matrix[i, :].sum()
        if not predicted and not actual:
            scores[name] = {"precision": None, "recall": None, "f1": None, "support": 0}
            continue
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(actual)}
    return scores


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, threshold) at every distinct score, from (0, 0)."""
    tps, fps, thresholds = _cumulative_counts(positive, scores)
    tpr = tps / tps[-1] if tps[-1] else np.zeros_like(tps, dtype=float)
    fpr = fps / fps[-1] if fps[-1] else np.zeros_like(fps, dtype=float)
    return np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[np.inf, thresholds]


def precision_recall_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, threshold) at every distinct score, highest threshold first."""
    tps, fps, thresholds = _cumulative_counts(positive, scores)
    precision = tps / (tps + fps)
    recall = tps / tps[-1] if tps[-1] else np.zeros_like(tps, dtype=float)
    return precision, recall, thresholds


def _cumulative_counts(positive: np.ndarray, scores: np.ndarray):
    positive = np.asarray(positive).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # ties share one threshold
    tps = np.cumsum(positive)[last_of_each].astype(float)
    fps = (last_of_each + 1 - tps).astype(float)
    return tps, fps, scores[last_of_each]


def auc(x: np.ndarray, y: np.ndarray) -> float:
    """Area under a curve by the trapezoidal rule (x ascending)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float | None:
    """Two classes: the AUC of the positive (second) class; more: the macro one-vs-rest AUC. None if undefined."""
    num_classes = probabilities.shape[1]
    classes = [1] if num_classes == 2 else range(num_classes)
    areas = []
    for c in classes:
        positive = labels == c
        if positive.all() or not positive.any():
            return None
        fpr, tpr, _ = roc_curve(positive, probabilities[:, c])
        areas.append(auc(fpr, tpr))
    return float(np.mean(areas))


def macro_f1_of(matrix: np.ndarray, classes: np.ndarray | None = None) -> float:
    """Macro F1 from a confusion matrix, over the classes present or predicted (scikit-learn's `average="macro"`):
    a class of the vocabulary that the split lacks and the model never predicts is no evidence either way, so it
    neither scores 0 nor counts (with it, a perfect model on a split without one of 3 classes scored 0.667).
    `classes` (a bool mask) fixes the classes averaged over, as a bootstrap resample must (a class one scores is
    then 0 where that resample has none of it, as scikit-learn's fixed `labels=` with `zero_division=0`)."""
    tp = np.diag(matrix).astype(np.float64)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    denominator = predicted + actual
    seen = denominator > 0 if classes is None else np.asarray(classes, dtype=bool)
    if not seen.any():
        return 0.0
    scores = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(scores[seen].mean())


def bootstrap_interval(
    labels: np.ndarray, predicted: np.ndarray, num_classes: int, resamples: int, seed: int = 0
) -> tuple[float, float] | None:
    """A 95% percentile-bootstrap interval of macro F1 (a fixed generator: the same bytes), stratified and over fixed
    classes: each resample draws each class's images from that class's, as many as the split has, and scores the
    classes the whole split scores (present or predicted). Resampling the images regardless of class, a resample
    that drew no image of a rare class the model gets wrong (or none of those predicted as a class the split lacks)
    scored over the other classes only, and the interval's upper end (0.995 against a macro F1 of 0.790 with a
    2-image class in 402) was a figure the model never reached."""
    if resamples == 0 or len(labels) == 0:
        return None
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    full = confusion_matrix(labels, predicted, num_classes)
    classes = (full.sum(axis=0) + full.sum(axis=1)) > 0
    order = np.argsort(labels, kind="stable")  # the images class by class
    counts = np.bincount(labels, minlength=num_classes)
    sizes = counts[labels[order]]  # each position's class: its size and where its images start in `order` ...
    starts = (np.cumsum(counts) - counts)[labels[order]]
    rng = np.random.default_rng(seed)
    scores = np.empty(resamples)
    for r in range(resamples):  # ... and one draw a position: an image of the same class
        pick = order[starts + np.floor(rng.random(len(labels)) * sizes).astype(np.int64)]
        scores[r] = macro_f1_of(confusion_matrix(labels[pick], predicted[pick], num_classes), classes)
    low, high = np.percentile(scores, [2.5, 97.5])
    return float(low), float(high)


def most_confused(matrix: np.ndarray, names: Sequence[str], top: int) -> list[dict]:
    """The (actual, predicted) pairs with errors, most first (ties by class order)."""
    pairs = [(int(matrix[a, p]), a, p) for a in range(len(names)) for p in range(len(names)) if a != p and matrix[a, p]]
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    support = matrix.sum(axis=1)
    return [
        {"actual": names[a], "predicted": names[p], "count": n, "of_actual": float(n / support[a])}
        for n, a, p in pairs[:top]
    ]


def classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray, names: Sequence[str], *, confused: int = 5, resamples: int = 1000
) -> dict:
    """Accuracy with its 95% Wilson interval, loss, macro F1 with a 95% bootstrap interval, ROC-AUC, per-class
    precision / recall / F1, the confusion matrix and the most confused class pairs."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(labels, predicted, len(names))
    per_class = per_class_scores(matrix, names)
    accuracy_low, accuracy_high = wilson_interval(int(np.sum(predicted == labels)), len(labels))
    f1_interval = bootstrap_interval(labels, predicted, len(names), resamples)
    metrics = {
        "images": int(len(labels)),
        "accuracy": float(np.mean(predicted == labels)),
        "accuracy_low": accuracy_low,  # 95% interval (Wilson)
        "accuracy_high": accuracy_high,
        "loss": log_loss(labels, probabilities),
        "macro_f1": macro_f1_of(matrix),  # over the classes present or predicted (per_class lists them all)
        "macro_f1_low": None if f1_interval is None else f1_interval[0],  # 95% interval (bootstrap)
        "macro_f1_high": None if f1_interval is None else f1_interval[1],
        "roc_auc": roc_auc(labels, probabilities),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),  # rows the actual class, columns the predicted, in this order:
        "confusion_classes": list(names),
        "most_confused": most_confused(matrix, names, confused),
    }
    return metrics


def curve_rows(labels: np.ndarray, probabilities: np.ndarray) -> tuple[list[dict], list[dict]]:
    """ROC and precision-recall rows for DVC plots: the positive class for two classes, micro one-vs-rest for more.
    No rows where a curve is undefined, in a two-class split holding one class only: the ROC without negatives or
    positives (as `roc_auc` is None), the precision-recall curve without positives (its recall is 0 of 0); such rows
    drew a line of zeros, a model that finds no positives, for images that hold none to find."""
    num_classes = probabilities.shape[1]
    if num_classes == 2:
        positive, scores = labels == 1, probabilities[:, 1]
    else:
        positive = (np.arange(num_classes)[None, :] == labels[:, None]).ravel()
        scores = probabilities.ravel()
    roc, pr = [], []
    if positive.any() and not positive.all():
        fpr, tpr, roc_thresholds = roc_curve(positive, scores)
        roc = [
            {"fpr": float(f), "tpr": float(t), "threshold": _finite(th)} for f, t, th in zip(fpr, tpr, roc_thresholds)
        ]
    if positive.any():
        precision, recall, pr_thresholds = precision_recall_curve(positive, scores)
        pr = [
            {"recall": float(r), "precision": float(p), "threshold": float(th)}
            for p, r, th in zip(precision, recall, pr_thresholds)
        ]
    return roc, pr


def _finite(value: float) -> float | None:
    """A threshold for JSON: the curve's (0, 0) start, which no score reaches (its threshold is above every score),
    is null; written 1.0, it read as a threshold that a probability of 1.0 meets, at a point that score does not
    give."""
    return None if not np.isfinite(value) else float(value)


def confusion_rows(labels: np.ndarray, probabilities: np.ndarray, names: Sequence[str]) -> list[dict]:
    return [{"actual": names[a], "predicted": names[p]} for a, p in zip(labels, probabilities.argmax(axis=1))]


def per_class_rows(metrics: dict) -> list[dict]:
    """One row a class (precision, recall, F1, support) from classification_metrics: a DVC bar plot. A class with no
    figures (none in the split, none predicted) has no bar, rather than a 0 one."""
    return [{"class": name, **values} for name, values in metrics["per_class"].items() if values["f1"] is not None]


def with_sources(wrong: list[dict], manifest_path: str | Path) -> list[dict]:
    """The misclassified rows with each image's source file (`file`; None for an id the manifest lacks), from the
    manifest's rows of those images only, read a line at a time: memory holds the mistakes' rows, never the
    whole manifest (about 1 KB an image, every split's)."""
    sources = {i: row["source"] for i, row in rows_of(manifest_path, {row["id"] for row in wrong}).items()}
    return [{**row, "file": sources.get(row["id"])} for row in wrong]


def misclassified(model: str, ids, labels, probabilities, names) -> list[dict]:
    rows = []
    for record_id, label, probs in zip(ids, labels, probabilities):
        predicted = int(np.argmax(probs))
        if predicted != label:
            rows.append(
                {
                    "model": model,
                    "id": record_id,
                    "file": None,  # with_sources
                    "actual": names[label],
                    "predicted": names[predicted],
                    "probabilities": {n: round(float(p), 6) for n, p in zip(names, probs)},
                }
            )
    return sorted(rows, key=lambda r: -max(r["probabilities"].values()))


def pick_gradcam(ids, labels, probabilities, correct: int, wrong: int, per_class: int = 0) -> list[tuple[str, bool]]:
    """The first `correct` right predictions (id order), the `wrong` most confident wrong ones, and the
    `per_class` most confident right ones of each class not already picked (class order)."""
    predicted = probabilities.argmax(axis=1)
    right = sorted(i for i, (label, p) in zip(ids, zip(labels, predicted)) if label == p)[:correct]
    bad = [(i, probabilities[k].max()) for k, (i, label, p) in enumerate(zip(ids, labels, predicted)) if label != p]
    bad = [i for i, _ in sorted(bad, key=lambda t: (-t[1], t[0]))][:wrong]
    chosen = [(i, True) for i in right] + [(i, False) for i in bad]
    taken = set(right)
    for c in range(probabilities.shape[1]):
        best = [
            (-probabilities[k, c], i) for k, i in enumerate(ids) if labels[k] == c == predicted[k] and i not in taken
        ]
        chosen += [(i, True) for _, i in sorted(best)[:per_class]]
    return chosen


def colour_map(values: np.ndarray) -> np.ndarray:
    """0..1 -> RGB uint8 on a blue-cyan-yellow-red ramp (a 'jet'-like map)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([0.0, 0.35, 0.65, 1.0])
    colours = np.array([[0, 0, 160], [0, 200, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float64)
    rgb = np.stack([np.interp(v[..., 0], stops, colours[:, c]) for c in range(3)], axis=-1)
    return rgb.astype(np.uint8)


def overlay(pixels: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a heat map (any resolution, 0..1) over float 0..255 pixels; uint8 RGB out."""
    h, w = pixels.shape[:2]
    heat = tf.image.resize(heat[..., None].astype(np.float32), (h, w), method="bilinear").numpy()[..., 0]
    blended = (1 - alpha) * pixels + alpha * colour_map(heat).astype(np.float64)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


# ---- I/O --------------------------------------------------------------------------------------


def predict_features(head, files: list[str], feature_size: int, batch_size: int):
    """(ids, labels, probabilities) of the head (`runtimes.predictor`) on feature records."""
    ids, labels, probs = [], [], []
    with record_checks.damaged_named(files):
        for batch_ids, label, features in records.feature_records(files, feature_size).batch(batch_size):
            ids += [i.decode() for i in batch_ids.numpy()]
            labels.append(label.numpy())
            probs.append(as_probabilities(head(features.numpy())))
    return as_scores(ids, labels, probs)


def as_scores(ids: list[str], labels: list[np.ndarray], probs: list[np.ndarray]):
    """(ids, labels, probabilities) in id order, so no figure depends on the order the records were read in (the
    bootstrap drew by position: another `convert.shards` moved the macro F1 interval of the same predictions);
    files holding no record give empty arrays, which the image count check then reports."""
    if not ids:
        return [], np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    labels_, probs_ = np.concatenate(labels), np.concatenate(probs)
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return [ids[i] for i in order], labels_[order], probs_[order]


def check_scores(model: str, split: str, scores: tuple, num_classes: int) -> None:
    """What the metrics can take: every label a class of labels.json (a label past the end was an IndexError, one
    below 0 a correct prediction in the confusion matrix but a wrong one in the accuracy), every probability finite
    (argmax read NaN as class 0, and metrics.json held NaN, which is not JSON)."""
    ids, labels, probabilities = scores
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise ValueError(
            f"evaluate: {len(bad)} {split} records have labels outside the {num_classes} classes of labels.json "
            f"(e.g. {ids[bad[0]]}: {int(labels[bad[0]])}): the records and labels.json are not one convert's; re-run convert"
        )
    bad = np.flatnonzero(~np.isfinite(probabilities).all(axis=1))
    if len(bad):
        raise ValueError(
            f"evaluate: the {model} model's probabilities are not finite for {len(bad)} {split} images "
            f"(e.g. {ids[bad[0]]}): the model diverged or is damaged; train it again (a lower learning rate)"
        )


def predict_images(model, files: list[str], decode: records.RecordDecoder, batch_size: int):
    """(ids, labels, probabilities) of the classifier (`runtimes.predictor`) on image records, through the
    shared decode (`decode`: `records.record_decoder`), decoded by threads while the model runs."""
    ids, labels, probs = [], [], []
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="decode") as pool:
        for batch_ids, label, pixels in records.decoded_batches(files, decode, batch_size, pool):
            ids += [i.decode() for i in batch_ids]
            labels.append(label)
            probs.append(as_probabilities(model(pixels)))
    return as_scores(ids, labels, probs)


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def run(
    config: Config,
    convert_dir: str | Path,
    extract_dir: str | Path,
    head_path: str | Path,
    model_path: str | Path,
    manifest_path: str | Path,
    report_dir: str | Path,
    cache_dir: str | None = None,
) -> dict:
    params = config.evaluate
    runtimes.check_installed(params.runtime)  # a clear error before any work, as extract
    convert_dir, extract_dir = Path(convert_dir), Path(extract_dir)
    names = json.loads((convert_dir / "labels.json").read_text(encoding="utf-8"))
    counts = json.loads((convert_dir / "summary.json").read_text(encoding="utf-8"))["records"]
    if not counts.get("test"):  # before loading the models (and OpenVINO's conversions) and scoring val
        raise RuntimeError("the test split has no images: nothing to evaluate")
    if not Path(manifest_path).is_file():  # read once the mistakes are known (their rows only), checked before any work
        raise FileNotFoundError(f"the download manifest {manifest_path} is missing: re-run download")
    features = json.loads((extract_dir / "features.json").read_text())
    feature_size = int(features["feature_size"])
    head = keras.saving.load_model(head_path, compile=False)
    model = keras.saving.load_model(model_path, compile=False)
    for loaded in (head, model):
        serving.check_classes(loaded, names, "evaluate")  # before any work
    size = tuple(int(s) for s in model.input_shape[1:3])
    serving.check_tta(size, config.tta.quarter_turns)  # before any work
    decode = records.record_decoder(size)
    cache_dir = runtimes.local_cache(cache_dir)  # converted models under it (a bucket or none: a per-run folder)
    # converting and compiling read and write that folder: tools.cache_gc, which empties it, waits (or refuses)
    with cache_lock.held(cache_dir if params.runtime != "tensorflow" else None):
        score_head = runtimes.predictor(head, params.runtime, cache_dir)
        # Grad-CAM uses the Keras model; scoring applies the tta section as the serving model does
        score_model = serving.with_tta(
            runtimes.predictor(model, params.runtime, cache_dir), config.tta.flip, config.tta.quarter_turns
        )
    image_files = records.split_files(convert_dir / "records", "test")

    def scored(split: str) -> dict[str, tuple] | None:
        """Both models' (ids, labels, probabilities) on one split; None for a split without images."""
        if not counts.get(split):
            return None
        found = {
            "head": predict_features(
                score_head, records.split_files(extract_dir / "features", split), feature_size, params.batch_size
            )
        }
        started = time.perf_counter()
        found["finetune"] = predict_images(
            score_model, records.split_files(convert_dir / "records", split), decode, params.batch_size
        )
        log.info(  # the log only: no timing goes into an output
            "evaluate: fine-tuned model scored %d %s images in %.1f s (tta.flip: %s, quarter_turns: %s)",
            len(found["finetune"][0]),
            split,
            time.perf_counter() - started,
            config.tta.flip,
            config.tta.quarter_turns,
        )
        for name, scores in found.items():
            check_scores(name, split, scores, len(names))
            if len(scores[0]) != counts[split]:  # images in = images scored: a shard lost from both went unnoticed
                raise RuntimeError(
                    f"evaluate: the {name} model scored {len(scores[0])} {split} images, convert wrote "
                    f"{counts[split]} (summary.json): a feature or record file is missing; re-run convert and extract"
                )
        if sorted(found["head"][0]) != sorted(found["finetune"][0]):
            raise RuntimeError(f"the {split} features and the {split} records hold different images: re-run extract")
        return found

    predictions, validation = scored("test"), scored("val")
    metrics, wrong = {}, []
    options = {"confused": params.most_confused, "resamples": params.bootstrap}
    with outputs.staged_dir(report_dir) as report:
        for name, (ids, labels, probs) in predictions.items():
            # Models are chosen and gated on "val" (sweep, retrain); "test" only reports.
            metrics[name] = {
                "val": None if validation is None else classification_metrics(*validation[name][1:], names, **options),
                "test": classification_metrics(labels, probs, names, **options),
                # what scored it (OpenVINO's last bits can move a boundary image against the TensorFlow serving model)
                "runtime": params.runtime,
            }
            roc, pr = curve_rows(labels, probs)
            if not roc:
                log.warning(
                    "evaluate: the test split holds one class only: no ROC curve%s (%s)",
                    "" if pr else " and no precision-recall curve",
                    name,
                )
            write_json(report / "plots" / f"roc_{name}.json", roc)
            write_json(report / "plots" / f"precision_recall_{name}.json", pr)
            write_json(report / "plots" / f"confusion_{name}.json", confusion_rows(labels, probs, names))
            write_json(report / "plots" / f"per_class_{name}.json", per_class_rows(metrics[name]["test"]))
            wrong += misclassified(name, ids, labels, probs, names)
        write_json(report / "metrics.json", metrics)
        write_json(report / "misclassified.json", with_sources(wrong, manifest_path))

        ids, labels, probs = predictions["finetune"]
        chosen = pick_gradcam(
            ids, labels, probs, params.gradcam_correct, params.gradcam_wrong, params.gradcam_per_class
        )
        index = {record_id: k for k, record_id in enumerate(ids)}
        images = records.encoded_by_id(image_files, {i for i, _ in chosen}, decode)
        (report / "gradcam").mkdir()
        if chosen and len(classifier.find_base(model).output.shape) == 4:
            shown = np.array([int(probs[index[i]].argmax()) for i, _ in chosen])  # the class each file is named for
            maps, _ = classifier.grad_cam(model, np.stack([images[i][1] for i, _ in chosen]), shown)
            for (record_id, correct), heat in zip(chosen, maps):
                k = index[record_id]
                actual, guess = names[labels[k]], names[int(probs[k].argmax())]
                stem = f"{'correct' if correct else 'wrong'}_{actual}_as_{guess}_{probs[k].max():.2f}_{record_id}"
                Image.fromarray(overlay(images[record_id][1], heat)).save(report / "gradcam" / f"{stem}.png")
        write_resolved(report, config.sections())
        outputs.require_outputs(report, REPORT_OUTPUTS)
    for name in MODELS:
        for split in ("val", "test"):
            m = metrics[name][split]
            if m is not None:
                log.info(
                    "evaluate: %s %s accuracy %.4f (95%%: %.4f-%.4f), loss %.4f, macro F1 %.4f%s, ROC-AUC %s (%d images)",
                    name,
                    split,
                    m["accuracy"],
                    m["accuracy_low"],
                    m["accuracy_high"],
                    m["loss"],
                    m["macro_f1"],
                    f" ({m['macro_f1_low']:.4f}-{m['macro_f1_high']:.4f})" if m.get("macro_f1_low") is not None else "",
                    "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}",
                    m["images"],
                )
                for pair in m["most_confused"][:3]:
                    log.info("evaluate:   %s as %s: %d", pair["actual"], pair["predicted"], pair["count"])
    return {"metrics": metrics, "misclassified": len(wrong), "gradcam": len(chosen)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (section evaluate)")
    parser.add_argument("--convert", required=True, help="the convert stage's output folder")
    parser.add_argument("--extract", required=True, help="the extract stage's output folder")
    parser.add_argument("--head", required=True, help="train_head's head.keras")
    parser.add_argument("--model", required=True, help="finetune's model.keras")
    parser.add_argument("--manifest", required=True, help="download's manifest.jsonl")
    parser.add_argument(
        "--report", required=True, help="metrics, plots, Grad-CAM and misclassified list (declared in dvc.yaml)"
    )
    parser.add_argument(
        "--cache", default=None, help="a cache root: models converted for the runtime go in its openvino/ folder"
    )
    args = parser.parse_args(argv)
    configure_logging()
    config = load_config(args.params)
    log_resolved("evaluate", config.sections())
    run(config, args.convert, args.extract, args.head, args.model, args.manifest, args.report, args.cache)
    return 0


if __name__ == "__main__":
    run_main(main)
