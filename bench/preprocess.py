"""How fast is preprocess.py, and how close to its limits? Prints a table of images/s.

    python bench/preprocess.py                          # N = 1,000 (2,000 960x540 JPEGs generated)
    python bench/preprocess.py --n 100                  # quick check that the benchmark works
    python bench/preprocess.py --workers 4 --image-size 224 --save     # also bench/results/preprocess-<date>.md
    python bench/preprocess.py --keep-dir /tmp/bench-data              # keep (and next time reuse) the JPEGs

Rows (all on the same 2N generated 960x540 JPEGs, dss.demo.sample with one frame size):
  (a) preprocess.py --input s3://...  against a local moto S3 server (started here, images uploaded)
  (b) preprocess.py --input FOLDER    on the local folder
  (c) naive loop, in this process: per image one boto3 GET, full PIL decode (no draft), resize
  (d) decode limit: one process's draft-decode + resize rate (dss.images.decode_and_resize on bytes
      already in memory) times --workers: what the decode processes could do with perfect scaling
  (d2) --workers processes decoding those bytes at the same time, in-memory, no I/O or IPC per image:
      what the cores deliver together (on a shared VM each core is slower while the other is busy)
  (e) GET-only loops against the same endpoint: 1 thread, and --download-threads threads
  (f) the S3 path's CPU limit: cores / (server + client CPU seconds per GET, from /proc and getrusage
      during (e), + one decode, 1/(d per process)): the moto server and boto3 run on the same cores as
      the decode processes, so (a) cannot pass (f) here even where min(e, d) is higher
(a)-(c) are marginal rates: N / (wall time over 2N images - wall time over N images), so start-up
(interpreter, imports, listing, process pool) cancels out. The N run is the 2N dataset with
``--limit N`` (first N ids), so both runs list the same objects.
(a), (b), (d) and the threaded (e) are measured --rounds times, interleaved ((d) before and after
each round), and the table shows medians: the speed of a shared VM drifts by +-15% within minutes,
and interleaving lets every row see the same drift. (c) and the 1-thread (e) run once.
Ratios: (b)/(d) is how much of the decode limit the folder path reaches; (a)/min(e, d) is how
much of the slower of the network and decode limits the S3 path reaches ((e) with threads).
The moto server is a single Python process on the same machine: its GET rate is a limit of this
benchmark, not of S3, and the CPU it uses (printed, from /proc) is taken from the decode processes. Timings on a busy machine are noisy: run it when the machine is quiet.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import multiprocessing
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Run as ``python bench/preprocess.py``: the repository root (for ``dss``) is not on sys.path.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from PIL import Image, features  # noqa: E402

from dss import fileio, images  # noqa: E402
from dss.demo import sample
from dss.ingest import sources
from dss.cli import positive_int  # noqa: E402

BUCKET = "bench-preprocess"
PREFIX = "data"
FRAME_SIZE = (960, 540)
N_TEST = 8  # a few test images so the input is a full Conser-vision layout; both runs process all 8
FAKE_AWS_ENV = {  # for the local moto server only; never real AWS
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=positive_int, default=1000,
                        help="N: marginal rates come from runs over 2N and N images (2N JPEGs are generated)")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="preprocess.py --workers (decode processes), and the multiplier of (d)")
    parser.add_argument("--download-threads", type=positive_int, default=sources.DEFAULT_DOWNLOAD_THREADS,
                        help="preprocess.py --download-threads, and the threads of the threaded GET loop (e)")
    parser.add_argument("--image-size", type=positive_int, default=224, help="stored square size in px")
    parser.add_argument("--keep-dir", type=Path, default=None,
                        help="generate the JPEGs here and keep them; reused when it holds 2N train JPEGs of 960x540 "
                             "(the seed is not checked)")
    parser.add_argument("--seed", type=int, default=0, help="dss.demo.sample seed of the generated JPEGs")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="repeat (a), (b), (d), (e) this many times, interleaved; the table shows medians")
    parser.add_argument("--decode-sample", type=positive_int, default=500,
                        help="JPEGs (of the first N) timed for (d), before and after every round")
    parser.add_argument("--save", action="store_true",
                        help="also write the table as markdown to bench/results/preprocess-<date>.md")
    args = parser.parse_args(argv)
    if args.n < N_TEST:
        parser.error(f"--n must be at least {N_TEST}")
    return args


# --------------------------------------------------------------------------- data
def prepare_images(root: Path, n_train: int, seed: int) -> list[str]:
    """2N train + N_TEST test 960x540 JPEGs under ``root`` (reused when already there); train keys in id order."""
    features_csv = root / "train_features.csv"
    if features_csv.is_file():
        rows = features_csv.read_text().splitlines()[1:]
        keys = [row.split(",")[1] for row in rows]
        first = root / keys[0] if keys else None
        if len(keys) == n_train and first and first.is_file():
            with Image.open(first) as image:
                if image.size == FRAME_SIZE:
                    print(f"reusing {len(keys)} train JPEGs in {root}", flush=True)
                    return keys
    started = time.perf_counter()
    sample.write_demo_dataset(root, n_train=n_train, n_test=N_TEST, seed=seed, frame_sizes=[FRAME_SIZE])
    print(f"generated {n_train} + {N_TEST} JPEGs ({FRAME_SIZE[0]}x{FRAME_SIZE[1]}) in {root} "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    return [row.split(",")[1] for row in (root / "train_features.csv").read_text().splitlines()[1:]]


def child_env(**extra: str) -> dict:
    """This environment without AWS/SageMaker settings (so nothing reaches real AWS), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SM_"))}
    env.update(extra)
    return env


