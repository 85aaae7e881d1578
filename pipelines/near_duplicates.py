"""Near-duplicate images from their cached feature vectors: across splits, and within a set of rows.

A resized, re-encoded or slightly cropped copy of a photo has other bytes, so download's content hash
misses it, but its conv-base features stay close: cosine similarity of the pooled features finds it.
Only pairs across splits matter (a copy in train and test inflates test accuracy), so the search is
train x val, train x test and val x test, exact, a block of one split against a block of the other:
memory is two blocks and their product, whatever the number of images, and the features may stay on disk
(any [n, dim] rows that slice, e.g. `pipelines.records.FeatureSpool`). Pure NumPy; ``benchmarks/near_duplicates.py`` times it at 100,000 vectors.
`pairs_within` searches one set of rows against itself (the quality stage's train + val, whose copies must
share a cross-validation fold).
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import numpy as np

SPLITS = ("train", "val", "test")
# A search finding more pairs than this many per image it searched stops (`TooManyPairs`): copies come a few to a
# photo, while a threshold loose enough to pair similar photos pairs a fixed share of all n^2/2, and those pairs,
# held to be sorted and reported, would grow with the square of the image count (an untrained base puts distinct
# images at a cosine of 0.99).
PAIRS_PER_IMAGE = 10
_ROWS_AT_ONCE = 64  # rows of a block's product turned into candidate pairs at a time
_CHECKED_AT_ONCE = 4096  # candidates re-summed in float64 at a time (two [n, dim] float64 gathers)


class TooManyPairs(ValueError):
    """More pairs than `PAIRS_PER_IMAGE` an image: the threshold finds similar photos, not copies."""

    user_facing = True  # components.cli prints the message, no traceback


def too_many(limit: int, threshold: float, where: str, found: Sequence[tuple[float, str, str]]) -> TooManyPairs:
    """The refusal, its advice from the pairs (similarity, id, id) `found` before the search stopped: mostly
    identical features (a similarity of 1: one picture copied many times, blank images, or a base that tells no
    images apart) are not helped by any threshold, so those name the images instead."""
    identical = [(a, b) for similarity, a, b in found if similarity >= 1.0]
    head = f"more than {limit} near-duplicate pairs {where} ({PAIRS_PER_IMAGE} an image) at a cosine similarity of at "
    if identical and 2 * len(identical) >= len(found):
        counts: dict[str, int] = {}
        for pair in identical:
            for image_id in pair:
                counts[image_id] = counts.get(image_id, 0) + 1
        named = sorted(counts, key=lambda i: (-counts[i], i))[:5]
        return TooManyPairs(
            f"{head}least {threshold}, {len(identical)} of the {len(found)} found at a similarity of 1 (identical "
            f"features; the images in most of them: {', '.join(named)}): a large group of copies of one picture "
            "(each copy pairs with every other), blank or constant images, or a conv base whose features tell no "
            "images apart (an untrained one gives every image nearly the same features); no threshold separates "
            "identical features: look at those images, list the extra copies in download.exclude, or check conv_base"
        )
    return TooManyPairs(
        f"{head}least {threshold}: a threshold this loose pairs similar photos, not copies, and their list grows with "
        "the square of the image count; raise quality.near_duplicate_threshold (benchmarks/near_duplicate_threshold.py "
        "measures copies' similarity on your photos)"
    )


class Rows(Protocol):
    """[n, dim] feature vectors read a slice at a time: a NumPy array, or rows on disk."""

    shape: tuple[int, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice) -> np.ndarray: ...


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (float32); an all-zero row stays zero, similar to nothing."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected [n, dim] feature vectors, got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def cross_split_pairs(
    features: Mapping[str, Rows],
    ids: Mapping[str, Sequence[str]],
    threshold: float,
    block: int = 2048,
    other_block: int = 8192,
    max_pairs: int | None = None,
) -> list[dict]:
    """Every pair of images in two different splits whose features' cosine similarity is >= `threshold`.

    ``features[split]``: [n, dim] vectors (`Rows`); ``ids[split]``: the n image ids in the same order. Returns
    {"similarity", "a_split", "a_id", "b_split", "b_id"} rows, a's split before b's in train, val, test
    order, most similar first (ties by split and id), so the list is the same whatever the block sizes.
    Memory: `block` rows of a split, `other_block` rows of the other and their products, and the pairs found:
    more than `max_pairs` (default `PAIRS_PER_IMAGE` times the images searched) is a `TooManyPairs` error, raised
    as soon as the search finds one pair too many.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold {threshold} must be in (0, 1]")
    if block < 1 or other_block < 1:
        raise ValueError("block and other_block must be at least 1")
    present = [s for s in SPLITS if s in features]
    unknown = sorted(set(features) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown splits {unknown}; expected some of {SPLITS}")
    dims = set()
    for split in present:
        shape = tuple(features[split].shape)
        if len(shape) != 2:
            raise ValueError(f"expected [n, dim] feature vectors, got shape {shape}")
        dims.add(shape[1])
        if len(ids[split]) != shape[0]:
            raise ValueError(f"{split}: {len(ids[split])} ids for {shape[0]} feature vectors")
    if len(dims) > 1:
        raise ValueError(f"the splits' features have different sizes {sorted(dims)}")
    if max_pairs is None:
        max_pairs = PAIRS_PER_IMAGE * sum(len(features[s]) for s in present)
    rows = []
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            for start in range(0, len(features[a]), block):
                units_a = unit_rows(features[a][start : start + block])
                for other in range(0, len(features[b]), other_block):
                    units_b = unit_rows(features[b][other : other + other_block])
                    try:
                        found = _similar(units_a, units_b, threshold, max_pairs - len(rows))
                    except _Full as full:
                        seen = [(row["similarity"], row["a_id"], row["b_id"]) for row in rows] + [
                            (similarity, ids[a][start + r], ids[b][other + c]) for r, c, similarity in full.found
                        ]
                        raise too_many(max_pairs, threshold, "across splits", seen) from None
                    for r, c, similarity in found:
                        rows.append(
                            {
                                "similarity": similarity,
                                "a_split": a,
                                "a_id": ids[a][start + r],
                                "b_split": b,
                                "b_id": ids[b][other + c],
                            }
                        )
    order = {s: k for k, s in enumerate(SPLITS)}
    rows.sort(key=lambda p: (-p["similarity"], order[p["a_split"]], p["a_id"], order[p["b_split"]], p["b_id"]))
    return rows


def pairs_within(
    rows: Rows, threshold: float, block: int = 2048, max_pairs: int | None = None, ids: Sequence[str] | None = None
) -> list[tuple[int, int, float]]:
    """Every pair (i, j), i < j, of rows whose features' cosine similarity is >= `threshold`, with it: one set
    searched against itself, a block against the blocks from its own on (the upper triangle), so each pair once.
    Sorted by (i, j). Memory: two blocks and their product, and the pairs found (more than `max_pairs`, default
    `PAIRS_PER_IMAGE` times the rows, is a `TooManyPairs` error, naming images by `ids` if given, else by row);
    the rows may stay on disk."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold {threshold} must be in (0, 1]")
    if block < 1:
        raise ValueError("block must be at least 1")
    found, n = [], len(rows)
    if max_pairs is None:
        max_pairs = PAIRS_PER_IMAGE * n
    for start in range(0, n, block):
        units_a = unit_rows(rows[start : start + block])
        for other in range(start, n, block):
            units_b = units_a if other == start else unit_rows(rows[other : other + block])
            # a block against itself: its upper triangle only (no row with itself, each pair once); the blocks
            # after it lie wholly above the diagonal
            try:
                pairs = _similar(units_a, units_b, threshold, max_pairs - len(found), upper=other == start)
            except _Full as full:
                name = (lambda k: str(k)) if ids is None else (lambda k: ids[k])
                seen = [(similarity, name(i), name(j)) for i, j, similarity in found] + [
                    (similarity, name(start + r), name(other + c)) for r, c, similarity in full.found
                ]
                raise too_many(max_pairs, threshold, "within one split", seen) from None
            found += [(start + r, other + c, similarity) for r, c, similarity in pairs]
    found.sort()
    return found


class _Full(Exception):
    """`_similar` found more pairs than the room left: the caller raises `TooManyPairs`, naming its search and
    judging from the similarities found (`too_many`)."""

    def __init__(self, found: list[tuple[int, int, float]]):
        super().__init__(len(found))
        self.found = found  # (row of a, row of b, similarity) in the blocks' numbering


def _similar(
    units_a: np.ndarray, units_b: np.ndarray, threshold: float, room: int, upper: bool = False
) -> list[tuple[int, int, float]]:
    """(row of a, row of b, similarity) of every pair of two blocks of unit rows at or above `threshold`
    (with `upper`, only row of a < row of b); more than `room` of them raises `_Full`.

    float32 products find the candidates (their rounding depends on the blocks, so with a margin); each
    candidate's similarity is then summed again in float64 on its own, so the result does not depend on them,
    and compared as reported, to 6 digits (float32 unit rows put an exact copy at 0.9999999). Candidates are
    taken `_ROWS_AT_ONCE` rows and checked `_CHECKED_AT_ONCE` at a time: memory stays that of the product
    whatever share of it is above the threshold."""
    close = units_a @ units_b.T >= np.float32(threshold - 1e-4)
    if upper:
        close = np.triu(close, k=1)
    found = []
    for first in range(0, len(close), _ROWS_AT_ONCE):
        hit_a, hit_b = np.nonzero(close[first : first + _ROWS_AT_ONCE])
        hit_a += first
        for at in range(0, len(hit_a), _CHECKED_AT_ONCE):
            a, b = hit_a[at : at + _CHECKED_AT_ONCE], hit_b[at : at + _CHECKED_AT_ONCE]
            exact = np.sum(units_a[a].astype(np.float64) * units_b[b].astype(np.float64), axis=1)
            for r, c, similarity in zip(a.tolist(), b.tolist(), exact.tolist()):
                similarity = round(min(similarity, 1.0), 6)
                if similarity >= threshold:
                    found.append((r, c, similarity))
            if len(found) > room:
                raise _Full(found)
    return found
