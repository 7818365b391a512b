"""dss.images on real Pillow-encoded JPEG/PNG bytes: refusals (ROBUSTNESS A1-A3, A5, A6, A8-A11),
modes, EXIF orientation, resize policies and the JPEG draft shortcut."""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from dss import images
from dss.images import ImageSkip, decode_and_resize

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def skip_reason(data: bytes, image_size: int = 32, **kwargs) -> str:
    with pytest.raises(ImageSkip) as caught:
        decode_and_resize(data, image_size, **kwargs)
    assert str(caught.value), "every skip carries a human message"
    return caught.value.reason


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def black_1bit_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG built row by row, so the test never holds width*height bytes."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A smooth 960x540 RGB frame (a camera-trap frame size) with some texture."""
    rng = np.random.default_rng(7)
    coarse = Image.fromarray(rng.integers(0, 256, (9, 16, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((960, 540), Image.Resampling.BICUBIC), dtype=np.int16)
    texture = rng.integers(-8, 9, smooth.shape)
    return Image.fromarray(np.clip(smooth + texture, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def small_jpeg() -> bytes:
    rng = np.random.default_rng(1)
    return encode(Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)), "JPEG", quality=90)


@pytest.fixture(scope="module")
def small_png() -> bytes:
    rng = np.random.default_rng(2)
    return encode(Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)), "PNG")


