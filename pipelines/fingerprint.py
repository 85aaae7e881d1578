"""Fingerprints of code and of namespace records, for the content-keyed caches (`feature_cache`, `download_cache`).

Nothing heavy is imported here, so a stage that only needs a namespace (download) does not load Keras.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json


def code_fingerprint(modules: tuple[str, ...]) -> dict[str, str]:
    """module -> SHA-256 of its source file."""
    fingerprint = {}
    for name in modules:
        spec = importlib.util.find_spec(name)
        with open(spec.origin, "rb") as handle:
            fingerprint[name] = hashlib.sha256(handle.read()).hexdigest()
    return fingerprint


def namespace_of(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]
