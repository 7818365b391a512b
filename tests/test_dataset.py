"""The pickle contract: round trip, shards, schema validation (E6) and the safe loader (E1-E5, E7)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import pickletools

import numpy as np
import pytest

from dss.data import dataset
from dss.data.dataset import DatasetError


def make_split_data(n=6, size=8, labelled=True, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "images": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "ids": [f"ZJ{i:06d}" for i in range(n)],
        "labels": rng.integers(0, 3, n).astype(np.int64) if labelled else None,
        "class_names": ["antelope_duiker", "bird", "blank"],
        "sites": [f"S{i % 2:04d}" for i in range(n)],
        "meta": {"source_key": [f"train_features/ZJ{i:06d}.jpg" for i in range(n)],
                 "orig_width": np.full(n, 960, dtype=np.int32),
                 "orig_height": np.full(n, 540, dtype=np.int32),
                 "orig_mode": ["RGB"] * n,
                 "was_grey": np.zeros(n, dtype=bool)},
        "info": {"format_version": dataset.FORMAT_VERSION, "split": "train", "image_size": size},
    }


def write_split(path, data: dict):
    """A pickle as preprocess writes it (dss.ingest.splitfile's output equals this byte for byte)."""
    path.write_bytes(pickle.dumps(dataset.validate(data, source=str(path)), protocol=dataset.PICKLE_PROTOCOL))
    return path


def test_round_trip_is_exact_and_writable(tmp_path):
    data = make_split_data()
    write_split(tmp_path / "train_data.pkl", data)
    loaded = dataset.load_split(tmp_path, "train")
    assert np.array_equal(loaded["images"], data["images"])
    assert loaded["images"].flags.c_contiguous and loaded["images"].flags.writeable
    assert loaded["ids"] == data["ids"]
    assert np.array_equal(loaded["labels"], data["labels"])
    assert loaded["sites"] == data["sites"]
    assert np.array_equal(loaded["meta"]["orig_width"], data["meta"]["orig_width"])


def test_plain_pickle_load_works_for_notebooks(tmp_path):
    data = make_split_data()
    path = write_split(tmp_path / "train_data.pkl", data)
    with open(path, "rb") as handle:
        plain = pickle.load(handle)
    assert plain["ids"] == data["ids"]
    frame = dataset.load_dataframe(path)
    assert list(frame["id"]) == data["ids"]
    assert list(frame["label"]) == [data["class_names"][i] for i in data["labels"]]
    assert frame["image"].iloc[2].shape == (8, 8, 3)


def test_test_split_without_labels(tmp_path):
    write_split(tmp_path / "test_data.pkl", make_split_data(labelled=False))
    assert dataset.load_split(tmp_path, "test")["labels"] is None


def test_shards_concatenate_in_index_order(tmp_path):
    whole = make_split_data(n=7)
    bounds = [(0, 3), (3, 5), (5, 7)]
    for index, (lo, hi) in enumerate(bounds):
        part = {
            "images": whole["images"][lo:hi], "ids": whole["ids"][lo:hi], "labels": whole["labels"][lo:hi],
            "class_names": whole["class_names"], "sites": whole["sites"][lo:hi],
            "meta": {k: v[lo:hi] for k, v in whole["meta"].items()}, "info": whole["info"],
        }
        write_split(tmp_path / dataset.split_filename("train", index, 3), part)
    loaded = dataset.load_split(tmp_path, "train")
    assert loaded["ids"] == whole["ids"]
    assert np.array_equal(loaded["images"], whole["images"])
    assert np.array_equal(loaded["labels"], whole["labels"])
    os.remove(tmp_path / dataset.split_filename("train", 1, 3))
    with pytest.raises(DatasetError, match="missing"):
        dataset.load_split(tmp_path, "train")


def test_one_merge_for_loaded_and_streamed_shards(tmp_path):
    """merge_shards without images (streaming) gives the same metadata as the loaded split and the
    sha256 of the loaded pixels; shards that disagree are refused either way."""
    whole = make_split_data(n=7)
    files = []
    for index, (lo, hi) in enumerate([(0, 4), (4, 7)]):
        part = {**whole, "images": whole["images"][lo:hi], "ids": whole["ids"][lo:hi],
                "labels": whole["labels"][lo:hi], "sites": whole["sites"][lo:hi],
                "meta": {k: v[lo:hi] for k, v in whole["meta"].items()}}
        files.append(write_split(tmp_path / dataset.split_filename("train", index, 2), part))
    loaded = dataset.merge_shards(files, "train")
    scanned = dataset.merge_shards(files, "train", keep_images=False)
    assert scanned["images"] is None and scanned["shard_sizes"] == [4, 3] and scanned["image_shape"] == (8, 8, 3)
    assert scanned["images_sha256"] == hashlib.sha256(loaded["images"].tobytes()).hexdigest()
    assert scanned["ids"] == loaded["ids"] == whole["ids"] and scanned["sites"] == loaded["sites"]
    np.testing.assert_array_equal(scanned["labels"], loaded["labels"])
    for key in whole["meta"]:
        assert list(scanned["meta"][key]) == list(loaded["meta"][key]) == list(whole["meta"][key])
    write_split(files[1], {**make_split_data(n=3, size=4), "ids": ["X1", "X2", "X3"]})
    for keep_images in (True, False):
        with pytest.raises(DatasetError, match="disagree on image shape"):
            dataset.merge_shards(files, "train", keep_images=keep_images)


def test_missing_split_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocess.py"):
        dataset.load_split(tmp_path, "train")


# ----------------------------------------------------------------- E6: schema
@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("labels"), "labels"),
    (lambda d: d.update(images=d["images"].astype(np.float32)), "images"),
    (lambda d: d.update(images=d["images"][..., 0]), "images"),
    (lambda d: d.update(ids=d["ids"][:-1]), "ids"),
    (lambda d: d.update(ids=["same"] * len(d["ids"])), "ids"),
    (lambda d: d.update(labels=d["labels"] + 10), "labels"),
    (lambda d: d.update(labels=d["labels"].astype(np.float64)), "labels"),
    (lambda d: d.update(sites=d["sites"][:2]), "sites"),
    (lambda d: d["meta"].update(orig_width=np.zeros(2)), "meta.orig_width"),
    (lambda d: d["info"].update(format_version=99), "format_version"),
    (lambda d: d.update(class_names=["a", "a", "b"]), "class_names"),
])
def test_e6_wrong_schema_names_the_field(tmp_path, mutate, field):
    data = make_split_data()
    mutate(data)
    path = tmp_path / "train_data.pkl"
    path.write_bytes(pickle.dumps(data, protocol=5))
    with pytest.raises(DatasetError, match=field.replace(".", r"\.")):
        dataset.load_split(tmp_path, "train")


