"""export's own check: the SavedModel it writes must compute what the Keras model computes, or the stage fails."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from components import export
from pipelines import serving
from tests.conftest import encode, image_array

SIZE = (16, 16)


def tiny_model(seed: int) -> keras.Model:
    inputs = keras.Input((*SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(
        2, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(0, 3.0, seed=seed)
    )(x)
    return keras.Model(inputs, outputs)


def test_a_serving_model_that_disagrees_with_keras_fails_the_check(tmp_path):
    """Only the passing side was tested (evaluate's outputs): a check that always passed would have gone unseen."""
    model = tiny_model(1)
    serving.export(model, ["cats", "dogs"], SIZE, tmp_path / "serving")
    blobs = [encode(image_array(seed, size=SIZE)) for seed in range(4)]
    pixels = [tf.cast(tf.io.decode_jpeg(b, channels=3), tf.float32).numpy() for b in blobs]
    samples = list(zip(blobs, pixels))
    gap = export.check_serving(tmp_path / "serving", model, samples, ["cats", "dogs"])
    assert gap <= 1e-4
    with pytest.raises(RuntimeError, match="disagrees with the Keras model"):
        export.check_serving(tmp_path / "serving", tiny_model(2), samples, ["cats", "dogs"])  # other weights
    with pytest.raises(RuntimeError, match="disagrees with the Keras model"):
        export.check_serving(tmp_path / "serving", model, samples, ["dogs", "cats"])  # other class names
    assert np.isfinite(gap)
    # a serving model that outputs NaN (one bias NaN: a diverged model) made the gap NaN, which `gap > 1e-4` let
    # through, the stage logging "agrees (max gap nan)" (found by a review on 2026-12-06)
    broken = tiny_model(1)
    kernel, bias = broken.layers[-1].get_weights()
    broken.layers[-1].set_weights([kernel, np.array([np.nan, 0.0], np.float32)])
    serving.export(broken, ["cats", "dogs"], SIZE, tmp_path / "nan")
    with pytest.raises(RuntimeError, match="disagrees with the Keras model"):
        export.check_serving(tmp_path / "nan", model, samples, ["cats", "dogs"])


def test_the_lineage_names_the_runtimes_that_computed_the_features_and_scored_the_models(tmp_path):
    """`extract_runtime` and `evaluate_runtime` fall back on tensorflow where an older record lacks them: a lineage
    that always wrote tensorflow passed every test, as the tests ran on TensorFlow."""
    for name in ("manifest.jsonl", "model.keras", "head.keras"):
        (tmp_path / name).write_bytes(name.encode())
    scored = {"val": {"accuracy": 0.9}, "test": {"accuracy": 0.8}}
    metrics = {"head": {**scored, "runtime": "openvino"}, "finetune": {**scored, "runtime": "tensorflow"}}
    record = export.lineage_record(
        tmp_path / "manifest.jsonl",
        [{"split": "train", "label": "a"}, {"split": "test", "label": "b"}],
        tmp_path / "model.keras",
        tmp_path / "head.keras",
        {"conv_base": {"name": "b"}, "runtime": "openvino"},
        ["a", "b"],
        metrics,
    )
    assert record["extract_runtime"] == "openvino"
    assert record["evaluate_runtime"] == {"head": "openvino", "finetune": "tensorflow"}
    older = export.lineage_record(
        tmp_path / "manifest.jsonl", [], tmp_path / "model.keras", tmp_path / "head.keras", {"conv_base": {}}, [], {}
    )
    assert older["extract_runtime"] == "tensorflow" and older["evaluate_runtime"] == {}


def bmp_of(pixels: np.ndarray, mode: str) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="BMP")
    return buffer.getvalue()


