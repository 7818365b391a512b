"""Training checkpoints for resume (managed spot training, crashes, SIGTERM).

One checkpoint per save, in ``--checkpoint-dir`` (``/opt/ml/checkpoints`` under SageMaker):

    ckpt-e00003-s000000120.pt     torch.save of a dict of tensors and plain data
    ckpt-e00003-s000000120.json   manifest: sha256 and size of the .pt, epoch, step, fingerprint

The .pt is written atomically (temp + fsync + rename) and the manifest only after it,
so a checkpoint without a manifest, or whose bytes no longer match the manifest's sha256,
is incomplete or corrupt: ``CheckpointManager.load_latest`` then falls back to the
previous one and says so. Only the newest ``keep`` checkpoints are kept.

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

from dss import fileio

_NAME_RE = re.compile(r"^ckpt-e(?P<epoch>\d{5})-s(?P<step>\d{9})\.pt$")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint dir holds a run made with other data or incompatible settings."""


def dataset_fingerprint(images: np.ndarray, ids: list[str], labels: np.ndarray | None,
                        class_names: list[str], sites: list[str]) -> str:
    """sha256 over the pixels, ids, labels, class names and sites of a split (hex)."""
    digest = hashlib.sha256()
    digest.update(repr((images.shape, str(images.dtype))).encode())
    # Hash in 64 MiB slices so a multi-GB array is never copied whole.
    flat = np.ascontiguousarray(images).reshape(-1)
    step = 64 << 20
    for start in range(0, flat.size, step):
        digest.update(memoryview(flat[start:start + step]))
    digest.update(json.dumps([list(ids), list(class_names), list(sites)]).encode())
    if labels is not None:
        digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable lines for every setting that differs between two fingerprints."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            lines.append(f"{key}: checkpoint has {_short(saved.get(key))}, this run has {_short(current.get(key))}")
    return lines


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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

    def __init__(self, folder: str | Path, keep: int = 2, log: Callable[[str], None] = print):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.folder = Path(folder)
        self.keep = keep
        self.log = log

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
                    + f"\nUse a new --checkpoint-dir (or empty {self.folder}) to start fresh."
                )
            return state, path
        return None
