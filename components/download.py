"""download stage: fetch a dataset and split it deterministically into train/val/test.

Inputs
    params.yaml sections ``common``, ``dataset`` and ``download``.
    ``dataset.dir``: the class-folder root (``source: folder``) or the tfds
    ``data_dir`` (``source: tfds``); ``dvc.yaml`` declares it as a dependency.
Outputs (one folder, updated in place: see `reusable_images`)
    ``images/<id>.jpg|png``  every kept image, normalised to RGB (JPEGs that are
                             already RGB and upright are kept byte-for-byte)
    ``manifest.jsonl``       one row per kept image: id, file, source, sha256 (of
                             the file), pixels_sha256 (of its normalised pixels),
                             label, split, width, height, format, normalised
    ``quarantine.jsonl``     one row per rejected file: source, label, reason
    ``summary.json``         counts per class per split, duplicates, quarantine;
                             found = kept + quarantined, per class
    ``params.json``          the resolved params

Run: ``python -m components.download --params params.yaml --out data/download [--cache .cache/download]``

With ``--cache``, each file's checks and decode are stored by the file's SHA-256
(`pipelines.download_cache`), so a re-run after files were added decodes only the
new ones; the outputs are the same bytes with or without it.

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
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import pydantic

from components import outputs
from components.cli import EnvironmentProblem, configure_logging, run_main
from components.manifest import IMAGES, MANIFEST, SPLITS, write_jsonl
from components.params import (
    RESOLVED_PARAMS_FILE,
    CommonParams,
    Section,
    log_resolved,
    read_params,
    resolved_text,
    section,
)
from pipelines import cache_lock, download_cache, normalise, sources, split

log = logging.getLogger(__name__)

QUARANTINE = "quarantine.jsonl"
SUMMARY = "summary.json"
DECLARED_OUTPUTS = (MANIFEST, QUARANTINE, SUMMARY, IMAGES, RESOLVED_PARAMS_FILE)
LISTINGS = (MANIFEST, QUARANTINE, SUMMARY, RESOLVED_PARAMS_FILE)  # what says the folder is complete
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
    # and `ignore` pools them and hash-splits; `none`: the root's folders are all class
    # folders, one named train, val or test included (CIFAR-100 has a class `train`).
    existing_splits: Literal["use", "ignore", "none"] = "use"

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
        if not all(math.isfinite(v) for v in values):  # NaN passed every comparison below
            raise ValueError(f"each fraction must be a finite number, got {values}")
        if any(v < 0 or v > 1 for v in values):
            raise ValueError(f"each fraction must be within [0, 1], got {values}")
        if self.train <= 0:  # val or test 0: refused by the stage where it hash-splits and leaves one empty
            raise ValueError("train must be > 0")
        if abs(sum(values) - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {sum(values):g}")
        return self


class DownloadParams(Section):
    fractions: Fractions = Fractions(train=0.5, val=0.25, test=0.25)  # the seed's 2:1:1
    min_side: int = pydantic.Field(16, ge=1)
    # at most Pillow's own hard limit (twice Image.MAX_IMAGE_PIXELS), past which it refuses every image itself
    max_pixels: int = pydantic.Field(normalise.DEFAULT_MAX_PIXELS, ge=1, le=normalise.PILLOW_HARD_LIMIT)
    # manifest ids quarantined as "excluded by download.exclude" (suspected label errors from
    # evaluation/label_issues.json, one copy of a near-duplicate in evaluation/near_duplicates.json):
    # explicit and versioned; the audit lists them, and an id no image has is reported in summary.json
    exclude: list[str] = []
    # groups of manifest ids (near-duplicate pairs from quality/near_duplicates.json) each put in one split:
    # that of its member with the smallest pixel hash (the hash split only: no train/val/test folders)
    keep_together: list[list[str]] = []

    @pydantic.field_validator("exclude")
    @classmethod
    def _ids(cls, value: list[str]) -> list[str]:
        _check_ids(value)
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:
            raise ValueError(f"ids listed twice: {repeated[:5]}")
        return value

    @pydantic.field_validator("keep_together")
    @classmethod
    def _groups(cls, value: list[list[str]]) -> list[list[str]]:
        for group in value:
            _check_ids(group)
            if len(set(group)) < 2:
                raise ValueError(f"a group needs at least two distinct ids, got {group}")
        return value


def _check_ids(value: list[str]) -> None:
    bad = [v for v in value if not re.fullmatch(r"[0-9a-f]{20}", v)]
    if bad:
        raise ValueError(f"ids are the manifest's 20 lowercase hex digits; not ids: {bad[:5]}")


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


# --------------------------------------------------------------------------- run


def source_items(
    dataset: DatasetParams, network_probe: Callable[[], bool] = sources.network_reachable
) -> Iterator[sources.Found]:
    """The files (or tfds examples) at the source, as the stage reads them."""
    if dataset.source == "folder":
        return sources.scan_folder(dataset.dir, dataset.existing_splits)
    return sources.read_tfds(dataset.dir, dataset.tfds, network_probe)


def cache_namespace(config: Config) -> dict:
    """The result cache's namespace record of these params: what the stage reads and writes under, and what
    `tools.cache_gc` keeps."""
    return download_cache.namespace_record(config.download.min_side, config.download.max_pixels)


def reusable_images(out: Path) -> Path | None:
    """`out`'s `images/` folder when an earlier run left a real one (no link on the way), else None.

    The stage updates its output in place (`persist: true` in dvc.yaml): an image already stored with
    the right bytes keeps its file, so an incremental run writes only the new images, and DVC re-hashes
    only those (it knows the others by inode, size and time). What ends in the folder is still exactly
    what a run into an empty one writes: every stored file is compared byte for byte, and anything else
    is removed (`run`). Until every check has passed nothing the folder holds is changed (`staging_folder`
    only removes killed runs' staging folders from it, may make its own hidden one there, and renames an
    empty probe file in and out): a failed run leaves it, or a link in its place, as it was.
    """
    images = out / IMAGES
    return images if real_folder(out) and real_folder(images) else None


def prepare_in_place(out: Path) -> Path:
    """`out` as a real folder with a real `images/` folder in it, kept from an earlier run if there is one:
    a link or a file in the place of either is replaced (the commit step of `run`, after every check)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        out.unlink()
    out.mkdir(exist_ok=True)
    images = out / IMAGES
    if images.is_symlink() or (images.exists() and not images.is_dir()):
        images.unlink()
    images.mkdir(exist_ok=True)
    return images


