"""Beam graph code of the extract stage: a frozen conv base over TFRecord shards.

One work item per input shard, read once as it comes: the worker hashes each record's image bytes and
looks it up in the content-keyed feature cache (`pipelines.feature_cache`);
only the misses are decoded (the shared decode/resize, one traced function per
worker run by a pool of threads a few batches ahead; no input pipeline to build
per shard) and go through the base, in fixed-size batches, and into the cache.
Each record's id, label and key go to a file of the worker's (tens of bytes a record), from which the output
shard is then written in the input's order from the cache. Memory holds a few batches whatever the size of the
shard or the dataset (one id and key per record of a shard, held until 2026-12-07, grew with the shard); the
decoder is built once per worker, and the model too, only when a shard has a miss. A worker runs two shards at once
(`SHARDS_AT_ONCE`; one on Dask), so that one's start and end, when few batches are in flight, leave fewer cores idle:
the same bytes, 1.20-1.42x the images a second with OpenVINO and 1.04-1.17x with TensorFlow on 2,000 photos
(`benchmarks/extract_throughput.py --shards`, 2026-12-08).

**Why a fixed batch shape:** on a CPU an image's features can differ in the last
bits with the batch it shares: oneDNN computes the last few positions of a batch
by another code path than the rest, and which path depends on the batch size
(measured here: Lite0 at 160 differs in the last slot of a batch, MobileNetV2 at
32 in the last two, at 96 in the last three or four). So the base always runs on
one batch shape, `batch_size` images plus a few blank tail slots, and a worker
checks on its first batch shape that the tail is long enough: the same random
images give the same bits reversed and in a half-full batch. It doubles the
tail until they do (and runs images one at a time if none of 1..16 does). A
batch of fewer images (a shard's last, or its few new images) runs in the
smallest power-of-two batch that gives the same bits, checked the first time it
is needed, so a cold run does not pay to probe batch shapes it never uses. The
plan is noted in the cache's namespace for later runs. Then a run that extracts
only new images writes the same bytes as a cold run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import shutil
import struct
import tempfile
import threading
import time
import uuid
from typing import Callable, Iterable, Iterator

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from pipelines import feature_cache, fingerprint, records, runtimes
from pipelines import features as fk

log = logging.getLogger(__name__)

COMPUTED = "images_computed"  # Beam counter: images that went through the base (not from the cache)


def feature_example(record_id: bytes, label: int, values: np.ndarray) -> bytes:
    feature = {
        fk.ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[record_id])),
        fk.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        # a list, not the array: protobuf converts numpy scalars one by one, 3x slower (same bytes)
        fk.FEATURES: tf.train.Feature(float_list=tf.train.FloatList(value=values.astype(np.float32).ravel().tolist())),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def _records_of(source: str) -> Iterator[tuple[bytes, int, str, bytes]]:
    """(id, label, image key, serialized record) of every record of a shard, in order, read as they come."""
    for serialized in records.serialized_records([source]):
        fields = tf.train.Example.FromString(serialized).features.feature
        try:
            record_id = fields[fk.ID].bytes_list.value[0]
            label = int(fields[fk.LABEL].int64_list.value[0])
            image_bytes = fields[fk.IMAGE].bytes_list.value[0]
        except IndexError:
            raise ValueError(
                f"{source}: a record without its {fk.ID}, {fk.LABEL} or {fk.IMAGE}: not a convert record; re-run convert"
            ) from None
        yield record_id, label, feature_cache.image_key(image_bytes), serialized


_ROW_HEAD = struct.Struct("<Hq32s")  # a spooled row: the id's length, the label, the key's 32 bytes; then the id


def _spool_row(spool, record_id: bytes, label: int, key: str) -> None:
    spool.write(_ROW_HEAD.pack(len(record_id), label, bytes.fromhex(key)) + record_id)


def _spooled_rows(spool) -> Iterator[tuple[bytes, int, str]]:
    """The rows `_spool_row` wrote, from the start of the file, in order."""
    spool.seek(0)
    while head := spool.read(_ROW_HEAD.size):
        size, label, key = _ROW_HEAD.unpack(head)
        yield spool.read(size), label, key.hex()


TAILS = (1, 2, 4, 8, 16)
# Batches the base runs at once: on 2 cores two concurrent batches gave 5-10% more images/s than one
# (each batch's ops leave cores idle); the features are the same bits either way (tested).
IN_FLIGHT = 2
# Shards a worker runs at once: one shard's start (filling the decode queue) and end (draining it, then writing
# its output from the cache, one thread) left the cores idle between shards; a second shard fills them.
SHARDS_AT_ONCE = 2
Predict = Callable[[np.ndarray], np.ndarray]


def padded_runner(model, size: tuple[int, int]) -> Callable[[np.ndarray, int], np.ndarray]:
    """(pixels [n], slots >= n) -> features [n], run as a [slots, h, w, 3] batch with blanks after the images.

    `model` is a Keras model (one trace serves every `slots`: a dynamic batch dimension, the kernels chosen
    per shape at run time) or a `runtimes.OpenVINOModel`.
    """
    if isinstance(model, runtimes.OpenVINOModel):
        predict = model.predict
    else:
        step = tf.function(
            lambda pixels: model(pixels, training=False), input_signature=[tf.TensorSpec([None, *size, 3], tf.float32)]
        )

        def predict(padded: np.ndarray) -> np.ndarray:
            return step(tf.constant(padded)).numpy()

    def run(pixels: np.ndarray, slots: int) -> np.ndarray:
        n = len(pixels)
        padded = np.zeros((slots, *size, 3), np.float32)
        padded[:n] = pixels
        return predict(padded)[:n]

    return run


def _agrees(run, images: np.ndarray, expected: np.ndarray, slots: int, *, in_order: bool = True) -> bool:
    """Do `images` in a [slots] batch give `expected`'s bits (in order), reversed and half-full?"""
    return (
        (not in_order or np.array_equal(run(images, slots), expected))
        and np.array_equal(run(images[::-1], slots)[::-1], expected)
        and np.array_equal(run(images[1::2], slots), expected[1::2])
    )


