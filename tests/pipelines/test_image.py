import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from pipelines import image, image_header  # noqa: E402
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


def gif_of(frames: list, screen=None, **save_kwargs) -> bytes:
    """An animated GIF of `frames` (arrays; Pillow writes each as a descriptor, local colour tables where the
    palettes differ, extensions for the durations)."""
    import io

    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=40, loop=0, **save_kwargs)
    return buffer.getvalue()


def png_chunk_first(width: int = 300, height: int = 300) -> bytes:
    """A gray PNG of `width` x `height` with a private chunk before IHDR that looks like a 1x1 IHDR at bytes 16-23."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    idat = chunk(b"IDAT", zlib.compress(b"\0" * ((width + 1) * height), 9))
    fake = chunk(b"prVt", struct.pack(">II", 1, 1) + bytes(5))
    return b"\x89PNG\r\n\x1a\n" + fake + ihdr + idat + chunk(b"IEND", b"")


def bare_webp(width: int = 300, height: int = 200) -> bytes:
    """A lossless WebP without its "VP8L" chunk header: libwebp decodes the bare bitstream, Pillow does not."""
    import io
    import struct

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 20, 200)).save(buffer, format="WEBP", lossless=True)
    body = buffer.getvalue()[20:]
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def with_alpha(rgb: np.ndarray) -> np.ndarray:
    alpha = (np.arange(rgb.shape[0] * rgb.shape[1]) % 256).astype(np.uint8).reshape(rgb.shape[:2])
    return np.dstack([rgb, alpha])


def png_declaring(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk (valid CRC) declaring `width` x `height` RGB pixels, and no pixel data."""
    import struct
    import zlib

    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


def test_declared_pixels_are_what_each_formats_header_says():
    """The serving model's decompression-bomb check reads these before any decode: each format's header (JPEG's
    frame header, PNG's IHDR, BMP's info header either way up, the three WebP bitstreams, GIF's frames)."""
    from tests.conftest import bmp_file

    seen = {}
    cases = {
        "jpeg": (encode(image_array(1, size=(37, 53)), "JPEG"), 37 * 53),
        "jpeg_progressive": (encode(image_array(1, size=(41, 23)), "JPEG", progressive=True), 41 * 23),
        "png": (encode(image_array(2, size=(29, 61)), "PNG"), 29 * 61),
        "png_gray": (encode(image_array(2, size=(19, 7)), "PNG", mode="L"), 19 * 7),
        "png_header_only": (png_declaring(100_000, 70_000), 7_000_000_000),
        "bmp": (encode(image_array(3, size=(33, 17)), "BMP"), 33 * 17),
        "bmp_top_down": (bmp_file([bytes(3 * 5)] * 4, 5, 4, 24, top_down=True), 5 * 4),
        "webp_lossy": (encode(image_array(4, size=(45, 31)), "WEBP", quality=80), 45 * 31),
        "webp_lossless": (encode(image_array(4, size=(45, 31)), "WEBP", lossless=True), 45 * 31),
        "webp_extended": (encode(with_alpha(image_array(4, size=(27, 39))), "WEBP", quality=80), 27 * 39),
        "gif": (encode(image_array(5, size=(21, 13)), "GIF"), 21 * 13),
        "gif_3_frames": (gif_of([image_array(s, size=(12, 18)) for s in range(3)]), 3 * 12 * 18),
    }
    for name, (blob, _) in cases.items():
        seen[name] = int(image_header.declared_pixels(tf.constant(blob)).numpy())
    assert seen == {name: pixels for name, (_, pixels) in cases.items()}
    assert cases["webp_extended"][0][12:16] == b"VP8X" and cases["webp_lossless"][0][12:16] == b"VP8L"
    assert cases["webp_lossy"][0][12:16] == b"VP8 "
    # the GIF walk goes by the blocks' lengths: every frame counted where the frames' palettes differ (local colour
    # tables), and the same file's frames counted as Pillow counts them
    import io

    from PIL import Image

    many = gif_of([image_array(s, (30 * s, 200 - 20 * s, 90), (16, 16)) for s in range(7)])
    assert (
        int(image_header.declared_pixels(tf.constant(many)).numpy())
        == Image.open(io.BytesIO(many)).n_frames * 256
        == 7 * 256
    )


def gif_parts(data: bytes):
    """A Pillow GIF's screen flags, global colour table, and first image descriptor through its data."""
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    table = data[13:pos]
    while data[pos] == 0x21:
        pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    start = pos
    pos += 10 + (3 << ((data[pos + 9] & 7) + 1) if data[pos + 9] & 0x80 else 0) + 1
    while data[pos]:
        pos += data[pos] + 1
    return flags, table, data[start : pos + 1]


