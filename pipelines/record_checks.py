"""Checks on the record files the training and evaluation stages read (kept out of `pipelines.records`, which keys
the feature cache: a change there would make every image's features be computed again)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import tensorflow as tf

from pipelines import features as fk
from pipelines import records


@contextlib.contextmanager
def damaged_named(files: list[str]) -> Iterator[None]:
    """A damaged or truncated record file met while reading `files` inside the block (through a `tf.data` pipeline,
    whose DataLossError names neither the file nor what to do) is an error naming it: each file is read alone to
    find it (`records.serialized_records`)."""
    try:
        yield
    except tf.errors.DataLossError:
        for path in files:
            for _ in records.serialized_records([path]):
                pass
        raise


def check_record_labels(files: list[str], num_classes: int, what: str) -> np.ndarray:
    """Every convert record's label must index labels.json's `num_classes` names (a clear error before training,
    instead of a sigmoid target of 2 or a crash inside TensorFlow's gather); returns the records per class. Each
    record is parsed alone for its label, its image dropped before batching."""
    spec = {fk.LABEL: fk.record_feature_spec()[fk.LABEL]}
    counts = np.zeros(num_classes, np.int64)
    bad: set[int] = set()
    with damaged_named(files):
        labelled = tf.data.TFRecordDataset(files).map(lambda s: tf.io.parse_single_example(s, spec)[fk.LABEL])
        for batch in labelled.batch(1024).as_numpy_iterator():
            inside = (batch >= 0) & (batch < num_classes)
            counts += np.bincount(batch[inside], minlength=num_classes)
            bad.update(int(v) for v in batch[~inside])
    if bad:
        raise ValueError(
            f"{what}: labels {sorted(bad)} are outside the vocabulary of {num_classes} classes (labels.json): the "
            "records and labels.json are not one convert's; re-run convert"
        )
    return counts
