"""The one image decode/resize used by download, extraction, training and serving alike.

Images go in as encoded bytes and come out as float32 RGB pixels in 0..255 at
the requested size; each conv base applies its own preprocessing inside the
model, so every consumer feeds these raw pixels.

`decode_image` is also the normalisation: the download stage stores its pixels
for every image it keeps, and the serving SavedModel runs it on whatever a
client sends, so training and serving see the same pixels for the same file.
It is made of TensorFlow ops only (the SavedModel needs no Python to run it):

- formats: JPEG, PNG, GIF, BMP, WebP (`FORMATS`); anything else fails;
- EXIF orientation (JPEG APP1, PNG ``eXIf``, WebP ``EXIF`` chunks), values 2 to 8
  applied as Pillow's ``ImageOps.exif_transpose`` does;
- transparency composited onto white: an alpha channel (RGBA, gray + alpha,
  WebP alpha) and a palette PNG's ``tRNS`` table, which TensorFlow's PNG
  decoder ignores, so it is read here;
- grayscale, palette and CMYK to RGB, 16-bit samples to 8 bits (TensorFlow's
  decoders), the first frame of an animation.

GIF transparency is not composited (TensorFlow's GIF decoder has no alpha);
the download stage quarantines such GIFs, as it does any file for which this
decode disagrees with Pillow's reading of it.
"""

from __future__ import annotations

import tensorflow as tf

# Leading bytes of each format `decode_image` reads, in `FORMATS` order (WebP: "RIFF", then "WEBP" at 8).
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
_MAGIC = ((0, b"\xff\xd8\xff"), (0, b"\x89PNG\r\n\x1a\n"), (0, b"GIF8"), (0, b"BM"), (8, b"WEBP"))
_JPEG, _PNG, _GIF, _BMP, _WEBP = range(len(FORMATS))
ORIENTATION_TAG = 0x0112


def sniff_format(data: bytes) -> str | None:
    """The format (one of `FORMATS`) a file's first bytes claim, or None."""
    for name, (offset, magic) in zip(FORMATS, _MAGIC):
        if data[offset : offset + len(magic)] == magic and (name != "WEBP" or data[:4] == b"RIFF"):
            return name
    return None


def format_index(image_bytes: tf.Tensor) -> tf.Tensor:
    """Scalar or batch of encoded images -> int32 index into `FORMATS`, -1 for anything else."""
    index = tf.fill(tf.shape(image_bytes), -1)
    padded = image_bytes + b"\0" * 12  # substr fails on a position past the end
    for i, (offset, magic) in reversed(list(enumerate(_MAGIC))):
        match = tf.equal(tf.strings.substr(padded, offset, len(magic)), magic)
        if FORMATS[i] == "WEBP":
            match = match & tf.equal(tf.strings.substr(padded, 0, 4), b"RIFF")
        index = tf.where(match, i, index)
    return index


# ---- reading integers out of the encoded bytes (for EXIF and PNG chunks) -----------------------


def _byte_buffer(image_bytes: tf.Tensor) -> tf.Tensor:
    """The bytes as int64, with zeros after the end so reads past it give 0."""
    raw = tf.cast(tf.io.decode_raw(image_bytes, tf.uint8), tf.int64)
    return tf.concat([raw, tf.zeros([8], tf.int64)], axis=0)


def _uint(buf: tf.Tensor, pos, n: int, little=False) -> tf.Tensor:
    """The unsigned n-byte integer at `pos` (big-endian unless `little`); 0 past the end."""
    steps = tf.range(n, dtype=tf.int64)
    index = tf.clip_by_value(tf.cast(pos, tf.int64) + steps, 0, tf.size(buf, out_type=tf.int64) - 1)
    shifts = tf.where(tf.cast(little, tf.bool), 8 * steps, 8 * (n - 1 - steps))
    return tf.reduce_sum(tf.bitwise.left_shift(tf.gather(buf, index), shifts))


