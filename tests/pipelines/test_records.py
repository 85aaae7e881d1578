import concurrent.futures
import contextlib
import gc
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pipelines import records
from tests.conftest import open_files_under


def test_the_per_record_decoder_gives_the_input_pipelines_pixels_bit_for_bit(converted_tiny):
    files = records.split_files(converted_tiny / "records", "train")
    size = (40, 36)  # a resize in both directions from the 32x24 images
    pipeline = np.concatenate([batch.numpy() for batch, _ in records.image_dataset(files, size, 4, binary=False)])
    decode = records.record_decoder(size)
    one_by_one = np.stack([decode(record)[2] for record in tf.data.TFRecordDataset(files).as_numpy_iterator()])
    assert one_by_one.shape == pipeline.shape == (len(pipeline), 40, 36, 3) and len(pipeline) > 5
    assert one_by_one.dtype == np.float32 and one_by_one.std() > 1.0  # real pixels, not a constant
    np.testing.assert_array_equal(one_by_one, pipeline)


def test_decoded_batches_are_the_records_in_order_or_the_chosen_ones(converted_tiny):
    import concurrent.futures

    files = records.split_files(converted_tiny / "records", "train")
    size = (32, 32)
    expected = list(records.image_dataset(files, size, 100, binary=False, with_ids=True))
    (pixels, labels, ids) = (t.numpy() for t in expected[0])
    decode = records.record_decoder(size)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        batches = list(records.decoded_batches(files, decode, 3, pool, ahead=1))
        assert [len(b[0]) for b in batches] == [3] * (len(ids) // 3) + ([len(ids) % 3] if len(ids) % 3 else [])
        np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), pixels)
        np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), labels)
        assert [i for b in batches for i in b[0]] == list(ids)
        chosen = [1, 4, len(ids) - 1]
        (only,) = records.decoded_batches(files, decode, 8, pool, only=chosen)
        assert only[0] == [ids[i] for i in chosen]
        np.testing.assert_array_equal(only[2], pixels[chosen])


def epoch_ids(ds) -> list[bytes]:
    return [i for _, _, ids in ds for i in ids.numpy()]


def test_every_epoch_is_a_new_seeded_permutation_of_all_the_records(converted_tiny):
    files = records.split_files(converted_tiny / "records", "train")
    files_order = epoch_ids(records.image_dataset(files, (8, 8), 3, binary=False, with_ids=True))
    ds = records.image_dataset(files, (8, 8), 3, binary=False, shuffle_seed=5, with_ids=True)
    first, second = epoch_ids(ds), epoch_ids(ds)
    assert len(files_order) > 5 and len(set(files_order)) == len(files_order)
    assert sorted(first) == sorted(second) == sorted(files_order)  # every record once an epoch
    assert len({tuple(first), tuple(second), tuple(files_order)}) == 3  # reshuffled every epoch
    again = records.image_dataset(files, (8, 8), 3, binary=False, shuffle_seed=5, with_ids=True)
    assert (epoch_ids(again), epoch_ids(again)) == (first, second)  # the seed decides the order
    other = records.image_dataset(files, (8, 8), 3, binary=False, shuffle_seed=6, with_ids=True)
    assert epoch_ids(other) != first


def test_the_cache_changes_neither_the_elements_nor_their_order(converted_tiny, tmp_path):
    files = records.split_files(converted_tiny / "records", "train")
    size = (20, 12)

    def epochs(cache) -> list:
        ds = records.image_dataset(files, size, 4, binary=True, shuffle_seed=3, cache=cache, with_ids=True)
        return [[t.numpy() for t in batch] for _ in range(2) for batch in ds]

    expected = epochs(False)
    for cache in (True, str(tmp_path / "pixels")):
        got = epochs(cache)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
    assert expected[0][0].dtype == np.float32 and expected[0][1].dtype == np.float32  # binary: float labels
    count = len(epoch_ids(records.image_dataset(files, size, 4, binary=False, with_ids=True)))
    assert (tmp_path / "pixels").stat().st_size == count * 20 * 12 * 3 * 4  # the pixels are in the file


