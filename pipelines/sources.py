"""Where images come from: a folder of class sub-folders, or a tensorflow-datasets dataset.

Both yield `Found` items (a file's bytes, its label and any split its place gives it);
nothing here decodes an image.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import threading
import unicodedata
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol

import tensorflow_datasets as tfds

from components.cli import EnvironmentProblem
from components.manifest import LINE_BREAKS, SPLITS
from components.params import ParamsError
from pipelines.split import NO_CLASS

log = logging.getLogger(__name__)


class TfdsSource(Protocol):
    """The `dataset.tfds` params."""

    name: str
    splits: Mapping[str, str] | str
    image_key: str
    label_key: str


SPLIT_FOLDER_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


@dataclasses.dataclass(frozen=True)
class Found:
    """One file (or tfds example) found at the source, before inspection."""

    source: str
    label: str | None
    given_split: str | None = None
    data: bytes | None = None
    problem: str | None = None  # rejected before reading (hidden, symlink, ...)
    class_folder: bool = False  # a class folder itself (declares the class, even if empty)


def normalise_label(name: str) -> str:
    """Class names are NFC-normalised so the same folder name from macOS (NFD) matches."""
    return unicodedata.normalize("NFC", name)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


NOT_UTF8 = "name is not valid UTF-8 (rename it)"


def _utf8(name: str) -> bool:
    """Whether a file-system name (surrogate-escaped where its bytes are not UTF-8) can be written as UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(rel: str) -> str:
    """A path as the manifest and quarantine list can hold it: bytes that are not UTF-8 as backslash escapes."""
    return rel if _utf8(rel) else os.fsencode(rel).decode("utf-8", "backslashreplace")


def class_name_problem(name: str) -> str | None:
    """Why a class folder's name cannot be a class name, or None."""
    if not _utf8(name):
        return f"class folder {NOT_UTF8}"
    if LINE_BREAKS.intersection(name):
        return "class folder name holds a line break or control character (rename it)"
    if normalise_label(name) == NO_CLASS:  # its images would be counted with the files outside any class folder
        return f"class folder named {NO_CLASS!r}, the summary's name for files outside any class folder (rename it)"
    return None


def _is_folder(path: Path) -> bool:
    """A folder, not a link to one; False where it cannot be looked at (no search permission on its parent:
    `_read_entry` reports the entry, unreadable, instead of the scan stopping on PermissionError)."""
    try:
        return path.is_dir() and not path.is_symlink()
    except OSError:
        return False


