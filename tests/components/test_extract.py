import functools
import json

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
beam = pytest.importorskip("apache_beam")

from apache_beam.testing.test_pipeline import TestPipeline  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402

from components import conv_base, extract  # noqa: E402
from components.params import ParamsError  # noqa: E402
from pipelines import extract as graph  # noqa: E402
from pipelines import features as fk  # noqa: E402
from pipelines import records  # noqa: E402

BASE = conv_base.ConvBaseParams(name="mobilenet_v2", weights="none", input_size=(32, 32), pooling="avg")


@pytest.fixture
def convert_dir(converted_tiny):
    return converted_tiny


def read_features(files, size):
    spec = fk.features_feature_spec(size)
    return [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset([str(f) for f in files])]


def test_extract_stage_counts_shapes_and_order(convert_dir, tmp_path):
    config = extract.Config(BASE, extract.ExtractParams(batch_size=4))
    record = extract.run(config, convert_dir, tmp_path / "out")
    expected = json.loads((convert_dir / "summary.json").read_text())["records"]
    assert record["records"] == expected and record["feature_shape"] == [1280]
    for name in extract.DECLARED_OUTPUTS:
        assert (tmp_path / "out" / name).exists()
    for shard in sorted((convert_dir / "records").glob("*.tfrecord")):
        source_ids = [tf.io.parse_single_example(r, fk.record_feature_spec())[fk.ID].numpy() for r in tf.data.TFRecordDataset(str(shard))]
        rows = read_features([tmp_path / "out" / "features" / shard.name], 1280)
        assert [r[fk.ID].numpy() for r in rows] == source_ids  # same order, one output shard per input shard
        assert all(np.isfinite(r[fk.FEATURES].numpy()).all() for r in rows)


def test_beam_graph_with_test_pipeline_matches_a_direct_predict(convert_dir, tmp_path):
    shard = sorted((convert_dir / "records").glob("val-*.tfrecord"))[0]
    target = tmp_path / shard.name
    factory = functools.partial(conv_base.build_extractor, BASE)  # pickled to the worker, built in setup()
    with TestPipeline() as pipeline:
        counts = graph.extract(pipeline, [("val", str(shard), str(target))], factory, (32, 32), 3)
        assert_that(counts, equal_to([("val", sum(1 for _ in tf.data.TFRecordDataset(str(shard))))]))
    rows = read_features([target], 1280)
    pixels = np.concatenate([p.numpy() for p, _, _ in records.image_dataset([str(shard)], (32, 32), 100, binary=False, with_ids=True)])
    direct = factory().predict_on_batch(pixels)
    np.testing.assert_allclose(np.stack([r[fk.FEATURES].numpy() for r in rows]), direct, rtol=1e-4, atol=1e-5)


def test_bad_base_params_stop_before_any_work(convert_dir, tmp_path):
    bad = BASE.model_copy(update={"layer": "no_such_layer"})
    with pytest.raises(ParamsError, match=r"conv_base\.layer: .* has no layer 'no_such_layer'"):
        extract.run(extract.Config(bad, extract.ExtractParams()), convert_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ParamsError, match=r"conv_base: .*exactly one of name"):
        from components.params import parse_section

        parse_section(conv_base.ConvBaseParams, "conv_base", {"name": "vgg16", "path": "x.keras"})
    with pytest.raises(ParamsError, match=r"conv_base\.input_size: must be \[height, width\]"):
        from components.params import parse_section

        parse_section(conv_base.ConvBaseParams, "conv_base", {"input_size": [0]})


def test_undecodable_image_is_a_clear_error(tmp_path):
    shard = tmp_path / "train-00000-of-00001.tfrecord"
    example = tf.train.Example(features=tf.train.Features(feature={
        fk.IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"not an image"])),
        fk.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[0])),
        fk.LABEL_NAME: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"cats"])),
        fk.ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"abc"])),
    }))
    with tf.io.TFRecordWriter(str(shard)) as writer:
        writer.write(example.SerializeToString())
    factory = functools.partial(conv_base.build_extractor, BASE)
    with pytest.raises(Exception, match="could not be decoded after 0 records"):
        with TestPipeline() as pipeline:
            graph.extract(pipeline, [("train", str(shard), str(tmp_path / "out.tfrecord"))], factory, (32, 32), 2)
    assert not (tmp_path / "out.tfrecord").exists()
