"""Write train/test pickles of synthetic, learnable images straight from numpy (no JPEGs).

For timing dss_train.py end to end at full size where generating and decoding thousands of
960x540 JPEGs would cost more than the training being measured (e.g. on the GPU machine):

    python bench/synthetic_pickles.py /tmp/pickles --train 9866 --test 4000 --image-size 224

Each class gets its own colour tint and a bright square whose size depends on the class, at a
random position over noise; sites are spread so a site-grouped split works.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dss.data import dataset  # noqa: E402
from dss import fileio
from dss.demo.sample import CLASS_NAMES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--train", type=int, default=9866, help="training images (the team's set: 9,866)")
    parser.add_argument("--test", type=int, default=4000, help="test images (the team's set: 4,000)")
    parser.add_argument("--image-size", type=int, default=224, help="stored size, px")
    parser.add_argument("--sites", type=int, default=60, help="camera sites in the training split")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def synthetic_split(count: int, size: int, num_sites: int, site_offset: int, rng: np.random.Generator,
                    split: str, labelled: bool) -> dict:
    num_classes = len(CLASS_NAMES)
    labels = rng.integers(0, num_classes, count)
    # (N, S, S, 3) uint8: noise plus a per-class tint, filled in chunks to bound memory.
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    tints = rng.integers(-40, 40, (num_classes, 3))
    for start in range(0, count, 512):
        stop = min(start + 512, count)
        block = rng.integers(60, 160, (stop - start, size, size, 3), dtype=np.int16)
        block += tints[labels[start:stop]][:, None, None, :]
        for row, label in enumerate(labels[start:stop]):
            side = size // 8 + (label * size) // (3 * num_classes)
            top, left = rng.integers(0, size - side, 2)
            block[row, top:top + side, left:left + side] += 80
        images[start:stop] = np.clip(block, 0, 255).astype(np.uint8)
    ids = [f"{split[:2].upper()}{i:07d}" for i in range(count)]
    return {
        "images": images, "ids": ids, "labels": labels.astype(np.int64) if labelled else None,
        "class_names": list(CLASS_NAMES),
        "sites": [f"S{site_offset + i % num_sites:04d}" for i in range(count)],
        "meta": {"source_key": [f"{split}/{i}.jpg" for i in ids]},
        "info": {"format_version": dataset.FORMAT_VERSION, "split": split, "image_size": size,
                 "resize_policy": "squash", "source": "bench/synthetic_pickles.py"},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for split, count, labelled, offset in (("train", args.train, True, 0), ("test", args.test, False, 10_000)):
        data = synthetic_split(count, args.image_size, args.sites, offset, rng, split, labelled)
        path = args.output_dir / dataset.split_filename(split)
        # The byte layout preprocess writes (dss.ingest.splitfile's output equals this pickle).
        fileio.write_bytes(path, pickle.dumps(dataset.validate(data, str(path)), protocol=dataset.PICKLE_PROTOCOL))
        print(f"wrote {path} ({data['images'].nbytes / 2**20:.0f} MiB of images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
