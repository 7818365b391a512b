"""preprocess.py end to end: real subprocess runs on folders and on a moto S3 server over HTTP.

S3 faults moto cannot produce (503s, 403s) are injected with botocore ``before-send`` hooks on the
client the library creates; those tests drive ``preprocess.run`` in-process.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import preprocess
from dss.ingest import building, planning, publishing, records, sources, splitfile
from dss.data import dataset
from dss import images
from dss.ingest import storage
from tests.conftest import REPO_ROOT, clean_env, run_script
from tests.test_sources import CorruptInTransit, CountingHook, error_response, noisy_jpeg, zero_middle

SIZE = 32  # stored px in these tests: small and fast


# ---------------------------------------------------------------------------- helpers
def jpeg(width=40, height=30, colour=(120, 60, 30), mode="RGB", exif_orientation=None) -> bytes:
    image = Image.new(mode, (width, height), colour if mode != "CMYK" else (0, 128, 255, 0))
    buffer = io.BytesIO()
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    image.save(buffer, "JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def png(width=40, height=30, mode="RGBA", colour=(0, 200, 0, 128)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(side=20000) -> bytes:
    """A 1-bit side x side PNG of zeros (~50 KB): Pillow must refuse it before allocating pixels."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def write_dataset(root: Path, train: dict, test: dict | None, classes=("cat", "dog"), labels_text: str | None = None):
    """Conser-vision layout from {id: (bytes, class name, site)} and {id: (bytes, site)}."""
    (root / "train_features").mkdir(parents=True, exist_ok=True)
    rows = ["id," + ",".join(classes)]
    features = ["id,filepath,site"]
    for image_id, (data, class_name, site) in train.items():
        if data is not None:
            (root / "train_features" / f"{image_id}.jpg").write_bytes(data)
        rows.append(image_id + "," + ",".join("1.0" if c == class_name else "0.0" for c in classes))
        features.append(f"{image_id},train_features/{image_id}.jpg,{site}")
    (root / "train_labels.csv").write_text(labels_text if labels_text is not None else "\n".join(rows) + "\n")
    (root / "train_features.csv").write_text("\n".join(features) + "\n")
    if test is not None:
        (root / "test_features").mkdir(exist_ok=True)
        lines = ["id,filepath,site"]
        for image_id, (data, site) in test.items():
            (root / "test_features" / f"{image_id}.jpg").write_bytes(data)
            lines.append(f"{image_id},test_features/{image_id}.jpg,{site}")
        (root / "test_features.csv").write_text("\n".join(lines) + "\n")
    return root


def upload_folder(s3_client, bucket: str, root: Path, prefix: str) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3_client.put_object(Bucket=bucket, Key=prefix + path.relative_to(root).as_posix(), Body=path.read_bytes())


@pytest.fixture
def bucket(s3_client):
    name = f"pre-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


def run_ok(args, env=None, cwd=None):
    result = run_script("preprocess.py", [*map(str, args)], env=env, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def read_summary(out: Path) -> dict:
    summary = json.loads((out / "preprocessing_summary.json").read_text())
    text = (out / "preprocessing_summary.txt").read_text()
    for name, split in summary["splits"].items():
        assert split["listed"] == split["written"] + split["skipped_count"] == split["written"] + len(split["skipped"])
        for entry in split["skipped"]:  # every skip is in both summaries, with key and reason
            assert entry["key"] and entry["reason"]
            assert f"{entry['key']} (id {entry['id']}): {entry['reason']}" in text
    return summary


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in ("timing", "output")}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


