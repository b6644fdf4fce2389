"""Box geometry: format conversions, IoU variants, clipping, rescaling and non-maximum suppression.

Formats used throughout the project:

- ``xyxy``: ``[x1, y1, x2, y2]`` top-left and bottom-right corners.
- ``xywh``: ``[xc, yc, w, h]`` centre, width and height.
- a trailing ``n`` (``xywhn``) means normalised to 0..1 by the image width and height.

The conversions accept torch tensors or numpy arrays of shape ``(..., 4)`` and return a new object of
the same kind (integer inputs are promoted to float). The IoU functions and NMS work on torch tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torchvision

Boxes = torch.Tensor | np.ndarray


def _float_copy(x: Boxes) -> Boxes:
    """Return a floating-point copy of ``x`` that keeps its kind (tensor or ndarray) and device."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_floating_point() else x.float()
    x = np.asarray(x)
    return x.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32)


def xyxy2xywh(x: Boxes) -> Boxes:
    """Convert ``(..., 4)`` corner boxes ``[x1, y1, x2, y2]`` to ``[xc, yc, w, h]`` (same units)."""
    y = _float_copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywh2xyxy(x: Boxes) -> Boxes:
    """Convert ``(..., 4)`` centre boxes ``[xc, yc, w, h]`` to ``[x1, y1, x2, y2]`` (same units)."""
    y = _float_copy(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xywhn2xyxy(x: Boxes, w: float = 640, h: float = 640, padw: float = 0, padh: float = 0) -> Boxes:
    """Convert normalised ``[xc, yc, w, h]`` to pixel ``[x1, y1, x2, y2]`` on a ``w x h`` image.

    ``padw``/``padh`` (pixels) are added to x/y, e.g. the offset of a letterbox or mosaic tile.
    """
    y = _float_copy(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x: Boxes, w: float = 640, h: float = 640, clip: bool = False, eps: float = 0.0) -> Boxes:
    """Convert pixel ``[x1, y1, x2, y2]`` on a ``w x h`` image to normalised ``[xc, yc, w, h]``.

    With ``clip`` the corners are first clipped (on a copy) to the image shrunk by ``eps`` pixels.
    """
    if clip:
        x = clip_boxes(_float_copy(x), (h - eps, w - eps))
    y = _float_copy(x)
    y[..., 0] = ((x[..., 0] + x[..., 2]) / 2) / w
    y[..., 1] = ((x[..., 1] + x[..., 3]) / 2) / h
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def xyn2xy(x: Boxes, w: float = 640, h: float = 640, padw: float = 0, padh: float = 0) -> Boxes:
    """Convert normalised ``(..., 2)`` points (segment vertices) to pixels, plus a pixel offset."""
    y = _float_copy(x)
    y[..., 0] = w * x[..., 0] + padw
    y[..., 1] = h * x[..., 1] + padh
    return y


def box_area(boxes: Boxes) -> Boxes:
    """Area of ``(..., 4)`` xyxy boxes, shape ``(...)``; inverted boxes give a negative area."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Pairwise IoU of ``box1`` (N, 4) and ``box2`` (M, 4), both xyxy; returns (N, M)."""
    top_left = torch.max(box1[:, None, :2], box2[None, :, :2])
    bottom_right = torch.min(box1[:, None, 2:], box2[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = box_area(box1)[:, None] + box_area(box2)[None, :] - inter
    return inter / (union + eps)


def bbox_iou(
    box1: torch.Tensor,
    box2: torch.Tensor,
    xywh: bool = True,
    GIoU: bool = False,  # flag names as YOLOv5 users know them
    DIoU: bool = False,
    CIoU: bool = False,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Elementwise IoU (or GIoU / DIoU / CIoU) of broadcastable ``(..., 4)`` boxes; returns ``(..., 1)``.

    Boxes are ``[xc, yc, w, h]`` when ``xywh`` else ``[x1, y1, x2, y2]``. Definitions:
    GIoU (Rezatofighi et al. 2019) subtracts the share of the enclosing box not covered by the union;
    DIoU (Zheng et al. 2020) subtracts centre distance^2 / enclosing diagonal^2; CIoU also subtracts
    ``alpha * v`` with ``v = 4/pi^2 (atan(w2/h2) - atan(w1/h1))^2`` and ``alpha = v / (v - iou + 1)``,
    where alpha is treated as a constant for gradients, as in the paper.
    """
    if xywh:
        box1, box2 = xywh2xyxy(box1), xywh2xyxy(box2)
    b1x1, b1y1, b1x2, b1y2 = box1.unbind(-1)
    b2x1, b2y1, b2x2, b2y2 = box2.unbind(-1)
    w1, h1 = b1x2 - b1x1, b1y2 - b1y1
    w2, h2 = b2x2 - b2x1, b2y2 - b2y1

    inter_w = (torch.min(b1x2, b2x2) - torch.max(b1x1, b2x1)).clamp(min=0)
    inter_h = (torch.min(b1y2, b2y2) - torch.max(b1y1, b2y1)).clamp(min=0)
    inter = inter_w * inter_h
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not (GIoU or DIoU or CIoU):
        return iou.unsqueeze(-1)

    hull_w = torch.max(b1x2, b2x2) - torch.min(b1x1, b2x1)
    hull_h = torch.max(b1y2, b2y2) - torch.min(b1y1, b2y1)
    if GIoU and not (DIoU or CIoU):
        hull_area = hull_w * hull_h + eps
        return (iou - (hull_area - union) / hull_area).unsqueeze(-1)

    diagonal2 = hull_w**2 + hull_h**2 + eps
    centre_dist2 = ((b2x1 + b2x2 - b1x1 - b1x2) ** 2 + (b2y1 + b2y2 - b1y1 - b1y2) ** 2) / 4
    if not CIoU:
        return (iou - centre_dist2 / diagonal2).unsqueeze(-1)
    v = (4 / math.pi**2) * (torch.atan(w2 / (h2 + eps)) - torch.atan(w1 / (h1 + eps))) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return (iou - (centre_dist2 / diagonal2 + v * alpha)).unsqueeze(-1)


def clip_boxes(boxes: Boxes, shape: Sequence[float]) -> Boxes:
    """Clip ``(..., 4)`` xyxy boxes to an image of ``shape`` ``(h, w)``, in place; returns ``boxes``."""
    h, w = shape[0], shape[1]
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, w)
        boxes[..., 1].clamp_(0, h)
        boxes[..., 2].clamp_(0, w)
        boxes[..., 3].clamp_(0, h)
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, w)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, h)
    return boxes


def scale_boxes(
    img1_shape: Sequence[int],
    boxes: Boxes,
    img0_shape: Sequence[int],
    ratio_pad: Sequence | None = None,
) -> Boxes:
    """Map xyxy ``boxes`` from a letterboxed image ``img1_shape`` (h, w) back to the original ``img0_shape``.

    ``ratio_pad`` is ``((gain_h, gain_w), (padw, padh))`` as the dataloader reports it; without it the
    gain and padding are recomputed the way ``letterbox`` pads (centred, the left/top side rounded with
    ``round(pad - 0.1)``). Works in place on ``boxes`` (any float ``(..., 4)``) and returns it, clipped.
    """
    if ratio_pad is None:
        gain_h = gain_w = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        padw = round((img1_shape[1] - img0_shape[1] * gain_w) / 2 - 0.1)
        padh = round((img1_shape[0] - img0_shape[0] * gain_h) / 2 - 0.1)
    else:  # each side was rounded on resize, so the two gains may differ slightly
        (gain_h, gain_w), (padw, padh) = ratio_pad[0], ratio_pad[1]
    boxes[..., [0, 2]] -= padw
    boxes[..., [1, 3]] -= padh
    boxes[..., [0, 2]] /= gain_w
    boxes[..., [1, 3]] /= gain_h
    return clip_boxes(boxes, img0_shape)


def _labels_as_predictions(labels: torch.Tensor, nc: int, like: torch.Tensor) -> torch.Tensor:
    """Turn (m, 5) ``[cls, xc, yc, w, h]`` pixel labels into (m, 5 + nc) rows with obj = cls score = 1."""
    rows = torch.zeros((len(labels), 5 + nc), dtype=like.dtype, device=like.device)
    rows[:, :4] = labels[:, 1:5]
    rows[:, 4] = 1.0
    rows[torch.arange(len(labels)), labels[:, 0].long() + 5] = 1.0
    return rows


def _candidates(x: torch.Tensor, conf_thres: float, multi_label: bool) -> torch.Tensor:
    """(n, 5 + nc) rows -> (k, 6) ``[x1, y1, x2, y2, conf, cls]`` with conf = obj * cls above threshold."""
    scores = x[:, 5:] * x[:, 4:5]
    box = xywh2xyxy(x[:, :4])
    if multi_label:
        i, j = (scores > conf_thres).nonzero(as_tuple=True)
        return torch.cat((box[i], scores[i, j, None], j[:, None].to(x.dtype)), 1)
    conf, j = scores.max(1, keepdim=True)
    return torch.cat((box, conf, j.to(x.dtype)), 1)[conf.view(-1) > conf_thres]


def _class_offsets(det: torch.Tensor) -> torch.Tensor:
    """Per-box (k, 1) shifts that put each class in its own disjoint coordinate range."""
    span = det[:, :4].max() - det[:, :4].min() + 1
    return det[:, 5:6] * span


def non_max_suppression(
    prediction: torch.Tensor | Sequence[torch.Tensor],
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: Sequence[int] | None = None,
    agnostic: bool = False,
    multi_label: bool = False,
    max_det: int = 300,
    max_nms: int = 30000,
    labels: Sequence[torch.Tensor] = (),
) -> list[torch.Tensor]:
    """Filter raw detections with per-class NMS.

    Args:
        prediction: (bs, n, 5 + nc) ``[xc, yc, w, h, obj, cls...]`` in pixels with sigmoided scores, or
            the model's eval output ``(pred, raw_list)`` (only ``pred`` is used).
        conf_thres: keep boxes whose confidence ``obj * cls`` exceeds this (objectness must too).
        iou_thres: boxes of one class overlapping a kept box by more than this IoU are removed.
        classes: keep only these class indices.
        agnostic: suppress across classes instead of per class.
        multi_label: a box yields one candidate per class above ``conf_thres`` (only when nc > 1).
        max_det: most boxes kept per image.
        max_nms: most candidates (highest confidence first) passed into NMS per image.
        labels: per image an (m, 5) tensor ``[cls, xc, yc, w, h]`` in pixels added as confidence-1
            predictions (autolabelling, ``--save-hybrid``).

    Returns:
        One (k, 6) tensor ``[x1, y1, x2, y2, conf, cls]`` per image, sorted by confidence (descending).
        There is no time limit, so the result never depends on the machine's speed.
    """
    if not 0 <= conf_thres <= 1:
        raise ValueError(f"conf_thres={conf_thres} is invalid; valid values are between 0.0 and 1.0")
    if not 0 <= iou_thres <= 1:
        raise ValueError(f"iou_thres={iou_thres} is invalid; valid values are between 0.0 and 1.0")
    if isinstance(prediction, (list, tuple)):
        prediction = prediction[0]
    nc = prediction.shape[2] - 5
    multi_label = multi_label and nc > 1
    class_filter = None if classes is None else torch.as_tensor(classes, device=prediction.device)

    output = []
    for i, x in enumerate(prediction):
        x = x[x[:, 4] > conf_thres]
        if len(labels) and len(labels[i]):
            x = torch.cat((x, _labels_as_predictions(labels[i].to(x.device), nc, x)), 0)
        det = _candidates(x, conf_thres, multi_label)
        if class_filter is not None:
            det = det[(det[:, 5:6] == class_filter).any(1)]
        det = det[det[:, 4].argsort(descending=True)[:max_nms]]
        if len(det):
            shifted = det[:, :4] if agnostic else det[:, :4] + _class_offsets(det)
            det = det[torchvision.ops.nms(shifted, det[:, 4], iou_thres)[:max_det]]
        output.append(det)
    return output
