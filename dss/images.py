"""Image bytes -> ``(image_size, image_size, 3)`` uint8 RGB array, safely and fast.

    array, info = decode_and_resize(data, image_size=224, policy="squash")

What happens to every object, in order (each refusal raises ``ImageSkip`` with a stable
``reason`` code and a message; nothing else escapes for bad bytes):

1. ``empty``: zero bytes.
2. The format is decided by content, never by the file name: Pillow may only try the
   ``ALLOWED_FORMATS`` plugins (JPEG, PNG), so a PDF/EPS named ``.jpg`` never reaches
   Ghostscript. Known other image formats (GIF, TIFF, WebP, BMP, PSD, PDF, ...) are
   ``unsupported_format``; anything else (text, an HTML error page) is ``not_an_image``.
   A JPEG/PNG signature with a header Pillow cannot parse is ``truncated``.
   An MPO (a JPEG with extra frames) or an animated PNG gives its first frame.
3. Size, from the header, before any pixel is decoded: more than ``max_pixels`` pixels is
   ``too_many_pixels`` (Pillow's own warning limit, ``Image.MAX_IMAGE_PIXELS``, is escalated
   to the same refusal, so the effective cap is the smaller of the two); more than twice
   Pillow's limit is refused by Pillow itself at open (``decompression_bomb``). A side below
   ``min_side`` pixels is ``too_small``; a long/short side ratio above ``max_aspect`` is
   ``bad_aspect``. A mode outside ``SUPPORTED_MODES`` is ``unsupported_mode``.
4. Decode. JPEGs are decoded with ``draft``: libjpeg's DCT scaling reduces by 1/2, 1/4 or
   1/8 while decoding, never below the size the output needs, which is most of the speed.
   A cut-off file is ``truncated`` (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set);
   other decoder failures are ``decode_error``.
5. EXIF orientation is applied (orientations 5-8 swap width and height); a missing,
   invalid (e.g. 99) or unreadable orientation tag is ignored: the pixels are still good.
6. Mode to RGB: alpha (LA, PA, RGBA, P with transparency) is composited over black, i.e.
   each colour is multiplied by its opacity, so a transparent area reads as black like the
   ``pad`` border. 16-bit grey (I;16*) is scaled by 255/65535, not clipped. 32-bit int (I)
   and float (F) pixels are scaled by their type's usual range when they fit it
   (0..255, 0..65535, or 0..1 for F) and by their actual min..max otherwise.
7. Resize to a square with ``policy``: ``squash`` (default; the whole frame, aspect not kept,
   animals at the edges survive), ``crop`` (short side to size, centre crop) or ``pad``
   (fit inside, black border). Pillow's resampling filters are antialiased when reducing.

``info`` describes the source: ``orig_width``/``orig_height`` (after EXIF orientation),
``orig_mode``, ``format`` and ``was_grey`` (grey source pixels: a grey mode, or RGB whose
channels agree within ``GREY_TOLERANCE`` levels on average, measured on the reduced image).
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
import threading
import warnings
import zlib
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageChops

ALLOWED_FORMATS = ("JPEG", "PNG")
RESIZE_POLICIES = ("squash", "crop", "pad")

# A camera-trap frame is at most ~24 MP; 40 MP leaves room and refuses anything absurd.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MIN_SIDE = 8  # pixels
DEFAULT_MAX_ASPECT = 20.0  # long side / short side

# Filter for the final resize. Pillow's filters widen their support when reducing, so none
# of these alias. HAMMING costs about what BILINEAR does and lands closer to a LANCZOS resize of
# the uncompressed frame (docs/benchmarks.md, "Design notes from measurements").
# reducing_gap: for big reductions (large PNGs) box-reduce by an integer factor first, keeping
# at least 2x the output size for the filter (Pillow: indistinguishable from a full resample).
RESAMPLE = Image.Resampling.HAMMING
REDUCING_GAP = 2.0

# Mean |max(R,G,B) - min(R,G,B)| in 8-bit levels below which an RGB image counts as grey;
# night IR frames stored as RGB JPEG decode to exactly equal channels, up to a level or two.
GREY_TOLERANCE = 2.0

GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
SUPPORTED_MODES = GREY_MODES + ("P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")

_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_ALLOWED_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))
_OTHER_MAGIC = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
)

# What Pillow's parsers and decoders raise on malformed bytes (its fuzzers find all of these).
_PILLOW_DATA_ERRORS = (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError,
                       ZeroDivisionError, OverflowError, struct.error, zlib.error)


SKIP_REASONS = ("empty", "not_an_image", "unsupported_format", "truncated", "decompression_bomb",
                "too_many_pixels", "too_small", "bad_aspect", "unsupported_mode", "decode_error")

_WARNINGS_LOCK = threading.Lock()


class ImageSkip(Exception):
    """An image that cannot be used; ``reason`` is one of SKIP_REASONS, str() says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        # Survives pickling (a process pool sends it back to the parent) with its reason.
        return (type(self), (self.reason, str(self)))


