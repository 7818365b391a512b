"""B-rows end to end (real preprocess.py subprocesses on real folders) and CSV fuzzing.

B1-B4, B6, B7 row by row are in tests/test_labels.py and tests/test_preprocess.py (ROWS.md).
Policies tested here:
- B5: an id without an object is skipped as ``missing_object`` and an object without a CSV row is
  counted under ``notes.unreferenced_objects``; there is no threshold: the run goes on (use
  ``--strict`` to fail on any skip). Labels never shift: row i's label is the CSV label of id i.
- B8: the same id, or a byte-identical image file, in train and test, and a class with no train
  image, are warnings (summary ``warnings`` and ``leakage``), not errors: the test split is unlabelled.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bench import fuzz
from dss.data import dataset
from dss.ingest import labels
from tests.conftest import run_script

SIZE = 32  # px: the smallest --image-size preprocess.py accepts
CLASS_COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "bird": (30, 30, 200)}
FUZZ = settings(max_examples=100, deadline=None, database=None, derandomize=True)


def solid_jpeg(colour, width=24, height=20) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def run_ok(*args):
    result = run_script("preprocess.py", [*map(str, args), "--image-size", SIZE, "--workers", 1])
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def summary_of(out: Path) -> dict:
    return json.loads((out / "preprocessing_summary.json").read_text())


# ---------------------------------------------------------------------------- B5
def test_b5_labels_never_shift_with_shuffled_csvs_gaps_and_strays(tmp_path):
    """Labels CSV in one order, features CSV in another, ids without files in between, a file
    without a row: every written row's pixels are its own class colour and its label that class."""
    root = tmp_path / "data"
    (root / "train_features").mkdir(parents=True)
    rng = np.random.default_rng(5)
    ids = [f"ZJ{index:06d}" for index in range(24)]
    class_of = {image_id: list(CLASS_COLOURS)[rng.integers(0, 3)] for image_id in ids}
    missing = set(ids[3::7])  # 3 ids listed in both CSVs with no image object
    for image_id in ids:
        if image_id not in missing:
            (root / "train_features" / f"{image_id}.jpg").write_bytes(solid_jpeg(CLASS_COLOURS[class_of[image_id]]))
    (root / "train_features" / "stray.jpg").write_bytes(solid_jpeg((0, 0, 0)))
    label_order = list(rng.permutation(ids))
    (root / "train_labels.csv").write_text("id," + ",".join(CLASS_COLOURS) + "\n" + "".join(
        image_id + "," + ",".join("1.0" if c == class_of[image_id] else "0.0" for c in CLASS_COLOURS) + "\n"
        for image_id in label_order))
    (root / "train_features.csv").write_text("id,filepath,site\n" + "".join(
        f"{image_id},train_features/{image_id}.jpg,S{index % 3}\n" for index, image_id in enumerate(rng.permutation(ids))))
    out = tmp_path / "out"
    run_ok("--input", root, "--output-dir", out)

    data = dataset.load_split(out, "train")
    assert data["ids"] == sorted(set(ids) - missing)
    for row, image_id in enumerate(data["ids"]):
        assert data["class_names"][data["labels"][row]] == class_of[image_id]
        mean = data["images"][row].reshape(-1, 3).mean(axis=0)
        assert int(np.argmax(mean)) == list(CLASS_COLOURS).index(class_of[image_id]), image_id
        assert data["meta"]["csv_row"][row] == label_order.index(image_id)
    split = summary_of(out)["splits"]["train"]
    assert split["listed"] == 24 == split["written"] + split["skipped_count"]
    assert sorted(e["id"] for e in split["skipped"]) == sorted(missing)
    assert {e["reason"] for e in split["skipped"]} == {"missing_object"}
    assert split["notes"]["ids_without_object"] == 3
    assert split["notes"]["unreferenced_objects"] == {"count": 1, "examples": ["train_features/stray.jpg"]}


