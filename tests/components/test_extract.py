import functools
import json
from pathlib import Path

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
from tests.conftest import make_converted, tree_bytes  # noqa: E402

BASE = conv_base.ConvBaseParams(name="mobilenet_v2", weights="none", input_size=(32, 32), pooling="avg")


@pytest.fixture
def convert_dir(converted_tiny):
    return converted_tiny


@pytest.fixture
def imagenet_cache(tmp_path, monkeypatch):
    """Keras's download cache (~/.keras) moved to a fresh folder; `put(fill)` writes MobileNetV2's ImageNet
    no-top weights file into it (every weight `fill`: the test needs a file of those names and shapes, not
    ImageNet's values, which cannot be downloaded here)."""
    import h5py
    import keras
    from keras.src.backend import config
    from keras.src.legacy.saving import legacy_h5_format

    home = tmp_path / "keras_home"
    (home / "models").mkdir(parents=True)
    monkeypatch.setattr(config, "_KERAS_DIR", str(home))
    model = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(224, 224, 3))

    def put(fill: float) -> None:
        for weight in model.weights:
            weight.assign(np.full(weight.shape, fill, weight.dtype))
        with h5py.File(home / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)

    return put


def test_imagenet_weights_from_the_keras_cache_are_named_by_their_digest(imagenet_cache):
    # The download cache is no declared dependency and Keras checks no hash of MobileNetV2's file: features
    # computed with one file must not be read back for another.
    from pipelines import feature_cache

    params = BASE.model_copy(update={"weights": "imagenet"})
    imagenet_cache(0.01)
    first = conv_base.fingerprint(params)
    assert first == conv_base.fingerprint(params)
    imagenet_cache(0.02)  # the file in the cache replaced
    second = conv_base.fingerprint(params)
    assert first["imagenet_weights_sha256"] != second["imagenet_weights_sha256"]
    namespace = [feature_cache.namespace_of(feature_cache.namespace_record(f, 4)) for f in (first, second)]
    assert namespace[0] != namespace[1]
    # A worker whose cache holds another file than the launcher's stops instead of computing features.
    extract.base_on_runtime(params, "tensorflow", None, second["imagenet_weights_sha256"])
    with pytest.raises(conv_base.BaseWeightsOffline, match="not those the stage was started with"):
        extract.base_on_runtime(params, "tensorflow", None, first["imagenet_weights_sha256"])


def test_a_worker_unlike_the_launcher_stops_before_it_writes_under_its_namespace(tmp_path):
    # A Beam worker gets the launcher's namespace record: one on another machine type, with other libraries or
    # other code, would write features computed otherwise under it, and a later run on the launcher would read
    # them as its own.
    from pipelines import feature_cache

    launcher = feature_cache.namespace_record(conv_base.fingerprint(BASE), 4)
    assert feature_cache.local_differences(launcher) == []
    shard = graph.ExtractShard(lambda: None, (32, 32), 4, str(tmp_path / "cache"), launcher, [8])
    shard.setup()  # like the launcher: fine
    shard.teardown()
    elsewhere = {**launcher, "tensorflow": "2.99.0", "cpus": 96, "code": {**launcher["code"], "pipelines.extract": "0"}}
    assert feature_cache.local_differences(elsewhere) == ["code", "cpus", "tensorflow"]
    shard = graph.ExtractShard(lambda: None, (32, 32), 4, str(tmp_path / "cache"), elsewhere, [8])
    with pytest.raises(RuntimeError, match="this worker's code, cpus, tensorflow differ from those of the process"):
        shard.setup()
    assert not (tmp_path / "cache" / feature_cache.namespace_of(elsewhere)).exists()
    # a setting the runner gives its workers (Dask's nanny: OMP_NUM_THREADS=1) keys the worker's own namespace
    other_settings = {**launcher, "environment": {"OMP_NUM_THREADS": "7"}}
    shard = graph.ExtractShard(lambda: None, (32, 32), 4, str(tmp_path / "cache"), other_settings, [8])
    shard.setup()
    assert shard._cache.folder.endswith(feature_cache.namespace_of(launcher))
    assert not (tmp_path / "cache" / feature_cache.namespace_of(other_settings)).exists()
    shard.teardown()
    # any other kernel setting (oneDNN's ISA cap) would make the features depend on where a shard ran: an error
    capped = {**launcher, "environment": {**launcher["environment"], "ONEDNN_MAX_CPU_ISA": "AVX2"}}
    shard = graph.ExtractShard(lambda: None, (32, 32), 4, str(tmp_path / "cache"), capped, [8])
    with pytest.raises(RuntimeError, match="this worker's environment differ"):
        shard.setup()


