"""Real photographs in the Conser-vision layout, for the recipe benchmark (bench/recipe.py).

    python bench/real_dataset.py fashion-mnist /tmp/real/fmnist --train 3000 --test 1000
    python bench/real_dataset.py elpv /tmp/real/elpv --source /tmp/realdata/elpv/elpv_dataset/data

Writes under the output folder what preprocess.py reads: ``train_features/<id>.jpg``,
``test_features/<id>.jpg``, ``train_labels.csv`` (one-hot), ``train_features.csv`` and
``test_features.csv`` (id, filepath, site), ``test_labels.csv`` (for scoring on the held-out split),
and ``dataset.json`` last (what was written from what; a folder with the same ``dataset.json`` is
reused as it is).

The data sets (neither is installed into the project's environment; install them beside it):

- ``fashion-mnist``: Zalando's article photographs, 28x28 grey, 10 classes; Debian's package
  ``dataset-fashion-mnist`` (MIT/Expat): ``apt-get install dataset-fashion-mnist`` puts the IDX files
  in /usr/share/datasets/fashion-mnist/ (or ``apt-get download`` it and ``dpkg-deb -x`` it anywhere,
  then ``--source``). Train images come from its training file, test images from its test file.
  Sites: none in the data, so every image gets a pseudo-site, a bucket of a hash of its index (30
  train buckets, 10 test buckets, disjoint): the site-grouped splits run as on camera data, but there
  is NO real site shift here.
- ``elpv``: electroluminescence camera photographs of solar cells (300x300 grey, 2,624 cells from 44
  modules), PyPI's ``elpv-dataset`` (data CC BY-NC-SA 4.0, code Apache-2.0): ``pip install --target
  /tmp/realdata/elpv elpv-dataset`` (or unzip its wheel), then ``--source .../elpv_dataset/data``.
  Classes: the experts' defect probability 0, 1/3, 2/3, 1 (4 classes). Sites: blocks of 60
  consecutive cell numbers; consecutive cells look alike (same module, same exposure), so a block
  stands for a module, but the data set does not document its order: an assumption. A quarter of the
  blocks (drawn with --seed) are the test split.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from dss import fileio  # noqa: E402
from dss.demo.sample import IMAGE_DIRS, write_layout_csvs  # noqa: E402

FASHION_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")
ELPV_CLASSES = ("defect_p0", "defect_p33", "defect_p67", "defect_p100")
FASHION_TRAIN_SITES, FASHION_TEST_SITES = 30, 10
ELPV_BLOCK = 60
JPEG_QUALITY = 95
DEFAULT_SOURCES = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist", "/tmp/realdata/fmnist/usr/share/datasets/fashion-mnist"),
    "elpv": ("/tmp/realdata/elpv/elpv_dataset/data",),
}
PACKAGES = {
    "fashion-mnist": "Debian dataset-fashion-mnist 0.0~git20200523.55506a9-1 (MIT/Expat)",
    "elpv": "PyPI elpv-dataset 1.0.0.post1 (data CC BY-NC-SA 4.0, code Apache-2.0)",
}
DATASETS = tuple(DEFAULT_SOURCES)


class RealDataError(RuntimeError):
    """The data set's files are not where they were looked for (the message says how to install them)."""


@dataclass
class Split:
    """One split's images (N, H, W) uint8 grey, class indices and site names."""

    images: np.ndarray
    labels: np.ndarray
    sites: list[str]


