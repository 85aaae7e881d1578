"""download stage: fetch a dataset and split it deterministically into train/val/test.

Inputs
    params.yaml sections ``common``, ``dataset`` and ``download``.
    ``dataset.dir``: the class-folder root (``source: folder``) or the tfds
    ``data_dir`` (``source: tfds``); ``dvc.yaml`` declares it as a dependency.
Outputs (one folder, written atomically)
    ``images/<id>.jpg|png``  every kept image, normalised to RGB (JPEGs that are
                             already RGB and upright are kept byte-for-byte)
    ``manifest.jsonl``       one row per kept image: id, file, source, sha256 (of
                             the file), pixels_sha256 (of its normalised pixels),
                             label, split, width, height, format, normalised
    ``quarantine.jsonl``     one row per rejected file: source, label, reason
    ``summary.json``         counts per class per split, duplicates, quarantine;
                             found = kept + quarantined, per class
    ``params.json``          the resolved params

Run: ``python -m components.download --params params.yaml --out data/download``

An image's pixels are those of `pipelines.image.decode_image`, the decode the
serving model runs on a client's file, so training and serving cannot disagree
on a file download kept (EXIF orientation, transparency, CMYK, 16-bit, frames);
a file that decode reads differently from Pillow, or cannot read, is quarantined.
An image's id and split depend only on the hash of its normalised pixels, the
seed and the fractions, so re-runs give the same split and adding images never
moves existing ones. Identical images (the same pixels, whatever the file
format) are kept once; copies are quarantined as duplicates, and copies under
different labels are all quarantined.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
import unicodedata
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np
import pydantic
from PIL import Image, ImageOps, UnidentifiedImageError

from components import outputs
from components.cli import EnvironmentProblem, configure_logging
from components.manifest import MANIFEST, SPLITS, read_jsonl, write_jsonl  # noqa: F401 - read_jsonl: the stage's own reader too
from components.params import (
    CommonParams,
    ParamsError,
    Section,
    log_resolved,
    read_params,
    section,
    write_resolved,
)
from pipelines import image

log = logging.getLogger(__name__)

SPLIT_FOLDER_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
QUARANTINE = "quarantine.jsonl"
SUMMARY = "summary.json"
IMAGES = "images"
DECLARED_OUTPUTS = (MANIFEST, QUARANTINE, SUMMARY, IMAGES, "params.json")
NO_CLASS = "(no class)"
PROGRESS_SECONDS = 10.0  # a progress line at most this often while files are read


# --------------------------------------------------------------------------- config


class TfdsParams(Section):
    name: str = "cats_vs_dogs"
    # Our split name -> tfds split slice, or one slice that is then hash-split
    # by download.fractions.
    splits: dict[Literal["train", "val", "test"], str] | str = {
        "train": "train[:2000]",
        "val": "train[2000:3000]",
        "test": "train[3000:4000]",
    }
    image_key: str = "image"
    label_key: str = "label"

    @pydantic.field_validator("splits")
    @classmethod
    def _all_three(cls, value):
        if isinstance(value, dict) and set(value) != set(SPLITS):
            raise ValueError(f"needs exactly the keys train, val, test, got {sorted(value)}")
        return value


class DatasetParams(Section):
    source: Literal["tfds", "folder"] = "tfds"
    # folder: the class-folder root; tfds: the tfds data_dir (a DVC dependency).
    dir: str
    tfds: TfdsParams = TfdsParams()
    # folder only: with train/val(idation)/test sub-folders, `use` keeps that split
    # and `ignore` pools them and hash-splits.
    existing_splits: Literal["use", "ignore"] = "use"

    @pydantic.field_validator("dir")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty path")
        return value


class Fractions(Section):
    train: float
    val: float
    test: float

    @pydantic.model_validator(mode="after")
    def _sum_to_one(self) -> "Fractions":
        values = (self.train, self.val, self.test)
        if any(v < 0 or v > 1 for v in values):
            raise ValueError(f"each fraction must be within [0, 1], got {values}")
        if self.train <= 0:
            raise ValueError("train must be > 0")
        if abs(sum(values) - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {sum(values):g}")
        return self


class DownloadParams(Section):
    fractions: Fractions = Fractions(train=0.5, val=0.25, test=0.25)  # the seed's 2:1:1
    min_side: int = pydantic.Field(16, ge=1)
    max_pixels: int = pydantic.Field(int(Image.MAX_IMAGE_PIXELS or 89_478_485), ge=1)


@dataclasses.dataclass(frozen=True)
class Config:
    common: CommonParams
    dataset: DatasetParams
    download: DownloadParams

    def sections(self) -> dict[str, Section]:
        return {"common": self.common, "dataset": self.dataset, "download": self.download}


def load_config(params_path: str | Path) -> Config:
    data = read_params(params_path)
    return Config(
        common=section(data, CommonParams, "common", params_path),
        dataset=section(data, DatasetParams, "dataset", params_path),
        download=section(data, DownloadParams, "download", params_path),
    )


# --------------------------------------------------------------------------- pure logic


@dataclasses.dataclass(frozen=True)
class Found:
    """One file (or tfds example) found at the source, before inspection."""

    source: str
    label: str | None
    given_split: str | None = None
    data: bytes | None = None
    problem: str | None = None  # rejected before reading (hidden, symlink, ...)
    class_folder: bool = False  # a class folder itself (declares the class, even if empty)


@dataclasses.dataclass(frozen=True)
class Normalised:
    data: bytes
    ext: str
    width: int
    height: int
    format: str
    action: str
    pixels_sha256: str  # `pixels_hash` of the normalised pixels: the image's identity


@dataclasses.dataclass(frozen=True)
class Rejected:
    reason: str


def normalise_label(name: str) -> str:
    """Class names are NFC-normalised so the same folder name from macOS (NFD) matches."""
    return unicodedata.normalize("NFC", name)


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str]:
    """Pillow's reading of any mode as 8-bit RGB, transparency onto white: the reference
    `pipelines.image.decode_image` is checked against."""
    mode = img.mode
    keyed = "transparency" in img.info and mode in ("L", "RGB")  # a PNG colour key (tRNS) makes one colour transparent
    if mode == "RGB" and not keyed:
        return img, "RGB"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(np.floor(arr * (256.0 / (peak + 1))), 0, 255).astype(np.uint8)  # the high byte, as libpng gives
        return Image.fromarray(arr8, mode="L").convert("RGB"), f"{mode} grayscale to 8-bit RGB"
    if mode in ("RGBA", "LA", "PA") or keyed or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), f"{mode} onto white to RGB"
    return img.convert("RGB"), f"{mode} to RGB"


# Beyond orientation and size, pixels are compared for the formats whose decoding involves choices
# (transparency, palettes, bit depth): PNG, GIF, BMP, WebP. JPEG decoders may differ by their IDCT
# and upsampling (3 of the 2,000 shared photos: mean 2, largest 20 levels between TensorFlow's
# libjpeg-turbo and Pillow's), which is no different reading of the file, so JPEG's pixels are
# TensorFlow's. Within the tolerance a lossy WebP decoder's rounding passes; a wrong transparency,
# palette or bit depth (tens to 255 levels) does not.
MAX_PIXEL_GAP, MAX_MEAN_GAP = 24, 2.0

Decoder = Callable[[bytes], tuple[np.ndarray, int]]


def make_decoder() -> Decoder:
    """encoded bytes -> (normalised uint8 pixels, EXIF orientation) through `pipelines.image`,
    the decode extraction, training and the serving model run."""
    import tensorflow as tf

    traced = tf.function(image.decode_with_orientation, input_signature=[tf.TensorSpec([], tf.string)])

    def decode(data: bytes) -> tuple[np.ndarray, int]:
        pixels, orientation = traced(tf.constant(data))
        return pixels.numpy(), int(orientation)

    return decode


def pixels_hash(pixels: np.ndarray) -> str:
    """The identity of an image: the SHA-256 of its normalised pixels and their shape, whatever the file format."""
    digest = hashlib.sha256(f"{pixels.shape[0]}x{pixels.shape[1]}:".encode())
    digest.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def normalise_image(data: bytes, *, min_side: int, max_pixels: int, decode: Decoder) -> Normalised | Rejected:
    """Check a file, and return the pixels training and serving will see, as RGB bytes.

    Pillow checks it first (size limits before decoding, a full decode, the
    side limit). The pixels are those of `decode` (the shared decode, see
    `make_decoder`), which must agree with Pillow's reading: the same EXIF
    orientation and size, and for formats other than JPEG the same pixels
    within a decoder's rounding (`MAX_PIXEL_GAP`). An RGB JPEG that needs no
    orientation is kept byte-for-byte; anything else is re-encoded as PNG.
    """
    if not data:
        return Rejected("empty file (0 bytes)")
    sniffed = image.sniff_format(data)  # what the serving model will take it for
    fmt = sniffed or "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                return Rejected(
                    f"too large: {width}x{height} = {width * height} pixels > "
                    f"download.max_pixels={max_pixels} (decompression-bomb limit)"
                )
            fmt = img.format or fmt
            img.load()
    except Image.DecompressionBombError as exc:
        return Rejected(f"too large (decompression bomb): {exc}")
    except UnidentifiedImageError:
        return Rejected("not an image (unrecognised format)")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return Rejected(f"undecodable {fmt}: {exc}")
    if min(width, height) < min_side:
        return Rejected(f"too small: {width}x{height}, a side below download.min_side={min_side}")
    if sniffed is None:
        return Rejected(
            f"unsupported format {fmt}: the serving model reads {', '.join(image.FORMATS)}; "
            "convert the file to one of them"
        )

    actions = []
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
        actions.append(f"first of {img.n_frames} frames")
    orientation = img.getexif().get(0x0112, 1)
    applied = orientation if orientation in range(2, 9) else 1  # Pillow ignores other values, and so does the decode
    if applied != 1:
        img = ImageOps.exif_transpose(img)
        actions.append(f"EXIF orientation {orientation} applied")
    reference, how = _to_rgb(img)
    if how != "RGB":
        actions.append(how)
    try:
        pixels, decoded_orientation = decode(data)
    except Exception as exc:  # noqa: BLE001 - TensorFlow's decoders raise InvalidArgumentError and others
        return Rejected(f"undecodable {fmt} by the shared decoder (the serving model's): {str(exc).splitlines()[0]}")
    if decoded_orientation != applied or pixels.shape[:2] != (reference.height, reference.width):
        return Rejected(
            f"{fmt} orientation read differently by the shared decoder (EXIF {orientation}, decoded as "
            f"{decoded_orientation}, {pixels.shape[1]}x{pixels.shape[0]} against {reference.width}x{reference.height})"
        )
    gap = None if sniffed == "JPEG" else np.abs(pixels.astype(np.int16) - np.asarray(reference, dtype=np.uint8))
    if gap is not None and (gap.max() > MAX_PIXEL_GAP or gap.mean() > MAX_MEAN_GAP):
        hint = " (GIF transparency is not supported)" if fmt == "GIF" and "onto white" in how else ""
        return Rejected(
            f"{fmt} decoded differently by the shared decoder (the serving model's) than by Pillow{hint}: "
            f"largest pixel difference {int(gap.max())}, mean {gap.mean():.2f}; re-save it as PNG or JPEG"
        )
    identity = pixels_hash(pixels)
    if sniffed == "JPEG" and img.mode == "RGB" and not actions:
        return Normalised(data, "jpg", width, height, fmt, "as-is", identity)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    actions.append(f"{fmt} re-encoded as PNG")
    return Normalised(buffer.getvalue(), "png", pixels.shape[1], pixels.shape[0], fmt, "; ".join(actions), identity)


def hash_split(sha256: str, seed: int, fractions: Fractions) -> str:
    """The split of an image from its content hash alone: stable as images are added."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < fractions.train:
        return "train"
    if u < fractions.train + fractions.val:
        return "val"
    return "test"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A decodable image awaiting duplicate resolution and split assignment."""

    source: str
    label: str
    sha256: str  # of the file as found
    given_split: str | None
    ext: str
    width: int
    height: int
    format: str
    action: str
    pixels_sha256: str  # of its normalised pixels: copies in other formats share it

    @property
    def id(self) -> str:
        return self.pixels_sha256[:20]


def resolve(candidates: Sequence[Candidate], seed: int, fractions: Fractions) -> tuple[list[dict], list[dict]]:
    """Dedupe by normalised pixels, assign splits. Returns (manifest rows, duplicate quarantine rows).

    Images with identical pixels (the same file, or the same pixels saved in
    another format) are kept once: the copy in the earliest given split
    (train, val, test), then the first source path. Copies under different
    labels are all quarantined, since their label is unknown. The split is a
    function of the pixels, so a re-encoded copy can never land in another split.
    """
    rank = {name: i for i, name in enumerate(SPLITS)}
    groups: dict[str, list[Candidate]] = collections.defaultdict(list)
    for cand in candidates:
        groups[cand.pixels_sha256].append(cand)
    manifest, rejected = [], []
    for sha, group in sorted(groups.items()):
        group = sorted(group, key=lambda c: (rank.get(c.given_split or "train", 0), c.source))
        labels = sorted({c.label for c in group})
        if len(labels) > 1:
            for cand in group:
                rejected.append(
                    {
                        "source": cand.source,
                        "label": cand.label,
                        "reason": f"duplicate content under different labels ({', '.join(labels)})",
                        "sha256": cand.sha256,
                        "pixels_sha256": sha,
                    }
                )
            continue
        kept = group[0]
        for dup in group[1:]:
            rejected.append(
                {
                    "source": dup.source,
                    "label": dup.label,
                    "reason": f"duplicate of {kept.source}"
                    + ("" if dup.sha256 == kept.sha256 else " (same pixels, another file)"),
                    "sha256": dup.sha256,
                    "pixels_sha256": sha,
                }
            )
        split = kept.given_split or hash_split(sha, seed, fractions)
        manifest.append(
            {
                "id": kept.id,
                "file": f"{IMAGES}/{kept.id}.{kept.ext}",
                "source": kept.source,
                "sha256": kept.sha256,
                "pixels_sha256": sha,
                "label": kept.label,
                "split": split,
                "width": kept.width,
                "height": kept.height,
                "format": kept.format,
                "normalised": kept.action,
            }
        )
    manifest.sort(key=lambda row: (SPLITS.index(row["split"]), row["label"], row["id"]))
    return manifest, rejected


def summarise(
    found_labels: Sequence[str | None],
    manifest: Sequence[Mapping],
    quarantine: Sequence[Mapping],
    declared_classes: Iterable[str],
) -> dict:
    """Counts per class and split; `reconciled` says found = kept + quarantined per class."""
    found = collections.Counter(label or NO_CLASS for label in found_labels)
    kept = collections.Counter(row["label"] for row in manifest)
    rejected = collections.Counter(row["label"] or NO_CLASS for row in quarantine)
    classes = sorted(set(declared_classes) | set(found) - {NO_CLASS})
    per_class = {
        name: {"found": found[name], "kept": kept[name], "quarantined": rejected[name]}
        for name in sorted(set(classes) | set(found))
    }
    splits = {
        split: dict(sorted(collections.Counter(r["label"] for r in manifest if r["split"] == split).items()))
        for split in SPLITS
    }
    reasons = collections.Counter(_reason_kind(row["reason"]) for row in quarantine)
    duplicates = [row for row in quarantine if "duplicate" in row["reason"]]
    return {
        "found": sum(found.values()),
        "kept": len(manifest),
        "quarantined": len(quarantine),
        "reconciled": all(c["found"] == c["kept"] + c["quarantined"] for c in per_class.values()),
        "classes": sorted(name for name in classes if kept[name] > 0),
        "empty_classes": sorted(name for name in classes if kept[name] == 0),
        "per_class": per_class,
        "splits": {s: {"total": sum(c.values()), "per_class": c} for s, c in splits.items()},
        "duplicates": {
            "files_quarantined": len(duplicates),
            "distinct_images": len({row["pixels_sha256"] for row in duplicates}),
        },
        "quarantine_reasons": dict(sorted(reasons.items())),
    }


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" (")[0] if not reason.startswith("duplicate of") else "duplicate"


def check_usable(summary: Mapping) -> None:
    """Refuse datasets the later stages cannot train on, with a message that says why."""
    classes = summary["classes"]
    if len(classes) < 2:
        raise ValueError(
            f"need at least 2 classes with usable images, found {len(classes)}: {classes}; "
            f"per class: {summary['per_class']}"
        )
    train = summary["splits"]["train"]["per_class"]
    missing = [name for name in classes if train.get(name, 0) == 0]
    if missing:
        raise ValueError(
            f"classes with no training image: {missing}; add images or raise "
            "download.fractions.train (the label vocabulary is learned from train only)"
        )


# --------------------------------------------------------------------------- sources (I/O)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _detect_layout(root: Path, existing_splits: str) -> list[tuple[Path, str | None]]:
    """[(class-folder parent, given split)]: the root itself, or its split folders."""
    subdirs = [p for p in sorted(root.iterdir()) if p.is_dir() and not _is_hidden(p.name)]
    split_dirs = [p for p in subdirs if p.name.lower() in SPLIT_FOLDER_NAMES]
    if not split_dirs:
        return [(root, None)]
    others = [p.name for p in subdirs if p not in split_dirs]
    if others:
        raise ValueError(
            f"{root} mixes split folders ({[p.name for p in split_dirs]}) with other folders "
            f"({others}); use either class folders or train/val/test folders of class folders"
        )
    if existing_splits == "ignore":
        return [(p, None) for p in split_dirs]
    given = {SPLIT_FOLDER_NAMES[p.name.lower()]: p for p in split_dirs}
    missing = [s for s in SPLITS if s not in given]
    if missing or len(given) != len(split_dirs):
        raise ValueError(
            f"{root} has split folders {[p.name for p in split_dirs]} but needs exactly one each "
            f"of train, val (or validation), test (missing: {missing}); set "
            "dataset.existing_splits: ignore to pool them and hash-split instead"
        )
    return [(given[s], s) for s in SPLITS]


def scan_folder(root: str | Path, existing_splits: str = "use") -> Iterator[Found]:
    """Every file under the class folders, read; odd entries come back with a `problem`.

    Symlinks are followed only when they stay inside `root`.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset.dir {root} is not a directory")
    real_root = root.resolve()
    for parent, given_split in _detect_layout(root, existing_splits):
        for entry in sorted(parent.iterdir()):
            rel = entry.relative_to(root).as_posix()
            if entry.is_dir() and not entry.is_symlink():
                if _is_hidden(entry.name):
                    yield from _scan_class(entry, root, real_root, None, given_split, "in a hidden folder")
                    continue
                label = normalise_label(entry.name)
                yield Found(source=rel + "/", label=label, given_split=given_split, class_folder=True)
                yield from _scan_class(entry, root, real_root, label, given_split, None)
            else:
                yield from _read_entry(entry, root, real_root, None, given_split, "not inside a class folder")


