"""An unpickler that can only rebuild numpy arrays and plain data: the pickle loader of dss.dataset.

A pickle is a small program; ``pickle.load`` runs whatever callables it names. ``SafeUnpickler``
resolves only the exact numpy reconstruction functions that arrays need (``_frombuffer`` for
protocol 5, ``_reconstruct``/``scalar``/``dtype`` for older protocols, in both the numpy 1.x
``numpy.core`` and 2.x ``numpy._core`` spellings), each returned as a fresh wrapper so that a
crafted BUILD opcode cannot change numpy itself, and refuses object dtypes. No read may ask for more
bytes than the file holds, so a corrupt length field cannot make it allocate gigabytes.
Failures raise ``pickle.UnpicklingError``; dss.dataset turns them into errors that name the file.
"""

from __future__ import annotations

import io
import pickle
import struct
from typing import Any

import numpy as np


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