def test_a_worker_whose_saved_base_is_another_file_stops(tmp_path):
    # A worker reads conv_base.path from its own disk: it must be the file the launcher hashed.
    import keras

    saved = tmp_path / "models" / "base.keras"
    saved.parent.mkdir()
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3)).save(saved)
    params = conv_base.ConvBaseParams(name=None, path=str(saved), input_size=(32, 32), pooling="avg")
    launcher = conv_base.fingerprint(params)
    extract.base_on_runtime(params, "tensorflow", None, None, launcher)
    saved.write_bytes(saved.read_bytes() + b"\0")  # another file on this worker
    with pytest.raises(ParamsError, match="conv_base.path: .* is not the file the stage was started with"):
        extract.base_on_runtime(params, "tensorflow", None, None, launcher)


@pytest.fixture
def trained_base(tiny_base_weights):
    """BASE with fixed, non-degenerate weights: an untrained base's features are ~1e-12, alike for any image."""
    return BASE.model_copy(update={"weights": str(tiny_base_weights)})


def read_features(files, size):
    spec = fk.features_feature_spec(size)
    return [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset([str(f) for f in files])]


@pytest.mark.slow
def test_extract_stage_counts_shapes_and_order(convert_dir, tmp_path):
    config = extract.Config(BASE, extract.ExtractParams(batch_size=4))
    record = extract.run(config, convert_dir, tmp_path / "out")
    expected = json.loads((convert_dir / "summary.json").read_text())["records"]
    assert record["records"] == expected and record["feature_shape"] == [1280]
    for name in extract.DECLARED_OUTPUTS:
        assert (tmp_path / "out" / name).exists()
    for shard in sorted((convert_dir / "records").glob("*.tfrecord")):
        source_ids = [
            tf.io.parse_single_example(r, fk.record_feature_spec())[fk.ID].numpy()
            for r in tf.data.TFRecordDataset(str(shard))
        ]
        rows = read_features([tmp_path / "out" / "features" / shard.name], 1280)
        assert [r[fk.ID].numpy() for r in rows] == source_ids  # same order, one output shard per input shard
        assert all(np.isfinite(r[fk.FEATURES].numpy()).all() for r in rows)


@pytest.mark.slow
def test_beam_graph_with_test_pipeline_matches_a_direct_predict(convert_dir, trained_base, tmp_path):
    shard = sorted((convert_dir / "records").glob("val-*.tfrecord"))[0]
    target = tmp_path / shard.name
    factory = functools.partial(conv_base.build_extractor, trained_base)  # pickled to the worker, built in setup()
    with TestPipeline() as pipeline:
        counts = graph.extract(pipeline, [("val", str(shard), str(target))], factory, (32, 32), 3, feature_shape=[1280])
        n = sum(1 for _ in tf.data.TFRecordDataset(str(shard)))
        assert_that(counts, equal_to([("val", n, n)]))  # no cache given: every image computed
    extracted = {r[fk.ID].numpy(): r[fk.FEATURES].numpy() for r in read_features([target], 1280)}
    pixels, _, ids = next(iter(records.image_dataset([str(shard)], (32, 32), 100, binary=False, with_ids=True)))
    direct = dict(zip(ids.numpy(), factory().predict_on_batch(pixels.numpy())))
    assert sorted(extracted) == sorted(direct) and len(direct) >= 2
    scale = max(np.abs(v).max() for v in direct.values())
    assert scale > 0.1  # real activations, so a tolerance below can tell features apart
    for record_id, values in direct.items():  # each id carries its own image's features
        np.testing.assert_allclose(extracted[record_id], values, rtol=1e-4, atol=1e-4 * scale, err_msg=record_id)
    first, second = list(direct.values())[:2]
    assert np.abs(first - second).max() > 100 * 1e-4 * scale  # images differ well beyond the tolerance


