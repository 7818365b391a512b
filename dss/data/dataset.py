"""The pickle format shared by preprocess.py and dss_train.py.

One pickle per split (``train_data.pkl``, ``test_data.pkl``), or numbered shards
(``train_data-00000-of-00003.pkl``). Each is a plain dict:

    images       uint8 ndarray (N, H, W, 3), C-contiguous
    ids          list[str], unique
    labels       int64 ndarray (N,) of class indices, or None (test)
    class_names  list[str], the label columns in CSV order (may be [] for unlabeled data)
    sites        list[str], camera site per image ("" when unknown)
    meta         dict of per-image lists/arrays, each of length N
                 (source_key, orig_width, orig_height, orig_mode, was_grey)
    info         dict: format_version, split, image_size, resize_policy, source, ...

Written with pickle protocol 5, so the image block is stored in-band as one buffer
and loads at disk speed. ``load_split`` never runs a bare ``pickle.load``: it reads with
dss.data.safepickle's ``SafeUnpickler`` (numpy arrays and plain data only), then validates the dict
field by field. The shards of a split are joined by one function, ``merge_shards``, whether their
pixels are kept in memory or left on disk for streaming (dss.data.streaming).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from dss.data.safepickle import SafeUnpickler

FORMAT_VERSION = 1
SPLITS = ("train", "test")
REQUIRED_KEYS = ("images", "ids", "labels", "class_names", "sites", "meta", "info")
PICKLE_PROTOCOL = 5

_SHARD_RE = re.compile(r"^(?P<split>[a-z]+)_data-(?P<index>\d{5})-of-(?P<count>\d{5})\.pkl$")


class DatasetError(ValueError):
    """A pickle that cannot be used; the message names the file and the field."""


# --------------------------------------------------------------------------- names
def split_filename(split: str, shard_index: int | None = None, num_shards: int | None = None) -> str:
    """``train_data.pkl``, or ``train_data-00001-of-00003.pkl`` for a shard."""
    if num_shards is None or num_shards == 1 and shard_index in (None, 0):
        return f"{split}_data.pkl"
    return f"{split}_data-{shard_index:05d}-of-{num_shards:05d}.pkl"


# What a folder of raw Conser-vision images holds (preprocess.py's --input, not a data dir).
RAW_LAYOUT_MARKERS = ("train_labels.csv", "train_features.csv", "test_features.csv", "train_features", "test_features")
RAW_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _preprocess_hint(folder: Path) -> str:
    """How to make the pickles: a folder of raw images is preprocess's input, so the pickles go to a
    folder of their own, never into the raw images' folder."""
    raw = any((folder / name).exists() for name in RAW_LAYOUT_MARKERS) or any(
        entry.suffix.lower() in RAW_IMAGE_SUFFIXES for entry in folder.iterdir())
    if raw:
        return (f"{folder} holds raw images: preprocess them into a separate folder, e.g. python preprocess.py "
                f"--input {folder} --output-dir ./output, then pass --data-dir ./output")
    return f"run python preprocess.py --input <your images> --output-dir {folder} first"


def find_split_files(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The pickle(s) holding ``split`` in ``data_dir``: the single file, or all shards in order.

    Raises FileNotFoundError when there is none, DatasetError when shards are incomplete
    or a single file and shards are both present.
    """
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"data dir {folder} {'is not a folder' if folder.exists() else 'does not exist'}: "
                                "point --data-dir at the --output-dir of preprocess.py")
    single = folder / split_filename(split)
    shards: dict[int, Path] = {}
    counts = set()
    for entry in folder.iterdir():
        match = _SHARD_RE.match(entry.name)
        if match and match.group("split") == split:
            shards[int(match.group("index"))] = entry
            counts.add(int(match.group("count")))
    if single.is_file() and shards:
        raise DatasetError(
            f"{folder}: both {single.name} and {len(shards)} shard file(s) of '{split}' exist; "
            "remove one set so the data is not counted twice"
        )
    if single.is_file():
        return [single]
    if not shards:
        raise FileNotFoundError(f"no {split} data in {folder}: expected {single.name} or "
                                f"{split}_data-00000-of-0000K.pkl shards ({_preprocess_hint(folder)})")
    if len(counts) != 1:
        raise DatasetError(f"{folder}: '{split}' shards disagree on the shard count: {sorted(counts)}")
    (count,) = counts
    missing = [i for i in range(count) if i not in shards]
    if missing:
        names = ", ".join(split_filename(split, i, count) for i in missing[:5])
        raise DatasetError(f"{folder}: {len(missing)} of {count} '{split}' shards are missing ({names}); "
                           "finish the missing preprocess shard runs")
    return [shards[i] for i in range(count)]


# --------------------------------------------------------------------------- reading
def _ndarray_state_guard(obj: Any, path: str) -> None:
    # Arrays made via _reconstruct get their state from BUILD -> ndarray.__setstate__,
    # which numpy refuses for object dtype without a list... check the result anyway.
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise pickle.UnpicklingError(f"forbidden: object array at {path}")


def read_pickle_file(path: str | os.PathLike) -> Any:
    """Safely unpickle a file. Any failure becomes a DatasetError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return SafeUnpickler(handle).load()
    except pickle.UnpicklingError as exc:
        raise DatasetError(f"{path}: refused to load: {exc}. Re-run preprocess.py to rebuild it.") from exc
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError,
            MemoryError, RecursionError, UnicodeDecodeError, SystemError, struct.error) as exc:
        # SystemError: numpy's dtype.__setstate__ on a corrupt BUILD state (found by bench/fuzz.py).
        raise DatasetError(f"{path}: not a valid dataset pickle ({type(exc).__name__}: {exc}). "
                           "It is truncated or corrupt: re-run preprocess.py.") from exc


