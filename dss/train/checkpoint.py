"""Training checkpoints for resume (managed spot training, crashes, SIGTERM).

``TrainingState`` is what a run has learnt and where it stands (model, optimizer, scheduler,
scaler, random streams, history, best epoch, counters), with ``state_dict()`` and
``load_state_dict()``; ``RunCheckpoints`` resumes a run from the newest checkpoint and saves new
ones (rank 0 only under DDP).

One checkpoint per save, in ``--checkpoint-dir`` (``/opt/ml/checkpoints`` under SageMaker):

    ckpt-e00003-s000000120.pt     torch.save of a dict of tensors and plain data
    ckpt-e00003-s000000120.json   manifest: sha256 and size of the .pt, epoch, step, fingerprint

The .pt is written atomically (temp + fsync + rename) and the manifest only after it,
so a checkpoint without a manifest, or whose bytes no longer match the manifest's sha256,
is incomplete or corrupt: ``CheckpointManager.load_latest`` then falls back to the
previous one and says so. Only the newest ``keep`` checkpoints are kept (dss_train.py
``--keep-checkpoints``, default 1): older ones are deleted only once the new one and its manifest
are complete, so a run killed while saving still leaves the previous one.

Everything is loaded with ``torch.load(weights_only=True)``: numpy and Python RNG states
are therefore stored as tensors and lists, never as pickled objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dss import distributed, fileio
from dss.train.fingerprints import fingerprint_differences, mismatch_advice
from dss.cli import log

_NAME_RE = re.compile(r"^ckpt-e(?P<epoch>\d{5})-s(?P<step>\d{9})\.pt$")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint dir holds a run made with other data or incompatible settings."""


