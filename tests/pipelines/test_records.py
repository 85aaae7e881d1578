import numpy as np
import tensorflow as tf

from pipelines import records


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


def test_the_shuffle_buffer_bounds_how_far_an_image_moves(converted_tiny):
    files = records.split_files(converted_tiny / "records", "train")

    def order(buffer: int) -> list[bytes]:
        ds = records.image_dataset(
            files, (8, 8), 100, binary=False, shuffle_seed=5, shuffle_buffer=buffer, with_ids=True
        )
        return list(next(iter(ds))[2].numpy())

    files_order = list(next(iter(records.image_dataset(files, (8, 8), 100, binary=False, with_ids=True)))[2].numpy())
    assert order(1) == files_order  # a buffer of one cannot shuffle
    assert sorted(order(4096)) == sorted(files_order) and order(4096) != files_order