def find_source(name: str, source: str | Path | None = None) -> Path:
    """The folder holding ``name``'s files: ``source``, else the first default that exists."""
    candidates = [Path(source)] if source else [Path(path) for path in DEFAULT_SOURCES[name]]
    marker = "train-images-idx3-ubyte.gz" if name == "fashion-mnist" else "labels.csv"
    for folder in candidates:
        if (folder / marker).is_file():
            return folder
    raise RealDataError(f"{name}: no {marker} in {', '.join(map(str, candidates))}; install {PACKAGES[name]} "
                        "(see bench/real_dataset.py) and pass --source")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): uint8 images (N, rows, cols) or labels (N,)."""
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _hash_bucket(text: str, buckets: int) -> int:
    return zlib.crc32(text.encode()) % buckets


def load_fashion_mnist(source: Path, n_train: int, n_test: int, seed: int) -> dict[str, Split]:
    """A seeded subset of each file; pseudo-sites by hash bucket (train T00-T29, test H00-H09)."""
    rng = np.random.default_rng([seed, 7])
    splits = {}
    for split, prefix, count, buckets in (("train", "train", n_train, FASHION_TRAIN_SITES),
                                          ("test", "t10k", n_test, FASHION_TEST_SITES)):
        images = _read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(source / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        chosen = np.sort(rng.permutation(len(labels))[:count])
        site_prefix = "T" if split == "train" else "H"
        sites = [f"{site_prefix}{_hash_bucket(f'{split}:{index}', buckets):02d}" for index in chosen]
        splits[split] = Split(images[chosen], labels[chosen], sites)
    return splits


def load_elpv(source: Path, n_train: int, n_test: int, seed: int) -> dict[str, Split]:
    """Cells by block of ELPV_BLOCK consecutive numbers; a quarter of the blocks are the test split."""
    rows = [line.split() for line in (source / "labels.csv").read_text().splitlines() if line.strip()]
    blocks = np.array([(int(Path(path).stem.removeprefix("cell")) - 1) // ELPV_BLOCK for path, _, _ in rows])
    labels = np.array([round(float(probability) * 3) for _, probability, _ in rows], dtype=np.int64)
    rng = np.random.default_rng([seed, 8])
    unique_blocks = np.unique(blocks)
    test_blocks = rng.permutation(unique_blocks)[:round(len(unique_blocks) / 4)]
    splits = {}
    for split, count in (("train", n_train), ("test", n_test)):
        members = np.flatnonzero(np.isin(blocks, test_blocks) == (split == "test"))
        chosen = np.sort(rng.permutation(members)[:count])
        images = np.stack([np.asarray(Image.open(source / rows[i][0]).convert("L")) for i in chosen])
        splits[split] = Split(images, labels[chosen], [f"M{blocks[i]:02d}" for i in chosen])
    return splits


LOADERS = {"fashion-mnist": (load_fashion_mnist, FASHION_CLASSES, "FM"),
           "elpv": (load_elpv, ELPV_CLASSES, "EL")}


def _encode(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    return buffer.getvalue()


def write_real_dataset(name: str, root: str | Path, n_train: int = 3000, n_test: int = 1000, seed: int = 0,
                       source: str | Path | None = None) -> dict:
    """Write ``name`` (one of DATASETS) under ``root`` in the Conser-vision layout; return its
    ``dataset.json`` content. A folder whose ``dataset.json`` matches is reused; any other content
    in ``root`` is refused."""
    root = Path(root)
    folder = find_source(name, source)
    wanted = {"name": name, "package": PACKAGES[name], "requested_train": n_train, "requested_test": n_test,
              "seed": seed}
    manifest = root / "dataset.json"
    if manifest.is_file():
        existing = json.loads(manifest.read_text())
        if {key: existing.get(key) for key in wanted} == wanted:
            return existing
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: not empty and not this data set; choose an empty or new folder")
    load, class_names, id_prefix = LOADERS[name]
    splits = load(folder, n_train, n_test, seed)
    rows, number = {"train": [], "test": []}, 0
    for split, data in splits.items():
        (root / IMAGE_DIRS[split]).mkdir(parents=True, exist_ok=True)
        for image, label, site in zip(data.images, data.labels, data.sites):
            image_id = f"{id_prefix}{number:06d}"
            fileio.write_bytes(root / IMAGE_DIRS[split] / f"{image_id}.jpg", _encode(image))
            rows[split].append((image_id, site, int(label)))
            number += 1
    write_layout_csvs(root, rows, class_names, test_labels=True)
    summary = {**wanted, "source": str(folder), "class_names": list(class_names),
               "train": len(rows["train"]), "test": len(rows["test"]),
               "train_sites": len({site for _, site, _ in rows["train"]}),
               "test_sites": len({site for _, site, _ in rows["test"]}),
               "image_size": list(splits["train"].images.shape[1:])}
    fileio.write_text(manifest, json.dumps(summary, indent=2) + "\n")
    return summary


def read_test_labels(root: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(ids, class indices, class names) of ``root``'s test_labels.csv (one-hot, any class order)."""
    with open(Path(root) / "test_labels.csv", newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        ids, labels = [], []
        for row in reader:
            ids.append(row[0])
            labels.append([float(value) for value in row[1:]].index(1.0))
    return ids, np.asarray(labels, dtype=np.int64), header[1:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=DATASETS)
    parser.add_argument("root", type=Path, help="folder to write (new or empty)")
    parser.add_argument("--train", type=int, default=3000, help="train images at most")
    parser.add_argument("--test", type=int, default=1000, help="test images at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, help="the data set's installed files (default: the usual places)")
    args = parser.parse_args(argv)
    try:
        summary = write_real_dataset(args.name, args.root, args.train, args.test, args.seed, args.source)
    except (RealDataError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
