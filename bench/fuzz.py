"""Mutation fuzz of the three readers of untrusted bytes: dataset pickles, labels/features CSVs, images.

    python bench/fuzz.py                               # 20,000 cases per target (a few minutes)
    python bench/fuzz.py --cases 5000                  # quicker
    python bench/fuzz.py --cases 2000 --targets image --seed 7
    python bench/fuzz.py --save-failures /tmp/fuzz-failures   # keep the inputs of failing cases
    make fuzz

Each case takes a valid seed input (a real dataset pickle, a real labels CSV, a real JPEG/PNG),
applies 1-3 random mutations (byte flips, truncation, deleted/duplicated slices, inserted
format-specific tokens, 0x00000000/0xFFFFFFFF over a length field) or, one case in eight, uses
random bytes, and checks the only allowed outcomes:

  pickle  dss.data.dataset.load_file -> a validated dict holding no object array, or DatasetError; and
          no side effect (a mutation may splice in a ``posix.system('touch MARKER')`` payload: MARKER
          must never exist)
  pickle_attack  the same oracle, mutating the hand-crafted attacks of ``attack_pickles`` (each of
          which, unmutated, must be refused; they run first, as cases -1, -2, ...)
  csv     dss.ingest.labels.read_labels / read_features -> a consistent table, or LabelsError
  image   dss.images.decode_and_resize -> a C-contiguous (32, 32, 3) uint8 array, or ImageSkip
          with a reason from images.SKIP_REASONS

Anything else (another exception, a wrong result, a case running longer than --case-timeout
seconds) is a FAIL, printed with its target, case number and seed so it can be replayed. Text that
C code printed to stderr during a case (e.g. CPython's unpickler on a corrupt bytearray length) is
counted as a "note:" outcome: not a failure, since the reader still answered as it must.
Prints one line per target: cases run and the outcome counts. Exit 1 when any case failed.
tests/robustness/ runs the same oracles under hypothesis with bounded examples.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pickle
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dss.data import dataset, safepickle  # noqa: E402
from dss import images
from dss.ingest import labels

TARGETS = ("pickle", "pickle_attack", "csv", "image")
IMAGE_SIZE = 32  # px of the decoded output in the image oracle
MARKER_NAME = "FUZZ_MARKER_MUST_NOT_EXIST"

# Format-specific fragments a mutation may insert (dictionary-guided mutation).
CSV_TOKENS = [b",", b'"', b'""', b"\n", b"\r\n", b"\r", b"\xef\xbb\xbf", b"\x00", b"1.0", b"0", b" 2", b"NA",
              b"00123", b"1e5", b"id", b"label", b"cat", b",,,,", b"\xff\xfe", b"\xc3\x28", b"\t", b"'"]
IMAGE_TOKENS = [b"\xff\xd8\xff", b"\xff\xd9", b"\xff\xc0\x00\x11\x08\xff\xff\xff\xff", b"\xff\xda", b"\xff\xe1",
                b"IHDR", b"IDAT", b"IEND", b"PLTE", b"tRNS", b"eXIf", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                b"Exif\x00\x00MM\x00*", b"\x01\x12\x00\x03"]


def _marker_payload(marker: Path) -> bytes:
    # GLOBAL posix.system + a string + REDUCE: what an attacker would splice into a pickle.
    return b"cposix\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR"


def pickle_tokens(marker: Path) -> list[bytes]:
    return [_marker_payload(marker), b"cbuiltins\neval\n", b"cos\nsystem\n", b"cnumpy\ndtype\n", b"R", b"b", b"t",
            b"(", b")", b"}", b"]", b"N", b".", b"\x80\x05", b"\x95\xff\xff\xff\xff\xff\xff\xff\x7f",
            b"\x8c\x05numpy", b"\x93", b"\x96", b"\x97", b"\x98", b"\xff\xff\xff\x7f", b"J\xff\xff\xff\xff"]


# --------------------------------------------------------------------------- seeds
def image_seeds() -> list[bytes]:
    """Real JPEG/PNG files: photo-like noise, grey, progressive, EXIF-rotated, RGBA, palette, 16-bit."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6

    def encode(img, fmt, **options):
        buffer = io.BytesIO()
        img.save(buffer, fmt, **options)
        return buffer.getvalue()

    return [
        encode(photo, "JPEG", quality=85),
        encode(photo.convert("L"), "JPEG", quality=70),
        encode(photo, "JPEG", quality=80, progressive=True),
        encode(photo, "JPEG", quality=80, exif=exif.tobytes()),
        encode(photo, "PNG"),
        encode(photo.convert("RGBA"), "PNG"),
        encode(photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", transparency=0),
        encode(Image.fromarray((rng.random((24, 32)) * 65535).astype(np.uint16)), "PNG"),
    ]


def csv_seeds() -> list[bytes]:
    """A one-hot labels CSV, a label-column CSV and a features CSV, as exported by real tools."""
    one_hot = "id,cat,dog,bird\r\nZJ000000,1.0,0.0,0.0\r\nZJ000001,0.0,1.0,0.0\r\n00123,0,0,1\r\n1e5,0.0,1.0,0.0\r\n"
    label = "\ufeffid,label,extra\nZJ000000,cat,x\nZJ000001, dog ,y\nNA,bird,\n"
    features = 'id,filepath,site\nZJ000000,train_features/ZJ000000.jpg,S0001\n"ZJ,1",train_features/a b.jpg,S0002\n'
    return [one_hot.encode(), label.encode(), features.encode()]


def pickle_seeds() -> list[bytes]:
    """A real dataset dict pickled with protocol 5 (what preprocess writes) and protocol 2 (old tools)."""
    rng = np.random.default_rng(1)
    data = {
        "images": rng.integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8),
        "ids": np.array(["a", "b", "00123"]),
        "labels": np.array([0, 1, 0], dtype=np.int64),
        "class_names": ["cat", "dog"],
        "sites": ["S1", "S2", "S1"],
        "meta": {"source_key": np.array(["a.jpg", "b.jpg", "c.jpg"]), "orig_width": np.array([4, 4, 4]),
                 "orig_height": np.array([4, 4, 4]), "orig_mode": np.array(["RGB"] * 3),
                 "was_grey": np.array([False, True, False])},
        "info": {"format_version": dataset.FORMAT_VERSION, "split": "train", "image_size": 4},
    }
    return [pickle.dumps(data, protocol=5), pickle.dumps(data, protocol=2)]


