"""components/manifest.py: rows read a line at a time."""

import json

from components import manifest as mf


def test_rows_of_reads_only_the_rows_asked_for_and_ids_missing_names_the_absent(tmp_path):
    path = tmp_path / mf.MANIFEST
    rows = [{"id": f"im{i}", "source": f"c{i % 2}/im{i}.png", "split": "train"} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # a blank last line is no row
    assert mf.rows_of(path, {"im1", "im4", "nowhere"}) == {"im1": rows[1], "im4": rows[4]}
    assert mf.rows_of(path, set()) == {}
    assert mf.ids_missing(path, ["im0", "nowhere", "also"]) == ["also", "nowhere"]
    assert mf.ids_missing(path, (r["id"] for r in rows)) == []
    assert list(mf.iter_jsonl(path)) == mf.read_jsonl(path) == rows
