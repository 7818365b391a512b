"""A-rows not covered end to end elsewhere (see ROWS.md), and the decode-path mutation fuzz.

Fuzz property: mutated real JPEG/PNG bytes give only a C-contiguous (32, 32, 3) uint8 array or an
ImageSkip with a known reason (bench/fuzz.py runs the same oracle on thousands of cases).
"""

from __future__ import annotations

import io
import json
import struct
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import preprocess
from bench import fuzz
from dss.data import dataset
from dss import images
from dss.ingest import planning, sources
from dss.ingest import storage
from tests.conftest import run_script

SIZE = 32  # px: the smallest --image-size preprocess.py accepts
FUZZ = settings(max_examples=100, deadline=None, database=None, derandomize=True)


def encode(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


def summary_of(out) -> dict:
    return json.loads((out / "preprocessing_summary.json").read_text())


# ---------------------------------------------------------------------------- A7
def test_a7_object_above_the_cap_is_never_requested(s3_server, s3_client, tmp_path):
    """The size comes from the listing: the big object gets no GET at all, and is recorded."""
    bucket = f"a7-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    small = encode(Image.new("RGB", (24, 20), (9, 9, 9)), "JPEG")
    s3_client.put_object(Bucket=bucket, Key="new/small.jpg", Body=small)
    s3_client.put_object(Bucket=bucket, Key="new/huge.jpg", Body=small + bytes(400_000))
    source = storage.open_source(f"s3://{bucket}/new/", sources.SourceOptions(endpoint_url=s3_server["endpoint"],
                                                                              max_object_bytes=200_000))
    requested = []
    source.client.meta.events.register("before-send.s3.GetObject",
                                       lambda request, **kwargs: requested.append(request.url.split("?")[0]))
    settings = planning.PreprocessSettings(input_uri=f"s3://{bucket}/new/", image_size=SIZE, policy="squash",
                                           max_pixels=images.DEFAULT_MAX_PIXELS, workers=1, download_threads=1,
                                           quiet=True)
    summary = preprocess.run(source, storage.open_output(tmp_path / "out"), settings)
    assert [url.rsplit("/", 1)[-1] for url in requested] == ["small.jpg"]
    (entry,) = summary["splits"]["test"]["skipped"]
    assert (entry["key"], entry["reason"]) == ("huge.jpg", "too_large") and "200000-byte cap" in entry["message"]


# ---------------------------------------------------------------------------- A8 PSD
def minimal_psd(pixels: np.ndarray) -> bytes:
    """An uncompressed 8-bit RGB Photoshop file for ``pixels`` (H, W, 3) uint8, written by hand
    (Pillow reads PSD but cannot write it): 26-byte header, empty colour-mode-data, image-resources
    and layer/mask sections, then compression 0 and the channels as planes (all R, then G, then B)."""
    height, width, channels = pixels.shape
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, channels, height, width, 8, 3)  # version 1, depth 8, RGB = 3
    empty_sections = struct.pack(">III", 0, 0, 0)
    planes = np.ascontiguousarray(pixels.transpose(2, 0, 1)).tobytes()
    return header + empty_sections + struct.pack(">H", 0) + planes


@pytest.fixture
def psd_bytes() -> tuple[bytes, np.ndarray]:
    pixels = np.random.default_rng(8).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    data = minimal_psd(pixels)
    # Not vacuous: Pillow itself opens and decodes it as a PSD with exactly these pixels.
    with Image.open(io.BytesIO(data)) as img:
        assert (img.format, img.mode, img.size) == ("PSD", "RGB", (30, 20))
        assert np.array_equal(np.asarray(img.convert("RGB")), pixels)
    return data, pixels


def test_a8_psd_is_refused_as_unsupported_format(psd_bytes):
    data, _ = psd_bytes
    try:
        images.decode_and_resize(data, SIZE)
    except images.ImageSkip as skip:
        assert skip.reason == "unsupported_format" and "PSD" in str(skip)
    else:
        raise AssertionError("a PSD file was decoded; only JPEG and PNG are allowed")


def test_a8_psd_under_an_image_name_is_a_recorded_skip(psd_bytes, tmp_path):
    """End to end: a PSD stored as photoshop.jpg is skipped with its key and reason, the JPEG next
    to it is written, and a file named .psd is not an image key at all (ignored, with a warning)."""
    data, pixels = psd_bytes
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "photoshop.jpg").write_bytes(data)
    (folder / "layers.psd").write_bytes(data)
    (folder / "ok.jpg").write_bytes(encode(Image.fromarray(pixels), "JPEG"))
    out = tmp_path / "out"
    result = run_script("preprocess.py", ["--input", folder, "--output-dir", out, "--image-size", SIZE,
                                          "--workers", 1])
    assert result.returncode == 0, result.stdout + result.stderr
    split = summary_of(out)["splits"]["test"]
    (entry,) = split["skipped"]
    assert (entry["key"], entry["reason"]) == ("photoshop.jpg", "unsupported_format") and "PSD" in entry["message"]
    assert split["listed"] == 2 and split["written"] == 1
    assert split["notes"]["ignored_keys"]["examples"] == ["layers.psd"]
    assert dataset.load_split(out, "test")["ids"] == ["ok"]


