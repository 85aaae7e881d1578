"""The serving model: a TensorFlow SavedModel that takes a batch of encoded images.

Signature ``serving_default(images: tf.string [n])`` -> ``probabilities``
float32 [n, classes], ``classes`` string [n, classes] (the class names, in the
label vocabulary's order) and ``predicted`` string [n]. It decodes, normalises
(EXIF orientation, transparency onto white, the first frame) and resizes with
`pipelines.image.decode_and_resize`, the function download, extraction and
training used, so a client's file gives the pixels training saw for the same
file. Loading it needs plain TensorFlow only. With ``tta.flip: horizontal`` it averages each
image's probabilities with its mirror image's, as evaluate scored it.

A batch holding something that is not a JPEG, PNG, GIF, BMP or WebP (an empty
string, text, another format) fails with an error naming the batch indices; an
image with the right header but corrupt data fails in TensorFlow's decoder.
"""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

from pipelines import image

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


def probabilities_of(outputs: tf.Tensor) -> tf.Tensor:
    """Model outputs -> [n, classes] probabilities (a sigmoid's p becomes [1 - p, p])."""
    if outputs.shape[-1] == 1:
        return tf.concat([1.0 - outputs, outputs], axis=-1)
    return outputs


def mirrored(pixels):
    """[n, h, w, c] images flipped left to right (NumPy or TensorFlow)."""
    return pixels[:, :, ::-1, :]


def with_flip(score, flip: str):
    """`score` (pixels -> model outputs) with test-time augmentation: ``horizontal`` averages the outputs of
    each image and its mirror (a sigmoid's p averages as its probabilities do); ``none`` is `score` itself."""
    if flip == "none":
        return score
    if flip != "horizontal":
        raise ValueError(f"unknown test-time flip {flip!r}: none | horizontal")
    return lambda pixels: (score(pixels) + score(mirrored(pixels))) / 2


def export(model, class_names: list[str], input_size: tuple[int, int], path: str | Path, flip: str = "none") -> None:
    """Write the serving SavedModel of a Keras classifier (raw RGB 0..255 pixels in), with the test-time
    augmentation `flip` (`with_flip`) that evaluate scored it with."""
    names = tf.constant(list(class_names))
    size = tuple(int(s) for s in input_size)
    expected = 2 if model.output_shape[-1] == 1 else model.output_shape[-1]
    if expected != len(class_names):
        raise ValueError(f"the model has {expected} classes but the vocabulary {len(class_names)}")

    def serve(images):
        with tf.control_dependencies([check_encoded(images)]):
            pixels = tf.map_fn(
                lambda blob: image.decode_and_resize(blob, size),
                images,
                fn_output_signature=tf.TensorSpec([size[0], size[1], 3], tf.float32),
            )
        probabilities = probabilities_of(with_flip(lambda x: model(x, training=False), flip)(pixels))
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
