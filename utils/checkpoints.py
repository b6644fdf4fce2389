"""Checkpoint format: plain tensors and Python values only, loadable with weights_only=True.

A checkpoint never stores a pickled model: it stores the model YAML (a dict) and state dicts, and the
model is rebuilt from the YAML. Files are written atomically, so a crash or a full disk while saving
never damages the previous checkpoint.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from utils.general import LOGGER

FORMAT_VERSION = "1"


class CheckpointError(RuntimeError):
    """A file that is not a loadable checkpoint of this project (or that would run code if unpickled)."""


def _plain(value: Any) -> Any:
    """Paths and other objects as strings, containers recursively, so weights_only loading works."""
    if isinstance(value, dict):
        return {(k if isinstance(k, (str, int)) else str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    return str(value)


def build_checkpoint(
    model,
    *,
    ema=None,
    optimizer=None,
    epoch: int = -1,
    best_fitness: float = 0.0,
    train_args: dict | None = None,
    hyp: dict | None = None,
    updates: int = 0,
) -> dict[str, Any]:
    """Checkpoint dict for a DetectionModel (and optionally its EMA copy and optimizer)."""
    return {
        "version": FORMAT_VERSION,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "epoch": int(epoch),
        "best_fitness": float(best_fitness),
        "model_yaml": _plain(dict(model.yaml)),
        "model": {
            k: v.detach().float() if v.is_floating_point() else v for k, v in model.state_dict().items()
        },
        "ema": None if ema is None else {k: v.detach().clone() for k, v in ema.state_dict().items()},
        "updates": int(updates),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "names": {int(k): str(v) for k, v in dict(model.names).items()},
        "nc": int(model.nc),
        "stride": [float(s) for s in model.stride],
        "train_args": _plain(train_args or {}),
        "hyp": _plain(hyp or {}),
    }


def for_inference(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A training checkpoint as a finished one: the EMA weights (when kept) as the model, no optimizer
    state. A third of the size; still loads for inference, fine-tuning and as a ``--resume`` start."""
    return {**ckpt, "model": ckpt.get("ema") or ckpt["model"], "ema": None, "optimizer": None, "updates": 0}


def resume_epoch(ckpt: dict[str, Any], epochs: int, path: str | Path) -> int:
    """The epoch a run resumed from ``ckpt`` starts at; ValueError where all ``epochs`` are done."""
    start = int(ckpt.get("epoch", -1)) + 1
    if start >= epochs:
        raise ValueError(
            f"{path} finished {epochs} epochs already; nothing to resume. Start a new run with --weights {path}"
        )
    return start


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a temp file in the same folder, fsync, then rename over the target.

    A crash or a full disk at any moment leaves either the old or the new file, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _new_file_mode())  # mkstemp makes it owner-only; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _remove_stale_temps(path, older_than=started)


def _new_file_mode() -> int:
    """The permissions open() would give a new file under this process's umask (0o644 under 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _remove_stale_temps(path: Path, older_than: float) -> None:
    """Delete temp files of ``path`` that a killed process left behind (SIGKILL skips all cleanup)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if stale.stat().st_mtime < older_than:
                stale.unlink()
        except OSError:
            pass  # removed meanwhile, or not ours to remove


def _unpickle_needs(torch_message: str) -> str:
    """What a refused pickle asked for, from torch's weights_only error (which also advises turning the
    check off: that advice is dropped here on purpose)."""
    found = re.search(r"GLOBAL ([\w.]+)", torch_message)
    if found:
        return f"call or import {found.group(1)}"
    op = re.search(r"Unsupported operand (\d+)", torch_message)
    return f"run pickle opcode {op.group(1)}, which plain tensors never need" if op else "run code"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; anything needing code to unpickle is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load. It is not a checkpoint of this project: unpickling it would "
            f"{_unpickle_needs(str(e))}. Nothing from it was run. Only checkpoints written by this project "
            "(train.py, save_checkpoint) load; YOLOv5/ultralytics .pt files pickle whole models and do not."
        ) from None
    except Exception as e:  # whatever a damaged or foreign file makes torch raise
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model_yaml" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no model_yaml/model entries)")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any] | str | Path, device: str | torch.device = "cpu",
                          use_ema: bool = True, fuse: bool = False):  # fmt: skip
    """Rebuild the DetectionModel of a checkpoint (EMA weights when present) in eval mode."""
    from models.yolo import DetectionModel  # models depend on utils, not the other way round

    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    model = DetectionModel(ckpt["model_yaml"], verbose=False)
    state = ckpt["ema"] if use_ema and ckpt.get("ema") else ckpt["model"]
    model.load_state_dict(state)
    model.names = {int(k): v for k, v in ckpt.get("names", model.names).items()}
    model.to(device).eval()
    if fuse:
        model.fuse()
    LOGGER.debug(f"loaded checkpoint epoch {ckpt.get('epoch')} ({len(state)} tensors)")
    return model
