"""Pieces every exporter shares: the prediction-only wrapper, optional imports and the result record."""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn


class ExportError(RuntimeError):
    """An export that cannot be made or that came out wrong; the message says why and what to do."""


class MissingDependencyError(ImportError):
    """An optional package a format needs is not installed; the message names the pip package."""


def require(module: str, pip_name: str | None = None, purpose: str = "") -> ModuleType:
    """Import an optional package or raise MissingDependencyError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        what = f" for {purpose}" if purpose else ""
        raise MissingDependencyError(
            f"{module} is needed{what} but is not installed: pip install {pip_name or module}"
        ) from None


def is_installed(module: str) -> bool:
    """True when ``module`` imports (a failing import of an installed package counts as missing)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


class PredictionOnly(nn.Module):
    """Exported graph: float BCHW RGB 0..1 images -> decoded predictions (bs, N, 5 + nc) only.

    A DetectionModel in eval mode returns (pred, raw_maps); exports keep just ``pred`` (boxes
    xc, yc, w, h in input pixels, objectness and class scores sigmoided). Wrapping leaves the
    model and its classes untouched.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class ExportResult:
    """Outcome of one format: the file or folder written (None on failure), seconds taken, error."""

    format: str
    path: Path | None
    seconds: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.path is not None and not self.error

    @property
    def size_mb(self) -> float:
        return path_size(self.path) / 1e6 if self.path is not None else 0.0


def path_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Silence the tracer's warnings about shapes turned into constants and deprecations.

    The graphs are checked against PyTorch by the tests (at other batch sizes and image sizes for
    dynamic exports), so these notices carry no information for a user.
    """
    with warnings.catch_warnings():
        for category in (torch.jit.TracerWarning, FutureWarning, DeprecationWarning, UserWarning):
            warnings.simplefilter("ignore", category)
        yield


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise other libraries' loggers to at least ``level`` while the block runs."""
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, before):
            lg.setLevel(lvl)