def _scan_class(folder: Path, root: Path, real_root: Path, label, given_split, problem) -> Iterator[Found]:
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        here = Path(dirpath)
        for name in list(dirnames):
            if (here / name).is_symlink():
                dirnames.remove(name)
                yield from _read_entry(here / name, root, real_root, label, given_split, problem)
        for name in sorted(filenames):
            yield from _read_entry(here / name, root, real_root, label, given_split, problem)


def _read_entry(path: Path, root: Path, real_root: Path, label, given_split, problem) -> Iterator[Found]:
    rel = path.relative_to(root).as_posix()
    if problem is None and _is_hidden(path.name):
        problem = "hidden file"
    if problem is None and path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(real_root):
            problem = f"symlink to {target} outside the source folder (not followed)"
        elif target.is_dir():
            problem = "symlink to a folder (not followed)"
    if problem is None and not path.is_file():
        problem = "not a regular file"
    if problem:
        yield Found(source=rel, label=label, given_split=given_split, problem=problem)
        return
    yield Found(source=rel, label=label, given_split=given_split, data=path.read_bytes())


class OfflineError(EnvironmentProblem):
    """A dataset or weights file must be fetched but the network is unreachable."""


def network_reachable(host: str = "storage.googleapis.com", port: int = 443, timeout: float = 3.0) -> bool:
    """A bounded probe: True only if a TCP connection opens within `timeout` seconds."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def read_tfds(params: DatasetParams, network_probe: Callable[[], bool] = network_reachable) -> Iterator[Found]:
    """Examples of a tfds dataset as encoded image bytes, with their label names.

    Checks the local `data_dir` first (``download=False``), so an offline machine
    without the data fails within seconds instead of retrying for minutes.
    """
    import tensorflow_datasets as tfds  # heavy: only on this path

    cfg = params.tfds
    named = cfg.splits if isinstance(cfg.splits, dict) else {"all": cfg.splits}
    kwargs = dict(
        data_dir=params.dir,
        decoders={cfg.image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=True),
        with_info=True,
    )
    try:
        builder = tfds.builder(cfg.name, data_dir=params.dir)
    except Exception as exc:  # tfds raises its own DatasetNotFoundError
        raise ParamsError(f"dataset.tfds.name: {cfg.name!r} is not a registered tfds dataset ({exc})") from None
    _check_keys(builder.info, cfg)
    try:
        datasets, info = tfds.load(cfg.name, split=named, download=False, **kwargs)
    except (AssertionError, tfds.core.registered.DatasetNotFoundError, FileNotFoundError) as exc:
        if not network_probe():
            raise OfflineError(
                f"tfds dataset {cfg.name!r} is not prepared in dataset.dir={params.dir!r} and the "
                "network is unreachable. To run offline, either point dataset.dir at a tfds data_dir "
                f"that already holds {cfg.name} (copy ~/tensorflow_datasets from a machine that ran "
                "`tfds build` or `tfds.load`), or use a local folder of class sub-folders: "
                "dataset.source=folder dataset.dir=<folder>."
            ) from exc
        log.info("downloading and preparing %s into %s", cfg.name, params.dir)
        datasets, info = tfds.load(cfg.name, split=named, download=True, **kwargs)
    except ValueError as exc:
        raise ParamsError(f"dataset.tfds.splits: tfds rejected {cfg.splits!r}: {exc}") from None
    label_feature = info.features[cfg.label_key]
    for split_name, ds in datasets.items():
        given = split_name if split_name in SPLITS else None
        for i, example in enumerate(tfds.as_numpy(ds)):
            raw_id = example.get("tfds_id", b"")
            tfds_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            source = f"tfds:{tfds_id}" if tfds_id else f"tfds:{cfg.name}:{named[split_name]}#{i}"
            label = normalise_label(label_feature.int2str(int(example[cfg.label_key])))
            yield Found(source=source, label=label, given_split=given, data=bytes(example[cfg.image_key]))


def _check_keys(info, cfg: TfdsParams) -> None:
    keys = set(info.features.keys())
    for param, key in (("image_key", cfg.image_key), ("label_key", cfg.label_key)):
        if key not in keys:
            raise ParamsError(f"dataset.tfds.{param}: {key!r} is not a feature of {cfg.name}; features: {sorted(keys)}")
    if not hasattr(info.features[cfg.label_key], "int2str"):
        raise ParamsError(f"dataset.tfds.label_key: {cfg.label_key!r} of {cfg.name} is not a ClassLabel")


# --------------------------------------------------------------------------- run


def run(config: Config, out_dir: str | Path, network_probe: Callable[[], bool] = network_reachable) -> dict:
    """Read the source, write images, manifest, quarantine and summary into `out_dir`."""
    started = time.monotonic()
    ds = config.dataset
    if ds.source == "folder":
        found_iter = scan_folder(ds.dir, ds.existing_splits)
    else:
        found_iter = read_tfds(ds, network_probe)
    dl = config.download
    decode = make_decoder()
    with outputs.staged_dir(out_dir) as tmp:
        images = tmp / IMAGES
        images.mkdir()
        declared, found_labels, candidates, quarantine = set(), [], [], []
        reported = time.monotonic()
        for item in found_iter:
            if item.class_folder:  # possibly empty
                declared.add(item.label)
                continue
            found_labels.append(item.label)
            if time.monotonic() - reported >= PROGRESS_SECONDS:
                reported = time.monotonic()
                log.info(
                    "download: %d files read, %d decodable (%.0f files/s)",
                    len(found_labels),
                    len(candidates),
                    len(found_labels) / (reported - started),
                )
            if item.problem:
                quarantine.append({"source": item.source, "label": item.label, "reason": item.problem})
                continue
            result = normalise_image(item.data, min_side=dl.min_side, max_pixels=dl.max_pixels, decode=decode)
            if isinstance(result, Rejected):
                quarantine.append({"source": item.source, "label": item.label, "reason": result.reason})
                continue
            cand = Candidate(
                source=item.source,
                label=item.label,
                sha256=content_hash(item.data),
                given_split=item.given_split,
                ext=result.ext,
                width=result.width,
                height=result.height,
                format=result.format,
                action=result.action,
                pixels_sha256=result.pixels_sha256,
            )
            # Staged under its own name: two files with the same pixels (a JPEG with other metadata)
            # share an id, and the one resolve() keeps must be the one stored.
            (images / f".{len(candidates)}.{cand.ext}").write_bytes(result.data)
            candidates.append(cand)
        manifest, duplicates = resolve(candidates, config.common.seed, dl.fractions)
        kept = {row["source"] for row in manifest}
        for n, cand in enumerate(candidates):
            staged = images / f".{n}.{cand.ext}"
            if cand.source in kept:
                staged.rename(images / f"{cand.id}.{cand.ext}")
            else:
                staged.unlink()
        quarantine = sorted(quarantine + duplicates, key=lambda r: r["source"])
        summary = summarise(found_labels, manifest, quarantine, declared)
        summary["source"] = {"type": ds.source, "dir": ds.dir}
        if ds.source == "tfds":
            summary["source"]["tfds"] = ds.tfds.model_dump()
        check_usable(summary)
        write_jsonl(tmp / MANIFEST, manifest)
        write_jsonl(tmp / QUARANTINE, quarantine)
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        write_resolved(tmp, config.sections())
        outputs.require_outputs(tmp, DECLARED_OUTPUTS)
    log.info(
        "download: found %d, kept %d, quarantined %d (%s) in %.1fs",
        summary["found"],
        summary["kept"],
        summary["quarantined"],
        summary["quarantine_reasons"],
        time.monotonic() - started,
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (sections common, dataset, download)")
    parser.add_argument("--out", required=True, help="output folder (declared in dvc.yaml)")
    args = parser.parse_args(argv)
    configure_logging()
    config = load_config(args.params)
    log_resolved("download", config.sections())
    run(config, args.out)
    return 0


if __name__ == "__main__":
    from components.cli import run_main

    run_main(main)