def _detect_layout(root: Path, existing_splits: str) -> list[tuple[Path, str | None]]:
    """[(class-folder parent, given split)]: the root itself, or its split folders."""
    if existing_splits == "none":  # every folder of the root is a class, whatever its name
        return [(root, None)]
    # a symlinked folder is never followed (it is quarantined as an entry of the root instead)
    subdirs = [p for p in sorted(root.iterdir()) if _is_folder(p) and not _is_hidden(p.name)]
    split_dirs = [p for p in subdirs if p.name.lower() in SPLIT_FOLDER_NAMES]
    if not split_dirs:
        return [(root, None)]
    others = [p.name for p in subdirs if p not in split_dirs]
    if others:
        raise ValueError(
            f"{root} mixes split folders ({[p.name for p in split_dirs]}) with other folders "
            f"({others}); use either class folders or train/val/test folders of class folders, or, if they are all "
            "class folders (a class named train, val or test), set dataset.existing_splits: none"
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

    Symlinks to files are followed only when they stay inside `root`; symlinks to folders never are. Every
    entry under `root` comes back, read or with a problem (a quarantine reason), so nothing is dropped unseen:
    hidden files and folders, files outside a class folder, unreadable files and folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset.dir {root} is not a directory")
    real_root = root.resolve()
    layout = _detect_layout(root, existing_splits)
    if layout != [(root, None)]:  # split folders: the root's other entries (files, hidden folders, symlinks)
        parents = {parent for parent, _ in layout}
        for entry in sorted(root.iterdir()):
            if entry in parents:
                continue
            if _is_folder(entry):
                yield from _scan_class(entry, root, real_root, None, None, "in a hidden folder")
            else:
                yield from _read_entry(entry, root, real_root, None, None, _stray(entry, "a split's class folder"))
    for parent, given_split in layout:
        try:
            entries = sorted(parent.iterdir())
        except OSError as exc:  # a split folder (or the root) that cannot be listed: reported, as a class folder is
            rel = parent.relative_to(root).as_posix()
            shown = "./" if rel == "." else _shown(rel) + "/"
            yield Found(
                source=shown, label=None, given_split=given_split, problem=f"unreadable folder: {exc.strerror or exc}"
            )
            continue
        # the class folders' names by the class each is (as listed: a lookup of another spelling may match on macOS)
        spellings: dict[str, list[str]] = {}
        for entry in entries:
            if not _is_hidden(entry.name) and class_name_problem(entry.name) is None and _is_folder(entry):
                spellings.setdefault(normalise_label(entry.name), []).append(entry.name)
        for entry in entries:
            rel = entry.relative_to(root).as_posix()
            if _is_folder(entry):
                if _is_hidden(entry.name):
                    yield from _scan_class(entry, root, real_root, None, given_split, "in a hidden folder")
                    continue
                problem = class_name_problem(entry.name)
                if problem:  # its files are quarantined with the reason; it declares no class
                    yield from _scan_class(entry, root, real_root, None, given_split, problem)
                    continue
                label = normalise_label(entry.name)
                # `café` twice, composed and decomposed (Linux); or two spellings neither of which is the composed
                # one (a review on 2026-12-07: those merged with no warning)
                if len(spellings.get(label, ())) > 1 and entry.name == spellings[label][0]:
                    log.warning(
                        "download: class folders %s are one class %r (names are NFC-normalised, so the same "
                        "name written by macOS matches): rename one if they are two classes",
                        " and ".join(repr((parent / name).relative_to(root).as_posix()) for name in spellings[label]),
                        label,
                    )
                yield Found(source=rel + "/", label=label, given_split=given_split, class_folder=True)
                yield from _scan_class(entry, root, real_root, label, given_split, None)
            else:
                yield from _read_entry(entry, root, real_root, None, given_split, _stray(entry, "a class folder"))


def _stray(entry: Path, where: str) -> str:
    """The quarantine reason of an entry of the root that is not a folder to scan."""
    try:
        entry.lstat()
    except OSError as exc:  # listed but not looked at (no search permission on its folder): not a stray
        return f"unreadable: {exc.strerror or exc}"
    try:
        linked_folder = entry.is_symlink() and entry.is_dir()
    except OSError:  # a link to a folder that cannot be looked at
        linked_folder = False
    return "symlink to a folder (not followed)" if linked_folder else f"not inside {where}"


def _scan_class(folder: Path, root: Path, real_root: Path, label, given_split, problem) -> Iterator[Found]:
    unreadable: list[OSError] = []  # folders os.walk cannot list (it skips them unless told)

    def report() -> Iterator[Found]:
        while unreadable:
            exc = unreadable.pop(0)
            rel = _shown(Path(exc.filename).relative_to(root).as_posix()) + "/"
            reason = problem or f"unreadable folder: {exc.strerror or exc}"
            yield Found(source=rel, label=label, given_split=given_split, problem=reason)

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False, onerror=unreadable.append):
        yield from report()
        dirnames.sort()
        here = Path(dirpath)
        for name in list(dirnames):
            try:
                linked = (here / name).is_symlink()
            except OSError:  # reported by _read_entry
                linked = True
            if linked:
                dirnames.remove(name)
                yield from _read_entry(here / name, root, real_root, label, given_split, problem, folder)
            elif problem is None and _is_hidden(name):  # thumbnails, .AppleDouble: not the class's images
                dirnames.remove(name)
                yield from _scan_class(here / name, root, real_root, label, given_split, "in a hidden folder")
        for name in sorted(filenames):
            yield from _read_entry(here / name, root, real_root, label, given_split, problem, folder)
    yield from report()