def _jpeg_exif(buf: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Offset of the TIFF header in the first APP1 "Exif" segment before the scan, or -1."""

    def more(pos, found):
        return tf.equal(found, -1) & (pos + 4 <= size) & tf.equal(_uint(buf, pos, 1), 0xFF)

    def step(pos, found):
        marker = _uint(buf, pos + 1, 1)
        exif = (
            tf.equal(marker, 0xE1) & tf.equal(_uint(buf, pos + 4, 4), 0x45786966) & tf.equal(_uint(buf, pos + 8, 2), 0)
        )
        end = tf.equal(marker, 0xDA) | tf.equal(marker, 0xD9)  # start of scan, end of image
        found = tf.where(exif, pos + 10, tf.where(end, tf.constant(-2, tf.int64), found))
        pos = tf.where(tf.equal(marker, 0xFF), pos + 1, pos + 2 + _uint(buf, pos + 2, 2))  # 0xFF: a fill byte
        return pos, found

    _, found = tf.while_loop(
        more, step, (tf.constant(2, tf.int64), tf.constant(-1, tf.int64)), maximum_iterations=1 << 16
    )
    return tf.where(found >= 0, found, -1)


def _png_chunks(buf: tf.Tensor, size: tf.Tensor) -> dict[str, tf.Tensor]:
    """Offsets and lengths of the PNG chunks this decode reads (-1 where absent) and the colour type."""
    wanted = {"eXIf": 0x65584966, "PLTE": 0x504C5445, "tRNS": 0x74524E53}

    def more(pos, *_):
        return pos + 8 <= size

    def step(pos, *found):
        length, kind = _uint(buf, pos, 4), _uint(buf, pos + 4, 4)
        found = list(found)
        for k, code in enumerate(wanted.values()):
            hit = tf.equal(kind, code) & tf.equal(found[2 * k], -1)
            found[2 * k] = tf.where(hit, pos + 8, found[2 * k])
            found[2 * k + 1] = tf.where(hit, length, found[2 * k + 1])
        pos = tf.where(tf.equal(kind, 0x49454E44), size, pos + 12 + length)  # IEND ends the walk
        return (pos, *found)

    start = tf.constant(-1, tf.int64)
    _, *found = tf.while_loop(
        more, step, (tf.constant(8, tf.int64), *([start] * 2 * len(wanted))), maximum_iterations=1 << 20
    )
    out = {name: found[2 * k] for k, name in enumerate(wanted)}
    out.update({f"{name}_length": found[2 * k + 1] for k, name in enumerate(wanted)})
    out["colour_type"] = _uint(buf, 25, 1)
    return out


def _webp_exif(buf: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Offset of the data of a WebP ``EXIF`` chunk, or -1."""

    def more(pos, found):
        return tf.equal(found, -1) & (pos + 8 <= size)

    def step(pos, found):
        length = _uint(buf, pos + 4, 4, little=True)
        found = tf.where(tf.equal(_uint(buf, pos, 4), 0x45584946), pos + 8, found)
        return pos + 8 + length + length % 2, found

    _, found = tf.while_loop(
        more, step, (tf.constant(12, tf.int64), tf.constant(-1, tf.int64)), maximum_iterations=1 << 16
    )
    return found


def _tiff_orientation(buf: tf.Tensor, start: tf.Tensor) -> tf.Tensor:
    """The orientation tag (1..8) of IFD0 of the TIFF block at `start` (-1: none), else 1."""
    exif_prefix = tf.equal(_uint(buf, start, 4), 0x45786966) & tf.equal(_uint(buf, start + 4, 2), 0)
    start = tf.where(exif_prefix, start + 6, start)  # some writers keep "Exif\0\0" in PNG and WebP too
    order = _uint(buf, start, 2)
    little = tf.equal(order, 0x4949)  # "II"; "MM" is big-endian
    valid = (start >= 0) & (little | tf.equal(order, 0x4D4D))
    ifd = start + _uint(buf, start + 4, 4, little)
    count = tf.minimum(_uint(buf, ifd, 2, little), 1024)

    def more(i, value):
        return valid & (i < count) & tf.equal(value, 1)

    def step(i, value):
        entry = ifd + 2 + 12 * i
        hit = tf.equal(_uint(buf, entry, 2, little), ORIENTATION_TAG)
        return i + 1, tf.where(hit, _uint(buf, entry + 8, 2, little), value)

    _, value = tf.while_loop(more, step, (tf.constant(0, tf.int64), tf.constant(1, tf.int64)))
    return tf.cast(tf.where((value >= 1) & (value <= 8), value, 1), tf.int32)


def orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Pixels as stored -> upright, for an EXIF orientation 1..8 (as Pillow's ``exif_transpose``)."""
    transpose = lambda: tf.transpose(image, [1, 0, 2])  # noqa: E731
    branches = [
        lambda: image,
        lambda: image,  # 1: upright
        lambda: tf.reverse(image, [1]),  # 2: mirrored left-right
        lambda: tf.reverse(image, [0, 1]),  # 3: rotated 180
        lambda: tf.reverse(image, [0]),  # 4: mirrored top-bottom
        transpose,  # 5
        lambda: tf.reverse(transpose(), [1]),  # 6: rotate 90 clockwise to view
        lambda: tf.reverse(transpose(), [0, 1]),  # 7
        lambda: tf.reverse(transpose(), [0]),  # 8: rotate 90 counter-clockwise to view
    ]
    return tf.switch_case(tf.clip_by_value(orientation, 0, 8), branches)


def composite_on_white(rgb: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
    """uint8 RGB [h, w, 3] and alpha [h, w] -> uint8 RGB over a white background (rounded)."""
    a = tf.cast(alpha, tf.int32)[..., tf.newaxis]
    return tf.cast((tf.cast(rgb, tf.int32) * a + 255 * (255 - a) + 127) // 255, tf.uint8)


def _palette_alpha(buf: tf.Tensor, rgb: tf.Tensor, chunks: dict[str, tf.Tensor]) -> tf.Tensor:
    """The alpha of each pixel of a palette PNG from its tRNS table (a colour listed twice: the lower alpha)."""
    entries = chunks["PLTE_length"] // 3
    palette = tf.reshape(tf.gather(buf, chunks["PLTE"] + tf.range(entries * 3)), [-1, 3])
    keys = palette[:, 0] * 65536 + palette[:, 1] * 256 + palette[:, 2]
    listed = tf.minimum(chunks["tRNS_length"], entries)
    alphas = tf.concat(
        [tf.gather(buf, chunks["tRNS"] + tf.range(listed)), tf.fill([entries - listed], tf.constant(255, tf.int64))], 0
    )
    unique, slot = tf.unique(keys)
    lowest = tf.math.unsorted_segment_min(alphas, slot, tf.size(unique))
    order = tf.argsort(unique)
    unique, lowest = tf.gather(unique, order), tf.gather(lowest, order)
    pixels = tf.cast(rgb, tf.int64)
    pixel_keys = pixels[..., 0] * 65536 + pixels[..., 1] * 256 + pixels[..., 2]
    at = tf.searchsorted(unique, tf.reshape(pixel_keys, [-1]))
    at = tf.minimum(at, tf.cast(tf.size(unique) - 1, at.dtype))
    return tf.reshape(tf.gather(lowest, at), tf.shape(pixel_keys))


def _decode_png(image_bytes: tf.Tensor, buf: tf.Tensor, chunks: dict[str, tf.Tensor]) -> tf.Tensor:
    rgba = tf.io.decode_png(image_bytes, channels=4)
    rgb, alpha = rgba[..., :3], tf.cast(rgba[..., 3], tf.int64)
    palette_transparency = tf.equal(chunks["colour_type"], 3) & (chunks["tRNS"] >= 0) & (chunks["PLTE"] >= 0)
    alpha = tf.cond(palette_transparency, lambda: _palette_alpha(buf, rgb, chunks), lambda: alpha)
    return composite_on_white(rgb, alpha)


def _decode_webp(image_bytes: tf.Tensor) -> tf.Tensor:
    decoded = tf.io.decode_webp(image_bytes, channels=0)[0]  # 3 channels, or 4 with alpha
    return tf.cond(
        tf.equal(tf.shape(decoded)[-1], 4),
        lambda: composite_on_white(decoded[..., :3], decoded[..., -1]),
        lambda: decoded[..., :3],
    )


def _unknown_format() -> tf.Tensor:
    message = f"not a {', '.join(FORMATS)} image (empty, text, truncated header or another format)"
    with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
        return tf.zeros([1, 1, 3], tf.uint8)


def decode_with_orientation(image_bytes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """One encoded image (scalar string) -> (normalised uint8 [height, width, 3], the EXIF orientation applied)."""
    fmt = format_index(image_bytes)
    buf = _byte_buffer(image_bytes)
    size = tf.cast(tf.strings.length(image_bytes), tf.int64)
    chunks = tf.cond(
        tf.equal(fmt, _PNG),
        lambda: _png_chunks(buf, size),
        lambda: {
            **{k: tf.constant(-1, tf.int64) for k in ("eXIf", "PLTE", "tRNS")},
            **{f"{k}_length": tf.constant(0, tf.int64) for k in ("eXIf", "PLTE", "tRNS")},
            "colour_type": tf.constant(0, tf.int64),
        },
    )
    exif = tf.switch_case(
        fmt,
        [
            lambda: _jpeg_exif(buf, size),
            lambda: chunks["eXIf"],
            lambda: tf.constant(-1, tf.int64),
            lambda: tf.constant(-1, tf.int64),
            lambda: _webp_exif(buf, size),
        ],
        default=lambda: tf.constant(-1, tf.int64),
    )
    orientation = tf.cond(exif >= 0, lambda: _tiff_orientation(buf, exif), lambda: tf.constant(1, tf.int32))
    image = tf.switch_case(
        fmt,
        [
            lambda: tf.io.decode_jpeg(image_bytes, channels=3),
            lambda: _decode_png(image_bytes, buf, chunks),
            lambda: tf.io.decode_gif(image_bytes)[0],
            lambda: tf.io.decode_bmp(image_bytes, channels=3),
            lambda: _decode_webp(image_bytes),
        ],
        default=_unknown_format,
    )
    image = orient(image, orientation)
    image.set_shape([None, None, 3])
    return image, orientation


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
    """One encoded image (scalar string) -> normalised uint8 [height, width, 3] (see the module's docstring)."""
    return decode_with_orientation(image_bytes)[0]


def resize(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """uint8 or float [h, w, 3] -> float32 [size[0], size[1], 3] in 0..255 (aspect not kept).

    Shrinking (both sides at least the target's) averages the source pixels each
    output pixel covers (`area`, a box filter: antialiased, and ~3x cheaper than
    TF's antialiased bilinear, which cost 3/4 of decode + resize on photos);
    anything else (enlarging on a side) is antialiased bilinear.
    """
    shape = tf.shape(image)
    shrinking = tf.logical_and(shape[0] >= size[0], shape[1] >= size[1])
    resized = tf.cond(
        shrinking,
        lambda: tf.image.resize(image, size, method="area"),
        lambda: tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear", antialias=True),
    )
    return tf.clip_by_value(resized, 0.0, 255.0)  # both methods give float32


def decode_and_resize(image_bytes: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """One encoded image -> float32 [size[0], size[1], 3], pixels 0..255."""
    return resize(decode_image(image_bytes), size)


def decode_and_resize_batch(image_bytes: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """A batch of encoded images [n] -> float32 [n, size[0], size[1], 3]."""
    return tf.map_fn(
        lambda b: decode_and_resize(b, size),
        image_bytes,
        fn_output_signature=tf.TensorSpec([size[0], size[1], 3], tf.float32),
    )
