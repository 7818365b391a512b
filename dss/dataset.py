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
and loads at disk speed. ``load_split`` never runs a bare ``pickle.load``: the
``SafeUnpickler`` allows only the exact numpy reconstruction functions needed for
ndarrays (both numpy 1.x ``numpy.core`` and 2.x ``numpy._core`` spellings), each
returned as a fresh wrapper so a crafted BUILD opcode cannot mutate numpy itself,
and refuses object dtypes. The loaded dict is then validated field by field.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from dss import fileio

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


def find_split_files(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The pickle(s) holding ``split`` in ``data_dir``: the single file, or all shards in order.

    Raises FileNotFoundError when there is none, DatasetError when shards are incomplete
    or a single file and shards are both present.
    """
    folder = Path(data_dir)
    single = folder / split_filename(split)
    shards: dict[int, Path] = {}
    counts = set()
    if folder.is_dir():
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
        raise FileNotFoundError(
            f"no {split} data in {folder}: expected {single.name} or {split}_data-00000-of-0000K.pkl shards "
            "(run preprocess.py --output-dir pointing here first)"
        )
    if len(counts) != 1:
        raise DatasetError(f"{folder}: '{split}' shards disagree on the shard count: {sorted(counts)}")
    (count,) = counts
    missing = [i for i in range(count) if i not in shards]
    if missing:
        names = ", ".join(split_filename(split, i, count) for i in missing[:5])
        raise DatasetError(f"{folder}: {len(missing)} of {count} '{split}' shards are missing ({names}); "
                           "finish the missing preprocess shard runs")
    return [shards[i] for i in range(count)]


# --------------------------------------------------------------------------- safe unpickling
def _checked_dtype(dtype: Any, where: str) -> np.dtype:
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError(f"forbidden: {where} got a non-dtype {type(dtype).__name__}")
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"forbidden: object dtype in {where} (arrays may only hold plain numbers/strings)")
    return dtype


def _make_dtype(obj, align=False, copy=False):
    # The real dtype is created here and only the instance is exposed, so BUILD
    # (dtype.__setstate__) acts on that fresh instance, never on numpy's module objects.
    if not isinstance(obj, str):
        raise pickle.UnpicklingError(f"forbidden: dtype built from {type(obj).__name__}")
    dtype = np.dtype(obj, align=bool(align), copy=bool(copy))
    return _checked_dtype(dtype, "numpy.dtype")


def _frombuffer(buffer, dtype, shape, order):
    # numpy >= 1.x protocol-5 array reconstruction: (buffer, dtype, shape, order).
    _checked_dtype(dtype, "numpy _frombuffer")
    if not isinstance(buffer, (bytes, bytearray, memoryview, pickle.PickleBuffer)):
        raise pickle.UnpicklingError(f"forbidden: array buffer of type {type(buffer).__name__}")
    if order not in ("C", "F", "K", "A"):
        raise pickle.UnpicklingError(f"forbidden: array order {order!r}")
    array = np.frombuffer(buffer, dtype=dtype)
    if order == "K":
        order = "C"
    return array.reshape(shape, order=order)


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` inside the unpickler; only ``_reconstruct`` accepts it."""


def _reconstruct(cls, shape, dtype_code):
    # protocol <= 4 arrays: _reconstruct(ndarray, (0,), b'b') then BUILD with the real state.
    if cls is not _NdarrayToken:
        raise pickle.UnpicklingError("forbidden: _reconstruct of a class other than numpy.ndarray")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def _scalar(dtype, data=None):
    _checked_dtype(dtype, "numpy scalar")
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("forbidden: numpy scalar without a byte payload")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _latin1_bytes(text, encoding="latin1"):
    # Protocol 2 stores bytes as _codecs.encode(str, 'latin1'); nothing else is allowed.
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("forbidden: _codecs.encode other than str -> latin1 bytes")
    return text.encode("latin1")


# Exact (module, name) pairs; numpy 1.x pickles say numpy.core, 2.x say numpy._core.
_ALLOWED = {}
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_module, "_frombuffer")] = _frombuffer
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "_reconstruct")] = _reconstruct
    _ALLOWED[(_module, "scalar")] = _scalar
_ALLOWED[("numpy", "dtype")] = _make_dtype
_ALLOWED[("numpy", "ndarray")] = _NdarrayToken
_ALLOWED[("_codecs", "encode")] = _latin1_bytes