def test_bad_base_params_stop_before_any_work(convert_dir, tmp_path):
    bad = BASE.model_copy(update={"layer": "no_such_layer"})
    with pytest.raises(ParamsError, match=r"conv_base\.layer: .* has no layer 'no_such_layer'"):
        extract.run(extract.Config(bad, extract.ExtractParams()), convert_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # found by a review on 2026-12-06: a saved base or weights file that is not there was a bare FileNotFoundError
    # (the fingerprint hashes it first), a saved base of a fixed other size Keras's ValueError from deep in the build
    for update, said in (
        ({"name": None, "path": str(tmp_path / "missing.keras")}, r"conv_base\.path: .*missing\.keras is not a file"),
        (
            {"weights": str(tmp_path / "missing.weights.h5")},
            r"conv_base\.weights: .*missing\.weights\.h5 is not a file",
        ),
    ):
        with pytest.raises(ParamsError, match=said):
            extract.run(
                extract.Config(BASE.model_copy(update=update), extract.ExtractParams()), convert_dir, tmp_path / "out"
            )
    import keras

    inputs = keras.Input((24, 24, 3))
    keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv")(inputs)).save(tmp_path / "fixed.keras")
    fixed = BASE.model_copy(update={"name": None, "path": str(tmp_path / "fixed.keras"), "weights": "none"})
    with pytest.raises(ParamsError, match=r"conv_base\.path: .*cannot take conv_base\.input_size .*expected shape"):
        extract.run(extract.Config(fixed, extract.ExtractParams()), convert_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ParamsError, match=r"conv_base: .*exactly one of name"):
        from components.params import parse_section

        parse_section(conv_base.ConvBaseParams, "conv_base", {"name": "vgg16", "path": "x.keras"})
    with pytest.raises(ParamsError, match=r"conv_base\.input_size: must be \[height, width\]"):
        from components.params import parse_section

        parse_section(conv_base.ConvBaseParams, "conv_base", {"input_size": [0]})


def test_undecodable_image_is_a_clear_error(tmp_path):
    shard = tmp_path / "train-00000-of-00001.tfrecord"
    example = tf.train.Example(
        features=tf.train.Features(
            feature={
                fk.IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"not an image"])),
                fk.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[0])),
                fk.LABEL_NAME: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"cats"])),
                fk.ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"abc"])),
            }
        )
    )
    with tf.io.TFRecordWriter(str(shard)) as writer:
        writer.write(example.SerializeToString())
    factory = functools.partial(conv_base.build_extractor, BASE)
    with pytest.raises(Exception, match="could not be decoded after 0 new records"):
        with TestPipeline() as pipeline:
            graph.extract(
                pipeline,
                [("train", str(shard), str(tmp_path / "out.tfrecord"))],
                factory,
                (32, 32),
                2,
                feature_shape=[1280],
            )
    assert not (tmp_path / "out.tfrecord").exists()


# --- the content-keyed feature cache -------------------------------------------------------------