# ---------------------------------------------------------------------------- B8
def _two_split_dataset(root: Path, train: dict, test: dict, classes=("cat", "dog", "bird")) -> Path:
    """train {id: (bytes, class)}, test {id: bytes}, Conser-vision layout."""
    for folder in ("train_features", "test_features"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for image_id, (data, _) in train.items():
        (root / "train_features" / f"{image_id}.jpg").write_bytes(data)
    for image_id, data in test.items():
        (root / "test_features" / f"{image_id}.jpg").write_bytes(data)
    (root / "train_labels.csv").write_text("id," + ",".join(classes) + "\n" + "".join(
        image_id + "," + ",".join("1" if c == label else "0" for c in classes) + "\n"
        for image_id, (_, label) in train.items()))
    (root / "train_features.csv").write_text("id,filepath,site\n" + "".join(
        f"{image_id},train_features/{image_id}.jpg,S1\n" for image_id in train))
    (root / "test_features.csv").write_text("id,filepath,site\n" + "".join(
        f"{image_id},test_features/{image_id}.jpg,S9\n" for image_id in test))
    return root


def test_b8_leakage_and_missing_class_are_warnings_in_both_summaries(tmp_path):
    cat, dog = solid_jpeg(CLASS_COLOURS["cat"]), solid_jpeg(CLASS_COLOURS["dog"])
    train = {"t1": (cat, "cat"), "t2": (dog, "dog"), "same": (solid_jpeg((1, 2, 3)), "cat")}
    test = {"q1": cat, "same": solid_jpeg((90, 90, 90)), "q2": solid_jpeg((5, 99, 7))}
    root = _two_split_dataset(tmp_path / "data", train, test)
    out = tmp_path / "out"
    result = run_ok("--input", root, "--output-dir", out)  # warnings, not errors: exit 0
    assert "WARNING: 1 id(s) are in both train and test" in result.stdout

    summary = summary_of(out)
    assert summary["leakage"] == {
        "ids_in_both_splits": {"count": 1, "examples": ["same"]},
        "images_in_both_splits": {"count": 1, "examples": [["t1", "q1"]]},
        "classes_without_train_images": ["bird"],
    }
    text = (out / "preprocessing_summary.txt").read_text()
    assert "1 id(s) are in both train and test" in text
    assert "byte-identical to a train image" in text and "('t1', 'q1')" in text
    assert "class(es) ['bird'] have no train image" in text
    assert len(dataset.load_split(out, "test")["ids"]) == 3  # nothing dropped: a warning only


def test_b8_clean_splits_have_an_empty_leakage_report(tmp_path):
    train = {"t1": (solid_jpeg(CLASS_COLOURS["cat"]), "cat"), "t2": (solid_jpeg(CLASS_COLOURS["dog"]), "dog")}
    root = _two_split_dataset(tmp_path / "data", train, {"q1": solid_jpeg((7, 7, 7))}, classes=("cat", "dog"))
    out = tmp_path / "out"
    run_ok("--input", root, "--output-dir", out)
    summary = summary_of(out)
    assert summary["leakage"] == {"ids_in_both_splits": {"count": 0, "examples": []},
                                  "images_in_both_splits": {"count": 0, "examples": []},
                                  "classes_without_train_images": []}
    assert not [w for w in summary["warnings"] if "both" in w or "no train image" in w]


# ---------------------------------------------------------------------------- fuzz
def test_csv_seeds_parse():
    outcomes = [fuzz.check_csv(seed) for seed in fuzz.csv_seeds()]
    assert outcomes[0] == outcomes[1] == "labels_ok/features_ok" and outcomes[2].endswith("features_ok")


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("id,label\"\r\n\t x01.é\ufeff\x00catdog")), max_size=300))
def test_b6_arbitrary_text_gives_labels_error_or_a_consistent_table(text):
    fuzz.check_csv(text.encode("utf-8"))


@FUZZ
@given(data=st.binary(max_size=300))
def test_b6_arbitrary_bytes_give_labels_error_or_a_consistent_table(data):
    fuzz.check_csv(data)


@FUZZ
@given(rng=st.randoms(use_true_random=False), seed_index=st.integers(0, 2))
def test_b6_mutated_real_csvs_give_labels_error_or_a_consistent_table(rng, seed_index):
    fuzz.check_csv(fuzz.mutate(fuzz.csv_seeds()[seed_index], rng, fuzz.CSV_TOKENS))


def test_b1_label_column_against_given_classes_rejects_rows_with_lines():
    table = labels.read_labels("l.csv", ["cat", "dog"], data=b"id,label\na,cat\nb, 2\nc,\nd,1.0\ne,dog\n")
    assert table.ids == ["a", "e"]
    assert sorted(problem.line for problem in table.problems) == [3, 4, 5]
