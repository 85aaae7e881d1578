"""The inference runtimes: OpenVINO against TensorFlow on a base with real-valued features, its conversion
cache, and a clear error when the package is missing."""

import json
import sys
from importlib import metadata
from pathlib import Path

import keras
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("openvino")

from components import conv_base, extract  # noqa: E402
from pipelines import feature_cache, runtimes  # noqa: E402
from pipelines import features as fk  # noqa: E402
from tests.conftest import make_converted, tree_bytes  # noqa: E402

BASE = conv_base.ConvBaseParams(name="mobilenet_v2", weights="none", input_size=(32, 32), pooling="avg")


@pytest.fixture(scope="module")
def base(tiny_base_weights):
    """The test base with fixed, non-degenerate weights (features of order 1, not 1e-12)."""
    return conv_base.build_extractor(BASE.model_copy(update={"weights": str(tiny_base_weights)}))


def pixels(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def compiled(base, tmp_path_factory):
    """(the base compiled by OpenVINO, its conversion cache): converted once for this module (~10 s)."""
    cache = tmp_path_factory.mktemp("openvino")
    return runtimes.OpenVINOModel(base, cache), cache


@pytest.mark.slow
def test_openvino_computes_what_tensorflow_computes_to_the_last_bits(base, compiled):
    model, cache = compiled
    images = pixels(12)
    expected = runtimes.predictor(base, "tensorflow")(images)
    got = model.predict(images)
    scale = float(np.abs(expected).max())
    assert scale > 0.5  # real-valued features: the bound below means something
    assert got.shape == expected.shape and got.dtype == np.float32
    assert float(np.abs(got - expected).max()) <= 1e-4 * scale  # f32: the last bits (bf16 would be ~1e-1)
    # An image's outputs do not depend on the batch it shares, nor on the split over streams.
    assert np.array_equal(model.predict(images[::-1])[::-1], got)
    assert np.array_equal(model.predict(images[:5]), got[:5])
    assert np.array_equal(model.predict_split(images), got)
    assert np.array_equal(runtimes.predictor(base, "openvino", cache)(images[:1]), got[:1])


@pytest.mark.slow
def test_conversion_is_cached_by_the_models_content(base, compiled, monkeypatch):
    _, cache = compiled
    (folder,) = cache.iterdir()  # no private conversion folders left behind
    assert folder.name == runtimes.conversion_key(base) and sorted(p.name for p in folder.iterdir()) == [
        "model.bin",
        "model.xml",
        "sha256.json",
    ]

    # A worker that converted at the same time as another renames second: its copy is dropped, the first kept.
    before = (folder / "model.bin").stat().st_mtime_ns
    runtimes._convert(base, folder)
    assert [p.name for p in cache.iterdir()] == [folder.name] and (folder / "model.bin").stat().st_mtime_ns == before

    def refuse(model, folder):
        raise AssertionError("converted again although the cache held this model")

    monkeypatch.setattr(runtimes, "_convert", refuse)
    runtimes.OpenVINOModel(base, cache)  # the same model: compiled from the cache
    other = keras.models.clone_model(base)
    other.set_weights([w * 1.01 for w in base.get_weights()])  # the same architecture, other weights
    assert runtimes.model_digest(other) != runtimes.model_digest(base)
    assert runtimes.model_digest(keras.models.clone_model(base)) != runtimes.model_digest(base)  # re-initialised
    with pytest.raises(AssertionError, match="converted again"):
        runtimes.OpenVINOModel(other, cache)


@pytest.mark.slow
@pytest.mark.parametrize("left", ["model.xml", "model.bin"])
def test_a_key_folder_a_killed_deletion_left_with_one_file_is_converted_again(base, compiled, left, tmp_path):
    import shutil

    model, cache = compiled
    (folder,) = cache.iterdir()
    damaged = tmp_path / folder.name
    damaged.mkdir()
    shutil.copy(folder / left, damaged / left)  # the other file was deleted, the folder not yet
    again = runtimes.OpenVINOModel(base, tmp_path)
    images = pixels(4)
    assert np.array_equal(again.predict(images), model.predict(images))
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # nothing set aside is left behind
    assert sorted(p.name for p in damaged.iterdir()) == ["model.bin", "model.xml", "sha256.json"]


@pytest.mark.slow
def test_a_converted_model_whose_bytes_changed_is_converted_again_not_run(base, compiled, tmp_path, caplog):
    """OpenVINO compiles damaged weights without a word and computes other features (a crash before the bytes
    reached the disk, bit rot): the checksums the conversion recorded are checked before a folder is compiled."""
    import shutil

    model, cache = compiled
    (folder,) = cache.iterdir()
    damaged = tmp_path / folder.name
    shutil.copytree(folder, damaged)
    weights = bytearray((damaged / "model.bin").read_bytes())
    weights[len(weights) // 2 : len(weights) // 2 + 64] = bytes(64)  # 16 weights set to 0, the size unchanged
    (damaged / "model.bin").write_bytes(bytes(weights))
    with caplog.at_level("WARNING"):
        again = runtimes.OpenVINOModel(base, tmp_path)
    assert "damaged or incomplete; converting it again" in caplog.text
    images = pixels(4)
    assert np.array_equal(again.predict(images), model.predict(images))
    assert (damaged / "model.bin").read_bytes() == (folder / "model.bin").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_a_base_keras_names_itself_has_one_key_in_every_build():
    """Keras numbers the layers it names itself per process (`conv2d`, then `conv2d_4`): the same base built a
    second time in a process (a cold extract's probe first, an incremental one's not) must not convert again."""
    params = conv_base.ConvBaseParams(name="efficientnet_b0", weights="none", input_size=(32, 32), pooling="avg")
    first, second = conv_base.build_extractor(params), conv_base.build_extractor(params)
    assert [w.path for w in first.weights] != [w.path for w in second.weights]  # the numbering this is about
    assert runtimes.model_digest(first) == runtimes.model_digest(second)
    other = conv_base.build_extractor(params.model_copy(update={"pooling": "max"}))
    assert runtimes.model_digest(other) != runtimes.model_digest(first)
    second.set_weights([w * 1.01 for w in second.get_weights()])
    assert runtimes.model_digest(second) != runtimes.model_digest(first)

    # names only where they name a layer: a layer called like its activation keeps the activation in the key
    def named_like_its_activation(activation):
        inputs = keras.Input((4,))
        return keras.Model(inputs, keras.layers.Activation(activation, name=activation)(inputs))

    assert runtimes.model_digest(named_like_its_activation("relu")) != runtimes.model_digest(
        named_like_its_activation("tanh")
    )

    # nor a dtype policy's name (mixed float16 against mixed bfloat16: the same float32 weights, other bits)
    def dense(dtype):
        inputs = keras.Input((4,))
        return keras.Model(inputs, keras.layers.Dense(2, dtype=dtype, kernel_initializer="ones", name="d")(inputs))

    assert runtimes.model_digest(dense("mixed_float16")) != runtimes.model_digest(dense("mixed_bfloat16"))


def test_the_garbage_collection_renames_a_key_folder_away_before_deleting_it(tmp_path, monkeypatch):
    import shutil

    (tmp_path / "somekey").mkdir()
    for name in ("model.xml", "model.bin"):
        (tmp_path / "somekey" / name).write_text(name)
    deleted = []

    def killed_half_way(path, *args, **kwargs):  # the deletion dies after its first file
        deleted.append(path)
        first = sorted(Path(path).iterdir())[0]
        first.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        feature_cache.collect_converted(str(tmp_path))
    assert not (tmp_path / "somekey").exists()  # never a key folder with one file: it was renamed away first
    assert Path(deleted[0]).name.startswith(".somekey.gc-")


def test_the_conversion_key_holds_the_code_and_versions_the_traced_function_runs(base, monkeypatch):
    from pipelines import fingerprint

    key = runtimes.conversion_key(base)
    code = fingerprint.code_fingerprint(runtimes.TRACED_CODE)
    assert set(code) == {"pipelines.bases", "pipelines.runtimes"}  # BasePreprocessing.call, InferenceMode.call
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda modules: {**code, "pipelines.bases": "edited"})
    assert runtimes.conversion_key(base) != key  # an edited custom layer: converted again, never the old IR
    monkeypatch.undo()
    monkeypatch.setattr(keras, "__version__", "0.0.0")
    assert runtimes.conversion_key(base) != key


def test_a_missing_openvino_is_a_clear_error_before_any_work(tmp_path, monkeypatch, converted_tiny):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(feature_cache.metadata, "version", not_installed)  # and no package metadata either
    with pytest.raises(runtimes.RuntimeMissing, match=r"pip install .*openvino.*or set the runtime to tensorflow"):
        runtimes.check_installed("openvino")
    config = extract.Config(BASE, extract.ExtractParams(batch_size=4, runtime="openvino"))
    with pytest.raises(runtimes.RuntimeMissing):
        extract.run(config, converted_tiny, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="unknown runtime 'onnx'"):
        runtimes.check_installed("onnx")
    assert runtimes.RuntimeMissing.user_facing  # the stage prints its message and exits 2 (tests/components)


def test_the_runtime_is_part_of_the_feature_cache_namespace():
    fingerprint = conv_base.fingerprint(BASE)
    on_tf = feature_cache.namespace_record(fingerprint, 4)
    on_ov = feature_cache.namespace_record(fingerprint, 4, "openvino")
    assert "runtime" not in on_tf  # TensorFlow's namespaces are what they were before the runtime choice
    assert on_ov["runtime"] == "openvino" and on_ov["openvino"] and len(on_ov["runtime_code"]) == 64
    assert feature_cache.namespace_of(on_tf) != feature_cache.namespace_of(on_ov)


@pytest.mark.slow
def test_extract_on_openvino_is_byte_identical_across_runs_and_close_to_tensorflow(tmp_path, tiny_base_weights):
    base = BASE.model_copy(update={"weights": str(tiny_base_weights)})
    on_ov = extract.Config(base, extract.ExtractParams(batch_size=4, runtime="openvino"))
    cache = str(tmp_path / "cache")
    converted = make_converted(tmp_path / "data", per_class=5)
    cold = extract.run(on_ov, converted, tmp_path / "ov", cache_root=cache)
    assert cold["computed"] == cold["images"] == 10
    assert len(list((tmp_path / "cache" / "openvino").glob("*/model.xml"))) == 1  # converted once, for every worker
    warm = extract.run(on_ov, converted, tmp_path / "ov_again", cache_root=cache)
    assert warm["computed"] == 0 and tree_bytes(tmp_path / "ov_again") == tree_bytes(tmp_path / "ov")
    assert json.loads((tmp_path / "ov" / extract.FEATURES_JSON).read_text())["runtime"] == "openvino"

    # Incremental: two new images go through the base; the outputs equal a cold run's (no cache: each
    # worker converts the base itself).
    converted = make_converted(tmp_path / "data", per_class=1, start=100)
    grown = extract.run(on_ov, converted, tmp_path / "ov_grown", cache_root=cache)
    assert (grown["computed"], grown["from_cache"]) == (2, 10)
    assert extract.run(on_ov, converted, tmp_path / "ov_cold")["computed"] == 12
    assert tree_bytes(tmp_path / "ov_grown") == tree_bytes(tmp_path / "ov_cold")

    # TensorFlow's features are another namespace in the same cache, and differ only in the last bits.
    on_tf = extract.Config(base, extract.ExtractParams(batch_size=4))
    assert extract.run(on_tf, converted, tmp_path / "tf", cache_root=cache)["computed"] == 12
    from tests.components.test_extract import read_features

    size = 1280  # mobilenet_v2, average-pooled
    for shard in sorted((tmp_path / "tf" / extract.FEATURES_DIR).glob("*.tfrecord")):
        tf_rows = read_features([shard], size)
        ov_rows = read_features([tmp_path / "ov_grown" / extract.FEATURES_DIR / shard.name], size)
        assert [r[fk.ID].numpy() for r in tf_rows] == [r[fk.ID].numpy() for r in ov_rows]
        a = np.stack([r[fk.FEATURES].numpy() for r in tf_rows])
        b = np.stack([r[fk.FEATURES].numpy() for r in ov_rows])
        assert np.abs(a).max() > 0.5 and float(np.abs(a - b).max()) <= 1e-4 * np.abs(a).max()
