import numpy as np
import tensorflow as tf

from pipelines import records


def test_the_per_record_decoder_gives_the_input_pipelines_pixels_bit_for_bit(converted_tiny):
    files = records.split_files(converted_tiny / "records", "train")
    size = (40, 36)  # a resize in both directions from the 32x24 images
    pipeline = np.concatenate([batch.numpy() for batch, _ in records.image_dataset(files, size, 4, binary=False)])
    decode = records.record_decoder(size)
    one_by_one = np.stack([decode(serialized) for serialized in tf.data.TFRecordDataset(files).as_numpy_iterator()])
    assert one_by_one.shape == pipeline.shape == (len(pipeline), 40, 36, 3) and len(pipeline) > 5
    assert one_by_one.dtype == np.float32 and one_by_one.std() > 1.0  # real pixels, not a constant
    np.testing.assert_array_equal(one_by_one, pipeline)
