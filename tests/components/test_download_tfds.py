"""The tfds source: tfds's own mock data (with its real split slicing) and the offline error path."""

import time
from types import SimpleNamespace

import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from components import download as dl  # noqa: E402
from components import manifest as mf  # noqa: E402
from components.params import ParamsError  # noqa: E402
from pipelines import sources  # noqa: E402
from pipelines import split as splitting  # noqa: E402
from tests.conftest import encode, image_array  # noqa: E402

TRAIN_SIZE = 23_262  # cats_vs_dogs' real train split size, for absolute slicing
UNLABELLED: set[int] = set()  # indices the mock gives label -1 (as stl10's "unlabelled" split does)


def sliced_mock(self, split, decoders=None, read_config=None, **kwargs):
    """Replaces `_as_dataset`: distinct images per index, sliced by tfds's ReadInstruction."""
    instruction = tfds.core.ReadInstruction.from_spec(split) if isinstance(split, str) else split
    indices = [
        i
        for part in instruction.to_absolute({"train": SimpleNamespace(num_examples=TRAIN_SIZE)})
        for i in range(part.from_ or 0, TRAIN_SIZE if part.to is None else part.to)
    ]
    add_id = bool(read_config and read_config.add_tfds_id)

    def examples():
        for i in indices:
            example = {
                "image": encode(image_array(i, (200, 60, 40) if i % 2 else (40, 60, 200), size=(16, 16))),
                "image/filename": f"{i}.jpg",
                "label": -1 if i in UNLABELLED else i % 2,
            }
            if add_id:
                example["tfds_id"] = f"cats_vs_dogs-train.tfrecord-00000-of-00001__{i}"
            yield example

    signature = {
        "image": tf.TensorSpec([], tf.string),
        "image/filename": tf.TensorSpec([], tf.string),
        "label": tf.TensorSpec([], tf.int64),
    }
    if add_id:
        signature["tfds_id"] = tf.TensorSpec([], tf.string)
    return tf.data.Dataset.from_generator(examples, output_signature=signature)


def tfds_config(data_dir, splits, fractions=None) -> dl.Config:
    return dl.Config(
        common=dl.CommonParams(seed=5),
        dataset=dl.DatasetParams(
            source="tfds", dir=str(data_dir), tfds=dl.TfdsParams(name="cats_vs_dogs", splits=splits)
        ),
        download=dl.DownloadParams(fractions=fractions or dl.Fractions(train=0.5, val=0.25, test=0.25)),
    )


@pytest.mark.slow
def test_tfds_mock_data_with_the_seeds_slices(tmp_path):
    with tfds.testing.mock_data(as_dataset_fn=sliced_mock):
        summary = dl.run(tfds_config(tmp_path / "tfds", dl.TfdsParams().splits), tmp_path / "out")
    assert {s: summary["splits"][s]["total"] for s in mf.SPLITS} == {"train": 2000, "val": 1000, "test": 1000}
    assert summary["classes"] == ["cat", "dog"]  # names from tfds's ClassLabel
    manifest = mf.read_jsonl(tmp_path / "out" / mf.MANIFEST)
    val_sources = sorted(int(r["source"].rsplit("__", 1)[1]) for r in manifest if r["split"] == "val")
    assert val_sources == list(range(2000, 3000))
    assert manifest[0]["source"].startswith("tfds:cats_vs_dogs-train.tfrecord")


def test_tfds_single_slice_is_hash_split(tmp_path):
    with tfds.testing.mock_data(as_dataset_fn=sliced_mock):
        summary = dl.run(tfds_config(tmp_path / "tfds", "train[:40]"), tmp_path / "out")
    manifest = mf.read_jsonl(tmp_path / "out" / mf.MANIFEST)
    assert summary["kept"] == 40
    assert all(
        r["split"] == splitting.hash_split(r["pixels_sha256"], 5, dl.Fractions(train=0.5, val=0.25, test=0.25))
        for r in manifest
    )


