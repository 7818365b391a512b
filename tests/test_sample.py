"""dss.demo.sample: the synthetic demo dataset in the Conser-vision layout (real files, real CLI run)."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dss.demo import sample, sample_drawing
from tests.conftest import run_script

N_TRAIN, N_TEST, SCALE = 200, 50, 0.05


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        return header, list(reader)


def _all_files(root):
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample") / "data"
    summary = sample.write_demo_dataset(root, n_train=N_TRAIN, n_test=N_TEST, seed=0, scale=SCALE)
    return root, summary


def test_same_seed_same_bytes_other_seed_differs(tmp_path, dataset):
    root, _ = dataset
    again = tmp_path / "again"
    sample.write_demo_dataset(again, n_train=N_TRAIN, n_test=N_TEST, seed=0, scale=SCALE)
    first, second = _all_files(root), _all_files(again)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []

    other = tmp_path / "other"
    sample.write_demo_dataset(other, n_train=N_TRAIN, n_test=N_TEST, seed=1, scale=SCALE)
    third = _all_files(other)
    changed_images = [n for n in first if n.endswith(".jpg") and first[n] != third.get(n)]
    assert len(changed_images) == N_TRAIN + N_TEST
    assert first["train_labels.csv"] != third["train_labels.csv"]


def test_layout_columns_ids_and_one_hot_rows(dataset):
    root, _ = dataset
    header, labels = _read_csv(root / "train_labels.csv")
    assert header == ["id", *sample.CLASS_NAMES]
    assert all(len(row) == 1 + len(sample.CLASS_NAMES) for row in labels)
    for row in labels:
        values = row[1:]
        assert set(values) <= {"0.0", "1.0"}, row
        assert values.count("1.0") == 1, row

    train_header, train_rows = _read_csv(root / "train_features.csv")
    test_header, test_rows = _read_csv(root / "test_features.csv")
    assert train_header == test_header == ["id", "filepath", "site"]
    # Train ids first, then test ids, sequential like the real set.
    expected_ids = [f"ZJ{n:06d}" for n in range(N_TRAIN + N_TEST)]
    assert [row[0] for row in train_rows] == [row[0] for row in labels] == expected_ids[:N_TRAIN]
    assert [row[0] for row in test_rows] == expected_ids[N_TRAIN:]
    for split, rows in (("train", train_rows), ("test", test_rows)):
        for image_id, filepath, site in rows:
            assert filepath == f"{split}_features/{image_id}.jpg"
            assert re.fullmatch(r"S\d{4}", site), site
    listed = {row[1] for row in train_rows + test_rows}
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*.jpg")}
    assert listed == on_disk
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["train_features", "test_features", "train_labels.csv", "train_features.csv", "test_features.csv"])


def test_class_shares_match_the_real_set(dataset):
    root, summary = dataset
    _, labels = _read_csv(root / "train_labels.csv")
    counts = np.array([[float(v) for v in row[1:]] for row in labels]).sum(axis=0)
    assert counts.sum() == N_TRAIN
    np.testing.assert_allclose(counts / N_TRAIN, sample.CLASS_SHARES, atol=1.0 / N_TRAIN)
    assert summary["class_counts"] == {name: int(n) for name, n in zip(sample.CLASS_NAMES, counts)}
    assert sum(summary["test_class_counts"].values()) == N_TEST


def test_allocate_counts_sums_and_follows_shares():
    for total in (0, 1, 7, 160, 1001):
        counts = sample.allocate_counts(total, sample.CLASS_SHARES)
        assert counts.sum() == total
        assert np.all(np.abs(counts - total * np.array(sample.CLASS_SHARES)) < 1 + 1e-9)


def test_test_sites_are_disjoint_from_train_sites(dataset):
    root, summary = dataset
    train_sites = {row[2] for row in _read_csv(root / "train_features.csv")[1]}
    test_sites = {row[2] for row in _read_csv(root / "test_features.csv")[1]}
    assert train_sites.isdisjoint(test_sites)
    assert 10 <= len(train_sites) <= sample.DEFAULT_TRAIN_SITES
    assert 3 <= len(test_sites) <= sample.DEFAULT_TEST_SITES
    assert summary["train_sites"] == sorted(train_sites) and summary["test_sites"] == sorted(test_sites)


def test_frames_are_rgb_jpegs_of_the_scaled_real_sizes_mostly_grey(dataset):
    root, summary = dataset
    allowed = {sample.scaled_frame_size(size, SCALE) for size in sample.FRAME_SIZES}
    sizes, grey = set(), 0
    paths = sorted(root.rglob("*.jpg"))
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB", path
            sizes.add(image.size)
            pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        # Night frames are stored as RGB but every pixel has R = G = B after decoding.
        grey += bool(np.all(pixels[..., 0] == pixels[..., 1]) and np.all(pixels[..., 1] == pixels[..., 2]))
    assert sizes <= allowed and len(sizes) >= 2
    assert grey == summary["grey_frames"]
    assert 0.5 < grey / len(paths) < 0.95  # mostly night infrared, but colour day frames too


def test_scale_keeps_at_least_16_px_a_side_and_frame_sizes_replaces_the_mix(tmp_path):
    sample.write_demo_dataset(tmp_path / "tiny", n_train=12, n_test=3, seed=0, scale=0.001)
    for path in (tmp_path / "tiny").rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.size == (16, 16)
    summary = sample.write_demo_dataset(tmp_path / "wide", n_train=30, n_test=5, scale=SCALE, frame_sizes=[(960, 540)])
    assert summary["frame_sizes"] == {"48x27": 35}


@pytest.mark.parametrize("class_name", [name for name in sample.CLASS_NAMES if name != "blank"])
def test_animals_stay_visible_after_squashing_a_full_frame_to_64px(class_name):
    for seed in range(20):
        canvas = Image.new("RGB", (960, 540))
        sample_drawing.draw_animal(ImageDraw.Draw(canvas), class_name, 960, 540, np.random.default_rng(seed),
                                   is_day=True)
        covered = np.asarray(canvas.convert("L").point(lambda v: 255 if v else 0).resize((64, 64), Image.BOX)) >= 128
        assert covered.sum() >= 20, f"{class_name} seed {seed}: only {covered.sum()} of 64x64 pixels"


def test_refuses_a_folder_with_other_content_and_replaces_an_earlier_demo(tmp_path):
    root = tmp_path / "data"
    (root / "train_features").mkdir(parents=True)
    foreign = root / "train_features" / "ZJ000000.jpg"
    Image.new("RGB", (32, 32)).save(foreign, format="JPEG")
    with pytest.raises(FileExistsError, match="ZJ000000.jpg"):
        sample.write_demo_dataset(root, n_train=10, n_test=2, scale=SCALE)
    assert foreign.read_bytes()[:2] == b"\xff\xd8" and len(list(root.rglob("*"))) == 2  # untouched

    other = tmp_path / "notes"
    other.mkdir()
    (other / "README.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="README.txt"):
        sample.write_demo_dataset(other, n_train=10, n_test=2, scale=SCALE)

    demo = tmp_path / "demo"
    sample.write_demo_dataset(demo, n_train=30, n_test=10, scale=SCALE)
    sample.write_demo_dataset(demo, n_train=10, n_test=2, scale=SCALE)
    assert len(list(demo.rglob("*.jpg"))) == 12  # frames of the larger earlier run are gone


def test_cli_writes_the_dataset_and_prints_one_line(tmp_path):
    root = tmp_path / "cli"
    result = run_script("-m dss.demo", [root, "--train", 24, "--test", 6, "--seed", 2, "--scale", SCALE], timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1 and "24 train / 6 test" in result.stdout
    assert len(list((root / "train_features").glob("*.jpg"))) == 24
    assert len(list((root / "test_features").glob("*.jpg"))) == 6

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    refused = run_script("-m dss.demo", [tmp_path / "busy", "--train", 5], timeout=120)
    assert refused.returncode == 2 and "mine.txt" in refused.stderr

    bad = run_script("-m dss.demo", [tmp_path / "bad", "--scale", "0"], timeout=120)
    assert bad.returncode == 2 and "--scale" in bad.stderr


# --------------------------------------------------------------------------- options: test labels, site shift
def _mean_colour(folder) -> np.ndarray:
    """Mean (R, G, B) over every frame in ``folder``, each frame weighted equally."""
    return np.mean([np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).mean(axis=(0, 1))
                    for path in sorted(folder.glob("*.jpg"))], axis=0)


def test_normal_shift_draws_what_it_always_drew(tmp_path):
    """The default design is pinned to what dss.demo.sample wrote before the site-shift option existed: the
    CSVs byte for byte (classes, sites, ids), the frames by their mean colour (JPEG bytes may vary with
    the libjpeg build, the drawing may not)."""
    import hashlib

    root = tmp_path / "pinned"
    sample.write_demo_dataset(root, n_train=60, n_test=20, seed=5, scale=0.05,
                              design=sample.SiteDesign(shift="normal"))
    pinned = {"train_labels.csv": "8c03fac754a787e381c0a620993cf08fc20c42e01b7d36c657750866b27b98bb",
              "train_features.csv": "27457ab5f8898faa60aa4feb2b6da66f6dc3855007b5b083ce0c62f44dc7efef",
              "test_features.csv": "3f9a347b6dce8747c176a7d5f25636cd84f4e4d01114f839db131892bbb6f56d"}
    assert {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in pinned} == pinned
    np.testing.assert_allclose(_mean_colour(root / "train_features"), [83.7383, 87.2707, 81.9274], atol=0.05)
    np.testing.assert_allclose(_mean_colour(root / "test_features"), [72.9712, 81.0699, 67.3993], atol=0.05)
    assert not (root / "test_labels.csv").exists()


def test_test_labels_option_adds_test_labels_and_changes_nothing_else(tmp_path, dataset):
    root, summary = dataset
    labelled = tmp_path / "labelled"
    sample.write_demo_dataset(labelled, n_train=N_TRAIN, n_test=N_TEST, seed=0, scale=SCALE, test_labels=True)
    before, after = _all_files(root), _all_files(labelled)
    assert set(after) - set(before) == {"test_labels.csv"}
    assert [name for name in before if before[name] != after[name]] == []

    header, rows = _read_csv(labelled / "test_labels.csv")
    assert header == ["id", *sample.CLASS_NAMES]
    assert [row[0] for row in rows] == [row[0] for row in _read_csv(labelled / "test_features.csv")[1]]
    for row in rows:
        assert set(row[1:]) <= {"0.0", "1.0"} and row[1:].count("1.0") == 1, row
    counts = np.array([[float(v) for v in row[1:]] for row in rows]).sum(axis=0)
    assert summary["test_class_counts"] == {name: int(n) for name, n in zip(sample.CLASS_NAMES, counts)}

    # A re-run without the option removes the earlier run's test labels (they would describe other frames).
    sample.write_demo_dataset(labelled, n_train=N_TRAIN, n_test=N_TEST, seed=0, scale=SCALE)
    assert _all_files(labelled) == before


def _per_site(root, split):
    """site -> (class indices, mean grey level of each frame)."""
    _, labels = _read_csv(root / f"{split}_labels.csv")
    classes = {row[0]: [float(v) for v in row[1:]].index(1.0) for row in labels}
    by_site: dict = {}
    for image_id, filepath, site in _read_csv(root / f"{split}_features.csv")[1]:
        level = np.asarray(Image.open(root / filepath).convert("L"), dtype=np.float64).mean()
        entry = by_site.setdefault(site, ([], []))
        entry[0].append(classes[image_id])
        entry[1].append(level)
    return by_site


def _site_class_information(sites: dict) -> float:
    """Mutual information (nats) between an image's site and its class: 0 when every site has the
    same class mix, larger the more lopsided the mixes are."""
    joint = np.array([np.bincount(classes, minlength=len(sample.CLASS_NAMES)) for classes, _ in sites.values()])
    joint = joint / joint.sum()
    outer = joint.sum(axis=1, keepdims=True) * joint.sum(axis=0, keepdims=True)
    present = joint > 0
    return float(np.sum(joint[present] * np.log(joint[present] / outer[present])))


def test_strong_shift_makes_sites_differ_more(tmp_path):
    roots = {}
    for shift in sample.SHIFTS:
        roots[shift] = tmp_path / shift
        sample.write_demo_dataset(roots[shift], n_train=300, n_test=60, seed=0, scale=SCALE,
                                  design=sample.SiteDesign(shift=shift), test_labels=True)
    normal, strong = _all_files(roots["normal"]), _all_files(roots["strong"])
    assert normal.keys() == strong.keys()
    changed = [name for name in normal if name.endswith(".jpg") and normal[name] != strong[name]]
    assert len(changed) == 360
    # Same layout and contract: test sites unseen in training, one-hot labels for both splits.
    train_sites = {row[2] for row in _read_csv(roots["strong"] / "train_features.csv")[1]}
    test_sites = {row[2] for row in _read_csv(roots["strong"] / "test_features.csv")[1]}
    assert train_sites.isdisjoint(test_sites)

    spread = {}
    for shift, root in roots.items():
        sites = _per_site(root, "train")
        brightness = [np.mean(levels) for classes, levels in sites.values() if len(classes) >= 5]
        spread[shift] = (np.std(brightness), _site_class_information(sites))
    assert spread["strong"][0] > 1.5 * spread["normal"][0], spread  # brightness differs more between sites
    assert spread["strong"][1] > spread["normal"][1] + 0.15, spread  # the site tells more about the class


def test_strong_sites_have_a_look_and_normal_sites_none():
    design = sample.SiteDesign(train_sites=6, test_sites=2, shift="strong")
    strong = sample.make_sites(np.random.default_rng(0), design, 0.1)
    normal = sample.make_sites(np.random.default_rng(0), sample.SiteDesign(6, 2), 0.1)
    assert all(site.look is None for site in normal)
    assert all(site.look is not None for site in strong)
    assert [site.name for site in strong] == [site.name for site in normal]  # the names are drawn first
    scales = [site.look.animal_scale for site in strong]
    assert all(0.6 <= s <= 1.35 for s in scales) and max(scales) / min(scales) > 1.1
    with pytest.raises(ValueError, match="shift"):
        sample.write_demo_dataset("/nonexistent/never", n_train=2, n_test=1, design=sample.SiteDesign(shift="huge"))


def test_cli_shift_and_test_labels(tmp_path):
    root = tmp_path / "hard"
    result = run_script("-m dss.demo", [root, "--train", 24, "--test", 6, "--scale", SCALE, "--shift", "strong",
                                          "--test-labels"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "strong site shift" in result.stdout and "test labels" in result.stdout
    assert len(_read_csv(root / "test_labels.csv")[1]) == 6
    bad = run_script("-m dss.demo", [tmp_path / "bad", "--shift", "huge"], timeout=120)
    assert bad.returncode == 2 and "--shift" in bad.stderr