def gif_by_hand(screen, frames: list, between: bytes = b"") -> bytes:
    """A GIF of Pillow-encoded black frames of the given sizes on a `screen`, `between` after the first."""
    import io
    import struct

    from PIL import Image

    parts = []
    for w, h in frames:
        buffer = io.BytesIO()
        Image.new("L", (w, h), 0).save(buffer, format="GIF")
        flags, table, frame = gif_parts(buffer.getvalue())
        parts.append(frame)
    head = b"GIF89a" + struct.pack("<HHBBB", *screen, flags, 0, 0) + table
    return head + parts[0] + between + b"".join(parts[1:]) + b";"


def test_what_the_decoders_allocate_is_never_more_than_the_header_reading_declares():
    """Found by a review on 2026-12-06, each a decompression bomb past the serving model's check: tf.io.decode_gif's
    canvas is the widest frame's width by the tallest frame's height (a 65535 x 1 and a 1 x 65535 frame, a 900-byte
    file, allocate 25.8 GB; the check counted the largest frame, 65535 pixels); giflib reads an extension's first
    sub-block even when empty, so `21 F9 00 3B` hid the frames after it from the walk (21 frames decoded, 1
    counted); libwebp decodes a bare bitstream with no chunk header, whose sides the check read from other bytes
    (0 declared, 6 million decoded); TensorFlow reads an OS/2 BMP's sides as 32-bit fields (0 declared)."""
    import io
    import struct

    from PIL import Image

    from pipelines import normalise

    def allocated(blob, decode):
        shape = decode(blob).shape
        return int(np.prod(shape[:-1]))

    canvas = gif_by_hand((1, 1), [(300, 1), (1, 300)])
    assert (
        int(image_header.declared_pixels(tf.constant(canvas))) == allocated(canvas, tf.io.decode_gif) == 2 * 300 * 300
    )
    hidden = gif_by_hand((40, 40), [(40, 40)] * 6, between=b"\x21\xf9\x00" + b";" + bytes(59) + b"\x00")
    assert int(image_header.declared_pixels(tf.constant(hidden))) == allocated(hidden, tf.io.decode_gif) == 6 * 40 * 40
    assert len(normalise.gif_walk(hidden)[0]) == Image.open(io.BytesIO(hidden)).n_frames == 6  # download counts alike
    bare = bare_webp(300, 200)
    assert allocated(bare, lambda b: tf.io.decode_webp(b)[0]) == 300 * 200  # libwebp decodes it ...
    assert int(image_header.declared_pixels(tf.constant(bare))) == -1  # ... so its size cannot be read: refused
    # found by a second review that day: libpng reads a chunk before IHDR, whose bytes the check took for the sides
    # (1 declared, 9 million decoded); and Pillow stops at a comment's empty first sub-block, which giflib reads on,
    # so download's frame count (Pillow's) was below what the decode allocates: both now refused by both stages
    early = png_chunk_first(300, 300)
    assert allocated(early, image.decode_image) == 300 * 300 and Image.open(io.BytesIO(early)).size == (300, 300)
    assert int(image_header.declared_pixels(tf.constant(early))) == -1
    limits = dict(min_side=1, max_pixels=10**6, decode=normalise.make_decoder())
    rejected = normalise.normalise_image(early, **limits)
    assert isinstance(rejected, normalise.Rejected) and "first chunk is not IHDR" in rejected.reason, rejected
    comment = gif_by_hand((100, 100), [(100, 100)] * 8, between=b"\x21\xfe\x00" + b";" + bytes(59) + b"\x00")
    assert Image.open(io.BytesIO(comment)).n_frames == 1  # Pillow's count
    assert (
        int(image_header.declared_pixels(tf.constant(comment))) == allocated(comment, tf.io.decode_gif) == 8 * 100 * 100
    )
    rejected = normalise.normalise_image(comment, **{**limits, "max_pixels": 5 * 100 * 100})
    assert isinstance(rejected, normalise.Rejected) and "8 frames on a canvas of 10000 pixels" in rejected.reason
    w, h = 40, 30
    core = b"BM" + struct.pack("<IHHI", 0, 0, 0, 32) + struct.pack("<IHHHH", 12, w, 0, h, 0) + struct.pack("<HH", 0, 24)
    core += bytes(3 * w * h + 2)
    assert int(image_header.declared_pixels(tf.constant(core))) == allocated(core, image.decode_image) == w * h


