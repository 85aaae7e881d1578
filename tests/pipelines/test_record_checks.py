"""The checks on the record files the training and evaluation stages read (`pipelines.record_checks`)."""

import json
import shutil

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from components import evaluate, quality, train_head  # noqa: E402
from pipelines import extract as graph  # noqa: E402
from pipelines import record_checks, records  # noqa: E402


def truncated_feature_shard(tmp_path):
    path = tmp_path / "test-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(20):
            writer.write(graph.feature_example(f"img{i}".encode(), i % 2, np.full(4, i / 20, np.float32)))
    path.write_bytes(path.read_bytes()[:-7])
    return path


def test_a_truncated_feature_shard_is_an_error_naming_it_in_every_stage_that_reads_features(tmp_path):
    """A review: evaluate, train_head and quality read features through a tf.data pipeline, whose DataLossError named
    neither the file nor what to do (the image records' reader did); each names the file now."""
    good = tmp_path / "train-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(str(good)) as writer:
        writer.write(graph.feature_example(b"img", 0, np.zeros(4, np.float32)))
    files = [str(good), str(truncated_feature_shard(tmp_path))]
    named = rf"{files[1]}: a damaged or truncated TFRecord .*re-run the stage that wrote it"
    with pytest.raises(ValueError, match=named):
        evaluate.predict_features(lambda x: x[:, :1], files, 4, 8)
    with pytest.raises(ValueError, match=named):
        train_head.check_labels(files, 2)
    with records.FeatureSpool(tmp_path / "spool", 4) as rows, pytest.raises(ValueError, match=named):
        quality.spool_split(files, 4, rows)
    with pytest.raises(tf.errors.InvalidArgumentError):  # errors other than damage pass through unchanged
        with record_checks.damaged_named(files):
            raise tf.errors.InvalidArgumentError(None, None, "not about the files")


def test_record_labels_outside_labels_json_are_refused(converted_tiny, tmp_path):
    files = records.split_files(converted_tiny / "records", "train")
    counts = record_checks.check_record_labels(files, 2, "finetune: the train records")
    summary = json.loads((converted_tiny / "summary.json").read_text())
    assert counts.tolist() == [summary["per_class"]["train"][name] for name in summary["labels"]]
    with pytest.raises(ValueError, match=r"finetune: the train records: labels \[1\] are outside the vocabulary of 1"):
        record_checks.check_record_labels(files, 1, "finetune: the train records")
    shutil.copy(truncated_feature_shard(tmp_path), tmp_path / "damaged.tfrecord")
    with pytest.raises(ValueError, match="damaged.tfrecord: a damaged or truncated TFRecord"):
        record_checks.check_record_labels([*files, str(tmp_path / "damaged.tfrecord")], 2, "x")


def test_scores_the_metrics_cannot_take_are_errors_naming_an_image(tmp_path):
    """A review: a NaN probability was read as class 0 and put NaN (not JSON) in metrics.json; a label below 0 was a
    right prediction in the confusion matrix and a wrong one in the accuracy, one past the end an IndexError."""
    ids = ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"2 test records have labels outside the 2 classes .*\(e\.g\. a: -1\)"):
        evaluate.check_scores("head", "test", (ids, np.array([-1, 0, 2]), np.full((3, 2), 0.5)), 2)
    nan = np.array([[0.5, 0.5], [np.nan, np.nan], [0.2, 0.8]])
    with pytest.raises(
        ValueError, match=r"the finetune model's probabilities are not finite for 1 val images \(e\.g\. b\)"
    ):
        evaluate.check_scores("finetune", "val", (ids, np.array([0, 1, 1]), nan), 2)
    evaluate.check_scores("head", "val", (ids, np.array([0, 1, 1]), np.full((3, 2), 0.5)), 2)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        evaluate.write_json(tmp_path / "metrics.json", {"loss": float("nan")})
