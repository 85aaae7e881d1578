import json

import pytest
import yaml

from components.params import ParamsError
from tests.conftest import repo_params
from tests.test_dvc_pipeline import REPO
from tools import data_fixes

PAIRS = [
    {"a_id": "a" * 20, "a_split": "train", "b_id": "b" * 20, "b_split": "test", "similarity": 0.99},
    {"a_id": "c" * 20, "a_split": "val", "b_id": "d" * 20, "b_split": "test", "similarity": 0.95},
]
ISSUES = [{"id": "e" * 20, "score": 0.01}, {"id": "f" * 20, "score": 0.02}, {"id": "0" * 20, "score": 0.2}]


def test_fixes_from_the_quality_lists():
    assert data_fixes.fixes(PAIRS, ISSUES, keep_together=True) == {
        "exclude": [],
        "keep_together": [["a" * 20, "b" * 20], ["c" * 20, "d" * 20]],
    }
    assert data_fixes.fixes(PAIRS, ISSUES, exclude_copies=True, exclude_suspects=2)["exclude"] == [
        "b" * 20,
        "d" * 20,
        "e" * 20,
        "f" * 20,
    ]


def test_lists_are_extended_never_shrunk_nor_repeated():
    current = {"min_side": 16, "exclude": ["f" * 20], "keep_together": [["b" * 20, "a" * 20]]}
    found = data_fixes.fixes(PAIRS, ISSUES, keep_together=True, exclude_suspects=2)
    merged = data_fixes.merged_download(current, found)
    assert merged["exclude"] == ["f" * 20, "e" * 20]
    assert merged["keep_together"] == [["b" * 20, "a" * 20], ["c" * 20, "d" * 20]]
    assert merged["min_side"] == 16 and current["exclude"] == ["f" * 20]  # the input is not changed
    assert data_fixes.merged_download({"min_side": 16}, data_fixes.fixes([], [])) == {
        "min_side": 16,
        "exclude": [],
        "keep_together": [],
    }  # an older params file gets both keys, so it validates


def project_with_lists(tmp_path):
    """params.yaml (the repository's) and a quality folder holding PAIRS and ISSUES."""
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    report = tmp_path / "quality"
    report.mkdir()
    (report / "near_duplicates.json").write_text(json.dumps(PAIRS))
    (report / "label_issues.json").write_text(json.dumps(ISSUES))
    return params, report


def test_write_merges_validated_params_and_printing_changes_nothing(tmp_path, capsys):
    params, report = project_with_lists(tmp_path)
    args = ["--report", str(report), "--params", str(params), "--exclude-copies"]
    assert data_fixes.main(args) == 0
    assert "-S 'download.exclude=" in capsys.readouterr().out
    assert params.read_text() == (REPO / "params.yaml").read_text()
    assert data_fixes.main([*args, "--write"]) == 0
    assert yaml.safe_load(params.read_text())["download"]["exclude"] == ["b" * 20, "d" * 20]
    comments = [line for line in (REPO / "params.yaml").read_text().splitlines() if line.lstrip().startswith("#")]
    assert set(comments) <= set(params.read_text().splitlines())  # edited in place: the key's docs stay
    (report / "near_duplicates.json").write_text(json.dumps([{**PAIRS[0], "b_id": "not an id"}]))
    with pytest.raises(ParamsError, match="download.exclude"):
        data_fixes.main([*args, "--write"])


def test_lists_naming_images_the_current_download_lacks_are_refused(tmp_path):
    """A review on 2026-12-07: a quality folder from another run was merged into download.exclude without a word."""
    params, report = project_with_lists(tmp_path)
    manifest = tmp_path / "data" / "download" / "manifest.jsonl"
    manifest.parent.mkdir(parents=True)
    ids = sorted({p[k] for p in PAIRS for k in ("a_id", "b_id")})
    manifest.write_text("".join(json.dumps({"id": i}) + "\n" for i in ids if i != "b" * 20))  # an excluded one gone
    args = ["--report", str(report), "--params", str(params), "--exclude-copies", "--write"]
    before = params.read_text()
    with pytest.raises(SystemExit, match=r"no image of .*download .*dvc repro quality"):
        data_fixes.main(args)
    assert params.read_text() == before
    manifest.write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
    assert data_fixes.main(args) == 0
    # a second read: the same lists after download took their images out (excluded: quarantined, and in the params),
    # and a pair of which download quarantined one image since, are the same run's, not refused
    manifest.write_text("".join(json.dumps({"id": i}) + "\n" for i in ids if i not in ("b" * 20, "d" * 20)))
    assert data_fixes.main(args) == 0  # b and d: in download.exclude
    (manifest.parent / "quarantine.jsonl").write_text(json.dumps({"reason": "excluded", "pixels_sha256": "a" * 64}))
    manifest.write_text("".join(json.dumps({"id": i}) + "\n" for i in ids if i != "a" * 20))
    folder = yaml.safe_load(params.read_text())
    folder["dataset"] = {**folder["dataset"], "source": "folder", "dir": "photos"}  # pairs kept together: a hash split
    params.write_text(yaml.safe_dump(folder))
    assert data_fixes.main([*args[:-2], "--keep-together", "--write"]) == 0  # a: quarantined since
    with pytest.raises(SystemExit):  # argparse: an explicit manifest that is not there
        data_fixes.main([*args, "--manifest", str(tmp_path / "nowhere.jsonl")])


def test_impossible_fixes_are_refused_before_anything_is_written(tmp_path):
    report = tmp_path / "quality"
    report.mkdir()
    (report / data_fixes.NEAR_DUPLICATES).write_text(json.dumps([]))
    (report / data_fixes.LABEL_ISSUES).write_text(json.dumps([]))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(repo_params()))  # the default: tfds slices mapped to the three splits
    before = params.read_text()
    with pytest.raises(SystemExit, match="tfds source maps its own slices"):
        data_fixes.main(["--report", str(report), "--params", str(params), "--keep-together", "--write"])
    # a folder of train/val/test folders, used as given (found by a review on 2026-12-06: written, and the next
    # download refused it after reading every image); pooled and hash-split (`existing_splits: ignore`), written
    (tmp_path / "photos" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "photos" / "val").mkdir()
    (tmp_path / "photos" / "test").mkdir()
    folder = repo_params({"dataset": {"source": "folder", "dir": "photos"}})
    params.write_text(yaml.safe_dump(folder))
    with pytest.raises(SystemExit, match="photos has train/val/test folders"):
        data_fixes.main(["--report", str(report), "--params", str(params), "--keep-together", "--write"])
    folder["dataset"]["existing_splits"] = "ignore"
    params.write_text(yaml.safe_dump(folder))
    assert data_fixes.main(["--report", str(report), "--params", str(params), "--keep-together", "--write"]) in (
        0,
        None,
    )
    params.write_text(before)
    with pytest.raises(SystemExit):  # argparse: a negative count would exclude all but the last N suspects
        data_fixes.main(["--report", str(report), "--params", str(params), "--exclude-suspects", "-2"])
    assert params.read_text() == before
