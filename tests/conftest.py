"""Shared fixtures: tiny generated images and datasets, never the network."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.tiny_dataset import image_array, make_class_folder  # noqa: F401 (re-exported for tests)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def encode(array: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **save_kwargs) -> bytes:
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


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
