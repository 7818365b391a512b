"""Split pickles whose image rows are written in place, while they are decoded.

A split pickle (see dss.data.dataset) is, byte for byte, ``pickle.dump(dict, protocol=5)`` of a dict whose
first key is ``images``: a fixed prefix of ``PAYLOAD_OFFSET`` bytes (protocol, frame header, the dict
start, the key, numpy's ``_frombuffer`` reference and the 8-byte length of the block), then the raw
(N, S, S, 3) uint8 pixels, then everything else (ids, labels, sites, meta, info). The prefix does not
depend on the data, so the pixel block's place in the file is known before any image is decoded.

``SplitFileWriter`` uses that: it creates the temp file of the final pickle at the start of a split,
decode processes ``pwrite`` each image row straight to its slot (``write_row``), and ``commit`` writes
the prefix and the rest around the block and renames the file. Compared with decoding into a memory
block and then calling ``pickle.dump``, the ~150 MB per 1,000 images at 224 px is neither copied out
of shared memory nor written a second time, and the kernel can write rows back to disk while later
images are still decoding. On a 2-core VM those two copies took ~0.5 s per 1,000 images, a fifth of
the decode time, with the decode processes idle.

The file ``commit`` produces equals ``pickle.dumps(dataset.validate(data), protocol=5)`` (a test
checks it byte for byte), so readers need nothing new. Splits too small for the pickler to write the
block outside a frame (under 64 KiB) are pickled the ordinary way.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dss.data import dataset

# Rows written between two background flushes to disk (see SplitFileWriter.rows_written).
from dss import fileio
WRITEBACK_BYTES = 64 * 2**20

# The C pickler writes buffers of at least this many bytes directly, outside any frame
# (CPython's FRAME_SIZE_TARGET); smaller ones are copied into a frame.
_DIRECT_WRITE_MIN_BYTES = 64 * 1024


class _PrefixRecorder:
    """A pickle output file that keeps the bytes before the first large buffer and records its size."""

    def __init__(self):
        self.prefix = bytearray()
        self.payload_bytes: int | None = None

    def write(self, chunk) -> int:
        size = memoryview(chunk).nbytes
        if self.payload_bytes is None:
            if isinstance(chunk, pickle.PickleBuffer):
                self.payload_bytes = size
            else:
                self.prefix += chunk
        return size


def _payload_offset() -> int:
    """Bytes before the pixel block in every split pickle (71 with CPython 3.11 and numpy 2)."""
    probe = np.zeros((1, 128, 256, 3), dtype=np.uint8)  # 96 KiB: large enough to be written directly
    recorder = _PrefixRecorder()
    pickle.Pickler(recorder, protocol=dataset.PICKLE_PROTOCOL).dump({"images": probe, "ids": []})
    if recorder.payload_bytes != probe.nbytes:
        raise RuntimeError("this Python's pickler does not write large numpy buffers directly; "
                           "split files cannot be written in place")
    return len(recorder.prefix)


PAYLOAD_OFFSET = _payload_offset()


@dataclass(frozen=True)
class RowSlots:
    """Where image rows go: row ``i`` is bytes ``[offset + i * row_bytes, + row_bytes)`` of ``path``
    (the temp file of the pickle ``final_path``). Small and picklable, so it travels with every decode
    task to the decode processes."""

    path: str
    final_path: str
    offset: int
    row_bytes: int
    rows: int


# Per process: the one row file this process currently writes to, as (path, file descriptor).
_open_row_file: dict[str, int] = {}


def _row_file_descriptor(path: str) -> int:
    descriptor = _open_row_file.get(path)
    if descriptor is None:
        close_row_files()  # a new split: the previous split's file is finished
        descriptor = os.open(path, os.O_WRONLY)
        _open_row_file[path] = descriptor
    return descriptor


def close_row_files() -> None:
    """Close this process's descriptor of a row file (decode processes keep one open between tasks)."""
    for descriptor in _open_row_file.values():
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _open_row_file.clear()


