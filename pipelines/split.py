"""Duplicates and the split: which images are kept, and in which split, from their pixels' hash alone."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Iterable, Mapping, Protocol, Sequence

from components.manifest import IMAGES, SPLITS

NO_CLASS = "(no class)"  # the label of files found outside any class folder


class Fractions(Protocol):
    """The share of each split (the `download.fractions` params)."""

    train: float
    val: float
    test: float


def hash_split(sha256: str, seed: int, fractions: Fractions) -> str:
    """The split of an image from its content hash alone: stable as images are added."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < fractions.train:
        return "train"
    if u < fractions.train + fractions.val:
        return "val"
    return "test"


def image_id(pixels_sha256: str) -> str:
    """An image's manifest id: the first 20 hex digits of its pixel hash."""
    return pixels_sha256[:20]


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
        return image_id(self.pixels_sha256)


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
    ids = collections.Counter(row["id"] for row in manifest)
    shared = sorted(i for i, n in ids.items() if n > 1)
    if shared:  # two different images whose pixel hashes share 80 bits (about 1e-12 for a million): never silently
        raise RuntimeError(
            f"distinct images share the manifest id {shared[:3]} (the first 20 hex digits of the pixel hash)"
        )
    manifest.sort(key=lambda row: (SPLITS.index(row["split"]), row["label"], row["id"]))
    return manifest, rejected


EXCLUDED = "excluded by download.exclude"


def exclude(
    manifest: Sequence[Mapping], ids: Iterable[str], quarantined: Sequence[Mapping] = ()
) -> tuple[list[dict], list[dict], list[str], list[dict]]:
    """Drop the manifest rows whose id is listed (an explicit, versioned list: suspected label errors, or
    one copy of a near-duplicate pair). Returns (kept rows, quarantine rows of the dropped, listed ids
    that no image has, listed ids already quarantined for another reason with that reason), so found =
    kept + quarantined still holds and a stale id is reported, not ignored; an id whose image another
    rule quarantined first (the same pixels under two labels) is reported as such, not as unknown."""
    wanted = set(ids)
    kept, dropped = [], []
    for row in manifest:
        if row["id"] in wanted:
            dropped.append(
                {
                    "source": row["source"],
                    "label": row["label"],
                    "reason": f"{EXCLUDED} (id {row['id']}, was in {row['split']})",
                    "sha256": row["sha256"],
                    "pixels_sha256": row["pixels_sha256"],
                }
            )
        else:
            kept.append(dict(row))
    not_found, already = unknown_or_quarantined(wanted - {row["id"] for row in manifest}, quarantined)
    return kept, dropped, not_found, already


def unknown_or_quarantined(missing: Iterable[str], quarantined: Sequence[Mapping]) -> tuple[list[str], list[dict]]:
    """Listed ids the manifest lacks, told apart: (those no image has, sorted; those whose image a rule
    quarantined, such as the same pixels under two labels, each with that rule's reasons)."""
    missing = set(missing)
    reasons: dict[str, set[str]] = {}
    for row in quarantined:
        pixels = row.get("pixels_sha256")
        if pixels and image_id(pixels) in missing:
            reasons.setdefault(image_id(pixels), set()).add(row["reason"])
    return sorted(missing - set(reasons)), [{"id": i, "reasons": sorted(reasons[i])} for i in sorted(reasons)]


def keep_together(
    manifest: Sequence[Mapping], groups: Sequence[Sequence[str]], quarantined: Sequence[Mapping] = ()
) -> tuple[list[dict], dict]:
    """Put each listed group of ids (near-duplicates, from quality/near_duplicates.json) in one split.

    Groups that share an id are one group. A group's split is that of its member with the smallest pixel
    hash: a function of the group and the data, so a re-run (an auditor's rebuild) gives the same split,
    and images outside the lists keep theirs. Returns (rows sorted as `resolve` sorts them, a report:
    groups applied, the ids moved with their old and new split, listed ids no image has, and listed ids
    whose image a rule quarantined, with its reasons, as `exclude` reports them)."""
    rows = [dict(row) for row in manifest]
    index = {row["id"]: n for n, row in enumerate(rows)}
    parent: dict[str, str] = {}

    def root(i: str) -> str:
        while parent.setdefault(i, i) != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    listed = [i for group in groups for i in group]
    for group in groups:  # through every listed id: one no image has now (deleted, excluded) still joins groups
        for other in group[1:]:
            parent[root(other)] = root(group[0])
    members: dict[str, list[str]] = collections.defaultdict(list)
    for i in sorted({i for i in listed if i in index}):
        members[root(i)].append(i)
    moved, applied = [], 0
    for group in sorted(members.values()):
        if len(group) < 2:
            continue
        applied += 1
        target = rows[index[min(group, key=lambda i: rows[index[i]]["pixels_sha256"])]]["split"]
        for i in group:
            if rows[index[i]]["split"] != target:
                moved.append({"id": i, "from": rows[index[i]]["split"], "to": target})
                rows[index[i]]["split"] = target
    rows.sort(key=lambda row: (SPLITS.index(row["split"]), row["label"], row["id"]))
    not_found, already = unknown_or_quarantined({i for i in listed if i not in index}, quarantined)
    return rows, {"groups": applied, "moved": moved, "not_found": not_found, "already_quarantined": already}


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
    # by the rule's own reasons: a decoder's message may hold the word (a review on 2026-12-07)
    duplicates = [row for row in quarantine if _reason_kind(row["reason"]).startswith("duplicate")]
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


def check_usable(summary: Mapping, given_splits: str | None = None) -> None:
    """Refuse datasets the later stages cannot train on, with a message that says why, and counts that do not
    add up (found = kept + quarantined per class: an image lost or counted twice is a bug, never an output).
    `given_splits`: where the dataset gives its own splits, what to do instead of raising download.fractions
    (which it does not use)."""
    unreconciled = {k: c for k, c in summary["per_class"].items() if c["found"] != c["kept"] + c["quarantined"]}
    if unreconciled:
        raise RuntimeError(f"download: found != kept + quarantined for {unreconciled}; nothing was written")
    classes = summary["classes"]
    # why images are missing, where some were quarantined: the run stops before quarantine.jsonl is written
    why = f" ({summary['quarantined']} quarantined: {summary['quarantine_reasons']})" if summary["quarantined"] else ""
    if len(classes) < 2:
        raise ValueError(
            f"need at least 2 classes with usable images, found {len(classes)}: {classes}{why}; "
            f"per class: {summary['per_class']}"
        )
    train = summary["splits"]["train"]["per_class"]
    missing = [name for name in classes if train.get(name, 0) == 0]
    if missing:
        raise ValueError(
            f"classes with no training image: {missing}{why}; add images or "
            f"{given_splits or 'raise download.fractions.train'} (the label vocabulary is learned from train only)"
        )
    empty = [name for name in ("val", "test") if summary["splits"][name]["total"] == 0]
    if empty:  # train_head and finetune failed on an empty val only after convert and extract had run
        raise ValueError(
            f"no image in the {' and '.join(empty)} split{why}: train_head and finetune choose their best epoch on "
            f"val and evaluate reports on test; add images or {given_splits or 'raise download.fractions'}"
        )


# --------------------------------------------------------------------------- sources (I/O)
