"""quality stage: suspected label errors, near-duplicates across splits and the head's cross-validated
accuracy, all from the cached features (no image is run through the base again).

Inputs
    the extract stage's folder (``features/``, ``features.json``), the convert stage's
    ``labels.json``, the download stage's folder (``manifest.jsonl``: each id's source file;
    ``images/``: the contact sheet), train_head's ``history.json`` (its best epoch: the k-fold
    heads train that many epochs); params.yaml sections ``common``, ``train_head`` (the head's
    recipe) and ``quality``.
Outputs (one folder, ``--report``, written atomically; its own, since evaluate replaces ``evaluation/``)
    ``label_issues.json``  suspected label errors of train and val, most suspect first: id, split,
                           file, source, given and suggested label, label quality score
                           (cleanlab's self-confidence: the out-of-fold probability of the given label)
    ``near_duplicates.json`` image pairs in two different splits whose features' cosine similarity is
                           at least ``quality.near_duplicate_threshold``, with both source files (the
                           audit fails on any, as on an exact copy)
    ``metrics.json``       the head's k-fold cross-validated accuracy over train + val with its 95%
                           Wilson interval and the per-fold accuracies; the counts of both lists; the
                           features check (`FeatureCheck`: all-zero rows, one vector for every image)
    ``label_suspects.png`` a contact sheet (PNG) of the top suspects: a DVC image plot

Run: ``python -m components.quality --extract data/extract --labels data/convert/labels.json
--download data/download --history data/train_head/history.json --report quality``

Out-of-fold probabilities: train + val are cut into ``quality.folds`` stratified folds (seeded);
for each, the train_head recipe (same layers, optimizer, learning rate, class weighting) trains
on the other folds for train_head's best epoch count and predicts the held-out fold. Every image
is then scored by a head that never saw it: those probabilities feed confident learning
(cleanlab's ``find_label_issues``, Northcutt et al. 2021) and the cross-validated accuracy. The
test split is only searched for near-duplicates: it is never trained on, here or anywhere.

Memory: flat in the number of images. The features are copied into files in a temporary folder (feature
size x 4 bytes an image: 5 KB at 1,280) and read back a block (near-duplicates) or a batch (the k-fold
heads) at a time; what stays in memory per image is its id, label, split, fold and out-of-fold
probabilities (tens of bytes), and nothing of the images but the contact sheet's tiles.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import tempfile
from pathlib import Path
from typing import Callable, Collection, Iterator, Mapping, Sequence

import numpy as np
import pydantic
from PIL import Image, ImageDraw

from components import outputs, training
from components.cli import configure_logging, run_main
from components.manifest import MANIFEST, ids_missing
from components.manifest import rows_of as manifest_rows_of
from components.params import (
    CommonParams,
    ParamsError,
    Section,
    log_resolved,
    read_params,
    section,
    write_resolved,
)
from components.stats import wilson_interval
from components.training import TrainHeadParams
from pipelines import near_duplicates, record_checks, records

# ids -> the manifest rows of those ids (`components.manifest.rows_of`, bound to a manifest file)
RowsOf = Callable[[Collection[str]], Mapping[str, dict]]

log = logging.getLogger(__name__)

TRAINED_SPLITS = ("train", "val")  # the splits the k-fold heads and the label-error search cover
TILE = 128  # contact sheet: a thumbnail's side in pixels
CAPTION = 30  # ... and the caption's height under it
COLUMNS = 4
LABEL_ISSUES = "label_issues.json"
NEAR_DUPLICATES = "near_duplicates.json"
METRICS = "metrics.json"
SHEET = "label_suspects.png"
DECLARED_OUTPUTS = (LABEL_ISSUES, NEAR_DUPLICATES, METRICS, SHEET, "params.json")


class QualityParams(Section):
    folds: int = pydantic.Field(5, ge=2, le=20)  # k of the stratified k-fold out-of-fold heads
    # cosine similarity of two images' features at or above which they are near-duplicates
    near_duplicate_threshold: float = pydantic.Field(0.9, gt=0.0, le=1.0)
    sheet: int = pydantic.Field(16, ge=0, le=100)  # suspects shown on the contact sheet


@dataclasses.dataclass(frozen=True)
class Config:
    common: CommonParams
    train_head: TrainHeadParams
    quality: QualityParams

    def sections(self) -> dict[str, Section]:
        return {"common": self.common, "train_head": self.train_head, "quality": self.quality}


def load_config(params_path: str | Path) -> Config:
    data = read_params(params_path)
    return Config(
        common=section(data, CommonParams, "common", params_path),
        train_head=section(data, TrainHeadParams, "train_head", params_path),
        quality=section(data, QualityParams, "quality", params_path),
    )


# --------------------------------------------------------------------------- pure parts


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's fold (0..folds-1): stratified by label, shuffled with the seed. Every class needs at
    least `folds` images (else some fold could not hold one of it): a clear error otherwise."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels)
    small = [int(c) for c in np.flatnonzero((counts > 0) & (counts < folds))]
    if small:  # a params error (one line, exit 2), though only the data can show it
        raise ParamsError(
            f"classes {small} have fewer than quality.folds={folds} images in train + val "
            f"({[int(counts[c]) for c in small]}): lower quality.folds or add images"
        )
    fold_of = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold_of[held_out] = k
    return fold_of


def copy_groups(n: int, pairs: Sequence[tuple[int, int, float]]) -> np.ndarray:
    """Each of n images' group: the smallest index among the images its near-duplicate pairs join it to."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in pairs:
        a, b = root(i), root(j)
        parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(n)], dtype=np.int64)