def _fresh_wrapper(target):
    # A new function object per lookup: BUILD on it (setattr of __defaults__, __code__...)
    # only changes this throwaway wrapper, never the module-level function.
    if target is _NdarrayToken:
        return _NdarrayToken

    def wrapper(*args, **kwargs):
        return target(*args, **kwargs)

    wrapper.__name__ = getattr(target, "__name__", "wrapper")
    return wrapper


class _BoundedReader:
    """A file wrapper for the unpickler: no single read may ask for more bytes than the file holds.

    A corrupt or crafted length field (a frame, BINBYTES8, BYTEARRAY8) would otherwise make the
    unpickler allocate that many bytes before noticing the data is missing.
    """

    def __init__(self, handle, size: int):
        self._handle = handle
        self.size = size

    def read(self, count: int = -1) -> bytes:
        if count is None or count < 0 or count > self.size:
            count = self.size
        return self._handle.read(count)

    def readinto(self, buffer) -> int:
        return self._handle.readinto(buffer)

    def readline(self) -> bytes:
        return self._handle.readline(self.size)


class SafeUnpickler(pickle._Unpickler):
    """Unpickler that only resolves the numpy array/dtype/scalar constructors.

    Built on the pure-Python unpickler: its memo is a dict, so a crafted memo index (LONG_BINPUT
    4e9) cannot make it allocate gigabytes as the C unpickler's memo array would; our pickles hold
    few opcodes (the pixels are one BYTEARRAY8), so this costs nothing measurable.
    """

    def __init__(self, file, size: int | None = None):
        if size is None:
            size = _remaining_size(file)
        self._size_limit = size
        self._reader = _BoundedReader(file, size)
        super().__init__(self._reader)

    def find_class(self, module: str, name: str):
        target = _ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name} in pickle (only numpy arrays and plain data are allowed)")
        return _fresh_wrapper(target)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("forbidden: persistent ids in pickle")

    def _load_bytearray8_bounded(self):
        (length,) = struct.unpack("<Q", self.read(8))
        if length > self._size_limit:
            raise pickle.UnpicklingError(f"a byte array declares {length} bytes but the file holds {self._size_limit}: "
                                         "truncated or corrupt")
        buffer = bytearray(length)
        frame = self._unframer.current_frame
        if frame is not None and frame.tell() < len(frame.getvalue()):
            self.readinto(buffer)  # a small array inside the current frame
        else:
            # Large arrays are written outside frames: read straight into the buffer (one copy,
            # where the pure-Python unframer would read a temporary bytes object and copy it).
            self._unframer.current_frame = None
            if self._reader.readinto(buffer) != length:
                raise pickle.UnpicklingError("pickle data was truncated inside a byte array")
        self.append(buffer)

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8_bounded


def _remaining_size(file) -> int:
    position = file.tell()
    end = file.seek(0, io.SEEK_END)
    file.seek(position)
    return end - position


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


