import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from pipelines import image  # noqa: E402
from tests.conftest import encode, image_array  # noqa: E402


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP"])
def test_decode_and_resize_any_format(fmt):
    source = image_array(3, size=(24, 32))
    out = image.decode_and_resize(tf.constant(encode(source, fmt)), (16, 16)).numpy()
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 255.0
    if fmt in ("PNG", "BMP"):  # lossless: the mean colour survives the resize
        np.testing.assert_allclose(out.mean(axis=(0, 1)), source.mean(axis=(0, 1)), atol=2.0)


def test_grayscale_becomes_three_channels():
    gray = encode(image_array(4), "PNG", mode="L")
    out = image.decode_and_resize(tf.constant(gray), (8, 8)).numpy()
    np.testing.assert_allclose(out[..., 0], out[..., 1])


def test_batch_matches_single():
    blobs = [encode(image_array(s, size=(20 + s, 30))) for s in range(3)]
    batch = image.decode_and_resize_batch(tf.constant(blobs), (12, 12)).numpy()
    assert batch.shape == (3, 12, 12, 3)
    np.testing.assert_allclose(batch[1], image.decode_and_resize(tf.constant(blobs[1]), (12, 12)).numpy())


def test_undecodable_bytes_raise():
    with pytest.raises(tf.errors.InvalidArgumentError):
        image.decode_and_resize(tf.constant(b"not an image"), (8, 8))


@pytest.mark.parametrize("lossless", [False, True])
def test_an_animated_webp_fails_with_a_message_not_a_crash(lossless):
    from tests.components.test_download import animated_webp

    with pytest.raises(tf.errors.InvalidArgumentError, match="animated WebP"):
        image.decode_image(tf.constant(animated_webp(lossless)))


def test_shrinking_averages_the_covered_pixels_and_enlarging_interpolates():
    source = np.random.default_rng(0).integers(0, 256, (9, 12, 3), dtype=np.uint8)
    shrunk = image.resize(tf.constant(source), (3, 4)).numpy()  # each output pixel covers a 3x3 block
    blocks = source.astype(np.float64).reshape(3, 3, 4, 3, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(shrunk, blocks, rtol=1e-5)
    taller = image.resize(tf.constant(source), (18, 4)).numpy()  # enlarged on one side: not a shrink
    assert taller.shape == (18, 4, 3) and taller.dtype == np.float32 and 0.0 <= taller.min() and taller.max() <= 255.0
    np.testing.assert_array_equal(image.resize(tf.constant(source), (9, 12)).numpy(), source.astype(np.float32))