def _text(value: str) -> bytes:
    data = value.encode()
    return pickle.BINUNICODE + len(data).to_bytes(4, "little") + data


def _dtype_state_build(itemsize: int, flags: int) -> bytes:
    """The dtype state (3, '|', None, None, None, itemsize, 1, flags) and BUILD, as numpy writes it."""
    return (pickle.MARK + pickle.BININT1 + b"\x03" + _text("|") + pickle.NONE * 3
            + pickle.BININT + itemsize.to_bytes(4, "little") + pickle.BININT1 + b"\x01"
            + pickle.BININT + flags.to_bytes(4, "little") + pickle.TUPLE + pickle.BUILD)


def dtype_ops(code: str, itemsize: int, flags: int) -> bytes:
    """``numpy.dtype(code, False, True)``, then BUILD with ``_dtype_state_build``."""
    return (pickle.GLOBAL + b"numpy\ndtype\n" + _text(code) + pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE3
            + pickle.REDUCE + _dtype_state_build(itemsize, flags))


def object_array_ops(module: str = "numpy._core.multiarray", count: int = 2) -> bytes:
    """An array of ``count`` void items whose dtype BUILD sets NPY_ITEM_HASOBJECT (0x01): numpy's
    _reconstruct + BUILD, as protocol <= 4 pickles an array. Its 8-byte items are zero here; with
    other bytes they are pointers that numpy dereferences (and frees) as Python objects."""
    data = bytes(8 * count)
    return (pickle.GLOBAL + f"{module}\n_reconstruct\n".encode() + pickle.GLOBAL + b"numpy\nndarray\n"
            + pickle.BININT1 + b"\x00" + pickle.TUPLE1 + pickle.SHORT_BINBYTES + b"\x01b" + pickle.TUPLE3
            + pickle.REDUCE + pickle.MARK + pickle.BININT1 + b"\x01" + pickle.BININT1 + bytes([count])
            + pickle.TUPLE1 + dtype_ops("V8", 8, 0x01) + pickle.NEWFALSE
            + pickle.SHORT_BINBYTES + bytes([len(data)]) + data + pickle.TUPLE + pickle.BUILD)


