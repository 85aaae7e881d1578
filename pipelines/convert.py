"""Beam + tf.Transform graph code of the convert stage.

manifest rows -> tf.Transform (label vocabulary analysed on the train rows only,
then one TransformDataset over every split) -> grouped by shard (ids, labels and file
names only) -> each shard's images read as it is written -> tf.Example ->
deterministic TFRecord shards per split.

tf.Transform sees only the manifest fields (label name, id, file, split); the
image bytes are read when a shard is written, after the grouping, so they never pass
through tf.Transform's batching nor a GroupByKey (which the DirectRunner holds in
memory): memory does not grow with the images' bytes. One analysis and one transform (rather than one
transform per split) halves the pipeline's fixed cost, which dominates at
thousands of images.

Each record holds the image as the download stage stored it (encoded JPEG/PNG
bytes), the label index, the label name and the manifest id. Shard membership
is a function of the id and records are sorted by id within a shard, so the same
manifest always gives byte-identical files, whatever the runner's ordering.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Iterable, Mapping

import apache_beam as beam
import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from apache_beam.io.filesystems import FileSystems
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from components.manifest import SPLITS
from pipelines import features as fk

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 10.0  # each worker logs the images it has read at most this often


def raw_metadata() -> dataset_metadata.DatasetMetadata:
    return dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(fk.raw_feature_spec()))


class SortedVocabulary(tft_beam.experimental.PTransformAnalyzer):
    """A tf.Transform analyzer: the distinct values of a string tensor, sorted, as an asset file.

    TFT's own vocabulary orders by frequency, so a class's index could change when
    counts change; sorted order keeps it stable (and matches Keras' folder order).
    The file goes to `directory` when given: its path ends up in the lookup
    table's name inside the SavedModel, so a fixed directory keeps the saved
    transform graph byte-identical from run to run.
    """

    def __init__(self, filename: str, directory: str | None = None):
        super().__init__()
        self._filename = filename
        self._directory = directory

    def expand(self, pcoll):
        directory = self._directory or os.path.join(self.base_temp_dir, "sorted_vocabulary")
        path = os.path.join(directory, self._filename)

        def write(tokens: list[bytes]) -> np.ndarray:
            tf.io.gfile.makedirs(directory)
            with tf.io.gfile.GFile(path, "wb") as handle:
                for token in sorted(tokens):
                    handle.write(token + b"\n")
            return np.array(path.encode())

        return (
            pcoll
            | "Tokens" >> beam.FlatMap(lambda batch: [bytes(t) for t in np.ravel(batch[0])])
            | "Distinct" >> beam.Distinct()
            | "ToList" >> beam.combiners.ToList()
            | "Write" >> beam.Map(write)
        )


def make_preprocessing_fn(vocabulary_dir: str | None = None):
    """The tf.Transform preprocessing_fn; `vocabulary_dir` fixes where the analysed vocabulary is written."""

    def preprocessing_fn(inputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Label name -> index through a vocabulary analysed on the training split."""
        (vocabulary,) = tft.experimental.ptransform_analyzer(
            inputs=[inputs[fk.LABEL_NAME]],
            ptransform=SortedVocabulary(fk.LABEL_VOCABULARY, vocabulary_dir),
            output_dtypes=[tf.string],
            output_shapes=[[]],
            output_asset_default_values=[b"__placeholder__"],
            name="label_vocabulary",
        )
        label = tft.apply_vocabulary(inputs[fk.LABEL_NAME], deferred_vocab_filename_tensor=vocabulary, default_value=-1)
        return {
            fk.LABEL: label,
            fk.LABEL_NAME: inputs[fk.LABEL_NAME],
            fk.ID: inputs[fk.ID],
            fk.FILE: inputs[fk.FILE],
            fk.SPLIT: inputs[fk.SPLIT],
        }

    return preprocessing_fn


preprocessing_fn = make_preprocessing_fn()


def parse_row(line: str) -> list[dict]:
    """A manifest line -> its row; none for a blank line, which the stage's own reader skips too
    (`components.manifest.iter_jsonl`): Beam's text reader passes it on."""
    return [json.loads(line)] if line.strip() else []


def raw_instance(row: Mapping) -> dict:
    """A manifest row -> the raw instance tf.Transform takes."""
    return {
        fk.LABEL_NAME: row["label"].encode("utf-8"),
        fk.ID: row["id"].encode("ascii"),
        fk.FILE: row["file"].encode("utf-8"),
        fk.SPLIT: row["split"].encode("ascii"),
    }


class KeyById(beam.DoFn):
    """A transformed instance -> (id, the instance without pixels): what is grouped into shards. The image
    bytes are read only when its shard is written, so the grouping holds a few hundred bytes an image
    (the DirectRunner materialises a GroupByKey in memory), not the images."""

    def process(self, instance: Mapping) -> Iterable[tuple[bytes, dict]]:
        record_id = _as_bytes(instance[fk.ID])
        yield (
            record_id,
            {
                fk.ID: record_id,
                fk.LABEL: int(np.asarray(instance[fk.LABEL]).reshape(())),
                fk.LABEL_NAME: _as_bytes(instance[fk.LABEL_NAME]),
                fk.FILE: _as_bytes(instance[fk.FILE]),
            },
        )


class WriteShard(beam.DoFn):
    """(shard index, its keyed instances) -> one TFRecord file, records sorted by id, each image's bytes read
    from disk as it is written; emits (split, records written)."""

    def __init__(self, images_root: str, prefix: str, num_shards: int, split: str):
        self._root, self._prefix, self._num_shards, self._split = images_root, prefix, num_shards, split

    def setup(self):
        self._read, self._started = 0, time.monotonic()
        self._reported = self._started

    def read(self, record_id: bytes, file: bytes) -> bytes:
        path = FileSystems.join(self._root, file.decode("utf-8"))
        try:
            with FileSystems.open(path, compression_type="uncompressed") as handle:
                data = handle.read()
        except Exception as exc:  # the manifest promised this file
            raise FileNotFoundError(f"manifest row {record_id.decode()}: cannot read {path}: {exc}") from exc
        self._read += 1
        now = time.monotonic()
        if now - self._reported >= PROGRESS_SECONDS:
            self._reported = now
            log.info(
                "convert: %d %s images read by this worker (%.0f images/s)",
                self._read,
                self._split,
                self._read / max(now - self._started, 1e-9),
            )
        return data

    def process(self, shard: tuple[int, Iterable]) -> Iterable[tuple[str, int]]:
        index, items = shard
        records = sorted((item for item in items if item is not None), key=lambda kv: kv[0])
        tf.io.gfile.makedirs(os.path.dirname(self._prefix))
        with tf.io.TFRecordWriter(shard_path(self._prefix, index, self._num_shards)) as writer:
            for record_id, instance in records:
                writer.write(to_example({**instance, fk.IMAGE: self.read(record_id, instance[fk.FILE])}))
        yield self._split, len(records)


def to_example(instance: Mapping) -> bytes:
    """A transformed instance -> a serialised tf.Example (deterministic bytes)."""
    label = int(np.asarray(instance[fk.LABEL]).reshape(()))
    if label < 0:
        name = _as_bytes(instance[fk.LABEL_NAME]).decode("utf-8")
        raise ValueError(f"class {name!r} is not in the label vocabulary learned from the train split")

    def b(value) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[_as_bytes(value)]))

    feature = {
        fk.IMAGE: b(instance[fk.IMAGE]),
        fk.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        fk.LABEL_NAME: b(instance[fk.LABEL_NAME]),
        fk.ID: b(instance[fk.ID]),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def _as_bytes(value) -> bytes:
    value = np.asarray(value).reshape(-1)[0] if isinstance(value, np.ndarray) else value
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def shard_of(record_id: bytes | str, num_shards: int) -> int:
    record_id = record_id.decode("ascii") if isinstance(record_id, bytes) else record_id
    return int(record_id[:12], 16) % num_shards


def shard_path(prefix: str, index: int, num_shards: int) -> str:
    return f"{prefix}-{index:05d}-of-{num_shards:05d}.tfrecord"


class WriteShards(beam.PTransform):
    """(id, keyed instance) pairs -> `num_shards` TFRecord files, each sorted by id (`WriteShard`).

    Every shard file is written, empty or not, so readers can rely on the count.
    Emits (split, records written) per shard.
    """

    def __init__(self, images_root: str, prefix: str, num_shards: int, split: str):
        super().__init__()
        self._root = images_root
        self._prefix = prefix
        self._num_shards = num_shards
        self._split = split

    def expand(self, pcoll):
        n = self._num_shards
        markers = pcoll.pipeline | "ShardIndices" >> beam.Create([(i, None) for i in range(n)])
        keyed = pcoll | "KeyByShard" >> beam.Map(lambda kv: (shard_of(kv[0], n), kv))
        return (
            (keyed, markers)
            | "WithEmptyShards" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(WriteShard(self._root, self._prefix, n, self._split))
        )


def convert(
    pipeline: beam.Pipeline,
    manifest_path: str,
    images_root: str,
    records_dir: str,
    transform_dir: str,
    shards: Mapping[str, int],
    temp_dir: str,
) -> beam.PCollection:
    """Build the whole convert graph on `pipeline`; returns (split, count) per shard.

    `temp_dir` must be reachable by every worker; a fixed path keeps the saved
    transform graph byte-identical across runs.
    """
    rows = (
        pipeline
        | "ReadManifest" >> beam.io.ReadFromText(manifest_path)
        | "ParseRows" >> beam.FlatMap(parse_row)
        | "RawInstances" >> beam.Map(raw_instance)
    )
    train = rows | "TrainOnly" >> beam.Filter(lambda inst: inst[fk.SPLIT] == b"train")
    metadata = raw_metadata()
    with tft_beam.Context(temp_dir=temp_dir):
        analyze = tft_beam.AnalyzeDataset(make_preprocessing_fn(os.path.join(temp_dir, "label_vocabulary")))
        transform_fn = (train, metadata) | "AnalyzeTrain" >> analyze
        transformed, _ = ((rows, metadata), transform_fn) | "TransformAll" >> tft_beam.TransformDataset()
        _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(transform_dir)
    parts = transformed | "BySplit" >> beam.Partition(
        lambda inst, _: SPLITS.index(_as_bytes(inst[fk.SPLIT]).decode()), len(SPLITS)
    )
    counts = []
    for split, part in zip(SPLITS, parts):
        counts.append(
            part
            | f"KeyById{split.title()}" >> beam.ParDo(KeyById())
            | f"Write{split.title()}"
            >> WriteShards(images_root, os.path.join(records_dir, split), shards[split], split)
        )
    return tuple(counts) | "AllShardCounts" >> beam.Flatten()
