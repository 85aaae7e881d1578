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