@pytest.mark.slow
def test_new_images_are_the_only_ones_extracted_and_outputs_equal_a_cold_run(tmp_path, monkeypatch):
    config = extract.Config(BASE, extract.ExtractParams(batch_size=4))
    cache = str(tmp_path / "cache")
    convert_dir = make_converted(tmp_path / "data", per_class=6)

    cold = extract.run(config, convert_dir, tmp_path / "first", cache_root=cache, metrics_path=tmp_path / "m1.json")
    assert (cold["images"], cold["computed"], cold["from_cache"]) == (12, 12, 0)
    assert json.loads((tmp_path / "m1.json").read_text())["computed"] == 12
    warm = extract.run(config, convert_dir, tmp_path / "again", cache_root=cache)
    assert (warm["computed"], warm["from_cache"]) == (0, 12)
    assert tree_bytes(tmp_path / "again") == tree_bytes(tmp_path / "first")

    # Four images arrive: only they go through the base; the result equals a cold run's, byte for byte.
    convert_dir = make_converted(tmp_path / "data", per_class=2, start=100)
    incremental = extract.run(config, convert_dir, tmp_path / "incremental", cache_root=cache)
    assert (incremental["images"], incremental["computed"], incremental["from_cache"]) == (16, 4, 12)
    scratch = extract.run(config, convert_dir, tmp_path / "cold", cache_root=str(tmp_path / "empty_cache"))
    assert scratch["computed"] == 16
    assert tree_bytes(tmp_path / "incremental") == tree_bytes(tmp_path / "cold")
    monkeypatch.setattr(graph, "IN_FLIGHT", 1)  # one batch at a time gives the bits of two at once
    no_cache = extract.run(config, convert_dir, tmp_path / "uncached")  # a private cache per worker
    assert no_cache["computed"] == 16 and tree_bytes(tmp_path / "uncached") == tree_bytes(tmp_path / "cold")

    # Another input size is another namespace: nothing is reused (the namespace test covers the rest).
    other = extract.Config(BASE.model_copy(update={"input_size": (40, 40)}), config.extract)
    assert extract.run(other, convert_dir, tmp_path / "other", cache_root=cache)["computed"] == 16
    # So is another batch size (the batch's shape can change the last bits) ...
    other_batch = extract.Config(BASE, extract.ExtractParams(batch_size=3))
    assert extract.run(other_batch, convert_dir, tmp_path / "batch3", cache_root=cache)["computed"] == 16
    # ... and an edited decode: the namespace holds the hash of the decode module's source.
    from pipelines import feature_cache

    edited = {**feature_cache.code_fingerprint(), "pipelines.image": "0" * 64}
    monkeypatch.setattr(feature_cache, "code_fingerprint", lambda: edited)
    assert extract.run(config, convert_dir, tmp_path / "edited", cache_root=cache)["computed"] == 16


@pytest.mark.slow
def test_a_broken_cache_entry_is_recomputed_and_a_cached_namespace_skips_loading_the_base(
    tmp_path, converted_tiny, monkeypatch
):
    from pipelines import feature_cache

    config = extract.Config(BASE, extract.ExtractParams(batch_size=4))
    cache = tmp_path / "cache"
    first = extract.run(config, converted_tiny, tmp_path / "first", cache_root=str(cache))
    entries = sorted(cache.rglob("*" + feature_cache.SUFFIX))
    assert len(entries) == first["images"] == first["computed"]
    entries[0].write_bytes(entries[0].read_bytes()[:-4])  # a truncated write
    entries[1].unlink()
    # A review: an entry damaged in place, its size unchanged (zeros where a crash lost the data, bit rot), was read
    # as features. Its checksum fails now: the shard's scan takes it for present, its writing pass finds it
    # unusable, and the shard is done again with it computed.
    entries[2].write_bytes(bytes(len(entries[2].read_bytes())))
    entries[3].write_bytes(entries[3].read_bytes()[:8] + b"\x01" + entries[3].read_bytes()[9:])  # one byte flipped
    again = extract.run(config, converted_tiny, tmp_path / "again", cache_root=str(cache))
    assert again["computed"] == 4
    assert tree_bytes(tmp_path / "again") == tree_bytes(tmp_path / "first")
    monkeypatch.setattr(conv_base, "build_extractor", _no_base)  # all from the cache: the base is never built
    warm = extract.run(config, converted_tiny, tmp_path / "warm", cache_root=str(cache))
    assert warm["computed"] == 0
    assert tree_bytes(tmp_path / "warm") == tree_bytes(tmp_path / "first")


