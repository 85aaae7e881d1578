"""components/manifest.py: rows read a line at a time."""

import json

import pytest

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


def test_a_line_that_is_not_utf8_is_named_by_file_and_line(tmp_path):
    """Read as text, a byte that is not UTF-8 stopped the reader with the codec's message, naming neither the file
    nor the line; lines still end at "\\n" only (a lone "\\r" and U+2028 are inside a row)."""
    path = tmp_path / mf.MANIFEST
    good = {"id": "a\u2028b", "source": "c0/x.png"}
    row = b'{"id": "a\xe2\x80\xa8b",\r"source": "c0/x.png"}\n'  # U+2028 unescaped, a bare "\r" as JSON space
    path.write_bytes(row + b'{"id": "\xff"}\n')
    with pytest.raises(ValueError, match=r"manifest.jsonl: line 2 is not UTF-8 text \(byte 9 of the line"):
        mf.read_jsonl(path)
    path.write_bytes(row)
    assert mf.read_jsonl(path) == [good]
