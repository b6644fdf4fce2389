"""YOLOv5 (v7.0) training loss: target assignment, CIoU box loss, objectness and class BCE.

Conventions (see shared/SPEC.md, "Detect head and loss"):

- ``preds`` is the train-mode model output: a list of ``nl`` tensors ``(bs, na, ny, nx, 5 + nc)`` of raw
  logits, channels ``[x, y, w, h, obj, cls...]``.
- ``targets`` is ``(nt, 6)`` with rows ``[image_index, class, xc, yc, w, h]``, box normalised to 0..1.
- Anchors are ``(nl, na, 2)`` in units of each level's stride (grid cells), as ``Detect.anchors`` holds them.
- A prediction decodes to ``xy = 2 * sigmoid(t_xy) - 0.5`` (cells, relative to its cell's corner) and
  ``wh = (2 * sigmoid(t_wh))**2 * anchor`` (cells).

As in YOLOv5 v7.0, the class loss is only computed when nc > 1, and a cell assigned more than once
takes one of its IoUs as objectness target. Unlike YOLOv5, the box/obj/cls gain scaling lives here,
not in train.py, so callers pass the hyp values unscaled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from utils.boxes import bbox_iou

# Objectness weight per output level, finest (P3) first; YOLOv5 uses the 5-entry list for other depths.
OBJ_BALANCE_3 = (4.0, 1.0, 0.4)
OBJ_BALANCE_DEFAULT = (4.0, 1.0, 0.25, 0.06, 0.02)

# A target may also be assigned to a neighbouring cell when its centre lies within this many cells of
# that neighbour's shared edge.
NEIGHBOUR_REACH = 0.5

# Directions, scaled by NEIGHBOUR_REACH and subtracted from the target centre before flooring to a cell
# index: own cell, left (x-1), up (y-1), right (x+1), down (y+1).
_CELL_SHIFTS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))

HYP_KEYS = ("box", "obj", "cls", "cls_pw", "obj_pw", "anchor_t", "fl_gamma")


class LevelTargets(NamedTuple):
    """Targets assigned to one output level; ``m`` = number of (target, anchor, cell) assignments.

    cls: (m,) long class index. box: (m, 4) float ``[x, y, w, h]`` where ``x, y`` is the target
    centre relative to the assigned cell's top-left corner (cells, in [-0.5, 1.5]) and ``w, h`` are in
    cells. image, anchor, gj, gi: (m,) long indices into a ``(bs, na, ny, nx)`` prediction (gj row,
    gi column, clamped to the grid). anchor_wh: (m, 2) matched anchor size in cells.
    """

    cls: Tensor
    box: Tensor
    image: Tensor
    anchor: Tensor
    gj: Tensor
    gi: Tensor
    anchor_wh: Tensor


def smooth_bce_targets(eps: float = 0.0) -> tuple[float, float]:
    """Positive and negative class targets under label smoothing ``eps``: ``(1 - eps/2, eps/2)``."""
    return 1.0 - 0.5 * eps, 0.5 * eps


def objectness_balance(nl: int) -> tuple[float, ...]:
    """Objectness loss weight for each of ``nl`` output levels (finest first)."""
    if nl == 3:
        return OBJ_BALANCE_3
    if not 1 <= nl <= len(OBJ_BALANCE_DEFAULT):
        raise ValueError(
            f"objectness balance is defined for 1 to {len(OBJ_BALANCE_DEFAULT)} levels, not {nl}"
        )
    return OBJ_BALANCE_DEFAULT[:nl]


def scaled_loss_gains(hyp: Mapping[str, float], nc: int, nl: int, imgsz: int = 640) -> dict[str, float]:
    """Loss gains adapted to the model: box * 3/nl, cls * nc/80 * 3/nl, obj * (imgsz/640)^2 * 3/nl.

    The hyp values are tuned for 80 classes, 3 levels and 640-pixel images; this keeps their effect
    similar for other models. Returns a new dict with keys ``box``, ``obj``, ``cls``.
    """
    level_scale = 3.0 / nl
    return {
        "box": float(hyp["box"]) * level_scale,
        "cls": float(hyp["cls"]) * nc / 80.0 * level_scale,
        "obj": float(hyp["obj"]) * (imgsz / 640.0) ** 2 * level_scale,
    }


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017) on top of BCE-with-logits, mean-reduced.

    loss = BCE(pred, true) * alpha_t * (1 - p_t)^gamma, where p_t is the predicted probability of the
    target and alpha_t = alpha for positives, 1 - alpha for negatives. Accepts soft targets.
    """

    def __init__(self, pos_weight: Tensor | None = None, gamma: float = 1.5, alpha: float = 0.25) -> None:
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, pred: Tensor, true: Tensor) -> Tensor:
        """pred: logits, true: targets in 0..1, same shape. Returns a 0-d tensor."""
        bce = F.binary_cross_entropy_with_logits(pred, true, pos_weight=self.pos_weight, reduction="none")
        prob = pred.sigmoid()
        p_t = true * prob + (1.0 - true) * (1.0 - prob)
        alpha_t = true * self.alpha + (1.0 - true) * (1.0 - self.alpha)
        return (bce * alpha_t * (1.0 - p_t) ** self.gamma).mean()


