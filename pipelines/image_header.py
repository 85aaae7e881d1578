"""How many pixels an encoded image's header declares, read before any pixel is decoded (TensorFlow ops only,
so it lives inside the serving SavedModel): the serving model refuses decompression bombs with it, and download
walks GIFs as it does (`pipelines.normalise.gif_walk`). Apart from `pipelines.image` (whose code decides every
image's pixels, and so the feature and download caches' namespaces), as it decides no pixel.
"""

from __future__ import annotations

import tensorflow as tf

from pipelines.image import _byte_buffer, _uint, format_index, plain

GIF_MAX_STEPS = 1 << 16  # blocks and sub-blocks the GIF walk reads (~3 s; 16 MB of full sub-blocks); beyond: refused


def _gif_pixels(image_bytes: tf.Tensor) -> tf.Tensor:
    """What `tf.io.decode_gif` allocates, in pixels: every frame on a canvas as wide as the widest frame and as tall
    as the tallest (or the logical screen, if larger). Frames are counted from the image descriptors, blocks walked
    by their lengths as giflib and Pillow walk them (an extension's first sub-block is read even when empty), as
    `pipelines.normalise.gif_walk` does; -1 (refused) past `GIF_MAX_STEPS` steps. The file is read as a tensor of
    bytes once (a step costs about 50 us, the loop's own overhead)."""
    data = tf.cast(tf.io.decode_raw(image_bytes + b"\0" * 16, tf.uint8), tf.int64)
    size = tf.cast(tf.strings.length(image_bytes), tf.int64)
    last = tf.cast(tf.shape(data)[0] - 1, tf.int64)

    def at(pos):
        return tf.gather(data, tf.minimum(tf.cast(pos, tf.int64), last))

    def table(flags):  # a colour table's bytes
        return tf.where(flags >= 0x80, 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64), flags % 8), 0)

    def more(pos, frames, width, height, skipping, first):
        return pos < size

    def step(pos, frames, width, height, skipping, first):
        byte = at(pos)
        extension, descriptor = tf.equal(byte, 0x21), tf.equal(byte, 0x2C) & (pos + 10 <= size)
        counted = ~skipping & descriptor
        block = tf.where(extension, pos + 2, tf.where(descriptor, pos + 11 + table(at(pos + 9)), size))  # else: end
        return (
            tf.where(skipping, pos + 1 + byte, block),  # a sub-block led by its length, or the next block
            frames + tf.cast(counted, tf.int64),
            tf.where(counted, tf.maximum(width, at(pos + 5) + 256 * at(pos + 6)), width),
            tf.where(counted, tf.maximum(height, at(pos + 7) + 256 * at(pos + 8)), height),
            tf.where(skipping, tf.not_equal(byte, 0) | first, extension | descriptor),  # an empty sub-block ends
            ~skipping & extension,  # them, but for an extension's first
        )

    zero = tf.constant(0, tf.int64)
    start = (13 + table(at(10)), zero, zero, zero, tf.constant(False), tf.constant(False))
    pos, frames, width, height, _, _ = tf.while_loop(more, step, start, maximum_iterations=GIF_MAX_STEPS)
    width = tf.maximum(width, at(6) + 256 * at(7))
    height = tf.maximum(height, at(8) + 256 * at(9))
    return tf.where(pos < size, tf.constant(-1, tf.int64), tf.maximum(frames, 1) * width * height)


def _webp_pixels(buf: tf.Tensor) -> tf.Tensor:
    """The canvas (VP8X) or bitstream (VP8L, VP8) size of a WebP; -1 (refused) for anything else: libwebp also
    decodes a bare bitstream with no chunk header, whose sides these reads would take from other bytes."""
    chunk = _uint(buf, 12, 4)
    extended = (_uint(buf, 24, 3, little=True) + 1) * (_uint(buf, 27, 3, little=True) + 1)
    lossy = (_uint(buf, 26, 2, little=True) % (1 << 14)) * (_uint(buf, 28, 2, little=True) % (1 << 14))
    bits = _uint(buf, 21, 4, little=True)  # 14 bits of width - 1, then 14 of height - 1
    lossless = (bits % (1 << 14) + 1) * (tf.bitwise.right_shift(bits, 14) % (1 << 14) + 1)
    is_extended = tf.equal(chunk, 0x56503858)  # "VP8X"
    is_lossless = tf.equal(chunk, 0x5650384C) & tf.equal(_uint(buf, 20, 1), 0x2F)  # "VP8L" and its signature
    is_lossy = tf.equal(chunk, 0x56503820) & tf.equal(_uint(buf, 23, 3), 0x9D012A)  # "VP8 " and its start code
    return tf.where(
        is_extended, extended, tf.where(is_lossless, lossless, tf.where(is_lossy, lossy, tf.constant(-1, tf.int64)))
    )


def _png_pixels(buf: tf.Tensor) -> tf.Tensor:
    """IHDR's sides; -1 (refused) unless IHDR is the first chunk, as the PNG specification has it: libpng reads an
    unknown chunk before it, whose bytes would be read as the sides."""
    first = tf.equal(_uint(buf, 8, 4), 13) & tf.equal(_uint(buf, 12, 4), 0x49484452)  # "IHDR", 13 bytes long
    return tf.where(first, _uint(buf, 16, 4) * _uint(buf, 20, 4), tf.constant(-1, tf.int64))


def _bmp_pixels(buf: tf.Tensor) -> tf.Tensor:
    """The sides TensorFlow's BMP decoder reads (32-bit at 18 and 22, whatever the header: an OS/2 1.x core
    header's 16-bit sides are not what it allocates), negative ones (rows stored top-down) as their size."""
    width, height = _uint(buf, 18, 4, little=True), _uint(buf, 22, 4, little=True)
    width = tf.where(width >= 1 << 31, (1 << 32) - width, width)
    return width * tf.where(height >= 1 << 31, (1 << 32) - height, height)


@plain
def declared_pixels(image_bytes: tf.Tensor) -> tf.Tensor:
    """One encoded image (scalar string, a format of `FORMATS`) -> int64 pixels its header declares, read before
    any pixel is decoded: width x height (JPEG's frame header, PNG's IHDR, BMP's info header, WebP's VP8X canvas
    or bitstream header), and for a GIF what its decode allocates (`_gif_pixels`); -1 where that cannot be read
    (a PNG whose first chunk is not IHDR, a WebP without a known chunk, a GIF of more than `GIF_MAX_STEPS`
    blocks). The serving model refuses a file
    above its limit, or at -1, with this, as download refuses one with Pillow's reading of the same headers."""
    fmt = format_index(image_bytes)
    buf = _byte_buffer(image_bytes)

    def jpeg() -> tf.Tensor:
        shape = tf.cast(tf.io.extract_jpeg_shape(image_bytes), tf.int64)
        return shape[0] * shape[1]

    return tf.switch_case(
        fmt,
        [
            jpeg,
            lambda: _png_pixels(buf),
            lambda: _gif_pixels(image_bytes),
            lambda: _bmp_pixels(buf),
            lambda: _webp_pixels(buf),
        ],
        default=lambda: tf.constant(0, tf.int64),
    )
