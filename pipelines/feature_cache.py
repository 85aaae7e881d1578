"""A content-keyed store of conv-base features, so that new images are the only ones extracted.

DVC re-runs a stage from scratch when any input changes (treeverse/dvc#4279):
with 100 images added to 2,000, the extract stage would run the base over
2,100. The extract stage instead looks each image up here first.

Layout: ``<root>/<namespace>/<key[:2]>/<key>.f32`` with ``<root>/<namespace>/meta.json``.

- **namespace**: the SHA-256 of everything that decides an image's features
  apart from the image: the base's fingerprint (registry entry and weights, or
  the saved file's SHA-256), input size, pooling, tapped layer, the batch size
  (a batch's shape can change the last bits), the source of the code that
  decodes images, builds the base and runs it (`FEATURE_CODE`: an edit there is another
  namespace, no version to bump by hand), the TensorFlow and Keras versions and
  the CPU architecture. Another base, size, batch or decode is another
  namespace, so it never reads these.
- **key**: the SHA-256 of the image's encoded bytes as convert stored them.
- **value**: the flattened float32 features, little-endian, then the CRC32C of the key and those bytes (4 bytes,
  little-endian). An entry of the wrong length (a truncated write, a foreign file) is a miss; one whose checksum
  does not match (bytes damaged in place: a crash before the data reached the disk, bit rot) is never read
  (`get` gives None), and extract computes it again (`ENTRY_FORMAT`, in the namespace, names this layout).

Writes go to a unique temporary name and are renamed into place, so workers
writing at once and runs killed mid-write leave only whole entries. A bucket
path (``gs://...``, any ``scheme://``) goes through `tf.io.gfile`, so distributed
runners can share the store; a local folder uses plain file calls, as opening a
GFile costs ~1.4 ms an entry (about 3 s of a 2,000-image cold run, measured).
Nothing here is a DVC output: deleting the folder only makes the next run cold,
and a cold run writes the same bytes (the extract tests check this).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import uuid
from importlib import metadata
from typing import Collection

import google_crc32c
import keras
import numpy as np
import tensorflow as tf

from pipelines import cache_lock, fingerprint

# The modules whose code decides an image's pixels (decode, resize, record parsing), the
# model that runs on them (the registry, tapping, pooling) and how it is run (pipelines/extract.py:
# the traced step, the batch padding and the batch plan noted in the namespace per batch size; the
# batch-independence probe checks that code against itself, not against an earlier version of it).
FEATURE_CODE = ("pipelines.image", "pipelines.records", "pipelines.bases", "pipelines.extract", "components.conv_base")
SUFFIX = ".f32"
ENTRY_FORMAT = "float32le+crc32c"  # an entry's layout, in every namespace: another layout is another namespace
_CHECK = struct.Struct("<I")


def image_key(image_bytes: bytes) -> str:
    return hashlib.sha256(image_bytes).hexdigest()


def code_fingerprint(modules: tuple[str, ...] = FEATURE_CODE) -> dict[str, str]:
    """module -> SHA-256 of its source file (the feature code by default)."""
    return fingerprint.code_fingerprint(modules)


def namespace_record(base_fingerprint: dict, batch_size: int, runtime: str = "tensorflow") -> dict:
    """What, besides the image, decides its features (the runtime too: OpenVINO's differ in the last bits)."""
    base = dict(base_fingerprint)
    if base.get("file_sha256"):
        base.pop("path", None)  # the same saved base copied elsewhere is the same base
    # the runtime too (TensorFlow's entries keep their namespace); the same CPU features and cores, or other
    # entries (a shared cache)
    return {"conv_base": base, "batch_size": int(batch_size), **local_record(runtime)}


PARAMS_FIELDS = ("conv_base", "batch_size")  # the fields of `namespace_record` the params decide


def local_record(runtime: str = "tensorflow") -> dict:
    """The fields of `namespace_record` that this process decides rather than the params: the code, the
    library versions and the machine (and the runtime's)."""
    return {
        **({} if runtime == "tensorflow" else runtime_record(runtime)),
        "code": code_fingerprint(),
        "entry": ENTRY_FORMAT,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        **fingerprint.compute_record(),
    }


KERAS_DEFAULTS = fingerprint.KERAS_DEFAULTS
keras_settings = fingerprint.keras_settings
accelerators = fingerprint.accelerators


def local_differences(namespace: dict) -> list[str]:
    """The fields of `namespace` (made by the launching process) that this process would record otherwise: a
    Beam worker on another kind of machine, with other libraries or other code, must not write its features
    under the launcher's namespace (a later run there would read them as its own)."""
    here = local_record(namespace.get("runtime", "tensorflow"))
    # every field either side's process decided: some are recorded only where not the default (Keras's config,
    # GPUs), so a launcher's that this worker lacks differ too
    keys = set(here) | (set(namespace) - set(PARAMS_FIELDS))
    return sorted(key for key in keys if namespace.get(key) != here.get(key))


def runtime_record(runtime: str) -> dict:
    """The runtime, its version and the code that converts and compiles for it."""
    return {
        "runtime": runtime,
        runtime: metadata.version(runtime),
        "runtime_code": code_fingerprint(("pipelines.runtimes",))["pipelines.runtimes"],
    }


namespace_of = fingerprint.namespace_of


def namespace_folder(root: str, record: dict) -> str:
    return f"{root.rstrip('/')}/{namespace_of(record)}"


class _LocalFiles:
    """The store's file calls on a local folder."""

    makedirs = staticmethod(lambda path: os.makedirs(path, exist_ok=True))
    replace = staticmethod(os.replace)

    @staticmethod
    def size(path: str) -> int | None:
        try:
            return os.stat(path).st_size
        except OSError:
            return None

    @staticmethod
    def read(path: str) -> bytes | None:
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError:
            return None

    @staticmethod
    def write(path: str, data: bytes) -> None:
        with open(path, "wb") as handle:
            handle.write(data)


class _GFiles:
    """The same calls through `tf.io.gfile`, for bucket paths."""

    def __init__(self):
        self._gfile = tf.io.gfile
        self.makedirs = self._gfile.makedirs

    def replace(self, src: str, dst: str) -> None:
        self._gfile.rename(src, dst, overwrite=True)

    def size(self, path: str) -> int | None:
        try:
            return self._gfile.stat(path).length
        except Exception:  # noqa: BLE001 - gfile raises NotFoundError (and others on buckets): a miss
            return None

    def read(self, path: str) -> bytes | None:
        try:
            with self._gfile.GFile(path, "rb") as handle:
                return handle.read()
        except Exception:  # noqa: BLE001 - as in size()
            return None

    def write(self, path: str, data: bytes) -> None:
        with self._gfile.GFile(path, "wb") as handle:
            handle.write(data)


def _files(root: str):
    return _GFiles() if "://" in root else _LocalFiles()


def _read_json(path: str) -> dict | None:
    """A note, or None where there is none or it does not parse (a write cut short by a crash: notes are
    written again, so a damaged one is a missing one, not an error that stops every later run)."""
    data = _files(path).read(path)
    if data is None:
        return None
    try:
        note = json.loads(data)
    except ValueError:
        return None
    return note if isinstance(note, dict) else None


class FeatureCache:
    """One namespace of the store: get/put flattened float32 features by image key."""

    def __init__(self, root: str, record: dict, feature_shape: list[int], derived_from: str | None = None):
        """`derived_from`: the namespace this one stands in for (a worker whose runner settings differ from the
        launcher's keys its own, `pipelines.extract`), kept in its meta so that `collect_garbage` keeps both."""
        self._files = _files(root)
        self.record = record
        self.feature_shape = [int(d) for d in feature_shape]
        self.feature_size = int(np.prod(self.feature_shape))
        self.folder = namespace_folder(root, record)
        self._files.makedirs(self.folder)
        if self.get_note("meta") is None:
            self.put_note("meta", {**record, "feature_shape": self.feature_shape})
        # every namespace it stands in for, a note each (launchers whose settings differ from each other map to the
        # same worker namespace): one name in the meta kept only the last, and a list there, read and written back,
        # lost one of two written at once; either way `collect_garbage` deleted what the others' outputs used
        if derived_from is not None and self.get_note(f"{DERIVED_FROM}-{derived_from}") is None:
            self.put_note(f"{DERIVED_FROM}-{derived_from}", {DERIVED_FROM: derived_from})

    def _path(self, key: str) -> str:
        return f"{self.folder}/{key[:2]}/{key}{SUFFIX}"

    def _write(self, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self._files.write(tmp, data)
        self._files.replace(tmp, path)

    def has(self, key: str) -> bool:
        """Is there an entry of the right size for `key`? (Without reading it: `get` checks its bytes.)"""
        return self._files.size(self._path(key)) == 4 * self.feature_size + _CHECK.size

    def get(self, key: str) -> np.ndarray | None:
        """The features stored for `key`, or None: no entry, or one of the wrong size or checksum."""
        data = self._files.read(self._path(key))
        if data is None or len(data) != 4 * self.feature_size + _CHECK.size:
            return None
        payload = data[: -_CHECK.size]
        if _CHECK.unpack(data[-_CHECK.size :])[0] != _checksum(key, payload):
            return None
        return np.frombuffer(payload, dtype="<f4")

    def put(self, key: str, values: np.ndarray) -> None:
        values = np.asarray(values, dtype="<f4").ravel()
        if values.size != self.feature_size:
            raise ValueError(f"feature cache: {values.size} values for a {self.feature_size}-value namespace")
        self._files.makedirs(f"{self.folder}/{key[:2]}")
        payload = values.tobytes()
        self._write(self._path(key), payload + _CHECK.pack(_checksum(key, payload)))

    def get_note(self, name: str) -> dict | None:
        """A small JSON record kept with the namespace (its meta, the batch plan extract found), or None."""
        return _read_json(f"{self.folder}/{name}.json")

    def put_note(self, name: str, record: dict) -> None:
        self._write(f"{self.folder}/{name}.json", json.dumps(record, indent=2, sort_keys=True).encode())


def _checksum(key: str, payload: bytes) -> int:
    """CRC32C of an entry's key and features: damaged bytes, or an entry under another key's name, do not match."""
    return google_crc32c.value(key.encode() + payload)


def stored_feature_shape(root: str, record: dict) -> list[int] | None:
    """The feature shape recorded for this namespace, or None if it was never built."""
    meta = _read_json(f"{namespace_folder(root, record)}/meta.json")
    return None if meta is None else [int(d) for d in meta["feature_shape"]]


def nothing_collected() -> dict:
    """`collect_garbage`'s report of a cache left alone."""
    return {"namespaces_removed": [], "entries_removed": 0, "entries_kept": 0, "bytes_freed": 0}


def nothing_converted_collected() -> dict:
    """`collect_converted`'s report of a folder left alone."""
    return {"converted_removed": 0, "bytes_freed": 0}


DERIVED_FROM = "derived_from"  # in a namespace's meta.json: the namespace it stands in for


def _derived_from(folder: str) -> list[str]:
    """The namespaces a worker's namespace stands in for: its `derived_from-<name>.json` notes, and the name (or
    list of names) its meta holds where earlier code wrote them there."""
    recorded = (_read_json(os.path.join(folder, "meta.json")) or {}).get(DERIVED_FROM)  # a name, or a list of them
    names = [recorded] if isinstance(recorded, str) else []
    names += [n for n in recorded if isinstance(n, str)] if isinstance(recorded, list) else []
    prefix = f"{DERIVED_FROM}-"
    return names + [
        n[len(prefix) : -len(".json")] for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".json")
    ]


_GC_ASIDE = re.compile(r"^\..+\.gc-[0-9a-f]{12}$")  # `collect_garbage`'s name for a namespace it deletes


def collect_garbage(
    root: str,
    keep_namespace: str | Collection[str],
    keep_keys: set[str],
    dry_run: bool = False,
    suffixes: tuple[str, ...] = (SUFFIX,),
) -> dict:
    """Delete what the current outputs do not use: every other namespace under `root`, and the entries of
    `keep_namespace` whose key is not in `keep_keys` (its notes stay). A namespace derived from a kept one (its
    meta's `derived_from`: the one a runner's workers wrote, their settings unlike the launcher's) is kept alike:
    the outputs came from it, and only the launcher's is recorded. An entry is a file `<key><suffix>` in a
    sub-folder (the download cache's have two suffixes, `pipelines.download_cache`). A local folder only; run
    it when no stage uses the cache. Returns the namespaces and entries removed and kept, and the bytes freed."""
    if "://" in root:
        raise ValueError(f"{root}: garbage collection runs on a local cache folder (use the bucket's lifecycle rules)")
    kept = {keep_namespace} if isinstance(keep_namespace, str) else set(keep_namespace)
    report = nothing_collected()
    if not os.path.isdir(root):
        return report
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        left_aside = bool(_GC_ASIDE.match(name)) and os.path.isdir(folder)  # by a collection killed deleting it
        if not left_aside and not os.path.isfile(os.path.join(folder, "meta.json")):
            continue  # not a namespace (the converted models of another runtime, a user's file): untouched
        if left_aside or (name not in kept and not kept.intersection(_derived_from(folder))):
            report["namespaces_removed"].append(name)
            report["bytes_freed"] += _bytes_under(folder)
            if not dry_run:
                # a namespace deleted in place and killed half-way left a folder without its meta.json, which no
                # later collection took for a namespace, so its entries stayed for good
                if left_aside:
                    shutil.rmtree(folder)
                else:
                    _delete_aside(folder)
            continue
        for prefix in sorted(os.listdir(folder)):
            sub = os.path.join(folder, prefix)
            if not os.path.isdir(sub):
                if ".tmp-" in prefix:  # a note a killed run was writing (meta.json.tmp-..., batches-N.json.tmp-...)
                    report["entries_removed"] += 1
                    report["bytes_freed"] += os.path.getsize(sub)
                    if not dry_run:
                        os.unlink(sub)
                continue  # meta.json and the other notes
            for entry in sorted(os.listdir(sub)):
                if any(entry.endswith(x) and entry[: -len(x)] in keep_keys for x in suffixes):
                    report["entries_kept"] += 1
                    continue
                path = os.path.join(sub, entry)  # an unused entry, or a write a killed run left behind
                report["entries_removed"] += 1
                report["bytes_freed"] += os.path.getsize(path)
                if not dry_run:
                    os.unlink(path)
    return report


def collect_converted(folder: str, dry_run: bool = False) -> dict:
    """Delete a runtime's converted models (`pipelines.runtimes`: OpenVINO IR under a key of the model, the
    versions and the code), the one in use included, and the private folders of killed conversions: a
    conversion is a function of the model, redone in seconds at its next use (3.3 s for Lite0), while the keys
    of every base, size and version seen so far would pile up. A local folder; returns what went."""
    report = nothing_converted_collected()
    if "://" in folder or not os.path.isdir(folder):
        return report
    for name in sorted(os.listdir(folder)):
        if name == cache_lock.LOCK_FILE:  # evaluate's lock on the folder (held by the caller)
            continue
        path = os.path.join(folder, name)
        report["converted_removed"] += 1
        report["bytes_freed"] += _bytes_under(path)
        if dry_run:
            continue
        if os.path.isdir(path):  # a deletion killed half-way never leaves a key folder with one file
            _delete_aside(path)
        else:
            os.unlink(path)
    return report


def _delete_aside(folder: str) -> None:
    """Delete a folder renamed aside first (atomic; `_GC_ASIDE`'s name): a deletion killed half-way leaves a
    folder that is plainly garbage, never a part of what it was."""
    aside = os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.gc-{uuid.uuid4().hex[:12]}")
    os.rename(folder, aside)
    shutil.rmtree(aside)


def _bytes_under(path: str) -> int:
    """A file's size, or the sizes of every file in a folder."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(dirpath, f)) for dirpath, _, files in os.walk(path) for f in files)
