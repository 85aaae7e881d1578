"""A content-keyed store of the download stage's per-file results, so that new files are the only ones decoded.

DVC re-runs a stage from scratch when its inputs change: with 250 images added to 25,000, download would
check and decode 25,250 files (Pillow's full decode and the shared TensorFlow decode: ~2.7 ms a file here).
It looks each file up here first; reading and hashing the file is all an unchanged file costs.

Layout: ``<root>/<namespace>/<key[:2]>/<key>.json``, and ``<key>.png`` beside it for a re-encoded image.

- **namespace**: the SHA-256 of everything that decides a file's result apart from its bytes: the
  ``download`` limits (``min_side``, ``max_pixels``), the source of the code that checks, decodes and
  stores (`CODE`: an edit there is another namespace), and the TensorFlow, Pillow (and its codec
  libraries') and NumPy versions and the CPU architecture (the decoders' and encoder's bits).
- **key**: the SHA-256 of the file's bytes (the manifest's ``sha256``).
- **value**: `normalise.normalise_image`'s result: a rejection's reason, or the image's fields; an image
  kept as-is stores no bytes (they are the file's), a re-encoded one stores its PNG with its SHA-256 in
  the JSON. An entry that cannot be read, or whose PNG does not match, is a miss. A rejection that is not
  the file's (the decoder failing for another reason than its bytes) is not stored.

Writes go to a unique temporary name and are renamed into place (the PNG before the JSON that names it),
so a run killed mid-write leaves only whole entries. Nothing here is a DVC output: deleting the folder makes
the next run cold, and a cold run writes the same bytes (tests/components/test_download.py checks this).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import uuid
from pathlib import Path

import numpy as np
import PIL
import tensorflow as tf
from PIL import features

from pipelines import normalise
from pipelines.fingerprint import code_fingerprint, namespace_of

# The code that checks, decodes and re-encodes a file, and this store's own reading and writing of results.
CODE = ("pipelines.normalise", "pipelines.image", "pipelines.image_header", "pipelines.download_cache")
SUFFIXES = (".json", ".png")  # an entry's files: the result, and a re-encoded image's bytes


def namespace_record(min_side: int, max_pixels: int) -> dict:
    """What, besides a file's bytes, decides its result."""
    return {
        "min_side": int(min_side),
        "max_pixels": int(max_pixels),
        "code": code_fingerprint(CODE),
        "tensorflow": tf.__version__,
        "pillow": PIL.__version__,
        # the codec libraries Pillow was built with: a rebuilt Pillow can read or write other bytes
        "pillow_codecs": {name: features.version(name) for name in ("jpg", "zlib", "webp", "libtiff")},
        # ... and the libraries behind those API versions (jpg 6.2 is libjpeg-turbo's API, zlib 1.2.13 zlib-ng's)
        **pillow_libraries(),
        "numpy": np.__version__,
        "machine": platform.machine(),
    }


CODEC_LIBRARIES = ("libjpeg_turbo", "zlib_ng")


def pillow_libraries() -> dict:
    """The versions of the codec libraries Pillow runs, where it reports them (nothing where it reports none)."""
    found = {name: features.version(name) for name in CODEC_LIBRARIES if features.check_feature(name)}
    return {"pillow_libraries": found} if found else {}


class DownloadCache:
    """One namespace of the store: get/put `normalise_image` results by the file's SHA-256."""

    def __init__(self, root: str | Path, record: dict):
        self.folder = Path(root) / namespace_of(record)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "meta.json"  # also what marks a namespace for tools.cache_gc
        if not meta.exists():
            _write(meta, json.dumps(record, indent=2, sort_keys=True).encode())
        self.hits = self.misses = 0

    def _path(self, key: str, suffix: str) -> Path:
        return self.folder / key[:2] / f"{key}{suffix}"

    def get(self, key: str, data: bytes) -> normalise.Normalised | normalise.Rejected | None:
        """The stored result for the file `data` (whose SHA-256 is `key`), or None."""
        entry = _read_json(self._path(key, ".json"))
        result = None if entry is None else _result(entry, data, lambda: _read(self._path(key, ".png")))
        if result is None:
            self.misses += 1
        else:
            self.hits += 1
        return result

    def put(self, key: str, data: bytes, result: normalise.Normalised | normalise.Rejected) -> None:
        if isinstance(result, normalise.Rejected) and not result.lasting:
            return  # a failure a re-run may not repeat (out of memory in the decoder): decode it again next time
        (self.folder / key[:2]).mkdir(exist_ok=True)
        if isinstance(result, normalise.Rejected):
            entry = {"rejected": result.reason}
        else:
            entry = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name != "data"}
            if result.data != data:  # re-encoded: store its bytes (as-is: they are the file's)
                _write(self._path(key, ".png"), result.data)
                entry["data_sha256"] = hashlib.sha256(result.data).hexdigest()
        _write(self._path(key, ".json"), json.dumps(entry, sort_keys=True).encode())


def _result(entry: dict, data: bytes, read_stored) -> normalise.Normalised | normalise.Rejected | None:
    if "rejected" in entry:
        return normalise.Rejected(entry["rejected"])
    stored = data
    if "data_sha256" in entry:
        stored = read_stored()
        if stored is None or hashlib.sha256(stored).hexdigest() != entry["data_sha256"]:
            return None
    try:
        fields = {f.name: entry[f.name] for f in dataclasses.fields(normalise.Normalised) if f.name != "data"}
    except KeyError:  # a foreign or older entry
        return None
    return normalise.Normalised(data=stored, **fields)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _read_json(path: Path) -> dict | None:
    raw = _read(path)
    if raw is None:
        return None
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
