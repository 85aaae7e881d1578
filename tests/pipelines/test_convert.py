"""The convert graph: preprocessing_fn with tf.Transform's test helpers, the Beam graph with TestPipeline."""

import collections
import json

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
beam = pytest.importorskip("apache_beam")
tft_unit = pytest.importorskip("tensorflow_transform.beam.tft_unit")

from apache_beam.testing.test_pipeline import TestPipeline  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402

from components import download as dl  # noqa: E402
from components import manifest as mf  # noqa: E402
from pipelines import convert as graph  # noqa: E402
from pipelines import features as fk  # noqa: E402
from pipelines import normalise  # noqa: E402
from tests.conftest import make_class_folder  # noqa: E402


class PreprocessingFnTest(tft_unit.TransformTestCase):
    test_session = None  # tf.test.TestCase's helper, not a test

    def test_vocabulary_is_sorted_not_by_frequency_and_learned_from_train_only(self):
        def row(name, rid, split):
            return {fk.LABEL_NAME: name, fk.ID: rid, fk.FILE: b"images/" + rid + b".jpg", fk.SPLIT: split}

        train = [row(b"dogs", b"a", b"train"), row(b"dogs", b"b", b"train"), row(b"cats", b"c", b"train")]
        val = [row(b"cats", b"d", b"val"), row(b"zebras", b"e", b"val")]  # zebras: not in train, so no index
        expected = [
            {fk.LABEL: 0, fk.LABEL_NAME: b"cats", fk.ID: b"d", fk.FILE: b"images/d.jpg", fk.SPLIT: b"val"},
            {fk.LABEL: -1, fk.LABEL_NAME: b"zebras", fk.ID: b"e", fk.FILE: b"images/e.jpg", fk.SPLIT: b"val"},
        ]
        self.assertAnalyzeAndTransformResults(
            train,
            graph.raw_metadata(),
            graph.preprocessing_fn,
            expected_data=expected,
            test_data=val,
            expected_vocab_file_contents={fk.LABEL_VOCABULARY: [b"cats", b"dogs"]},
        )


def test_to_example_refuses_a_label_outside_the_vocabulary():
    with pytest.raises(ValueError, match="class 'zebras' is not in the label vocabulary"):
        graph.to_example({fk.IMAGE: b"x", fk.LABEL: np.int64(-1), fk.LABEL_NAME: b"zebras", fk.ID: b"e"})


def test_shard_of_is_stable_and_spreads():
    ids = [normalise.content_hash(str(i).encode())[:20] for i in range(400)]
    shards = collections.Counter(graph.shard_of(i, 4) for i in ids)
    assert set(shards) == {0, 1, 2, 3} and min(shards.values()) > 60
    assert graph.shard_of(ids[0].encode(), 4) == graph.shard_of(ids[0], 4)


@pytest.fixture
def tiny_download(tmp_path):
    root = make_class_folder(tmp_path / "src", per_class=10, classes=("cats", "dogs", "birds"))
    config = dl.Config(
        dl.CommonParams(seed=11),
        dl.DatasetParams(source="folder", dir=str(root)),
        dl.DownloadParams(fractions=dl.Fractions(train=0.6, val=0.2, test=0.2)),
    )
    dl.run(config, tmp_path / "download")
    return tmp_path / "download"


def read_records(files):
    dataset = tf.data.TFRecordDataset(sorted(str(f) for f in files))
    return [tf.io.parse_single_example(r, fk.record_feature_spec()) for r in dataset]