def thirds_image(width: int = 96, height: int = 32) -> Image.Image:
    """Vertical bands green | red | blue, each width/3 wide."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    third = width // 3
    pixels[:, :third] = GREEN
    pixels[:, third : 2 * third] = RED
    pixels[:, 2 * third :] = BLUE
    return Image.fromarray(pixels)


# --------------------------------------------------------------------------- good images
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decodes_to_contiguous_uint8_square(photo, fmt):
    array, info = decode_and_resize(encode(photo, fmt), 64)
    assert array.shape == (64, 64, 3) and array.dtype == np.uint8
    assert array.flags["C_CONTIGUOUS"] and array.flags["WRITEABLE"]
    assert info == {"orig_width": 960, "orig_height": 540, "orig_mode": "RGB", "format": fmt, "was_grey": False}


def test_format_is_decided_by_content_not_name(small_png):
    # The bytes are all there is: a PNG is a PNG whatever its key says.
    _, info = decode_and_resize(small_png, 16)
    assert info["format"] == "PNG"
    assert images.sniff_format(small_png) == "PNG"
    assert images.sniff_format(b"\xff\xd8\xff\xe0rest") == "JPEG"
    assert images.sniff_format(b"GIF89a") is None


def test_grey_detection(photo):
    grey_as_rgb = encode(photo.convert("L").convert("RGB"), "JPEG", quality=90)
    assert decode_and_resize(grey_as_rgb, 64)[1]["was_grey"] is True
    assert decode_and_resize(encode(photo.convert("L"), "JPEG"), 64)[1]["was_grey"] is True
    assert decode_and_resize(encode(photo, "JPEG"), 64)[1]["was_grey"] is False
    # pad's black border must not make a colour image look grey
    assert decode_and_resize(encode(photo, "JPEG"), 64, "pad")[1]["was_grey"] is False


@pytest.mark.parametrize("policy", images.RESIZE_POLICIES)
def test_draft_matches_full_decode(photo, policy):
    data = encode(photo, "JPEG", quality=92)
    drafted, info_drafted = decode_and_resize(data, 224, policy)
    full, info_full = decode_and_resize(data, 224, policy, use_draft=False)
    assert info_drafted == info_full
    mean_abs_diff = np.abs(drafted.astype(np.int16) - full.astype(np.int16)).mean()
    assert mean_abs_diff < 2.0, f"{policy}: draft differs from the full decode by {mean_abs_diff:.2f} levels"


# --------------------------------------------------------------------------- policies
def test_squash_keeps_the_whole_frame():
    array, _ = decode_and_resize(encode(thirds_image(), "PNG"), 30, "squash")
    assert array.shape == (30, 30, 3)
    np.testing.assert_array_equal(array[:, 2], np.tile(GREEN, (30, 1)))
    np.testing.assert_array_equal(array[:, 15], np.tile(RED, (30, 1)))
    np.testing.assert_array_equal(array[:, 27], np.tile(BLUE, (30, 1)))


def test_crop_keeps_the_centre_square():
    array, _ = decode_and_resize(encode(thirds_image(), "PNG"), 32, "crop")
    assert array.shape == (32, 32, 3)
    np.testing.assert_array_equal(array, np.tile(RED, (32, 32, 1)).astype(np.uint8))


def test_pad_fits_inside_with_black_border():
    array, info = decode_and_resize(encode(thirds_image(), "PNG"), 32, "pad")
    assert array.shape == (32, 32, 3)
    # 96x32 fits as 32x11, centred vertically: rows 10..20 hold the image
    assert not array[:10].any() and not array[21:].any()
    np.testing.assert_array_equal(array[15, 16], RED)
    np.testing.assert_array_equal(array[15, 2], GREEN)
    np.testing.assert_array_equal(array[15, 29], BLUE)
    assert (info["orig_width"], info["orig_height"]) == (96, 32)


def test_unknown_policy_is_a_programming_error(small_png):
    with pytest.raises(ValueError, match="resize policy"):
        decode_and_resize(small_png, 16, "stretch")


def test_decode_each_yields_the_refusal_and_goes_on(small_jpeg, small_png):
    """The one decode path of preprocess and hosting: in input order, a refused image is yielded as
    its ImageSkip (not raised) and the images after it are still decoded, lazily."""
    decoded = images.decode_each(iter([small_jpeg, b"not an image", small_png]), 16, "squash")
    first = next(decoded)
    array, info = first
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8 and info["format"] == "JPEG"
    assert np.array_equal(array, decode_and_resize(small_jpeg, 16, "squash")[0])
    refused = next(decoded)
    assert isinstance(refused, ImageSkip) and refused.reason == "not_an_image"
    assert next(decoded)[1]["format"] == "PNG"
    assert next(decoded, None) is None


def test_decode_each_yields_other_refusals_only_when_asked(small_jpeg, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(images, "decode_and_resize", broken)
    (outcome,) = images.decode_each([small_jpeg], 16, refusals=(Exception,))
    assert isinstance(outcome, RuntimeError)
    with pytest.raises(RuntimeError, match="decoder bug"):
        list(images.decode_each([small_jpeg], 16))


# --------------------------------------------------------------------------- A1, A2, A8
def test_a1_empty():
    assert skip_reason(b"") == "empty"


@pytest.mark.parametrize(
    "data",
    [b"just some text\n", b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>", b"<html>502</html>"],
)
def test_a2_text_and_error_pages(data):
    assert skip_reason(data) == "not_an_image"


@pytest.mark.parametrize(
    "data", [b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"]
)
def test_a2_pdf_and_eps_never_reach_ghostscript(data, monkeypatch):
    def ghostscript_called(*args, **kwargs):
        raise AssertionError("Ghostscript must never be called")

    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript_called)
    assert skip_reason(data) == "unsupported_format"


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "WEBP", "BMP"])
def test_a8_other_formats_are_unsupported(fmt):
    frames = [Image.new("RGB", (32, 32), colour) for colour in (RED, GREEN)]
    if fmt in ("GIF", "TIFF", "WEBP"):  # animated / multipage
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    else:
        data = encode(frames[0], fmt)
    assert skip_reason(data) == "unsupported_format"


# --------------------------------------------------------------------------- A3
@pytest.mark.parametrize("fixture_name", ["small_jpeg", "small_png"])
@pytest.mark.parametrize("keep", ["half", 100, 10])
def test_a3_truncated(request, fixture_name, keep):
    data = request.getfixturevalue(fixture_name)
    cut = len(data) // 2 if keep == "half" else keep
    assert skip_reason(data[:cut]) == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupted_bytes_never_raise_anything_but_imageskip(small_jpeg, small_png):
    rng = np.random.default_rng(3)
    for data in (small_jpeg, small_png):
        for _ in range(150):
            damaged = bytearray(data)
            for position in rng.integers(0, len(data), size=rng.integers(1, 20)):
                damaged[position] = rng.integers(0, 256)
            try:
                array, _ = decode_and_resize(bytes(damaged), 16)
            except ImageSkip as skip:
                assert skip.reason in images.SKIP_REASONS
            else:
                assert array.shape == (16, 16, 3) and array.dtype == np.uint8
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --------------------------------------------------------------------------- A5, A6
def test_a5_a6_pixel_bombs_are_refused_from_the_header_without_a_large_allocation():
    # A fresh process, so its peak RSS measures only this work; a decode would need >= 144 MB.
    script = """