def write_row(slots: RowSlots, row: int, image: np.ndarray) -> None:
    """Write one (S, S, 3) uint8 image to its slot. An OSError (disk full) names the pickle being written."""
    if not 0 <= row < slots.rows:
        raise IndexError(f"row {row} outside 0..{slots.rows - 1} of {slots.path}")
    data = memoryview(np.ascontiguousarray(image, dtype=np.uint8)).cast("B")
    if data.nbytes != slots.row_bytes:
        raise ValueError(f"image of {data.nbytes} bytes for a {slots.row_bytes}-byte row of {slots.path}")
    position = slots.offset + row * slots.row_bytes
    try:
        descriptor = _row_file_descriptor(slots.path)
        while data:  # pwrite may write less than asked (signals, some filesystems)
            count = os.pwrite(descriptor, data, position)
            data, position = data[count:], position + count
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno or errno.EIO), slots.final_path) from exc


class _SkipPayload:
    """The output file for ``commit``: writes the pickle's bytes at their place, except the pixel
    block, which is already in the file: the writer steps over it."""

    def __init__(self, handle, payload_address: int, payload_bytes: int):
        self.handle = handle
        self.payload_address = payload_address
        self.payload_bytes = payload_bytes
        self.stepped_over = False

    def write(self, chunk) -> int:
        # The block is the first buffer the pickler hands over; later ones (a large array of ids,
        # say) are written like any other bytes.
        if isinstance(chunk, pickle.PickleBuffer) and not self.stepped_over:
            view = np.frombuffer(chunk, dtype=np.uint8)
            if (view.nbytes != self.payload_bytes or view.ctypes.data != self.payload_address
                    or self.handle.tell() != PAYLOAD_OFFSET):
                raise RuntimeError(f"{self.handle.name}: the pickle's pixel block is not the one in the file")
            self.handle.seek(view.nbytes, os.SEEK_CUR)
            self.stepped_over = True
            return view.nbytes
        return self.handle.write(chunk)


