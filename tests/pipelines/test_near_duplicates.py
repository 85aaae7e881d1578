import numpy as np
import pytest

from pipelines import near_duplicates as nd


def brute_force(features, ids, threshold):
    found = set()
    splits = [s for s in nd.SPLITS if s in features]
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            for x, va in zip(ids[a], features[a]):
                for y, vb in zip(ids[b], features[b]):
                    na, nb = np.linalg.norm(va), np.linalg.norm(vb)
                    if na and nb and float(va @ vb) / (na * nb) >= threshold:
                        found.add((a, x, b, y))
    return found


def planted(seed=0, dim=32):
    """Non-negative (ReLU-like) features; near copies planted across splits and one inside train."""
    rng = np.random.default_rng(seed)
    feats = {s: rng.gamma(0.5, 1.0, (n, dim)).astype(np.float32) for s, n in (("train", 40), ("val", 15), ("test", 12))}
    feats["val"][3] = feats["train"][7] * 1.7 + rng.normal(0, 0.01, dim)  # a resized copy: scale does not matter
    feats["test"][5] = feats["train"][2] + rng.normal(0, 0.02, dim)
    feats["test"][9] = feats["val"][11] + rng.normal(0, 0.02, dim)
    feats["train"][30] = feats["train"][31]  # within one split: not a leak, not listed
    feats["test"][0] = 0.0  # an all-zero vector is similar to nothing
    ids = {s: [f"{s}{i:02d}" for i in range(len(v))] for s, v in feats.items()}
    return feats, ids


def test_planted_copies_across_splits_are_found_and_nothing_else():
    feats, ids = planted()
    pairs = nd.cross_split_pairs(feats, ids, threshold=0.99)
    assert {(p["a_split"], p["a_id"], p["b_split"], p["b_id"]) for p in pairs} == {
        ("train", "train07", "val", "val03"),
        ("train", "train02", "test", "test05"),
        ("val", "val11", "test", "test09"),
    }
    assert all(0.99 <= p["similarity"] <= 1.0 for p in pairs)
    assert [p["similarity"] for p in pairs] == sorted((p["similarity"] for p in pairs), reverse=True)


@pytest.mark.parametrize("threshold", [0.6, 0.8, 0.95])
@pytest.mark.parametrize("block", [1, 7, 4096])
def test_the_blocked_search_equals_brute_force_whatever_the_block(threshold, block):
    feats, ids = planted(seed=1, dim=8)  # low dimension: many pairs near each threshold
    pairs = nd.cross_split_pairs(feats, ids, threshold, block=block)
    assert {(p["a_split"], p["a_id"], p["b_split"], p["b_id"]) for p in pairs} == brute_force(feats, ids, threshold)
    assert pairs == nd.cross_split_pairs(feats, ids, threshold, block=3)  # the same list, in the same order


def test_bad_inputs_are_clear_errors():
    feats, ids = planted()
    with pytest.raises(ValueError, match=r"threshold 1.5"):
        nd.cross_split_pairs(feats, ids, 1.5)
    with pytest.raises(ValueError, match="2 ids for 40"):
        nd.cross_split_pairs(feats, {**ids, "train": ["a", "b"]}, 0.9)
    with pytest.raises(ValueError, match="different sizes"):
        nd.cross_split_pairs({"train": np.ones((2, 3)), "val": np.ones((2, 4))}, {"train": "ab", "val": "cd"}, 0.9)
    with pytest.raises(ValueError, match="unknown splits"):
        nd.cross_split_pairs({"holdout": np.ones((2, 3))}, {"holdout": "ab"}, 0.9)
