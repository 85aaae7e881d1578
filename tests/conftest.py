"""Shared fixtures: tiny generated images and datasets, never the network."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

CLASS_COLORS = {"cats": (200, 60, 40), "dogs": (40, 60, 200), "birds": (40, 180, 60)}


def image_array(seed: int, color=(128, 128, 128), size=(24, 32)) -> np.ndarray:
    """A small noisy image around `color`; distinct seeds give distinct images."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-50, 50, (size[0], size[1], 3))
    return np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **save_kwargs) -> bytes:
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def make_class_folder(root: Path, per_class: int = 6, classes=("cats", "dogs"), start: int = 0) -> Path:
    """root/<class>/<i>.jpg with distinct, class-coloured JPEGs."""
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            seed = 1000 * c + i
            (folder / f"{name}_{i}.jpg").write_bytes(encode(image_array(seed, CLASS_COLORS.get(name, (90, 90, 90)))))
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_class_folder(tmp_path / "source", per_class=12)


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