def regrown_dtype_ops() -> bytes:
    """A 16-byte array of V1 items (``_frombuffer``), after which its dtype (memo 0) is BUILT again
    with item size 4096: applied to the shared dtype, the array would read 64 KiB from 16 bytes."""
    return (pickle.GLOBAL + b"numpy._core.numeric\n_frombuffer\n" + pickle.MARK
            + pickle.SHORT_BINBYTES + b"\x10" + b"A" * 16 + dtype_ops("V1", 1, 0) + pickle.BINPUT + b"\x00"
            + pickle.MARK + pickle.BININT1 + b"\x10" + pickle.TUPLE + _text("C") + pickle.TUPLE + pickle.REDUCE
            + pickle.BINGET + b"\x00" + _dtype_state_build(4096, 0) + pickle.POP)


def attack_pickles() -> dict[str, bytes]:
    """Hand-crafted dataset pickles (protocol 3) that the loader must refuse, by name: object arrays
    made through a dtype's BUILD state (both numpy spellings), in the images and in meta."""
    seed = pickle.loads(pickle_seeds()[0])
    attacks = {}
    for name, module, field in (("object_images", "numpy._core.multiarray", "images"),
                                ("object_images_numpy1", "numpy.core.multiarray", "images"),
                                ("object_meta", "numpy._core.multiarray", "source_key")):
        evil = object_array_ops(module, count=3)
        # A real dataset dict with ``evil`` spliced in as the value of ``field``.
        marker = "SPLICE_HERE"
        body = pickle.dumps({**seed, "images": marker} if field == "images"
                            else {**seed, "meta": {**seed["meta"], field: marker}}, protocol=3)
        spliced = pickle.BINUNICODE + len(marker).to_bytes(4, "little") + marker.encode()
        assert body.count(spliced) == 1
        attacks[name] = body.replace(spliced, evil)
    return attacks