def test_convert_graph_on_test_pipeline(tiny_download, tmp_path):
    manifest = mf.read_jsonl(tiny_download / mf.MANIFEST)
    per_split = collections.Counter(row["split"] for row in manifest)
    shards = {"train": 3, "val": 2, "test": 5}  # more test shards than test images: some stay empty
    with TestPipeline() as pipeline:
        counts = graph.convert(
            pipeline,
            manifest_path=str(tiny_download / mf.MANIFEST),
            images_root=str(tiny_download),
            records_dir=str(tmp_path / "records"),
            transform_dir=str(tmp_path / "transform"),
            shards=shards,
            temp_dir=str(tmp_path / "tft"),
        )
        totals = counts | beam.CombinePerKey(sum)
        assert_that(totals, equal_to([(s, per_split[s]) for s in graph.SPLITS]))

    vocab = (tmp_path / "transform" / "transform_fn" / "assets" / fk.LABEL_VOCABULARY).read_text().split()
    assert vocab == ["birds", "cats", "dogs"]
    by_id = {row["id"]: row for row in manifest}
    for split in graph.SPLITS:
        files = sorted((tmp_path / "records").glob(f"{split}-*.tfrecord"))
        assert [f.name for f in files] == [
            f"{split}-{i:05d}-of-{shards[split]:05d}.tfrecord" for i in range(shards[split])
        ]
        seen = []
        for index, path in enumerate(files):
            records = read_records([path])
            ids = [r[fk.ID].numpy().decode() for r in records]
            assert ids == sorted(ids) and all(graph.shard_of(i, shards[split]) == index for i in ids)
            for record, record_id in zip(records, ids):
                row = by_id[record_id]
                assert row["split"] == split
                assert record[fk.LABEL_NAME].numpy().decode() == row["label"]
                assert vocab[int(record[fk.LABEL])] == row["label"]
                assert record[fk.IMAGE].numpy() == (tiny_download / row["file"]).read_bytes()
            seen += ids
        assert sorted(seen) == sorted(r["id"] for r in manifest if r["split"] == split)


def test_missing_image_file_is_a_clear_error(tiny_download, tmp_path):
    row = mf.read_jsonl(tiny_download / mf.MANIFEST)[0]
    (tiny_download / row["file"]).unlink()
    with pytest.raises(Exception, match=f"manifest row {row['id']}: cannot read"):
        with TestPipeline() as pipeline:
            graph.convert(
                pipeline,
                str(tiny_download / mf.MANIFEST),
                str(tiny_download),
                str(tmp_path / "records"),
                str(tmp_path / "transform"),
                {"train": 1, "val": 1, "test": 1},
                str(tmp_path / "tft"),
            )


def test_manifest_rows_are_json(tiny_download):
    for line in (tiny_download / mf.MANIFEST).read_text().splitlines():
        assert set(json.loads(line)) >= {"id", "file", "source", "sha256", "label", "split"}


def test_a_shards_memory_holds_no_image_bytes(tmp_path):
    """Convert groups a few hundred bytes an image into shards (`KeyById`: no pixels, no image bytes) and reads each
    image only as its record is written: a shard of 1,000 images of 20 KB peaks within ~100 KB of one of 100, where
    reading them all first (or grouping the bytes) would hold 18 MB more."""
    import os
    import tracemalloc

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1000):
        (images / f"{i:04d}.jpg").write_bytes(rng.bytes(20_000))
    instance = {
        fk.ID: np.array([b"%040x" % 7]),
        fk.LABEL: np.array([1]),
        fk.LABEL_NAME: np.array([b"dogs"]),
        fk.FILE: np.array([b"0000.jpg"]),
        fk.SPLIT: np.array([b"train"]),
    }
    (keyed,) = graph.KeyById().process(instance)
    assert keyed[0] == b"%040x" % 7 and fk.IMAGE not in keyed[1] and len(repr(keyed)) < 400  # what is grouped

    def items(n):
        return [
            (
                f"{i:040x}".encode(),
                {fk.ID: f"{i:040x}".encode(), fk.LABEL: 1, fk.LABEL_NAME: b"dogs", fk.FILE: f"{i:04d}.jpg".encode()},
            )
            for i in range(n)
        ]

    peaks = {}
    for n in (10, 100, 1000):  # the first warms TensorFlow's writer up: not compared
        shard = graph.WriteShard(str(images), str(tmp_path / "out" / f"train-{n}"), 1, "train")
        shard.setup()
        grouped = items(n)
        tracemalloc.start()
        try:
            assert list(shard.process((0, iter(grouped)))) == [("train", n)]
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        written = list(tf.data.TFRecordDataset(graph.shard_path(str(tmp_path / "out" / f"train-{n}"), 0, 1)))
        assert len(written) == n
    assert os.path.getsize(images / "0999.jpg") == 20_000
    assert peaks[1000] < peaks[100] + 200_000, peaks  # a list of 1,000 references, not 18 MB of image bytes
