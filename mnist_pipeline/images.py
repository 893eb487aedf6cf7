"""Image preparation: a user's picture of a digit → the 28×28 array the model expects.

Images are prepared the way MNIST's were made: grayscale (alpha composited onto
white, 16-bit scaled down), EXIF orientation applied, polarity detected (dark ink
on light paper is inverted to MNIST's white on black), cropped to the ink, fitted
into a 20×20 box keeping the aspect ratio, pasted into 28×28 with the centre of
mass at the centre. `mnist-predict` and the server both call `prepare`.

Untrusted input: only the formats in FORMATS are decoded (Pillow is told before
any plugin looks at the bytes, so EPS, which Pillow renders with Ghostscript, is
never opened), the size in bytes and in pixels is bounded before decoding, and the
documented refusals (ImageError and its subclasses) name the reason.

Work is bounded by what a 28×28 digit needs: a JPEG is decoded at 1/2–1/8 scale
(libjpeg's draft mode), any image is brought to one byte per pixel at its decoded
size and box-reduced in uint8 to at most WORK_SIDE pixels a side before any float
array exists, and the float work is float32 on that small image. A 64-megapixel
upload costs its decoded bytes once, not eight float64 copies of them.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mnist_pipeline.errors import PipelineError

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
FORMAT_NAMES = "PNG, JPEG, BMP, GIF, TIFF, WebP"
MAX_PIXELS = 64_000_000  # larger than any camera photo; bigger images are treated as decompression bombs
WORK_SIDE = 512  # images are reduced to this before float work: a digit spanning 4 % of the side is still 20 px
MAX_BYTES = 64 << 20  # bytes read from one file
INK_THRESHOLD = 0.1  # after contrast stretch: fainter pixels are paper texture, not ink
MIN_CONTRAST = 0.15  # less than this between paper and ink: nothing is written
BOX, CANVAS = 20, 28  # MNIST: digit fitted into 20×20, centred by mass in 28×28


class ImageError(PipelineError):
    """An input image that cannot be classified (unreadable, truncated, empty, blank); the message says why."""


class UnsupportedFormat(ImageError):
    """An image, or a file, in a format this project does not decode."""


class TooLarge(ImageError):
    """Over the byte or pixel limit: refused before decoding."""


# Other formats' leading bytes, so that a PSD or an EPS is named as an unsupported image rather than
# as garbage. Matching them decodes nothing.
_OTHER_FORMATS = (
    (b"%!PS", "EPS/PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"icns", "ICNS"),
    (b"<svg", "SVG"),
    (b"<?xml", "SVG/XML"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"v/1\x01", "OpenEXR"),
    (b"SIMPLE  =", "FITS"),
    (b"BPG\xfb", "BPG"),
)
_ISO_BRANDS = (b"heic", b"heix", b"heif", b"mif1", b"avif", b"avis")


def other_format(data: bytes) -> str | None:
    """The name of a known image format this project does not decode, from its leading bytes."""
    head = data[:16]
    if head[4:8] == b"ftyp" and head[8:12] in _ISO_BRANDS:
        return "HEIC/AVIF"
    if len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"123456":
        return "PNM"
    return next((name for magic, name in _OTHER_FORMATS if head.startswith(magic)), None)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The first frame, decoded (a JPEG at the smallest draft scale still over WORK_SIDE), after the
    pixels it decodes to were checked against `max_pixels`, and its header against MAX_PIXELS."""
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            (width, height), limit = image.size, min(max_pixels, MAX_PIXELS)
            if image.format == "JPEG":  # libjpeg scales while decoding: a 48-MP photo decodes to 0.75 MP
                image.draft("L", (WORK_SIDE, WORK_SIDE))
            if width * height > MAX_PIXELS or image.width * image.height > limit:
                decoded = f" ({image.width}×{image.height} decoded)" if image.size != (width, height) else ""
                raise TooLarge(
                    f"image is {width}×{height} pixels{decoded}, over the {limit:,} pixel limit (a decompression bomb?)"
                )
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        name = other_format(data)
        if name:
            raise UnsupportedFormat(
                f"not an image in a supported format ({FORMAT_NAMES}): it looks like {name}"
            ) from None
        raise ImageError(f"not an image in a supported format ({FORMAT_NAMES})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLarge(f"refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # decoders fail in many ways on damaged files: OSError, SyntaxError, ValueError…
        raise ImageError(f"truncated or corrupt image: {exc}") from None
    if image.width == 0 or image.height == 0:
        raise ImageError("image has no pixels")
    return image


def read_bounded(path: Path, max_bytes: int = MAX_BYTES) -> bytes:
    """A file's bytes, refusing before reading when it is larger than `max_bytes`."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise TooLarge(f"{size:,} bytes, over the {max_bytes:,} byte limit")
            return handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image") from None
    except OSError as exc:
        raise ImageError(f"cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # a path the OS cannot name, e.g. with a NUL byte
        raise ImageError(f"cannot read it: {exc}") from None


# EXIF orientation → the transpose that shows the image upright (as ImageOps.exif_transpose applies it).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_WIDE = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # kept beyond 8 bits until reduced


def _one_channel(image: Image.Image) -> Image.Image:
    """Gray at the decoded size, one byte per pixel (or I/F for 16-bit and float images), alpha
    composited onto white: no copy larger than the decoded image."""
    if image.mode in _WIDE:
        return image.convert("I") if image.mode.startswith("I;16") else image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        # A palette becomes LA (2 bytes a pixel), not RGBA (4).
        rgba = image if image.mode in ("RGBA", "LA") else image.convert("RGBA" if image.mode == "RGBa" else "LA")
        paper = Image.new("L", rgba.size, 255)
        paper.paste(rgba.convert("L"), mask=rgba.getchannel("A"))
        return paper
    return image.convert("L")


def to_gray(image: Image.Image) -> np.ndarray:
    """Float32 array in [0, 1], at most WORK_SIDE a side: alpha composited onto white, EXIF rotation
    applied, 16-bit scaled, reduced by whole-pixel boxes before any float array exists."""
    orientation = image.getexif().get(0x0112)
    gray = _one_channel(image)
    factor = -(-max(gray.size) // WORK_SIDE)
    if factor > 1:
        gray = gray.reduce(factor)
    if orientation in _ORIENTATION:
        gray = gray.transpose(_ORIENTATION[orientation])
    if gray.mode == "I":
        return np.clip(np.asarray(gray, dtype=np.float32) / np.float32(65535.0), 0.0, 1.0)
    if gray.mode == "F":
        # Float images may hold NaN or ±inf: no ink, full ink.
        return np.clip(np.nan_to_num(np.asarray(gray, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return np.asarray(gray, dtype=np.float32) / np.float32(255.0)


def _border(gray: np.ndarray) -> np.ndarray:
    width = max(1, min(gray.shape) // 20)
    return np.concatenate(
        [gray[:width].ravel(), gray[-width:].ravel(), gray[:, :width].ravel(), gray[:, -width:].ravel()]
    )


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """A 28×28 float array in [0, 1], white ink on black, as MNIST digits are."""
    paper = float(np.median(_border(gray)))
    if paper > 0.5:  # dark ink on light paper
        gray, paper = 1.0 - gray, 1.0 - paper
    ink = float(gray.max())
    if ink - paper < MIN_CONTRAST:
        raise ImageError("blank image: no ink found")
    gray = np.clip((gray - paper) / (ink - paper), 0.0, 1.0)
    gray[gray < INK_THRESHOLD] = 0.0
    rows, cols = np.nonzero(gray.any(1))[0], np.nonzero(gray.any(0))[0]
    digit = gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = digit.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = np.asarray(Image.fromarray(digit, mode="F").resize(size, Image.Resampling.LANCZOS))
    resized = np.clip(resized, 0.0, 1.0)
    mass = resized.sum()
    if not mass > 0:
        raise ImageError("blank image: no ink left after scaling")
    ys, xs = np.indices(resized.shape)
    cy, cx = (ys * resized).sum() / mass, (xs * resized).sum() / mass
    # MNIST's centre of mass sits at pixel index (14, 14) of the 28×28 canvas.
    top = int(np.clip(round(CANVAS / 2 - cy), 0, CANVAS - resized.shape[0]))
    left = int(np.clip(round(CANVAS / 2 - cx), 0, CANVAS - resized.shape[1]))
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    canvas[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return canvas


def prepare(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The 28×28 float array in [0, 1] for one encoded image.

    Raises ImageError (or a subclass) for the documented refusals only: empty, not a supported
    format, over a limit, truncated or corrupt, no pixels, blank. Any other exception is a bug in
    this module, and is left to surface as one (callers report it for that input alone)."""
    with _open(data, max_pixels) as image:
        return to_mnist(to_gray(image))


def prepare_file(path: Path, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> np.ndarray:
    """`prepare` for a file, read with `read_bounded`."""
    return prepare(read_bounded(path, max_bytes), max_pixels)
