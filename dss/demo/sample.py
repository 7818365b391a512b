"""Synthetic camera-trap frames in the Conser-vision layout: the embedded demo dataset.

    python -m dss.demo data/demo                                  # 1,200 train / 300 test, real frame sizes
    python -m dss.demo /tmp/tiny --train 160 --test 40 --scale 0.1   # tiny frames for tests
    python -m dss.demo /tmp/demo --seed 3                         # another draw of the same design
    python -m dss.demo /tmp/hard --shift strong --test-labels     # stronger site shift, test labels for scoring

Writes, under DIR:
    train_features/ZJ000000.jpg ...   test_features/ZJ001200.jpg ...
    train_labels.csv      id + one one-hot column (0.0/1.0) per class, in CLASS_NAMES order
    train_features.csv    id, filepath, site          (test_features.csv likewise)
    test_labels.csv       only with --test-labels: the test split's classes, as train_labels.csv
                          (for scoring on held-out sites; the competition keeps these hidden)

What the frames imitate (so the pipeline meets the same problems as on the real set):
- frame sizes 960x540, 640x360 and 360x240 (times ``scale``), one size per camera site;
- most frames are night infrared: grey pixels (R=G=B) stored as RGB JPEG; the rest are colour;
- the real class shares, and 24 train / 8 test camera sites with no site in both splits;
  each site has its own background (trees, ground, vegetation, brightness) and its own mix of
  classes, so a validation split that is not grouped by site over-estimates accuracy;
- every class but ``blank`` is a drawn animal with a class-specific silhouette and coat pattern
  (spotted long body for leopard, banded tail for civet/genet, tall dark bulk for hog, ...), at a
  random place, size, facing and brightness, with distractors (branches, rocks) and sensor noise.
  Animals stay visible after the whole frame is squashed to 64x64.

``--shift strong`` draws a harder variant of the same design, for benchmarks of how a recipe holds up
on unseen sites: every site also gets its own colour cast and contrast of the scene, exposure, sensor
noise level and camera distance (animal size, x0.6 to x1.35), its share of infrared frames ranges from
none to almost all, and its class mix is far more lopsided (class affinities gamma(0.25) instead of
gamma(2)). ``--shift normal`` (the default) draws exactly the bytes it always has.

The same seed gives byte-identical files (seeded numpy Generators per site and per image, fixed
JPEG settings, nothing taken from the clock). Every JPEG carries a comment marker, which is how a
re-run recognises a folder it may overwrite; any other content in DIR makes it stop instead.
Only numpy and Pillow are used.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from dss import fileio
from dss.demo.sample_drawing import render_background, render_frame
from dss.demo.sites import Site, SiteLook

CLASS_NAMES = (
    "antelope_duiker", "bird", "blank", "civet_genet", "hog", "leopard", "monkey_prosimian", "rodent",
)
# Shares of the real training set (16,488 images), in CLASS_NAMES order.
CLASS_SHARES = (0.150, 0.100, 0.134, 0.147, 0.059, 0.137, 0.151, 0.122)
# Camera frame sizes (width, height) of the real set and how often a site's camera has each.
FRAME_SIZES = ((960, 540), (640, 360), (360, 240))
FRAME_SIZE_WEIGHTS = (0.5, 0.3, 0.2)
MIN_SIDE_PX = 16
JPEG_QUALITY = 85
DEMO_MARKER = b"dss.demo.sample synthetic demo frame"
DEFAULT_N_TRAIN = 1200
DEFAULT_N_TEST = 300
DEFAULT_TRAIN_SITES = 24
DEFAULT_TEST_SITES = 8
FIRST_SITE_NUMBER = 1

# How much more (>1) or less (<1) often a class is seen by day than its site's average:
# civets, genets and rodents are mostly nocturnal, monkeys and birds mostly diurnal.
_DAY_FACTOR = {
    "antelope_duiker": 1.2, "bird": 1.6, "blank": 1.0, "civet_genet": 0.2, "hog": 1.0,
    "leopard": 0.7, "monkey_prosimian": 1.8, "rodent": 0.5,
}
_LAYOUT_FILES = ("train_labels.csv", "train_features.csv", "test_features.csv", "test_labels.csv")
IMAGE_DIRS = {"train": "train_features", "test": "test_features"}
SHIFTS = ("normal", "strong")
# Per shift: the range of a site's share of daylight (colour) frames, and the gamma shape of its
# class affinities (smaller: more lopsided class mixes per site).
_SHIFT_DRAWS = {"normal": ((0.1, 0.45), 2.0), "strong": ((0.0, 0.9), 0.25)}


_ID_RE = re.compile(r"^ZJ\d{6}\.jpg$")


@dataclass(frozen=True)
class SiteDesign:
    """How many camera sites each split has, and how much sites differ (one of SHIFTS)."""

    train_sites: int = DEFAULT_TRAIN_SITES
    test_sites: int = DEFAULT_TEST_SITES
    shift: str = "normal"


# --------------------------------------------------------------------------- planning
def scaled_frame_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """A real frame size times ``scale``, at least MIN_SIDE_PX a side."""
    width, height = size
    return max(MIN_SIDE_PX, round(width * scale)), max(MIN_SIDE_PX, round(height * scale))


def allocate_counts(total: int, shares) -> np.ndarray:
    """Split ``total`` into integer counts proportional to ``shares`` (largest remainder)."""
    shares = np.asarray(shares, dtype=np.float64)
    exact = total * shares / shares.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def draw_look(plan_rng: np.random.Generator) -> SiteLook:
    """One site's camera under the strong site shift."""
    return SiteLook(
        tint=tuple(float(t) for t in plan_rng.uniform(0.65, 1.35, size=3)),
        contrast=float(plan_rng.uniform(0.6, 1.4)),
        gain=float(np.exp(plan_rng.uniform(np.log(0.55), np.log(1.5)))),
        noise=float(plan_rng.uniform(1.0, 4.0)),
        animal_scale=float(np.exp(plan_rng.uniform(np.log(0.6), np.log(1.35)))),
    )