def sniff_format(data: bytes) -> str | None:
    """"JPEG" or "PNG" from the leading magic bytes, else None (no decoding)."""
    for magic, name in _ALLOWED_MAGIC:
        if data.startswith(magic):
            return name
    return None


def _sniff_other_format(data: bytes) -> str | None:
    """The name of a known image/document format we do not accept, else None."""
    for magic, name in _OTHER_MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis"):
        return "HEIF/AVIF"
    return None


def decode_and_resize(
    data: bytes,
    image_size: int,
    policy: str = "squash",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    min_side: int = DEFAULT_MIN_SIDE,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    use_draft: bool = True,
) -> tuple[np.ndarray, dict]:
    """Decode JPEG/PNG ``data`` to a C-contiguous uint8 array (image_size, image_size, 3).

    Returns ``(array, info)`` with info keys orig_width, orig_height (after EXIF orientation),
    orig_mode, format, was_grey. Raises ImageSkip for every unusable input (see the module
    docstring for the reasons and the alpha/bit-depth policies). ``use_draft=False`` decodes
    JPEGs at full resolution (slower; for comparison only).
    """
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy {policy!r} is not one of {RESIZE_POLICIES}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if not data:
        raise ImageSkip("empty", "zero-byte object")

    img = _open(data)
    with img:
        width, height = img.size
        _check_size(width, height, max_pixels, min_side, max_aspect)
        orig_mode = img.mode
        if orig_mode not in SUPPORTED_MODES:
            raise ImageSkip("unsupported_mode", f"pixel mode {orig_mode!r} is not supported")
        image_format = img.format

        try:
            if use_draft and image_format in ("JPEG", "MPO"):
                # Orientation does not matter here: every policy's needed size is symmetric.
                img.draft(orig_mode, _draft_target(width, height, image_size, policy))
            img.load()
        except _PILLOW_DATA_ERRORS as exc:
            raise _decode_skip(exc) from exc

        decoded = img
        orientation = _read_orientation(img)  # after load: a PNG's eXIf chunk may follow the pixels
        transpose = _ORIENTATION_TRANSPOSE.get(orientation)
        if transpose is not None:
            decoded = decoded.transpose(transpose)
            if orientation >= 5:
                width, height = height, width
        rgb, grey_mode = to_rgb(decoded)
        resized, content = _resize(rgb, image_size, policy)

    array = np.array(resized, dtype=np.uint8)  # owned, writeable, C-contiguous (S, S, 3)
    info = {
        "orig_width": width,
        "orig_height": height,
        "orig_mode": orig_mode,
        "format": image_format,
        "was_grey": bool(grey_mode or _looks_grey(content)),
    }
    return array, info


