"""Recipe benchmark: which training recipe predicts best on held-out data (issue 11, point 6).

    python bench/recipe.py --quick                       # smoke run: demo data, 32 px, 100 images, 1 epoch
    python bench/recipe.py --save                        # every data set at 32 and 64 px, 6 epochs
    python bench/recipe.py --datasets demo,demo-strong --sizes 64 --epochs 8 --rows defaults,k5,prototype
    python bench/recipe.py --device cuda --sizes 32,64,224 --save     # on a GPU machine

For each data set and stored size, preprocess.py runs once; then each row trains from scratch
(``--weights none``) for the same ``--epochs`` and is scored on the data set's TEST split with its
labels (``test_labels.csv``): log loss and accuracy recomputed from the row's ``test_predictions.csv``,
never from the row's own validation data (that column is there for comparison only).

Rows (the dss_train.py rows are real subprocesses; each row's flags are listed in the output):
  defaults     the defaults before issue 11: --temperature-scaling false --best-epoch-by logloss --ema-decay 0
               --tta false --crop-scale 0.6 --folds 1
  temperature  + temperature scaling
  select       + the best epoch chosen by its log loss after temperature scaling
  tta          + flip TTA (temperature fitted after TTA)
  ema          + EMA of weights (--ema-decay, default 0.999)
  crop         + no random crops (--crop-scale 1): dss_train.py's defaults since issue 11
  k5           K-fold site-grouped ensemble (--folds, default 5) with the pieces in --ensemble-with
  prototype    the prototype's recipe: random 75/25 split, best epoch by accuracy, Adam lr 1e-3, flips
               only, plain cross-entropy, batch 32 (bench/train.py's emulation, run in a subprocess)
  prior        no model: every test image gets the training class shares (the floor to beat)
  --try        rows of your own: 'NAME: --flag value ...' on top of the defaults row's flags
A row needing a flag that ``dss_train.py --help`` does not list is reported as not available; a flag
that only turns a feature off is left out when dss_train.py does not have it (absent = off).

Data sets: ``demo`` (python -m dss.demo, 1/4 frame size), ``demo-strong`` (--shift strong),
``fashion-mnist`` and ``elpv`` (real photographs, see bench/real_dataset.py; a data set whose files
are not installed is reported as not available). ``--work-dir DIR`` keeps the data, pickles and every
run's outputs (and reuses the data); ``results.json`` there holds every number of the tables.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench import real_dataset  # noqa: E402
from dss import fileio, metrics, threads  # noqa: E402
from dss.predict import results
from dss.models import prediction

DATASETS = ("demo", "demo-strong", "fashion-mnist", "elpv")
# Default (train, test) images per data set; real sets hold fewer when their split is smaller.
DATASET_SIZES = {"demo": (1500, 500), "demo-strong": (1500, 500), "fashion-mnist": (3000, 1000),
                 "elpv": (3000, 1000)}
DEMO_SCALE = 0.25
# The defaults before issue 11, each flag as it was then (--crop-scale 0.6: random crops of 60-100%).
OFF_FLAGS = {"--temperature-scaling": "false", "--best-epoch-by": "logloss", "--ema-decay": "0", "--tta": "false",
             "--crop-scale": "0.6", "--folds": "1"}
PIECES = ("temperature", "select", "tta", "ema", "crop")
ROW_NAMES = ("defaults", "temperature", "select", "tta", "ema", "crop", "k5", "prototype", "prior")
QUICK = {"datasets": "demo", "sizes": "32", "train": 100, "test": 40, "epochs": 1}
DEFAULTS = {"datasets": ",".join(DATASETS), "sizes": "32,64", "train": None, "test": None, "epochs": 6}


@dataclass
class Row:
    """One line of a table: ``flags`` for dss_train.py (None: run in-process kinds, prototype/prior)."""

    key: str
    title: str
    flags: dict | None
    result: dict = field(default_factory=dict)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", help=f"comma-separated, of {', '.join(DATASETS)} [default: all]")
    parser.add_argument("--sizes", help="stored image sizes in px, comma-separated [default: 32,64]")
    parser.add_argument("--rows", default=",".join(ROW_NAMES), help="comma-separated rows [default: all]")
    parser.add_argument("--try", dest="tries", action="append", default=[], metavar="'NAME: FLAGS'",
                        help="one more row: dss_train.py with the default row's flags and FLAGS, e.g. "
                             "'crops 0.8: --crop-scale 0.8' (repeatable)")
    parser.add_argument("--epochs", type=int, help="epochs of every row [default: 6]")
    parser.add_argument("--train", type=int, help="train images per data set [default: demo 1,500, real 3,000]")
    parser.add_argument("--test", type=int, help="test images per data set [default: demo 500, real 1,000]")
    parser.add_argument("--folds", type=int, default=5, help="K of the ensemble row")
    parser.add_argument("--ema-decay", default="0.999", help="decay of the EMA rows")
    parser.add_argument("--ensemble-with", default=",".join(PIECES),
                        help="pieces the ensemble row adds to --folds (comma-separated, or 'none')")
    parser.add_argument("--arch", default="", help="--arch for every row [default: dss_train.py's]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--num-threads", type=int, default=threads.allowed_cpus(),
                        help="CPU threads of every row [default: the CPUs this process may use]")
    parser.add_argument("--fashion-mnist-source", help="folder of Fashion-MNIST's IDX files")
    parser.add_argument("--elpv-source", help="elpv_dataset/data folder")
    parser.add_argument("--work-dir", type=Path, help="keep data, pickles and runs here [default: a temp folder]")
    parser.add_argument("--quick", action="store_true", help="smoke run: demo, 32 px, 100/40 images, 1 epoch")
    parser.add_argument("--save", action="store_true", help="also write bench/results/recipe-<date>.md")
    parser.add_argument("--out", type=Path, help="also write the tables to this file")
    parser.add_argument("--prototype-run", nargs=2, metavar=("DATA_DIR", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dataset_list = [name for name in args.datasets.split(",") if name]
    args.size_list = [int(size) for size in args.sizes.split(",") if size]
    args.row_list = [name for name in args.rows.split(",") if name]
    for name in args.dataset_list:
        if name not in DATASETS:
            parser.error(f"--datasets: unknown {name!r}; choose from {', '.join(DATASETS)}")
    for name in args.row_list:
        if name not in ROW_NAMES:
            parser.error(f"--rows: unknown {name!r}; choose from {', '.join(ROW_NAMES)}")
    args.try_rows = []
    for text in args.tries:
        name, _, flags = text.partition(":")
        words = shlex.split(flags)
        if not name.strip() or not words or any(not word.startswith("--") for word in words[::2]) or len(words) % 2:
            parser.error(f"--try: expected 'NAME: --flag value ...', got {text!r}")
        args.try_rows.append((name.strip(), dict(zip(words[::2], words[1::2]))))
    return args


# --------------------------------------------------------------------------- rows
def make_rows(args) -> list[Row]:
    """The rows asked for, each with the dss_train.py flags it needs (cumulative: each adds a piece)."""
    temperature = {"--temperature-scaling": "true"}
    select = {**temperature, "--best-epoch-by": "calibrated-logloss"}
    tta = {**select, "--tta": "true"}
    ema = {**tta, "--ema-decay": args.ema_decay}
    crop = {**ema, "--crop-scale": "1"}
    pieces = {"temperature": temperature, "select": {"--best-epoch-by": "calibrated-logloss"},
              "tta": {"--tta": "true"}, "ema": {"--ema-decay": args.ema_decay}, "crop": {"--crop-scale": "1"}}
    chosen = [piece for piece in args.ensemble_with.split(",") if piece and piece != "none"]
    ensemble = {"--folds": str(args.folds)}
    for piece in chosen:
        ensemble.update(pieces[piece])
    with_text = " + ".join(chosen) if chosen else "no other piece"
    every = {
        "defaults": Row("defaults", "the defaults before issue 11", {}),
        "temperature": Row("temperature", "+ temperature scaling", temperature),
        "select": Row("select", "+ best epoch by calibrated log loss", select),
        "tta": Row("tta", "+ flip TTA", tta),
        "ema": Row("ema", f"+ EMA {args.ema_decay}", ema),
        "crop": Row("crop", "+ no random crops (today's defaults)", crop),
        "k5": Row("k5", f"K={args.folds} site-fold ensemble ({with_text})", ensemble),
        "prototype": Row("prototype", "prototype recipe (random split, best by accuracy)", None),
        "prior": Row("prior", "class prior, no model", None),
    }
    tried = [Row(f"try-{index}", name, flags) for index, (name, flags) in enumerate(args.try_rows, start=1)]
    return [every[name] for name in args.row_list] + tried


def train_flags(script_help: str) -> set[str]:
    """The ``--flags`` dss_train.py's help lists."""
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", script_help))