class MotoServer:
    """A moto S3 server subprocess on a free local port (as tests/conftest.py starts one)."""

    def __init__(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("moto server exited at start-up; is moto[server] installed?")
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("moto server did not start within 60 s")

    def env(self) -> dict:
        return child_env(**FAKE_AWS_ENV, AWS_ENDPOINT_URL=self.endpoint)

    def client(self, max_pool_connections: int = 10):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
                            aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                            config=Config(max_pool_connections=max_pool_connections))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def upload(client, root: Path, threads: int) -> None:
    """Every file under ``root`` to s3://BUCKET/PREFIX/<relative path>."""
    client.create_bucket(Bucket=BUCKET)
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    started = time.perf_counter()

    def put(path: Path) -> None:
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{path.relative_to(root).as_posix()}", Body=path.read_bytes())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, paths))
    print(f"uploaded {len(paths)} objects to s3://{BUCKET}/{PREFIX}/ in {time.perf_counter() - started:.1f} s",
          flush=True)


# --------------------------------------------------------------------------- measurements
def run_preprocess(input_uri: str, limit: int, env: dict, image_size: int, workers: int, download_threads: int,
                   scratch: Path) -> float:
    """Wall seconds of one ``preprocess.py`` subprocess over the first ``limit`` train ids."""
    output = Path(tempfile.mkdtemp(prefix="out-", dir=scratch))
    command = [sys.executable, str(REPO_ROOT / "preprocess.py"), "--input", input_uri, "--output-dir", str(output),
               "--image-size", str(image_size), "--workers", str(workers),
               "--download-threads", str(download_threads), "--limit", str(limit), "--quiet"]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    try:
        if result.returncode != 0:
            raise RuntimeError(f"preprocess.py failed ({result.returncode}) on {input_uri}:\n"
                               f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        summary = json.loads((output / "preprocessing_summary.json").read_text())
        written = summary["splits"]["train"]["written"]
        if written != limit:
            raise RuntimeError(f"preprocess.py wrote {written} train images from {input_uri}, expected {limit}")
    finally:
        shutil.rmtree(output, ignore_errors=True)
    return seconds


def naive_loop(client, keys: list[str], image_size: int) -> float:
    """Seconds for the prototype's way: GET, full decode, resize, one image after another."""
    started = time.perf_counter()
    for key in keys:
        data = client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")["Body"].read()
        with Image.open(io.BytesIO(data)) as image:
            np.asarray(image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR))
    return time.perf_counter() - started


def get_only(client, keys: list[str], threads: int) -> float:
    """Seconds to GET and read every key (bodies discarded), with ``threads`` concurrent requests."""
    def get(key: str) -> int:
        return len(client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")["Body"].read())

    started = time.perf_counter()
    if threads == 1:
        for key in keys:
            get(key)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(get, keys))
    return time.perf_counter() - started


_decode_blobs: list[bytes] = []  # in the (d2) processes: the JPEG bytes, handed over once at start-up


def _keep_blobs(blobs: list[bytes]) -> None:
    _decode_blobs[:] = blobs


def _decode_kept(image_size: int, count: int) -> int:
    for data in _decode_blobs[:count]:
        images.decode_and_resize(data, image_size, "squash")
    return min(count, len(_decode_blobs))


def parallel_decode_rate(blobs: list[bytes], image_size: int, processes: int) -> float:
    """Images/s of ``processes`` processes decoding the same bytes at once (no I/O, no IPC per image):
    what the machine's cores deliver together, which on a shared VM is less than one core's rate x cores.
    The bytes reach the processes at start-up, outside the timed part."""
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(processes, initializer=_keep_blobs, initargs=(blobs,)) as pool:
        pool.starmap(_decode_kept, [(image_size, 1)] * processes)  # warm-up: every process started
        started = time.perf_counter()
        count = sum(pool.starmap(_decode_kept, [(image_size, len(blobs))] * processes, chunksize=1))
        return count / (time.perf_counter() - started)


