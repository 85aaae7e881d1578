"""The conv-base registry: a name -> a `keras.applications` constructor and its own preprocessing.

Every model built here takes raw RGB pixels (float 0..255, the output of
`pipelines.image.decode_and_resize`); the base's `preprocess_input` runs inside
the model as a `BasePreprocessing` layer, so extraction, fine-tuning and serving
feed the same pixels. A saved Keras base (`.keras`, raw RGB 0..255 in, its own
rescaling inside) is a base too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from components.params import did_you_mean


@dataclasses.dataclass(frozen=True)
class BaseSpec:
    constructor: Callable[..., keras.Model]
    preprocess_input: Callable  # the application's own, applied inside the model
    min_size: int  # smallest input side keras.applications accepts
    top_block: str  # first layer of the top conv block: the default unfreeze point


_apps = keras.applications
REGISTRY: dict[str, BaseSpec] = {
    "vgg16": BaseSpec(_apps.VGG16, _apps.vgg16.preprocess_input, 32, "block5_conv1"),
    "vgg19": BaseSpec(_apps.VGG19, _apps.vgg19.preprocess_input, 32, "block5_conv1"),
    "resnet50": BaseSpec(_apps.ResNet50, _apps.resnet50.preprocess_input, 32, "conv5_block1_1_conv"),
    "inception_v3": BaseSpec(_apps.InceptionV3, _apps.inception_v3.preprocess_input, 75, "mixed9"),
    "xception": BaseSpec(_apps.Xception, _apps.xception.preprocess_input, 71, "block14_sepconv1"),
    "mobilenet_v2": BaseSpec(_apps.MobileNetV2, _apps.mobilenet_v2.preprocess_input, 32, "block_16_expand"),
    "efficientnet_b0": BaseSpec(_apps.EfficientNetB0, _apps.efficientnet.preprocess_input, 32, "block7a_expand_conv"),
}


@keras.saving.register_keras_serializable(package="transfer")
class BasePreprocessing(keras.layers.Layer):
    """A registry base's own `preprocess_input` as a serialisable layer (raw RGB 0..255 in)."""

    def __init__(self, base: str, **kwargs):
        super().__init__(**kwargs)
        if base not in REGISTRY:
            raise ValueError(f"unknown base {base!r}")
        self.base = base

    def call(self, inputs):
        return REGISTRY[self.base].preprocess_input(keras.ops.cast(inputs, "float32"))

    def get_config(self):
        return {**super().get_config(), "base": self.base}


@keras.saving.register_keras_serializable(package="transfer")
class InferenceMode(keras.layers.Wrapper):
    """Runs the wrapped conv base in inference mode, whatever the enclosing call's `training` flag.

    The transfer-learning rule is to call the base with `training=False` so its
    batch-norm layers keep their statistics (and its dropout stays off) even
    while fine-tuning unfrozen layers. In a Keras 3 functional model a stored
    `base(x, training=False)` is overridden by the outer call's flag
    (`keras/src/models/functional.py`, `operation_fn`), so `fit` would run the
    base in training mode; this layer passes `training=False` explicitly, which
    takes priority.
    """

    def call(self, inputs):
        return self.layer(inputs, training=False)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)


UNTRAINED_SEED = 0  # the random init of `weights: none` bases


class BaseError(ValueError):
    """A base that cannot be built as configured; the message names the param."""


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of a model's weights (each one's shape, dtype and bytes, in the model's order): what a base
    computes with, whichever file they came from."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{value.shape}{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


# A weights file of this name holds a registry base's ImageNet weights (the base_weights stage writes it): the
# base is built as Keras builds its ImageNet variant, which for some bases is another graph (EfficientNet adds
# a rescaling layer only with weights="imagenet"), with the weights read from the file instead of downloaded.
IMAGENET_FILE = "imagenet.weights.h5"
_FETCH = threading.local()  # this thread's answer to Keras's fetch, while it builds a base from such a file