def staging_folder(out: Path) -> tuple[Path, list[Path]]:
    """A new, empty folder for this run's new images, from which a rename into the output works (they are
    moved in by renames once every check has passed): beside `out`, outside what DVC hashes, where a probe
    file moves from there into the output; else inside `out` as a hidden folder (the commit step removes
    it; `.dvcignore` keeps DVC from hashing it). A probe that fails both ways is an error before anything in
    the output has changed: a mount point, a bind mount of the output or a parent this process cannot write
    can each make a rename fail (EXDEV, EACCES) where nothing else says so.

    Earlier runs' staging folders whose process is gone (a killed run's) are removed first; a live run's
    are kept. Returns the folder and the parent folders created for it (the output's own parent may not
    exist yet), which a failed run removes.
    """
    created = [parent for parent in (out.parent, *out.parent.parents) if not parent.exists()]
    name = f"{os.getpid()}-{time.time_ns()}"
    outputs.remove_stale(out.parent, f".{out.name}.staging-")
    if real_folder(out):
        outputs.remove_stale(out, INNER_STAGING)
    target = rename_target(out)
    failures = []
    beside = out.parent / f".{out.name}.staging-{name}"
    # inside only a real folder: a link in the output's place is replaced by a new folder at the commit
    for staging in (beside, out / f"{INNER_STAGING}{name}") if target else (beside,):
        try:
            staging.mkdir(parents=staging == beside)
        except OSError as exc:  # an unwritable parent
            failures.append(f"{staging.parent}: {exc}")
            continue
        if target is None or (failure := rename_fails(staging, target, name)) is None:
            return staging, created
        failures.append(failure)
        shutil.rmtree(staging, ignore_errors=True)
    raise RuntimeError(
        f"download cannot stage files where they can be renamed into {out} ({'; '.join(failures)}): make the "
        "output folder and its parent writable, or point the stage's output at a folder on one filesystem"
    )


INNER_STAGING = ".staging-"  # also in .dvcignore