def decode_each(blobs: Iterable[bytes], image_size: int, policy: str = "squash", max_pixels: int = DEFAULT_MAX_PIXELS,
                refusals: tuple[type[Exception], ...] = (ImageSkip,)) -> Iterator[tuple[np.ndarray, dict] | Exception]:
    """``decode_and_resize`` each byte string in turn, lazily (one decoded image held at a time): yields
    ``(array, info)``, or the exception (one of ``refusals``) that refused that image, so one bad image
    never stops the others. Hosting and preprocess both decode through here: the same pixels."""
    for data in blobs:
        try:
            yield decode_and_resize(data, image_size, policy, max_pixels)
        except refusals as refusal:
            yield refusal


# --------------------------------------------------------------------------- open and check
@contextlib.contextmanager
def _pillow_warnings_policy() -> Iterator[None]:
    """Header-parsing warnings (e.g. corrupt EXIF) are ignored: a bad tag is dropped anyway.
    Pillow's DecompressionBombWarning (between MAX_IMAGE_PIXELS and twice that) is raised.

    catch_warnings swaps the process-wide filter list; the lock stops decode threads from
    restoring each other's filters (the guarded calls parse headers only: microseconds).
    """
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _open(data: bytes) -> Image.Image:
    """Image.open restricted to ALLOWED_FORMATS, with every failure mapped to an ImageSkip."""
    try:
        with _pillow_warnings_policy():
            return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageSkip("decompression_bomb", f"refused by Pillow before decoding: {exc}") from exc
    except Image.DecompressionBombWarning as exc:
        raise ImageSkip("too_many_pixels", f"over Pillow's pixel limit, not decoded: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise _identify_skip(data) from exc
    except _PILLOW_DATA_ERRORS as exc:
        if sniff_format(data) is None:
            raise _identify_skip(data) from exc
        raise _decode_skip(exc, header=True) from exc


def _identify_skip(data: bytes) -> ImageSkip:
    """Why Pillow could not identify ``data`` as JPEG or PNG."""
    allowed = sniff_format(data)
    if allowed is not None:
        return ImageSkip(
            "truncated",
            f"{allowed} signature but the header cannot be parsed "
            f"({len(data)} bytes: truncated or corrupt)",
        )
    other = _sniff_other_format(data)
    if other is not None:
        return ImageSkip("unsupported_format", f"{other} content; only {', '.join(ALLOWED_FORMATS)} are accepted")
    return ImageSkip("not_an_image", f"not a JPEG or PNG image (starts with {data[:16]!r})")


def _decode_skip(exc: Exception, header: bool = False) -> ImageSkip:
    where = "header" if header else "pixel data"
    message = f"{where}: {type(exc).__name__}: {exc}"
    if "truncated" in str(exc).lower():
        return ImageSkip("truncated", message)
    return ImageSkip("decode_error", message)


def _check_size(width: int, height: int, max_pixels: int, min_side: int, max_aspect: float) -> None:
    pixels = width * height
    if pixels > max_pixels:
        raise ImageSkip("too_many_pixels", f"{width}x{height} = {pixels} pixels is over the cap of {max_pixels}")
    if min(width, height) < min_side:
        raise ImageSkip("too_small", f"{width}x{height}: a side is under the minimum of {min_side} px")
    aspect = max(width, height) / min(width, height)
    if aspect > max_aspect:
        raise ImageSkip("bad_aspect", f"{width}x{height}: aspect ratio {aspect:.1f} is over {max_aspect:g}")


def _read_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag, or 1 when absent, invalid or unreadable."""
    try:
        with _pillow_warnings_policy():
            orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except _PILLOW_DATA_ERRORS:
        return 1
    return orientation if isinstance(orientation, int) else 1


def _draft_target(width: int, height: int, image_size: int, policy: str) -> tuple[int, int]:
    """Smallest source size (w, h) that still covers the output of ``policy``.

    squash needs both sides >= image_size; crop needs the short side >= image_size; pad needs
    the long side >= image_size (both sides scaled together). JPEG draft never goes below it.
    """
    if policy == "squash":
        return image_size, image_size
    side = min(width, height) if policy == "crop" else max(width, height)
    scale = image_size / side
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


# --------------------------------------------------------------------------- pixels
def to_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """(RGB image, whether the source mode is grey) for any mode in SUPPORTED_MODES.

    Alpha is composited over black; 16/32-bit and float pixels are scaled to 8 bits
    (see ``_scale_to_uint8``). Other modes raise ImageSkip("unsupported_mode").
    """
    mode = img.mode
    if mode not in SUPPORTED_MODES:
        raise ImageSkip("unsupported_mode", f"pixel mode {mode!r} is not supported")
    if mode == "RGB":
        return img, False
    if mode in ("L", "1"):
        return img.convert("RGB"), True
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(img), mode)).convert("RGB"), True
    if mode in ("LA", "La"):
        grey, alpha = img.convert("LA").split()
        return _over_black(grey.convert("RGB"), alpha), True
    if mode == "P":
        if "transparency" in img.info:
            rgba = img.convert("RGBA")
            return _over_black(rgba.convert("RGB"), rgba.getchannel("A")), False
        return img.convert("RGB"), False
    if mode in ("PA", "RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        return _over_black(rgba.convert("RGB"), rgba.getchannel("A")), False
    return img.convert("RGB"), False  # RGBX, CMYK, YCbCr


def _over_black(rgb: Image.Image, alpha: Image.Image) -> Image.Image:
    """Composite over black: each channel * alpha / 255."""
    return ImageChops.multiply(rgb, Image.merge("RGB", (alpha, alpha, alpha)))


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit int or float pixels (H, W) -> uint8 (H, W), scaled, never clipped.

    I;16*: by the 16-bit range. I and F: by the range their values fit (0..255 as is,
    0..65535 like I;16, 0..1 for F), else stretched from their actual min..max.
    """
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and 255 < high <= 65535):
        scaled = values * (255.0 / 65535.0)
    elif low >= 0 and high <= 1.0 and mode == "F":
        scaled = values * 255.0
    elif low >= 0 and high <= 255:
        scaled = values
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.rint(scaled).astype(np.uint8)


