"""The download stage's manifest, as every later stage and tool reads it: the splits, the file name,
reading and writing JSON lines, and counts per split and class."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Collection, Iterable, Iterator, Mapping, Sequence

SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST = "manifest.jsonl"  # in the download stage's folder: one row per kept image
IMAGES = "images"  # ... beside the image files, which rows name as images/<id>.<ext>


# What Python's str.splitlines splits on: a class name holding one would be two lines of the label vocabulary
LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def write_jsonl(path: Path, rows: Iterable[Mapping]) -> None:
    with Path(path).open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """The rows of a JSON-lines file, read a line at a time, blank lines skipped. Lines end at "\n" only, as Beam's
    text reader and `parse_jsonl` split them (Python's universal newlines also split at a lone "\r", so a row
    convert's check passed was two rows to it and one broken line to its Beam job); a line that is not JSON is an
    error naming the file and the line, as is one that is not UTF-8 (read as text, the decoder's error named
    neither)."""
    with open(path, "rb") as handle:  # a binary file's lines end at b"\n" only
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{path}: line {number} is not UTF-8 text (byte {exc.start + 1} of the line: {exc.reason})"
                ) from None
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f"{path}: line {number} is not a JSON row ({exc.msg}, column {exc.colno})"
                    ) from None


def read_jsonl(path: str | Path) -> list[dict]:
    return list(iter_jsonl(path))


def parse_jsonl(blob: bytes) -> list[dict]:
    """The rows of a JSON-lines file's bytes (read from git or DVC's cache rather than a path)."""
    # split on "\n" only: str.splitlines would also split inside a name holding U+2028 or U+0085, which
    # json.dumps(ensure_ascii=False) leaves unescaped
    return [json.loads(line) for line in blob.decode("utf-8").split("\n") if line.strip()]


def rows_of(path: str | Path, ids: Collection[str]) -> dict[str, dict]:
    """The manifest rows with these ids, read a line at a time: memory holds the rows asked for, never the
    whole manifest (about 1 KB an image)."""
    wanted = set(ids)
    return {row["id"]: row for row in iter_jsonl(path) if row["id"] in wanted}


def ids_missing(path: str | Path, ids: Iterable[str]) -> list[str]:
    """The ids (sorted) that no row of the manifest has, read a line at a time."""
    remaining = set(ids)
    for row in iter_jsonl(path):
        remaining.discard(row["id"])
    return sorted(remaining)


def expected_counts(manifest: Iterable[Mapping]) -> dict[str, dict[str, int]]:
    """Manifest rows per split and class (every split, empty ones too): what the records must hold."""
    counts: dict[str, collections.Counter] = {split: collections.Counter() for split in SPLITS}
    for row in manifest:
        counts[row["split"]][row["label"]] += 1
    return {split: dict(sorted(c.items())) for split, c in counts.items()}


def split_counts(manifest: Sequence[Mapping]) -> dict[str, dict[str, int]]:
    """Images per split and class, for the splits that have any."""
    return {split: counts for split, counts in expected_counts(manifest).items() if counts}
