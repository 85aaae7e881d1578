import numpy as np
import pytest

keras = pytest.importorskip("keras")

from pipelines import bases  # noqa: E402

SIZE = (80, 80)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(bases.REGISTRY))
def test_every_registry_base_builds_and_applies_its_own_preprocessing(name):
    base, preprocessing = bases.load_conv_base(name, None, "none", SIZE)
    model = bases.build_feature_extractor(base, preprocessing, SIZE, "avg")
    pixels = np.random.default_rng(0).uniform(0, 255, (2, *SIZE, 3)).astype("float32")
    features = model(pixels, training=False)
    assert features.shape == (2, base.output_shape[-1])
    # Each family's preprocessing written out here, not looked up in the registry under test.
    caffe = pixels[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)
    expected_input = {"vgg16": caffe, "vgg19": caffe, "resnet50": caffe, "efficientnet_b0": pixels}.get(
        name, pixels / 127.5 - 1
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(preprocessing(pixels)), expected_input, rtol=1e-5, atol=1e-4)
    direct = keras.ops.convert_to_numpy(keras.layers.GlobalAveragePooling2D()(base(expected_input, training=False)))
    # An untrained base's features can be ~1e-12: tolerances scale with them, and the two images must differ.
    scale = np.abs(direct).max()
    assert scale > 0
    np.testing.assert_allclose(keras.ops.convert_to_numpy(features), direct, rtol=1e-4, atol=1e-4 * scale)
    assert np.abs(direct[0] - direct[1]).max() > 1e-2 * scale
    assert not model.trainable and model.trainable_weights == []
    assert base.get_layer(bases.REGISTRY[name].top_block) is not None


def test_intermediate_layer_tap_and_pooling_none():
    base, pre = bases.load_conv_base("vgg19", None, "none", (64, 64))
    model = bases.build_feature_extractor(bases.tap(base, "block4_pool"), pre, (64, 64), "none")
    assert model.output_shape == (None, 4, 4, 512)


def test_pooling_a_tap_that_gives_flat_features_names_the_param():
    """A tap past the spatial layers (efficientnet's `block2a_se_squeeze`) with pooling avg stopped the stage with
    Keras's own traceback ("expected ndim=4, found ndim=2"), naming no param."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="squeeze")(x)
    tiny = keras.Model(inputs, keras.layers.Dense(2, name="excite")(x), name="tiny")
    with pytest.raises(bases.BaseError, match=r"pooling: 'avg' pools a feature map, but .* gives 1-D features \(4,\)"):
        bases.build_feature_extractor(bases.tap(tiny, "squeeze"), None, (8, 8), "avg")
    flat = bases.build_feature_extractor(bases.tap(tiny, "squeeze"), None, (8, 8), "none")
    assert flat.output_shape == (None, 4)
    assert bases.build_feature_extractor(bases.tap(tiny, "conv"), None, (8, 8), "max").output_shape == (None, 4)


def test_bad_names_layers_sizes_and_weights_are_clear_errors(tmp_path):
    with pytest.raises(
        bases.BaseError, match=r"name: unknown base 'vgg61' \(did you mean 'vgg19', 'vgg16'\?\); known: efficientnet_b0"
    ):
        bases.load_conv_base("vgg61", None, "none", SIZE)
    with pytest.raises(bases.BaseError, match=r"input_size: inception_v3 needs each side >= 75"):
        bases.load_conv_base("inception_v3", None, "none", (64, 64))
    with pytest.raises(bases.BaseError, match=r"weights: .*nope.h5 is neither"):
        bases.load_conv_base("vgg16", None, str(tmp_path / "nope.h5"), SIZE)
    with pytest.raises(bases.BaseError, match=r"path: .* does not exist"):
        bases.load_conv_base(None, str(tmp_path / "base.keras"), "none", SIZE)
    base, _ = bases.load_conv_base("mobilenet_v2", None, "none", (64, 64))
    with pytest.raises(
        bases.BaseError, match=r"layer: .* has no layer 'block_16_expnd' \(did you mean 'block_16_expand'"
    ):
        bases.tap(base, "block_16_expnd")


def test_weights_file_and_saved_base_round_trip(tmp_path):
    base, _ = bases.load_conv_base("mobilenet_v2", None, "none", (64, 64))
    weights = tmp_path / "mnv2.weights.h5"
    base.save_weights(weights)
    again, _ = bases.load_conv_base("mobilenet_v2", None, str(weights), (64, 64))
    for a, b in zip(base.weights, again.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    saved = tmp_path / "base.keras"
    base.save(saved)
    loaded, pre = bases.load_conv_base(None, str(saved), "none", (64, 64))
    assert pre is None and loaded.count_params() == base.count_params()


def test_imagenet_weights_offline_fail_fast_with_instructions(tmp_path, monkeypatch):
    import time
    import urllib.error

    from keras.src.utils import file_utils

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))  # an empty cache

    def offline(url, *args, **kwargs):  # what an offline machine answers; the test never reaches the network
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "urlretrieve", offline)

    class Offline(RuntimeError):
        pass

    started = time.monotonic()
    with pytest.raises(Offline) as err:
        bases.load_conv_base("mobilenet_v2", None, "imagenet", (96, 96), offline_error=Offline)
    assert "not in the Keras cache" in str(err.value) and "path=models/<file.keras>" in str(err.value)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("name,side", [("mobilenet_v2", 32), ("inception_v3", 75), ("xception", 71)])
def test_untrained_base_is_the_same_in_every_build(name, side):
    """extract and finetune build `weights: none` bases in separate processes, and extract's launcher and an
    in-process worker two in one: they must agree. A review: InceptionV3's and Xception's weights were seeded by
    path, which Keras numbers per process for the layers it names itself (`conv2d`, then `conv2d_94`), so a
    process's second build had other weights (a warm extract wrote other features than a cold one)."""
    first, _ = bases.load_conv_base(name, None, "none", (side, side))
    keras.utils.set_random_seed(123)  # whatever the caller's seed
    second, _ = bases.load_conv_base(name, None, "none", (side, side))
    assert len(first.weights) == len(second.weights)
    assert bases.weights_digest(first) == bases.weights_digest(second)


def test_an_untrained_base_does_not_reset_the_global_random_state():
    import random

    def build_after(seed):
        keras.utils.set_random_seed(seed)
        model, _ = bases.load_conv_base("mobilenet_v2", None, "none", (32, 32))
        return model, (random.random(), np.random.rand())

    first, draws_7 = build_after(7)
    second, draws_8 = build_after(8)
    assert draws_7 != draws_8  # the caller's random streams go on from its seed: nothing was reseeded
    kernels = [w for w in first.weights if w.path.endswith("kernel")]
    assert len(kernels) > 30
    for a, b in zip(first.weights, second.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # every kernel was re-drawn: none equals what a plain build under either global seed gives
    keras.utils.set_random_seed(7)
    plain = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    by_path = {w.path.split("/", 1)[-1]: w.numpy() for w in plain.weights}
    for w in kernels:
        assert not np.array_equal(w.numpy(), by_path[w.path.split("/", 1)[-1]]), w.path
