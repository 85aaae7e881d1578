"""Shared fixtures: tiny generated images and datasets, never the network."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.tiny_dataset import image_array, make_class_folder  # noqa: F401 (re-exported for tests)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]


def tree_bytes(root: Path) -> dict[str, bytes]:
    """relative path -> bytes of every file under `root`: two trees compare byte for byte."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def open_files_under(*roots: Path | str) -> list[str]:
    """The files under `roots` that this process holds open (Linux's /proc/self/fd), deleted ones included
    (the kernel names them "PATH (deleted)"): what a stage must have closed when it returns. Linux only."""
    prefixes = [str(Path(root).resolve()) for root in roots]
    held = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # the descriptor listing the folder itself, gone by now
        path = target.removesuffix(" (deleted)")
        if any(path == prefix or path.startswith(prefix + os.sep) for prefix in prefixes):
            held.append(target)
    return held


def repo_params(overrides: dict | None = None) -> dict:
    """The repository's params.yaml with `overrides` merged in: a complete params file, as stages need."""
    from components.params import read_params
    from tools import preset

    return preset.merge(read_params(REPO / "params.yaml"), overrides or {})


os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def encode(array: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **save_kwargs) -> bytes:
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def bmp_file(
    rows: list[bytes], width: int, height: int, bits: int, header: int = 40, masks=None, top_down: bool = False
) -> bytes:
    """A BMP of `rows` (each row's pixel bytes, bottom row first unless `top_down`; padding added), with a
    `header`-byte info header (40, 108 or 124) and, for BI_BITFIELDS, `masks` (R, G, B[, A]). Written by
    hand: Pillow writes no v4/v5 headers nor bit masks."""
    data = b"".join(row + bytes(-len(row) % 4) for row in rows)
    info = struct.pack(
        "<IiiHHIIiiII",
        header,
        width,
        -height if top_down else height,
        1,
        bits,
        0 if masks is None else 3,
        len(data),
        2835,
        2835,
        0,
        0,
    )
    extra = b""
    if masks is not None and header == 40:
        extra = struct.pack("<III", *masks[:3])  # after a v3 header
    elif header >= 108:
        info += struct.pack("<IIII", *(tuple(masks or ()) + (0, 0, 0, 0))[:4]) + b"BGRs" + bytes(48)
        if header >= 124:
            info += struct.pack("<IIII", 4, 0, 0, 0)
    assert len(info) == header, len(info)
    offset = 14 + header + len(extra)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + extra + data


@pytest.fixture
def live_pid():
    """The id of a process that runs for the test's length (a concurrent run's stand-in): a child of this
    one, so the test does not depend on what else runs on the machine (os.getppid() is 0 under PID 1)."""
    child = subprocess.Popen(["sleep", "300"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


def low_depth_png(samples: np.ndarray, depth: int, palette=None, trns: bytes | None = None) -> bytes:
    """A PNG of raw samples at 1, 2 or 4 bits: gray (colour type 0), or palette entries (type 3) with
    `palette` (rows of RGB); `trns`: a tRNS chunk's bytes. Written by hand: Pillow writes gray below 8 bits
    only for its 1-bit mode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = []
    for row in samples:
        bits = "".join(format(int(v), f"0{depth}b") for v in row)
        bits += "0" * (-len(bits) % 8)
        rows.append(b"\0" + int(bits, 2).to_bytes(len(bits) // 8, "big"))
    height, width = samples.shape
    colour = 0 if palette is None else 3
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    if palette is not None:
        out += chunk(b"PLTE", bytes(np.asarray(palette, np.uint8).ravel()))
    if trns is not None:
        out += chunk(b"tRNS", trns)
    return out + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_class_folder(tmp_path / "source", per_class=12)


def make_converted(root: Path, per_class: int, start: int = 0, classes=("cats", "dogs")) -> Path:
    """download + convert of generated images in `root/src` (images added later keep the earlier ones' splits)."""
    from components import convert
    from components import download as dl

    make_class_folder(root / "src", per_class=per_class, start=start, classes=classes)
    dl.run(
        dl.Config(
            dl.CommonParams(seed=4),
            dl.DatasetParams(source="folder", dir=str(root / "src")),
            dl.DownloadParams(fractions=dl.Fractions(train=0.6, val=0.2, test=0.2)),
        ),
        root / "download",
    )
    convert.run(
        convert.Config(convert.ConvertParams(shards=convert.Shards(train=2, val=1, test=1))),
        root / "download",
        root / "convert",
    )
    return root / "convert"


@pytest.fixture(scope="session")
def converted_tiny(tmp_path_factory) -> Path:
    """The convert stage's output for 18 generated images (download + convert run once per session)."""
    return make_converted(tmp_path_factory.mktemp("converted"), per_class=9)


@pytest.fixture(scope="session")
def tiny_base_weights(tmp_path_factory) -> Path:
    """A weights file for mobilenet_v2 at 32x32: the same base in every build, with usable batch-norm statistics.

    A freshly initialised base run in inference mode (as transfer learning runs
    it) shrinks its activations to ~1e-12, so nothing would train. One forward
    pass in training mode with momentum 0 sets every moving mean and variance to
    that batch's statistics, as pretraining would have.
    """
    import keras
    import numpy as np

    keras.utils.set_random_seed(11)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_32.weights.h5"
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    pixels = np.random.default_rng(11).uniform(-1, 1, (16, 32, 32, 3)).astype("float32")
    base(pixels, training=True)
    base.save_weights(path)
    return path


def keras_imagenet_file(keras_home: Path, size: int, seed: int) -> Path:
    """Write MobileNetV2's ImageNet no-top weights file for `size` into a Keras download cache (`keras_home`, what
    KERAS_HOME names), as Keras's download leaves it: the names and shapes of the real file, seeded weights with
    calibrated batch-norm statistics (as `tiny_base_weights`) instead of ImageNet's, which cannot be downloaded
    here. Another `seed` is another file."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(seed)
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(size, size, 3))
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    base(np.random.default_rng(seed).uniform(-1, 1, (8, size, size, 3)).astype("float32"), training=True)
    path = Path(keras_home) / "models" / f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}_no_top.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, base)
    return path


_exit_status = {"code": None}


def pytest_sessionfinish(session, exitstatus):
    _exit_status["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without interpreter finalisation once pytest has reported.

    After a Beam/tf.Transform pipeline ran in this process, protobuf's upb
    extension can segfault while garbage-collecting at shutdown
    (protocolbuffers/protobuf#22067; see components/cli.py), which would turn a
    green run into exit code 139.
    """
    if _exit_status["code"] is not None and not os.environ.get("PYTEST_NORMAL_EXIT"):
        import logging
        import sys

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status["code"])
