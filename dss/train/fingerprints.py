"""Checkpoint fingerprints compared: what differs between the run that made a checkpoint and this
one, in lines a user reads, and what to do about it (start fresh, finish the earlier run, fine-tune
from its model, resume on the device or in the memory mode that made it). Also ``saved_setting``:
a fingerprint value of the newest checkpoint, read before the data loads.
"""

from __future__ import annotations

import json
from pathlib import Path


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable lines for every setting that differs between two fingerprints."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            lines.append(f"{key}: checkpoint has {_short(saved.get(key))}, this run has {_short(current.get(key))}")
    return lines


def mismatch_advice(saved: dict, fingerprint: dict, folder: Path, model_path: Path | None = None) -> str:
    """What to do about the checkpoint ``saved`` that this run (``fingerprint``) cannot continue.
    Another --epochs gets its own advice: the learning-rate schedule spans the run's --epochs, so a
    run cannot be extended; its model can be fine-tuned further. Another device, precision or
    memory mode names the flag or machine that resumes it."""
    fresh = f"Use a new --checkpoint-dir (or empty {folder}) to start fresh."
    before = saved.get("fingerprint", {})
    advice = [_machine_advice(before, fingerprint)]
    saved_epochs, epochs = before.get("epochs"), fingerprint.get("epochs")
    if saved_epochs is not None and saved_epochs != epochs:
        advice.append(_epochs_advice(saved, saved_epochs, epochs, model_path))
    advice = [line for line in advice if line]
    return " ".join(advice + [("Or: " if advice else "") + fresh])


def _machine_advice(before: dict, now: dict) -> str:
    """How to resume a checkpoint made on another device, in another precision or memory mode."""
    lines = []
    if (before.get("device"), before.get("precision")) != (now.get("device"), now.get("precision")):
        lines.append(f"The checkpoint was made on {before.get('device')} in {before.get('precision')}, this run is "
                     f"on {now.get('device')} in {now.get('precision')}: resume it on a machine like the one that "
                     f"made it (--device {before.get('device')}).")
    if before.get("data_in_memory") not in (None, now.get("data_in_memory")):
        how = ("--data-in-memory stream" if before["data_in_memory"] == "stream"
               else "--data-in-memory device or host")
        lines.append(f"The checkpoint drew its batches as {how} does (another batch order): re-run with {how}, or "
                     "--data-in-memory auto, which resumes in the checkpoint's mode.")
    return " ".join(lines)


def _epochs_advice(saved: dict, saved_epochs: int, epochs: int, model_path: Path | None) -> str:
    done = int(saved.get("epoch", 0))
    weights = (f"--weights {model_path}" if model_path is not None and Path(model_path).is_file()
               else "--weights <that run's model.pth>")
    if done >= saved_epochs or saved.get("early_stopped"):
        return (f"That run finished ({done} epochs) and its learning-rate schedule ended with them, so it cannot be "
                f"extended to --epochs {epochs}. To train its model further, fine-tune from it: {weights} with a new "
                f"--checkpoint-dir (a new warm-up and schedule over --epochs {epochs}).")
    return (f"That run stopped after {done} of its {saved_epochs} epochs: re-run with --epochs {saved_epochs} to "
            f"finish it (then fine-tune from it with {weights} and a new --checkpoint-dir to train longer).")


def saved_setting(folder: Path | None, name: str):
    """The fingerprint value ``name`` of the newest checkpoint manifest in ``folder`` or its
    ``fold-<k>`` folders (None when there is none): read before the data loads, so a run resumes
    as its checkpoints were made (e.g. the memory mode that decides the batch order)."""
    if folder is None or not Path(folder).is_dir():
        return None
    manifests = [path for pattern in ("ckpt-*.json", "fold-*/ckpt-*.json") for path in Path(folder).glob(pattern)]
    for path in sorted(manifests, key=lambda path: path.stat().st_mtime, reverse=True):
        try:
            return json.loads(path.read_text(encoding="utf-8"))["fingerprint"].get(name)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # an unreadable manifest is skipped here as load_latest skips it
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