# ---------------------------------------------------------------------------- the main paths
def test_folder_run_lines_up_with_the_csvs_and_reruns_identically(demo_data, tmp_path):
    out = tmp_path / "out"
    result = run_ok(["--input", demo_data, "--output-dir", out, "--image-size", SIZE, "--workers", 2])
    assert "1. Processing TRAINING images..." in result.stdout and "Found 160 images" in result.stdout
    assert f"Saved {out / 'train_data.pkl'}" in result.stdout

    train = dataset.load_split(out, "train")
    labels_csv = csv_rows(demo_data / "train_labels.csv")
    class_names = list(labels_csv[0].keys())[1:]
    assert train["class_names"] == class_names
    label_of = {row["id"]: class_names.index(max(class_names, key=lambda c: float(row[c]))) for row in labels_csv}
    site_of = {row["id"]: row["site"] for row in csv_rows(demo_data / "train_features.csv")}
    assert train["ids"] == sorted(label_of)
    assert train["labels"].tolist() == [label_of[i] for i in train["ids"]]
    assert train["sites"] == [site_of[i] for i in train["ids"]]
    assert train["images"].shape == (160, SIZE, SIZE, 3) and train["images"].dtype == np.uint8
    # row i holds the image of id i: decode one file directly and compare
    probe = train["ids"][17]
    expected, _ = images.decode_and_resize((demo_data / "train_features" / f"{probe}.jpg").read_bytes(), SIZE)
    assert np.array_equal(train["images"][17], expected)

    test = dataset.load_split(out, "test")
    assert test["labels"] is None and test["class_names"] == class_names and len(test["ids"]) == 40

    metadata = csv_rows(out / "train_metadata.csv")
    assert list(metadata[0].keys()) == list(records.METADATA_COLUMNS)
    assert [row["id"] for row in metadata] == train["ids"]
    assert [row["label"] for row in metadata] == [class_names[label_of[i]] for i in train["ids"]]
    assert metadata[0]["source_key"] == f"train_features/{train['ids'][0]}.jpg"
    assert {row["label"] for row in csv_rows(out / "test_metadata.csv")} == {""}

    summary = read_summary(out)
    assert summary["splits"]["train"]["written"] == 160 and summary["splits"]["test"]["written"] == 40
    assert sum(summary["splits"]["train"]["class_counts"].values()) == 160
    assert summary["image_size"] == SIZE and summary["resize_policy"] == "squash"

    # D5: the same input again gives byte-identical pickles and metadata, same summary but timings
    before = {name: sha256(out / name) for name in ("train_data.pkl", "test_data.pkl", "train_metadata.csv",
                                                    "test_metadata.csv")}
    run_ok(["--input", demo_data, "--output-dir", out, "--image-size", SIZE, "--workers", 2, "--quiet"])
    assert before == {name: sha256(out / name) for name in before}
    assert without_timing(read_summary(out)) == without_timing(summary)


