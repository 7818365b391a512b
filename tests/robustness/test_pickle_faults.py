"""E-rows under fuzzing: the safe dataset loader refuses every damaged or crafted pickle with a
DatasetError and never runs code. Bounded hypothesis runs here; ``bench/fuzz.py`` runs thousands.

E1-E7 one by one are in tests/test_dataset.py (see tests/robustness/ROWS.md).
"""

from __future__ import annotations

import contextlib
import resource
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import fuzz
from dss.data import dataset

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None, derandomize=True)


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="dss-pickle-fuzz-") as name:
        yield Path(name)


def test_seeds_are_valid_dataset_pickles(folder):
    """The mutation seeds load: a fuzz of them starts from the real format."""
    for data in fuzz.pickle_seeds():
        assert fuzz.check_pickle(data, folder) == "ok"


def test_e1_marker_payload_is_refused_without_running(folder):
    """The spliced payload the fuzzer uses is really dangerous to pickle.loads, and refused here."""
    payload = b"\x80\x02" + fuzz._marker_payload(folder / fuzz.MARKER_NAME) + b"."
    assert fuzz.check_pickle(payload, folder) == "refused"
    assert not (folder / fuzz.MARKER_NAME).exists()


@FUZZ
@given(data=st.binary(max_size=512))
def test_e5_arbitrary_bytes_only_dataset_error(folder, data):
    assert fuzz.check_pickle(data, folder) in ("ok", "refused")


@contextlib.contextmanager
def address_space_cap(extra_bytes: int = 1 << 30):
    """Cap this process's address space at its current size + ``extra_bytes`` for the block.

    A few mutated bytes can make CPython's unpickler allocate gigabytes before it fails (a huge
    memo index or declared length; see ROWS.md). Under the cap that allocation fails at once with
    MemoryError, which the loader must turn into DatasetError like any other damage."""
    with open("/proc/self/statm") as handle:
        current = int(handle.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = current + extra_bytes if hard == resource.RLIM_INFINITY else min(hard, current + extra_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@FUZZ
@given(rng=st.randoms(use_true_random=False), seed_index=st.integers(0, 1))
def test_e5_mutated_real_pickles_only_dataset_error_and_no_side_effect(folder, rng, seed_index):
    seed = fuzz.pickle_seeds()[seed_index]
    data = fuzz.mutate(seed, rng, fuzz.pickle_tokens(folder / fuzz.MARKER_NAME))
    with address_space_cap():
        outcome = fuzz.check_pickle(data, folder)  # check_pickle also asserts no marker, no allowlist change
    assert outcome in ("ok", "refused")


@pytest.mark.parametrize("name", sorted(fuzz.attack_pickles()))
def test_e4_crafted_object_dtype_attacks_are_refused(folder, name):
    """The fuzz corpus's hand-crafted attacks: object arrays made through a dtype's BUILD state."""
    assert fuzz.check_pickle(fuzz.attack_pickles()[name], folder) == "refused"


@FUZZ
@given(rng=st.randoms(use_true_random=False), seed_index=st.integers(0, 2))
def test_e4_mutated_attack_pickles_only_dataset_error(folder, rng, seed_index):
    seed = sorted(fuzz.attack_pickles().items())[seed_index][1]
    data = fuzz.mutate(seed, rng, fuzz.pickle_tokens(folder / fuzz.MARKER_NAME))
    with address_space_cap():
        outcome = fuzz.check_pickle(data, folder)  # also asserts no object array was returned
    assert outcome in ("ok", "refused")


@pytest.mark.parametrize("data", [
    b"\x80\x02}r\x72\x79\x79\x0a.",                      # EMPTY_DICT, LONG_BINPUT 175798642, STOP
    b"\x80\x05\x96" + (5 << 30).to_bytes(8, "little") + b"xx.",  # BYTEARRAY8 declaring 5 GiB
    b"\x80\x05\x95" + (5 << 30).to_bytes(8, "little") + b"}.",   # FRAME declaring 5 GiB
])
def test_e5_huge_declared_sizes_are_refused_without_allocating(folder, data):
    """Fuzz-found: a few bytes asking for a ~2.8 GB memo table or a 5 GiB buffer. The loader (pure-Python
    unpickler with a dict memo, reads capped at the file size) refuses them under a 1 GiB cap."""
    with address_space_cap():
        assert fuzz.check_pickle(data, folder) == "refused"


def test_e5_every_truncation_of_a_real_pickle_is_refused(folder):
    seed = fuzz.pickle_seeds()[0]
    for cut in range(0, len(seed), max(1, len(seed) // 60)):
        assert fuzz.check_pickle(seed[:cut], folder) == "refused", cut
    with pytest.raises(dataset.DatasetError, match="(?i)re-run preprocess"):
        (folder / "cut.pkl").write_bytes(seed[: len(seed) // 2])
        dataset.load_file(folder / "cut.pkl")


@pytest.mark.parametrize("case", [1808, 2406, 3717, 4594])
def test_e5_fuzz_found_corrupt_dtype_state_is_refused(folder, case):
    """bench/fuzz.py --seed 0 cases whose BUILD hands numpy's dtype.__setstate__ a corrupt state:
    numpy raised SystemError, which escaped the loader before dss.data.dataset caught it too."""
    assert fuzz.check_pickle(fuzz.case_input("pickle", 0, case, folder), folder) == "refused"
