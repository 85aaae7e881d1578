"""Training and serving see the same pixels for the same file, for every kind of file download keeps.

Each kind goes through both paths: download + convert + the records' decode (what
extraction, training and evaluation read), and the serving SavedModel's decode of
the client's raw file. Pixels must be equal, and so must a classifier's
probabilities from the exported SavedModel and from Keras on the training pixels.
The upright / composited pixels are also checked against values computed here
without the shared decode, so a decode that is consistently wrong fails too.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from components import convert  # noqa: E402
from components import download as dl  # noqa: E402
from components import manifest as mf  # noqa: E402
from pipelines import image, records, serving  # noqa: E402
from tests.components.test_download import BGRA_MASKS, LOW_PALETTE  # noqa: E402
from tests.conftest import bmp_file, image_array, low_depth_png, make_class_folder  # noqa: E402

SIZE = (24, 20)  # not square: a height/width swap in one path fails; smaller, larger and mixed resizes
# PIL's transpose that shows a file with this EXIF orientation upright, and so its inverse stores it.
TO_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
INVERSE = {2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def upright_array(seed: int) -> np.ndarray:
    """A 20 x 36 image with a bright top-left corner, so every orientation is told apart."""
    pixels = image_array(seed, (120, 120, 120), (20, 36))
    pixels[:6, :6] = (250, 250, 30)
    return pixels


def rotated_jpeg(orientation: int, seed: int) -> bytes:
    """A JPEG stored as a phone stores it: pixels turned, with the tag that turns them back."""
    stored = Image.fromarray(upright_array(seed)).transpose(TO_UPRIGHT[INVERSE[orientation]])
    exif = stored.getexif()
    exif[0x0112] = orientation
    return save(stored, "JPEG", quality=98, subsampling=0, exif=exif.tobytes())


def rotated(orientation: int, seed: int, fmt: str, **kwargs) -> bytes:
    """A PNG (eXIf chunk) or WebP (EXIF chunk) stored turned, with the EXIF tag that turns it back."""
    stored = Image.fromarray(upright_array(seed)).transpose(TO_UPRIGHT[INVERSE[orientation]])
    exif = stored.getexif()
    exif[0x0112] = orientation
    return save(stored, fmt, exif=exif.tobytes(), **kwargs)


def kinds() -> dict[str, tuple[bytes, np.ndarray | None]]:
    """file name -> (bytes, the upright RGB pixels expected, or None where a lossy format leaves none exact)."""
    rng = np.random.default_rng(7)
    files = {f"exif_{o}.jpg": (rotated_jpeg(o, 40 + o), upright_array(40 + o)) for o in range(2, 9)}
    files["exif_6.png"] = (rotated(6, 50, "PNG"), upright_array(50))
    files["exif_8.webp"] = (rotated(8, 51, "WEBP", lossless=True), upright_array(51))
    large = image_array(52, (70, 140, 210), (40, 48))  # larger than SIZE on both sides: the shrinking resize
    files["large.png"] = (save(Image.fromarray(large), "PNG"), large)
    rgba = np.dstack([image_array(60, (200, 80, 40), (20, 28)), rng.integers(0, 256, (20, 28), dtype=np.uint8)])
    alpha = rgba[..., 3:].astype(np.int64)
    files["alpha.png"] = (
        save(Image.fromarray(rgba), "PNG"),
        ((rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8),
    )
    indices = rng.integers(0, 4, (20, 28), dtype=np.uint8)
    colours = np.array([[0, 0, 0], [200, 30, 30], [30, 200, 30], [30, 30, 200]], np.int64)
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette(colours.ravel().tolist())
    alphas = np.array([0, 128, 255, 255], np.int64)[indices][..., None]
    files["palette_trns.png"] = (
        save(palette, "PNG", transparency=bytes([0, 128])),
        ((colours[indices] * alphas + 255 * (255 - alphas) + 127) // 255).astype(np.uint8),
    )
    samples = rng.integers(0, 16, (20, 28))  # 4 bits a sample: TensorFlow once decoded these nearly white
    files["palette_4bit.png"] = (low_depth_png(samples, 4, palette=LOW_PALETTE), LOW_PALETTE[samples])
    bits = rng.integers(0, 2, (20, 28))
    files["gray_1bit.png"] = (low_depth_png(bits, 1), np.repeat((bits * 255).astype(np.uint8)[..., None], 3, axis=2))
    gray = image_array(61, (100, 100, 100), (20, 28))[..., 0]
    files["gray.png"] = (save(Image.fromarray(gray, mode="L"), "PNG"), np.repeat(gray[..., None], 3, axis=2))
    files["gray.jpg"] = (save(Image.fromarray(gray, mode="L"), "JPEG", quality=95), None)
    files["cmyk.jpg"] = (
        save(Image.fromarray(image_array(62, (60, 160, 90), (20, 28))).convert("CMYK"), "JPEG", quality=95),
        None,
    )
    sixteen = (rng.integers(0, 65536, (20, 28))).astype(np.uint16)
    files["sixteen.png"] = (
        save(Image.fromarray(sixteen), "PNG"),
        np.repeat((sixteen >> 8).astype(np.uint8)[..., None], 3, axis=2),
    )
    frames = [Image.fromarray(image_array(63 + k, (90, 200, 120), (20, 28))) for k in range(3)]
    files["animated.gif"] = (save(frames[0], "GIF", save_all=True, append_images=frames[1:]), None)
    rgba_webp = np.dstack([image_array(65, (20, 160, 90), (20, 28)), rng.integers(0, 256, (20, 28), dtype=np.uint8)])
    alpha_webp = rgba_webp[..., 3:].astype(np.int64)
    files["alpha_lossless.webp"] = (  # VP8L
        save(Image.fromarray(rgba_webp), "WEBP", lossless=True),
        ((rgba_webp[..., :3] * alpha_webp + 255 * (255 - alpha_webp) + 127) // 255).astype(np.uint8),
    )
    files["alpha_lossy.webp"] = (save(Image.fromarray(rgba_webp), "WEBP", quality=90), None)  # VP8X + ALPH
    files["lossy.webp"] = (save(Image.fromarray(image_array(64, (40, 120, 220), (20, 28))), "WEBP", quality=90), None)
    palette_bmp = Image.fromarray(image_array(67, (200, 60, 120), (20, 28))).convert("P")
    files["palette.bmp"] = (save(palette_bmp, "BMP"), np.asarray(palette_bmp.convert("RGB")))
    rgba_bmp = np.dstack([image_array(68, (90, 30, 200), (20, 28)), rng.integers(0, 256, (20, 28), dtype=np.uint8)])
    alpha_bmp = rgba_bmp[..., 3:].astype(np.int64)
    files["alpha_v5.bmp"] = (  # 32 bits with an alpha mask, 2 bytes after the pixels
        bmp_file([row[:, [2, 1, 0, 3]].tobytes() for row in rgba_bmp[::-1]], 28, 20, 32, 124, BGRA_MASKS) + bytes(2),
        ((rgba_bmp[..., :3] * alpha_bmp + 255 * (255 - alpha_bmp) + 127) // 255).astype(np.uint8),
    )
    files["plain.bmp"] = (
        save(Image.fromarray(image_array(66, (30, 90, 210), (20, 28))), "BMP"),
        image_array(66, (30, 90, 210), (20, 28)),
    )
    return files


@pytest.fixture(scope="module")
def both_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    source = make_class_folder(root / "src", per_class=4)
    expected = {}
    for name, (data, pixels) in kinds().items():
        (source / "cats" / name).write_bytes(data)
        expected[f"cats/{name}"] = pixels
    config = dl.Config(
        dl.CommonParams(seed=5),
        dl.DatasetParams(source="folder", dir=str(source)),
        dl.DownloadParams(fractions=dl.Fractions(train=0.6, val=0.2, test=0.2)),
    )
    summary = dl.run(config, root / "download")
    convert.run(
        convert.Config(convert.ConvertParams(shards=convert.Shards(train=1, val=1, test=1))),
        root / "download",
        root / "convert",
    )
    manifest = {row["source"]: row for row in mf.read_jsonl(root / "download" / mf.MANIFEST)}
    trained = {}
    for split in mf.SPLITS:
        for serialized in tf.data.TFRecordDataset(records.split_files(root / "convert" / "records", split)):
            record_id, _, pixels = records.parse_image_record(serialized, SIZE)
            trained[record_id.numpy().decode()] = pixels.numpy()
    return source, summary, manifest, trained, expected


def test_every_kind_is_kept(both_paths):
    source, summary, manifest, _, expected = both_paths
    assert summary["quarantined"] == 0, summary["quarantine_reasons"]
    assert set(expected) <= set(manifest)
    assert "EXIF orientation 6 applied" in manifest["cats/exif_6.jpg"]["normalised"]
    assert "EXIF orientation 6 applied" in manifest["cats/exif_6.png"]["normalised"]
    assert "EXIF orientation 8 applied" in manifest["cats/exif_8.webp"]["normalised"]
    assert "onto white" in manifest["cats/palette_trns.png"]["normalised"]


def test_serving_decode_gives_the_pixels_training_saw(both_paths):
    source, _, manifest, trained, _ = both_paths
    assert len(trained) == len(manifest)
    for name, row in manifest.items():
        served = image.decode_and_resize(tf.constant((source / name).read_bytes()), SIZE).numpy()
        np.testing.assert_array_equal(served, trained[row["id"]], err_msg=name)


def test_the_shared_decode_is_right_not_only_consistent(both_paths):
    source, _, _, _, expected = both_paths
    for name, pixels in expected.items():
        decoded = image.decode_image(tf.constant((source / name).read_bytes())).numpy()
        if pixels is None:
            continue
        assert decoded.shape == pixels.shape, name
        gap = np.abs(decoded.astype(int) - pixels.astype(int))
        if name.endswith(".jpg"):  # lossy: close everywhere, and the bright corner is where it should be
            assert gap.mean() < 3 and decoded[:6, :6].mean(axis=(0, 1))[2] < 80, name
        else:
            assert gap.max() == 0, name


def test_serving_model_predicts_what_keras_predicts_on_the_training_pixels(both_paths, tmp_path):
    source, _, manifest, trained, _ = both_paths
    keras.utils.set_random_seed(3)
    inputs = keras.Input((*SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu", kernel_initializer=keras.initializers.RandomNormal(0, 1, seed=1))(
        x
    )
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(
        2, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(0, 0.1, seed=2)
    )(x)
    model = keras.Model(inputs, outputs)
    serving.export(model, ["cats", "dogs"], SIZE, tmp_path / "serving")
    served = tf.saved_model.load(str(tmp_path / "serving")).signatures[serving.SIGNATURE]
    names = sorted(manifest)
    result = served(images=tf.constant([(source / n).read_bytes() for n in names]))["probabilities"].numpy()
    expected = model.predict_on_batch(np.stack([trained[manifest[n]["id"]] for n in names]))
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
    assert np.ptp(expected[:, 0]) > 0.05  # the probabilities tell images apart, so a wrong pixel would show
    from tests.components.test_download import animated_webp

    with pytest.raises(tf.errors.InvalidArgumentError, match="animated WebP"):  # an error, not a dead server
        served(images=tf.constant([animated_webp(lossless=True)]))