def validate(data: Any, source: str = "<data>") -> dict:
    """Check the schema; returns the dict with normalised types (lists of str, int64 labels).

    Raises DatasetError naming the field on any mismatch.
    """
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: top level must be a dict, got {type(data).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise DatasetError(f"{source}: missing field(s) {missing}; expected {list(REQUIRED_KEYS)}")
    images = data["images"]
    if not isinstance(images, np.ndarray):
        raise DatasetError(f"{source}: field 'images' must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise DatasetError(f"{source}: field 'images' must be uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[3] != 3:
        raise DatasetError(f"{source}: field 'images' must have shape (N, H, W, 3), got {images.shape}")
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise DatasetError(f"{source}: field 'images' has an empty image size {images.shape[1:3]}")
    if not images.flags.c_contiguous:
        images = np.ascontiguousarray(images)
    n = images.shape[0]
    ids = _as_str_list(data["ids"], "ids", n, source)
    if len(set(ids)) != n:
        seen, dupes = set(), []
        for item in ids:
            if item in seen:
                dupes.append(item)
            seen.add(item)
        raise DatasetError(f"{source}: field 'ids' has duplicates: {dupes[:5]}")
    class_names = data["class_names"]
    if isinstance(class_names, np.ndarray):
        class_names = class_names.tolist()
    if not isinstance(class_names, (list, tuple)) or not all(isinstance(c, str) and c for c in class_names):
        raise DatasetError(f"{source}: field 'class_names' must be a list of non-empty str")
    class_names = list(class_names)
    if len(set(class_names)) != len(class_names):
        raise DatasetError(f"{source}: field 'class_names' has duplicates: {class_names}")
    labels = data["labels"]
    if labels is not None:
        if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
            raise DatasetError(f"{source}: field 'labels' must be an integer numpy array or None")
        if labels.shape != (n,):
            raise DatasetError(f"{source}: field 'labels' has shape {labels.shape}, expected ({n},)")
        if not class_names:
            raise DatasetError(f"{source}: field 'labels' is set but 'class_names' is empty")
        if n and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DatasetError(f"{source}: field 'labels' out of range [0, {len(class_names)}): "
                               f"min {labels.min()}, max {labels.max()}")
        labels = labels.astype(np.int64, copy=False)
    sites = _as_str_list(data["sites"], "sites", n, source)
    meta = data["meta"]
    if not isinstance(meta, dict):
        raise DatasetError(f"{source}: field 'meta' must be a dict, got {type(meta).__name__}")
    for key, value in meta.items():
        if not isinstance(key, str):
            raise DatasetError(f"{source}: field 'meta' has a non-str key {key!r}")
        if not isinstance(value, (list, tuple, np.ndarray)) or len(value) != n:
            raise DatasetError(f"{source}: field 'meta.{key}' must have one entry per image ({n})")
        _ndarray_state_guard(value, f"meta.{key}")
    info = data["info"]
    if not isinstance(info, dict):
        raise DatasetError(f"{source}: field 'info' must be a dict, got {type(info).__name__}")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetError(f"{source}: field 'info.format_version' is {version!r}, this code reads {FORMAT_VERSION}; "
                           "re-run preprocess.py with this version")
    return {"images": images, "ids": ids, "labels": labels, "class_names": class_names,
            "sites": sites, "meta": dict(meta), "info": dict(info)}


# --------------------------------------------------------------------------- save / load
def save_split(path: str | os.PathLike, data: dict) -> Path:
    """Validate and write one pickle atomically (temp + fsync + rename)."""
    path = Path(path)
    clean = validate(data, source=str(path))
    with fileio.atomic_write(path, "wb") as handle:
        pickle.dump(clean, handle, protocol=PICKLE_PROTOCOL)
    return path


def load_file(path: str | os.PathLike) -> dict:
    """Safely load and validate one pickle file."""
    return validate(read_pickle_file(path), source=str(path))


def concat(parts: list[dict], source: str) -> dict:
    """Join shards (already validated) into one split, checking they agree."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for part in parts[1:]:
        if part["class_names"] != first["class_names"]:
            raise DatasetError(f"{source}: shards disagree on class_names")
        if part["images"].shape[1:] != first["images"].shape[1:]:
            raise DatasetError(f"{source}: shards disagree on image shape "
                               f"{part['images'].shape[1:]} vs {first['images'].shape[1:]}")
        if (part["labels"] is None) != (first["labels"] is None):
            raise DatasetError(f"{source}: some shards have labels and others do not")
    total = sum(len(p["ids"]) for p in parts)
    images = np.empty((total,) + first["images"].shape[1:], dtype=np.uint8)
    offset = 0
    for part in parts:
        count = len(part["ids"])
        images[offset:offset + count] = part["images"]
        offset += count
    meta = {}
    for key in first["meta"]:
        values = [p["meta"].get(key) for p in parts]
        if any(v is None for v in values):
            continue
        if all(isinstance(v, np.ndarray) for v in values):
            meta[key] = np.concatenate(values)
        else:
            meta[key] = [item for v in values for item in list(v)]
    merged = {
        "images": images,
        "ids": [i for p in parts for i in p["ids"]],
        "labels": None if first["labels"] is None else np.concatenate([p["labels"] for p in parts]),
        "class_names": first["class_names"],
        "sites": [s for p in parts for s in p["sites"]],
        "meta": meta,
        "info": dict(first["info"], num_shards=len(parts)),
    }
    return validate(merged, source=source)


def load_split(data_dir: str | os.PathLike, split: str) -> dict:
    """Load ``split`` ('train' or 'test') from ``data_dir``: the single pickle or all its shards."""
    files = find_split_files(data_dir, split)
    parts = [load_file(path) for path in files]
    return concat(parts, source=f"{data_dir} ({split})")


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
