"""Named hooks for the training loop, and the logger that writes results.csv (and TensorBoard)."""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from utils.general import LOGGER

EVENTS = (
    "on_pretrain_routine_end",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_fit_epoch_end",
    "on_model_save",
    "on_train_end",
)

RESULT_KEYS = (
    "train/box_loss", "train/obj_loss", "train/cls_loss",
    "metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
    "val/box_loss", "val/obj_loss", "val/cls_loss",
    "x/lr0", "x/lr1", "x/lr2",
)  # fmt: skip


class Callbacks:
    """Register functions by event name and run them in order: callbacks.run('on_fit_epoch_end', ...)."""

    def __init__(self) -> None:
        self._hooks: dict[str, list[Callable[..., Any]]] = defaultdict(list)

    def register(self, event: str, fn: Callable[..., Any]) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown callback event {event!r}; valid: {', '.join(EVENTS)}")
        self._hooks[event].append(fn)

    def run(self, event: str, *args: Any, **kwargs: Any) -> None:
        for fn in self._hooks.get(event, []):
            fn(*args, **kwargs)


class ResultsLogger:
    """Append one results.csv row per epoch (YOLOv5 column names) and mirror to TensorBoard if present."""

    def __init__(self, save_dir: Path, tensorboard: bool = True) -> None:
        self.csv = save_dir / "results.csv"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(save_dir))
                LOGGER.info(f"TensorBoard: view with 'tensorboard --logdir {save_dir.parent}'")
            except ImportError:  # optional dependency
                self.tb = None

    def log_epoch(self, epoch: int, values: list[float]) -> None:
        row = dict(zip(RESULT_KEYS, values, strict=True))
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["epoch", *RESULT_KEYS])
            writer.writerow([epoch, *(f"{v:.5g}" for v in values)])
        if self.tb is not None:
            for k, v in row.items():
                self.tb.add_scalar(k, v, epoch)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