@pytest.mark.slow
def test_a_gif_too_long_to_walk_is_refused_by_serving_and_download_alike():
    """The GIF walk costs about 50 us a block or sub-block in the serving graph: past `image_header.GIF_MAX_STEPS` (about 3
    s) the serving model refuses the file (-1), and download quarantines it, so no image training kept is refused."""
    import io

    from PIL import Image

    from pipelines import normalise

    buffer = io.BytesIO()
    Image.new("L", (8, 8), 0).save(buffer, format="GIF")
    small = buffer.getvalue()
    start = 13 + (3 << ((small[10] & 7) + 1) if small[10] & 0x80 else 0)
    declared = tf.function(
        image_header.declared_pixels, input_signature=[tf.TensorSpec([], tf.string)], autograph=False
    )
    seen = {}
    for n in (
        image_header.GIF_MAX_STEPS - 100,
        image_header.GIF_MAX_STEPS,
    ):  # a comment extension of n one-byte sub-blocks
        crafted = small[:start] + b"\x21\xfe" + b"\x01\x20" * n + b"\x00" + small[start:]
        limits = dict(min_side=1, max_pixels=10**6, decode=normalise.make_decoder())
        rejected = isinstance(normalise.normalise_image(crafted, **limits), normalise.Rejected)
        seen[n] = (int(declared(crafted)), normalise.gif_walk(crafted)[1], rejected)
    assert seen == {image_header.GIF_MAX_STEPS - 100: (64, True, False), image_header.GIF_MAX_STEPS: (-1, False, True)}


def test_damaged_data_behind_a_valid_header_fails_when_cut_or_checksummed_and_is_decoded_when_not():
    """What the README says of damaged files (a review on 2026-12-07 found it claimed every one fails): a JPEG or PNG
    cut short and a PNG whose data fails its checksum fail in the shared decode (the serving model's too); flipped
    bytes in a JPEG's entropy-coded data, a GIF's LZW data or a lossy WebP's data do not: the decoders return other
    pixels (libjpeg only warns), and download, whose Pillow decodes them the same way, keeps the file."""
    import warnings

    import tensorflow as tf

    from pipelines import normalise

    pixels = image_array(3, size=(64, 64))
    jpeg, png = encode(pixels, "JPEG", quality=90), encode(pixels, "PNG")
    scan = bytearray(jpeg)
    start = jpeg.index(b"\xff\xda") + 200  # inside the entropy-coded data after the start of scan
    for k in range(start, start + 60, 7):
        scan[k] ^= 0x5A
    chunk = bytearray(png)
    chunk[png.index(b"IDAT") + 40] ^= 0xFF  # the chunk's CRC no longer matches
    failing = {
        "JPEG cut short": jpeg[: len(jpeg) * 6 // 10],
        "PNG cut inside IDAT": png[: png.index(b"IDAT") + 2000],
        "PNG chunk checksum": bytes(chunk),
    }
    for name, data in failing.items():
        with pytest.raises(tf.errors.InvalidArgumentError):
            image.decode_image(tf.constant(data))
            pytest.fail(f"{name}: decoded")
    intact = image.decode_image(tf.constant(jpeg)).numpy()
    garbled = image.decode_image(tf.constant(bytes(scan))).numpy()  # no error
    assert garbled.shape == intact.shape and np.abs(garbled.astype(int) - intact.astype(int)).max() > 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = normalise.normalise_image(
            bytes(scan), min_side=16, max_pixels=89_478_485, decode=normalise.make_decoder()
        )
    assert isinstance(kept, normalise.Normalised)
    # GIF (LZW) and lossy WebP: no checksum over the image data either
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for fmt, options, first, step in (("GIF", {}, None, 5), ("WEBP", {"quality": 80}, 60, 13)):
        intact_file = encode(noisy, fmt, **options)
        damaged = bytearray(intact_file)
        start = len(damaged) // 2 if first is None else first
        stop = start + 40 if first is None else len(damaged) - 20
        for k in range(start, stop, step):
            damaged[k] ^= 0x55 if fmt == "GIF" else 0x33
        intact = image.decode_image(tf.constant(intact_file)).numpy()
        garbled = image.decode_image(tf.constant(bytes(damaged))).numpy()  # no error
        assert garbled.shape == intact.shape and np.abs(garbled.astype(int) - intact.astype(int)).max() > 100, fmt
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kept = normalise.normalise_image(
                bytes(damaged), min_side=16, max_pixels=89_478_485, decode=normalise.make_decoder()
            )
        assert isinstance(kept, normalise.Normalised), fmt