def make_sites(plan_rng: np.random.Generator, design: SiteDesign, scale: float, frame_sizes=None) -> list[Site]:
    """Train sites then test sites, with distinct random names like ``S0117``.

    ``frame_sizes``: None for the real mix (FRAME_SIZES with FRAME_SIZE_WEIGHTS), else a list of
    (width, height) drawn with equal weights (a benchmark asks for 960x540 only)."""
    sizes, weights = (FRAME_SIZES, FRAME_SIZE_WEIGHTS) if frame_sizes is None else (
        list(frame_sizes), [1 / len(frame_sizes)] * len(frame_sizes))
    n_sites = design.train_sites + design.test_sites
    day_range, affinity_shape = _SHIFT_DRAWS[design.shift]
    numbers = plan_rng.permutation(np.arange(FIRST_SITE_NUMBER, FIRST_SITE_NUMBER + 4 * n_sites))
    sites = []
    for index in range(n_sites):
        size = sizes[plan_rng.choice(len(sizes), p=weights)]
        width, height = scaled_frame_size(size, scale)
        sites.append(Site(
            name=f"S{numbers[index]:04d}",
            split="train" if index < design.train_sites else "test",
            index=index,
            width=width,
            height=height,
            weight=float(plan_rng.gamma(2.0, 1.0)),
            day_fraction=float(plan_rng.uniform(*day_range)),
            # gamma(2) per class: every class occurs everywhere, but mixes differ by site.
            class_affinity=tuple(float(a) for a in plan_rng.gamma(affinity_shape, 1.0, size=len(CLASS_NAMES))),
            night_gamma=float(plan_rng.uniform(0.7, 1.0)),
            night_gain=float(plan_rng.uniform(0.8, 1.15)),
        ))
    if design.shift == "strong":  # drawn after every site, so the normal design's draws stay as they were
        sites = [replace(site, look=draw_look(plan_rng)) for site in sites]
    return sites


def plan_split(plan_rng: np.random.Generator, sites: list[Site], n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Class index and site index per image: exact class shares, sites drawn by affinity."""
    counts = allocate_counts(n_images, CLASS_SHARES)
    labels = plan_rng.permutation(np.repeat(np.arange(len(CLASS_NAMES)), counts))
    weights = np.array([[site.weight * site.class_affinity[c] for c in range(len(CLASS_NAMES))] for site in sites])
    probabilities = weights / weights.sum(axis=0, keepdims=True)  # (sites, classes)
    site_choice = np.array([plan_rng.choice(len(sites), p=probabilities[:, label]) for label in labels], dtype=np.int64)
    return labels, site_choice


# --------------------------------------------------------------------------- writing
def encode_jpeg(image: Image.Image) -> bytes:
    """Fixed JPEG settings, so the bytes depend only on the pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, comment=DEMO_MARKER)
    return buffer.getvalue()