class SplitFileWriter:
    """One split pickle under construction: ``slots`` for the decode processes, then ``commit``.

    The temp file is ``fileio.temp_path(final)`` (swept by a later run if this process is killed);
    ``discard`` removes it. Use as a context manager to discard on any error.
    """

    def __init__(self, final_path: str | os.PathLike, rows: int, image_size: int):
        self.final_path = Path(final_path)
        self.temp_path = fileio.temp_path(self.final_path)
        self.row_bytes = image_size * image_size * 3
        self.image_size = image_size
        self.slots = RowSlots(str(self.temp_path), str(self.final_path), PAYLOAD_OFFSET, self.row_bytes, rows)
        self._unflushed_bytes = 0
        self._flusher: threading.Thread | None = None
        self._flush_error: OSError | None = None  # what a background flush met, reported by commit
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.temp_path, "wb") as handle:
                # Sparse until written: a full disk shows up as ENOSPC from write_row, naming the file.
                handle.truncate(PAYLOAD_OFFSET + rows * self.row_bytes)
        except OSError as exc:  # e.g. EFBIG: larger than the filesystem allows (FAT32: 4 GiB)
            with contextlib.suppress(OSError):
                self.temp_path.unlink()
            raise OSError(exc.errno, exc.strerror, str(self.final_path)) from exc

    def __enter__(self) -> SplitFileWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.discard()

    def rows_written(self, count: int) -> None:
        """Note that ``count`` more rows are in the file. Every WRITEBACK_BYTES a background thread flushes
        the file to disk (fsync, no CPU to speak of), so that ``commit``'s final fsync, which the
        decode processes sit idle through, has only the last rows left to wait for."""
        self._unflushed_bytes += count * self.row_bytes
        if self._unflushed_bytes < WRITEBACK_BYTES or (self._flusher is not None and self._flusher.is_alive()):
            return
        self._unflushed_bytes = 0
        self._flusher = threading.Thread(target=self._flush, daemon=True, name="split-file-writeback")
        self._flusher.start()

    def _flush(self) -> None:
        """fsync the temp file (in the background thread). An error is kept for ``commit`` to raise:
        once one fsync has reported a writeback error, Linux does not report it again to a
        descriptor opened later, so commit's own fsync would pass over lost rows."""
        try:
            descriptor = os.open(self.temp_path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        except OSError as exc:
            self._flush_error = self._flush_error or exc

    def _wait_for_flusher(self) -> None:
        if self._flusher is not None:
            self._flusher.join()
            self._flusher = None

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """The written rows ``rows`` (ascending) as an (len(rows), S, S, 3) array (a copy; for checks)."""
        with open(self.temp_path, "rb") as handle:
            out = np.empty((len(rows), self.image_size, self.image_size, 3), dtype=np.uint8)
            for target, row in enumerate(rows):
                handle.seek(PAYLOAD_OFFSET + int(row) * self.row_bytes)
                handle.readinto(memoryview(out[target]).cast("B"))
        return out

    def commit(self, data: dict, kept_rows: np.ndarray) -> Path:
        """Write ``data`` (every field but ``images``, which is ignored) with the image rows ``kept_rows``
        (ascending row numbers that were written) as the final pickle; returns its path."""
        close_row_files()  # in-process decoding (one worker) wrote through this process's descriptor
        self._wait_for_flusher()
        if self._flush_error is not None:
            error = self._flush_error
            raise OSError(error.errno, f"{error.strerror} (while flushing image rows to disk)",
                          str(self.final_path)) from error
        kept_rows = np.asarray(kept_rows, dtype=np.int64)
        count = len(kept_rows)
        size = PAYLOAD_OFFSET + count * self.row_bytes
        with open(self.temp_path, "r+b") as handle:
            self._compact(handle, kept_rows)
            handle.truncate(size)
            if count * self.row_bytes < _DIRECT_WRITE_MIN_BYTES:
                images = self.read_rows(np.arange(count))
                handle.seek(0)
                pickle.dump(dataset.validate({**data, "images": images}, str(self.final_path)), handle,
                            protocol=dataset.PICKLE_PROTOCOL)
                handle.truncate()
            else:
                self._pickle_around_block(handle, data, count)
            handle.flush()
            os.fsync(handle.fileno())
        fileio.replace_with_temp(self.temp_path, self.final_path)
        return self.final_path

    def _compact(self, handle, kept_rows: np.ndarray) -> None:
        """Move the kept rows up over the slots of images skipped while decoding."""
        buffer = bytearray(self.row_bytes)
        for target, row in enumerate(kept_rows.tolist()):
            if target != row:
                handle.seek(PAYLOAD_OFFSET + row * self.row_bytes)
                handle.readinto(buffer)
                handle.seek(PAYLOAD_OFFSET + target * self.row_bytes)
                handle.write(buffer)

    def _pickle_around_block(self, handle, data: dict, count: int) -> None:
        shape = (count, self.image_size, self.image_size, 3)
        # The pickler needs an array of the block's shape to hand over as a buffer, never its bytes
        # (they are in the file already): an anonymous map, whose pages are never touched, so it
        # costs no memory. Writable, so numpy pickles it as BYTEARRAY8, like any in-memory array, and
        # readers get writable arrays. np.frombuffer holds a buffer export: the map cannot be closed
        # under a live view.
        with mmap.mmap(-1, count * self.row_bytes) as placeholder:
            images = np.frombuffer(placeholder, dtype=np.uint8).reshape(shape)
            try:
                clean = dataset.validate({**data, "images": images}, str(self.final_path))
                output = _SkipPayload(handle, images.ctypes.data, images.nbytes)
                handle.seek(0)
                pickle.Pickler(output, protocol=dataset.PICKLE_PROTOCOL).dump(clean)
            finally:
                del images
                clean = None
        if not output.stepped_over:
            raise RuntimeError(f"{self.final_path}: the pickler did not reach the pixel block")

    def discard(self) -> None:
        close_row_files()
        self._wait_for_flusher()
        with contextlib.suppress(OSError):
            self.temp_path.unlink()