def _fetch(*args, **kwargs):
    """Keras's `file_utils.get_file`, answered with this thread's file while one is set (other threads, and
    this one otherwise, fetch as Keras does)."""
    path = getattr(_FETCH, "path", None)
    if path is None:
        return _fetch.original(*args, **kwargs)
    _FETCH.used = True
    return path


@contextlib.contextmanager
def _keras_fetch_answered_by(path: str):
    """keras.applications fetch ImageNet weights with `file_utils.get_file` (the download, or Keras's cache):
    while this holds, this thread's fetch returns `path`, so nothing is downloaded or read from the cache. A
    build that never fetched (a Keras that fetches otherwise) is an error, not weights from Keras's cache."""
    from keras.src.utils import file_utils

    if file_utils.get_file is not _fetch:
        _fetch.original = file_utils.get_file
        file_utils.get_file = _fetch
    _FETCH.path, _FETCH.used = path, False
    try:
        yield
        if not _FETCH.used:
            raise RuntimeError(f"keras.applications did not fetch its ImageNet weights through get_file: {path} unread")
    finally:
        _FETCH.path = None


def _is_download_failure(exc: Exception) -> bool:
    text = str(exc)
    return "URL fetch failure" in text or "Name or service not known" in text or "urlopen" in text


def load_conv_base(
    name: str | None,
    path: str | None,
    weights: str,
    input_size: tuple[int, int],
    offline_error: type[Exception] = RuntimeError,
) -> tuple[keras.Model, keras.layers.Layer | None]:
    """The bare conv base and the preprocessing layer to put before it (None for saved bases)."""
    if path:
        if not Path(path).is_file():
            raise BaseError(f"path: {path} does not exist")
        model = keras.saving.load_model(path, compile=False)
        return model, None
    if name not in REGISTRY:
        raise BaseError(
            f"name: unknown base {name!r}{did_you_mean(name, REGISTRY)}; known: {', '.join(sorted(REGISTRY))}"
        )
    spec = REGISTRY[name]
    if min(input_size) < spec.min_size:
        raise BaseError(f"input_size: {name} needs each side >= {spec.min_size}, got {list(input_size)}")
    weights_arg: str | None
    if weights == "imagenet":
        weights_arg = "imagenet"
    elif weights == "none":
        weights_arg = None
    else:
        if not Path(weights).is_file():
            raise BaseError(f"weights: {weights} is neither 'imagenet', 'none' nor an existing weights file")
        weights_arg = weights
    imagenet_file = weights_arg not in (None, "imagenet") and Path(weights_arg).name == IMAGENET_FILE
    try:
        # A named input: keras.applications would name it input_layer_<n>, numbered per process, so
        # the saved model's bytes would depend on what was built before in the process.
        inputs = keras.Input((*input_size, 3), name=f"{name}_input")
        with _keras_fetch_answered_by(str(weights_arg)) if imagenet_file else contextlib.nullcontext():
            model = spec.constructor(
                include_top=False,
                weights="imagenet" if imagenet_file else weights_arg,
                input_tensor=inputs,
                input_shape=(*input_size, 3),
            )
    except ValueError as exc:
        raise BaseError(
            f"input_size: {name} refused input_size={list(input_size)}, weights={weights!r}: {exc}"
        ) from None
    except Exception as exc:
        if weights_arg == "imagenet" and _is_download_failure(exc):
            raise offline_error(
                f"weights: imagenet weights of {name} are not in the Keras cache (~/.keras/models) and "
                "cannot be downloaded here. Copy the weights file into ~/.keras/models from a machine with "
                "network access, or `dvc pull data/base_weights` where such a machine ran and pushed the "
                "base_weights stage, or set weights to the path of a weights file in models/ (ImageNet weights "
                f"named {IMAGENET_FILE}, as that stage writes them, so the base is built as Keras builds its "
                f"ImageNet variant), or use a saved conv base with path=models/<file.keras>. ({exc})"
            ) from None
        raise
    if weights_arg is None:
        # A fixed random init: extract and finetune (separate processes) build the
        # same untrained base, and re-runs give the same features.
        seeded_initialisation(model, UNTRAINED_SEED)
    return model, BasePreprocessing(name, name="preprocess")