def test_the_serving_model_refuses_the_bmps_and_gifs_download_quarantines_by_their_headers(tmp_path):
    """Found by a review on 2026-12-06: an RLE8 BMP whose compressed data is as long as its pixels was served (its
    compressed bytes read as palette indices: garbage pixels, a confident prediction), and so was a GIF80a file;
    download quarantines both. 1-, 4- and 16-bit BMPs and OS/2 1.x ones got TensorFlow's internal error, with no
    batch index. What download keeps, the serving model serves; what it quarantines by its header, refused."""
    import struct

    from pipelines import normalise
    from tests.conftest import bmp_file
    from tests.pipelines.test_image import gif_of

    pixels = image_array(5, size=(20, 24))
    palette = bmp_of(pixels, "P")
    rows = [row[:, ::-1].tobytes() for row in pixels[::-1]]  # BGR, bottom row first
    opaque = np.full((24, 1), 255, np.uint8)
    bgra = [np.hstack([row[:, ::-1], opaque]).tobytes() for row in pixels[::-1]]
    os2 = struct.pack("<IHHHH", 12, 24, 20, 1, 24)
    os2_file = b"BM" + struct.pack("<IHHI", 26 + 20 * 72, 0, 0, 26) + os2 + b"".join(rows)
    gif = gif_of([pixels])
    files = {
        "8-bit": (palette, True),
        "24-bit": (bmp_of(pixels, "RGB"), True),
        "32-bit bit fields": (bmp_file(bgra, 24, 20, 32, 124, (0xFF0000, 0xFF00, 0xFF, 0xFF000000)), True),
        "GIF89a": (gif, True),
        "GIF87a": (b"GIF87a" + gif[6:], True),
        "1-bit": (bmp_of(pixels, "1"), False),
        "16-bit": (bmp_file([bytes(48) for _ in range(20)], 24, 20, 16), False),
        "RLE8": (palette[:30] + (1).to_bytes(4, "little") + palette[34:], False),
        "RLE4": (palette[:30] + (2).to_bytes(4, "little") + palette[34:], False),
        "OS/2 1.x": (os2_file, False),
        "GIF80a": (b"GIF80a" + gif[6:], False),
        # a second review (2026-12-07): 24-bit bit fields in another order than B, G, R were served with red and blue
        # swapped (the shared decode reads them as BI_RGB), and 8-bit ones as a palette image
        "24-bit bit fields B, G, R": (bmp_file(rows, 24, 20, 24, 40, (0xFF0000, 0xFF00, 0xFF)), True),
        "24-bit bit fields R, G, B": (bmp_file(rows, 24, 20, 24, 40, (0xFF, 0xFF00, 0xFF0000)), False),
        "8-bit bit fields": (palette[:30] + (3).to_bytes(4, "little") + palette[34:], False),
    }
    limits = dict(min_side=16, max_pixels=89_478_485, decode=normalise.make_decoder())
    for name, (data, kept) in files.items():
        assert isinstance(normalise.normalise_image(data, **limits), normalise.Normalised) == kept, name
    serving.export(tiny_model(1), ["cats", "dogs"], SIZE, tmp_path / "serving")
    serve = tf.saved_model.load(str(tmp_path / "serving")).signatures[serving.SIGNATURE]
    good = encode(image_array(1, size=(30, 30)))
    for name, (data, kept) in files.items():
        if kept:
            assert serve(images=tf.constant([good, data]))["probabilities"].shape == (2, 2), name
        else:
            with pytest.raises(tf.errors.InvalidArgumentError, match=r"serving: images the model cannot read.*\[1\]"):
                serve(images=tf.constant([good, data]))
    refused = serving.unreadable_headers(tf.constant([data for data, _ in files.values()])).numpy()
    assert refused.tolist() == [not kept for _, kept in files.values()]


def test_the_serving_model_refuses_a_decompression_bomb_before_decoding_it(tmp_path):
    """Found by a review on 2026-12-06: the serving model decoded whatever a client sent (download refuses such files
    with Pillow's limit; the serving model had none): the shared decode of a 409 KB PNG of 12,000 x 12,000 black
    pixels took 5.5 GB of memory and 8.4 s here, and a PNG of a few hundred bytes can declare 100,000 x 70,000. It
    now reads each header first (`image_header.declared_pixels`) and names the batch indices."""
    from tests.pipelines.test_image import bare_webp, gif_of, png_chunk_first, png_declaring

    model = tiny_model(1)
    serving.export(model, ["cats", "dogs"], SIZE, tmp_path / "default")  # export.max_pixels's default: Pillow's
    serve = tf.saved_model.load(str(tmp_path / "default")).signatures[serving.SIGNATURE]
    good = encode(image_array(1, size=(30, 30)))
    assert serve(images=tf.constant([good, good]))["probabilities"].shape == (2, 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"more than max_pixels=89478485 .*indices.*\[1\]"):
        serve(images=tf.constant([good, png_declaring(100_000, 70_000)]))
    # a size that cannot be read before decoding (-1): a chunk before IHDR, a WebP bitstream without its chunk header
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"indices.*\[1 2\].*declaring.*\[-1 -1\]"):
        serve(images=tf.constant([good, png_chunk_first(), bare_webp()]))
    # a tighter limit, as export.max_pixels sets it: a GIF counts every frame (its decode allocates them all)
    serving.export(model, ["cats", "dogs"], SIZE, tmp_path / "tight", max_pixels=1000)
    serve = tf.saved_model.load(str(tmp_path / "tight")).signatures[serving.SIGNATURE]
    one_frame = gif_of([image_array(2, size=(20, 20))])
    three_frames = gif_of([image_array(s, size=(20, 20)) for s in range(3)])
    assert serve(images=tf.constant([good, one_frame]))["probabilities"].shape == (2, 2)  # 900 and 400 pixels
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"indices.*\[0 2\].*declaring.*\[1600 1200\]"):
        serve(images=tf.constant([encode(image_array(3, size=(40, 40))), good, three_frames]))
    with pytest.raises(ValueError, match="max_pixels"):
        serving.export(model, ["cats", "dogs"], SIZE, tmp_path / "none", max_pixels=0)
    with pytest.raises(Exception, match="max_pixels"):
        export.ExportParams(max_pixels=10**12)  # above Pillow's own hard limit, which download's is bounded by too
