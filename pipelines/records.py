"""Reading the convert stage's image TFRecords: one parse/decode for extraction,
fine-tuning and evaluation (serving uses the same `pipelines.image` decode).

`image_dataset` is the training input pipeline. It reads records by number
(`RecordReader`: an index of where each record lies), so that shuffling is a
seeded permutation of all the records each epoch, with no buffer of images in
memory; optionally it decodes every record once, first, into a cache of decoded
pixels (`PixelStore`: a file, or memory); then batching, augmentation of whole
batches after the cache (so it differs every epoch), and prefetching so the next
batches are ready while the model trains. Inference (extract, evaluate, export)
reads with `decoded_batches`: the same parse and decode, traced once a run
(`record_decoder`), run by a pool of threads; no pipeline to build per file.
"""

from __future__ import annotations

import array
import collections
import concurrent.futures
import contextlib
import itertools
import os
import re
import struct
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

import google_crc32c
import numpy as np
import tensorflow as tf

from pipelines import features as fk
from pipelines import image


def image_record_spec() -> dict:
    """The parse spec of the fields every reader of convert's records needs: id, label, encoded image."""
    return {key: fk.record_feature_spec()[key] for key in (fk.ID, fk.LABEL, fk.IMAGE)}


@image.plain
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

    traced = tf.function(parse, autograph=False).get_concrete_function(tf.TensorSpec([], tf.string))

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
    ahead of the consumer (`decoded_stream`)."""
    serialized = serialized_records(files)
    if only is not None:
        wanted, last = set(only), max(only, default=-1)
        serialized = (
            s
            for index, s in itertools.takewhile(lambda pair: pair[0] <= last, enumerate(serialized))
            if index in wanted
        )
    return decoded_stream(serialized, decode, batch_size, pool, ahead=ahead)


def decoded_stream(
    serialized: Iterable[bytes],
    decode: RecordDecoder,
    batch_size: int,
    pool: concurrent.futures.Executor,
    *,
    ahead: int = 2,
) -> Iterator[tuple[list[bytes], np.ndarray, np.ndarray]]:
    """(ids, int64 labels, pixels) batches of the `serialized` records in order, each decoded by `decode` on
    `pool`'s threads, `ahead` batches ahead of the consumer: besides the batches the consumer holds, `ahead`
    decoded or decoding batches and the one being filled, whatever the number of records. A consumer that stops
    early cancels what is queued."""
    batch: list = []
    pending: collections.deque = collections.deque()

    def collect(futures: list) -> tuple[list[bytes], np.ndarray, np.ndarray]:
        rows = [future.result() for future in futures]
        return [r[0] for r in rows], np.array([r[1] for r in rows], np.int64), np.stack([r[2] for r in rows])

    try:
        for record in serialized:
            batch.append(pool.submit(decode, record))
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


def serialized_records(files: list[str]) -> Iterator[bytes]:
    """The records of `files` in order; a damaged or truncated file is an error naming it (TensorFlow's own
    DataLossError named neither the file nor what to do)."""
    for path in files:
        try:
            yield from tf.data.TFRecordDataset(path).as_numpy_iterator()
        except tf.errors.DataLossError as exc:
            detail = " ".join(re.sub(r"\{\{.*?\}\}|\[Op:\w+\]|\bname:", "", str(exc.message)).split())[:200]
            raise ValueError(
                f"{path}: a damaged or truncated TFRecord ({detail}): re-run the stage that wrote it"
            ) from None


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


class _Closing:
    """Reads in flight and a close that waits for them: a file's descriptor is closed only when no thread is
    between taking it and its `pread`, so a read never lands on a number the OS has given to another file,
    and a read after the close is a clear error."""

    def __init__(self, what: str):
        self.what, self.closed, self._active = what, False, 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._changed:
            if self.closed:
                raise ValueError(f"{self.what} is closed")
            self._active += 1
        try:
            yield
        finally:
            with self._changed:
                self._active -= 1
                if not self._active:
                    self._changed.notify_all()

    def close(self, release: Callable[[], None]) -> None:
        """Refuse new reads, wait for those in flight, then `release` (once, however often called)."""
        with self._changed:
            if self.closed:
                return
            self.closed = True
            while self._active:
                self._changed.wait()
        release()


class _Closable:
    """`close()` (idempotent, after the reads in flight: `_Closing`), a context manager and `__del__` for a
    class that sets `self._closing` once its resources are open and frees them in `_release`."""

    def _release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if getattr(self, "_closing", None) is not None:  # None: __init__ failed before opening anything
            self._closing.close(self._release)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


class FeatureSpool(_Closable):
    """[n, dim] float32 feature rows in a file, appended in batches and read a slice or a list of rows at a
    time (`pread`), so a reader holds only what it asked for, whatever n (`pipelines.near_duplicates.Rows`)."""

    def __init__(self, path: str | Path, dim: int):
        self.path, self.dim, self._rows = Path(path), int(dim), 0
        self._row_bytes = 4 * self.dim
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._closing = _Closing(f"the feature spool {self.path}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self._rows, self.dim)

    def __len__(self) -> int:
        return self._rows

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected [n, {self.dim}] rows, got {rows.shape}")
        data = rows.tobytes()
        with self._closing.reading():
            written = os.pwrite(self._fd, data, self._rows * self._row_bytes)
        if written != len(data):
            raise OSError(f"{self.path}: wrote {written} of {len(data)} bytes")
        self._rows += len(rows)

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._rows)
            if step != 1:
                raise ValueError("FeatureSpool slices take no step")
            count = max(0, stop - start)
            with self._closing.reading():
                data = os.pread(self._fd, count * self._row_bytes, start * self._row_bytes)
            return np.frombuffer(data, np.float32).reshape(count, self.dim).copy()
        numbers = np.asarray(index, np.int64)
        out = np.empty((len(numbers), self.dim), np.float32)
        with self._closing.reading():
            for k, n in enumerate(numbers.tolist()):
                if not 0 <= n < self._rows:
                    raise IndexError(f"row {n} of {self._rows}")
                out[k] = np.frombuffer(os.pread(self._fd, self._row_bytes, n * self._row_bytes), np.float32)
        return out

    def _release(self) -> None:
        """Close the file: a deleted spool's disk space is freed now."""
        os.close(self._fd)


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


