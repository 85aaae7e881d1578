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
) -> list[dict]:
    """Every pair of images in two different splits whose features' cosine similarity is >= `threshold`.

    ``features[split]``: [n, dim] vectors (`Rows`); ``ids[split]``: the n image ids in the same order. Returns
    {"similarity", "a_split", "a_id", "b_split", "b_id"} rows, a's split before b's in train, val, test
    order, most similar first (ties by split and id), so the list is the same whatever the block sizes.
    Memory: `block` rows of a split, `other_block` rows of the other and their products.
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
    rows = []
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            for start in range(0, len(features[a]), block):
                units_a = unit_rows(features[a][start : start + block])
                for other in range(0, len(features[b]), other_block):
                    units_b = unit_rows(features[b][other : other + other_block])
                    for r, c, similarity in _similar(units_a, units_b, threshold):
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


def pairs_within(rows: Rows, threshold: float, block: int = 2048) -> list[tuple[int, int, float]]:
    """Every pair (i, j), i < j, of rows whose features' cosine similarity is >= `threshold`, with it: one set
    searched against itself, a block against the blocks from its own on (the upper triangle), so each pair once.
    Sorted by (i, j). Memory: two blocks and their product; the rows may stay on disk."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold {threshold} must be in (0, 1]")
    if block < 1:
        raise ValueError("block must be at least 1")
    found, n = [], len(rows)
    for start in range(0, n, block):
        units_a = unit_rows(rows[start : start + block])
        for other in range(start, n, block):
            units_b = units_a if other == start else unit_rows(rows[other : other + block])
            found += [
                (start + r, other + c, similarity)
                for r, c, similarity in _similar(units_a, units_b, threshold)
                if start + r < other + c  # the upper triangle: no row with itself, each pair once
            ]
    found.sort()
    return found


def _similar(units_a: np.ndarray, units_b: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """(row of a, row of b, similarity) of every pair of two blocks of unit rows at or above `threshold`.

    float32 products find the candidates (their rounding depends on the blocks, so with a margin); each
    candidate's similarity is then summed again in float64 on its own, so the result does not depend on them,
    and compared as reported, to 6 digits (float32 unit rows put an exact copy at 0.9999999)."""
    hit_a, hit_b = np.nonzero(units_a @ units_b.T >= np.float32(threshold - 1e-4))
    exact = np.sum(units_a[hit_a].astype(np.float64) * units_b[hit_b].astype(np.float64), axis=1)
    found = []
    for r, c, similarity in zip(hit_a.tolist(), hit_b.tolist(), exact.tolist()):
        similarity = round(min(similarity, 1.0), 6)
        if similarity >= threshold:
            found.append((r, c, similarity))
    return found