def row_command(row: Row, data_dir: Path, model_dir: Path, args, available: set[str]) -> tuple[list[str] | None, str]:
    """(dss_train.py command, "") or (None, why the row is not available)."""
    wanted = dict(row.flags)
    if args.arch:
        wanted["--arch"] = args.arch
    missing = sorted(flag for flag in wanted if flag not in available)
    if missing:
        return None, f"not available: dss_train.py has no {', '.join(missing)}"
    flags = {flag: value for flag, value in OFF_FLAGS.items() if flag in available}
    flags.update(wanted)
    command = [sys.executable, str(REPO_ROOT / "dss_train.py"), "--data-dir", str(data_dir), "--model-dir",
               str(model_dir), "--weights", "none", "--epochs", str(args.epochs), "--seed", str(args.seed),
               "--device", args.device, "--num-threads", str(args.num_threads)]
    for flag, value in flags.items():
        command += [flag, value]
    return command, ""


def describe_flags(row: Row, args, available: set[str]) -> str:
    """The row's dss_train.py flags as its table legend shows them."""
    if row.key == "prototype":
        return "bench/train.py's emulation (train_recipe('prototype')): Adam lr 1e-3, flips, CE, batch 32"
    if row.key == "prior":
        return "training class shares for every test image"
    flags = {flag: value for flag, value in OFF_FLAGS.items() if flag in available}
    flags.update(row.flags)
    return "dss_train.py " + " ".join(f"{flag} {value}" for flag, value in flags.items())