def _no_base(params):
    raise AssertionError("the base was built although every feature was in the cache")


def test_namespace_covers_what_decides_the_features(tmp_path, imagenet_cache):
    from pipelines import feature_cache

    def ns(**change):
        return feature_cache.namespace_of(
            feature_cache.namespace_record(conv_base.fingerprint(BASE.model_copy(update=change)), 4)
        )

    imagenet_cache(0.01)
    assert ns() == ns()
    assert feature_cache.namespace_of(feature_cache.namespace_record(conv_base.fingerprint(BASE), 8)) != ns()
    variants = [
        ns(input_size=(40, 40)),
        ns(pooling="max"),
        ns(layer="block_16_project"),
        ns(name="vgg16"),
        ns(weights="imagenet"),
    ]
    assert len({ns(), *variants}) == 6
    saved_a, saved_b = tmp_path / "a.keras", tmp_path / "b.keras"
    saved_a.write_bytes(b"one base")
    saved_b.write_bytes(b"another base")
    copy = tmp_path / "copy" / "a.keras"
    copy.parent.mkdir()
    copy.write_bytes(b"one base")
    saved = lambda path: ns(name=None, path=str(path))  # noqa: E731
    assert saved(saved_a) == saved(copy) != saved(saved_b)  # the file's content decides, not its path
    record = feature_cache.namespace_record(conv_base.fingerprint(BASE), 4)
    assert record["tensorflow"] == tf.__version__ and record["batch_size"] == 4
    assert set(record["code"]) == {
        "pipelines.image",
        "pipelines.records",
        "pipelines.bases",
        "pipelines.extract",  # the traced step, the padding and the batch plan: an edit can change the bits
        "components.conv_base",
    }


