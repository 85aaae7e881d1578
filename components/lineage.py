"""What a model is made of, as the serving model records it and the audit reads it: the libraries whose
versions decide the bits."""

from __future__ import annotations

from importlib import metadata

LIBRARIES = (
    "tensorflow",
    "keras",
    "apache-beam",
    "tensorflow-transform",
    "tensorflow-datasets",
    "dvc",
    "numpy",
    "protobuf",
)


def library_versions() -> dict[str, str]:
    return {lib: metadata.version(lib) for lib in LIBRARIES}
