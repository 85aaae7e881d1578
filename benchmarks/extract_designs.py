"""Three Beam designs for the extract stage, timed on the same TFRecords in one script.

    python -m benchmarks.extract_designs ../shared/data/cats_vs_dogs_2000 \
        ../shared/models/efficientnet_lite0_imagenet_notop.keras [--size 160] [--work DIR]

  shard-dofn     the extract stage as built: one work item per shard, tf.data decode
                 in parallel with inference, streaming writes (`extract.run`)
  runinference   Beam's RunInference (KeyedModelHandler over TFModelHandlerNumpy,
                 batches of 32, `predict_on_batch` as inference_fn) after a per-element
                 decode Map, written with WriteToTFRecord
  batch-dofn     a plain DoFn with BatchElements (32) after the same per-element decode

Each design starts without a built model (load included), DirectRunner defaults.
Prints images/s of each and the ratio to the first. Features of all designs are
checked to agree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

BATCH = 32


def decode_element(size):
    """serialized record -> ((id, label), pixels) with the stage's own parse and decode, per element."""
    from pipelines.records import parse_image_record

    def fn(serialized: bytes):
        record_id, label, pixels = parse_image_record(serialized, size)
        return (record_id.numpy(), int(label.numpy())), pixels.numpy()

    return fn


def predict_batches_dofn(factory):
    """A DoFn over BatchElements batches of ((id, label), pixels)."""
    import apache_beam as beam
    import numpy as np

    from pipelines.extract import feature_example

    class PredictBatches(beam.DoFn):
        def setup(self):
            self._model = factory()

        def process(self, batch):
            values = self._model.predict_on_batch(np.stack([p for _, p in batch]))
            for ((record_id, label), _), row in zip(batch, values):
                yield feature_example(record_id, label, row)

    return PredictBatches()


def run_design(name, convert_dir: Path, out: Path, base_path: str, size, factory) -> float:
    import apache_beam as beam
    import numpy as np
    from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
    from apache_beam.ml.inference.tensorflow_inference import ModelType, TFModelHandlerNumpy

    from pipelines.extract import feature_example

    files = str(convert_dir / "records" / "*.tfrecord")
    out.mkdir(parents=True)
    started = time.perf_counter()
    with beam.Pipeline() as p:
        decoded = p | "Read" >> beam.io.ReadFromTFRecord(files) | "Decode" >> beam.Map(decode_element(size))
        if name == "runinference":

            def inference_fn(model, batch, inference_args, model_id=None):
                values = model.predict_on_batch(np.stack(batch))
                return [PredictionResult(x, y) for x, y in zip(batch, values)]

            # SAVED_MODEL loads through tf.keras, which is tf_keras once tf.Transform was
            # imported (TF_USE_LEGACY_KERAS=1) and cannot read a Keras 3 model; so the
            # handler builds the model with our factory and loads saved weights.
            handler = KeyedModelHandler(
                TFModelHandlerNumpy(
                    base_path,
                    model_type=ModelType.SAVED_WEIGHTS,
                    create_model_fn=factory,
                    inference_fn=inference_fn,
                    min_batch_size=BATCH,
                    max_batch_size=BATCH,
                )
            )
            examples = (
                decoded
                | "RunInference" >> RunInference(handler)
                | "Encode" >> beam.Map(lambda kv: feature_example(kv[0][0], kv[0][1], np.asarray(kv[1].inference)))
            )
        else:
            examples = (
                decoded
                | "Batch" >> beam.BatchElements(min_batch_size=BATCH, max_batch_size=BATCH)
                | "Predict" >> beam.ParDo(predict_batches_dofn(factory))
            )
        examples | "Write" >> beam.io.WriteToTFRecord(str(out / "features"), file_name_suffix=".tfrecord")
    return time.perf_counter() - started


def read_all(files) -> dict:
    import tensorflow as tf

    from pipelines import features as fk

    spec = {fk.ID: tf.io.FixedLenFeature([], tf.string), fk.FEATURES: tf.io.VarLenFeature(tf.float32)}
    rows = {}
    for r in tf.data.TFRecordDataset([str(f) for f in files]):
        ex = tf.io.parse_single_example(r, spec)
        rows[ex[fk.ID].numpy()] = tf.sparse.to_dense(ex[fk.FEATURES]).numpy()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("base", type=Path)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import functools
    import logging

    import numpy as np

    logging.basicConfig(level=logging.WARNING)
    from benchmarks.extract_throughput import prepare
    from components import conv_base, extract

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_designs_"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    size = (args.size, args.size)
    convert_dir = prepare(args.folder, work)
    base = conv_base.ConvBaseParams(name=None, path=str(args.base.resolve()), input_size=size, pooling="avg")
    extractor_file = work / "extractor.weights.h5"
    conv_base.build_extractor(base).save_weights(extractor_file)
    factory = functools.partial(conv_base.build_extractor, base)

    seconds = {}
    started = time.perf_counter()
    extract.run(extract.Config(base, extract.ExtractParams(batch_size=BATCH)), convert_dir, work / "shard-dofn")
    seconds["shard-dofn"] = time.perf_counter() - started
    for name in ("runinference", "batch-dofn"):
        seconds[name] = run_design(name, convert_dir, work / name, str(extractor_file), size, factory)

    reference = read_all(sorted((work / "shard-dofn" / "features").glob("*.tfrecord")))
    n = len(reference)
    agree = {}
    for name in ("runinference", "batch-dofn"):
        rows = read_all(sorted((work / name).glob("*.tfrecord")))
        agree[name] = bool(len(rows) == n and all(np.allclose(rows[k], reference[k], atol=1e-3) for k in reference))
    print(
        json.dumps(
            {
                "images": n,
                "seconds": {k: round(v, 2) for k, v in seconds.items()},
                "images_per_s": {k: round(n / v, 1) for k, v in seconds.items()},
                "ratio_to_shard_dofn": {k: round(seconds["shard-dofn"] / v, 3) for k, v in seconds.items()},
                "features_agree_with_shard_dofn": agree,
            },
            indent=2,
        )
    )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    from components.cli import run_main

    run_main(main)