def test_code_fingerprint_follows_the_source_file(tmp_path, monkeypatch):
    from pipelines import feature_cache

    (tmp_path / "decode_probe.py").write_text("SCALE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = feature_cache.code_fingerprint(("decode_probe",))
    (tmp_path / "decode_probe.py").write_text("SCALE = 2\n")
    after = feature_cache.code_fingerprint(("decode_probe",))
    assert before["decode_probe"] != after["decode_probe"]
    assert (
        feature_cache.code_fingerprint()["pipelines.image"]
        == __import__("hashlib").sha256(open(__import__("pipelines.image").image.__file__, "rb").read()).hexdigest()
    )


def test_features_do_not_depend_on_the_batch_an_image_shares(converted_tiny, trained_base):
    shard = sorted((converted_tiny / "records").glob("train-*.tfrecord"))[0]
    pixels = np.concatenate([p.numpy() for p, _ in records.image_dataset([str(shard)], (32, 32), 100, binary=False)])
    n, model, noted = len(pixels), conv_base.build_extractor(trained_base), []
    predict, plan = graph.batch_predictor(model, (32, 32), n, on_change=lambda p: noted.append(p))
    assert plan["tail"] in graph.TAILS and plan["fills"] == [n] and not noted  # smaller batches are probed when needed
    together = predict(pixels)
    assert np.array_equal(predict(pixels[::-1])[::-1], together)
    for i in range(n):
        assert np.array_equal(predict(pixels[i : i + 1]), together[i : i + 1]), i
    for k in range(2, n):
        assert np.array_equal(predict(pixels[:k]), together[:k]), k
    final = noted[-1]
    assert 1 in final["fills"] + final["rejected"] and final["fills"][-1] == n
    again, _ = graph.batch_predictor(
        model, (32, 32), n, plan=final, on_change=lambda p: pytest.fail("re-probed a noted fill")
    )
    assert all(np.array_equal(again(pixels[:k]), together[:k]) for k in range(1, n + 1))


def test_a_batch_shape_that_changes_the_bits_is_rejected():
    class OddAtThree:  # a batch of exactly 3 images comes out shifted (as a kernel path change would)
        def __call__(self, pixels, training=False):
            flat = tf.reshape(pixels, [tf.shape(pixels)[0], -1])[:, :2]
            return flat + 1e-3 * tf.cast(tf.equal(tf.shape(pixels)[0], 3), tf.float32)

    predict, plan = graph.batch_predictor(OddAtThree(), (2, 2), 4)
    assert plan["tail"] == 1
    images = np.arange(4 * 2 * 2 * 3, dtype=np.float32).reshape(4, 2, 2, 3)
    expected = images.reshape(4, -1)[:, :2]
    for k in range(1, 5):
        np.testing.assert_array_equal(predict(images[:k]), expected[:k])
    assert plan["fills"] == [1, 4] and plan["rejected"] == [
        2
    ]  # 2 images + 1 tail slot is the odd shape: they run in a 4 + 1


def test_a_base_whose_features_depend_on_the_batch_runs_one_image_at_a_time():
    class Neighbourly:  # each image's output mixes in the batch's mean: no tail makes it independent
        def __call__(self, pixels, training=False):
            flat = tf.reshape(pixels, [tf.shape(pixels)[0], -1])
            return flat[:, :2] + tf.reduce_mean(flat[:, :2], axis=0, keepdims=True)

    predict, plan = graph.batch_predictor(Neighbourly(), (2, 2), 4)
    assert plan == {"tail": None}
    images = np.arange(3 * 2 * 2 * 3, dtype=np.float32).reshape(3, 2, 2, 3)
    np.testing.assert_array_equal(predict(images), 2 * images.reshape(3, -1)[:, :2])


@pytest.mark.slow
def test_a_record_lost_inside_the_beam_job_fails_the_stage(converted_tiny, tmp_path, monkeypatch):
    import itertools

    real_records = graph._records_of
    monkeypatch.setattr(  # a graph bug: one record per shard dropped
        graph, "_records_of", lambda source: itertools.islice(real_records(source), 1, None)
    )
    with pytest.raises(RuntimeError, match=r"feature records \{.*\} do not match the TFRecords"):
        extract.run(extract.Config(BASE, extract.ExtractParams(batch_size=4)), converted_tiny, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_killed_workers_partial_shard_is_left_out_of_the_output(converted_tiny, tmp_path, monkeypatch):
    """A worker killed mid-shard leaves its private `.partial-` file (no exception ran its clean-up); the runner's
    retry writes the shard, the counts pass, and the stray file went into `data/extract`, hashed by DVC."""
    real = graph.ExtractShard.process

    def killed_once(self, job):
        target = Path(job[2])
        (target.parent / f"{target.name}.partial-deadworker").write_bytes(b"half a shard")
        yield from real(self, job)

    monkeypatch.setattr(graph.ExtractShard, "process", killed_once)
    config = extract.Config(BASE, extract.ExtractParams(batch_size=4))
    extract.run(config, converted_tiny, tmp_path / "out")
    assert not [p.name for p in (tmp_path / "out" / extract.FEATURES_DIR).iterdir() if ".partial-" in p.name]
    monkeypatch.setattr(graph.ExtractShard, "process", real)
    extract.run(config, converted_tiny, tmp_path / "clean")
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "clean")


def test_computed_counts_come_from_committed_or_attempted_metrics_and_are_null_without_metrics():
    """`committed or 0` read a runner that reports attempted values only (Spark's portable batch mode) as nothing
    computed; only NotImplementedError meant "no metrics", so a job service without them failed the stage."""
    from apache_beam.metrics.execution import MetricKey, MetricResult
    from apache_beam.metrics.metricbase import MetricName

    def result_of(*counters, error=None):
        class Result:
            def metrics(self):
                if error:
                    raise error

                class Metrics:
                    def query(self, _filter):
                        return {"counters": list(counters)}

                return Metrics()

        return Result()

    def counter(committed, attempted):
        return MetricResult(MetricKey("step", MetricName("ns", "computed")), committed, attempted)

    assert extract.images_computed(result_of(counter(3, 3), counter(0, 0))) == 3
    assert extract.images_computed(result_of(counter(None, 5), counter(None, 2))) == 7  # attempted only
    assert extract.images_computed(result_of()) is None  # no counter at all: no metrics reported
    assert extract.images_computed(result_of(error=NotImplementedError())) is None
    assert extract.images_computed(result_of(error=RuntimeError("UNIMPLEMENTED: metrics"))) is None


def write_image_shard(path: Path, ids: list[bytes], labels: list[int]) -> list[str]:
    """A convert-like shard of tiny PNGs with distinct bytes (so distinct keys), one a record; returns their keys."""
    import io

    import tensorflow as tf
    from PIL import Image

    from pipelines import feature_cache

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(png, "PNG")
    keys = []
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i, (record_id, label) in enumerate(zip(ids, labels)):
            image_bytes = png.getvalue() + i.to_bytes(4, "big")
            keys.append(feature_cache.image_key(image_bytes))
            fields = {
                fk.ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[record_id])),
                fk.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                fk.IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=fields)).SerializeToString())
    return keys


