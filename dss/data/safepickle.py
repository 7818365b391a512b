"""An unpickler that can only rebuild numpy arrays and plain data: the pickle loader of dss.data.dataset.

A pickle is a small program; ``pickle.load`` runs whatever callables it names. ``SafeUnpickler``
resolves only the exact numpy reconstruction functions that arrays need (``_frombuffer`` for
protocol 5, ``_reconstruct``/``scalar``/``dtype`` for older protocols, in both the numpy 1.x
``numpy.core`` and 2.x ``numpy._core`` spellings), each returned as a fresh wrapper so that a
crafted BUILD opcode cannot change numpy itself, and refuses object dtypes wherever a dtype can
come from: at construction, at every BUILD (a dtype's state can turn a plain ``V8`` into one whose
items are object pointers; an array's state carries its own dtype) and on the loaded result.
BUILD is applied to a dtype as a fresh copy, so it can never change a dtype an array already uses
(its item size, say), and arrays only take state from plain bytes. No read may ask for more
bytes than the file holds, so a corrupt length field cannot make it allocate gigabytes.
Failures raise ``pickle.UnpicklingError``; dss.data.dataset turns them into errors that name the file.
"""

from __future__ import annotations

import io
import pickle
import struct
from typing import Any

import numpy as np


# dtype.flags bits of items that are PyObject pointers (numpy's ndarraytypes.h): NPY_ITEM_HASOBJECT
# 0x01, NPY_LIST_PICKLE 0x02, NPY_ITEM_IS_POINTER 0x04. No plain number/string/struct dtype has them.
_OBJECT_FLAGS = 0x01 | 0x02 | 0x04


def _checked_dtype(dtype: Any, where: str) -> np.dtype:
    """``dtype`` when it and every field/subarray dtype inside it are plain (no object items)."""
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError(f"forbidden: {where} got a non-dtype {type(dtype).__name__}")
    if dtype.hasobject or dtype.flags & _OBJECT_FLAGS:
        raise pickle.UnpicklingError(f"forbidden: object dtype {dtype!r} (flags {dtype.flags:#x}) in {where} "
                                     "(arrays may only hold plain numbers/strings)")
    for name, field in (dtype.fields or {}).items():
        _checked_dtype(field[0] if isinstance(field, tuple) and field else field, f"{where}, field {name!r}")
    if dtype.subdtype is not None:
        _checked_dtype(dtype.subdtype[0], f"{where}, subarray")
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
    # Only bytes: a memoryview (READONLY_BUFFER) could view another array's memory.
    if not isinstance(buffer, (bytes, bytearray)):
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
    # protocol <= 4 arrays: numpy always writes _reconstruct(ndarray, (0,), b'b'), then BUILD with the
    # real state (checked in SafeUnpickler). Anything else would be an uninitialised or object array.
    if cls is not _NdarrayToken:
        raise pickle.UnpicklingError("forbidden: _reconstruct of a class other than numpy.ndarray")
    if shape != (0,) or dtype_code not in (b"b", "b"):
        raise pickle.UnpicklingError(f"forbidden: _reconstruct({shape!r}, {dtype_code!r}); numpy writes "
                                     "_reconstruct(ndarray, (0,), b'b')")
    return np.ndarray.__new__(np.ndarray, (0,), np.int8)


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

    def load(self):
        loaded = super().load()
        _check_loaded(loaded)
        return loaded

    def _load_build_checked(self):
        # BUILD: the stack is [..., target, state]; only dtypes and arrays take state in a numpy pickle.
        target, state = self.stack[-2], self.stack[-1]
        if isinstance(target, np.dtype):
            self.stack.pop()
            self.stack[-1] = self._rebuilt_dtype(target, state)
        elif type(target) is np.ndarray:
            _check_array_state(state)
            pickle._Unpickler.load_build(self)
            _checked_dtype(target.dtype, "numpy array BUILD")
        else:
            raise pickle.UnpicklingError(f"forbidden: BUILD on {type(target).__name__} "
                                         "(only numpy arrays and dtypes take state)")

    def _rebuilt_dtype(self, dtype: np.dtype, state) -> np.dtype:
        """``dtype`` with ``state`` applied to a fresh copy, checked, and put in its memo slots."""
        code, align, _ = dtype.__reduce__()[1]
        # A copy, not the instance: an array made earlier may share it, and a new item size or
        # object flags must not reach that array's existing buffer.
        fresh = np.dtype(code, align=bool(align), copy=True)
        fresh.__setstate__(state)
        _checked_dtype(fresh, "numpy dtype BUILD")
        for key, value in self.memo.items():
            if value is dtype:
                self.memo[key] = fresh
        return fresh

    def _load_readonly_buffer(self):
        raise pickle.UnpicklingError("forbidden: READONLY_BUFFER (out-of-band buffers are not used by dataset pickles)")

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8_bounded
    dispatch[pickle.BUILD[0]] = _load_build_checked
    dispatch[pickle.READONLY_BUFFER[0]] = _load_readonly_buffer


def _check_array_state(state) -> None:
    # ndarray.__setstate__ takes (version, shape, dtype, is_fortran, data) or the 4-tuple without the
    # version; data is a list only for object arrays, whose items would be arbitrary pointers.
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise pickle.UnpicklingError(f"forbidden: numpy array state of type {type(state).__name__}")
    _checked_dtype(state[-3], "numpy array state")
    if not isinstance(state[-1], (bytes, bytearray)):
        raise pickle.UnpicklingError(f"forbidden: numpy array data of type {type(state[-1]).__name__}")


def _check_loaded(loaded: Any) -> None:
    """Every array, dtype and numpy scalar reachable through containers in ``loaded`` is plain."""
    pending, seen = [loaded], set()
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            pending.extend(item)
        elif isinstance(item, (np.ndarray, np.generic)):
            _checked_dtype(item.dtype, f"loaded {type(item).__name__}")
        elif isinstance(item, np.dtype):
            _checked_dtype(item, "loaded dtype")


def _remaining_size(file) -> int:
    position = file.tell()
    end = file.seek(0, io.SEEK_END)
    file.seek(position)
    return end - position