# ----------------------------------------------------------------- E1-E5, E7: hostile pickles
class _Exploit:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _load_bytes(tmp_path, payload: bytes):
    path = tmp_path / "train_data.pkl"
    path.write_bytes(payload)
    return dataset.load_split(tmp_path, "train")


def test_e1_os_system_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"images": _Exploit(os.system, (f"touch {marker}",))}, protocol=5)
    with pytest.raises(DatasetError, match="forbidden global posix.system"):
        _load_bytes(tmp_path, payload)
    assert not marker.exists()


def _global_pickle(module: str, name: str, arg: str) -> bytes:
    # Hand-built: GLOBAL module name, then call it with one string argument.
    return (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n"
            + pickle.dumps(arg, protocol=2)[2:-1] + b"\x85R.")


@pytest.mark.parametrize("module, name", [
    ("builtins", "eval"),
    ("builtins", "getattr"),
    ("builtins", "__import__"),
    ("numpy", "testing._private.utils.os.system"),
    ("numpy", "__builtins__"),
    ("numpy", "load"),
    ("subprocess", "Popen"),
])
def test_e2_other_callables_are_refused(tmp_path, module, name):
    with pytest.raises(DatasetError, match="forbidden"):
        _load_bytes(tmp_path, _global_pickle(module, name, "print('x')"))


def test_e3_build_on_allowlisted_global_does_not_mutate_numpy(tmp_path):
    from numpy._core import numeric

    before = numeric._frombuffer.__defaults__
    # GLOBAL numpy._core.numeric _frombuffer, then BUILD with slot state {'__defaults__': (1,)}.
    payload = (b"\x80\x04cnumpy._core.numeric\n_frombuffer\n"
               b"N}\x8c\x0c__defaults__K\x01\x85s\x86b.")
    try:
        _load_bytes(tmp_path, payload)
    except DatasetError:
        pass
    assert numeric._frombuffer.__defaults__ == before