def decode_rate(blobs: list[bytes], image_size: int) -> float:
    """Images/s of draft-decode + resize in this one process (bytes already in memory)."""
    images.decode_and_resize(blobs[0], image_size, "squash")  # warm-up: imports, first allocation
    started = time.perf_counter()
    for data in blobs:
        images.decode_and_resize(data, image_size, "squash")
    return len(blobs) / (time.perf_counter() - started)


def marginal(n: int, seconds_n: float, seconds_2n: float) -> float:
    """Images/s of the extra N images; NaN when the difference is not positive (a noisy machine)."""
    extra = seconds_2n - seconds_n
    return n / extra if extra > 0 else float("nan")


# --------------------------------------------------------------------------- report
def machine_info() -> list[str]:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}",
        f"CPUs: {os.cpu_count()} ({usable} usable by this process), load average 1/5/15 min: {load}",
        f"python {platform.python_version()}, numpy {np.__version__}, Pillow {Image.__version__} "
        f"(libjpeg-turbo: {features.check_feature('libjpeg_turbo')})",
    ]


def format_rate(value: float) -> str:
    return "n/a" if value != value else f"{value:,.1f}"  # NaN check


def format_ratio(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}"


def render_report(args, info: list[str], rows: list[tuple], ratios: list[str]) -> str:
    lines = ["# preprocess benchmark", ""] + [f"- {line}" for line in info] + [
        f"- settings: N = {args.n} ({FRAME_SIZE[0]}x{FRAME_SIZE[1]} JPEGs), --image-size {args.image_size}, "
        f"--workers {args.workers}, --download-threads {args.download_threads}",
        "",
        "| path | seconds over N | seconds over 2N | images/s |",
        "|---|---:|---:|---:|",
    ]
    for name, seconds_n, seconds_2n, rate in rows:
        lines.append(f"| {name} | {seconds_n} | {seconds_2n} | {format_rate(rate)} |")
    return "\n".join(lines + [""] + [f"- {ratio}" for ratio in ratios]) + "\n"


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def median(values: list[float]) -> float:
    return float(np.median(values))


