"""Near-duplicate search across splits at scale: `pipelines.near_duplicates.cross_split_pairs` on N feature vectors
of the real preset's size, against the one-matrix search it replaces (all n x n similarities at once) on a subset;
and quality's searches within train and within val (`pairs_within`), timed against the cross-split search.

    python -m benchmarks.near_duplicates --n 100000 --dim 1280

The vectors are seeded, non-negative and sparse-ish like average-pooled ReLU features (gamma-distributed), split
60/20/20, with 50 near copies planted across splits; the search must find all of them. The cost depends on the
shapes only (train x val, train x test, val x test dot products), not on the values. Prints the time, the pairs
found, peak memory of the search, and the ratio against the n x n baseline's rate (same script, same machine).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from pipelines import near_duplicates as nd


def make(n: int, dim: int, planted: int, seed: int):
    rng = np.random.default_rng(seed)
    sizes = {"train": n * 6 // 10, "val": n * 2 // 10}
    sizes["test"] = n - sizes["train"] - sizes["val"]
    # float32 from the start: a float64 array converted after would raise the process's peak RSS before the
    # search, hiding the search's own memory in the headroom (the figure printed is the peak's growth)
    feats = {s: rng.standard_gamma(0.5, (k, dim), dtype=np.float32) for s, k in sizes.items()}
    copies = set()
    for k in range(planted):
        a, b = ("train", "val", "train")[k % 3], ("val", "test", "test")[k % 3]
        i, j = int(rng.integers(sizes[a])), int(rng.integers(sizes[b]))
        feats[b][j] = feats[a][i] * rng.uniform(0.8, 1.2) + rng.normal(0, 0.02, dim).astype(np.float32)
        copies.add((a, f"{a}{i}", b, f"{b}{j}"))
    ids = {s: [f"{s}{i}" for i in range(k)] for s, k in sizes.items()}
    return feats, ids, copies


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--threshold", type=float, default=0.9)  # params.yaml quality.near_duplicate_threshold
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--baseline-n", type=int, default=10_000, help="vectors for the n x n one-matrix baseline")
    args = parser.parse_args(argv)

    feats, ids, copies = make(args.n, args.dim, 50, seed=0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    pairs = nd.cross_split_pairs(feats, ids, args.threshold, block=args.block)
    elapsed = time.perf_counter() - started
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    found = {(p["a_split"], p["a_id"], p["b_split"], p["b_id"]) for p in pairs}
    sizes = {s: len(v) for s, v in feats.items()}
    products = sizes["train"] * (sizes["val"] + sizes["test"]) + sizes["val"] * sizes["test"]
    print(f"{args.n:,} vectors of {args.dim} ({sizes}), threshold {args.threshold}, block {args.block}")
    print(f"cross-split search: {elapsed:.1f} s, {products / elapsed / 1e6:.1f} M pairs/s, {len(pairs)} pairs")
    print(f"planted copies found: {len(copies & found)} of {len(copies)}; other pairs: {len(found - copies)}")
    print(f"peak RSS grew by {(rss_after - rss_before) / 1024:.0f} MB during the search (inputs excluded)")

    # quality's second search: within train and within val (copies must share a cross-validation fold; its
    # train-val pairs are the cross-split search's, not searched again)
    started = time.perf_counter()
    within = {split: nd.pairs_within(feats[split], args.threshold, block=args.block) for split in ("train", "val")}
    within_elapsed = time.perf_counter() - started
    within_products = sum(len(feats[s]) * (len(feats[s]) - 1) // 2 for s in ("train", "val"))
    print(
        f"within train ({sizes['train']:,}) and within val ({sizes['val']:,}): {within_elapsed:.1f} s, "
        f"{within_products / within_elapsed / 1e6:.1f} M pairs/s, {sum(map(len, within.values()))} pairs; "
        f"{within_elapsed / elapsed:.2f}x the cross-split search's time"
    )

    small, _, _ = make(args.baseline_n, args.dim, 0, seed=1)
    everything = nd.unit_rows(np.concatenate([small[s] for s in nd.SPLITS]))
    started = time.perf_counter()
    # the n x n baseline: every similarity in one matrix (against a copy: `x @ x.T` lets BLAS compute only half
    # of the symmetric product, which credited the baseline with twice the work it did)
    scores = everything @ everything.copy().T
    int(np.count_nonzero(scores >= args.threshold))
    base = time.perf_counter() - started
    base_rate = len(everything) ** 2 / base
    print(
        f"baseline n x n at {len(everything):,}: {base:.2f} s, {base_rate / 1e6:.1f} M pairs/s, "
        f"{scores.nbytes / 2**20:.0f} MB for the matrix ({args.n:,}: {args.n**2 * 4 / 2**30:.0f} GB)"
    )
    print(f"rate ratio, blocked cross-split / n x n: {products / elapsed / base_rate:.2f}x")
    return 0 if copies <= found else 1


if __name__ == "__main__":
    raise SystemExit(main())
