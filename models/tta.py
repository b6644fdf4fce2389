"""Test-time augmentation: run the model at three scales (one mirrored) and merge the predictions.

Scales 1, 0.83, 0.67 with flips none, left-right, none, as YOLOv5's --augment. Each pass is mapped
back to the input frame, then the large-object level of the full-size pass and the small-object level
of the smallest pass are dropped (they see objects at sizes the other passes handle better) before
all predictions are concatenated for one NMS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

SCALES = (1.0, 0.83, 0.67)
FLIPS = (None, "lr", None)  # "lr": mirror left-right, "ud": up-down
PAD_VALUE = 114 / 255  # letterbox grey


def scale_image(x: torch.Tensor, ratio: float, stride: int = 32) -> torch.Tensor:
    """Resize a BCHW batch by ``ratio`` (bilinear) and pad right/bottom to a multiple of ``stride``."""
    if ratio == 1.0:
        return x
    h, w = x.shape[-2:]
    sh, sw = int(h * ratio), int(w * ratio)
    y = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False)
    ph, pw = (math.ceil(v * ratio / stride) * stride for v in (h, w))
    return F.pad(y, [0, pw - sw, 0, ph - sh], value=PAD_VALUE)


def descale(pred: torch.Tensor, ratio: float, flip: str | None, input_hw: Sequence[int]) -> torch.Tensor:
    """Map (B, N, 5 + nc) xywh predictions of an augmented pass back to the un-augmented input."""
    pred = pred.clone()
    pred[..., :4] /= ratio
    if flip == "lr":
        pred[..., 0] = input_hw[1] - pred[..., 0]
    elif flip == "ud":
        pred[..., 1] = input_hw[0] - pred[..., 1]
    return pred


def _level_sizes(raw: Sequence[torch.Tensor]) -> list[int]:
    """Predictions per level (na * ny * nx) from the raw maps (B, na, ny, nx, no)."""
    return [p.shape[1] * p.shape[2] * p.shape[3] for p in raw]


def augmented_forward(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, None]:
    """TTA inference of an eval-mode DetectionModel on a float BCHW batch.

    Returns (pred (B, N, 5 + nc) in ``x`` pixels, None), the shape of a normal eval forward's first
    element, so NMS downstream is unchanged.
    """
    if model.training:
        raise ValueError("augmented (TTA) inference needs an eval-mode model: call model.eval() first")
    stride = int(model.stride.max())
    input_hw = x.shape[-2:]
    outputs = []
    for ratio, flip in zip(SCALES, FLIPS):
        xi = x.flip(-1) if flip == "lr" else x.flip(-2) if flip == "ud" else x
        pred, raw = model(scale_image(xi, ratio, stride))
        outputs.append((descale(pred, ratio, flip, input_hw), _level_sizes(raw)))
    first, first_sizes = outputs[0]
    last, last_sizes = outputs[-1]
    clipped = [first[:, : first.shape[1] - first_sizes[-1]]]  # full size: drop the largest-stride level
    clipped += [p for p, _ in outputs[1:-1]]
    clipped.append(last[:, last_sizes[0] :])  # smallest scale: drop the finest level
    return torch.cat(clipped, 1), None