# --------------------------------------------------------------------------- validation
def _as_str_list(value: Any, field: str, n: int, source: str) -> list[str]:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "US":
            raise DatasetError(f"{source}: field '{field}' must hold strings, got dtype {value.dtype}")
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise DatasetError(f"{source}: field '{field}' must be a list of str, got {type(value).__name__}")
    if len(value) != n:
        raise DatasetError(f"{source}: field '{field}' has {len(value)} entries but images has {n}")
    out = []
    for index, item in enumerate(value):
        if isinstance(item, bytes):
            item = item.decode("utf-8")
        if not isinstance(item, str):
            raise DatasetError(f"{source}: field '{field}'[{index}] is {type(item).__name__}, not str")
        out.append(item)
    return out


def _checked_images(images: Any, source: str) -> np.ndarray:
    """uint8 (N, H, W, 3), made C-contiguous."""
    if not isinstance(images, np.ndarray):
        raise DatasetError(f"{source}: field 'images' must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise DatasetError(f"{source}: field 'images' must be uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[3] != 3:
        raise DatasetError(f"{source}: field 'images' must have shape (N, H, W, 3), got {images.shape}")
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise DatasetError(f"{source}: field 'images' has an empty image size {images.shape[1:3]}")
    return images if images.flags.c_contiguous else np.ascontiguousarray(images)


def _checked_ids(value: Any, n: int, source: str) -> list[str]:
    ids = _as_str_list(value, "ids", n, source)
    if len(set(ids)) != n:
        seen, dupes = set(), []
        for item in ids:
            if item in seen:
                dupes.append(item)
            seen.add(item)
        raise DatasetError(f"{source}: field 'ids' has duplicates: {dupes[:5]}")
    return ids


def _checked_class_names(class_names: Any, source: str) -> list[str]:
    if isinstance(class_names, np.ndarray):
        class_names = class_names.tolist()
    if not isinstance(class_names, (list, tuple)) or not all(isinstance(c, str) and c for c in class_names):
        raise DatasetError(f"{source}: field 'class_names' must be a list of non-empty str")
    class_names = list(class_names)
    if len(set(class_names)) != len(class_names):
        raise DatasetError(f"{source}: field 'class_names' has duplicates: {class_names}")
    return class_names


def _checked_labels(labels: Any, n: int, num_classes: int, source: str) -> np.ndarray | None:
    """int64 (N,) class indices in [0, num_classes), or None (an unlabelled split)."""
    if labels is None:
        return None
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        raise DatasetError(f"{source}: field 'labels' must be an integer numpy array or None")
    if labels.shape != (n,):
        raise DatasetError(f"{source}: field 'labels' has shape {labels.shape}, expected ({n},)")
    if not num_classes:
        raise DatasetError(f"{source}: field 'labels' is set but 'class_names' is empty")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{source}: field 'labels' out of range [0, {num_classes}): "
                           f"min {labels.min()}, max {labels.max()}")
    return labels.astype(np.int64, copy=False)


def _checked_meta_and_info(meta: Any, info: Any, n: int, source: str) -> tuple[dict, dict]:
    if not isinstance(meta, dict):
        raise DatasetError(f"{source}: field 'meta' must be a dict, got {type(meta).__name__}")
    for key, value in meta.items():
        if not isinstance(key, str):
            raise DatasetError(f"{source}: field 'meta' has a non-str key {key!r}")
        if not isinstance(value, (list, tuple, np.ndarray)) or len(value) != n:
            raise DatasetError(f"{source}: field 'meta.{key}' must have one entry per image ({n})")
        _ndarray_state_guard(value, f"meta.{key}")
    if not isinstance(info, dict):
        raise DatasetError(f"{source}: field 'info' must be a dict, got {type(info).__name__}")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetError(f"{source}: field 'info.format_version' is {version!r}, this code reads {FORMAT_VERSION}; "
                           "re-run preprocess.py with this version")
    return dict(meta), dict(info)