# ---------------------------------------------------------------------------- A11 + A13 end to end
def test_a11_a13_tiny_thin_and_same_id_files_are_recorded_skips(tmp_path):
    """Images-only folder: 1x1 and 1x10000 are refused by the min-side/aspect policy, a.jpg and
    A.JPG are one id (the first key in sorted order wins, the other is a duplicate_id skip)."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "one.png").write_bytes(encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"))
    (folder / "thin.png").write_bytes(encode(Image.new("RGB", (1, 10000), (255, 0, 0)), "PNG"))
    (folder / "wide.png").write_bytes(encode(Image.new("RGB", (400, 10), (255, 0, 0)), "PNG"))
    (folder / "a.jpg").write_bytes(encode(Image.new("RGB", (30, 20), (0, 255, 0)), "JPEG"))
    (folder / "A.JPG").write_bytes(encode(Image.new("RGB", (30, 20), (0, 0, 255)), "JPEG"))
    out = tmp_path / "out"
    result = run_script("preprocess.py", ["--input", folder, "--output-dir", out, "--image-size", SIZE,
                                          "--workers", 1])
    assert result.returncode == 0, result.stdout + result.stderr
    split = summary_of(out)["splits"]["test"]
    assert {(e["key"], e["reason"]) for e in split["skipped"]} == {
        ("one.png", "too_small"), ("thin.png", "too_small"), ("wide.png", "bad_aspect"), ("a.jpg", "duplicate_id")}
    assert "already taken by A.JPG" in next(e["message"] for e in split["skipped"] if e["key"] == "a.jpg")
    assert split["listed"] == 5 and split["written"] == 1
    assert dataset.load_split(out, "test")["ids"] == ["A"]


def test_a13_one_id_with_two_files_in_the_train_folder_is_one_sample_and_a_warning(tmp_path):
    """Labels CSV without filepaths: id x has x.jpg and x.png -> one sample (first key), a warning."""
    root = tmp_path / "data"
    (root / "train_features").mkdir(parents=True)
    (root / "train_features" / "x.jpg").write_bytes(encode(Image.new("RGB", (30, 20), (0, 255, 0)), "JPEG"))
    (root / "train_features" / "x.png").write_bytes(encode(Image.new("RGB", (30, 20), (0, 0, 255)), "PNG"))
    (root / "train_features" / "y.jpg").write_bytes(encode(Image.new("RGB", (30, 20), (9, 9, 9)), "JPEG"))
    (root / "train_labels.csv").write_text("id,label\nx,cat\ny,dog\n")
    out = tmp_path / "out"
    result = run_script("preprocess.py", ["--input", root, "--output-dir", out, "--image-size", SIZE, "--workers", 1])
    assert result.returncode == 0, result.stdout + result.stderr
    data = dataset.load_split(out, "train")
    assert data["ids"] == ["x", "y"]
    assert data["meta"]["source_key"][0] == "train_features/x.jpg"
    split = summary_of(out)["splits"]["train"]
    assert any("id 'x' has 2 files" in warning for warning in split["warnings"])
    assert split["notes"]["unreferenced_objects"]["examples"] == ["train_features/x.png"]


# ---------------------------------------------------------------------------- fuzz
def test_image_seeds_decode():
    assert [fuzz.check_image(seed) for seed in fuzz.image_seeds()] == ["ok"] * len(fuzz.image_seeds())


@FUZZ
@given(rng=st.randoms(use_true_random=False), seed_index=st.integers(0, len(fuzz.image_seeds()) - 1))
def test_a3_a4_mutated_real_images_give_an_array_or_a_recorded_skip(rng, seed_index):
    fuzz.check_image(fuzz.mutate(fuzz.image_seeds()[seed_index], rng, fuzz.IMAGE_TOKENS))


@FUZZ
@given(data=st.binary(max_size=400))
def test_a2_arbitrary_bytes_give_an_array_or_a_recorded_skip(data):
    fuzz.check_image(data)


@FUZZ
@given(seed_index=st.integers(0, len(fuzz.image_seeds()) - 1), cut=st.floats(0, 1, exclude_max=True))
def test_a3_any_truncation_gives_an_array_or_a_recorded_skip(seed_index, cut):
    seed = fuzz.image_seeds()[seed_index]
    fuzz.check_image(seed[: int(len(seed) * cut)])