def _is_demo_jpeg(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            return image.format == "JPEG" and image.info.get("comment") == DEMO_MARKER
    except OSError:
        return False


def _check_target(root: Path) -> list[Path]:
    """Refuse to write into a folder holding anything but an earlier demo; return its old images."""
    if not root.exists():
        return []
    if not root.is_dir():
        raise FileExistsError(f"{root}: exists and is not a folder")
    old_images = []
    for entry in sorted(root.iterdir()):
        if entry.name in _LAYOUT_FILES and entry.is_file():
            continue
        if entry.name in IMAGE_DIRS.values() and entry.is_dir():
            for image in sorted(entry.iterdir()):
                if not (_ID_RE.match(image.name) and image.is_file() and _is_demo_jpeg(image)):
                    raise FileExistsError(
                        f"{image}: not a demo frame written by dss.demo.sample; refusing to write the demo "
                        f"dataset into {root} (choose an empty or new folder)")
                old_images.append(image)
            continue
        raise FileExistsError(
            f"{entry}: {root} holds files other than an earlier demo dataset; "
            "choose an empty or new folder")
    return old_images


@dataclass
class _Written:
    """What has been written so far: the CSV rows and the counts the summary reports."""

    rows: dict = field(default_factory=lambda: {"train": [], "test": []})  # split -> [(id, site name, class index)]
    grey_frames: int = 0
    frame_sizes: dict = field(default_factory=dict)  # "WxH" -> frames

    def class_counts(self, split: str) -> dict:
        counts = np.bincount([label for _, _, label in self.rows[split]], minlength=len(CLASS_NAMES))
        return {name: int(n) for name, n in zip(CLASS_NAMES, counts)}

    def sites(self, split: str) -> list[str]:
        return sorted({site for _, site, _ in self.rows[split]})


def _check_arguments(n_train: int, n_test: int, scale: float, design: SiteDesign) -> None:
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if design.train_sites < 1 or design.test_sites < 1:
        raise ValueError(f"need at least one train and one test site, got {design.train_sites} and {design.test_sites}")
    if design.shift not in SHIFTS:
        raise ValueError(f"shift must be one of {', '.join(SHIFTS)}, got {design.shift!r}")


def _write_frames(root: Path, seed: int, split_sites: dict[str, list[Site]], counts: dict[str, int],
                  plan_rng: np.random.Generator) -> _Written:
    """Draw and write every frame, train then test, ids numbered across both splits.

    ``plan_rng`` draws each split's classes, sites and day/night in that order; each frame has its
    own Generator seeded by its number, so frames do not depend on one another."""
    written = _Written()
    backgrounds: dict[int, np.ndarray] = {}  # site index -> its empty scene
    next_number = 0
    for split, count in counts.items():
        labels, site_choice = plan_split(plan_rng, split_sites[split], count)
        day_draws = plan_rng.random(count)
        folder = root / IMAGE_DIRS[split]
        folder.mkdir(parents=True, exist_ok=True)
        for label, site_position, day_draw in zip(labels, site_choice, day_draws):
            site = split_sites[split][site_position]
            class_name = CLASS_NAMES[label]
            if site.index not in backgrounds:
                backgrounds[site.index] = render_background(seed, site)
            is_day = day_draw < min(0.9, site.day_fraction * _DAY_FACTOR[class_name])
            image_id = f"ZJ{next_number:06d}"
            frame = render_frame(site, backgrounds[site.index], class_name,
                                 np.random.default_rng([seed, 1, next_number]), is_day)
            fileio.write_bytes(folder / f"{image_id}.jpg", encode_jpeg(frame))
            written.rows[split].append((image_id, site.name, int(label)))
            written.grey_frames += not is_day
            size_key = f"{site.width}x{site.height}"
            written.frame_sizes[size_key] = written.frame_sizes.get(size_key, 0) + 1
            next_number += 1
    return written


def write_layout_csvs(root: str | os.PathLike, rows: dict, class_names=CLASS_NAMES, test_labels: bool = False) -> None:
    """The Conser-vision CSVs: ``{split}_features.csv`` (id, filepath, site) of both splits and
    ``train_labels.csv`` (one-hot in ``class_names`` order); ``test_labels.csv`` too when
    ``test_labels``. ``rows``: split -> [(id, site, class index)], images at IMAGE_DIRS[split]/<id>.jpg."""
    root = Path(root)
    for split in ("train", "test"):
        lines = ["id,filepath,site"] + [f"{i},{IMAGE_DIRS[split]}/{i}.jpg,{s}" for i, s, _ in rows[split]]
        fileio.write_text(root / f"{split}_features.csv", "\n".join(lines) + "\n")
    for split in ("train", "test") if test_labels else ("train",):
        one_hot = [",".join("1.0" if c == label else "0.0" for c in range(len(class_names)))
                   for _, _, label in rows[split]]
        lines = ["id," + ",".join(class_names)] + [f"{row[0]},{values}" for row, values in zip(rows[split], one_hot)]
        fileio.write_text(root / f"{split}_labels.csv", "\n".join(lines) + "\n")


def write_demo_dataset(root: str | os.PathLike, n_train: int = DEFAULT_N_TRAIN, n_test: int = DEFAULT_N_TEST,
                       seed: int = 0, scale: float = 1.0, frame_sizes=None, design: SiteDesign = SiteDesign(),
                       test_labels: bool = False) -> dict:
    """Write a synthetic dataset in the Conser-vision layout under ``root``; return a summary.

    ``scale`` multiplies the real frame sizes (0.1 gives about 96x54 frames); ``frame_sizes``, a list of
    (width, height), replaces the real mix of sizes (before ``scale``); ``design`` sets the number of
    sites per split and the site shift; ``test_labels`` also writes test_labels.csv. A folder that already
    holds an earlier demo is replaced (its old frames are removed); any other content is refused.
    The summary: root, n_train, n_test, class_counts / test_class_counts (name -> count),
    train_sites / test_sites (names), grey_frames (count over both splits), frame_sizes ("WxH" -> count).
    """
    _check_arguments(n_train, n_test, scale, design)
    root = Path(root)
    old_images = _check_target(root)
    # The CSVs go first and come back last: a run killed midway leaves no CSV naming missing frames.
    for name in _LAYOUT_FILES:
        (root / name).unlink(missing_ok=True)
    for image in old_images:
        image.unlink()

    plan_rng = np.random.default_rng([seed, 0])
    sites = make_sites(plan_rng, design, scale, frame_sizes)
    split_sites = {"train": sites[:design.train_sites], "test": sites[design.train_sites:]}
    written = _write_frames(root, seed, split_sites, {"train": n_train, "test": n_test}, plan_rng)
    write_layout_csvs(root, written.rows, test_labels=test_labels)
    return {
        "root": str(root),
        "n_train": n_train,
        "n_test": n_test,
        "class_counts": written.class_counts("train"),
        "test_class_counts": written.class_counts("test"),
        "train_sites": written.sites("train"),
        "test_sites": written.sites("test"),
        "grey_frames": written.grey_frames,
        "frame_sizes": dict(sorted(written.frame_sizes.items())),
    }


# --------------------------------------------------------------------------- CLI
def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}")
    return number


