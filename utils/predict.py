"""Prediction steps shared by detect.py and the Python API: tensors in, NMS, boxes back to the image.

Both callers letterbox with ``utils.sources.prepare_image`` and then run ``to_tensor`` ->
model -> ``postprocess``, so the same image at the same size gives the same boxes either way.
"""

from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from utils.boxes import non_max_suppression, scale_boxes, xyxy2xywhn


@dataclass
class NMSConfig:
    """Thresholds for turning raw predictions into detections (defaults are detect.py's)."""

    conf_thres: float = 0.25
    iou_thres: float = 0.45
    classes: Sequence[int] | None = None
    agnostic: bool = False
    multi_label: bool = False
    max_det: int = 1000


class Timer:
    """Accumulating wall-clock timer (synchronises CUDA so GPU work is counted where it happens)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.total = 0.0  # seconds
        self.last = 0.0
        self._start = 0.0

    def __enter__(self) -> Timer:
        self._start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.last = self._now() - self._start
        self.total += self.last

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def to_tensor(im: np.ndarray, device: torch.device | str, half: bool = False) -> torch.Tensor:
    """Letterboxed uint8 CHW or BCHW RGB -> float BCHW on ``device`` scaled to 0..1 (fp16 when half)."""
    t = torch.from_numpy(np.ascontiguousarray(im)).to(device)
    t = t.half() if half else t.float()
    t /= 255
    return t[None] if t.ndim == 3 else t


def postprocess(pred: torch.Tensor, input_shape: Sequence[int], original_shapes: Sequence[Sequence[int]],
                cfg: NMSConfig) -> list[torch.Tensor]:  # fmt: skip
    """NMS, then boxes from model-input pixels to each original image.

    Args:
        pred: (B, N, 5 + nc) decoded predictions in input pixels.
        input_shape: (h, w) of the letterboxed model input.
        original_shapes: per image (h0, w0, ...) of the original frame.

    Returns:
        per image a float32 CPU tensor (k, 6) ``[x1, y1, x2, y2, conf, cls]`` in original pixels.
    """
    dets = non_max_suppression(pred, cfg.conf_thres, cfg.iou_thres, cfg.classes, cfg.agnostic,
                               cfg.multi_label, max_det=cfg.max_det)  # fmt: skip
    out = []
    for det, shape in zip(dets, original_shapes):
        det = det.detach().float().cpu()
        if len(det):
            det[:, :4] = scale_boxes(input_shape, det[:, :4], shape[:2]).round()
        out.append(det)
    return out


def describe(det: torch.Tensor, names: Mapping[int, str]) -> str:
    """'2 circles, 1 square, ' style counts per class (empty for no detections)."""
    if not len(det):
        return ""
    classes, counts = det[:, 5].int().unique(return_counts=True)
    parts = []
    for c, n in zip(classes.tolist(), counts.tolist()):
        name = names.get(c, str(c))
        parts.append(f"{n} {plural(name) if n > 1 else name}, ")
    return "".join(parts)


def plural(noun: str) -> str:
    """English plural of a class name: 'cross' -> 'crosses', 'box' -> 'boxes', 'circle' -> 'circles'."""
    return noun + ("es" if noun.endswith(("s", "x", "z", "ch", "sh")) else "s")


def label_text(cls: int, conf: float, names: Mapping[int, str], hide_labels: bool = False,
               hide_conf: bool = False) -> str:  # fmt: skip
    """Tag text for one box: '' with hide_labels, else the name and (unless hide_conf) the confidence."""
    if hide_labels:
        return ""
    name = names.get(cls, str(cls))
    return name if hide_conf else f"{name} {conf:.2f}"


def tag_font_size(shape: Sequence[int]) -> int:
    """Box-tag text height in pixels for an (h, w) image: 3.5% of its mean side, at least 10."""
    return max(round((shape[0] + shape[1]) / 2 * 0.035), 10)


def label_rows(det: torch.Tensor, shape: Sequence[int], save_conf: bool = False) -> list[str]:
    """YOLO label lines ``cls xc yc w h [conf]`` (normalised to the ``(h, w)`` image) for (k, 6) boxes."""
    h, w = shape[:2]
    xywhn = xyxy2xywhn(det[:, :4].double(), w=w, h=h)
    rows = []
    for box, conf, cls in zip(xywhn.tolist(), det[:, 4].tolist(), det[:, 5].tolist()):
        values = [int(cls), *box] + ([conf] if save_conf else [])
        rows.append(" ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values))
    return rows


def can_show_images() -> bool:
    """True when OpenCV was built with a GUI backend and, on Linux, a display is set."""
    gui = re.search(r"^\s*GUI:\s*(\S+)", cv2.getBuildInformation(), re.MULTILINE)
    if gui and gui.group(1).upper() == "NONE":
        return False
    if platform.system() == "Linux":
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True
