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
@pytest.mark.parametrize("block,other_block", [(1, 1), (7, 5), (4096, 8192)])
def test_the_blocked_search_equals_brute_force_whatever_the_block(threshold, block, other_block):
    feats, ids = planted(seed=1, dim=8)  # low dimension: many pairs near each threshold
    pairs = nd.cross_split_pairs(feats, ids, threshold, block=block, other_block=other_block)
    assert {(p["a_split"], p["a_id"], p["b_split"], p["b_id"]) for p in pairs} == brute_force(feats, ids, threshold)
    assert pairs == nd.cross_split_pairs(feats, ids, threshold, block=3, other_block=4)  # the same list and order


def test_features_on_disk_give_the_same_pairs(tmp_path):
    from pipelines.records import FeatureSpool

    feats, ids = planted(seed=1, dim=8)
    spooled = {}
    for split, rows in feats.items():
        spool = spooled[split] = FeatureSpool(tmp_path / split, 8)
        for start in range(0, len(rows), 6):  # appended in pieces, as the stage reads them
            spool.append(rows[start : start + 6])
        np.testing.assert_array_equal(spool[2:9], np.asarray(rows[2:9], np.float32))
        np.testing.assert_array_equal(spool[np.array([5, 0, 3])], np.asarray(rows, np.float32)[[5, 0, 3]])
    assert len(spooled["train"]) == len(feats["train"]) and spooled["train"].shape == (len(feats["train"]), 8)
    pairs = nd.cross_split_pairs(spooled, ids, 0.8, block=4, other_block=5)
    assert pairs == nd.cross_split_pairs(feats, ids, 0.8) and pairs


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


def test_exact_copies_reach_a_threshold_of_one():
    # float32 unit rows put some exact copies at 0.9999999: at threshold 1.0 they were missed (26 of 50 found)
    rows = np.random.default_rng(5).normal(size=(50, 64)).astype(np.float32) * 3.7
    pairs = nd.cross_split_pairs(
        {"train": rows, "test": rows.copy()},
        {"train": [f"a{i}" for i in range(50)], "test": [f"b{i}" for i in range(50)]},
        1.0,
    )
    assert sorted((p["a_id"], p["b_id"]) for p in pairs) == sorted((f"a{i}", f"b{i}") for i in range(50))
    assert all(p["similarity"] == 1.0 for p in pairs)


def test_a_threshold_pairing_similar_photos_stops_early_with_memory_bounded():
    """A loose threshold (or an untrained base: distinct images at cosine 0.99) made every pair a candidate: the
    float64 check gathered all of a block's candidates at once (a 2048 x 8192 block of 1,280 floats: ~340 GB) and
    every pair was held before the too-loose-threshold refusal. The search now stops at PAIRS_PER_IMAGE pairs an
    image, with a message saying what to change, having held memory of the order of a block's product."""
    import tracemalloc

    rng = np.random.default_rng(0)
    alike = (1.0 + 0.01 * rng.standard_normal((1500, 256))).astype(np.float32)  # all at cosine ~0.9999
    split = {"train": alike[:1000], "val": alike[1000:1250], "test": alike[1250:]}
    ids = {s: [f"{s}{k}" for k in range(len(v))] for s, v in split.items()}
    tracemalloc.start()
    try:
        with pytest.raises(
            nd.TooManyPairs, match=r"more than 15000 near-duplicate pairs across splits .* raise quality"
        ):
            nd.cross_split_pairs(split, ids, 0.9)
        with pytest.raises(nd.TooManyPairs, match=r"more than 10000 near-duplicate pairs within one split"):
            nd.pairs_within(split["train"], 0.9)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the product of a 1000 x 500 block pair is 2 MB; the old check gathered 375,000 candidates' rows (1.5 GB)
    assert peak < 60e6, peak
    # A limit the pairs fit in returns them all, each once, as before.
    assert len(nd.pairs_within(split["val"], 0.9, max_pairs=250 * 249 // 2)) == 250 * 249 // 2
    few = {"val": split["val"][:20], "test": split["test"][:30]}
    assert len(nd.cross_split_pairs(few, {s: ids[s][: len(v)] for s, v in few.items()}, 0.9, max_pairs=600)) == 600


def test_too_many_identical_pairs_name_the_images_instead_of_asking_for_a_higher_threshold():
    """A group of 100 copies of one picture (or blank images) pairs each copy with every other, all at a
    similarity of 1: the refusal told the user to raise the threshold, which no threshold up to 1.0 helps. It now
    says the features are identical and names the images in those pairs, within one split and across splits."""
    rng = np.random.default_rng(1)
    distinct = rng.standard_normal((300, 64)).astype(np.float32)  # pairwise cosine near 0
    copies = np.repeat(distinct[:1], 100, axis=0)  # one picture 100 times: 4,950 pairs at 1.0, over 10 an image
    rows = np.concatenate([distinct[1:], copies])
    ids = [f"img{k:03d}" for k in range(len(rows))]
    with pytest.raises(nd.TooManyPairs) as within:
        nd.pairs_within(rows, 0.9, ids=ids)
    message = str(within.value)
    assert "similarity of 1 (identical features" in message and "download.exclude" in message
    assert "raise quality.near_duplicate_threshold" not in message
    named = message.split("the images in most of them: ")[1].split(")")[0].split(", ")
    assert len(named) == 5 and set(named) <= set(ids[299:])  # the copies, not the distinct images
    with pytest.raises(nd.TooManyPairs, match=r"within one split.*images in most of them: \d+, "):
        nd.pairs_within(rows, 0.9)  # no ids: rows by number
    split = {"train": rows[::2], "val": rows[1::2]}
    split_ids = {"train": ids[::2], "val": ids[1::2]}
    with pytest.raises(nd.TooManyPairs, match=r"across splits .* similarity of 1 .*img3"):
        nd.cross_split_pairs(split, split_ids, 0.9, max_pairs=500)