# --------------------------------------------------------------------------- mutation
def mutate(data: bytes, rng: random.Random, tokens: list[bytes]) -> bytes:
    """1-3 random mutations of ``data`` (or, one case in eight, random bytes)."""
    if rng.random() < 0.125:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 256)))
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        operation = rng.randrange(7)
        position = rng.randint(0, len(out))
        if operation == 0 and out:    # flip 1-16 random bytes
            for _ in range(rng.randint(1, 16)):
                out[rng.randrange(len(out))] = rng.getrandbits(8)
        elif operation == 1:          # truncate
            del out[position:]
        elif operation == 2 and out:  # delete a slice
            del out[position:position + rng.randint(1, 64)]
        elif operation == 3 and out:  # duplicate a slice somewhere else
            start = rng.randrange(len(out))
            out[position:position] = out[start:start + rng.randint(1, 64)]
        elif operation == 4:          # insert a format token
            out[position:position] = rng.choice(tokens)
        elif operation == 5 and len(out) >= 4:  # a length/size field set to 0 or 2**32 - 1
            start = rng.randrange(len(out) - 3)
            out[start:start + 4] = rng.choice((b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff"))
        elif operation == 6 and out:  # zero a run (a lost block)
            start = rng.randrange(len(out))
            length = rng.randint(1, 200)
            out[start:start + length] = bytes(len(out[start:start + length]))
    return bytes(out)


# --------------------------------------------------------------------------- oracles
class OracleFailure(AssertionError):
    """An outcome the reader must never produce (a wrong result or side effect)."""


def check_image(data: bytes) -> str:
    """Decode ``data``; returns the outcome ("ok" or "skip:<reason>"); OracleFailure/other exceptions = bug."""
    try:
        array, info = images.decode_and_resize(data, IMAGE_SIZE)
    except images.ImageSkip as skip:
        if skip.reason not in images.SKIP_REASONS:
            raise OracleFailure(f"ImageSkip with unknown reason {skip.reason!r}") from None
        return f"skip:{skip.reason}"
    if not (isinstance(array, np.ndarray) and array.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
            and array.dtype == np.uint8 and array.flags.c_contiguous):
        raise OracleFailure(f"decoded to {type(array).__name__} {getattr(array, 'shape', None)} "
                            f"{getattr(array, 'dtype', None)}")
    if info["orig_width"] < 1 or info["orig_height"] < 1:
        raise OracleFailure(f"bad original size in {info}")
    return "ok"


def check_csv(data: bytes) -> str:
    """Parse ``data`` as a labels CSV and as a features CSV; outcome per reader, joined by '/'."""
    outcomes = []
    try:
        table = labels.read_labels("fuzz.csv", data=data)
    except labels.LabelsError:
        outcomes.append("labels_error")
    else:
        ids, codes = list(table.ids), np.asarray(table.labels)
        if not (all(isinstance(i, str) for i in ids) and len(set(ids)) == len(ids) == len(codes) > 0):
            raise OracleFailure(f"labels table with bad ids {ids[:5]} / {len(codes)} labels")
        names = list(table.class_names)
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise OracleFailure(f"bad class names {names}")
        if codes.dtype != np.int64 or codes.min() < 0 or codes.max() >= len(names):
            raise OracleFailure(f"labels {codes[:5]} out of range for {len(names)} classes")
        outcomes.append("labels_ok")
    try:
        features = labels.read_features("fuzz.csv", data=data)
    except labels.LabelsError:
        outcomes.append("features_error")
    else:
        ids = list(features.ids)
        if not (len(ids) == len(features.filepaths) == len(features.sites) > 0 and len(set(ids)) == len(ids)
                and all(isinstance(v, str) for v in [*ids, *features.filepaths, *features.sites])):
            raise OracleFailure(f"inconsistent features table ({len(ids)} ids)")
        outcomes.append("features_ok")
    return "/".join(outcomes)


def check_pickle(data: bytes, folder: Path) -> str:
    """Write ``data`` to a file in ``folder`` and load it as a dataset pickle; outcome "ok" or "refused"."""
    path = folder / "case.pkl"
    path.write_bytes(data)
    allowed_before = dict(safepickle._ALLOWED)
    try:
        loaded = dataset.load_file(path)
    except dataset.DatasetError:
        outcome = "refused"
    else:
        if not (isinstance(loaded, dict) and loaded["images"].dtype == np.uint8 and loaded["images"].ndim == 4):
            raise OracleFailure("load_file returned an invalid dataset")
        if _holds_object_array(loaded):
            raise OracleFailure("load_file returned an object array")
        outcome = "ok"
    if (folder / MARKER_NAME).exists():
        raise OracleFailure("a pickle ran code: the marker file was created")
    if safepickle._ALLOWED != allowed_before:
        raise OracleFailure("the unpickler's allowlist was changed by a pickle")
    return outcome


def _holds_object_array(value) -> bool:
    if isinstance(value, dict):
        return any(_holds_object_array(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_object_array(item) for item in value)
    return isinstance(value, (np.ndarray, np.dtype, np.generic)) and getattr(value, "dtype", value).hasobject


# --------------------------------------------------------------------------- the loop
class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise CaseTimeout in the main thread after ``seconds`` (a hang is a failure, not a stall)."""
    def on_alarm(signum, frame):
        raise CaseTimeout(f"case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _seeds_and_tokens(target: str, folder: Path) -> tuple[list[bytes], list[bytes]]:
    if target == "pickle":
        return pickle_seeds(), pickle_tokens(folder / MARKER_NAME)
    if target == "pickle_attack":
        return list(attack_pickles().values()), pickle_tokens(folder / MARKER_NAME)
    return (csv_seeds(), CSV_TOKENS) if target == "csv" else (image_seeds(), IMAGE_TOKENS)


def case_input(target: str, seed: int, case: int, folder: Path, seeds_and_tokens=None) -> bytes:
    """The input of case ``case`` of a run with ``seed``: each case is replayable on its own."""
    seeds, tokens = seeds_and_tokens or _seeds_and_tokens(target, folder)
    rng = random.Random(f"{seed}-{target}-{case}")
    return mutate(rng.choice(seeds), rng, tokens)


def run_target(target: str, cases: int, seed: int, case_timeout: float, folder: Path,
               save_failures: Path | None) -> tuple[Counter, list[str]]:
    """Run ``cases`` mutated inputs through one oracle; returns (outcome counts, failure lines).
    ``pickle_attack`` first runs each unmutated attack (cases -1, -2, ...), which must be refused."""
    oracle = ((lambda data: check_pickle(data, folder)) if target.startswith("pickle")
              else {"csv": check_csv, "image": check_image}[target])
    seeds_and_tokens = _seeds_and_tokens(target, folder)
    counts: Counter = Counter()
    failures = []
    attacks = seeds_and_tokens[0] if target == "pickle_attack" else []
    for index, attack in enumerate(attacks):
        if check_pickle(attack, folder) != "refused":
            failures.append(f"{target} case {-1 - index}: an unmutated attack pickle was not refused")
    for case in range(cases):
        data = case_input(target, seed, case, folder, seeds_and_tokens)
        printed = io.StringIO()  # what C code printed with PyErr_Print (not an exception, but worth knowing)
        try:
            with time_limit(case_timeout), contextlib.redirect_stderr(printed):
                outcome = oracle(data)
        except Exception as exc:  # noqa: BLE001 - every other outcome is what we are looking for
            outcome = f"FAIL:{type(exc).__name__}"
            failures.append(f"{target} case {case} (seed {seed}): {type(exc).__name__}: {str(exc)[:200]}")
            if save_failures is not None:
                save_failures.mkdir(parents=True, exist_ok=True)
                (save_failures / f"{target}-{seed}-{case}.bin").write_bytes(data)
        counts[outcome] += 1
        if printed.getvalue():
            counts[f"note:printed {printed.getvalue().strip().splitlines()[-1][:80]!r}"] += 1
    return counts, failures


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cases", type=int, default=20_000, help="mutated inputs per target")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--seed", type=int, default=0, help="run seed; case i of a target is replayable alone")
    parser.add_argument("--case-timeout", type=float, default=10.0, help="seconds before a case counts as a hang")
    parser.add_argument("--save-failures", type=Path, default=None, help="folder for the inputs of failing cases")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    total_failures = 0
    with tempfile.TemporaryDirectory(prefix="dss-fuzz-") as folder:
        for target in args.targets:
            started = time.perf_counter()
            counts, failures = run_target(target, args.cases, args.seed, args.case_timeout, Path(folder),
                                          args.save_failures)
            seconds = time.perf_counter() - started
            outcomes = ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
            print(f"{target}: {args.cases} cases in {seconds:.1f} s, {len(failures)} failed | {outcomes}",
                  flush=True)
            for line in failures[:10]:
                print(f"  FAIL {line}", flush=True)
            total_failures += len(failures)
    return 1 if total_failures else 0


if __name__ == "__main__":
    sys.exit(main())
