"""Reading the convert stage's image TFRecords: one parse/decode for extraction,
fine-tuning and evaluation (serving uses the same `pipelines.image` decode).

`image_dataset` is the training input pipeline: parallel parse and decode, an
optional cache of the decoded pixels, shuffling, batching, augmentation of whole
batches after the cache (so it differs every epoch), and prefetching so the next
batches are ready while the model trains. Inference (extract, evaluate, export)
reads with `decoded_batches`: the same parse and decode, traced once a run
(`record_decoder`), run by a pool of threads; no pipeline to build per file.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

from pipelines import features as fk
from pipelines import image


def image_record_spec() -> dict:
    """The parse spec of the fields every reader of convert's records needs: id, label, encoded image."""
    return {key: fk.record_feature_spec()[key] for key in (fk.ID, fk.LABEL, fk.IMAGE)}


def parse_image_record(serialized: tf.Tensor, size: tuple[int, int]) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """One convert record -> (id, label, float32 pixels at `size`) through the shared decode."""
    ex = tf.io.parse_single_example(serialized, image_record_spec())
    return ex[fk.ID], ex[fk.LABEL], image.decode_and_resize(ex[fk.IMAGE], size)


RecordDecoder = Callable[[bytes], tuple[bytes, int, np.ndarray]]


def record_decoder(size: tuple[int, int]) -> RecordDecoder:
    """serialized convert record -> (id, label, float32 pixels at `size`) (`parse_image_record`), one a call.

    The function is traced here, once: a reader that decodes a few records at a time (extract shard by
    shard, evaluate split by split) builds no pipeline per call, where a `tf.data` pipeline cost ~0.8 s to
    build (tracing the decode) and ~0.3 s to start here, whatever its size. It runs on the CPU, as a
    `tf.data` map does, so its pixels are `image_dataset`'s bit for bit on any machine
    (tests/pipelines/test_records.py). TensorFlow releases the GIL while it decodes, so threads run calls
    in parallel (`decoded_batches`).
    """

    def parse(serialized):
        with tf.device("/CPU:0"):
            return parse_image_record(serialized, size)

    traced = tf.function(parse).get_concrete_function(tf.TensorSpec([], tf.string))

    def decode(serialized: bytes) -> tuple[bytes, int, np.ndarray]:
        record_id, label, pixels = traced(tf.constant(serialized))
        return record_id.numpy(), int(label), pixels.numpy()

    return decode


def decoded_batches(
    files: list[str],
    decode: RecordDecoder,
    batch_size: int,
    pool: concurrent.futures.Executor,
    *,
    only: list[int] | None = None,
    ahead: int = 2,
) -> Iterator[tuple[list[bytes], np.ndarray, np.ndarray]]:
    """(ids, int64 labels, pixels) batches of the records of `files` in order, or of those at the positions
    `only` (counted over the files), each record decoded by `decode` on `pool`'s threads, `ahead` batches
    ahead of the consumer: besides the batches the consumer holds, `ahead` decoded or decoding batches and
    the one being filled, whatever the files' size. A consumer that stops early cancels what is queued."""
    wanted = None if only is None else set(only)
    last = None if only is None else max(only, default=-1)
    batch: list = []
    pending: collections.deque = collections.deque()

    def collect(futures: list) -> tuple[list[bytes], np.ndarray, np.ndarray]:
        rows = [future.result() for future in futures]
        return [r[0] for r in rows], np.array([r[1] for r in rows], np.int64), np.stack([r[2] for r in rows])

    try:
        for index, serialized in enumerate(tf.data.TFRecordDataset(files).as_numpy_iterator()):
            if wanted is not None:
                if index > last:
                    break
                if index not in wanted:
                    continue
            batch.append(pool.submit(decode, serialized))
            if len(batch) == batch_size:
                pending.append(batch)
                batch = []
                if len(pending) > ahead:
                    yield collect(pending.popleft())
        if batch:
            pending.append(batch)
            batch = []
        while pending:
            yield collect(pending.popleft())
    finally:
        for future in [f for queued in pending for f in queued] + batch:
            future.cancel()


def parse_feature_record(serialized: tf.Tensor, feature_size: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """One extract feature record -> (id, label, float32 features [feature_size])."""
    ex = tf.io.parse_single_example(serialized, fk.features_feature_spec(feature_size))
    return ex[fk.ID], ex[fk.LABEL], ex[fk.FEATURES]


def feature_records(files: list[str], feature_size: int) -> tf.data.Dataset:
    """(id, label, features) of extract's feature records, in the files' order."""
    return tf.data.TFRecordDataset(files).map(
        lambda serialized: parse_feature_record(serialized, feature_size),
        num_parallel_calls=os.cpu_count() or 1,
        deterministic=True,
    )


def encoded_by_id(files: list[str], wanted: set[str], decode: RecordDecoder) -> dict[str, tuple[bytes, np.ndarray]]:
    """The encoded bytes and decoded pixels (`decode`'s) of the image records with these ids."""
    found = {}
    for serialized in tf.data.TFRecordDataset(files).as_numpy_iterator():
        ex = tf.io.parse_single_example(serialized, image_record_spec())
        record_id = ex[fk.ID].numpy().decode()
        if record_id in wanted:
            found[record_id] = (ex[fk.IMAGE].numpy(), decode(serialized)[2])
    return found


def fixed_parallelism() -> tf.data.Options:
    # Fixed parallelism and tf.data's autotuner off: with it on, about one shard
    # in three stalled for ~5 s here (10.3 s instead of 5.4 s for 340 images).
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def image_dataset(
    files: list[str],
    size: tuple[int, int],
    batch_size: int,
    *,
    binary: bool,
    shuffle_seed: int | None = None,
    shuffle_buffer: int = 4096,
    augment: Callable[[tf.Tensor], tf.Tensor] | None = None,
    cache: bool | str = False,
    with_ids: bool = False,
) -> tf.data.Dataset:
    """(pixels, label) batches (or (pixels, label, id) with `with_ids`) of TFRecord files.

    Labels are float32 for a sigmoid (two-class) model, int64 otherwise.
    Without `shuffle_seed` the order is the files' order, so predictions line up
    with ids. `augment` maps a float32 pixel batch to an augmented one.
    """
    workers = os.cpu_count() or 1

    def parse(serialized):
        record_id, label, pixels = parse_image_record(serialized, size)
        label = tf.cast(label, tf.float32) if binary else label
        return (pixels, label, record_id) if with_ids else (pixels, label)

    ds = tf.data.TFRecordDataset(files).map(parse, num_parallel_calls=workers, deterministic=True)
    if cache:
        ds = ds.cache() if cache is True else ds.cache(cache)  # a path: on disk, memory flat in the dataset size
    if shuffle_seed is not None:
        ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(lambda pixels, *rest: (augment(pixels), *rest), num_parallel_calls=workers, deterministic=True)
    return ds.prefetch(2).with_options(fixed_parallelism())


def split_files(folder, split: str) -> list[str]:
    """The sorted shard files of one split (``<split>-NNNNN-of-MMMMM.tfrecord``) in a folder; an error if none."""
    files = sorted(str(p) for p in Path(folder).glob(f"{split}-*.tfrecord"))
    if not files:
        raise ValueError(f"no {split} files in {folder}")
    return files
