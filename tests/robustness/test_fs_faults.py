"""D-rows not covered row by row elsewhere (see ROWS.md), and --strict.

D5 (rerun byte-identical) is in tests/test_preprocess.py::test_folder_run_lines_up_with_the_csvs_and_reruns_identically;
here it is also the reference for D6: two runs racing into one folder leave exactly what one run leaves.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess

from PIL import Image

from dss.data import dataset
from tests.conftest import PYTHON, REPO_ROOT, clean_env, run_script

SIZE = 32  # px: the smallest --image-size preprocess.py accepts
OUTPUT_NAMES = ("train_data.pkl", "test_data.pkl", "train_metadata.csv", "test_metadata.csv")


def digests(folder) -> dict:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in OUTPUT_NAMES}


def test_d6_two_concurrent_runs_into_one_folder_leave_complete_identical_files(demo_data, tmp_path):
    args = ["--input", str(demo_data), "--image-size", str(SIZE), "--workers", "1", "--limit", "60", "--quiet"]
    shared = tmp_path / "shared"
    runs = [subprocess.Popen([PYTHON, str(REPO_ROOT / "preprocess.py"), *args, "--output-dir", str(shared)],
                             env=clean_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (stdout, stderr) in zip(runs, outputs):
        assert run.returncode == 0, stdout + stderr
    alone = tmp_path / "alone"
    result = run_script("preprocess.py", [*args, "--output-dir", alone])
    assert result.returncode == 0, result.stderr
    assert digests(shared) == digests(alone)  # every file complete, none interleaved
    assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in alone.iterdir())  # no temps left
    assert len(dataset.load_split(shared, "train")["ids"]) == 60


def _jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def _small_dataset(root, bad_image: bool, bad_row: bool):
    (root / "train_features").mkdir(parents=True)
    rows = ["id,cat,dog"]
    for index in range(4):
        data = _jpeg((index * 50, 20, 20))
        if bad_image and index == 1:
            data = data[:60]  # truncated
        (root / "train_features" / f"id{index}.jpg").write_bytes(data)
        rows.append(f"id{index},{1 - index % 2}.0,{index % 2}.0")
    if bad_row:
        rows.append("id9,cat,1")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_strict_fails_after_writing_the_summary_when_anything_was_skipped(tmp_path):
    root = _small_dataset(tmp_path / "data", bad_image=True, bad_row=True)
    out = tmp_path / "out"
    result = run_script("preprocess.py", ["--input", root, "--output-dir", out, "--image-size", SIZE,
                                          "--workers", 1, "--strict"])
    assert result.returncode == 3, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert errors == [f"ERROR: --strict: 1 image(s) skipped and 1 CSV row(s) rejected; the outputs were written, "
                      f"but the run fails. Each one is listed with its key and reason in "
                      f"{out / 'preprocessing_summary.txt'}"]
    summary = json.loads((out / "preprocessing_summary.json").read_text())
    assert summary["splits"]["train"]["skipped"][0]["id"] == "id1" and len(summary["csv_problems"]) == 1
    assert dataset.load_split(out, "train")["ids"] == ["id0", "id2", "id3"]


def test_strict_passes_a_clean_dataset_and_the_default_tolerates_skips(tmp_path):
    clean = run_script("preprocess.py", ["--input", _small_dataset(tmp_path / "clean", False, False), "--output-dir",
                                         tmp_path / "out1", "--image-size", SIZE, "--workers", 1, "--strict"])
    assert clean.returncode == 0, clean.stderr
    default = run_script("preprocess.py", ["--input", _small_dataset(tmp_path / "dirty", True, True), "--output-dir",
                                           tmp_path / "out2", "--image-size", SIZE, "--workers", 1])
    assert default.returncode == 0, default.stderr