def make_bce(pos_weight: float, fl_gamma: float, device: torch.device) -> nn.Module:
    """BCE-with-logits (mean) with ``pos_weight``, wrapped in focal loss when ``fl_gamma > 0``."""
    weight = torch.tensor([pos_weight], device=device)
    if fl_gamma > 0:
        return FocalLoss(weight, gamma=fl_gamma)
    return nn.BCEWithLogitsLoss(pos_weight=weight)


def match_anchors(targets: Tensor, anchors: Tensor, anchor_t: float) -> Tensor:
    """Keep (anchor, target) pairs whose size ratio is within ``anchor_t`` on both sides.

    targets: (na, nt, 7) rows ``[image, class, x, y, w, h, anchor]`` with x, y, w, h in grid cells.
    anchors: (na, 2) in grid cells. A pair matches when max(r, 1/r) < anchor_t for both r = w / anchor_w
    and r = h / anchor_h. Returns the matching rows, (m, 7).
    """
    ratio = targets[..., 4:6] / anchors[:, None]
    worst = torch.maximum(ratio, 1.0 / ratio).amax(dim=-1)
    return targets[worst < anchor_t]


def neighbour_mask(gxy: Tensor, grid_wh: Tensor) -> Tensor:
    """Which cells each target is assigned to: own, left, up, right, down.

    gxy: (m, 2) target centres in grid cells; grid_wh: (2,) ``[nx, ny]``. A neighbour is used when the
    centre lies within half a cell of the shared edge and the centre is more than one cell from the
    grid border on that side (so the neighbour exists). Returns a bool mask (5, m).
    """
    near_low = (gxy % 1 < NEIGHBOUR_REACH) & (gxy > 1)
    from_high = grid_wh - gxy
    near_high = (from_high % 1 < NEIGHBOUR_REACH) & (from_high > 1)
    own = torch.ones_like(near_low[:, 0])
    return torch.stack((own, near_low[:, 0], near_low[:, 1], near_high[:, 0], near_high[:, 1]))