def test_a_shards_memory_does_not_grow_with_its_records(tmp_path, monkeypatch):
    """A review: the worker held each record's id, label and key (about 320 bytes) for the whole shard, and convert's
    shard counts are fixed, so a worker's memory grew with the dataset. The rows now go to a file of the worker's
    while the shard is read once; Python's allocations peak at the same size for 300 and 3,000 records."""
    import tracemalloc

    import tensorflow as tf

    from pipelines import feature_cache

    config = extract.Config(BASE, extract.ExtractParams(batch_size=4))
    namespace = extract.cache_namespace(config)
    cache = feature_cache.FeatureCache(str(tmp_path / "cache"), namespace, [4])
    shard = graph.ExtractShard(None, (32, 32), 4, str(tmp_path / "cache"), namespace, [4])  # no miss: no base built
    shard.setup()
    peaks = {}
    try:
        for n in (20, 300, 3000):  # the first traces the decode and warms TensorFlow up: not compared
            source, target = tmp_path / f"in-{n}.tfrecord", tmp_path / f"out-{n}.tfrecord"
            keys = write_image_shard(source, [f"{i:020x}".encode() for i in range(n)], [i % 2 for i in range(n)])
            for i, key in enumerate(keys):
                cache.put(key, np.full(4, i, np.float32))
            tracemalloc.start()
            try:
                with monkeypatch.context() as patch:  # the spool goes beside the cache, not to a /tmp that may be RAM
                    made = []
                    real_file = graph.tempfile.TemporaryFile
                    patch.setattr(
                        graph.tempfile,
                        "TemporaryFile",
                        lambda made=made, real=real_file, **kw: made.append(kw.get("dir")) or real(**kw),
                    )
                    assert shard.run_shard(("train", str(source), str(target))) == ("train", n, 0)
                assert made == [str(tmp_path / "cache")]
                peaks[n] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            written = [
                records.parse_feature_record(r, 4) for r in tf.data.TFRecordDataset(str(target)).as_numpy_iterator()
            ]
            assert len(written) == n and float(written[-1][2].numpy()[0]) == n - 1  # in order, from the cache
    finally:
        shard.teardown()
    assert peaks[3000] < 1.3 * peaks[300] + 100_000, peaks  # held rows: ~320 B x 2,700 more records = 860 KB