def test_tfds_slices_given_as_splits_refuse_keep_together_and_write_nothing(tmp_path):
    config = tfds_config(tmp_path / "tfds", {"train": "train[:6]", "val": "train[6:9]", "test": "train[9:12]"})
    together = config.download.model_copy(update={"keep_together": [["a" * 20, "b" * 20]]})
    with tfds.testing.mock_data(as_dataset_fn=sliced_mock):
        with pytest.raises(ValueError, match=r"give dataset\.tfds\.splits one slice, which download\.fractions"):
            dl.run(dl.Config(config.common, config.dataset, together), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tfds_stock_mock_data_duplicates_are_reported(tmp_path):
    """tfds's stock mock yields the same examples for every slice: the copies are duplicates, which leaves val
    and test empty, and the stage says so (train_head failed on the empty val, stages later)."""
    config = tfds_config(tmp_path / "tfds", {"train": "train[:6]", "val": "train[6:12]", "test": "train[12:18]"})
    config = dl.Config(config.common, config.dataset, config.download.model_copy(update={"min_side": 1}))
    with tfds.testing.mock_data(num_examples=6):
        with pytest.raises(
            ValueError, match=r"no image in the val and test split \(12 quarantined: \{'duplicate': 12\}"
        ):
            dl.run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tfds_rejected_slice_names_the_key(tmp_path):
    with tfds.testing.mock_data(as_dataset_fn=sliced_mock):
        with pytest.raises(ParamsError, match=r"dataset\.tfds\.splits: tfds rejected"):
            list(
                sources.read_tfds(
                    str(tmp_path),
                    tfds_config(
                        tmp_path, {"train": "train[:4]", "val": "validation[oops", "test": "train[4:6]"}
                    ).dataset.tfds,
                )
            )


def test_tfds_unknown_name_and_keys(tmp_path):
    params = dl.DatasetParams(source="tfds", dir=str(tmp_path), tfds=dl.TfdsParams(name="no_such_dataset_xyz"))
    with pytest.raises(ParamsError, match=r"dataset\.tfds\.name: 'no_such_dataset_xyz' is not a registered"):
        list(sources.read_tfds(params.dir, params.tfds))
    params = dl.DatasetParams(source="tfds", dir=str(tmp_path), tfds=dl.TfdsParams(label_key="species"))
    with pytest.raises(ParamsError, match=r"dataset\.tfds\.label_key: 'species' is not a feature"):
        list(sources.read_tfds(params.dir, params.tfds))


def test_uncached_tfds_offline_fails_fast_with_instructions(tmp_path):
    params = dl.DatasetParams(source="tfds", dir=str(tmp_path / "empty"))
    started = time.monotonic()
    with pytest.raises(sources.OfflineError) as err:
        list(sources.read_tfds(params.dir, params.tfds, network_probe=lambda: False))
    assert time.monotonic() - started < 20
    message = str(err.value)
    assert "not prepared" in message and "dataset.source=folder" in message and "data_dir" in message


def test_network_probe_is_bounded(monkeypatch):
    import socket
    import threading

    hang = threading.Event()

    def never_answers(address, timeout=None):  # a connect that hangs past its own timeout; no network is touched
        hang.wait(30)
        raise OSError("gave up")

    monkeypatch.setattr(socket, "create_connection", never_answers)
    started = time.monotonic()
    assert sources.network_reachable(timeout=1.0) is False
    assert time.monotonic() - started < 3
    hang.set()


def test_network_probe_sees_a_listening_port():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:  # loopback only
        port = server.getsockname()[1]
        assert sources.network_reachable("127.0.0.1", port, timeout=2.0) is True
    assert sources.network_reachable("127.0.0.1", port, timeout=2.0) is False  # closed now


def test_unlabelled_tfds_examples_are_quarantined_not_given_the_last_class(tmp_path):
    UNLABELLED.update({3, 7, 11})
    try:
        with tfds.testing.mock_data(as_dataset_fn=sliced_mock):
            summary = dl.run(tfds_config(tmp_path / "tfds", "train[:40]"), tmp_path / "out")
    finally:
        UNLABELLED.clear()
    quarantine = mf.read_jsonl(tmp_path / "out" / dl.QUARANTINE)
    assert sorted(int(r["source"].rsplit("__", 1)[1]) for r in quarantine) == [3, 7, 11]
    assert {r["reason"] for r in quarantine} == {"no label (tfds label -1)"}
    assert summary["kept"] == 37 and summary["found"] == 40 and summary["reconciled"]