def real_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def rename_target(out: Path) -> Path | None:
    """The folder this run's images will be renamed into where it exists already (`images/`, else the output);
    None where the commit step makes the output new (none there, or a link), in the parent the staging
    folder is made in."""
    if not real_folder(out):
        return None
    return out / IMAGES if real_folder(out / IMAGES) else out


def rename_fails(staging: Path, target: Path, name: str) -> str | None:
    """Why a file cannot be moved from `staging` into `target` by a rename, tried with an empty probe file
    (gone again after); None where it can."""
    probe, moved = staging / "probe", target / f"{INNER_STAGING}{name}.probe"
    try:
        probe.write_bytes(b"")
        os.replace(probe, moved)
        moved.unlink(missing_ok=True)  # a concurrent run's commit may have removed it
    except OSError as exc:
        return f"a rename from {staging.parent} into {target} fails: {exc}"
    finally:
        probe.unlink(missing_ok=True)
    return None


def holds(path: Path, data: bytes) -> bool:
    """Whether `path` is a regular file (not a link) with exactly these bytes."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == len(data) and path.read_bytes() == data


def write_listing(path: Path, write: Callable[[Path], object]) -> None:
    """Write one of the folder's files under a hidden name, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def run(
    config: Config,
    out_dir: str | Path,
    network_probe: Callable[[], bool] = sources.network_reachable,
    *,
    cache_root: str | Path | None = None,
) -> dict:
    """Read the source, write images, manifest, quarantine and summary into `out_dir`.

    With `cache_root`, each file's result is looked up by its SHA-256 first (`pipelines.download_cache`),
    so only new files are decoded; the outputs are the same bytes as without it.
    """
    started = time.monotonic()
    ds = config.dataset
    found_iter = source_items(ds, network_probe)
    dl = config.download
    decode = normalise.make_decoder()
    cache = None if cache_root is None else download_cache.DownloadCache(cache_root, cache_namespace(config))
    out = Path(out_dir)
    held = reusable_images(out)
    staging, created = staging_folder(out)
    staged: dict[int, Path] = {}  # candidate number -> its bytes, staged outside the output
    try:
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
            sha256 = normalise.content_hash(item.data)
            result = cache.get(sha256, item.data) if cache else None
            if result is None:
                result = normalise.normalise_image(
                    item.data, min_side=dl.min_side, max_pixels=dl.max_pixels, decode=decode
                )
                if cache:
                    cache.put(sha256, item.data, result)
            if isinstance(result, normalise.Rejected):
                if not result.lasting:  # quarantined, the image would be back next run: outputs by machine state
                    raise EnvironmentProblem(
                        f"download: {item.source}: {result.reason}: a failure of this run (memory, the decoder's "
                        "environment), not of the file, so it is not quarantined; run the stage again, and if it "
                        "fails the same way, move the file out of the source folder"
                    )
                quarantine.append({"source": item.source, "label": item.label, "reason": result.reason})
                continue
            cand = split.Candidate(
                source=item.source,
                label=item.label,
                sha256=sha256,
                given_split=item.given_split,
                ext=result.ext,
                width=result.width,
                height=result.height,
                format=result.format,
                action=result.action,
                pixels_sha256=result.pixels_sha256,
            )
            # An image already stored with these very bytes stays as it is. Any other is staged under its own
            # name: two files with the same pixels (a JPEG with other metadata) share an id, and the one
            # resolve() keeps must be the one stored.
            if held is None or not holds(held / f"{cand.id}.{cand.ext}", result.data):
                staged[len(candidates)] = staging / f"{len(candidates)}.{cand.ext}"
                staged[len(candidates)].write_bytes(result.data)
            candidates.append(cand)
        manifest, duplicates = split.resolve(candidates, config.common.seed, dl.fractions)
        given = any(c.given_split for c in candidates)  # the dataset's own splits: download.fractions is not used
        how = (
            "give dataset.tfds.splits one slice, which download.fractions hash-splits"
            if ds.source == "tfds"
            else "move the files between its train/val/test folders, or set dataset.existing_splits: ignore "
            "to hash-split"
        )
        if dl.keep_together and given:
            raise ValueError(
                f"download.keep_together moves images between splits, but this dataset gives its own: {how}"
            )
        # a group's split is its listed members' (the smallest pixel hash), an excluded member's too, so excluding
        # one does not move the others; an excluded image is reported in its own split, and not as moved
        kept, excluded, not_found, already = split.exclude(manifest, dl.exclude, quarantine + duplicates)
        manifest, together = split.keep_together(manifest, dl.keep_together, quarantine + duplicates)
        kept_ids = {row["id"] for row in kept}
        manifest = [row for row in manifest if row["id"] in kept_ids]
        together["moved"] = [move for move in together["moved"] if move["id"] in kept_ids]
        quarantine = sorted(quarantine + duplicates + excluded, key=lambda r: r["source"])
        summary = split.summarise(found_labels, manifest, quarantine, declared)
        summary["excluded"] = {
            "listed": len(dl.exclude),
            "quarantined": len(excluded),
            "already_quarantined": already,
            "not_found": not_found,
        }
        summary["kept_together"] = together
        if together["not_found"]:
            log.warning("download: %d ids in download.keep_together match no image", len(together["not_found"]))
        if not_found:
            log.warning("download: %d ids in download.exclude match no image: %s", len(not_found), not_found[:5])
        if already:
            log.warning(
                "download: %d ids in download.exclude were already quarantined for another reason: %s",
                len(already),
                already[:3],
            )
        summary["source"] = {"type": ds.source, "dir": ds.dir}
        if ds.source == "tfds":
            summary["source"]["tfds"] = ds.tfds.model_dump()
        # its errors carry the quarantine reasons: no quarantine.jsonl is written then
        split.check_usable(summary, how if given else None)
        if summary["empty_classes"]:
            log.warning(
                "download: classes with no image kept, left out of the label vocabulary: %s (see quarantine.jsonl)",
                summary["empty_classes"],
            )
        for row in (*manifest, *quarantine, summary):  # what the listings write must be writable, before any change
            json.dumps(row, ensure_ascii=False).encode("utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created:  # innermost first
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    # Every check passed: from here on the folder changes. The listings go first, so a run killed in
    # this step leaves a folder without a manifest, which no stage reads and which the next run repairs. (Before
    # `images/` is made a real folder: a link there was replaced by an empty one under the old manifest, which a
    # run killed then left vouching for missing images; a review on 2026-12-07. A link in the place of the whole
    # output is replaced, never followed.)
    if out.is_dir() and not out.is_symlink():
        for name in LISTINGS:
            outputs.remove_entry(out / name)
    images = prepare_in_place(out)
    kept = {row["source"] for row in manifest}
    names = set()
    for n, cand in enumerate(candidates):
        if cand.source in kept:
            names.add(f"{cand.id}.{cand.ext}")
            if n in staged:
                target = images / f"{cand.id}.{cand.ext}"
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)  # a rename cannot replace a folder
                os.replace(staged[n], target)
        elif n in staged:
            staged[n].unlink()
    for entry in list(images.iterdir()):
        if entry.name not in names:
            outputs.remove_entry(entry)
    for entry in list(out.iterdir()):  # strays go, and staging folders but this run's and a live run's
        live = entry.name.startswith(INNER_STAGING) and outputs.scratch_owner(entry.name[len(INNER_STAGING) :])
        if entry.name not in DECLARED_OUTPUTS and entry != staging and not live:
            outputs.remove_entry(entry)
    staging.rmdir()  # every staged file was moved in or removed
    write_listing(out / QUARANTINE, lambda tmp: write_jsonl(tmp, quarantine))
    write_listing(
        out / SUMMARY,
        lambda tmp: tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"),
    )
    write_listing(out / RESOLVED_PARAMS_FILE, lambda tmp: tmp.write_text(resolved_text(config.sections()), "utf-8"))
    # the manifest last: it marks the folder whole (written first, a run killed after it left a folder convert read,
    # its quarantine list gone)
    write_listing(out / MANIFEST, lambda tmp: write_jsonl(tmp, manifest))
    outputs.require_outputs(out, DECLARED_OUTPUTS)
    if cache:
        log.info("download: %d files from the cache, %d checked and decoded", cache.hits, cache.misses)
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
    parser.add_argument("--cache", help="the per-file result cache (pipelines/download_cache.py); none: decode all")
    args = parser.parse_args(argv)
    configure_logging()
    config = load_config(args.params)
    log_resolved("download", config.sections())
    with cache_lock.held(args.cache):  # no garbage collection while this run reads and writes the cache
        run(config, args.out, cache_root=args.cache)
    return 0


if __name__ == "__main__":
    run_main(main)
