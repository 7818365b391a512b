"""dss.ingest.splitfile: split pickles built in place equal pickle.dump of the same dict, byte for byte."""

from __future__ import annotations

import errno
import os
import pickle
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from dss.data import dataset
from dss.ingest import splitfile


def split_dict(count: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "ids": np.array([f"ZJ{i:06d}" for i in range(count)], dtype=str),
        "labels": rng.integers(0, 3, count).astype(np.int64),
        "class_names": ["antelope_duiker", "bird", "blank"],
        "sites": np.array([f"S{i % 7:04d}" for i in range(count)], dtype=str),
        # A long string column: numpy pickles it as a second large buffer after the pixels.
        "meta": {"source_key": np.array([f"train_features/{'x' * 60}{i:06d}.jpg" for i in range(count)], dtype=str),
                 "was_grey": rng.random(count) < 0.5},
        "info": {"format_version": dataset.FORMAT_VERSION, "split": "train", "image_size": 0},
    }


def images_for(count: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def expected_bytes(data: dict, images: np.ndarray) -> bytes:
    return pickle.dumps(dataset.validate({**data, "images": images}), protocol=dataset.PICKLE_PROTOCOL)


def test_payload_offset_is_where_pickle_dump_puts_the_pixels():
    images = images_for(3, 128)
    raw = expected_bytes(split_dict(3), images)
    start = splitfile.PAYLOAD_OFFSET
    assert raw[start - 9:start - 8] == pickle.BYTEARRAY8
    assert int.from_bytes(raw[start - 8:start], "little") == images.nbytes
    assert raw[start:start + images.nbytes] == images.tobytes()


@pytest.mark.parametrize("count,size", [(40, 64), (300, 40)])
def test_rows_written_in_any_order_give_the_same_bytes_as_pickle_dump(tmp_path, count, size):
    data, images = split_dict(count), images_for(count, size)
    final = tmp_path / "train_data.pkl"
    writer = splitfile.SplitFileWriter(final, count, size)
    for row in np.random.default_rng(2).permutation(count).tolist():
        splitfile.write_row(writer.slots, row, images[row])
    writer.commit(data, np.arange(count))
    assert final.read_bytes() == expected_bytes(data, images)
    assert not writer.temp_path.exists()
    loaded = dataset.load_file(final)
    assert loaded["images"].flags.writeable and np.array_equal(loaded["images"], images)


def _write_rows_in_a_process(slots: splitfile.RowSlots, rows: list[int], size: int) -> int:
    images = images_for(slots.rows, size)
    for row in rows:
        splitfile.write_row(slots, row, images[row])
    splitfile.close_row_files()
    return os.getpid()


def test_rows_from_several_processes_land_in_their_slots(tmp_path):
    count, size = 64, 48
    writer = splitfile.SplitFileWriter(tmp_path / "train_data.pkl", count, size)
    with ProcessPoolExecutor(2) as pool:
        pids = list(pool.map(_write_rows_in_a_process, [writer.slots] * 2, [list(range(0, count, 2)),
                                                                           list(range(1, count, 2))], [size] * 2))
    assert os.getpid() not in pids
    writer.commit(split_dict(count), np.arange(count))
    assert np.array_equal(dataset.load_file(writer.final_path)["images"], images_for(count, size))


def test_skipped_rows_are_squeezed_out(tmp_path):
    count, size = 50, 64
    images = images_for(count, size)
    kept = np.array([row for row in range(count) if row % 7 not in (0, 3)])
    writer = splitfile.SplitFileWriter(tmp_path / "train_data.pkl", count, size)
    for row in kept.tolist():
        splitfile.write_row(writer.slots, row, images[row])
    data = split_dict(len(kept))
    writer.commit(data, kept)
    assert writer.final_path.read_bytes() == expected_bytes(data, images[kept])


def test_a_split_under_64_kib_is_pickled_the_ordinary_way(tmp_path):
    images = images_for(5, 16)  # 3,840 bytes: the pickler frames it instead of writing it directly
    data = split_dict(5)
    writer = splitfile.SplitFileWriter(tmp_path / "test_data.pkl", 5, 16)
    for row in range(5):
        splitfile.write_row(writer.slots, row, images[row])
    writer.commit(data, np.arange(5))
    assert writer.final_path.read_bytes() == expected_bytes(data, images)


def test_bad_rows_and_shapes_are_refused(tmp_path):
    writer = splitfile.SplitFileWriter(tmp_path / "train_data.pkl", 2, 8)
    with pytest.raises(IndexError, match="row 2 outside 0..1"):
        splitfile.write_row(writer.slots, 2, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="image of 300 bytes for a 192-byte row"):
        splitfile.write_row(writer.slots, 0, np.zeros((10, 10, 3), np.uint8))
    writer.discard()


def test_an_error_leaves_neither_a_temp_nor_a_final_file(tmp_path):
    final = tmp_path / "train_data.pkl"
    with pytest.raises(RuntimeError, match="decoder fell over"):
        with splitfile.SplitFileWriter(final, 4, 8) as writer:
            splitfile.write_row(writer.slots, 0, np.zeros((8, 8, 3), np.uint8))
            raise RuntimeError("decoder fell over")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_names_the_pickle_and_leaves_no_final_file(tiny_filesystem):
    final = tiny_filesystem / "train_data.pkl"
    rows, size = 40, 224  # 6 MB of rows on a 64 KiB filesystem
    writer = splitfile.SplitFileWriter(final, rows, size)
    image = np.full((size, size, 3), 200, np.uint8)
    with pytest.raises(OSError) as caught:
        for row in range(rows):
            splitfile.write_row(writer.slots, row, image)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(final)
    writer.discard()
    assert list(tiny_filesystem.iterdir()) == []


def write_in_steps_of_8(writer: splitfile.SplitFileWriter, images: np.ndarray) -> None:
    for start in range(0, len(images), 8):
        for row in range(start, start + 8):
            splitfile.write_row(writer.slots, row, images[row])
        writer.rows_written(8)
        writer._wait_for_flusher()  # one flush at a time: let this one end so the next can start


def test_rows_are_flushed_to_disk_in_the_background_while_decoding(tmp_path, monkeypatch):
    count, size = 40, 64
    images, data = images_for(count, size), split_dict(count)
    flushed_descriptors = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed_descriptors.append(fd), real_fsync(fd)))
    monkeypatch.setattr(splitfile, "WRITEBACK_BYTES", 8 * size * size * 3)  # every 8 rows
    writer = splitfile.SplitFileWriter(tmp_path / "train_data.pkl", count, size)
    write_in_steps_of_8(writer, images)
    assert len(flushed_descriptors) == count // 8  # one background flush per 8 rows, before commit
    writer.commit(data, np.arange(count))
    assert writer.final_path.read_bytes() == expected_bytes(data, images)