def assign_level(targets: Tensor, anchors: Tensor, nx: int, ny: int, anchor_t: float) -> LevelTargets:
    """Assign targets to anchors and cells of one level with an ``nx`` x ``ny`` grid.

    targets: (na, nt, 7) rows ``[image, class, x, y, w, h, anchor]`` in grid cells (x, y, w, h).
    anchors: (na, 2) in grid cells. Each target matched to an anchor goes to its own cell and up to two
    neighbouring cells (see ``neighbour_mask``); cell indices are clamped to the grid.
    """
    grid_wh = targets.new_tensor([nx, ny])
    matched = match_anchors(targets, anchors, anchor_t)
    mask = neighbour_mask(matched[:, 2:4], grid_wh)
    shifts = torch.tensor(_CELL_SHIFTS, device=targets.device, dtype=targets.dtype) * NEIGHBOUR_REACH
    rows = matched.expand(len(_CELL_SHIFTS), -1, -1)[mask]
    offsets = shifts[:, None].expand(-1, matched.shape[0], -1)[mask]

    gxy, gwh = rows[:, 2:4], rows[:, 4:6]
    cell = (gxy - offsets).long()
    gi = cell[:, 0].clamp(0, nx - 1)
    gj = cell[:, 1].clamp(0, ny - 1)
    anchor = rows[:, 6].long()
    box = torch.cat((gxy - torch.stack((gi, gj), dim=1), gwh), dim=1)
    return LevelTargets(
        cls=rows[:, 1].long(),
        box=box,
        image=rows[:, 0].long(),
        anchor=anchor,
        gj=gj,
        gi=gi,
        anchor_wh=anchors[anchor],
    )


def targets_per_anchor(targets: Tensor, na: int) -> Tensor:
    """(nt, 6) targets -> (na, nt, 7): one copy per anchor with the anchor index appended."""
    nt = targets.shape[0]
    anchor_index = torch.arange(na, device=targets.device, dtype=targets.dtype).view(na, 1, 1)
    return torch.cat((targets.expand(na, nt, 6), anchor_index.expand(na, nt, 1)), dim=2)