def test_a_damaged_entry_is_replaced_never_deleted(tmp_path, monkeypatch):
    """A second read: the redo of a shard with a damaged entry deleted that entry first, so a worker meeting the same
    entry at once deleted the good one another had just stored, whose next pass then found it gone and failed. Now
    the redo computes the unusable keys again and replaces their entries."""
    import os

    import tensorflow as tf

    from pipelines import feature_cache

    namespace = extract.cache_namespace(extract.Config(BASE, extract.ExtractParams(batch_size=4)))
    source = tmp_path / "in.tfrecord"
    keys = write_image_shard(source, [b"id%d" % i for i in range(3)], [0, 0, 0])
    shard = graph.ExtractShard(None, (32, 32), 4, str(tmp_path / "cache"), namespace, [4])
    shard.setup()
    try:
        shard._predict = lambda pixels: pixels.reshape(len(pixels), -1)[:, :4]  # a stand-in base, no probe
        for key in keys:
            shard._cache.put(key, np.full(4, 7.0))
        path = shard._cache._path(keys[1])
        with open(path, "r+b") as handle:  # damaged in place, its size unchanged
            handle.write(bytes(8))
        removed = []
        real_unlink = os.unlink
        monkeypatch.setattr(os, "unlink", lambda p, *a, **k: removed.append(str(p)) or real_unlink(p, *a, **k))
        assert shard.run_shard(("train", str(source), str(tmp_path / "out.tfrecord"))) == ("train", 3, 1)
    finally:
        shard.teardown()
    assert not [p for p in removed if p.endswith(feature_cache.SUFFIX)]  # replaced in place, never deleted
    assert shard._cache.get(keys[1]) is not None and float(shard._cache.get(keys[0])[0]) == 7.0
    written = [records.parse_feature_record(r, 4) for r in tf.data.TFRecordDataset(str(tmp_path / "out.tfrecord"))]
    assert [w[0].numpy() for w in written] == [b"id0", b"id1", b"id2"]


def test_a_worker_runs_two_shards_at_once_and_a_failed_one_waits_for_the_other(tmp_path, monkeypatch):
    """Between shards the cores idled (a shard's start fills the decode queue, its end drains it and writes the
    output on one thread), so a worker runs two at once: each shard's counts come out, in order, by the bundle's
    end; the computed counter adds them up in the bundle's thread; an error stops the bundle only once the other
    running shard is done, so nothing is left writing behind a failed bundle."""
    import threading
    import time

    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.windowed_value import WindowedValue

    namespace = extract.cache_namespace(extract.Config(BASE, extract.ExtractParams(batch_size=4)))
    shard = graph.ExtractShard(None, (32, 32), 4, str(tmp_path / "cache"), namespace, [4])
    shard.setup()
    met = threading.Barrier(2, timeout=20)  # broken unless the first two shards run at the same time
    finished, counted = [], []
    monkeypatch.setattr(shard._computed, "inc", counted.append)

    def run_shard(job):
        split, index, fail = job
        if index < 2:
            met.wait()
        if fail:
            raise ValueError(f"shard {index} is broken")
        time.sleep(0.3 if index == 0 else 0.0)  # the first finishes last: its counts still come out first
        finished.append(index)
        return split, 10 + index, index

    monkeypatch.setattr(shard, "run_shard", run_shard)

    def bundle(jobs):
        shard.start_bundle()
        out = [row for job in jobs for row in shard.process(job)]
        last = list(shard.finish_bundle())  # Beam needs a windowed value from finish_bundle
        assert all(isinstance(w, WindowedValue) and w.windows == [GlobalWindow()] for w in last), last
        return out + [w.value for w in last]

    try:
        assert bundle([("train", 0, False), ("train", 1, False), ("val", 2, False)]) == [
            ("train", 10, 0),
            ("train", 11, 1),
            ("val", 12, 2),
        ]
        assert counted == [0, 1, 2]
        met.reset()
        finished.clear()
        with pytest.raises(ValueError, match="shard 1 is broken"):
            bundle([("train", 1, True), ("train", 0, False)])
        assert finished == [0]  # the other shard, running when the error came, was done before it surfaced
        assert counted == [0, 1, 2]  # a failed bundle's shards counted nothing
    finally:
        shard.teardown()
    # Beam's DaskRunner gathers a bundle's outputs before finish_bundle: there, one shard at a time
    assert extract.shards_at_once(PipelineOptions(["--runner=DaskRunner"])) == 1
    assert extract.shards_at_once(PipelineOptions([])) is None
    assert (
        graph.ExtractShard(None, (32, 32), 4, None, {}, [4], extract.shards_at_once(PipelineOptions([])))._at_once == 2
    )