def _probe_images(size: tuple[int, int], batch_size: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (batch_size, *size, 3)).astype(np.float32)


def plan_tail(run, probe: np.ndarray) -> tuple[dict, np.ndarray | None]:
    """The shortest of `TAILS` with which a full batch of probe images gives the same bits
    reversed and half-full: ({"tail": t, "fills": [batch_size]}, their features), or ({"tail": None}, None)."""
    batch_size = len(probe)
    for tail in TAILS:
        reference = run(probe, batch_size + tail)
        if batch_size == 1 or _agrees(run, probe, reference, batch_size + tail, in_order=False):
            return {"tail": tail, "fills": [batch_size]}, reference
    return {"tail": None}, None


def batch_predictor(
    model,
    size: tuple[int, int],
    batch_size: int,
    plan: dict | None = None,
    on_change: Callable[[dict], None] | None = None,
) -> tuple[Predict, dict]:
    """A predictor of up to `batch_size` images whose features do not depend on their batch, and its plan.

    The plan (`plan_tail`; or one an earlier run noted, which skips that probe)
    fixes the blank tail. Without a tail that works, images run one at a time.
    A batch of n < `batch_size` images runs in the smallest power-of-two fill
    f >= n whose [f + tail] batch gives the full batch's bits; each fill is
    probed the first time it could serve, and kept in the plan as one of
    "fills" or "rejected" (`on_change` gets the plan then, to note it). A cold
    run whose shards end in large remainders so never probes a small fill.
    """
    run = padded_runner(model, size)
    probe = reference = None  # made on the first probe: a noted plan whose fills serve needs neither
    if plan is None:
        probe = _probe_images(size, batch_size)
        plan, reference = plan_tail(run, probe)
    plan = dict(plan)
    if plan["tail"] is None:
        return (lambda pixels: np.concatenate([run(pixels[i : i + 1], 1) for i in range(len(pixels))])), plan
    tail = plan["tail"]
    fills, rejected = set(plan["fills"]) | {batch_size}, set(plan.get("rejected", ()))
    lock = threading.Lock()  # batches may run concurrently; one probes a fill at a time

    def fill_for(n: int) -> int:
        nonlocal probe, reference
        f = 1 << max(0, n - 1).bit_length()  # the smallest power of two >= n
        with lock:
            while f < batch_size:
                if f not in fills and f not in rejected:
                    if reference is None:
                        probe = _probe_images(size, batch_size)
                        reference = run(probe, batch_size + tail)
                    agrees = _agrees(run, probe[:f], reference[:f], f + tail)
                    (fills if agrees else rejected).add(f)
                    plan.update(fills=sorted(fills), rejected=sorted(rejected))
                    if on_change:
                        on_change(plan)
                if f in fills:
                    return f
                f *= 2
        return batch_size

    def predict(pixels: np.ndarray) -> np.ndarray:
        return run(pixels, fill_for(len(pixels)) + tail)

    return predict, plan