import json, resource, sys
sys.path.insert(0, ".")
from tests.test_images import black_1bit_png
from dss.images import ImageSkip, decode_and_resize
results = {}
for side in (20000, 12000):
    data = black_1bit_png(side, side)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        decode_and_resize(data, 32)
        results[side] = ["decoded", 0, len(data)]
    except ImageSkip as skip:
        grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        results[side] = [skip.reason, grown_kb, len(data)]
print(json.dumps(results))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    bomb_reason, bomb_growth_kb, bomb_bytes = results["20000"]
    assert bomb_reason == "decompression_bomb" and bomb_bytes < 100_000
    assert bomb_growth_kb < 20_000
    cap_reason, cap_growth_kb, _ = results["12000"]
    assert cap_reason == "too_many_pixels"
    assert cap_growth_kb < 20_000


def test_explicit_pixel_cap(small_png):
    assert skip_reason(small_png, max_pixels=64 * 48 - 1) == "too_many_pixels"
    assert decode_and_resize(small_png, 16, max_pixels=64 * 48)[0].shape == (16, 16, 3)


# --------------------------------------------------------------------------- A9
def jpeg_with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def left_red_right_blue(width: int = 64, height: int = 32) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return Image.fromarray(pixels)


@pytest.mark.parametrize("orientation, top_colour", [(6, RED), (8, BLUE)])
def test_a9_orientation_6_and_8_rotate_and_swap_sides(orientation, top_colour):
    array, info = decode_and_resize(jpeg_with_orientation(left_red_right_blue(), orientation), 32)
    assert (info["orig_width"], info["orig_height"]) == (32, 64)
    # 6 = rotate 90 clockwise to display (the left edge goes on top); 8 = counter-clockwise
    assert np.abs(array[4, 16].astype(int) - top_colour).max() < 40
    assert np.abs(array[28, 16].astype(int) - (BLUE if top_colour == RED else RED)).max() < 40


@pytest.mark.parametrize("orientation", [1, 99, 0])
def test_a9_normal_or_invalid_orientation_is_ignored(orientation):
    array, info = decode_and_resize(jpeg_with_orientation(left_red_right_blue(), orientation), 32)
    assert (info["orig_width"], info["orig_height"]) == (64, 32)
    assert np.abs(array[16, 4].astype(int) - RED).max() < 40
    assert np.abs(array[16, 28].astype(int) - BLUE).max() < 40


# --------------------------------------------------------------------------- A10
def mode_cases() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(4)
    grey = Image.fromarray(rng.integers(0, 256, (24, 32), dtype=np.uint8))
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return [
        ("1", encode(grey.convert("1"), "PNG")),
        ("L", encode(grey, "PNG")),
        ("L", encode(grey, "JPEG")),
        ("P", encode(palette, "PNG")),
        ("P", encode(palette, "PNG", transparency=0)),
        ("LA", encode(grey.convert("LA"), "PNG")),
        ("RGBA", encode(rgb.convert("RGBA"), "PNG")),
        ("CMYK", encode(rgb.convert("CMYK"), "JPEG")),
        ("I;16", encode(Image.fromarray(rng.integers(0, 65536, (24, 32), dtype=np.uint16)), "PNG")),
        ("RGB", encode(rgb.convert("YCbCr"), "JPEG")),
    ]


@pytest.mark.parametrize("mode, data", mode_cases())
def test_a10_every_mode_becomes_rgb_uint8(mode, data):
    array, info = decode_and_resize(data, 20)
    assert array.shape == (20, 20, 3) and array.dtype == np.uint8 and array.flags["C_CONTIGUOUS"]
    assert info["orig_mode"] == mode


def test_a10_i16_is_scaled_not_clipped():
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16).repeat(8, axis=0).repeat(8, axis=1)
    array, info = decode_and_resize(encode(Image.fromarray(values), "PNG"), 32, min_side=1)
    assert info["orig_mode"] == "I;16" and info["was_grey"] is True
    assert array[0, ::8, 0].tolist() == [0, 4, 128, 255]
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()


