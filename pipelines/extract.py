"""Beam graph code of the extract stage: a frozen conv base over TFRecord shards.

One work item per input shard: the worker streams the shard through a
parallel, prefetching tf.data pipeline (the shared decode/resize), runs the base
on fixed-size batches and streams feature records into the matching output
shard. Memory holds a few batches whatever the dataset size; the output keeps
the input's order, so the same records and base give the same files; the
model is built once per worker, in `setup()`.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

import apache_beam as beam
import numpy as np
import tensorflow as tf

from pipelines import features as fk
from pipelines import records

log = logging.getLogger(__name__)


def feature_example(record_id: bytes, label: int, values: np.ndarray) -> bytes:
    feature = {
        fk.ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[record_id])),
        fk.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        fk.FEATURES: tf.train.Feature(float_list=tf.train.FloatList(value=values.astype(np.float32).ravel())),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


class ExtractShard(beam.DoFn):
    """(split, input shard, output shard) -> writes the features; emits (split, records)."""

    def __init__(self, model_factory: Callable, size: tuple[int, int], batch_size: int):
        self._factory = model_factory
        self._size = tuple(size)
        self._batch_size = batch_size
        self._predict = None

    def setup(self):
        model = self._factory()
        # One trace for every batch size (a shard's last batch is smaller), inference mode.
        self._predict = tf.function(
            lambda pixels: model(pixels, training=False),
            input_signature=[tf.TensorSpec([None, *self._size, 3], tf.float32)],
        )

    def process(self, job: tuple[str, str, str]) -> Iterable[tuple[str, int]]:
        split, source, target = job
        started, count = time.monotonic(), 0
        partial = target + ".partial"
        try:
            with tf.io.TFRecordWriter(partial) as writer:
                batches = records.image_dataset([source], self._size, self._batch_size, binary=False, with_ids=True)
                for pixels, labels, ids in batches:
                    values = self._predict(pixels).numpy()
                    for record_id, label, row in zip(ids.numpy(), labels.numpy(), values):
                        writer.write(feature_example(record_id, label, row))
                    count += len(ids)
        except tf.errors.InvalidArgumentError as exc:
            raise ValueError(f"{source}: an image could not be decoded after {count} records: {exc.message}") from None
        tf.io.gfile.rename(partial, target, overwrite=True)
        elapsed = time.monotonic() - started
        log.info("extract: %s %d images in %.1fs (%.1f images/s)", source, count, elapsed, count / max(elapsed, 1e-9))
        yield split, count


def extract(pipeline: beam.Pipeline, jobs: list[tuple[str, str, str]], model_factory: Callable, size, batch_size: int):
    """The extract graph: one work item per shard; returns (split, records) per shard."""
    return (
        pipeline
        | "Shards" >> beam.Create(jobs)
        | "Spread" >> beam.Reshuffle()
        | "Extract" >> beam.ParDo(ExtractShard(model_factory, size, batch_size))
    )