# A layer's weight -> the attributes that may hold its initializer (Dense/Conv: kernel_initializer;
# DepthwiseConv2D keeps its kernel as `kernel` but initialises it with depthwise_initializer).
_INITIALIZERS = {
    "kernel": ("kernel_initializer", "depthwise_initializer"),
    "depthwise_kernel": ("depthwise_initializer",),
    "pointwise_kernel": ("pointwise_initializer",),
    "bias": ("bias_initializer",),
    "embeddings": ("embeddings_initializer",),
}


def _layers(model: keras.layers.Layer):
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _layers(layer)


def seeded_initialisation(model: keras.Model, seed: int) -> None:
    """Re-draw every randomly initialised weight from its own initializer with a seed derived from
    `seed`, the weight's place among the model's weights, its name and its shape: the same weights in every
    process and every build, whatever the global random state, which is neither read nor reset. Not from its
    path: Keras numbers the layers it names itself per process (InceptionV3's and Xception's `conv2d`, then
    `conv2d_94` in the next build), so a process's second base got other weights than its first, and a warm
    extract (one build in the worker) wrote other features than a cold one (the launcher's probe first)."""
    place = 0
    for layer in _layers(model):
        for weight in layer.weights:
            if weight.path.rsplit("/", 1)[0] != layer.path:  # a nested layer's weight: drawn at that layer
                continue
            name = weight.path.rsplit("/", 1)[-1]
            for attr in _INITIALIZERS.get(name, ()):
                initializer = getattr(layer, attr, None)
                if initializer is not None:
                    break
            else:
                continue
            config = initializer.get_config()
            if "seed" not in config:  # a constant (zeros, ones): nothing random to fix
                continue
            place += 1
            digest = hashlib.sha256(f"{seed}:{place}:{name}:{tuple(weight.shape)}".encode()).digest()
            fixed = type(initializer).from_config({**config, "seed": int.from_bytes(digest[:4], "big") >> 1})
            weight.assign(fixed(weight.shape, weight.dtype))


def tap(base: keras.Model, layer: str | None) -> keras.Model:
    """The base cut at an intermediate layer's output (the seed taps VGG19's block4_pool)."""
    if not layer:
        return base
    names = [each.name for each in base.layers]
    if layer not in names:
        raise BaseError(f"layer: {base.name} has no layer {layer!r}{did_you_mean(layer, names)}")
    return keras.Model(base.inputs, base.get_layer(layer).output, name=f"{base.name}_to_{layer}")


def build_feature_extractor(
    base: keras.Model,
    preprocessing: keras.layers.Layer | None,
    input_size: tuple[int, int],
    pooling: str,
) -> keras.Model:
    """raw RGB 0..255 [n, h, w, 3] -> features; the base runs frozen, batch norm in inference mode."""
    base.trainable = False
    inputs = keras.Input((*input_size, 3), name="image")
    x = preprocessing(inputs) if preprocessing is not None else inputs
    x = InferenceMode(base, name="conv_base")(x)
    if pooling != "none" and len(x.shape) != 4:  # a tap past the spatial layers: Keras's own error named no param
        raise BaseError(
            f"pooling: {pooling!r} pools a feature map, but {base.name} gives {len(x.shape) - 1}-D features "
            f"{tuple(x.shape[1:])}: tap a convolutional layer (layer) or set pooling: none"
        )
    if pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    elif pooling != "none":
        raise BaseError(f"pooling: {pooling!r} is not one of none, avg, max")
    model = keras.Model(inputs, x, name="feature_extractor")
    model.trainable = False
    return model