def _read_entry(
    path: Path, root: Path, real_root: Path, label, given_split, problem, within: Path | None = None
) -> Iterator[Found]:
    """One file's bytes, or the reason it is not read. `within`: the class folder it was found in, which a link's
    target must lie in, by a path of no hidden folder or file (a link in `cat/` to `.thumbs/t.png`, to a file
    outside any class folder, in another class's folder or under a refused class folder's name made that file one
    of the class's images; a review on 2026-12-07)."""
    rel = path.relative_to(root).as_posix()
    if problem is None and not _utf8(rel):
        problem = NOT_UTF8
    rel = _shown(rel)
    if problem is None and _is_hidden(path.name):
        problem = "hidden file"
    try:
        if problem is None and path.is_symlink():
            target = path.resolve()
            if target.is_dir():  # inside the source folder or not
                problem = "symlink to a folder (not followed)"
            elif not target.is_relative_to(real_root):  # where it points is not written: it names this machine
                problem = "symlink to a file outside the source folder (not followed)"
            elif within is not None:
                home = within.resolve()
                if not target.is_relative_to(home):
                    problem = "symlink to a file outside its class folder (not followed)"
                elif any(_is_hidden(part) for part in target.relative_to(home).parts):
                    problem = "symlink to a hidden file or into a hidden folder (not followed)"
        if problem is None and not path.is_file():
            problem = "not a regular file"
    except RuntimeError:  # Path.resolve on Python 3.11: "Symlink loop from ..."
        problem = "symlink loop"
    except OSError as exc:  # a folder listed but not entered (read without execute permission)
        problem = "symlink loop" if exc.errno == errno.ELOOP else f"unreadable: {exc.strerror or exc}"
    if problem:
        yield Found(source=rel, label=label, given_split=given_split, problem=problem)
        return
    try:
        data = path.read_bytes()
    except OSError as exc:
        yield Found(source=rel, label=label, given_split=given_split, problem=f"unreadable: {exc.strerror or exc}")
        return
    yield Found(source=rel, label=label, given_split=given_split, data=data)


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


def read_tfds(data_dir: str, cfg: TfdsSource, network_probe: Callable[[], bool] = network_reachable) -> Iterator[Found]:
    """Examples of a tfds dataset as encoded image bytes, with their label names.

    Checks the local `data_dir` first (``download=False``), so an offline machine
    without the data fails within seconds instead of retrying for minutes.
    """
    named = cfg.splits if isinstance(cfg.splits, dict) else {"all": cfg.splits}
    kwargs = dict(
        data_dir=data_dir,
        decoders={cfg.image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=True),
        with_info=True,
    )
    try:
        builder = tfds.builder(cfg.name, data_dir=data_dir)
    except Exception as exc:  # tfds raises its own DatasetNotFoundError
        raise ParamsError(f"dataset.tfds.name: {cfg.name!r} is not a registered tfds dataset ({exc})") from None
    _check_keys(builder.info, cfg)
    try:
        datasets, info = tfds.load(cfg.name, split=named, download=False, **kwargs)
    except (AssertionError, tfds.core.registered.DatasetNotFoundError, FileNotFoundError) as exc:
        if not network_probe():
            raise OfflineError(
                f"tfds dataset {cfg.name!r} is not prepared in dataset.dir={data_dir!r} and the "
                "network is unreachable. To run offline, either point dataset.dir at a tfds data_dir "
                f"that already holds {cfg.name} (copy ~/tensorflow_datasets from a machine that ran "
                "`tfds build` or `tfds.load`), or use a local folder of class sub-folders: "
                "dataset.source=folder dataset.dir=<folder>."
            ) from exc
        log.info("downloading and preparing %s into %s", cfg.name, data_dir)
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
            index = int(example[cfg.label_key])
            if not 0 <= index < label_feature.num_classes:  # int2str(-1) would name the last class
                yield Found(source=source, label=None, given_split=given, problem=f"no label (tfds label {index})")
                continue
            label = normalise_label(label_feature.int2str(index))
            yield Found(source=source, label=label, given_split=given, data=bytes(example[cfg.image_key]))


def _check_keys(info, cfg: TfdsSource) -> None:
    keys = set(info.features.keys())
    for param, key in (("image_key", cfg.image_key), ("label_key", cfg.label_key)):
        if key not in keys:
            raise ParamsError(f"dataset.tfds.{param}: {key!r} is not a feature of {cfg.name}; features: {sorted(keys)}")
    if not hasattr(info.features[cfg.label_key], "int2str"):
        raise ParamsError(f"dataset.tfds.label_key: {cfg.label_key!r} of {cfg.name} is not a ClassLabel")


# --------------------------------------------------------------------------- run