def validate(data: Any, source: str = "<data>") -> dict:
    """Check the schema; returns the dict with normalised types (lists of str, int64 labels).

    Raises DatasetError naming the field on any mismatch.
    """
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: top level must be a dict, got {type(data).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise DatasetError(f"{source}: missing field(s) {missing}; expected {list(REQUIRED_KEYS)}")
    images = _checked_images(data["images"], source)
    n = images.shape[0]
    ids = _checked_ids(data["ids"], n, source)
    class_names = _checked_class_names(data["class_names"], source)
    labels = _checked_labels(data["labels"], n, len(class_names), source)
    sites = _as_str_list(data["sites"], "sites", n, source)
    meta, info = _checked_meta_and_info(data["meta"], data["info"], n, source)
    return {"images": images, "ids": ids, "labels": labels, "class_names": class_names,
            "sites": sites, "meta": meta, "info": info}


# --------------------------------------------------------------------------- load
def load_file(path: str | os.PathLike) -> dict:
    """Safely load and validate one pickle file."""
    return validate(read_pickle_file(path), source=str(path))


def _check_shards_agree(first: dict, part: dict, shapes: tuple, source: str) -> None:
    """``shapes``: the (H, W, 3) of ``first``'s images and of ``part``'s."""
    if part["class_names"] != first["class_names"]:
        raise DatasetError(f"{source}: shards disagree on class_names")
    if shapes[1] != shapes[0]:
        raise DatasetError(f"{source}: shards disagree on image shape {shapes[1]} vs {shapes[0]}")
    if (part["labels"] is None) != (first["labels"] is None):
        raise DatasetError(f"{source}: some shards have labels and others do not")


def _merge_meta(metas: list[dict]) -> dict:
    """Per-image meta fields joined in shard order; a field missing from any shard is dropped."""
    merged = {}
    for key in metas[0]:
        values = [meta.get(key) for meta in metas]
        if any(value is None for value in values):
            continue
        if all(isinstance(value, np.ndarray) for value in values):
            merged[key] = np.concatenate(values)
        else:
            merged[key] = [item for value in values for item in list(value)]
    return merged


def merge_shards(files: list[Path], source: str, keep_images: bool = True) -> dict:
    """Load a split's pickles one at a time (each validated) and join them in file order.

    ``keep_images``: the dict of one pickle with every shard's images concatenated, validated
    again as a whole (an id in two shards is refused); a single file is returned as loaded.
    Otherwise each file's pixels are hashed and dropped as soon as it is read (data bigger than
    memory): ``images`` is None, and ``shard_sizes`` (rows per file), ``image_shape`` (H, W, 3)
    and ``images_sha256`` (sha256 of every pixel in row order) describe them.
    """
    parts, pixels, shape, digest = [], [], None, hashlib.sha256()
    for path in files:
        part = load_file(path)
        images = part.pop("images")
        if parts:
            _check_shards_agree(parts[0], part, (shape, images.shape[1:]), source)
        shape = images.shape[1:]
        if keep_images:
            pixels.append(images)
        else:
            digest.update(memoryview(images.reshape(-1)))   # C-contiguous after validate
        parts.append(part)
        del images
    first = parts[0]
    if keep_images and len(parts) == 1:
        return {"images": pixels[0], **first}
    merged = {
        "images": np.concatenate(pixels) if keep_images else None,
        "ids": [image_id for part in parts for image_id in part["ids"]],
        "labels": None if first["labels"] is None else np.concatenate([part["labels"] for part in parts]),
        "class_names": first["class_names"],
        "sites": [site for part in parts for site in part["sites"]],
        "meta": _merge_meta([part["meta"] for part in parts]),
        "info": dict(first["info"], num_shards=len(parts)),
    }
    if keep_images:
        return validate(merged, source=source)
    merged.update(shard_sizes=[len(part["ids"]) for part in parts], image_shape=tuple(shape),
                  images_sha256=digest.hexdigest())
    return merged


def load_split(data_dir: str | os.PathLike, split: str) -> dict:
    """Load ``split`` ('train' or 'test') from ``data_dir``: the single pickle or all its shards."""
    return merge_shards(find_split_files(data_dir, split), source=f"{data_dir} ({split})")


def to_dataframe(data: dict):
    """One row per image for notebooks: id, site, label (name), the meta fields, and ``image``
    (a view into the shared array, no copy)."""
    import pandas as pd

    frame = pd.DataFrame({"id": data["ids"], "site": data["sites"]})
    if data["labels"] is not None:
        names = np.asarray(data["class_names"], dtype=object)
        frame["label"] = names[data["labels"]]
        frame["label_index"] = data["labels"]
    for key, value in data["meta"].items():
        frame[key] = list(value) if not isinstance(value, np.ndarray) else value
    frame["image"] = list(data["images"])
    return frame


def load_dataframe(path: str | os.PathLike):
    """Safely load a pickle file (or a data dir + split via ``load_split``) as a DataFrame."""
    return to_dataframe(load_file(path))


def content_fingerprint(images: np.ndarray, ids: list[str], labels: np.ndarray | None,
                        class_names: list[str], sites: list[str]) -> str:
    """sha256 over the pixels, ids, labels, class names and sites of a split (hex)."""
    digest = hashlib.sha256()
    digest.update(repr((images.shape, str(images.dtype))).encode())
    # Hash in 64 MiB slices so a multi-GB array is never copied whole.
    flat = np.ascontiguousarray(images).reshape(-1)
    step = 64 << 20
    for start in range(0, flat.size, step):
        digest.update(memoryview(flat[start:start + step]))
    digest.update(json.dumps([list(ids), list(class_names), list(sites)]).encode())
    if labels is not None:
        digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()
