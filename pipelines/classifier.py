"""The whole classifier: raw RGB pixels -> base's preprocessing -> conv base -> pooling -> head.

Shared by fine-tuning (which unfreezes the top of the base), evaluation
(Grad-CAM walks the same layers) and serving. The graph is a straight chain of
named layers, so `split_at_base` can run it in two halves.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from components.params import did_you_mean
from pipelines.bases import InferenceMode


class UnfreezeError(ValueError):
    """An unfreeze point the base does not have; the message names the param."""


def assemble(extractor: keras.Model, head: keras.Model) -> keras.Model:
    """The feature extractor (pixels -> features) followed by the trained head (flat features -> probabilities)."""
    features = extractor.output
    if len(features.shape) > 2:  # pooling none: extract stores flattened features, the head takes them flat
        features = keras.layers.Flatten(name="flatten")(features)
    size = int(np.prod(features.shape[1:]))
    expected = int(head.input_shape[-1])
    if size != expected:
        raise ValueError(
            f"the head takes {expected} features but the conv base gives {size}: "
            "train_head was trained on another conv_base; re-run extract and train_head"
        )
    outputs = head(features)
    return keras.Model(extractor.input, outputs, name="classifier")


def _base_wrapper(model: keras.Model):
    wrapped = [layer for layer in model.layers if isinstance(layer, InferenceMode)]
    if len(wrapped) != 1:
        raise ValueError(f"expected one conv base inside {model.name}, found {len(wrapped)}")
    return wrapped[0]


def find_base(model: keras.Model) -> keras.Model:
    """The conv base inside a feature extractor or classifier (run in inference mode by `bases.InferenceMode`)."""
    return _base_wrapper(model).layer


def unfreeze_index(
    base: keras.Model,
    from_layer: str | None,
    top: int | None,
    default: str | None,
    no_default: str = "this base has no default unfreeze point",
) -> int:
    """Index in `base.layers` of the first layer to train: a named layer, the top N layers, or the default
    (`no_default` says why there is none)."""
    names = [layer.name for layer in base.layers]
    if top is not None:
        if not 1 <= top <= len(names) - 1:
            raise UnfreezeError(f"unfreeze_top: the base has {len(names)} layers, got {top}")
        return len(names) - top
    name = from_layer or default
    if name is None:
        raise UnfreezeError(f"unfreeze_from: {no_default}; set unfreeze_from to a layer name or unfreeze_top")
    if name not in names:
        raise UnfreezeError(f"unfreeze_from: {base.name} has no layer {name!r}{did_you_mean(name, names)}")
    return names.index(name)


def unfreeze(model: keras.Model, start: int, train_batch_norm: bool = False) -> list[str]:
    """Make the base's layers from `start` up (and the head) trainable, everything below frozen.

    Batch-norm layers keep their moving statistics whatever happens here: the
    base always runs with `training=False` (`pipelines.bases.InferenceMode`), so
    they normalise with the pretrained statistics; with `train_batch_norm` false
    their scale and offset stay frozen too. Recompile the model after calling this.
    """
    model.trainable = True
    base = find_base(model)
    trainable = []
    for index, layer in enumerate(base.layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = index >= start and (train_batch_norm or not is_bn)
        if layer.trainable and not train_batch_norm:
            # a nested block (a model inside the base) just made all its layers trainable, batch norm too
            for inner in layer._flatten_layers(include_self=False):
                if isinstance(inner, keras.layers.BatchNormalization):
                    inner.trainable = False
        if layer.trainable and layer.weights:
            trainable.append(layer.name)
    return trainable


def split_at_base(model: keras.Model):
    """(to_features_map, from_features_map): the classifier as two callables around the base's output."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    cut = layers.index(_base_wrapper(model)) + 1

    def bottom(pixels):
        x = pixels
        for layer in layers[:cut]:
            x = layer(x, training=False)
        return x

    def top(feature_map):
        x = feature_map
        for layer in layers[cut:]:
            x = layer(x, training=False)
        return x

    return bottom, top


def _logits(model: keras.Model, top):
    """`top` split before the output layer's activation: (feature map -> logits, logits -> probabilities).

    The output layer is the head's Dense with a sigmoid (one unit) or softmax (one unit a class)."""
    head = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)][-1]
    dense = head.layers[-1] if isinstance(head, keras.Model) else head
    activation = getattr(dense, "activation", None)
    if not isinstance(dense, keras.layers.Dense) or activation not in (
        keras.activations.sigmoid,
        keras.activations.softmax,
    ):
        raise ValueError("Grad-CAM needs the classifier to end in a Dense layer with a sigmoid or softmax")

    def logits(feature_map):
        dense.activation = keras.activations.linear  # the same layer and weights, its pre-activation out
        try:
            return top(feature_map)
        finally:
            dense.activation = activation

    return logits, activation


def grad_cam(
    model: keras.Model, pixels: np.ndarray, classes: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heat maps (n, h, w) in 0..1 at the base's output resolution, and the probabilities.

    Image k's map explains class `classes[k]` (default: the model's own prediction on these pixels; the
    evaluation passes the class it reports, which test-time augmentation or another runtime chose). The
    gradient of that class's logit (the output layer's pre-activation: a probability's gradient vanishes
    where the sigmoid or softmax saturates, at logits above about 17, and the map would be all zeros; for a
    one-unit sigmoid, class 0's logit is minus the unit's) with respect to the base's last feature map,
    averaged per channel, weights the channels; negative evidence is cut at zero (Selvaraju et al., 2017).
    """
    if classes is not None:
        classes = np.asarray(classes)
        num_classes = max(2, model.output_shape[-1])  # a one-unit sigmoid has two
        if (
            classes.shape != (len(pixels),)
            or not np.issubdtype(classes.dtype, np.integer)
            or not np.all((classes >= 0) & (classes < num_classes))
        ):
            raise ValueError(
                f"grad_cam: classes must be one class in 0..{num_classes - 1} per image ({len(pixels)} images), "
                f"got {classes.tolist()}"
            )
    bottom, top = split_at_base(model)
    logits_of, activation = _logits(model, top)
    pixels = tf.convert_to_tensor(pixels, tf.float32)
    feature_map = bottom(pixels)
    if len(feature_map.shape) != 4:
        raise ValueError("Grad-CAM needs a spatial feature map; the base's output is not 4-D")
    with tf.GradientTape() as tape:
        tape.watch(feature_map)
        logits = logits_of(feature_map)
        probabilities = activation(logits)
        if logits.shape[-1] == 1:
            picked = (
                tf.cast(probabilities[:, 0] >= 0.5, tf.int32) if classes is None else tf.constant(classes, tf.int32)
            )
            score = tf.where(picked == 1, logits[:, 0], -logits[:, 0])
        else:
            picked = tf.argmax(probabilities, axis=-1, output_type=tf.int32) if classes is None else classes
            score = tf.gather(logits, tf.constant(picked, tf.int32)[:, None], batch_dims=1)[:, 0]
    grads = tape.gradient(score, feature_map)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1)).numpy()
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = np.where(peak > 0, cam / np.maximum(peak, 1e-12), 0.0)
    return cam, probabilities.numpy()