# settings a runner gives its workers (Dask's nanny: OMP_NUM_THREADS=1), which key a worker's own namespace; any
# other machine setting (oneDNN's ISA caps, TF_ENABLE_ONEDNN_OPTS) differing from the launcher's is an error
RUNNER_SETTINGS = ("OMP_NUM_THREADS",)


class ExtractShard(beam.DoFn):
    """(split, input shard, output shard) -> writes the features; emits (split, records, computed)."""

    def __init__(
        self,
        model_factory: Callable,
        size: tuple[int, int],
        batch_size: int,
        cache_root: str | None,
        namespace: dict,
        feature_shape: list[int],
        shards_at_once: int | None = None,
    ):
        self._factory = model_factory
        self._at_once = shards_at_once or SHARDS_AT_ONCE
        self._size = tuple(size)
        self._batch_size = batch_size
        self._cache_root = cache_root
        self._namespace = namespace
        self._feature_shape = list(feature_shape)
        self._predict = None
        self._cache = None
        self._scratch = None
        self._spools = None
        self._decode = None
        self._decoders = None
        self._inference = None
        self._shards = None
        self._pending = None
        self._model_lock = None
        self._computed = beam.metrics.Metrics.counter("extract", COMPUTED)

    def setup(self):
        # A worker unlike the launcher computes other features than the shared cache's namespace names. Settings
        # a runner gives its workers (Dask's nanny sets OMP_NUM_THREADS=1) key the worker's own namespace; another
        # machine, library or code would make the output depend on where a shard ran: an error.
        namespace = self._namespace
        differ = feature_cache.local_differences(namespace) if self._cache_root is not None else []
        if differ:
            here = fingerprint.machine_record()["environment"]
            others = [
                {k: v for k, v in env.items() if k not in RUNNER_SETTINGS}
                for env in (here, namespace.get("environment", {}))
            ]
            fatal = [field for field in differ if field != "environment" or others[0] != others[1]]
            if fatal:
                raise RuntimeError(
                    f"extract: this worker's {', '.join(fatal)} differ from those of the process that started the "
                    "stage, whose feature-cache namespace it would write under: run the workers on the launcher's "
                    "machine type, libraries and project code (the same container, or --setup_file from the same "
                    "checkout)"
                )
            namespace = {**namespace, "environment": here}
        root = self._cache_root
        if root is None:  # no shared cache: a private one, for this worker's lifetime
            self._scratch = tempfile.mkdtemp(prefix="extract-cache-")
            root = self._scratch
        # a namespace of the worker's own names the launcher's, which extract's metrics record: cache_gc keeps both
        derived = feature_cache.namespace_of(self._namespace) if namespace is not self._namespace else None
        self._cache = feature_cache.FeatureCache(root, namespace, self._feature_shape, derived_from=derived)
        # the shards' row spools beside the cache where it is a local folder (the system's temporary folder may be
        # a tmpfs, RAM), nameless files that no listing of it shows
        self._spools = None if "://" in root else root
        self._decode = records.record_decoder(self._size)
        self._decoders = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="decode")
        self._inference = concurrent.futures.ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="extract")
        self._shards = concurrent.futures.ThreadPoolExecutor(self._at_once, thread_name_prefix="shard")
        self._pending = collections.deque()
        self._model_lock = threading.Lock()

    def teardown(self):
        for pool in (self._shards, self._inference, self._decoders):
            if pool:
                pool.shutdown(cancel_futures=True)
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def _model(self):
        with self._model_lock:  # shards run at once: the first to miss builds it, the other waits
            return self._built_model()

    def _built_model(self):
        if self._predict is None:  # built on the first miss: a shard fully in the cache never loads the base
            started = time.monotonic()
            note = f"batches-{self._batch_size}"
            known = self._cache.get_note(note)
            self._predict, plan = batch_predictor(
                self._factory(),
                self._size,
                self._batch_size,
                known,
                on_change=lambda plan: self._cache.put_note(note, plan),
            )
            if not known:
                self._cache.put_note(note, plan)
            tail = plan["tail"]
            log.info(
                "extract: base ready in %.1fs; batches of %d images run with %s",
                time.monotonic() - started,
                self._batch_size,
                f"{tail} blank tail slot(s)"
                if tail
                else "one image at a time (no tail gave batch-independent features)",
            )
        return self._predict

    def _scan_and_compute(self, source: str, spool, redo: frozenset[str] = frozenset()) -> tuple[int, int]:
        """Read the shard once: spool each record's (id, label, key) to `spool`, and run the base over the records
        the cache lacks (or whose keys are in `redo`: entries found unusable) as they come, storing their features.
        Memory: the batches in flight, whatever the shard's size. Returns (records, computed)."""
        counts = {"records": 0, "computed": 0}
        keys: collections.deque = collections.deque()  # of the records sent to the base, in order: those in flight

        def misses() -> Iterator[bytes]:
            for record_id, label, key, serialized in _records_of(source):
                _spool_row(spool, record_id, label, key)
                counts["records"] += 1
                if key in redo or not self._cache.has(key):
                    counts["computed"] += 1
                    keys.append(key)
                    yield serialized

        running: collections.deque = collections.deque()

        def store(future) -> None:
            for row in future.result():
                self._cache.put(keys.popleft(), row)

        done = 0
        try:
            for _, _, batch in records.decoded_stream(misses(), self._decode, self._batch_size, self._decoders):
                running.append(self._inference.submit(self._model(), batch))  # the base loads on the first miss only
                done += len(batch)
                if len(running) == IN_FLIGHT:
                    store(running.popleft())
            while running:
                store(running.popleft())
        except tf.errors.InvalidArgumentError as exc:
            raise ValueError(
                f"{source}: an image could not be decoded after {done} new records: {exc.message}"
            ) from None
        finally:  # an error: none of this shard's batches left running
            concurrent.futures.wait(running)
        return counts["records"], counts["computed"]

    def _write(self, target: str, spool) -> list[str]:
        """Write the output shard from the cache in the spooled rows' order; or, where entries are unusable
        (damaged in place: `FeatureCache.get`'s checksum; or gone), write nothing and return their keys."""
        unusable: list[str] = []
        partial = f"{target}.partial-{uuid.uuid4().hex}"  # two attempts at one shard (a retried bundle) write apart
        try:
            with tf.io.TFRecordWriter(partial) as writer:
                for record_id, label, key in _spooled_rows(spool):
                    values = self._cache.get(key)
                    if values is None:
                        unusable.append(key)
                    elif not unusable:
                        writer.write(feature_example(record_id, label, values))
            if not unusable:
                tf.io.gfile.rename(partial, target, overwrite=True)
        finally:  # a failed attempt leaves nothing in the output folder (a retry's output would carry it)
            if tf.io.gfile.exists(partial):
                tf.io.gfile.remove(partial)
        return unusable

    def start_bundle(self):
        # a bundle given up while a shard ran (a runner that reuses this worker): none of its shards still writing
        concurrent.futures.wait(self._pending)
        self._pending.clear()

    def process(self, job: tuple[str, str, str]) -> Iterable[tuple[str, int, int]]:
        """Starts the shard beside the one running, and emits the oldest's counts once `shards_at_once` run (every
        element is in the global window, so its counts may go out with a later element; the rest at the bundle's
        end)."""
        self._pending.append(self._shards.submit(self.run_shard, job))
        while len(self._pending) >= self._at_once or (self._pending and self._pending[0].done()):
            yield self._finished()

    def finish_bundle(self):
        while self._pending:
            yield WindowedValue(self._finished(), MIN_TIMESTAMP, [GlobalWindow()])

    def _finished(self) -> tuple[str, int, int]:
        """The oldest running shard's counts, once it is done; its error, once no other shard is still running
        (a failed bundle leaves nothing writing behind it)."""
        try:
            split, total, computed = self._pending[0].result()
        except BaseException:
            for other in self._pending:
                other.cancel()
            concurrent.futures.wait(self._pending)
            for other in list(self._pending)[1:]:
                if not other.cancelled() and other.exception() is not None:
                    log.error("extract: another shard failed too: %s", other.exception())
            self._pending.clear()
            raise
        self._pending.popleft()
        self._computed.inc(computed)  # here, in the bundle's thread: zero too, a runner with metrics always reports it
        return split, total, computed

    def run_shard(self, job: tuple[str, str, str]) -> tuple[str, int, int]:
        """One shard, whole: its features computed or read from the cache and its output written; its counts."""
        split, source, target = job
        started = time.monotonic()
        # each record's (id, label, key) in a file of the worker's for the writing pass (tens of bytes a record;
        # held in memory they grew with the shard), then the features from the cache in the records' order
        with tempfile.TemporaryFile(prefix="extract-rows-", dir=self._spools) as spool:
            total, computed = self._scan_and_compute(source, spool)
            unusable = self._write(target, spool)
            if unusable:  # damaged or gone since the scan: computed again from the shard, once
                log.warning(
                    "extract: %s: %d feature cache entries damaged or gone (e.g. %s); computing them again",
                    source,
                    len(unusable),
                    unusable[0],
                )
                spool.seek(0)
                spool.truncate()
                # replaced, never deleted: another worker meeting the same entry may have stored a good one already
                total, again = self._scan_and_compute(source, spool, frozenset(unusable))
                computed = min(total, computed + again)  # images computed, each counted once at most
                unusable = self._write(target, spool)
                if unusable:
                    raise RuntimeError(
                        f"{source}: the feature cache lost {len(unusable)} entries while writing, twice (e.g. key "
                        f"{unusable[0]}): is another process deleting entries (tools.cache_gc during a run)?"
                    )
        elapsed = time.monotonic() - started
        log.info(
            "extract: %s %d images (%d computed, %d from the cache) in %.1fs",
            source,
            total,
            computed,
            total - computed,
            elapsed,
        )
        return split, total, computed


def extract(
    pipeline: beam.Pipeline,
    jobs: list[tuple[str, str, str]],
    model_factory: Callable,
    size,
    batch_size: int,
    *,
    cache_root: str | None = None,
    namespace: dict | None = None,
    feature_shape: list[int],
    shards_at_once: int | None = None,
):
    """The extract graph: one work item per shard; returns (split, records, computed) per shard.

    `cache_root` is the feature cache's folder (local or a bucket), shared by runs;
    without it each worker uses a private one (every image is computed).
    `namespace` is `feature_cache.namespace_record` of the base.
    `shards_at_once` is the shards a worker runs at once (`SHARDS_AT_ONCE` unless given).
    """
    return (
        pipeline
        | "Shards" >> beam.Create(jobs)
        | "Spread" >> beam.Reshuffle()
        | "Extract"
        >> beam.ParDo(
            ExtractShard(model_factory, size, batch_size, cache_root, namespace or {}, feature_shape, shards_at_once)
        )
    )
