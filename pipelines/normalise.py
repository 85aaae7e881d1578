"""Image normalisation for the download stage: Pillow's checks, and the pixels of the shared decode.

A file is checked by Pillow (size limits before decoding, a full decode, the side
limit) and its pixels are those of `pipelines.image.decode_image`, the decode the
serving model runs on a client's file, cross-checked against Pillow's reading.
An image's identity is the hash of those pixels (`pixels_hash`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import struct
import warnings
from typing import Callable

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

from pipelines import image, image_header

DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)  # Pillow's decompression-bomb limit
# Pillow refuses any image over twice that (DecompressionBombError in Image.open): a higher limit would do nothing
PILLOW_HARD_LIMIT = 2 * DEFAULT_MAX_PIXELS


@dataclasses.dataclass(frozen=True)
class Normalised:
    data: bytes
    ext: str
    width: int
    height: int
    format: str
    action: str
    pixels_sha256: str  # `pixels_hash` of the normalised pixels: the image's identity


@dataclasses.dataclass(frozen=True)
class Rejected:
    reason: str
    lasting: bool = True  # False: a failure of the run, not of the file (the download cache does not keep it)


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


GRAY16 = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(img: Image.Image, sample_bits: int = 8, blank_alpha_opaque: bool = False) -> tuple[Image.Image, str]:
    """Pillow's reading of any mode as 8-bit RGB, transparency onto white: the reference
    `pipelines.image.decode_image` is checked against. `sample_bits`: a PNG's bit depth (IHDR);
    `blank_alpha_opaque`: an alpha of 0 everywhere means none (a BMP's, as browsers and the decode read it)."""
    mode = img.mode
    if blank_alpha_opaque and mode == "RGBA" and img.getchannel("A").getextrema() == (0, 0):
        img, mode = img.convert("RGB"), "RGB"
    key = img.info.get("transparency") if mode in ("1", "L", "RGB", *GRAY16) else None  # a PNG colour key (tRNS)
    if mode == "RGB" and key is None:
        return img, "RGB"
    if mode in ("1", "L", *GRAY16):
        if mode in GRAY16:
            raw = np.asarray(img, dtype=np.float64)
            peak = 65535.0 if mode.startswith("I;16") or raw.max() > 255 else 255.0
            gray = np.clip(np.floor(raw * (256.0 / (peak + 1))), 0, 255).astype(np.uint8)  # the high byte, as libpng
            how = f"{mode} grayscale to 8-bit RGB"
        else:
            raw = gray = np.asarray(img.convert("L"))
            how = f"{mode} to RGB"
            if mode == "L" and key is not None and sample_bits < 8:  # Pillow gives a 2 or 4-bit key as stored
                key = key * 255 // ((1 << sample_bits) - 1)
        if key is None:
            return Image.fromarray(gray, mode="L").convert("RGB"), how
        alpha = np.where(raw == key, 0, 255).astype(np.uint8)
        return _on_white(
            Image.fromarray(np.dstack([gray, gray, gray, alpha]), mode="RGBA")
        ), f"{mode} onto white to RGB"
    if mode in ("RGBA", "LA", "PA") or key is not None or (mode == "P" and "transparency" in img.info):
        return _on_white(img.convert("RGBA")), f"{mode} onto white to RGB"
    return img.convert("RGB"), f"{mode} to RGB"


# Beyond orientation and size, pixels are compared for the formats whose decoding involves choices
# (transparency, palettes, bit depth): PNG, GIF, BMP, WebP. JPEG decoders may differ by their IDCT
# and upsampling (3 of the 2,000 shared photos: mean 2, largest 20 levels between TensorFlow's
# libjpeg-turbo and Pillow's), which is no different reading of the file, so JPEG's pixels are
# TensorFlow's. Within the tolerance a lossy WebP decoder's rounding passes; a wrong transparency,
# palette or bit depth (tens to 255 levels) does not.
MAX_PIXEL_GAP, MAX_MEAN_GAP = 24, 2.0

Decoder = Callable[[bytes], tuple[np.ndarray, int]]


def make_decoder() -> Decoder:
    """encoded bytes -> (normalised uint8 pixels, EXIF orientation) through `pipelines.image`,
    the decode extraction, training and the serving model run."""
    traced = tf.function(image.decode_with_orientation, input_signature=[tf.TensorSpec([], tf.string)], autograph=False)

    def decode(data: bytes) -> tuple[np.ndarray, int]:
        pixels, orientation = traced(tf.constant(data))
        return pixels.numpy(), int(orientation)

    return decode


def pixels_hash(pixels: np.ndarray) -> str:
    """The identity of an image: the SHA-256 of its normalised pixels and their shape, whatever the file format."""
    digest = hashlib.sha256(f"{pixels.shape[0]}x{pixels.shape[1]}:".encode())
    digest.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def _reason(exc: Exception) -> str:
    return (
        f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (IndexError, KeyError, TypeError)) or not str(exc)
        else str(exc)
    )