def parse_args(argv=None) -> argparse.Namespace:
    from dss.cli import non_negative_int, positive_int

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder to write (new, empty, or an earlier demo dataset)")
    parser.add_argument("--train", type=positive_int, default=DEFAULT_N_TRAIN, help="number of train images")
    parser.add_argument("--test", type=non_negative_int, default=DEFAULT_N_TEST, help="number of test images")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    parser.add_argument("--scale", type=_positive_float, default=1.0,
                        help="multiplier on the real frame sizes 960x540/640x360/360x240 (min 16 px a side)")
    parser.add_argument("--shift", choices=SHIFTS, default="normal",
                        help="how much camera sites differ: 'normal' (the demo) or 'strong' (own colour cast, "
                             "exposure, noise, animal size, share of infrared and a lopsided class mix per site)")
    parser.add_argument("--test-labels", action="store_true",
                        help="also write test_labels.csv (the test split's classes, for scoring on held-out sites)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        summary = write_demo_dataset(args.root, n_train=args.train, n_test=args.test, seed=args.seed, scale=args.scale,
                                     design=SiteDesign(shift=args.shift), test_labels=args.test_labels)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    print(f"wrote demo dataset {summary['root']}: {summary['n_train']} train / {summary['n_test']} test images, "
          f"{len(summary['train_sites'])} train / {len(summary['test_sites'])} test sites, "
          f"{summary['grey_frames']} grey, sizes {summary['frame_sizes']}"
          + (f", {args.shift} site shift" if args.shift != "normal" else "")
          + (", test labels" if args.test_labels else "") + f", {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