# --------------------------------------------------------------------------- RNG state
def capture_rng_state(generator: torch.Generator | None) -> dict:
    """Every random stream a run draws from, as tensors/lists (weights_only-loadable)."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": {
            "name": numpy_state[0],
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": {"version": python_state[0], "internal": list(python_state[1]), "gauss": python_state[2]},
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
        state["generator_device"] = str(generator.device)
    return state


def restore_rng_state(state: dict, generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch_cpu"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss"]))
    if state["torch_cuda"] and torch.cuda.is_available() and len(state["torch_cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


# --------------------------------------------------------------------------- files
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_name(epoch: int, step: int) -> str:
    """``ckpt-e00003-s000000120.pt``: epochs completed (or in progress) and the global step."""
    return f"ckpt-e{epoch:05d}-s{step:09d}.pt"


class CheckpointManager:
    """Save, prune and load checkpoints in one folder.

    ``log`` receives one-line messages (fallbacks, refusals); default ``print``.
    """

    def __init__(self, folder: str | Path, keep: int = 2, log: Callable[[str], None] = print,
                 model_path: Path | None = None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.folder = Path(folder)
        self.keep = keep
        self.log = log
        self.model_path = model_path  # the run's model.pth, named when a refusal suggests fine-tuning

    # ----------------------------------------------------------------- save
    def save(self, state: dict, epoch: int, step: int, fingerprint: dict) -> Path:
        """Write ``state`` (tensors and plain data only) atomically, then its manifest; prune old ones."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fileio.sweep_stale(self.folder)
        payload = dict(state, fingerprint=fingerprint, epoch=epoch, step=step)
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
        path = self.folder / checkpoint_name(epoch, step)
        fileio.write_bytes(path, data)
        manifest = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                    "epoch": epoch, "step": step, "fingerprint": fingerprint}
        fileio.write_json(path.with_suffix(".json"), manifest)
        self._prune()
        return path

    def _candidates(self) -> list[tuple[int, int, Path]]:
        found = []
        if not self.folder.is_dir():
            return found
        for entry in self.folder.iterdir():
            match = _NAME_RE.match(entry.name)
            if match:
                found.append((int(match.group("epoch")), int(match.group("step")), entry))
        return sorted(found, reverse=True)

    def _prune(self) -> None:
        for _, _, path in self._candidates()[self.keep:]:
            # Manifest first: a checkpoint without one is ignored, never half-trusted.
            with contextlib.suppress(OSError):
                path.with_suffix(".json").unlink()
            with contextlib.suppress(OSError):
                path.unlink()

    # ----------------------------------------------------------------- load
    def _verify(self, path: Path) -> str | None:
        """None when the checkpoint matches its manifest, else the reason it is unusable."""
        manifest_path = path.with_suffix(".json")
        if not manifest_path.is_file():
            return "no manifest (the save did not finish)"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            expected = manifest["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"unreadable manifest {manifest_path.name} ({exc})"
        actual = _sha256_file(path)
        if actual != expected:
            return f"sha256 mismatch (file {actual[:12]}..., manifest {expected[:12]}...)"
        return None

    def load_latest(self, fingerprint: dict, map_location="cpu") -> tuple[dict, Path] | None:
        """The newest valid checkpoint as ``(state, path)``, or None when there is none.

        Corrupt or incomplete checkpoints are skipped with a log line. A valid checkpoint whose
        fingerprint differs from ``fingerprint`` raises CheckpointMismatchError naming what differs.
        """
        for _, _, path in self._candidates():
            problem = self._verify(path)
            if problem is None:
                try:
                    state = torch.load(path, map_location=map_location, weights_only=True)
                except Exception as exc:  # noqa: BLE001 - any load failure means: try the previous one
                    problem = f"cannot be loaded ({type(exc).__name__}: {exc})"
            if problem is not None:
                self.log(f"checkpoint {path} skipped: {problem}; trying the previous one")
                continue
            differences = fingerprint_differences(state.get("fingerprint", {}), fingerprint)
            if differences:
                raise CheckpointMismatchError(
                    f"checkpoint {path} was made by an incompatible run:\n  " + "\n  ".join(differences)
                    + "\n" + mismatch_advice(state, fingerprint, self.folder, self.model_path))
            return state, path
        return None


# --------------------------------------------------------------------------- a run's state
class TrainingState:
    """Where a training run stands and what it has learnt: what a checkpoint holds, with
    ``state_dict()`` / ``load_state_dict()`` as torch modules have them.

    ``model`` is the plain module (not a torch.compile or DDP wrapper, which share its
    parameters), so its state dict names stay plain. Counters: ``epoch`` epochs finished,
    ``step_in_epoch`` batches of the next epoch already trained (non-zero only after a stop
    mid-epoch), ``step`` optimizer steps of the whole run. ``best``: the best epoch's scores,
    per-class report and confusion matrix; ``best_model`` its weights (a CPU copy) and
    ``best_val_probs`` its validation probabilities, float64 (N_val, C). ``ema``: a
    ``dss.train.ema.WeightEMA`` (``--ema-decay``) or None; when set, its averaged weights are the ones
    evaluated and kept as ``best_model``, and its state is part of the checkpoint.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler,
                 generator: torch.Generator, ema=None, best_by: str = "val_logloss"):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.generator, self.ema, self.best_by = generator, ema, best_by
        self.history: list[dict] = []
        self.best: dict | None = None
        self.best_model: dict | None = None
        self.best_val_probs: np.ndarray | None = None
        self.epoch = self.step_in_epoch = self.step = 0
        self.early_stopped = False
        # Running sums of an epoch stopped by SIGTERM and resumed (it is trained in two parts).
        self.partial_epoch: dict | None = None
        # The random streams as they were when the running epoch began: a checkpoint saved mid-epoch
        # must let the resumed run redraw this epoch's batch order and augmentation.
        self._epoch_start_rng: dict | None = None
        # The MLflow run this training run logs to (dss.train.tracking), so a resumed run continues it.
        self.tracking_run_id: str | None = None

    def state_dict(self) -> dict:
        """Tensors and plain data only (``torch.load(weights_only=True)`` reads it back)."""
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": self._epoch_start_rng if self._epoch_start_rng is not None else capture_rng_state(self.generator),
            "history": self.history, "best": self.best, "best_model": self.best_model,
            "best_val_probs": torch.from_numpy(self.best_val_probs) if self.best_val_probs is not None else None,
            "step_in_epoch": self.step_in_epoch, "early_stopped": self.early_stopped,
            "partial_epoch": self.partial_epoch, "epoch": self.epoch, "step": self.step,
            "tracking_run_id": self.tracking_run_id, "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"], self.generator)
        self.history = list(state["history"])
        self.best, self.best_model = state["best"], state["best_model"]
        self.best_val_probs = state["best_val_probs"].numpy() if state["best_val_probs"] is not None else None
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.step, self.early_stopped = int(state["step"]), bool(state["early_stopped"])
        self.partial_epoch = state["partial_epoch"]
        self.tracking_run_id = state.get("tracking_run_id")  # absent in checkpoints of earlier versions
        if self.ema is not None:  # the fingerprint (ema_decay) guarantees the checkpoint has one
            self.ema.load_state_dict(state["ema"])

    def evaluated(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network that is evaluated and kept: the EMA's averaged copy when there is one, else ``model``."""
        return self.ema.module if self.ema is not None else model

    @property
    def position(self) -> str:
        """Where a resumed run goes on, for the log."""
        return f"epoch {self.epoch + 1} step {self.step_in_epoch}" if self.step_in_epoch else f"end of epoch {self.epoch}"

    @property
    def epochs_without_improvement(self) -> int:
        return self.history[-1]["epoch"] - self.best["epoch"] if self.history and self.best else 0

    def begin_epoch(self) -> None:
        # After a mid-epoch resume the generator is back at this epoch's start, as saved.
        self._epoch_start_rng = capture_rng_state(self.generator)

    def add_epoch_part(self, stats: dict) -> None:
        """Count a pass of ``engine.train_one_epoch`` (the whole epoch, or the part before a stop)."""
        steps, images = int(stats["steps"]), int(stats["images"])
        self.step += steps
        self.step_in_epoch += steps
        partial = self.partial_epoch or {"loss_sum": 0.0, "correct": 0, "images": 0, "seconds": 0.0}
        self.partial_epoch = {"loss_sum": partial["loss_sum"] + float(stats["train_loss"]) * images,
                              "correct": partial["correct"] + int(round(float(stats["train_acc"]) * images)),
                              "images": partial["images"] + images,
                              "seconds": partial["seconds"] + float(stats["seconds"])}

    def finish_epoch(self) -> dict:
        """The epoch's train_loss, train_acc and train_images_per_s over all its parts (as in an
        uninterrupted run); the epoch then counts as finished."""
        parts = self.partial_epoch
        images = max(parts["images"], 1)
        stats = {"train_loss": parts["loss_sum"] / images, "train_acc": parts["correct"] / images,
                 "train_images_per_s": parts["images"] / parts["seconds"] if parts["seconds"] > 0 else 0.0}
        self.epoch += 1
        self.step_in_epoch, self.partial_epoch, self._epoch_start_rng = 0, None, None
        return stats

    def record_epoch(self, record: dict, val_probs: np.ndarray, confusion: np.ndarray) -> bool:
        """Append the epoch's ``record`` to the history; keep it as the best when its ``best_by``
        field (val_logloss, or val_logloss_calibrated) is lower than every earlier epoch's. Returns
        whether it is the new best."""
        self.history.append(record)
        improved = self.best is None or record[self.best_by] < self.best[self.best_by]
        if improved:
            kept = ("epoch", "val_loss", "val_logloss", "val_logloss_calibrated", "val_acc", "per_class")
            self.best = {key: record[key] for key in kept if key in record}
            self.best["confusion_matrix"] = np.asarray(confusion).tolist()
            self.best_model = {name: tensor.detach().to("cpu", copy=True)
                               for name, tensor in self.evaluated(self.model).state_dict().items()}
            self.best_val_probs = np.asarray(val_probs, dtype=np.float64)
        return improved


class RunCheckpoints:
    """One run's checkpoints in ``folder`` (None: this run keeps none): resume from the newest valid
    one, save at the end of each epoch and when SIGTERM stops a run. Only rank 0 reads and writes
    the files (other nodes may not see its disk): it sends what it read to every rank, and the
    others wait at a barrier while it writes."""

    def __init__(self, folder: Path | None, fingerprint: dict, context: distributed.Context, keep: int = 1,
                 model_path: Path | None = None):
        self.folder, self.fingerprint, self.context = folder, fingerprint, context
        self.manager = (CheckpointManager(folder, keep=keep, log=log.info, model_path=model_path)
                        if folder is not None else None)

    @property
    def enabled(self) -> bool:
        return self.manager is not None

    def resume(self, state: TrainingState) -> Path | None:
        """Load the newest checkpoint into ``state``; returns its path, or None (a fresh start)."""
        if self.manager is None:
            return None
        found = self.manager.load_latest(self.fingerprint, map_location="cpu") if self.context.is_main else None
        found = distributed.broadcast_from_main(self.context, found)
        if found is None:
            log.info(f"no checkpoint in {self.folder}: starting fresh")
            return None
        saved, path = found
        state.load_state_dict(saved)
        log.info(f"resuming from {path} ({state.position}, {len(state.history)} epochs of history)")
        return path

    def save(self, state: TrainingState) -> None:
        if self.manager is None:
            return
        if self.context.is_main:
            path = self.manager.save(state.state_dict(), state.epoch, state.step, self.fingerprint)
            log.info(f"checkpoint saved: {path}")
        distributed.barrier(self.context)