def decoder_reason(exc: Exception) -> str:
    """The line of a TensorFlow error that says what is wrong with the file: its message comes after
    "Graph execution error:" and the traceback of where the op was defined."""
    lines = [line.strip() for line in (getattr(exc, "message", None) or str(exc) or type(exc).__name__).splitlines()]
    noise = ("Graph execution error", "Detected at node", "File ", "[[")
    return next((line for line in lines if line and not line.startswith(noise)), lines[0] if lines else "")


# What Pillow's `ImageOps.exif_transpose` does for each orientation
TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(img: Image.Image) -> int:
    """The orientation tag of the file's EXIF block (JPEG's first APP1 "Exif", PNG's eXIf, WebP's EXIF chunk),
    where the shared decode reads it. Pillow's `getexif()` also takes one from XMP (`tiff:Orientation`) or a
    PNG text chunk's "Raw profile type exif" (ImageMagick's); the decode, the serving model and browsers read
    neither, so such a file is kept as they show it, not quarantined. A block Pillow cannot parse has none
    (the decode finds no valid TIFF header in it either)."""
    raw = img.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception:  # noqa: BLE001 - a damaged block (SyntaxError, struct.error, ...): the decode reads 1 too
        return 1
    value = exif.get(0x0112, 1)
    if isinstance(value, bytes) and len(value) == 1:  # stored as BYTE
        value = value[0]
    return value if isinstance(value, int) else 1


def bmp_unsupported(data: bytes) -> str | None:
    """What of a BMP (a Windows info header, 40 to 124 bytes) the shared decode cannot read: a bit depth other than
    8, 24 or 32, or compression (RLE); None where it can, or where the header is another kind (Pillow decides)."""
    if len(data) < 34 or not 40 <= int.from_bytes(data[14:18], "little") <= 124:
        return None
    bits, compression = int.from_bytes(data[28:30], "little"), int.from_bytes(data[30:34], "little")
    if bits not in (8, 24, 32):
        return f"a {bits}-bit BMP"
    if compression not in (0, 3):  # BI_RGB, BI_BITFIELDS
        return f"a compressed BMP ({ {1: 'RLE8', 2: 'RLE4'}.get(compression, f'compression {compression}') })"
    return None


def gif_walk(data: bytes) -> tuple[list[tuple[int, int, int, int]], bool]:
    """(left, top, width, height) of every frame of a GIF, from its image descriptors (no pixel decoded; blocks
    walked by their lengths as giflib and Pillow walk them: an extension's first sub-block is read even when
    empty), and whether the walk ended within `image_header.GIF_MAX_STEPS` steps (a block or a sub-block each), as the
    serving model's `image_header.declared_pixels` walks it. A file cut short lists the frames before the cut (Pillow
    reports the damage)."""
    frames, steps = [], 0
    if len(data) < 13 or data[:6] not in (b"GIF87a", b"GIF89a"):
        return frames, True
    pos = 13 + (3 * 2 ** ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # the global colour table
    while pos < len(data) and steps < image_header.GIF_MAX_STEPS:
        steps += 1
        first = data[pos] == 0x21
        if data[pos] == 0x21:  # an extension: its label, then sub-blocks
            pos += 2
        elif data[pos] == 0x2C and pos + 10 <= len(data):  # an image descriptor
            frames.append(struct.unpack_from("<HHHH", data, pos + 1))
            flags = data[pos + 9]
            pos += 10 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0) + 1  # local colour table, LZW code size
        else:  # the trailer, or anything else: the end
            return frames, True
        while pos < len(data) and steps < image_header.GIF_MAX_STEPS:  # sub-blocks, each led by its length
            steps += 1
            length = data[pos]
            pos += 1 + length
            if not length and not first:  # a zero-length one ends them (an extension's first does not)
                break
            first = False
    return frames, pos >= len(data) or steps < image_header.GIF_MAX_STEPS


