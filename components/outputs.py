"""Atomic stage outputs: build in a temporary sibling, then move into place.

A stage killed part-way leaves only a hidden ``.<name>.tmp-*`` folder, never a
half-written output that DVC (or the next stage) would accept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `final` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    if final.exists() or final.is_symlink():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def require_outputs(root: str | Path, relative: Iterable[str]) -> None:
    """Raise if any promised output is missing (the executor's last check)."""
    root = Path(root)
    missing = [name for name in relative if not (root / name).exists()]
    if missing:
        raise RuntimeError(f"stage did not produce its declared outputs under {root}: {missing}")


def stabilise_saved_model_fingerprint(saved_model_dir: str | Path) -> None:
    """Replace the random `uuid` in a SavedModel's fingerprint.pb with one derived from its checksum.

    TensorFlow writes a fresh random uuid on every save, so two saves of the
    same graph and weights differ by that field alone; deriving it from the
    content keeps re-runs byte-identical (and DVC hashes stable).
    """
    from tensorflow.core.protobuf import fingerprint_pb2

    path = Path(saved_model_dir) / "fingerprint.pb"
    if not path.exists():
        return
    fingerprint = fingerprint_pb2.FingerprintDef()
    fingerprint.ParseFromString(path.read_bytes())
    fingerprint.uuid = str(fingerprint.saved_model_checksum)
    path.write_bytes(fingerprint.SerializeToString(deterministic=True))


FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


def save_keras(model, path: str | Path) -> None:
    """`model.save(path)` with bytes that depend on the model alone.

    A `.keras` file is a zip whose entries carry the time of writing, whose
    metadata.json holds ``date_saved``, and whose config.json numbers objects
    shared between layers by their memory address (``shared_object_id``): two
    saves of the same weights in two processes differ by those alone. All three
    are fixed here (the ids renumbered in order of appearance, which keeps what
    is shared with what), so a re-trained identical model has the same DVC hash.
    """
    import json
    import zipfile

    path = Path(path)
    raw = path.with_name(f".{path.name}.raw-{uuid.uuid4().hex[:8]}.keras")
    model.save(raw)
    try:
        with zipfile.ZipFile(raw) as source, zipfile.ZipFile(path, "w") as target:
            for info in source.infolist():
                data = source.read(info.filename)
                if info.filename == "metadata.json":
                    metadata = json.loads(data)
                    metadata["date_saved"] = "1980-01-01@00:00:00"
                    data = json.dumps(metadata, sort_keys=True).encode()
                elif info.filename == "config.json":
                    data = json.dumps(_renumber_shared_objects(json.loads(data))).encode()
                entry = zipfile.ZipInfo(info.filename, date_time=FIXED_ZIP_TIME)
                entry.compress_type, entry.external_attr = info.compress_type, info.external_attr
                target.writestr(entry, data)
    finally:
        raw.unlink(missing_ok=True)


def _renumber_shared_objects(config):
    """`shared_object_id` values (memory addresses) -> 1, 2, ... in order of first appearance."""
    numbers: dict[int, int] = {}

    def walk(node):
        if isinstance(node, dict):
            return {k: (numbers.setdefault(v, len(numbers) + 1) if k == "shared_object_id" else walk(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return walk(config)