def _unwrap_detect(model: nn.Module) -> nn.Module:
    """The detection head of a (possibly DataParallel/DDP-wrapped) model."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    detect = getattr(model, "detect", None)
    layers = getattr(model, "model", None)
    if detect is None and isinstance(layers, nn.Sequential) and len(layers):
        detect = layers[-1]
    missing = [a for a in ("nc", "nl", "na", "anchors", "stride") if not hasattr(detect, a)]
    if missing:
        raise ValueError(f"loss needs a Detect head with {', '.join(missing)}; got {type(detect).__name__}")
    return detect


class ComputeLoss:
    """YOLOv5 loss for a model with a Detect head; call it on train-mode outputs and targets.

    ``hyp`` needs box, obj, cls, cls_pw, obj_pw, anchor_t, fl_gamma; it is not modified. The box, obj
    and cls gains are scaled here for the model's nc and nl and for ``imgsz`` (see ``scaled_loss_gains``).
    Anchors are read from the head on every call, so AutoAnchor changes and ``model.to()`` are seen.
    """

    # Objectness target = (1 - gr) + gr * IoU; YOLOv5 uses the pure IoU.
    gr = 1.0

    def __init__(
        self, model: nn.Module, hyp: Mapping[str, float], imgsz: int = 640, label_smoothing: float = 0.0
    ) -> None:
        missing = [k for k in HYP_KEYS if k not in hyp]
        if missing:
            raise KeyError(f"hyperparameters missing for the loss: {', '.join(missing)}")
        self.detect = _unwrap_detect(model)
        self.nc, self.nl, self.na = int(self.detect.nc), int(self.detect.nl), int(self.detect.na)
        device = next(model.parameters()).device
        self.anchor_t = float(hyp["anchor_t"])
        self.gains = scaled_loss_gains(hyp, self.nc, self.nl, imgsz)
        self.cls_positive, self.cls_negative = smooth_bce_targets(label_smoothing)
        self.bce_cls = make_bce(float(hyp["cls_pw"]), float(hyp["fl_gamma"]), device)
        self.bce_obj = make_bce(float(hyp["obj_pw"]), float(hyp["fl_gamma"]), device)
        self.balance = objectness_balance(self.nl)

    def __call__(self, preds: Sequence[Tensor], targets: Tensor) -> tuple[Tensor, Tensor]:
        """preds: nl tensors (bs, na, ny, nx, 5 + nc) logits; targets: (nt, 6).

        Returns the total loss (1,) = (box + obj + cls) * bs, and the detached items (3,) [box, obj, cls].
        """
        device = preds[0].device
        lbox = torch.zeros(1, device=device)
        lobj = torch.zeros(1, device=device)
        lcls = torch.zeros(1, device=device)
        for level, (pred, assigned) in enumerate(
            zip(preds, self.assign_targets(preds, targets), strict=True)
        ):
            box_loss, obj_loss, cls_loss = self._level_losses(pred, assigned)
            lbox = lbox + box_loss
            lobj = lobj + obj_loss * self.balance[level]
            lcls = lcls + cls_loss
        lbox = lbox * self.gains["box"]
        lobj = lobj * self.gains["obj"]
        lcls = lcls * self.gains["cls"]
        batch_size = preds[0].shape[0]
        return (lbox + lobj + lcls) * batch_size, torch.cat((lbox, lobj, lcls)).detach()

    def _level_losses(self, pred: Tensor, assigned: LevelTargets) -> tuple[Tensor, Tensor, Tensor]:
        """Unweighted (box, objectness, class) losses of one level; each a 0-d tensor."""
        obj_target = torch.zeros(pred.shape[:4], dtype=pred.dtype, device=pred.device)
        box_loss = cls_loss = pred.new_zeros(())
        n = assigned.image.shape[0]
        if n:
            cells = (assigned.image, assigned.anchor, assigned.gj, assigned.gi)
            picked = pred[cells]  # (n, 5 + nc)
            pxy = picked[:, 0:2].sigmoid() * 2 - 0.5
            pwh = (picked[:, 2:4].sigmoid() * 2) ** 2 * assigned.anchor_wh
            iou = bbox_iou(torch.cat((pxy, pwh), dim=1), assigned.box, CIoU=True).squeeze(-1)  # (n,)
            box_loss = (1.0 - iou).mean()
            iou = iou.detach().clamp(0).to(obj_target.dtype)
            obj_target[cells] = (1.0 - self.gr) + self.gr * iou
            if self.nc > 1:  # a single class is learned through objectness alone
                cls_target = torch.full_like(picked[:, 5:], self.cls_negative)
                cls_target[torch.arange(n, device=pred.device), assigned.cls] = self.cls_positive
                cls_loss = self.bce_cls(picked[:, 5:], cls_target)
        obj_loss = self.bce_obj(pred[..., 4], obj_target)
        return box_loss, obj_loss, cls_loss

    def assign_targets(self, preds: Sequence[Tensor], targets: Tensor) -> list[LevelTargets]:
        """Targets (nt, 6) assigned to every level's anchors and cells; one ``LevelTargets`` per level."""
        anchors = self.detect.anchors.to(preds[0].device)
        per_anchor = targets_per_anchor(targets.to(preds[0].device, torch.float32), self.na)
        assigned = []
        for level, pred in enumerate(preds):
            ny, nx = pred.shape[2], pred.shape[3]
            to_grid = per_anchor.new_tensor([1, 1, nx, ny, nx, ny, 1])
            assigned.append(assign_level(per_anchor * to_grid, anchors[level], nx, ny, self.anchor_t))
        return assigned

    def build_targets(
        self, preds: Sequence[Tensor], targets: Tensor
    ) -> tuple[list[Tensor], list[Tensor], list[tuple[Tensor, Tensor, Tensor, Tensor]], list[Tensor]]:
        """YOLOv5-shaped view of ``assign_targets``: per-level lists tcls, tbox, indices, anch.

        indices[i] = (image, anchor, gj, gi); tbox[i] (m, 4) xy offset in cell, wh in cells; anch[i] (m, 2).
        """
        assigned = self.assign_targets(preds, targets)
        tcls = [a.cls for a in assigned]
        tbox = [a.box for a in assigned]
        indices = [(a.image, a.anchor, a.gj, a.gi) for a in assigned]
        anch = [a.anchor_wh for a in assigned]
        return tcls, tbox, indices, anch