# Formats the serving model does not read, named by their first bytes (offset, magic, name) in rejections only
_OTHER_FORMATS = (
    (0, b"II*\0", "TIFF"),
    (0, b"MM\0*", "TIFF"),
    (0, b"%!PS", "EPS"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"),
    (0, b"%PDF", "PDF"),
    (0, b"8BPS", "PSD"),
    (0, b"\0\0\1\0", "ICO"),
    (0, b"\0\0\0\x0cjP  ", "JPEG 2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (0, b"qoif", "QOI"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
    (0, b"\xd0\xcf\x11\xe0", "OLE compound file (FlashPix, MIC or an Office document)"),
)


def unsupported_reason(data: bytes) -> str:
    """Why a file whose first bytes are none of `image.FORMATS` is quarantined: from those bytes alone, never from
    a decoder (so the same on every machine, whatever Pillow's plugins, and nothing is run on the file)."""
    named = next((name for offset, magic, name in _OTHER_FORMATS if data[offset : offset + len(magic)] == magic), None)
    if named is None:
        return f"not an image the serving model reads (its first bytes are none of {', '.join(image.FORMATS)})"
    return f"unsupported format {named}: the serving model reads {', '.join(image.FORMATS)}; convert the file to one of them"


def normalise_image(data: bytes, *, min_side: int, max_pixels: int, decode: Decoder) -> Normalised | Rejected:
    """Check a file, and return the pixels training and serving will see, as RGB bytes.

    Pillow checks it first (size limits before decoding, a full decode, the
    side limit). The pixels are those of `decode` (the shared decode, see
    `make_decoder`), which must agree with Pillow's reading: the same EXIF
    orientation and size, and for formats other than JPEG the same pixels
    within a decoder's rounding (`MAX_PIXEL_GAP`). An RGB JPEG that needs no
    orientation is kept byte-for-byte; anything else is re-encoded as PNG.
    """
    if not data:
        return Rejected("empty file (0 bytes)")
    sniffed = image.sniff_format(data)  # what the serving model will take it for
    if sniffed is None:  # before Pillow opens it: what its plugins make of it (and run: Ghostscript for an EPS) varies
        return Rejected(unsupported_reason(data))  # by machine, and a rejection is cached as the file's for good
    fmt = sniffed
    actions = []
    try:  # Pillow reads frames and EXIF lazily: a damaged later frame fails only after load()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                return Rejected(
                    f"too large: {width}x{height} = {width * height} pixels > "
                    f"download.max_pixels={max_pixels} (decompression-bomb limit)"
                )
            fmt = img.format or fmt
            if fmt == "PNG" and data[8:16] != b"\0\0\0\rIHDR":
                return Rejected(
                    "a PNG whose first chunk is not IHDR: the serving model cannot read its size before decoding "
                    "it (and refuses it); re-save the file"
                )
            frames = getattr(img, "n_frames", 1) if fmt == "GIF" else 1  # frame headers only, no pixels
            if width * height * frames > max_pixels:  # the shared decode (tf.io.decode_gif) decodes every frame
                return Rejected(
                    f"too large: {frames} frames of {width}x{height} = {width * height * frames} pixels > "
                    f"download.max_pixels={max_pixels} (decompression-bomb limit; the decode reads every frame)"
                )
            if fmt == "GIF":  # tf.io.decode_gif's canvas is its largest frame's (offsets clipped), not the screen
                walked, ended = gif_walk(data)
                if not ended:
                    return Rejected(
                        f"a GIF of more than {image_header.GIF_MAX_STEPS} blocks and sub-blocks: the serving model cannot "
                        "check its size before decoding it (and refuses it); re-save the file"
                    )
                # what the decode allocates, as the serving model counts it (`image_header.declared_pixels`): the frames
                # giflib reads (Pillow stops at a comment's empty first sub-block, and can count fewer)
                canvas = max([width] + [f[2] for f in walked]) * max([height] + [f[3] for f in walked])
                if max(len(walked), 1) * canvas > max_pixels:
                    return Rejected(
                        f"too large: {len(walked)} frames on a canvas of {canvas} pixels = "
                        f"{max(len(walked), 1) * canvas} pixels > download.max_pixels={max_pixels} "
                        "(decompression-bomb limit; the decode reads every frame)"
                    )
                larger = [f for f in walked if f[2] > width or f[3] > height]
                if larger:
                    left, top, w, h = larger[0]
                    return Rejected(
                        f"GIF frame of {w}x{h} larger than its {width}x{height} screen ({len(larger)} such frame(s)): "
                        "the shared decode would size every frame to it; re-save the file"
                    )
            img.load()
        if min(width, height) < min_side:
            return Rejected(f"too small: {width}x{height}, a side below download.min_side={min_side}")
        if image.is_animated_webp(data):
            return Rejected(image.ANIMATED_WEBP)
        unsupported = bmp_unsupported(data) if sniffed == "BMP" else None
        if unsupported:  # TensorFlow's BMP decode would reject it with its own internals ("channels ... was 0")
            return Rejected(
                f"{unsupported} is not read by the shared decoder (the serving model's, which reads 8-, 24- and "
                "32-bit uncompressed BMPs): re-save the file as PNG"
            )
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
            actions.append(f"first of {img.n_frames} frames")
        orientation = exif_orientation(img)
        applied = orientation if orientation in range(2, 9) else 1  # Pillow ignores other values, as the decode does
        if applied != 1:
            img = img.transpose(TRANSPOSES[applied])
            actions.append(f"EXIF orientation {orientation} applied")
        depth = data[24] if sniffed == "PNG" and len(data) > 25 else 8  # IHDR's bit depth
        reference, how = _to_rgb(img, depth, blank_alpha_opaque=fmt == "BMP")
    except Image.DecompressionBombError as exc:
        return Rejected(f"too large (decompression bomb): {exc}")
    except UnidentifiedImageError:  # first bytes of a known format, but not a file Pillow can read
        return Rejected(f"undecodable {fmt}: not recognised as one")
    except MemoryError as exc:  # the run's, not the file's: decode it again next time
        return Rejected(f"undecodable {fmt}: out of memory ({exc})", lasting=False)
    except Exception as exc:  # noqa: BLE001 - OSError, SyntaxError, EOFError; damaged frames: IndexError, struct.error
        return Rejected(f"undecodable {fmt}: {_reason(exc)}")
    if how != "RGB":
        actions.append(how)
    try:
        pixels, decoded_orientation = decode(data)
    except Exception as exc:  # noqa: BLE001 - TensorFlow's decoders raise InvalidArgumentError and others
        return Rejected(
            f"undecodable {fmt} by the shared decoder (the serving model's): {decoder_reason(exc)}",
            lasting=isinstance(exc, tf.errors.InvalidArgumentError),  # the file's bytes; others may be the run's
        )
    sizes = f"{pixels.shape[1]}x{pixels.shape[0]} against {reference.width}x{reference.height}"
    if decoded_orientation != applied:
        return Rejected(
            f"{fmt} orientation read differently by the shared decoder (EXIF {orientation}, decoded as "
            f"{decoded_orientation}, {sizes})"
        )
    if pixels.shape[:2] != (reference.height, reference.width):
        hint = "; a first frame smaller than the GIF's screen is not supported" if fmt == "GIF" else ""
        return Rejected(f"{fmt} read at another size by the shared decoder (the serving model's): {sizes}{hint}")
    gap = None if sniffed == "JPEG" else np.abs(pixels.astype(np.int16) - np.asarray(reference, dtype=np.uint8))
    if gap is not None and (gap.max() > MAX_PIXEL_GAP or gap.mean() > MAX_MEAN_GAP):
        hint = " (GIF transparency is not supported)" if fmt == "GIF" and "onto white" in how else ""
        return Rejected(
            f"{fmt} decoded differently by the shared decoder (the serving model's) than by Pillow{hint}: "
            f"largest pixel difference {int(gap.max())}, mean {gap.mean():.2f}; re-save it as PNG or JPEG"
        )
    identity = pixels_hash(pixels)
    if sniffed == "JPEG" and img.mode == "RGB" and not actions:
        return Normalised(data, "jpg", width, height, fmt, "as-is", identity)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    actions.append(f"{fmt} re-encoded as PNG")
    return Normalised(buffer.getvalue(), "png", pixels.shape[1], pixels.shape[0], fmt, "; ".join(actions), identity)