def _masked_crc(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class RecordReader(_Closable):
    """Random access to the records of TFRecord files by number (counted over the files in order).

    Opening reads every file once to index the records (file, offset, length: 20 bytes a record) and checks
    each record's framing and both checksums, as TensorFlow's reader does, so a damaged file is an error
    here, naming the file and byte, and never parsed. Reads (`read`) are one `pread` each, safe from threads.
    """

    def __init__(self, files: list[str]):
        self.files = list(files)
        file_of, offsets, lengths = array.array("i"), array.array("q"), array.array("q")
        for number, path in enumerate(self.files):
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                position = 0
                while position < size:
                    header = f.read(12)
                    if len(header) < 12 or struct.unpack("<I", header[8:])[0] != _masked_crc(header[:8]):
                        raise ValueError(f"{path}: a damaged TFRecord header at byte {position}")
                    (length,) = struct.unpack("<Q", header[:8])
                    data = f.read(length)
                    footer = f.read(4)
                    if len(data) < length or len(footer) < 4 or struct.unpack("<I", footer)[0] != _masked_crc(data):
                        raise ValueError(f"{path}: a damaged or truncated TFRecord at byte {position}")
                    file_of.append(number)
                    offsets.append(position + 12)
                    lengths.append(length)
                    position += 12 + length + 4
        self._file_of = np.frombuffer(file_of, np.int32)
        self._offsets = np.frombuffer(offsets, np.int64)
        self._lengths = np.frombuffer(lengths, np.int64)
        self._fds = [os.open(path, os.O_RDONLY) for path in self.files]
        self._closing = _Closing(f"the RecordReader of {len(self.files)} files")

    def __len__(self) -> int:
        return len(self._offsets)

    def read(self, number: int) -> bytes:
        with self._closing.reading():
            return os.pread(self._fds[self._file_of[number]], int(self._lengths[number]), int(self._offsets[number]))

    def read_op(self, number: tf.Tensor) -> tf.Tensor:
        """`read` as a TensorFlow op: the serialized record (a scalar string) of a record number tensor."""
        serialized = tf.numpy_function(lambda n: self.read(int(n)), [number], tf.string, stateful=False)
        serialized.set_shape([])
        return serialized

    def _release(self) -> None:
        """Close the files. A dataset reading through `read_op` keeps this reader alive as long as the process
        (TensorFlow holds a `numpy_function`'s Python function on the eager default graph), so `__del__` alone
        would never free its descriptors: pass `resources` to the dataset builders, which `close()` it."""
        for fd in self._fds:
            os.close(fd)


def _owned(resource, resources: contextlib.ExitStack | None):
    """`resource`, to be closed when `resources` exits (if given)."""
    if resources is not None:
        resources.callback(resource.close)
    return resource


def record_numbers(count: int, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """0..count-1 in order, or (with `shuffle_seed`) a new seeded permutation of them every epoch: a full
    shuffle whose state is tf.data's shuffle buffer of all the numbers (a scalar tensor each: tens of bytes a
    record, no data of the records)."""
    ds = tf.data.Dataset.range(count)
    if shuffle_seed is not None:
        ds = ds.shuffle(max(count, 1), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds


def serialized_batches(
    files: list[str],
    batch_size: int,
    shuffle_seed: int | None = None,
    *,
    resources: contextlib.ExitStack | None = None,
) -> tf.data.Dataset:
    """Batches (string vectors) of the serialized records of TFRecord files, in the files' order or, with
    `shuffle_seed`, in a new seeded permutation every epoch (`record_numbers`), read from the files a batch
    at a time (`RecordReader`): memory grows with the number of records only by the shuffle's numbers.
    `resources`: closes the reader's files when it exits (the dataset cannot be iterated after that);
    without it they stay open until the process exits (`RecordReader._release`)."""
    reader = _owned(RecordReader(files), resources)

    def read(numbers):
        serialized = tf.numpy_function(
            lambda ns: np.array([reader.read(int(n)) for n in ns], dtype=object), [numbers], tf.string, stateful=False
        )
        serialized.set_shape([None])
        return serialized

    numbers = record_numbers(len(reader), shuffle_seed).batch(batch_size)
    return numbers.map(read, num_parallel_calls=2, deterministic=True)


class PixelStore(_Closable):
    """Decoded float32 pixels of records, record i in slot i: in a file (memory flat in the number of images)
    or in memory (H x W x 3 x 4 bytes an image), with each record's label and id (in memory: small).

    Filled once, when made, with `record_decoder`'s pixels of all the records, in order, by a pool of threads;
    read a slot at a time (`read`, one `pread` for a file), safe from threads.
    """

    def __init__(self, files: list[str], size: tuple[int, int], path: str | Path | None = None):
        self.shape = (size[0], size[1], 3)
        self._slot = int(np.prod(self.shape)) * 4
        self.path = None if path is None else Path(path)
        labels, ids, chunks = array.array("q"), [], []
        workers = os.cpu_count() or 1
        out = None if self.path is None else open(self.path, "wb")
        try:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                for batch_ids, batch_labels, pixels in decoded_batches(files, record_decoder(size), 64, pool):
                    ids += batch_ids
                    labels.extend(batch_labels.tolist())
                    if out is None:
                        chunks.append(pixels)
                    else:
                        out.write(np.ascontiguousarray(pixels, np.float32).tobytes())
        finally:
            if out is not None:
                out.close()
        self.labels = np.frombuffer(labels, np.int64)
        self.ids = ids
        if out is None:
            self._pixels = np.concatenate(chunks) if chunks else np.zeros((0, *self.shape), np.float32)
            self._fd = None
        else:
            self._pixels = None
            self._fd = os.open(self.path, os.O_RDONLY)
        self._closing = _Closing("the PixelStore")

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, number: int) -> np.ndarray:
        with self._closing.reading():
            if self._fd is None:
                return self._pixels[number]
            data = os.pread(self._fd, self._slot, number * self._slot)
        return np.frombuffer(data, np.float32).reshape(self.shape)

    def _release(self) -> None:
        """Free the pixels: the in-memory array, or the file's descriptor (and with it a deleted cache file's
        disk space). See `RecordReader._release` for why `__del__` is not enough."""
        fd, self._fd, self._pixels = self._fd, None, None
        if fd is not None:
            os.close(fd)


def image_dataset(
    files: list[str],
    size: tuple[int, int],
    batch_size: int,
    *,
    binary: bool,
    shuffle_seed: int | None = None,
    augment: Callable[[tf.Tensor], tf.Tensor] | None = None,
    cache: bool | str | Path = False,
    with_ids: bool = False,
    resources: contextlib.ExitStack | None = None,
) -> tf.data.Dataset:
    """(pixels, label) batches (or (pixels, label, id) with `with_ids`) of TFRecord files.

    Records are read by number. Without `shuffle_seed` the order is the files' order, so predictions line
    up with ids; with it, every epoch is a new seeded permutation of all the records (a full shuffle, whose
    state is a shuffle buffer of record numbers, `record_numbers`, no buffer of images). `cache`: False decodes every
    record every epoch; True decodes them all once, first, and keeps the pixels in memory; a path keeps them
    in that file (memory flat in the dataset size). The elements and their order are the same whatever the
    cache, so the model is too. Labels are float32 for a sigmoid (two-class) model, int64 otherwise.
    `augment` maps a float32 pixel batch to an augmented one (after the cache: new variants every epoch).
    `resources`: frees the reader's files or the cache's pixels when it exits (the dataset cannot be
    iterated after that); without it they are held until the process exits (`RecordReader._release`).
    """
    workers = os.cpu_count() or 1
    if cache is False:
        reader = _owned(RecordReader(files), resources)
        count = len(reader)

        def element(number):
            return parse_image_record(reader.read_op(number), size)

    else:
        store = _owned(PixelStore(files, size, None if cache is True else cache), resources)
        count = len(store)

        def fetch(n):
            n = int(n)
            return store.read(n), store.labels[n], store.ids[n]

        def element(number):
            pixels, label, record_id = tf.numpy_function(
                fetch, [number], (tf.float32, tf.int64, tf.string), stateful=False
            )
            pixels.set_shape(store.shape)
            label.set_shape([])
            record_id.set_shape([])
            return record_id, label, pixels

    def finish(record_id, label, pixels):
        label = tf.cast(label, tf.float32) if binary else label
        return (pixels, label, record_id) if with_ids else (pixels, label)

    ds = record_numbers(count, shuffle_seed)
    ds = ds.map(lambda number: finish(*element(number)), num_parallel_calls=workers, deterministic=True)
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
