"""Earlier training runs in a model dir are never lost: when a run with other settings or data
publishes into a model dir that holds another run, that run's model, config.json and outputs move
into ``<model dir>/previous/<its run id>/`` first (its outputs into ``<output dir>/previous/<run
id>/`` when the output dir is elsewhere), with the weekly predictions it made
(``<model dir>/predictions/``). The newest ``--keep-previous`` runs are kept there.

A run is identified by config.json's ``run_key``: sha256 of the data and every setting that
changes results. A re-run of the same settings on the same data (e.g. a resumed run) has the same
key and replaces its own files. A model.pth without a readable config.json (a run of an earlier
version) counts as another run: it is moved, never replaced. Files of a run's names without a
model.pth beside them are not a run, and are left to be replaced as before. Pruning deletes only
folders named as run ids, never other folders a user keeps in ``previous/``.

Each moved folder is a model dir of its own: ``dss_train.py --predict-only --model-dir
<model dir>/previous/<run id>`` serves the earlier model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from dss import fileio
from dss.cli import log

PREVIOUS_DIR = "previous"
PREDICTIONS_DIR = "predictions"  # --predict-only's default folders, made by the model beside them
CONFIG = "config.json"
MODEL = "model.pth"  # its presence makes a folder's files a run
# The folders ``set_aside`` names: run id (or start time + "-unknown"), then "-2", "-3" on a clash.
RUN_FOLDER = re.compile(r"^\d{8}-\d{6}-([0-9a-f]{6}|unknown)(-\d+)?$")


def run_key(data_sha256: str, recipe: dict) -> str:
    """sha256 (hex) of the data and the settings that change results: equal keys, equal results."""
    text = json.dumps({"data_sha256": data_sha256, "recipe": recipe}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def new_run_id(key: str, now: float | None = None) -> str:
    """``20261208-031502-ab12cd``: the UTC start time, then the key's first 6 hex digits (sorts by time)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + key[:6]


def _earlier_config(model_dir: Path) -> dict:
    try:
        config = json.loads((model_dir / CONFIG).read_text(encoding="utf-8"))
        return config if isinstance(config, dict) else {}
    except (OSError, ValueError):
        return {}


def _present(model_dir: Path, output_dir: Path, model_files: tuple[str, ...],
             output_files: tuple[str, ...]) -> list[tuple[Path, str]]:
    """(path, where it goes: 'model' or 'output') of every file or folder of a run found."""
    found = [(model_dir / name, "model") for name in model_files + (PREDICTIONS_DIR,)]
    found += [(output_dir / name, "output") for name in output_files]
    return [(path, side) for path, side in dict(found).items() if path.exists() or path.is_symlink()]


def _earlier_run_id(config: dict, present: list[tuple[Path, str]]) -> str:
    run_id = config.get("run_id")
    if isinstance(run_id, str) and run_id and os.sep not in run_id and run_id not in (".", ".."):
        return run_id
    # A run without a recorded id: its newest file's time, which sorts it among the others.
    newest = max(path.lstat().st_mtime for path, _ in present)
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(newest)) + "-unknown"


def _free_folder(parent: Path, name: str) -> Path:
    candidate, number = parent / name, 2
    while candidate.exists():
        candidate, number = parent / f"{name}-{number}", number + 1
    return candidate


def set_aside(model_dir: Path, output_dir: Path, key: str, model_files: tuple[str, ...],
              output_files: tuple[str, ...]) -> list[Path]:
    """Move the run in ``model_dir``/``output_dir`` (its ``model_files``, ``output_files`` and
    predictions folder) into ``previous/<run id>/`` unless it has this run's ``key``. Returns the
    folders it moved them to (model dir's first; empty: nothing moved); ``prune`` them after the
    new run is published."""
    present = _present(model_dir, output_dir, model_files, output_files)
    config = _earlier_config(model_dir)
    if not (model_dir / MODEL).is_file() or config.get("run_key") == key:
        return []  # no earlier model, or this run's own files (same data and settings): replaced
    run_id = _earlier_run_id(config, present)
    targets = {"model": _free_folder(model_dir / PREVIOUS_DIR, run_id)}
    targets["output"] = (targets["model"] if output_dir.resolve() == model_dir.resolve()
                         else _free_folder(output_dir / PREVIOUS_DIR, run_id))
    for path, side in present:
        targets[side].mkdir(parents=True, exist_ok=True)
        os.replace(path, targets[side] / path.name)
    for folder in {*targets.values(), model_dir, output_dir}:
        fileio.fsync_folder(folder)
    names = ", ".join(path.name for path, _ in present)
    log.info(f"the earlier run in {model_dir} (run id {run_id}; other settings or data) was moved to {targets['model']}"
             + (f" (its outputs to {targets['output']})" if targets["output"] != targets["model"] else "")
             + f": {names}. Its model serves with --predict-only --model-dir {targets['model']}")
    return [folder for folder in dict.fromkeys((targets["model"], targets["output"])) if folder.is_dir()]


def prune(moved: list[Path], keep: int) -> list[Path]:
    """In the ``previous/`` folders of the run folders ``set_aside`` made, delete all but the newest
    ``keep`` runs (run ids sort by start time). Returns the folders deleted."""
    removed = []
    for previous_dir in dict.fromkeys(folder.parent for folder in moved):
        removed += _prune_folder(previous_dir, keep)
    return removed


def _prune_folder(previous_dir: Path, keep: int) -> list[Path]:
    runs = sorted((entry for entry in previous_dir.iterdir() if entry.is_dir() and RUN_FOLDER.match(entry.name)),
                  key=lambda entry: entry.name)
    removed = runs[:max(len(runs) - keep, 0)]
    for folder in removed:
        shutil.rmtree(folder)
        log.info(f"deleted the earlier run {folder} (--keep-previous {keep} keeps the newest {keep})")
    return removed
