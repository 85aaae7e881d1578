"""Grad-CAM on a classifier small enough to have a closed form."""

import keras
import numpy as np
import pytest

from pipelines import classifier
from pipelines.bases import InferenceMode


def tiny_classifier(units: int, scale: float) -> keras.Model:
    """pixels -> a fixed random conv base (6 channels, 8x8) -> global average pooling -> Dense(units)."""
    base = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(
                6, 3, padding="same", activation="relu", kernel_initializer=keras.initializers.RandomNormal(0, 1, 1)
            ),
        ],
        name="base",
    )
    pixels = keras.Input((8, 8, 3))
    extractor = keras.Model(pixels, keras.layers.GlobalAveragePooling2D()(InferenceMode(base)(pixels)))
    features = keras.Input((6,))
    dense = keras.layers.Dense(
        units,
        activation="sigmoid" if units == 1 else "softmax",
        kernel_initializer=keras.initializers.RandomNormal(0, scale, 2),
    )
    return classifier.assemble(extractor, keras.Model(features, dense(features)))


def expected_map(model: keras.Model, pixels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """With pooling then one Dense, a logit's gradient at every position is its kernel column over h*w, so
    Grad-CAM is relu(sum_k w_k A_k), scaled to a peak of 1: no gradient needed."""
    feature_map = classifier.find_base(model)(pixels).numpy()
    cam = np.maximum((feature_map * weights).sum(axis=-1), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, cam / np.where(peak > 0, peak, 1.0), 0.0)  # no evidence for the class: all 0


PIXELS = np.random.default_rng(3).uniform(-1, 1, (4, 8, 8, 3)).astype("float32")


@pytest.mark.parametrize("scale", [0.5, 200.0])  # 200: logits in the hundreds, a saturated softmax
def test_grad_cam_explains_the_class_it_is_given_by_its_logit(scale):
    model = tiny_classifier(3, scale)
    kernel = model.layers[-1].layers[-1].kernel.numpy()
    probabilities = model(PIXELS).numpy()
    if scale > 1:
        assert (probabilities.max(axis=1) == 1.0).all()  # saturated: a probability's gradient is 0
    for classes in (np.array([0, 1, 2, 0]), np.array([2, 2, 1, 1])):
        maps, probs = classifier.grad_cam(model, PIXELS, classes)
        np.testing.assert_allclose(probs, probabilities, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(maps, expected_map(model, PIXELS, kernel.T[classes][:, None, None, :]), atol=1e-5)
    default, _ = classifier.grad_cam(model, PIXELS)
    chosen, _ = classifier.grad_cam(model, PIXELS, probabilities.argmax(axis=1))
    np.testing.assert_array_equal(default, chosen)
    assert (default.max(axis=(1, 2)) == 1.0).all()  # every predicted class has evidence, saturated or not


@pytest.mark.parametrize("scale", [0.5, 200.0])
def test_grad_cam_of_a_one_unit_sigmoid_explains_either_class(scale):
    model = tiny_classifier(1, scale)
    column = model.layers[-1].layers[-1].kernel.numpy()[:, 0]
    classes = np.array([1, 0, 1, 0])
    maps, _ = classifier.grad_cam(model, PIXELS, classes)
    signs = np.where(classes == 1, 1.0, -1.0)[:, None, None, None]
    np.testing.assert_allclose(maps, expected_map(model, PIXELS, signs * column), atol=1e-5)
    predicted, _ = classifier.grad_cam(model, PIXELS)
    assert (predicted.max(axis=(1, 2)) == 1.0).all()
    assert model.layers[-1].layers[-1].activation is keras.activations.sigmoid  # put back as it was


@pytest.mark.parametrize("units", [1, 3])
def test_grad_cam_refuses_classes_that_do_not_match_the_images(units):
    model = tiny_classifier(units, 0.5)
    top = max(2, units)
    for classes in ([0, 1, 0], [0, 1, 0, 1, 0], [0, 1, 0, top], [0, -1, 0, 1], [0.0, 1.0, 0.0, 1.0]):
        with pytest.raises(ValueError, match="one class in 0..%d per image \\(4 images\\)" % (top - 1)):
            classifier.grad_cam(model, PIXELS, np.array(classes))


def nested_classifier() -> keras.Model:
    """A base whose block is a model of its own, with batch norm inside it (a saved base built from parts)."""
    block = keras.Sequential(
        [
            keras.Input((8, 8, 4)),
            keras.layers.Conv2D(4, 3, padding="same", name="block_conv"),
            keras.layers.BatchNormalization(name="block_bn"),
        ],
        name="block",
    )
    pixels = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(pixels)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    base = keras.Model(pixels, block(x), name="base")
    extractor = keras.Model(pixels, keras.layers.GlobalAveragePooling2D()(InferenceMode(base)(pixels)))
    features = keras.Input((4,))
    return classifier.assemble(extractor, keras.Model(features, keras.layers.Dense(1, activation="sigmoid")(features)))


@pytest.mark.parametrize("train_batch_norm", [False, True])
@pytest.mark.parametrize("start", [0, 3])
def test_unfreezing_reaches_batch_norm_inside_nested_blocks(train_batch_norm, start):
    """Batch norm's scale and offset train only with train_batch_norm, in a nested block too (they trained
    there whatever it said: the block's own trainable flag set its layers'), and nothing below the start trains."""
    model = nested_classifier()
    base = classifier.find_base(model)
    assert [layer.name for layer in base.layers[1:]] == ["stem", "stem_bn", "block"]
    trainable = classifier.unfreeze(model, start, train_batch_norm)
    names = {id(v): f"{layer.name}/{v.name}" for layer in base._flatten_layers() for v in layer._trainable_variables}
    got = sorted(names[id(v)] for v in model.trainable_weights if id(v) in names)
    layers = {"stem": 1, "stem_bn": 2, "block_conv": 3, "block_bn": 3}  # the index in base.layers of each
    expected = sorted(
        f"{layer}/{name}"
        for layer, index in layers.items()
        for name in (("gamma", "beta") if layer.endswith("_bn") else ("kernel", "bias"))
        if index >= start and (train_batch_norm or not layer.endswith("_bn"))
    )
    assert got == expected
    assert trainable == [
        layer.name for layer in base.layers[max(start, 1) :] if train_batch_norm or not layer.name.endswith("_bn")
    ]  # the base's own layers that train, in part at least (all of these have weights)
