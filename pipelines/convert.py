"""Beam + tf.Transform graph code of the convert stage.

manifest rows -> image bytes -> tf.Transform (label vocabulary analysed on train
only, applied to every split) -> tf.Example -> deterministic TFRecord shards.

Each record holds the image as the download stage stored it (encoded JPEG/PNG
bytes), the label index, the label name and the manifest id. Shard membership
is a function of the id and records are sorted by id within a shard, so the same
manifest always gives byte-identical files, whatever the runner's ordering.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

import apache_beam as beam
import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from apache_beam.io.filesystems import FileSystems
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from pipelines import features as fk

SPLITS = ("train", "val", "test")


def raw_metadata() -> dataset_metadata.DatasetMetadata:
    return dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(fk.raw_feature_spec()))


class SortedVocabulary(tft_beam.experimental.PTransformAnalyzer):
    """A tf.Transform analyzer: the distinct values of a string tensor, sorted, as an asset file.

    TFT's own vocabulary orders by frequency, so a class's index could change when
    counts change; sorted order keeps it stable (and matches Keras' folder order).
    """

    def __init__(self, filename: str):
        super().__init__()
        self._filename = filename

    def expand(self, pcoll):
        temp_dir = self.base_temp_dir
        filename = self._filename

        def write(tokens: list[bytes]) -> np.ndarray:
            path = os.path.join(temp_dir, "sorted_vocabulary", filename)
            tf.io.gfile.makedirs(os.path.dirname(path))
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


def preprocessing_fn(inputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Label name -> index through a vocabulary analysed on the training split."""
    (vocabulary,) = tft.experimental.ptransform_analyzer(
        inputs=[inputs[fk.LABEL_NAME]],
        ptransform=SortedVocabulary(fk.LABEL_VOCABULARY),
        output_dtypes=[tf.string],
        output_shapes=[[]],
        output_asset_default_values=[b"__placeholder__"],
        name="label_vocabulary",
    )
    label = tft.apply_vocabulary(
        inputs[fk.LABEL_NAME], deferred_vocab_filename_tensor=vocabulary, default_value=-1
    )
    return {
        fk.IMAGE: inputs[fk.IMAGE],
        fk.LABEL: label,
        fk.LABEL_NAME: inputs[fk.LABEL_NAME],
        fk.ID: inputs[fk.ID],
    }


class LoadImage(beam.DoFn):
    """A manifest row -> the raw instance tf.Transform takes (image bytes, label name, id)."""

    def __init__(self, images_root: str):
        self._root = images_root

    def process(self, row: Mapping) -> Iterable[dict]:
        path = FileSystems.join(self._root, row["file"])
        try:
            with FileSystems.open(path, compression_type="uncompressed") as handle:
                data = handle.read()
        except Exception as exc:  # the manifest promised this file
            raise FileNotFoundError(f"manifest row {row['id']} ({row['source']}): cannot read {path}: {exc}") from exc
        yield {fk.IMAGE: data, fk.LABEL_NAME: row["label"].encode("utf-8"), fk.ID: row["id"].encode("ascii")}


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
    """(id, serialised example) pairs -> `num_shards` TFRecord files, each sorted by id.

    Every shard file is written, empty or not, so readers can rely on the count.
    Emits (split, records written) per shard.
    """

    def __init__(self, prefix: str, num_shards: int, split: str):
        super().__init__()
        self._prefix = prefix
        self._num_shards = num_shards
        self._split = split

    def expand(self, pcoll):
        n, prefix, split = self._num_shards, self._prefix, self._split

        def write(shard: tuple[int, Iterable]) -> tuple[str, int]:
            index, items = shard
            records = sorted(item for item in items if item is not None)
            tf.io.gfile.makedirs(os.path.dirname(prefix))
            with tf.io.TFRecordWriter(shard_path(prefix, index, n)) as writer:
                for _, serialized in records:
                    writer.write(serialized)
            return split, len(records)

        markers = pcoll.pipeline | "ShardIndices" >> beam.Create([(i, None) for i in range(n)])
        keyed = pcoll | "KeyByShard" >> beam.Map(lambda kv: (shard_of(kv[0], n), kv))
        return (
            (keyed, markers)
            | "WithEmptyShards" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "Write" >> beam.Map(write)
        )


def read_manifest(pipeline: beam.Pipeline, manifest_path: str) -> dict[str, beam.PCollection]:
    """The manifest rows of each split."""
    rows = (
        pipeline
        | "ReadManifest" >> beam.io.ReadFromText(manifest_path)
        | "ParseRows" >> beam.Map(json.loads)
    )
    parts = rows | "BySplit" >> beam.Partition(lambda row, _: SPLITS.index(row["split"]), len(SPLITS))
    return dict(zip(SPLITS, parts))


def convert(
    pipeline: beam.Pipeline,
    manifest_path: str,
    images_root: str,
    records_dir: str,
    transform_dir: str,
    shards: Mapping[str, int],
    temp_dir: str,
) -> beam.PCollection:
    """Build the whole convert graph on `pipeline`; returns (split, count) per shard."""
    rows = read_manifest(pipeline, manifest_path)
    raw = {split: rows[split] | f"Load{split.title()}" >> beam.ParDo(LoadImage(images_root)) for split in SPLITS}
    metadata = raw_metadata()
    with tft_beam.Context(temp_dir=temp_dir):
        (train, _), transform_fn = (raw["train"], metadata) | "AnalyzeAndTransformTrain" >> tft_beam.AnalyzeAndTransformDataset(
            preprocessing_fn
        )
        transformed = {"train": train}
        for split in SPLITS[1:]:
            transformed[split], _ = ((raw[split], metadata), transform_fn) | f"Transform{split.title()}" >> tft_beam.TransformDataset()
        _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(transform_dir)
    counts = []
    for split in SPLITS:
        counts.append(
            transformed[split]
            | f"Encode{split.title()}" >> beam.Map(lambda inst: (_as_bytes(inst[fk.ID]), to_example(inst)))
            | f"Write{split.title()}" >> WriteShards(os.path.join(records_dir, split), shards[split], split)
        )
    return tuple(counts) | "AllShardCounts" >> beam.Flatten()