def test_e4_object_arrays_are_refused(tmp_path):
    data = make_split_data()
    data["meta"]["source_key"] = np.array(data["meta"]["source_key"], dtype=object)
    for protocol in (2, 5):
        with pytest.raises(DatasetError, match="object"):
            _load_bytes(tmp_path, pickle.dumps(data, protocol=protocol))


@pytest.mark.parametrize("payload", [b"", b"\x80\x05", b"not a pickle at all", os.urandom(256)])
def test_e5_truncated_or_random_bytes_say_rerun_preprocess(tmp_path, payload):
    with pytest.raises(DatasetError, match="re-run preprocess|Re-run preprocess"):
        _load_bytes(tmp_path, payload)


def test_e5_truncated_real_pickle(tmp_path):
    full = pickle.dumps(make_split_data(), protocol=5)
    with pytest.raises(DatasetError, match="preprocess"):
        _load_bytes(tmp_path, full[: len(full) // 2])


def test_e7_numpy1_spellings_load(tmp_path):
    data = make_split_data()
    modern = pickle.dumps(data, protocol=2)
    legacy = modern.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in legacy
    loaded = _load_bytes(tmp_path, legacy)
    assert np.array_equal(loaded["images"], data["images"])
    opcodes = {op.name for op, _, _ in pickletools.genops(io.BytesIO(legacy))}
    assert "GLOBAL" in opcodes or "STACK_GLOBAL" in opcodes


# Hand-crafted opcodes of the fuzz corpus (bench/fuzz.py): numpy.dtype('V8', False, True) whose BUILD
# state (3, '|', None, None, None, 8, 1, flags) sets NPY_ITEM_HASOBJECT, inside _reconstruct + BUILD.
def _protocol3(ops: bytes) -> bytes:
    payload = pickle.PROTO + b"\x03" + ops + pickle.STOP
    pickletools.dis(payload, out=io.StringIO())  # a well-formed opcode stream
    return payload


@pytest.mark.parametrize("module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_e4_void_dtype_given_object_flags_by_build_is_refused(module):
    from bench import fuzz
    from dss.data.safepickle import SafeUnpickler

    payload = _protocol3(fuzz.object_array_ops(module))
    assert pickle.loads(payload).dtype.hasobject  # what the plain unpickler builds: an object array
    with pytest.raises(pickle.UnpicklingError, match=r"forbidden: object dtype dtype\('V8'\) \(flags 0x1\)"):
        SafeUnpickler(io.BytesIO(payload)).load()
    dtype_only = _protocol3(fuzz.dtype_ops("V8", 8, 0x01))
    assert pickle.loads(dtype_only).hasobject
    with pytest.raises(pickle.UnpicklingError, match="forbidden: object dtype.*dtype BUILD"):
        SafeUnpickler(io.BytesIO(dtype_only)).load()


def test_e4_build_never_changes_a_dtype_an_array_already_uses():
    from bench import fuzz
    from dss.data.safepickle import SafeUnpickler

    payload = _protocol3(fuzz.regrown_dtype_ops())
    assert pickle.loads(payload).nbytes == 16 * 4096  # plain pickle: 64 KiB read from a 16-byte buffer
    array = SafeUnpickler(io.BytesIO(payload)).load()
    assert array.dtype == np.dtype("V1") and array.nbytes == 16


@pytest.mark.parametrize("ops, refused", [
    # _reconstruct(ndarray, (4096,), b'b'): an uninitialised array, where numpy writes (0,), b'b'.
    (b"cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nM\x00\x10\x85C\x01b\x87R", r"_reconstruct\(\(4096,\)"),
    # READONLY_BUFFER over bytes: a memoryview that _frombuffer would accept as an array's memory.
    (b"C\x04abcd\x98", "READONLY_BUFFER"),
    # BUILD on something other than an array or dtype (a list).
    (b"]}b", "BUILD on list"),
])
def test_e4_only_the_opcodes_numpy_writes_build_arrays(ops, refused):
    from dss.data.safepickle import SafeUnpickler

    with pytest.raises(pickle.UnpicklingError, match=refused):
        SafeUnpickler(io.BytesIO(_protocol3(ops))).load()