# --------------------------------------------------------------------------- data
def prepare_dataset(name: str, root: Path, args) -> dict:
    """Write (or reuse) data set ``name`` under ``root``; returns a short description. Raises
    real_dataset.RealDataError when a real data set is not installed."""
    n_train, n_test = args.train or DATASET_SIZES[name][0], args.test or DATASET_SIZES[name][1]
    if name in ("demo", "demo-strong"):
        from dss.demo.sample import SiteDesign, write_demo_dataset

        shift = "strong" if name == "demo-strong" else "normal"
        manifest = root / "dataset.json"
        wanted = {"name": name, "train": n_train, "test": n_test, "seed": args.seed, "scale": DEMO_SCALE}
        if not (manifest.is_file() and json.loads(manifest.read_text()) == wanted):
            write_demo_dataset(root, n_train, n_test, args.seed, DEMO_SCALE, design=SiteDesign(shift=shift),
                               test_labels=True)
            fileio.write_text(manifest, json.dumps(wanted) + "\n")
        return {"train": n_train, "test": n_test, "source": f"python -m dss.demo --shift {shift}"}
    source = args.fashion_mnist_source if name == "fashion-mnist" else args.elpv_source
    summary = real_dataset.write_real_dataset(name, root, n_train, n_test, args.seed, source)
    return {"train": summary["train"], "test": summary["test"], "source": summary["package"]}


def run_logged(command: list[str], log_path: Path) -> tuple[int, float, str]:
    """Run ``command`` with its output in ``log_path``; (exit code, seconds, last output line)."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}).returncode
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    return code, time.perf_counter() - started, lines[-1] if lines else ""


def preprocess(data_root: Path, out: Path, size: int) -> None:
    """preprocess.py once per data set and size (skipped when ``out`` already holds its pickles)."""
    if (out / "train_data.pkl").is_file() and (out / "test_data.pkl").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(REPO_ROOT / "preprocess.py"), "--input", str(data_root), "--output-dir", str(out),
               "--image-size", str(size)]
    code, _, last = run_logged(command, out.parent / f"{out.name}.preprocess.log")
    if code != 0:
        raise RuntimeError(f"preprocess.py failed on {data_root} at {size} px (exit {code}): {last}")


# --------------------------------------------------------------------------- scoring
def read_probabilities(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, class names, probabilities) of a test_predictions.csv (or a one-hot labels CSV)."""
    with open(path, newline="", encoding="utf-8") as handle:
        header, *rows = [row for row in csv.reader(handle) if row]
    return [row[0] for row in rows], header[1:], np.array([[float(v) for v in row[1:]] for row in rows])