def test_a_failed_background_flush_fails_the_commit(tmp_path, monkeypatch):
    """Linux reports a writeback error to one fsync only: the one the background flush got must
    stop commit, or a pickle with lost rows would be published."""
    count, size = 16, 64
    real_fsync, calls = os.fsync, []

    def fsync_failing_once(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_failing_once)
    monkeypatch.setattr(splitfile, "WRITEBACK_BYTES", 8 * size * size * 3)
    writer = splitfile.SplitFileWriter(tmp_path / "train_data.pkl", count, size)
    write_in_steps_of_8(writer, images_for(count, size))
    with pytest.raises(OSError) as caught:
        writer.commit(split_dict(count), np.arange(count))
    assert caught.value.errno == errno.EIO and caught.value.filename == str(writer.final_path)
    assert "while flushing image rows to disk" in str(caught.value)
    writer.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_pickle_too_large_for_the_filesystem_names_it_and_leaves_nothing(tmp_path):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 2**20, hard))  # files may not pass 10 MiB (Python ignores SIGXFSZ)
    try:
        with pytest.raises(OSError) as caught:
            splitfile.SplitFileWriter(tmp_path / "train_data.pkl", 1000, 224)  # 150 MB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert caught.value.errno == errno.EFBIG and caught.value.filename == str(tmp_path / "train_data.pkl")
    assert list(tmp_path.iterdir()) == []
