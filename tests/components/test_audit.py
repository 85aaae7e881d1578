from components import audit


def rows(*items):
    return [{"sha256": sha, "split": split, "label": label} for sha, split, label in items]


def test_an_image_in_two_splits_is_found():
    assert audit.split_conflicts(rows(("a", "train", "cat"), ("b", "test", "dog"), ("a", "test", "cat"))) == ["a"]
    assert audit.split_conflicts(rows(("a", "train", "cat"), ("b", "test", "dog"))) == []


def test_an_image_that_moved_split_between_revisions_is_found():
    old = rows(("a", "train", "cat"), ("b", "test", "dog"))
    new = rows(("a", "train", "cat"), ("b", "train", "dog"), ("c", "test", "dog"))  # c is new: not a move
    assert audit.moved_splits(old, new) == [{"sha256": "b", "from": "test", "to": "train"}]


def test_label_map_order_changes_are_found():
    assert audit.label_order_changes(["cat", "dog"], ["cat", "dog", "fox"]) == []
    assert audit.label_order_changes(["cat", "dog"], ["ant", "cat", "dog"]) == ["'cat': index 0 -> 1", "'dog': index 1 -> 2"]
    assert audit.label_order_changes(["cat", "dog"], ["cat"]) == ["'dog': removed"]


def test_counts_and_diffs():
    assert audit.manifest_counts(rows(("a", "train", "cat"), ("b", "train", "dog"), ("c", "train", "cat"))) == {"train": {"cat": 2, "dog": 1}}
    assert audit.diff_flat({"x": {"lr": 1, "n": 2}}, {"x": {"lr": 3, "n": 2}, "y": 1}) == {"x.lr": [1, 3], "y": [None, 1]}


def test_serving_lineage_must_name_the_revisions_manifest_and_model():
    lineage = {"manifest_sha256": "m", "model_sha256": "k"}
    assert audit.lineage_checks(lineage, "m", "k") == []
    assert len(audit.lineage_checks(lineage, "other", "k")) == 1
    assert audit.lineage_checks(None, "m", "k") == ["the serving model carries no lineage record"]


def test_a_revision_without_dvc_lock_is_a_clear_error(tmp_path):
    import subprocess

    import pytest

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "README").write_text("x")
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "x"], cwd=tmp_path, check=True)
    with pytest.raises(SystemExit, match="HEAD has no dvc.lock: nothing was reproduced and committed there"):
        audit.main(["--rev", "HEAD", "--repo", str(tmp_path), "--out", str(tmp_path / "audit")])