def _resize(rgb: Image.Image, image_size: int, policy: str) -> tuple[Image.Image, Image.Image]:
    """(square output, its image content): the content excludes the black border of ``pad``."""
    width, height = rgb.size
    square = (image_size, image_size)
    if policy == "squash":
        resized = rgb.resize(square, RESAMPLE, reducing_gap=REDUCING_GAP)
        return resized, resized
    if policy == "crop":
        # Resize only the centred square of side min(w, h): crop and resize in one pass.
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
        resized = rgb.resize(square, RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
        return resized, resized
    scale = image_size / max(width, height)
    fitted_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    fitted = rgb.resize(fitted_size, RESAMPLE, reducing_gap=REDUCING_GAP)
    canvas = Image.new("RGB", square)  # black
    canvas.paste(fitted, ((image_size - fitted_size[0]) // 2, (image_size - fitted_size[1]) // 2))
    return canvas, fitted


def _looks_grey(rgb: Image.Image) -> bool:
    """Mean per-pixel channel spread, max(R,G,B) - min(R,G,B), within GREY_TOLERANCE levels.
    Pillow channel ops and a histogram: far cheaper than numpy reductions (docs/benchmarks.md)."""
    red, green, blue = rgb.split()
    highest = ImageChops.lighter(ImageChops.lighter(red, green), blue)
    lowest = ImageChops.darker(ImageChops.darker(red, green), blue)
    counts = ImageChops.difference(highest, lowest).histogram()  # 256 bins of spread levels
    mean_spread = sum(level * count for level, count in enumerate(counts)) / (rgb.width * rgb.height)
    return mean_spread <= GREY_TOLERANCE