def test_s3_input_and_s3_output_match_the_folder_run(demo_data, demo_pickles, s3_server, s3_client, bucket, tmp_path):
    upload_folder(s3_client, bucket, demo_data, "data/")
    out = f"s3://{bucket}/preprocessed/"
    result = run_ok(["--input", f"s3://{bucket}/data/", "--output-dir", out, "--image-size", SIZE,
                     "--download-threads", 8], env=s3_server["env"])
    assert f"Saved s3://{bucket}/preprocessed/train_data.pkl" in result.stdout
    local = tmp_path / "fetched"
    local.mkdir()
    for obj in s3_client.list_objects_v2(Bucket=bucket, Prefix="preprocessed/")["Contents"]:
        (local / obj["Key"].split("/")[-1]).write_bytes(s3_client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
    assert sorted(p.name for p in local.iterdir()) == sorted(
        ["train_data.pkl", "test_data.pkl", "train_metadata.csv", "test_metadata.csv",
         "preprocessing_summary.txt", "preprocessing_summary.json"])
    for split in ("train", "test"):
        from_s3, from_folder = dataset.load_split(local, split), dataset.load_split(demo_pickles, split)
        assert from_s3["ids"] == from_folder["ids"] and from_s3["sites"] == from_folder["sites"]
        assert np.array_equal(from_s3["images"], from_folder["images"])
        assert (from_s3["labels"] is None and from_folder["labels"] is None) or \
            np.array_equal(from_s3["labels"], from_folder["labels"])
    assert (local / "train_metadata.csv").read_bytes() == (demo_pickles / "train_metadata.csv").read_bytes()
    assert read_summary(local)["input"] == f"s3://{bucket}/data/"


def test_images_only_folder_becomes_test_split(tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    for name in ("cam1_0001.jpg", "cam1_0002.JPG", "cam2_0003.png"):
        (folder / name).write_bytes(jpeg() if not name.endswith("png") else png(mode="RGB", colour=(1, 2, 3)))
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    out.mkdir()
    # A pickle no summary vouches for is another data set's: refused, untouched, until --overwrite.
    (out / "train_data.pkl").write_bytes(b"from an earlier run")  # this input has no train split
    refused = run_script("preprocess.py", ["--input", folder, "--output-dir", out, "--image-size", SIZE])
    assert refused.returncode == 2 and "--overwrite true" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["train_data.pkl"]
    result = run_ok(["--input", folder, "--output-dir", out, "--image-size", SIZE, "--workers", 1, "--overwrite", "true"])
    assert "treating all 3 images as TEST images" in result.stdout
    assert f"Removed {out / 'train_data.pkl'} (left by an earlier run" in result.stdout
    assert not (out / "train_data.pkl").exists()
    assert read_summary(out)["removed_stale_files"] == [str(out / "train_data.pkl")]
    assert "removed 1 file(s) an earlier run left" in (out / "preprocessing_summary.txt").read_text()
    test = dataset.load_split(out, "test")
    assert test["ids"] == ["cam1_0001", "cam1_0002", "cam2_0003"]
    assert test["labels"] is None and test["sites"] == ["", "", ""] and test["class_names"] == []
    summary = read_summary(out)
    assert summary["mode"] == "images_only" and summary["splits"]["test"]["notes"]["ignored_keys"]["count"] == 1


def test_no_input_shows_both_commands_and_writes_nothing(tmp_path):
    result = run_script("preprocess.py", ["--output-dir", tmp_path / "out"], cwd=tmp_path)
    assert result.returncode != 0
    assert f"python preprocess.py --input {planning.BUCKET_EXAMPLE} --output-dir ./output" in result.stderr
    assert "python preprocess.py --input ./data --output-dir ./output" in result.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "data").mkdir()  # present but empty: same advice
    result = run_script("preprocess.py", ["--output-dir", tmp_path / "out"], cwd=tmp_path)
    assert result.returncode != 0 and "--input ./data" in result.stderr
    assert not list((tmp_path / "out").glob("*.pkl"))


def test_default_input_with_a_nested_dataset_names_the_folder_and_touches_nothing(tmp_path):
    """`python preprocess.py --output-dir ./output` where ./data has no CSVs but ./data/demo/ is a
    dataset: stop and name the folder, instead of taking its train images as TEST and deleting the
    train pickle of an earlier run."""
    write_dataset(tmp_path / "data" / "demo", _two_class_train(2), None)
    (tmp_path / "data" / "loose.jpg").write_bytes(jpeg())
    out = tmp_path / "output"
    out.mkdir()
    (out / "train_data.pkl").write_bytes(b"from an earlier run")
    # No summary says whose the pickle is: refused before the listing; with --overwrite, the listing
    # names the dataset folder and still touches nothing.
    guarded = run_script("preprocess.py", ["--output-dir", "./output"], cwd=tmp_path)
    assert guarded.returncode == 2 and "--overwrite" in guarded.stderr and "TEST images" not in guarded.stdout
    result = run_script("preprocess.py", ["--output-dir", "./output", "--overwrite"], cwd=tmp_path)
    assert result.returncode != 0
    assert "--input data/demo" in result.stderr and "train_labels.csv" in result.stderr
    assert "Traceback" not in result.stderr and "TEST images" not in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["train_data.pkl"]
    assert (out / "train_data.pkl").read_bytes() == b"from an earlier run"


# ---------------------------------------------------------------------------- bad images (A)
def test_bad_images_are_skipped_and_recorded(tmp_path):
    good = jpeg(48, 32)
    train = {
        "good1": (good, "cat", "S1"),
        "good2": (jpeg(48, 32, colour=(10, 200, 10)), "dog", "S2"),
        "empty": (b"", "cat", "S1"),                                            # A1
        "text": (b"hello, not an image", "dog", "S1"),                          # A2
        "html": (b"<html><body>403 Forbidden</body></html>", "cat", "S1"),      # A2
        "pdf": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n", "dog", "S1"),  # A2: never Ghostscript
        "trunc50": (good[: len(good) // 2], "cat", "S1"),                       # A3
        "trunc100": (good[:100], "cat", "S1"),                                  # A3
        "trunc10": (good[:10], "dog", "S1"),                                    # A3
        "bomb": (bomb_png(), "cat", "S2"),                                      # A5
        "rotated": (jpeg(40, 20, exif_orientation=6), "dog", "S2"),             # A9
        "badexif": (jpeg(40, 20, exif_orientation=99), "dog", "S2"),            # A9
        "cmyk": (jpeg(40, 30, mode="CMYK"), "cat", "S2"),                       # A10
        "rgba": (png(40, 30), "dog", "S2"),                                     # A10 (PNG content, .jpg name)
    }
    root = write_dataset(tmp_path / "data", train, None)
    out = tmp_path / "out"
    run_ok(["--input", root, "--output-dir", out, "--image-size", SIZE, "--workers", 2])
    summary = read_summary(out)
    split = summary["splits"]["train"]
    reasons = {entry["id"]: entry["reason"] for entry in split["skipped"]}
    assert reasons == {"empty": "empty", "text": "not_an_image", "html": "not_an_image", "pdf": "unsupported_format",
                       "trunc50": "truncated", "trunc100": "truncated", "trunc10": "truncated",
                       "bomb": "decompression_bomb"}
    assert split["listed"] == 14 and split["written"] == 6
    data = dataset.load_split(out, "train")
    assert data["ids"] == ["badexif", "cmyk", "good1", "good2", "rgba", "rotated"]
    meta = {image_id: row for row in csv_rows(out / "train_metadata.csv") for image_id in [row["id"]]}
    assert (meta["rotated"]["orig_width"], meta["rotated"]["orig_height"]) == ("20", "40")
    assert (meta["badexif"]["orig_width"], meta["badexif"]["orig_height"]) == ("40", "20")
    assert meta["cmyk"]["orig_mode"] == "CMYK" and meta["rgba"]["orig_mode"] == "RGBA"
    assert data["images"].shape == (6, SIZE, SIZE, 3)
    from PIL import ImageFile
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_odd_keys_on_s3_and_size_cap(s3_server, s3_client, bucket, tmp_path):
    """A12 odd keys + dir markers, A13 same id twice, A7 too large (no CSVs: all test)."""
    body = jpeg()
    keys = ["new/ünï cödé.jpg", "new/a+b.jpg", "new/100%.JPG", "new/no_extension", "new/sp ace/x y.png",
            "new/dup.jpg", "new/DUP.jpeg", "new/huge.jpg"]
    for key in keys:
        s3_client.put_object(Bucket=bucket, Key=key, Body=body if "huge" not in key else body + b"\0" * 300_000)
    for marker in ("new/", "new/sp ace/", "new/empty_dir/"):
        s3_client.put_object(Bucket=bucket, Key=marker, Body=b"")
    out = tmp_path / "out"
    run_ok(["--input", f"s3://{bucket}/new/", "--output-dir", out, "--image-size", SIZE, "--workers", 1,
            "--max-object-mb", "0.2"], env=s3_server["env"])
    test = dataset.load_split(out, "test")
    assert test["ids"] == sorted(["ünï cödé", "a+b", "100%", "no_extension", "x y", "DUP"])
    split = read_summary(out)["splits"]["test"]
    assert {(e["key"], e["reason"]) for e in split["skipped"]} == {("dup.jpg", "duplicate_id"),
                                                                   ("huge.jpg", "too_large")}
    assert split["listed"] == 8


def _noisy_s3_dataset(s3_client, bucket, tmp_path, stored_overrides=None):
    """4 noisy JPEGs (decodable after corruption) under s3://bucket/data/; returns {id: clean bytes}.
    ``stored_overrides`` {id: bytes} uploads other bytes for an id (already corrupt at rest)."""
    clean = {f"id{i}": noisy_jpeg(seed=i) for i in range(4)}
    train = {image_id: (data, ("cat", "dog")[i % 2], "S1") for i, (image_id, data) in enumerate(clean.items())}
    root = write_dataset(tmp_path / "data", train, None)
    for image_id, data in (stored_overrides or {}).items():
        (root / "train_features" / f"{image_id}.jpg").write_bytes(data)
    upload_folder(s3_client, bucket, root, "data/")
    return clean


def _row(out: Path, image_id: str) -> np.ndarray:
    data = dataset.load_split(out, "train")
    return data["images"][data["ids"].index(image_id)]


def test_corrupted_in_transit_is_refetched_and_the_stored_image_written(s3_server, s3_client, bucket, tmp_path):
    """A4a: id2's first GET arrives with 200 zeroed middle bytes (still a decodable JPEG); the S3
    checksum catches it, our retry fetches it again, and the pickle holds the stored image."""
    clean = _noisy_s3_dataset(s3_client, bucket, tmp_path)
    hook = CorruptInTransit(times=1, url_part="/data/train_features/id2.jpg")
    summary = _run_in_process(s3_server, bucket, tmp_path / "out", "before-send.s3.GetObject", hook)
    assert hook.corrupted == 1
    split = summary["splits"]["train"]
    assert split["written"] == 4 and split["timing"]["integrity_retries"] == 1
    expected, _ = images.decode_and_resize(clean["id2"], SIZE)
    corrupt, _ = images.decode_and_resize(zero_middle(clean["id2"]), SIZE)
    assert not np.array_equal(expected, corrupt)  # the corruption would have changed the stored pixels
    assert np.array_equal(_row(tmp_path / "out", "id2"), expected)


def test_corrupted_in_transit_every_time_is_skipped_and_recorded(s3_server, s3_client, bucket, tmp_path):
    """A4a: every GET of id1 is corrupt -> skipped as checksum_mismatch and recorded; never written."""
    _noisy_s3_dataset(s3_client, bucket, tmp_path)
    hook = CorruptInTransit(times=10**6, url_part="/data/train_features/id1.jpg", drop_checksum=True)
    summary = _run_in_process(s3_server, bucket, tmp_path / "out", "before-send.s3.GetObject", hook)
    assert hook.corrupted == 3  # max_attempts
    (entry,) = summary["splits"]["train"]["skipped"]
    assert (entry["id"], entry["reason"]) == ("id1", "checksum_mismatch")
    assert f"s3://{bucket}/data/train_features/id1.jpg" in entry["message"]
    assert dataset.load_split(tmp_path / "out", "train")["ids"] == ["id0", "id2", "id3"]


def test_object_stored_corrupt_is_accepted_a_documented_limit(s3_server, s3_client, bucket, tmp_path):
    """A4b, a LIMIT and not a feature: id3 was uploaded with 200 zeroed middle bytes. Its S3 checksum
    and ETag are those of the corrupt bytes, and Pillow decodes them without complaint (JPEG has no
    checksum over its pixel data), so nothing can tell: it is written with the corrupt pixels. Only
    a checksum recorded before upload (e.g. a manifest of MD5s) could catch this."""
    clean_id3 = noisy_jpeg(seed=3)
    _noisy_s3_dataset(s3_client, bucket, tmp_path, stored_overrides={"id3": zero_middle(clean_id3)})
    summary = _run_in_process(s3_server, bucket, tmp_path / "out")
    split = summary["splits"]["train"]
    assert split["written"] == 4 and split["skipped"] == [] and split["timing"]["integrity_retries"] == 0
    stored_corrupt, _ = images.decode_and_resize(zero_middle(clean_id3), SIZE)
    intended, _ = images.decode_and_resize(clean_id3, SIZE)
    assert np.array_equal(_row(tmp_path / "out", "id3"), stored_corrupt)
    assert not np.array_equal(_row(tmp_path / "out", "id3"), intended)


def test_decode_batch_records_each_failure_and_writes_the_rest(tmp_path, monkeypatch):
    """One decode task: a vanished file, a non-image and a decoder bug are skips with their reasons
    (the bug by its exception's name); the good images still go to their rows, with their sha256."""
    good, other = jpeg(), png()
    real_decode = images.decode_and_resize

    def decode_with_a_bug(data, *args, **kwargs):
        if data == b"\xff\xd8\xff bug":
            raise RuntimeError("boom")
        return real_decode(data, *args, **kwargs)

    monkeypatch.setattr(images, "decode_and_resize", decode_with_a_bug)
    batch = [(0, good), (1, str(tmp_path / "gone.jpg")), (2, b"<html>"), (3, b"\xff\xd8\xff bug"), (4, other)]
    with splitfile.SplitFileWriter(tmp_path / "train_data.pkl", 5, SIZE) as writer:
        results = {slot: (info, problem) for slot, info, problem in
                   building.decode_batch(batch, SIZE, "squash", images.DEFAULT_MAX_PIXELS, writer.slots)}
        rows = writer.read_rows(np.array([0, 4]))
        writer.discard()
    assert sorted(results) == [0, 1, 2, 3, 4]
    assert results[1][1][0] == "missing" and results[2][1][0] == "not_an_image"
    assert results[3][1] == ("unexpected_error", "RuntimeError: boom")
    assert results[0][0]["sha256"] == hashlib.sha256(good).hexdigest() and results[4][0]["bytes"] == len(other)
    assert np.array_equal(rows[0], real_decode(good, SIZE, "squash")[0])
    assert np.array_equal(rows[1], real_decode(other, SIZE, "squash")[0])


# ---------------------------------------------------------------------------- labels (B)
def _two_class_train(n=4):
    return {f"id{i}": (jpeg(40, 30, colour=(i * 40, 10, 10)), ("cat", "dog")[i % 2], f"S{i % 2}") for i in range(n)}


def test_conflicting_duplicate_ids_fail_the_run(tmp_path):
    """B2: one id with two different labels is a hard error naming the id; nothing written."""
    text = "id,cat,dog\nid0,1.0,0.0\nid1,0.0,1.0\nid0,0.0,1.0\n"
    root = write_dataset(tmp_path / "data", _two_class_train(2), None, labels_text=text)
    result = run_script("preprocess.py", ["--input", root, "--output-dir", tmp_path / "out", "--workers", 1])
    assert result.returncode != 0 and "id0" in result.stderr
    assert not list((tmp_path / "out").glob("*.pkl")) if (tmp_path / "out").exists() else True


def test_ids_stay_strings_and_missing_objects_are_counted(tmp_path):
    """B4: ids 00123 / 1e5 / NA are kept verbatim; B5: id without object and object without label
    are counted; bad label rows (B1) are rejected with their line and the rest goes on."""
    train = {"00123": (jpeg(), "cat", "S1"), "1e5": (jpeg(colour=(0, 0, 200)), "dog", "S1"),
             "NA": (jpeg(colour=(0, 90, 0)), "cat", "S2"), "ghost": (None, "dog", "S2")}
    root = write_dataset(tmp_path / "data", train, None)
    (root / "train_features" / "stray.jpg").write_bytes(jpeg())
    with open(root / "train_labels.csv", "a") as handle:
        handle.write("badrow,cat,1.0\n")
    out = tmp_path / "out"
    run_ok(["--input", root, "--output-dir", out, "--image-size", SIZE, "--workers", 1])
    data = dataset.load_split(out, "train")
    assert data["ids"] == ["00123", "1e5", "NA"]
    assert [data["class_names"][i] for i in data["labels"]] == ["cat", "dog", "cat"]
    summary = read_summary(out)
    split = summary["splits"]["train"]
    assert split["notes"]["ids_without_object"] == 1
    assert split["notes"]["unreferenced_objects"]["count"] == 1
    assert [(e["id"], e["reason"]) for e in split["skipped"]] == [("ghost", "missing_object")]
    assert any(problem["line"] == 6 for problem in summary["csv_problems"])


def test_rejected_label_rows_and_the_class_list_are_on_the_console(tmp_path):
    """Rejected rows of train_labels.csv are printed (how many, the first 5 with file, line, reason),
    the class list read from the header too (a misspelt class column shows), and the summary calls
    their images what they are: images of rejected rows, not objects without a row."""
    train = {f"id{i}": (jpeg(colour=(i * 30, 10, 10)), ("cat", "leoprad")[i % 2], "S1") for i in range(9)}
    root = write_dataset(tmp_path / "data", train, None, classes=("cat", "leoprad"))
    lines = (root / "train_labels.csv").read_text().splitlines()
    lines[1] = "id0,l.0,0.0"                      # line 2: "l.0" is no 0/1
    lines[2] = "id1,1.0,1.0"                      # line 3: two 1s
    for number in range(3, 8):                    # lines 4-8: no 1
        lines[number] = f"id{number - 1},0.0,0.0"
    (root / "train_labels.csv").write_text("\n".join(lines) + "\n")
    (root / "train_features" / "stray.jpg").write_bytes(jpeg())  # an object with no row at all
    out = tmp_path / "out"
    result = run_ok(["--input", root, "--output-dir", out, "--image-size", SIZE, "--workers", 1])
    labels_csv = root / "train_labels.csv"
    assert "Labels loaded: 2 rows, 7 rejected" in result.stdout
    assert "WARNING: 7 row(s) rejected" in result.stdout
    assert f"  - {labels_csv} line 2 (id 'id0'): " in result.stdout and "'l.0'" in result.stdout
    assert f"  - {labels_csv} line 3 (id 'id1'): " in result.stdout and "exactly one 1" in result.stdout
    assert f"{labels_csv} line 6 (id" in result.stdout and f"{labels_csv} line 7 (id" not in result.stdout
    assert "  ... and 2 more" in result.stdout
    assert "Classes (2, from train_labels.csv header): cat, leoprad" in result.stdout
    text = (out / "preprocessing_summary.txt").read_text()
    assert "7 object(s) in train_features/ are the images of rejected CSV rows" in text
    assert "train_features/id0.jpg (train_labels.csv line 2: " in text
    assert "1 object(s) in train_features/ have no row in the CSV (not used), e.g. ['train_features/stray.jpg']" in text
    split = read_summary(out)["splits"]["train"]
    assert split["notes"]["unreferenced_objects"]["count"] == 8 and split["notes"]["objects_of_rejected_rows"] == 7


def test_empty_labels_csv_fails_without_output(tmp_path):
    """B7: a labels file with a header and no rows -> 'empty dataset' error, exit != 0, no pickle."""
    root = write_dataset(tmp_path / "data", _two_class_train(2), None, labels_text="id,cat,dog\n")
    out = tmp_path / "out"
    result = run_script("preprocess.py", ["--input", root, "--output-dir", out, "--workers", 1])
    assert result.returncode != 0 and "empty" in result.stderr.lower()
    assert not (out / "train_data.pkl").exists() and not (out / "test_data.pkl").exists()


def test_all_images_bad_fails_without_output(tmp_path):
    train = {f"id{i}": (b"garbage", "cat", "S1") for i in range(3)}
    root = write_dataset(tmp_path / "data", train, None)
    out = tmp_path / "out"
    result = run_script("preprocess.py", ["--input", root, "--output-dir", out, "--workers", 1])
    assert result.returncode != 0 and "all 3 train images were skipped" in result.stderr
    assert not (out / "train_data.pkl").exists()


# ---------------------------------------------------------------------------- S3 faults (C)
def _s3_dataset(s3_client, bucket, tmp_path, n=4):
    root = write_dataset(tmp_path / "data", _two_class_train(n), None)
    upload_folder(s3_client, bucket, root, "data/")


def _run_in_process(s3_server, bucket, out, hook_event=None, hook=None, max_attempts=3):
    source = storage.open_source(f"s3://{bucket}/data/", sources.SourceOptions(endpoint_url=s3_server["endpoint"],
                                                                               max_attempts=max_attempts))
    if hook is not None:
        source.client.meta.events.register(hook_event, hook)
    output = storage.open_output(out)
    settings = planning.PreprocessSettings(input_uri=f"s3://{bucket}/data/", image_size=SIZE, policy="squash",
                                           max_pixels=images.DEFAULT_MAX_PIXELS, workers=1, download_threads=2,
                                           quiet=True)
    return preprocess.run(source, output, settings)


def test_slowdown_retried_then_written(s3_server, s3_client, bucket, tmp_path):
    """C2: 503 SlowDown twice, then success; every image written, retries counted under timing."""
    _s3_dataset(s3_client, bucket, tmp_path)
    failures = CountingHook(lambda request: error_response(request, 503, "SlowDown"), fail_times=2)

    def images_only(request, **kwargs):  # the CSV downloads go through untouched
        return failures(request) if "/train_features/" in request.url else None

    summary = _run_in_process(s3_server, bucket, tmp_path / "out", "before-send.s3.GetObject", images_only,
                              max_attempts=4)
    assert summary["splits"]["train"]["written"] == 4
    assert summary["splits"]["train"]["timing"]["s3_retries"] == 2


def test_slowdown_exhausted_on_one_key_is_recorded_with_request_id(s3_server, s3_client, bucket, tmp_path):
    """C3: one key answers 503 on every attempt -> skipped, summary names bucket/key/request-id."""
    _s3_dataset(s3_client, bucket, tmp_path)

    def one_key(request, **kwargs):
        if request.url.split("?")[0].endswith("/data/train_features/id2.jpg"):
            return error_response(request, 503, "SlowDown")
        return None

    summary = _run_in_process(s3_server, bucket, tmp_path / "out", "before-send.s3.GetObject", one_key)
    (entry,) = summary["splits"]["train"]["skipped"]
    assert entry["id"] == "id2" and entry["reason"] == "download_failed"
    assert f"s3://{bucket}/data/train_features/id2.jpg" in entry["message"] and "REQ-SlowDown" in entry["message"]
    assert dataset.load_split(tmp_path / "out", "train")["ids"] == ["id0", "id1", "id3"]


def test_every_key_failing_fails_the_run_without_pickle(s3_server, s3_client, bucket, tmp_path):
    _s3_dataset(s3_client, bucket, tmp_path)
    def images_fail(request, **kwargs):
        return error_response(request, 503, "SlowDown") if "/train_features/" in request.url else None

    with pytest.raises(planning.PreprocessError, match="all 4 train images were skipped"):
        _run_in_process(s3_server, bucket, tmp_path / "out", "before-send.s3.GetObject", images_fail, max_attempts=2)
    assert not (tmp_path / "out" / "train_data.pkl").exists()


def test_access_denied_stops_at_once_without_pickle(s3_server, s3_client, bucket, tmp_path):
    """C5: a 403 on a download is not retried and stops the run."""
    _s3_dataset(s3_client, bucket, tmp_path)
    hook = CountingHook(lambda request: error_response(request, 403, "AccessDenied"), fail_times=10**6)
    with pytest.raises(sources.SourceError, match="AccessDenied"):
        _run_in_process(s3_server, bucket, tmp_path / "out", "before-send.s3.GetObject", hook, max_attempts=5)
    assert hook.calls <= 2  # one per download thread at most, never retried
    assert not (tmp_path / "out" / "train_data.pkl").exists()


def test_object_deleted_after_listing_is_recorded(s3_server, s3_client, bucket, tmp_path):
    """C6: id1's object is deleted just before its GET (after the listing) -> missing, recorded."""
    _s3_dataset(s3_client, bucket, tmp_path)

    def delete_first(request, **kwargs):
        if request.url.split("?")[0].endswith("/data/train_features/id1.jpg"):
            s3_client.delete_object(Bucket=bucket, Key="data/train_features/id1.jpg")
        return None

    summary = _run_in_process(s3_server, bucket, tmp_path / "out", "before-send.s3.GetObject", delete_first)
    (entry,) = summary["splits"]["train"]["skipped"]
    assert (entry["id"], entry["reason"]) == ("id1", "missing") and "NoSuchKey" in entry["message"]


def test_no_credentials_fails_before_any_work(s3_server, tmp_path):
    """C11: no credentials anywhere -> botocore's message verbatim, exit != 0, nothing written."""
    env = clean_env(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
                    AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_ENDPOINT_URL=s3_server["endpoint"])
    out = tmp_path / "out"
    result = run_script("preprocess.py", ["--input", "s3://some-bucket/data/", "--output-dir", out], env=env)
    assert result.returncode != 0
    assert "Unable to locate credentials" in result.stderr
    assert not out.exists()


def test_an_image_size_above_the_bound_is_refused_at_once_in_both_scripts(demo_data, tmp_path):
    """--image-size 100000 (28 GiB per decoded image) is refused by the parser, with the numbers."""
    from dss import cli
    from dss.train import training_args

    result = run_script("preprocess.py", ["--input", demo_data, "--output-dir", tmp_path / "out",
                                          "--image-size", "100000"], timeout=60)
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert f"expected at most {cli.MAX_IMAGE_SIZE} px, got '100000'" in result.stderr
    assert "100000 x 100000 x 3 bytes = 27.9 GiB" in result.stderr
    assert cli.image_size("4096") == 4096 and cli.image_size("32") == 32
    parser = training_args.build_parser()  # dss_train.py's --image-size shares the parser
    assert parser.parse_args(["--image-size", "4096"]).image_size == 4096
    with pytest.raises(SystemExit):
        parser.parse_args(["--image-size", "4097"])


def test_a_decode_worker_killed_by_the_os_is_reported_with_the_memory_numbers(tmp_path):
    """A decode process SIGKILLed (what the OOM killer does) ends the run with the likely cause and
    the numbers: image size, bytes per decoded image, workers, MemAvailable."""
    import signal
    import time

    folder = tmp_path / "images"
    folder.mkdir()
    for number in range(40):
        (folder / f"cam_{number:03d}.jpg").write_bytes(jpeg(colour=(number * 5, 30, 30)))
    source = storage.open_source(folder)
    settings = planning.PreprocessSettings(input_uri=str(folder), image_size=64, workers=2, quiet=True)
    plan = planning.plan_dataset(source, settings.layout)
    with building.decode_pool(2) as pool:
        deadline = time.monotonic() + 60
        while len(pool._processes) < 2 and time.monotonic() < deadline:  # both workers started
            time.sleep(0.05)
        os.kill(next(iter(pool._processes)), signal.SIGKILL)
        while not pool._broken and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(planning.PreprocessError) as caught:
            building.build_split(source, plan, plan.splits[0], 1, settings, pool, tmp_path)
    message = str(caught.value)
    assert "a decode worker process died" in message and "the OS killed it (out of memory)" in message
    assert "--image-size 64 image of 12.0 KiB (64 x 64 x 3 bytes)" in message
    assert "Each of the 2 decode worker(s)" in message and "Try fewer --workers" in message
    assert "available now (MemAvailable)" in message or "available memory unknown" in message


def test_unwritable_output_fails_before_download(demo_data, tmp_path):
    """D4: the output path is under a regular file -> error before any image is read."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_script("preprocess.py", ["--input", demo_data, "--output-dir", blocker / "out"])
    assert result.returncode != 0 and "cannot create output folder" in result.stderr
    assert "Processing" not in result.stdout


# ---------------------------------------------------------------------------- imports
@pytest.mark.parametrize("module", ["preprocess", "dss.ingest.sources", "dss.images", "dss.ingest.labels", "dss.data.dataset"])
def test_preprocess_side_never_imports_torch(module):
    code = f"import importlib, sys; importlib.import_module({module!r}); assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_folder_run_imports_neither_boto3_nor_torch(tmp_path):
    """boto3 is imported for s3:// paths only; a whole folder run in one process never loads it."""
    root = write_dataset(tmp_path / "data", _two_class_train(2), None)
    code = ("import sys, preprocess\n"
            f"rc = preprocess.main(['--input', {str(root)!r}, '--output-dir', {str(tmp_path / 'out')!r}, "
            f"'--image-size', '{SIZE}', '--workers', '1', '--quiet'])\n"
            "assert rc == 0, rc\n"
            "loaded = [name for name in ('boto3', 'botocore', 'torch') if name in sys.modules]\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=clean_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "out" / "train_data.pkl").exists()


# ---------------------------------------------------------------------------- disk full (D1)


def test_disk_full_while_writing_the_pickle_is_one_clear_error(demo_data, tiny_filesystem):
    """D1: 30 images at 32 px make a ~92 KB pickle on a 64 KiB disk -> ENOSPC: one ERROR line naming
    the path and "disk full", exit != 0, no pickle under its final name and no temp file left."""
    result = run_script("preprocess.py", ["--input", demo_data, "--output-dir", tiny_filesystem, "--limit", 30,
                                          "--image-size", SIZE, "--workers", 1])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "disk full" in errors[0] and "ENOSPC" in errors[0]
    assert str(tiny_filesystem / "train_data.pkl") in errors[0]
    left = sorted(path.name for path in tiny_filesystem.iterdir())
    assert not [name for name in left if name.endswith(".pkl") or name.endswith(".tmp")], left


def test_other_os_errors_name_path_and_errno():
    message = publishing.os_error_message(OSError(errno.EACCES, "Permission denied", "/out/train_data.pkl"))
    assert message == "/out/train_data.pkl: Permission denied (EACCES)"


def test_disk_full_in_the_staging_folder_of_an_s3_output_points_at_tmpdir():
    staged = os.path.join(tempfile.gettempdir(), f"{sources.S3_STAGING_PREFIX}abc", "train_data.pkl")
    message = publishing.os_error_message(OSError(errno.ENOSPC, "No space left on device", staged))
    assert "TMPDIR" in message and staged in message
    local = publishing.os_error_message(OSError(errno.ENOSPC, "No space left on device", "/data/out/train_data.pkl"))
    assert "pick another --output-dir" in local and "TMPDIR" not in local
