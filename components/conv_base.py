"""The `conv_base` params section, shared by extract and finetune, and building the base from it."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Literal

import pydantic

from components.cli import EnvironmentProblem
from components.params import ParamsError, Section
from pipelines.fingerprint import file_sha256


class BaseWeightsOffline(EnvironmentProblem):
    """ImageNet weights are not cached and cannot be downloaded."""


class ConvBaseParams(Section):
    # A registry name (pipelines/bases.py), or null with `path` set to a saved
    # .keras conv base that takes raw RGB 0..255.
    name: str | None = "mobilenet_v2"
    path: str | None = None
    weights: str = "imagenet"  # imagenet | none | a weights file (registry bases only)
    input_size: tuple[int, int] = (160, 160)
    pooling: Literal["none", "avg", "max"] = "avg"
    layer: str | None = None  # tap an intermediate layer's output instead of the last one

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=False)

    @pydantic.field_validator("input_size", mode="before")
    @classmethod
    def _size(cls, value):
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise ValueError("must be [height, width], two integers")
        if min(value) < 1:
            raise ValueError("sides must be positive")
        return tuple(value)

    @pydantic.field_validator("name", "path", "layer", "weights", mode="before")
    @classmethod
    def _strings(cls, value):
        if value is not None and not isinstance(value, str):
            raise ValueError("must be a string or null")
        return value

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> "ConvBaseParams":
        if bool(self.name) == bool(self.path):
            raise ValueError("set exactly one of name (a registry base) and path (a saved .keras base)")
        if self.path and self.weights not in ("imagenet", "none"):
            raise ValueError("weights applies to registry bases; a saved base carries its own")
        return self


WEIGHTS_RECORD = "weights.json"  # the base_weights stage's record (components/base_weights.py)
IMAGENET_WEIGHTS = "imagenet.weights.h5"  # its weights file: the name tells pipelines.bases to build the ImageNet graph


def fetches_imagenet(params: ConvBaseParams) -> bool:
    """Whether the base's weights come from Keras's ImageNet download (what the base_weights stage writes)."""
    return bool(params.name) and params.weights == "imagenet"


def imagenet_from(params: ConvBaseParams, folder: str | Path) -> ConvBaseParams:
    """`params` with ``weights: imagenet`` replaced by the base_weights stage's file in `folder` (a path relative
    to the project, as dvc.yaml gives it, so records and cache namespaces do not name the checkout); other params
    as they are. The folder must hold this base's weights: another base's or size's is a stale output."""
    if not fetches_imagenet(params):
        return params
    folder = Path(folder)
    try:
        record = json.loads((folder / WEIGHTS_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ParamsError(
            f"conv_base.weights: imagenet: the base_weights stage's record {folder / WEIGHTS_RECORD} cannot be read ({exc}): "
            "run `dvc repro` (it runs base_weights before extract and finetune)"
        ) from None
    wanted = {"name": params.name, "weights": "imagenet", "input_size": list(params.input_size)}
    held = {key: record.get(key) for key in wanted}
    if held != wanted:
        raise ParamsError(
            f"conv_base: {folder} holds the weights of {held}, not of {wanted}: run `dvc repro` (base_weights "
            "first), not one stage alone"
        )
    if record.get("file") != IMAGENET_WEIGHTS or not (folder / IMAGENET_WEIGHTS).is_file():
        raise ParamsError(
            f"conv_base: {folder / IMAGENET_WEIGHTS}, the ImageNet weights its record names, is missing: "
            f"`dvc pull {folder}` or `dvc repro`"
        )
    from pipelines.fingerprint import file_sha256

    held_sha256 = file_sha256(folder / IMAGENET_WEIGHTS)
    if held_sha256 != record.get("sha256"):  # a file swapped or damaged since the stage wrote it
        raise ParamsError(
            f"conv_base: {folder / IMAGENET_WEIGHTS} is not the file {folder / WEIGHTS_RECORD} records (SHA-256 "
            f"{held_sha256[:12]}..., recorded {str(record.get('sha256'))[:12]}...): `dvc checkout {folder}` or "
            "`dvc repro` (base_weights first)"
        )
    return params.model_copy(update={"weights": (folder / IMAGENET_WEIGHTS).as_posix()})


def build_extractor(params: ConvBaseParams, imagenet_weights_sha256: str | None = None):
    """The frozen feature extractor (raw RGB in, features out); errors name the param.

    With `imagenet_weights_sha256` (the launching machine's `fingerprint`), ImageNet weights loaded from this
    machine's Keras cache must be those: a Beam worker on another machine with another file stops with an
    error instead of writing its features under the launcher's namespace."""
    from pipelines import bases  # Keras and TensorFlow: imported where a base is built or read

    with errors_named_by_param():
        base, preprocessing = bases.load_conv_base(
            params.name, params.path, params.weights, params.input_size, offline_error=BaseWeightsOffline
        )
        if imagenet_weights_sha256 and bases.weights_digest(base) != imagenet_weights_sha256:
            raise BaseWeightsOffline(
                f"weights: the ImageNet weights of {params.name} in this machine's Keras cache (~/.keras/models) "
                f"are not those the stage was started with (SHA-256 {imagenet_weights_sha256[:12]}...): give every "
                "worker the same file, or use a saved base in models/ (conv_base.path)"
            )
        base = bases.tap(base, params.layer)
        return bases.build_feature_extractor(base, preprocessing, params.input_size, params.pooling)


@contextlib.contextmanager
def errors_named_by_param() -> Iterator[None]:
    """A base that cannot be built: the error names the conv_base param."""
    from pipelines import bases

    try:
        yield
    except bases.BaseError as exc:
        raise ParamsError(f"conv_base.{exc}") from None
    except BaseWeightsOffline as exc:
        raise BaseWeightsOffline(f"conv_base.{exc}") from None


TRACKED = "models"  # the folder dvc.yaml names as a dependency of extract and finetune


def file_params(params: ConvBaseParams) -> dict[str, str]:
    """The params that name a file, with their values: a saved base (`path`), a weights file (`weights`)."""
    files = {"path": params.path, "weights": None if params.weights in ("imagenet", "none") else params.weights}
    return {name: value for name, value in files.items() if value}


def check_tracked(params: ConvBaseParams, tracked: str | Path = TRACKED) -> None:
    """A saved base or weights file must lie in `tracked` (relative to the working directory, the project's
    root under `dvc repro`): a file elsewhere is no dependency of the stages, so DVC would not re-run them
    when it changes, nor version it for a rebuild."""
    folder = Path(os.path.abspath(tracked))  # not resolved: a symlink in models/ is tracked by its content
    for name, value in file_params(params).items():
        if not Path(os.path.abspath(value)).is_relative_to(folder):
            raise ParamsError(
                f"conv_base.{name}: {value} is outside {tracked}/, which dvc.yaml declares as the stages' "
                f"dependency: copy it there (or `dvc import` it into {tracked}/) and set conv_base.{name} to that path"
            )


def for_workers(params: ConvBaseParams) -> ConvBaseParams:
    """`params` with the saved base or weights file as an absolute path: what a Beam worker builds from, whose
    working directory need not be the project's (a worker pool started elsewhere). Records and cache namespaces
    keep the relative path dvc.yaml and params.yaml give, so they do not name the checkout."""
    return params.model_copy(update={name: os.path.abspath(value) for name, value in file_params(params).items()})


FILE_DIGESTS = {"path": "file_sha256", "weights": "weights_sha256"}  # a file param -> its digest in `fingerprint`


def check_same_files(params: ConvBaseParams, record: dict) -> None:
    """The saved base or weights file this process reads must be the one `record` (the launching process's
    `fingerprint`) hashed: a Beam worker reads it from its own disk."""
    for name, key in FILE_DIGESTS.items():
        if record.get(key) and file_sha256(getattr(params, name)) != record[key]:
            raise ParamsError(
                f"conv_base.{name}: {getattr(params, name)} on this worker is not the file the stage was started "
                f"with (SHA-256 {record[key][:12]}...): give every worker the same file (the same checkout of "
                "models/, or a path they share)"
            )


def fingerprint(params: ConvBaseParams) -> dict:
    """What identifies the base's weights: the registry entry and weights, or the saved file's hash.

    ImageNet weights of a registry base come from Keras's download cache (~/.keras/models), a file no stage
    declares and which Keras checks against a hash for some bases only (not MobileNetV2's): their digest, as
    loaded, goes in the record, so a feature cache built with other weights is never read for these (it costs
    building the base, ~1 s)."""
    from pipelines import bases  # Keras and TensorFlow: imported where a base is built or read

    record = params.model_dump(mode="json")
    if params.path:
        record[FILE_DIGESTS["path"]] = file_sha256(params.path)
    elif params.weights == "imagenet":
        with errors_named_by_param():
            base, _ = bases.load_conv_base(
                params.name, None, "imagenet", params.input_size, offline_error=BaseWeightsOffline
            )
        record["imagenet_weights_sha256"] = bases.weights_digest(base)
    elif params.weights != "none":
        record[FILE_DIGESTS["weights"]] = file_sha256(params.weights)
    return record
