"""Shared test fixtures: a tiny YOLO-format dataset factory, a tiny checkpoint factory and log capture.

Everything is generated in pytest's tmp folders; nothing is downloaded and nothing is written inside
the repository.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from utils.checkpoints import build_checkpoint, save_checkpoint
from utils.general import LOGGER

ROOT = Path(__file__).resolve().parents[1]
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread for the tests' tiny tensors: on a 2-core machine with anything else running,
    torch's thread pool spins against it (measured: a 1-epoch yolov5n run at 64 px took 15 s with 2
    threads and 0.5 s with 1)."""
    torch.set_num_threads(1)


TINY_NAMES = {0: "red", 1: "blue"}
_COLORS_BGR = ((40, 40, 230), (230, 60, 40), (40, 200, 40))


def write_sample(images: Path, labels: Path, stem: str, rng: np.random.Generator, nc: int = 2,
                 size: tuple[int, int] = (64, 80)) -> tuple[Path, Path]:  # fmt: skip
    """One grey (h, w) PNG with 1-3 filled rectangles and its label file; returns (image, label)."""
    h, w = size
    im = np.full((h, w, 3), 114, np.uint8)
    rows = []
    for _ in range(int(rng.integers(1, 4))):
        c = int(rng.integers(0, nc))
        bw, bh = int(rng.integers(12, w // 2)), int(rng.integers(12, h // 2))
        x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        cv2.rectangle(im, (x1, y1), (x1 + bw - 1, y1 + bh - 1), _COLORS_BGR[c % len(_COLORS_BGR)], -1)
        rows.append(f"{c} {(x1 + bw / 2) / w:.6f} {(y1 + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
    image, label = images / f"{stem}.png", labels / f"{stem}.txt"
    cv2.imwrite(str(image), im)
    label.write_text("\n".join(rows) + "\n")
    return image, label


@dataclass
class TinyDataset:
    """Paths of a generated dataset: root/images/{train,val}, root/labels/{train,val}, root/data.yaml."""

    root: Path
    yaml: Path

    def images(self, split: str = "train") -> Path:
        return self.root / "images" / split

    def labels(self, split: str = "train") -> Path:
        return self.root / "labels" / split


def make_tiny_dataset(root: Path, n_train: int = 4, n_val: int = 2, nc: int = 2, seed: int = 0,
                      yaml_extra: str = "") -> TinyDataset:  # fmt: skip
    """A YOLO dataset of small PNGs under ``root`` with a data YAML (names red, blue[, green])."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        images, labels = root / "images" / split, root / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_sample(images, labels, f"{split}{i}", rng, nc)
    names = ["red", "blue", "green"][:nc] if nc <= 3 else [f"c{i}" for i in range(nc)]
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: {names}\n{yaml_extra}")
    return TinyDataset(root, yaml)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Callable[..., TinyDataset]:
    """Factory: ``tiny_dataset(name='data', **make_tiny_dataset kwargs)`` -> TinyDataset in tmp_path/name."""

    def factory(name: str = "data", **kwargs) -> TinyDataset:
        return make_tiny_dataset(tmp_path / name, **kwargs)

    return factory


def make_tiny_checkpoint(path: Path, nc: int = 2, cfg: str = "yolov5n.yaml", epoch: int = -1,
                         train_args: dict | None = None) -> Path:  # fmt: skip
    """An untrained ``cfg`` model with ``nc`` classes saved as a checkpoint of this project."""
    from models.yolo import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=nc, verbose=False)
    model.names = {i: TINY_NAMES.get(i, f"c{i}") for i in range(nc)}
    save_checkpoint(build_checkpoint(model.eval(), epoch=epoch, train_args=train_args), path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """One untrained 2-class yolov5n checkpoint for the session (copy it before changing it)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_n.pt")


@pytest.fixture
def project_log() -> Iterator[list[str]]:
    """Lines logged to the project logger during the test (level and handlers restored afterwards)."""
    lines: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.extend(record.getMessage().splitlines())

    handler, level = ListHandler(), LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)


@dataclass
class CliResult:
    argv: list[str]
    returncode: int
    output: str  # stdout and stderr together


def run_scripts(commands: Sequence[Sequence[str]], timeout: float = 120, cwd: Path = ROOT,
                parallel: int = 3) -> list[CliResult]:  # fmt: skip
    """Run ``python <script> args...`` commands, a few at a time (start-up is mostly imports)."""
    results: list[CliResult | None] = [None] * len(commands)
    pending = list(enumerate(commands))
    running: list[tuple[int, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < parallel:
            i, argv = pending.pop(0)
            proc = subprocess.Popen([sys.executable, *argv], cwd=cwd, stdout=subprocess.PIPE, text=True,
                                    stderr=subprocess.STDOUT, env={**os.environ, **SINGLE_THREAD_ENV})  # fmt: skip
            running.append((i, proc))
        i, proc = running.pop(0)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += f"\n<timed out after {timeout} s>"
        results[i] = CliResult(list(commands[i]), proc.returncode, out)
    return [r for r in results if r is not None]