def test_the_record_reader_gives_tensorflows_records_and_refuses_damaged_files(converted_tiny, tmp_path):
    files = records.split_files(converted_tiny / "records", "train")
    reader = records.RecordReader(files)
    expected = list(tf.data.TFRecordDataset(files).as_numpy_iterator())
    assert [reader.read(n) for n in range(len(reader))] == expected and len(expected) > 5
    in_order = [list(batch) for batch in records.serialized_batches(files, 4).as_numpy_iterator()]
    assert [len(b) for b in in_order][:-1] == [4] * (len(in_order) - 1) and sum(in_order, []) == expected
    shuffled = records.serialized_batches(files, 4, shuffle_seed=1)
    first, second = (sum((list(b) for b in shuffled.as_numpy_iterator()), []) for _ in range(2))
    assert sorted(first) == sorted(second) == sorted(expected) and len({tuple(first), tuple(second)}) == 2
    data = bytearray(Path(files[0]).read_bytes())
    damaged = tmp_path / "flipped.tfrecord"
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="flipped.tfrecord: a damaged"):
        records.RecordReader([str(damaged)])
    short = tmp_path / "short.tfrecord"
    short.write_bytes(Path(files[0]).read_bytes()[:-3])
    with pytest.raises(ValueError, match="short.tfrecord: a damaged or truncated TFRecord"):
        records.RecordReader([str(short)])
    # A review: finetune's default path (the decoded-image cache, in memory or in a file), extract's and evaluate's
    # decode read without the reader and stopped on TensorFlow's DataLossError, naming neither the file nor what to do.
    pool = concurrent.futures.ThreadPoolExecutor(2)
    for bad in (damaged, short):
        with pytest.raises(ValueError, match=rf"{bad.name}: a damaged or truncated TFRecord \(\w+ record at \d+"):
            list(records.decoded_batches([files[1], str(bad)], records.record_decoder((20, 12)), 4, pool))
        for cache in (True, str(tmp_path / "pixels")):
            with pytest.raises(ValueError, match=rf"{bad.name}: a damaged or truncated TFRecord"):
                records.image_dataset([str(bad)], (20, 12), 4, binary=False, cache=cache)
    pool.shutdown()


def test_resources_close_the_files_and_free_the_pixels_when_they_exit(converted_tiny, tmp_path):
    records_dir = converted_tiny / "records"
    files = records.split_files(records_dir, "train")
    # Why the datasets take `resources`: a reader captured by tf.numpy_function outlives its dataset
    # (TensorFlow keeps the Python function on the eager default graph), so its files stay open.
    for _ in records.serialized_batches(files, 4):
        pass
    gc.collect()
    assert open_files_under(records_dir)  # held although nothing refers to the dataset any more
    held = len(open_files_under(records_dir, tmp_path))

    with contextlib.ExitStack() as opened:
        datasets = [
            records.image_dataset(files, (8, 8), 4, binary=False, resources=opened),
            records.image_dataset(files, (8, 8), 4, binary=False, cache=True, resources=opened),
            records.image_dataset(files, (8, 8), 4, binary=False, cache=tmp_path / "pixels", resources=opened),
            records.serialized_batches(files, 4, shuffle_seed=2, resources=opened),
        ]
        for ds in datasets:
            for _ in ds:
                pass
        assert len(open_files_under(records_dir, tmp_path)) > held
        (tmp_path / "pixels").unlink()  # as finetune removes its cache folder: the open file keeps its disk
        assert any(path.endswith("(deleted)") for path in open_files_under(tmp_path))
    assert len(open_files_under(records_dir, tmp_path)) == held  # every one of them closed, the cache's disk freed
    for ds in datasets:
        with pytest.raises(tf.errors.OpError, match="closed"):
            next(iter(ds))  # a clear error, never a read of whatever file took a closed descriptor's number


def test_a_close_waits_for_reads_in_flight_and_later_reads_are_clear_errors(tmp_path):
    spool = records.FeatureSpool(tmp_path / "rows", 4)
    spool.append(np.arange(8, dtype=np.float32).reshape(2, 4))
    guard = spool._closing
    reading, release, closed = threading.Event(), threading.Event(), threading.Event()
    got = []

    def slow_read():
        with guard.reading():  # a dataset's prefetch thread, between taking the descriptor and its pread
            reading.set()
            release.wait(10)
            got.append(np.frombuffer(os.pread(spool._fd, 16, 16), np.float32))  # still this file's bytes

    reader = threading.Thread(target=slow_read)
    reader.start()
    reading.wait(10)
    closer = threading.Thread(target=lambda: (spool.close(), closed.set()))
    closer.start()
    assert not closed.wait(0.3) and open_files_under(tmp_path)  # the close waits: the file stays open
    release.set()
    reader.join(10)
    assert closed.wait(10) and open_files_under(tmp_path) == []
    np.testing.assert_array_equal(got[0], [4, 5, 6, 7])
    closer.join(10)
    for read in (lambda: spool[0:1], lambda: spool[[0]], lambda: spool.append(np.zeros((1, 4)))):
        with pytest.raises(ValueError, match="the feature spool .* is closed"):
            read()
    spool.close()  # idempotent
    with records.FeatureSpool(tmp_path / "other", 4) as other:
        other.append(np.ones((1, 4)))
    with pytest.raises(ValueError, match="is closed"):
        other[0:1]