def score_predictions(predictions: Path, test_labels: Path) -> dict:
    """Log loss and accuracy of ``predictions`` against ``test_labels`` (matched by id and class name)."""
    label_ids, label_names, one_hot = read_probabilities(test_labels)
    ids, names, probs = read_probabilities(predictions)
    if sorted(names) != sorted(label_names):
        raise ValueError(f"{predictions}: classes {names} differ from {test_labels}'s {label_names}")
    row_of = {image_id: i for i, image_id in enumerate(ids)}
    missing = [image_id for image_id in label_ids if image_id not in row_of]
    if missing:
        raise ValueError(f"{predictions}: no prediction for {len(missing)} test ids, e.g. {missing[:3]}")
    aligned = probs[[row_of[image_id] for image_id in label_ids]][:, [names.index(n) for n in label_names]]
    labels = one_hot.argmax(axis=1)
    return {"logloss": metrics.log_loss(aligned, labels), "accuracy": metrics.accuracy(aligned, labels),
            "images": len(labels)}


def own_validation(model_dir: Path) -> float | None:
    """The row's own validation (or out-of-fold) log loss from its metrics.json, when it has one:
    after temperature scaling when the row fitted a temperature (on those same images)."""
    path = model_dir / "metrics.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    cv, calibration = data.get("cv") or {}, data.get("calibration") or {}
    calibrated = calibration.get("logloss_after") if calibration.get("temperature_scaling") else None
    for value in (calibrated, cv.get("logloss"), cv.get("cv_logloss"), cv.get("val_logloss"),
                  (data.get("best") or {}).get("val_logloss")):
        if isinstance(value, (int, float)):
            return float(value)
    return None


def write_prior(data_root: Path, out: Path) -> None:
    """test_predictions.csv giving every test id the class shares of train_labels.csv."""
    _, names, one_hot = read_probabilities(data_root / "train_labels.csv")
    ids, _, _ = read_probabilities(data_root / "test_labels.csv")
    shares = one_hot.mean(axis=0)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["id," + ",".join(names)] + [image_id + "," + ",".join(repr(float(s)) for s in shares) for image_id in ids]
    fileio.write_text(out / "test_predictions.csv", "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- the prototype's recipe
def prototype_run(data_dir: Path, out_dir: Path, args) -> None:
    """The prototype's recipe on ``data_dir``'s pickles (bench/train.py's emulation): writes
    test_predictions.csv and metrics.json (its own random-split validation) into ``out_dir``."""
    threads.limit_spin_wait()
    import torch
    from torch import nn

    from bench.train import RecipeSetting, resolve_device, resolve_precision, train_recipe
    from dss.train import engine, outputs
    from dss.data.dataset import load_split
    from dss.models.loader import DeviceImages
    from dss.train.split import random_split

    threads.apply(args.num_threads)
    device = resolve_device(args.device)
    train, test = load_split(data_dir, "train"), load_split(data_dir, "test")
    labels = np.asarray(train["labels"], dtype=np.int64)
    size = int(train["images"].shape[1])
    setting = RecipeSetting(args.epochs, size, args.seed, device, resolve_precision("auto", device)[0],
                            args.arch or "resnet18")
    run = train_recipe("prototype", train["images"], labels, len(train["class_names"]), setting)
    how = prediction.Inference(256, size, setting.amp_dtype)
    own = random_split(labels, 0.25, args.seed)  # the split the recipe chose its epoch on
    own_scores = engine.evaluate(run.model, DeviceImages(train["images"][own], device), labels[own],
                                 nn.CrossEntropyLoss(), how)
    probs = prediction.predict_probs(run.model, DeviceImages(test["images"], device), how)
    out_dir.mkdir(parents=True, exist_ok=True)
    results.write_probabilities(out_dir / "test_predictions.csv", {"id": list(test["ids"])}, probs,
                                train["class_names"])
    own_scores = {name: float(own_scores[name]) for name in ("val_loss", "val_acc", "val_logloss")}
    fileio.write_json(out_dir / "metrics.json", {"best": {"epoch": run.chosen_epoch, **own_scores},
                                                 "torch_threads": torch.get_num_threads()})


def prototype_command(data_dir: Path, out_dir: Path, args) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--prototype-run", str(data_dir), str(out_dir),
               "--epochs", str(args.epochs), "--seed", str(args.seed), "--device", args.device,
               "--num-threads", str(args.num_threads)]
    return command + (["--arch", args.arch] if args.arch else [])


