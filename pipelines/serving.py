"""The serving model: a TensorFlow SavedModel that takes a batch of encoded images.

Signature ``serving_default(images: tf.string [n])`` -> ``probabilities``
float32 [n, classes], ``classes`` string [n, classes] (the class names, in the
label vocabulary's order) and ``predicted`` string [n]. It decodes, normalises
(EXIF orientation, transparency onto white, the first frame) and resizes with
`pipelines.image.decode_and_resize`, the function download, extraction and
training used, so a client's file gives the pixels training saw for the same
file. Loading it needs plain TensorFlow only. With test-time augmentation (``tta.flip``,
``tta.quarter_turns``) it averages each image's probabilities over its mirror images and quarter
turns, as evaluate scored it.

A batch holding something that is not a JPEG, PNG, GIF, BMP or WebP (an empty
string, text, another format) fails with an error naming the batch indices; so
does one holding a file whose header download quarantines (`unreadable_headers`: a BMP of
another bit depth than 8, 24 or 32, compressed, with bit fields other than 32-bit or 24-bit B, G, R ones, or with an
OS/2 1.x header; a GIF other than GIF87a or GIF89a), and one whose header declares more pixels than ``max_pixels`` (a decompression
bomb: a few kilobytes of PNG can declare gigabytes of pixels), or whose size
cannot be read before decoding, before any pixel is decoded
(`pipelines.image_header.declared_pixels`). Of damaged data behind a right header, a JPEG or PNG cut short and a
PNG failing its checksum fail in TensorFlow's decoder; flipped bytes in a JPEG's entropy-coded data decode as other
pixels, in training (download keeps the file) and here alike.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipelines import image, image_header
from pipelines.normalise import DEFAULT_MAX_PIXELS

SIGNATURE = "serving_default"


def check_encoded(images: tf.Tensor) -> tf.Operation:
    """An assertion that every element starts like a file of a format `pipelines.image` reads."""
    known = image.format_index(images) >= 0
    bad = tf.reshape(tf.where(~known), [-1])
    return tf.debugging.Assert(
        tf.reduce_all(known),
        [
            f"serving: not a {', '.join(image.FORMATS)} image (empty, text, truncated header or another format) "
            "at batch indices",
            bad,
        ],
        summarize=32,
        name="check_encoded_images",
    )


def unreadable_header(blob: tf.Tensor) -> tf.Tensor:
    """Whether an encoded image's header is one the shared decode cannot read right, which download quarantines
    (`normalise.bmp_unsupported`, Pillow): a BMP whose info header is not a Windows one of 40 to 124 bytes (an OS/2
    1.x header's fields are not where TensorFlow reads them; Pillow knows no larger one) or with a bit depth other
    than 8, 24 or 32, or compressed (RLE: TensorFlow took the compressed bytes for palette indices and served the
    garbage), or with bit fields (compression 3) but at 32 bits or at 24 in B, G, R order (the masks Pillow reads
    there; the shared decode reads other 24-bit ones as B, G, R, red and blue swapped, and 8-bit ones as a palette
    image); a GIF other than GIF87a or GIF89a. Read with `pipelines.image`'s integer reader, 0 past the end."""
    buf = image._byte_buffer(blob)
    kind = image.format_index(blob)
    header = image._uint(buf, 14, 4, little=True)
    bits, compression = image._uint(buf, 28, 2, little=True), image._uint(buf, 30, 4, little=True)
    masks = [image._uint(buf, 54 + 4 * i, 4, little=True) for i in range(3)]  # after a 40-byte header, or in it
    bgr = tf.equal(masks[0], 0xFF0000) & tf.equal(masks[1], 0xFF00) & tf.equal(masks[2], 0xFF)
    bit_fields = tf.equal(bits, 32) | (tf.equal(bits, 24) & bgr)
    bmp = tf.equal(kind, image.FORMATS.index("BMP")) & (
        (header < 40)
        | (header > 124)
        | ~(tf.equal(bits, 8) | tf.equal(bits, 24) | tf.equal(bits, 32))
        | ~(tf.equal(compression, 0) | tf.equal(compression, 3))
        | (tf.equal(compression, 3) & ~bit_fields)
    )
    version = tf.strings.substr(buf, 0, 6)
    gif = tf.equal(kind, image.FORMATS.index("GIF")) & ~(tf.equal(version, b"GIF87a") | tf.equal(version, b"GIF89a"))
    return bmp | gif


def unreadable_headers(images: tf.Tensor) -> tf.Tensor:
    """[n] bool: `unreadable_header` of each image of a batch."""
    return tf.map_fn(unreadable_header, images, fn_output_signature=tf.bool)


def check_headers(images: tf.Tensor) -> tf.Operation:
    """An assertion that no image has a header the shared decode cannot read right (`unreadable_headers`)."""
    bad = unreadable_headers(images)
    return tf.debugging.Assert(
        ~tf.reduce_any(bad),
        [
            "serving: images the model cannot read (a BMP of another bit depth than 8, 24 or 32, compressed (RLE), "
            "with bit fields other than 32-bit or 24-bit B, G, R ones, or with an OS/2 1.x header, or a GIF other than "
            "GIF87a or GIF89a; re-save them as PNG) at batch indices",
            tf.reshape(tf.where(bad), [-1]),
        ],
        summarize=32,
        name="check_image_headers",
    )


def check_pixels(declared: tf.Tensor, max_pixels: int) -> tf.Operation:
    """An assertion that no image's header declares more than `max_pixels` pixels (`image_header.declared_pixels`), nor
    hides its size (-1)."""
    over = (declared > max_pixels) | (declared < 0)
    return tf.debugging.Assert(
        ~tf.reduce_any(over),
        [
            f"serving: images declaring more than max_pixels={max_pixels} pixels (export.max_pixels, a "
            f"decompression-bomb limit; -1: a size that cannot be read before decoding, a PNG whose first chunk is "
            f"not IHDR, a WebP without a VP8, VP8L or VP8X chunk or a GIF of more than {image_header.GIF_MAX_STEPS} "
            "blocks) at batch indices",
            tf.reshape(tf.where(over), [-1]),
            "declaring",
            tf.boolean_mask(declared, over),
        ],
        summarize=32,
        name="check_declared_pixels",
    )


def check_classes(model, names: list[str], stage: str) -> None:
    """The model's outputs are the label vocabulary's classes: one sigmoid unit for two, one unit a class for
    more. Otherwise its probabilities would be named after other classes (evaluate scored a one-unit model against
    three names as a binary one), so `stage` stops before any work."""
    units = int(model.output_shape[-1])
    expected = 1 if len(names) == 2 else len(names)
    if len(names) < 2 or units != expected or len(set(names)) != len(names):
        raise ValueError(
            f"{stage}: the model has {units} output unit(s), but labels.json names {len(names)} classes {names} "
            f"(expected {expected} unit(s) and distinct names): the model was trained on another convert output; "
            f"re-run `dvc repro` so the models and {stage} read the same data/convert"
        )


def probabilities_of(outputs: tf.Tensor) -> tf.Tensor:
    """Model outputs -> [n, classes] probabilities (a sigmoid's p becomes [1 - p, p])."""
    if outputs.shape[-1] == 1:
        return tf.concat([1.0 - outputs, outputs], axis=-1)
    return outputs


def mirrored(pixels):
    """[n, h, w, c] images flipped left to right (NumPy or TensorFlow)."""
    return pixels[:, :, ::-1, :]


def upside_down(pixels):
    """[n, h, w, c] images flipped top to bottom (NumPy or TensorFlow)."""
    return pixels[:, ::-1, :, :]


def quarter_turned(pixels):
    """[n, h, w, c] images turned a quarter counter-clockwise (NumPy or TensorFlow; square images)."""
    if isinstance(pixels, np.ndarray):
        return np.ascontiguousarray(np.transpose(pixels, (0, 2, 1, 3))[:, ::-1, :, :])
    return tf.transpose(pixels, [0, 2, 1, 3])[:, ::-1, :, :]


# tta.flip -> the mirror images it adds to the image itself (both: left-right, top-bottom and both, the half turn)
FLIP_VIEWS = {
    "none": (),
    "horizontal": (mirrored,),
    "vertical": (upside_down,),
    "both": (mirrored, upside_down, lambda p: upside_down(mirrored(p))),
}


def tta_views(flip: str = "none", quarter_turns: bool = False) -> list:
    """The test-time views of an image batch (functions of pixels), the image itself first: ``flip`` adds its
    mirror images (`FLIP_VIEWS`), ``quarter_turns`` each of those turned a quarter (with ``both``: all 8
    symmetries of a square)."""
    if flip not in FLIP_VIEWS:
        raise ValueError(f"unknown test-time flip {flip!r}: {' | '.join(FLIP_VIEWS)}")
    views = [lambda p: p, *FLIP_VIEWS[flip]]
    if quarter_turns:
        views += [lambda p, view=view: quarter_turned(view(p)) for view in views]
    return views


def check_tta(input_size: tuple[int, int], quarter_turns: bool) -> None:
    """Quarter turns keep the input shape only for square inputs: a clear error before any work."""
    if quarter_turns and int(input_size[0]) != int(input_size[1]):
        raise ValueError(
            f"tta.quarter_turns needs a square input, and the model's is {tuple(input_size)}: "
            "set tta.quarter_turns: false or a square conv_base.input_size"
        )


def with_tta(score, flip: str = "none", quarter_turns: bool = False):
    """`score` (pixels -> model outputs) with test-time augmentation: the mean of the outputs on every view
    of `tta_views` (a sigmoid's p averages as its probabilities do), summed in the views' order; with one
    view (``none``, no turns) it is `score` itself."""
    views = tta_views(flip, quarter_turns)
    if len(views) == 1:
        return score

    def averaged(pixels):
        total = score(views[0](pixels))
        for view in views[1:]:
            total = total + score(view(pixels))
        return total / len(views)

    return averaged


def export(
    model,
    class_names: list[str],
    input_size: tuple[int, int],
    path: str | Path,
    flip: str = "none",
    quarter_turns: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> None:
    """Write the serving SavedModel of a Keras classifier (raw RGB 0..255 pixels in), with the test-time
    augmentation (`with_tta`: `flip`, `quarter_turns`) that evaluate scored it with; it refuses images whose
    headers declare more than `max_pixels` pixels before decoding them."""
    check_tta(input_size, quarter_turns)
    if not 1 <= int(max_pixels) < 1 << 62:
        raise ValueError(f"max_pixels must be a positive pixel count, not {max_pixels}")
    names = tf.constant(list(class_names))
    size = tuple(int(s) for s in input_size)
    expected = 2 if model.output_shape[-1] == 1 else model.output_shape[-1]
    if expected != len(class_names):
        raise ValueError(f"the model has {expected} classes but the vocabulary {len(class_names)}")

    def serve(images):
        with tf.control_dependencies([check_encoded(images), check_headers(images)]):
            declared = tf.map_fn(image_header.declared_pixels, images, fn_output_signature=tf.int64)
        with tf.control_dependencies([check_pixels(declared, int(max_pixels))]):
            pixels = tf.map_fn(
                lambda blob: image.decode_and_resize(blob, size),
                images,
                fn_output_signature=tf.TensorSpec([size[0], size[1], 3], tf.float32),
            )
        score = with_tta(lambda x: model(x, training=False), flip, quarter_turns)
        probabilities = probabilities_of(score(pixels))
        n = tf.shape(probabilities)[0]
        return {
            "probabilities": probabilities,
            "classes": tf.tile(names[tf.newaxis, :], [n, 1]),
            "predicted": tf.gather(names, tf.argmax(probabilities, axis=-1)),
        }

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, serve, input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    archive.write_out(str(path), verbose=False)