def grouped_folds(labels: np.ndarray, folds: int, seed: int, groups: np.ndarray) -> np.ndarray:
    """`stratified_folds` over the groups of near-duplicate copies (`copy_groups`): each group is dealt, by its
    first image's label, to one fold, and all its images go there. A copy in another fold than its photo was
    scored by a head trained on that photo: the cross-validated accuracy came out high on labels with no signal
    at all, and a copy's wrong label looked right. Without copies it is `stratified_folds` itself."""
    firsts = np.flatnonzero(groups == np.arange(len(groups)))
    if len(firsts) < len(labels):  # copies: the classes need `folds` groups each, not images
        # the groups holding any image of the class (a group is dealt by its first image's label: a class whose
        # every image is a copy of another class's counted none there, and passed; a review on 2026-12-07)
        # every class also needs `folds` groups it is the first image of, to deal its groups by (a class with
        # none is dealt with other classes' groups, which the check after the deal covers)
        classes = int(labels.max()) + 1
        holding = np.array([len(np.unique(groups[labels == c])) for c in range(classes)])
        leading = np.bincount(labels[firsts], minlength=classes)
        counts = np.where(leading > 0, leading, holding)  # a group a class leads holds it: leading <= holding
        small = [int(c) for c in np.flatnonzero((counts > 0) & (counts < folds))]
        if small:
            raise ParamsError(
                f"classes {small} have fewer than quality.folds={folds} distinct images in train + val once "
                f"near-duplicate copies count once ({[int(counts[c]) for c in small]}; {len(labels) - len(firsts)} "
                f"of the {len(labels)} images are copies at quality.near_duplicate_threshold): lower quality.folds, "
                "or raise the threshold if they are not copies (benchmarks/near_duplicate_threshold.py)"
            )
    fold_of_first = stratified_folds(labels[firsts], folds, seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    fold_of[firsts] = fold_of_first
    fold_of = fold_of[groups]
    # every fold's head must see every class: copies dealt by another class's label can all land in one fold
    unseen = sorted(
        {int(c) for k in range(folds) for c in np.unique(labels) if not np.any((fold_of != k) & (labels == c))}
    )
    if unseen:
        fewer = "lower quality.folds, or " if folds > 2 else ""  # 2 is its least
        raise ParamsError(
            f"classes {unseen}: every image of theirs in train + val falls in one fold with its near-duplicate copies "
            f"(filed under other classes), so that fold's head would never see the class: {fewer}raise "
            "quality.near_duplicate_threshold if they are not copies, or fix the copies' labels"
        )
    return fold_of


def as_probabilities(outputs_: np.ndarray) -> np.ndarray:
    """[n, k] class probabilities from a head's output ([n, 1] sigmoid for two classes)."""
    outputs_ = np.asarray(outputs_, dtype=np.float64)
    if outputs_.shape[1] == 1:
        return np.concatenate([1.0 - outputs_, outputs_], axis=1)
    return outputs_


def out_of_fold_probabilities(
    features: near_duplicates.Rows,
    labels: np.ndarray,
    num_classes: int,
    head: TrainHeadParams,
    epochs: int,
    fold_of: np.ndarray,
    seed: int,
    predict_block: int = 4096,
) -> np.ndarray:
    """Each image's class probabilities from the head trained on the other folds (train_head's recipe,
    `epochs` epochs, seeded per fold so a fold's head does not depend on the folds before it).

    `features` are read a batch of rows at a time (an array, or rows on disk: `records.FeatureSpool`):
    every epoch is a seeded permutation of the other folds' rows, read batch by batch, and the held-out
    fold is predicted `predict_block` rows at a time, so memory holds a few batches, not the features."""
    import keras
    import tensorflow as tf

    probabilities = np.zeros((len(labels), num_classes))
    targets = labels.astype(np.float32) if num_classes == 2 else labels.astype(np.int64)
    dim = int(features.shape[1])
    for k in range(int(fold_of.max()) + 1):
        trained = np.flatnonzero(fold_of != k)
        held_out = np.flatnonzero(fold_of == k)
        fold_seed = (seed + k) % 2**32  # NumPy takes seeds below 2**32; common.seed may be 2**32 - 1
        keras.utils.set_random_seed(fold_seed)
        model = training.build_head(dim, num_classes, head)
        training.compile_head(model, num_classes, head.optimizer, head.learning_rate)

        def batch_of(positions, rows=trained):
            chosen = rows[positions]
            return np.asarray(features[chosen], np.float32), targets[chosen]

        def read(positions):
            x, y = tf.numpy_function(batch_of, [positions], (tf.float32, tf.as_dtype(targets.dtype)), stateful=False)
            x.set_shape([None, dim])
            y.set_shape([None])
            return x, y

        data = (
            records.record_numbers(len(trained), fold_seed)
            .batch(head.batch_size)
            .map(read, num_parallel_calls=2, deterministic=True)
            .prefetch(2)
        )
        counts = np.bincount(labels[trained], minlength=num_classes)
        model.fit(
            data,
            epochs=epochs,
            shuffle=False,  # the data shuffles itself, seeded
            class_weight=training.class_weights(counts, head.class_weight),
            verbose=0,
        )
        for start in range(0, len(held_out), predict_block):
            rows = held_out[start : start + predict_block]
            probabilities[rows] = as_probabilities(model.predict_on_batch(features[rows]))
        if not np.isfinite(probabilities[held_out]).all():  # argmax would read NaN as class 0, cleanlab list nothing
            raise RuntimeError(
                f"quality: fold {k}'s head diverged (its probabilities are not finite): lower "
                "train_head.learning_rate, which the folds' heads train with"
            )
        keras.backend.clear_session()
    return probabilities


def cross_validated_accuracy(labels: np.ndarray, probabilities: np.ndarray, fold_of: np.ndarray) -> dict:
    """Out-of-fold accuracy over every image with its 95% Wilson interval, and each fold's accuracy."""
    right = probabilities.argmax(axis=1) == labels
    low, high = wilson_interval(int(right.sum()), len(labels))
    return {
        "accuracy": float(right.mean()),
        "accuracy_low": low,
        "accuracy_high": high,
        "images": int(len(labels)),
        "folds": int(fold_of.max()) + 1,
        "fold_accuracy": [float(right[fold_of == k].mean()) for k in range(int(fold_of.max()) + 1)],
    }


def label_issue_rows(
    ids: Sequence[str],
    splits: Sequence[str],
    labels: np.ndarray,
    probabilities: np.ndarray,
    names: Sequence[str],
    rows_of: RowsOf,
) -> list[dict]:
    """Confident learning's suspected label errors (cleanlab), most suspect first (lowest out-of-fold
    probability of the given label; ties by id), with their manifest rows' file and source (`rows_of`)."""
    from cleanlab.filter import find_label_issues

    if len(set(labels.tolist())) < 2:
        return []
    found = np.flatnonzero(find_label_issues(labels, probabilities, n_jobs=1)).tolist()
    manifest = rows_of({ids[i] for i in found})
    rows = []
    for i in found:
        row = manifest.get(ids[i], {})
        rows.append(
            {
                "id": ids[i],
                "split": splits[i],
                "file": row.get("file"),
                "source": row.get("source"),
                "given": names[int(labels[i])],
                "suggested": names[int(probabilities[i].argmax())],
                "score": round(float(probabilities[i, labels[i]]), 6),  # self-confidence: P(given label)
                "suggested_probability": round(float(probabilities[i].max()), 6),
            }
        )
    rows.sort(key=lambda r: (r["score"], r["id"]))
    return rows


def contact_sheet(rows: Sequence[dict], images: Path, count: int) -> Image.Image:
    """The first `count` suspects as captioned thumbnails (given -> suggested, score), or one tile that
    says there are none."""
    shown = list(rows[:count])
    columns = max(1, min(COLUMNS, len(shown)))
    lines = max(1, -(-len(shown) // columns))
    sheet = Image.new("RGB", (columns * TILE, lines * (TILE + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    if not rows:
        draw.text((8, TILE // 2), "no suspected\nlabel errors", fill="black")
        return sheet
    if not shown:  # quality.sheet: 0 must not say there are none
        draw.text(
            (8, TILE // 2 - 16), f"{len(rows)} suspected\nlabel errors,\nnone shown\n(quality.sheet: 0)", fill="black"
        )
        return sheet
    for n, row in enumerate(shown):
        x, y = (n % columns) * TILE, (n // columns) * (TILE + CAPTION)
        with Image.open(images / Path(row["file"]).name) as img:
            thumb = img.convert("RGB")
            thumb.thumbnail((TILE, TILE), Image.Resampling.BILINEAR)
        sheet.paste(thumb, (x + (TILE - thumb.width) // 2, y + (TILE - thumb.height) // 2))
        draw.text((x + 2, y + TILE + 1), f"{row['given']} -> {row['suggested']}", fill="black")
        draw.text((x + 2, y + TILE + 14), f"{row['score']:.3f} {row['id'][:8]}", fill="black")
    return sheet


# --------------------------------------------------------------------------- I/O


@dataclasses.dataclass
class FeatureCheck:
    """What tells features that say nothing about their images, gathered as they stream past (memory: two rows):
    all-zero rows (similar to nothing, so never a near-duplicate) and features identical for every image (a base
    whose output does not depend on its input). Either way the suspects and the cross-validated accuracy describe
    the base, not the labels: the stage says so (a warning, and ``features`` in its metrics)."""

    zero_rows: int = 0
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def add(self, values: np.ndarray) -> None:
        if not len(values):
            return
        self.zero_rows += int(np.count_nonzero(~values.any(axis=1)))
        low, high = values.min(axis=0), values.max(axis=0)
        self.low = low if self.low is None else np.minimum(self.low, low)
        self.high = high if self.high is None else np.maximum(self.high, high)

    def report(self, images: int) -> dict:
        identical = self.low is not None and images > 1 and bool(np.array_equal(self.low, self.high))
        return {"zero_rows": self.zero_rows, "identical": identical}


def spool_split(
    files: list[str], feature_size: int, rows: records.FeatureSpool, check: FeatureCheck | None = None
) -> tuple[list[str], np.ndarray, records.FeatureSpool]:
    """One split's ids and labels (in memory: small), and its features copied from its feature files into
    `rows` (a file), read back a batch at a time by the steps after: memory does not grow with the number
    of images. `check` sees every batch (`FeatureCheck`)."""
    ids, labels = [], []
    with record_checks.damaged_named(files):
        for batch_ids, batch_labels, batch in records.feature_records(files, feature_size).batch(1024):
            values = batch.numpy()
            bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
            if len(bad):  # a head trained on them scores NaN: chance accuracy and no suspects, without a word
                named = [batch_ids.numpy()[i].decode() for i in bad[:5]]
                raise ValueError(
                    f"quality: {len(bad)}+ images of {files[0] if files else 'a split'} have features that are not finite "
                    f"(NaN or infinite), e.g. {named}: the conv base computed them so; check the base and re-run extract"
                )
            ids += [i.decode() for i in batch_ids.numpy()]
            labels.append(batch_labels.numpy())
            rows.append(values)
            if check is not None:
                check.add(values)
    return ids, (np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)), rows


class ConcatenatedRows:
    """Several splits' rows as one [n, dim] array read in slices or lists of rows (`near_duplicates.Rows`)."""

    def __init__(self, parts: Sequence[near_duplicates.Rows]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.starts[-1]), int(self.parts[0].shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        numbers = np.arange(*index.indices(self.shape[0])) if isinstance(index, slice) else np.asarray(index, np.int64)
        out = np.empty((len(numbers), self.shape[1]), np.float32)
        part_of = np.searchsorted(self.starts, numbers, side="right") - 1
        for part in np.unique(part_of).tolist():
            here = part_of == part
            out[here] = self.parts[part][numbers[here] - self.starts[part]]
        return out


def assess(config: Config, data: dict, rows_of: RowsOf, num_classes: int, epochs: int):
    """The near-duplicate pairs across splits (with their manifest rows' file, source and label: `rows_of`)
    and the out-of-fold probabilities of train + val, from each split's (ids, labels, feature rows)."""
    params = config.quality
    present = {split: d for split, d in data.items() if d[0]}
    pairs = near_duplicates.cross_split_pairs(
        {s: d[2] for s, d in present.items()}, {s: d[0] for s, d in present.items()}, params.near_duplicate_threshold
    )
    manifest = rows_of({pair[f"{side}_id"] for pair in pairs for side in ("a", "b")})
    for pair in pairs:
        for side in ("a", "b"):
            row = manifest[pair[f"{side}_id"]]
            pair[f"{side}_file"], pair[f"{side}_source"], pair[f"{side}_label"] = (
                row["file"],
                row["source"],
                row["label"],
            )

    ids = [i for s in TRAINED_SPLITS for i in data[s][0]]
    splits = [s for s in TRAINED_SPLITS for _ in data[s][0]]
    labels = np.concatenate([data[s][1] for s in TRAINED_SPLITS])
    features = ConcatenatedRows([data[s][2] for s in TRAINED_SPLITS])
    bad = sorted({int(v) for v in labels if not 0 <= v < num_classes})
    if bad:
        raise ValueError(f"labels {bad} are outside the vocabulary of {num_classes} classes (labels.json)")
    training.make_deterministic(config.common.seed)
    # copies share a fold: pairs inside each trained split, and across them from the search above (not again)
    index, offset, copies = {i: n for n, i in enumerate(ids)}, 0, []
    for split in TRAINED_SPLITS:
        found = near_duplicates.pairs_within(data[split][2], params.near_duplicate_threshold, ids=data[split][0])
        copies += [(offset + i, offset + j, similarity) for i, j, similarity in found]
        offset += len(data[split][0])
    copies += [
        (index[p["a_id"]], index[p["b_id"]], p["similarity"])
        for p in pairs
        if p["a_split"] in TRAINED_SPLITS and p["b_split"] in TRAINED_SPLITS
    ]
    fold_of = grouped_folds(labels, params.folds, config.common.seed, copy_groups(len(labels), copies))
    probabilities = out_of_fold_probabilities(
        features, labels, num_classes, config.train_head, epochs, fold_of, config.common.seed
    )
    return pairs, ids, splits, labels, probabilities, fold_of, len(copies)


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def spool_folder(cache_dir: str | Path | None) -> Iterator[Path]:
    """A folder for this run's feature spools, removed when the run ends: under `cache_dir` (the project's
    `.cache/quality`, on disk) named for this process, so a killed run's (which no clean-up reached) is swept by the
    next run, never a live one's; the system's temporary folder otherwise (a RAM disk on hosts whose /tmp is a
    tmpfs, where the spools grow with the dataset: the stage's memory would not stay flat)."""
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="quality-features-") as folder:
            yield Path(folder)
        return
    with training.run_scratch(cache_dir, "quality-features-") as folder:
        yield folder


def run(
    config: Config,
    extract_dir: str | Path,
    labels_path: str | Path,
    download_dir: str | Path,
    history_path: str | Path,
    report_dir: str | Path,
    cache_dir: str | Path | None = None,
) -> dict:
    """Assess the data; the features are spooled to files for the run, in a folder of this run's own under
    `cache_dir` (a killed run's is swept by the next), or the system's temporary folder without one."""
    extract_dir, download_dir = Path(extract_dir), Path(download_dir)
    names = json.loads(Path(labels_path).read_text(encoding="utf-8"))
    feature_size = int(json.loads((extract_dir / "features.json").read_text())["feature_size"])
    epochs = int(json.loads(Path(history_path).read_text(encoding="utf-8"))["best_epoch"])
    params = config.quality
    manifest_path = download_dir / MANIFEST  # read a line at a time, for the rows wanted: never held whole
    rows_of = functools.partial(manifest_rows_of, manifest_path)
    # The spools close before their folder goes (the inner context exits first), errors included, so their
    # disk space is freed at once, not whenever the objects are collected.
    with spool_folder(cache_dir) as spools, contextlib.ExitStack() as opened:
        data, check = {}, FeatureCheck()
        for split in ("train", "val", "test"):
            files = records.split_files(extract_dir / "features", split)
            rows = opened.enter_context(records.FeatureSpool(Path(spools) / split, feature_size))
            data[split] = spool_split(files, feature_size, rows, check)
        features = check.report(sum(len(ids) for ids, _, _ in data.values()))
        if features["identical"] or features["zero_rows"]:
            log.warning(
                "quality: %s: the suspected label errors and the cross-validated accuracy below describe the conv "
                "base, not the labels; check conv_base (its weights, its tap layer) and re-run extract",
                "every image has the same features"
                if features["identical"]
                else f"{features['zero_rows']} images have all-zero features",
            )
        unknown = ids_missing(manifest_path, (i for ids, _, _ in data.values() for i in ids))
        if unknown:
            raise RuntimeError(
                f"{len(unknown)} feature records have ids the manifest lacks ({unknown[:3]}): re-run extract"
            )
        pairs, ids, splits, labels, probabilities, fold_of, copies = assess(config, data, rows_of, len(names), epochs)
    cv = cross_validated_accuracy(labels, probabilities, fold_of)
    issues = label_issue_rows(ids, splits, labels, probabilities, names, rows_of)
    metrics = {
        "features": features,  # zero rows, or one vector for every image: a base that tells nothing apart
        "head_cv": cv,
        "label_issues": {"count": len(issues), "of": len(ids), "fraction": len(issues) / max(1, len(ids))},
        "near_duplicates": {
            "pairs": len(pairs),
            "threshold": params.near_duplicate_threshold,
            "pairs_within_train_val": copies,  # kept in one cross-validation fold each
        },
    }
    with outputs.staged_dir(report_dir) as report:
        write_json(report / LABEL_ISSUES, issues)
        write_json(report / NEAR_DUPLICATES, pairs)
        write_json(report / METRICS, metrics)
        contact_sheet(issues, download_dir / "images", params.sheet).save(report / SHEET, format="PNG")
        write_resolved(report, config.sections())
        outputs.require_outputs(report, DECLARED_OUTPUTS)
    log.info(
        "quality: head %d-fold cross-validated accuracy %.4f (95%%: %.4f-%.4f) over %d train + val images",
        cv["folds"],
        cv["accuracy"],
        cv["accuracy_low"],
        cv["accuracy_high"],
        cv["images"],
    )
    log.info("quality: %d suspected label errors (%s)", len(issues), Path(report_dir) / LABEL_ISSUES)
    for row in issues[:5]:
        log.info(
            "quality:   %s %s given %s, looks %s (%.3f)",
            row["split"],
            row["source"],
            row["given"],
            row["suggested"],
            row["score"],
        )
    log.info(
        "quality: %d near-duplicate pairs across splits at cosine >= %g", len(pairs), params.near_duplicate_threshold
    )
    for pair in pairs[:5]:
        log.info(
            "quality:   %s %s ~ %s %s (%.4f)",
            pair["a_split"],
            pair["a_source"],
            pair["b_split"],
            pair["b_source"],
            pair["similarity"],
        )
    return {"metrics": metrics, "label_issues": issues, "near_duplicates": pairs}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (sections common, train_head, quality)")
    parser.add_argument("--extract", required=True, help="the extract stage's output folder")
    parser.add_argument("--labels", required=True, help="the convert stage's labels.json")
    parser.add_argument("--download", required=True, help="the download stage's folder (manifest and images)")
    parser.add_argument("--history", required=True, help="train_head's history.json (the k-fold heads' epochs)")
    parser.add_argument("--report", required=True, help="output folder (its files declared in dvc.yaml)")
    parser.add_argument("--cache", default=None, help="scratch folder for the run's feature spools (removed after)")
    args = parser.parse_args(argv)
    configure_logging()
    config = load_config(args.params)
    log_resolved("quality", config.sections())
    run(config, args.extract, args.labels, args.download, args.history, args.report, args.cache)
    return 0


if __name__ == "__main__":
    run_main(main)