def test_a10_alpha_is_composited_over_black():
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:8] = (200, 100, 50, 255)  # opaque
    rgba[8:] = (200, 100, 50, 128)  # half transparent
    rgba[8:, 8:] = (200, 100, 50, 0)  # fully transparent
    array, _ = decode_and_resize(encode(Image.fromarray(rgba), "PNG"), 16)
    assert array[0, 0].tolist() == [200, 100, 50]
    assert np.abs(array[12, 0].astype(int) - (100, 50, 25)).max() <= 1
    assert array[12, 12].tolist() == [0, 0, 0]


def test_a10_palette_transparency_is_black():
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.paste(0, (0, 0, 8, 16))
    array, _ = decode_and_resize(encode(palette, "PNG", transparency=1), 16)
    assert not array[:, 8:].any()  # the transparent index reads as black


@pytest.mark.parametrize(
    "mode, values, expected",
    [
        ("I", np.array([[0, 100, 255]], dtype=np.int32), [0, 100, 255]),
        ("I", np.array([[0, 32768, 65535]], dtype=np.int32), [0, 128, 255]),
        ("I", np.array([[-1000, 0, 1000]], dtype=np.int32), [0, 128, 255]),
        ("F", np.array([[0.0, 0.5, 1.0]], dtype=np.float32), [0, 128, 255]),
        ("F", np.array([[-2.0, 0.0, 2.0]], dtype=np.float32), [0, 128, 255]),
    ],
)
def test_a10_wide_modes_are_scaled_by_their_range(mode, values, expected):
    img = Image.fromarray(values)
    assert img.mode == mode
    rgb, grey = images.to_rgb(img)
    assert rgb.mode == "RGB" and grey is True
    assert np.asarray(rgb)[0, :, 0].tolist() == expected


@pytest.mark.parametrize("mode", ["HSV", "LAB"])
def test_a10_unknown_modes_are_rejected(mode):
    with pytest.raises(ImageSkip) as caught:
        images.to_rgb(Image.new(mode, (8, 8)))
    assert caught.value.reason == "unsupported_mode"


# --------------------------------------------------------------------------- A11
@pytest.mark.parametrize("size, reason", [((1, 1), "too_small"), ((1, 10000), "too_small"), ((10, 300), "bad_aspect")])
def test_a11_tiny_and_thin_images_are_refused_by_policy(size, reason):
    assert skip_reason(encode(Image.new("RGB", size, RED), "PNG")) == reason


@pytest.mark.parametrize("size", [(1, 1), (1, 10000), (10000, 1)])
@pytest.mark.parametrize("policy", images.RESIZE_POLICIES)
def test_a11_tiny_and_thin_images_resize_when_allowed(size, policy):
    data = encode(Image.new("RGB", size, RED), "PNG")
    array, info = decode_and_resize(data, 16, policy, min_side=1, max_aspect=float("inf"))
    assert array.shape == (16, 16, 3)
    assert (info["orig_width"], info["orig_height"]) == size
    assert tuple(array.reshape(-1, 3).max(axis=0)) == RED


def test_a9_png_orientation_and_truncated_png_with_exif():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(left_red_right_blue(), "PNG", exif=exif.tobytes())
    array, info = decode_and_resize(data, 32)
    assert (info["orig_width"], info["orig_height"]) == (32, 64)
    np.testing.assert_array_equal(array[4, 16], RED)
    # reading the orientation must not hide a truncated pixel stream
    assert skip_reason(data[: len(data) // 2]) == "truncated"


def test_corrupt_png_pixel_stream_is_refused_not_half_decoded(small_png):
    # Overwrite bytes inside the zlib stream of IDAT (the chunk CRC is not checked for IDAT).
    idat = small_png.index(b"IDAT") + 4
    damaged = bytearray(small_png)
    damaged[idat + 100 : idat + 140] = bytes(range(40))
    assert skip_reason(bytes(damaged)) == "decode_error"


def test_imageskip_survives_pickling_for_process_pools():
    with pytest.raises(ImageSkip) as caught:
        decode_and_resize(b"<html>", 16)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.reason, str(copy)) == (caught.value.reason, str(caught.value))