def main(argv=None) -> int:
    args = parse_args(argv)
    n = args.n
    info = machine_info()
    print("\n".join(info), flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    server = None
    # Per round: (d) before and after, (b) N and 2N, (e) threads, (a) N and 2N; medians over the rounds,
    # so a machine whose speed drifts between measurements (shared VMs) affects every row alike.
    decode, decode_parallel, folder, s3, get_threaded = [], [], {n: [], 2 * n: []}, {n: [], 2 * n: []}, []
    server_cores_a, server_cores_e, server_get_cpu, client_get_cpu = [], [], [], []  # cores; CPU s per GET
    try:
        data_root = args.keep_dir or scratch / "data"
        keys = prepare_images(data_root, 2 * n, args.seed)
        server = MotoServer()
        client = server.client(max_pool_connections=max(10, args.download_threads))
        upload(client, data_root, threads=8)
        first_n = keys[:n]
        blobs = [(data_root / key).read_bytes() for key in first_n[:args.decode_sample]]
        s3_uri = f"s3://{BUCKET}/{PREFIX}/"
        common = dict(image_size=args.image_size, workers=args.workers, download_threads=args.download_threads,
                      scratch=scratch)
        get_1 = get_only(client, first_n, threads=1)
        naive = [naive_loop(client, keys[:count], args.image_size) for count in (n, 2 * n)]
        for round_number in range(1, args.rounds + 1):
            decode.append(decode_rate(blobs, args.image_size))
            for count in (n, 2 * n):
                folder[count].append(run_preprocess(str(data_root), count, child_env(), **common))
            server_before, client_before = process_cpu_seconds(server.process.pid), own_cpu_seconds()
            get_threaded.append(get_only(client, first_n, threads=args.download_threads))
            server_get_cpu.append((process_cpu_seconds(server.process.pid) - server_before) / n)
            client_get_cpu.append((own_cpu_seconds() - client_before) / n)
            server_cores_e.append(server_get_cpu[-1] * n / get_threaded[-1])
            server_cpu = {}
            for count in (n, 2 * n):
                server_before = process_cpu_seconds(server.process.pid)
                s3[count].append(run_preprocess(s3_uri, count, server.env(), **common))
                server_cpu[count] = process_cpu_seconds(server.process.pid) - server_before
            # The server's share of the cores over the extra N images of the 2N run.
            server_cores_a.append((server_cpu[2 * n] - server_cpu[n]) / (s3[2 * n][-1] - s3[n][-1]))
            decode.append(decode_rate(blobs, args.image_size))
            decode_parallel.append(parallel_decode_rate(blobs, args.image_size, args.workers))
            print(f"round {round_number}/{args.rounds}: (d) {decode[-2] * args.workers:,.0f} -> "
                  f"{decode[-1] * args.workers:,.0f}, (b) {marginal(n, folder[n][-1], folder[2 * n][-1]):,.0f}, "
                  f"(d2) {decode_parallel[-1]:,.0f}, (e) {n / get_threaded[-1]:,.0f}, "
                  f"(a) {marginal(n, s3[n][-1], s3[2 * n][-1]):,.0f} images/s",
                  flush=True)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)  # outputs, and the JPEGs unless --keep-dir

    from_s3 = [median(s3[count]) for count in (n, 2 * n)]
    from_folder = [median(folder[count]) for count in (n, 2 * n)]
    rate_a, rate_b, rate_c = (marginal(n, *pair) for pair in (from_s3, from_folder, naive))
    one_process = median(decode)
    rate_d = one_process * args.workers
    get_t = median(get_threaded)
    rate_e1, rate_et = n / get_1, n / get_t
    # (f): if CPU were the only limit, each image from S3 costs the server's and the client's CPU
    # per GET (measured during (e)) plus one decode, and all of it shares the same cores.
    cpu_per_image = median(server_get_cpu) + median(client_get_cpu) + 1 / one_process
    rate_f = (os.cpu_count() or 1) / cpu_per_image
    rows = [
        ("(a) preprocess.py from S3 (moto)", f"{from_s3[0]:.2f}", f"{from_s3[1]:.2f}", rate_a),
        ("(b) preprocess.py from folder", f"{from_folder[0]:.2f}", f"{from_folder[1]:.2f}", rate_b),
        ("(c) naive loop: GET + full decode + resize", f"{naive[0]:.2f}", f"{naive[1]:.2f}", rate_c),
        (f"(d) decode limit: 1 process draft-decode + resize ({one_process:,.1f}/s) x {args.workers} workers",
         "", "", rate_d),
        (f"(d2) {args.workers} processes decoding at once (the machine's parallel decode rate)", "", "",
         median(decode_parallel)),
        ("(e) GET-only, 1 thread", f"{get_1:.2f}", "", rate_e1),
        (f"(e) GET-only, {args.download_threads} threads", f"{get_t:.2f}", "", rate_et),
        (f"(f) CPU limit of the S3 path on {os.cpu_count()} cores: server {median(server_get_cpu) * 1e3:.1f} + "
         f"client {median(client_get_cpu) * 1e3:.1f} ms per GET + decode {1e3 / one_process:.1f} ms", "", "", rate_f),
    ]
    ratios = [
        f"(b)/(d) folder vs decode limit: {format_ratio(rate_b / rate_d)}",
        f"(b)/(d2) folder vs the parallel decode rate: {format_ratio(rate_b / median(decode_parallel))}; "
        f"(d2)/(d) how the cores scale together: {format_ratio(median(decode_parallel) / rate_d)}",
        f"(a)/min(e {args.download_threads} threads, d) S3 vs the slower limit: "
        f"{format_ratio(rate_a / min(rate_et, rate_d))}",
        f"(a)/(f) S3 path vs its CPU limit (moto, boto3 and the decoders on the same cores): "
        f"{format_ratio(rate_a / rate_f)}",
        f"(a)/(c) S3 preprocess vs naive loop: {format_ratio(rate_a / rate_c)}",
        f"moto server CPU use (cores of {os.cpu_count()}): {median(server_cores_e):.2f} during (e), "
        f"{median(server_cores_a):.2f} during (a)'s extra N images, where the decode processes need the same cores",
        f"{args.rounds} round(s), medians; per round (d) {', '.join(f'{r * args.workers:,.0f}' for r in decode)}; "
        f"(b) {', '.join(format_rate(marginal(n, a, b)) for a, b in zip(folder[n], folder[2 * n]))}; "
        f"(a) {', '.join(format_rate(marginal(n, a, b)) for a, b in zip(s3[n], s3[2 * n]))}",
    ]
    report = render_report(args, info, rows, ratios)
    print()
    print(report, end="", flush=True)
    if args.save:
        path = REPO_ROOT / "bench" / "results" / f"preprocess-{datetime.date.today().isoformat()}.md"
        fileio.write_text(path, report)
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