# --------------------------------------------------------------------------- one table
def run_row(row: Row, data_root: Path, pickles: Path, run_dir: Path, args, available: set[str]) -> dict:
    """Train (or write) one row's predictions and score them on the held-out test labels."""
    if row.key == "prior":
        started = time.perf_counter()
        write_prior(data_root, run_dir)
        code, seconds, last = 0, time.perf_counter() - started, ""
    else:
        if row.key == "prototype":
            command, why = prototype_command(pickles, run_dir, args), ""
        else:
            command, why = row_command(row, pickles, run_dir, args, available)
        if command is None:
            return {"status": why}
        run_dir.mkdir(parents=True, exist_ok=True)
        code, seconds, last = run_logged(command, run_dir / "run.log")
    if code != 0:
        return {"status": f"failed (exit {code}): {last[:200]}", "seconds": seconds}
    scores = score_predictions(run_dir / "test_predictions.csv", data_root / "test_labels.csv")
    return {"status": "ok", **scores, "own_val_logloss": own_validation(run_dir), "seconds": seconds,
            "predictions": str(run_dir / "test_predictions.csv")}


def format_table(title: str, rows: list[Row]) -> list[str]:
    """One markdown table; the lowest test log loss in bold."""
    scored = [row.result["logloss"] for row in rows if row.result.get("status") == "ok" and row.key != "prior"]
    best = min(scored) if scored else None
    lines = [f"### {title}", "", "| recipe | test log loss | test accuracy | own val log loss | seconds |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        result = row.result
        if result.get("status") != "ok":
            lines.append(f"| {row.title} | {result.get('status', 'not run')} | | | |")
            continue
        loss = f"{result['logloss']:.4f}"
        own = "" if result["own_val_logloss"] is None else f"{result['own_val_logloss']:.4f}"
        lines.append(f"| {row.title} | {f'**{loss}**' if result['logloss'] == best else loss} | "
                     f"{result['accuracy']:.4f} | {own} | {result['seconds']:.1f} |")
    return lines + [""]


def machine_line(args) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() and args.device != "cpu" else ""
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, --num-threads {args.num_threads}{gpu}; "
            f"torch {torch.__version__}, python {platform.python_version()}")


def header_lines(args, argv, available: set[str]) -> list[str]:
    command = "python bench/recipe.py" + ("" if not argv else " " + shlex.join(argv))
    lines = ["# Recipe benchmark: held-out test log loss and accuracy", "",
             f"date: {datetime.datetime.now().isoformat(timespec='seconds')}  ",
             f"machine: {machine_line(args)}  ", f"command: `{command}`  ",
             f"every row: {args.epochs} epochs from scratch (--weights none), seed {args.seed}; scored on the "
             "data set's test split (its sites never seen in training) with test_labels.csv", "", "Rows:", ""]
    lines += [f"- {row.title}: {describe_flags(row, args, available)}" for row in make_rows(args)]
    return lines + [""]


def run_benchmark(args, argv, work: Path) -> tuple[str, dict]:
    """Every data set x size x row; returns (markdown, results for results.json)."""
    available = train_flags(subprocess.run([sys.executable, str(REPO_ROOT / "dss_train.py"), "--help"],
                                           capture_output=True, text=True, cwd=REPO_ROOT).stdout)
    lines, results = header_lines(args, argv, available), {"command": argv, "tables": []}
    for name in args.dataset_list:
        data_root = work / "data" / name
        try:
            info = prepare_dataset(name, data_root, args)
        except real_dataset.RealDataError as error:
            lines += [f"### {name}", "", f"not available: {error}", ""]
            results["tables"].append({"dataset": name, "status": f"not available: {error}"})
            continue
        for size in args.size_list:
            pickles = work / "pickles" / f"{name}-{size}"
            preprocess(data_root, pickles, size)
            rows = make_rows(args)
            for row in rows:
                row.result = run_row(row, data_root, pickles, work / "runs" / f"{name}-{size}" / row.key, args,
                                     available)
                print(f"{name} {size} px {row.key}: {row.result}", flush=True)
            title = (f"{name}, {size} px: {info['train']} train / {info['test']} test images ({info['source']})")
            lines += format_table(title, rows)
            results["tables"].append({"dataset": name, "size": size, "data_dir": str(data_root), **info,
                                      "rows": {row.key: {"title": row.title, **row.result} for row in rows}})
    return "\n".join(lines), results


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.prototype_run:
        prototype_run(Path(args.prototype_run[0]), Path(args.prototype_run[1]), args)
        return 0
    with tempfile.TemporaryDirectory(prefix="recipe-bench-") as temp:
        work = args.work_dir or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        table, results = run_benchmark(args, argv, work)
        fileio.write_json(work / "results.json", results)
    print(table)
    targets = [args.out] if args.out else []
    if args.save:
        targets.append(REPO_ROOT / "bench" / "results" / f"recipe-{datetime.date.today().isoformat()}.md")
    for path in targets:
        fileio.write_text(path, table + "\n")
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
