"""Hand-computed checks of the YOLOv5 loss: anchor matching, cell assignment, targets and loss values.

Coordinates below are in grid cells unless said otherwise; x grows to the right and y downwards, so the
"upper" neighbour of a cell is the one at row gj - 1. Normalised centres are chosen as exact binary
fractions (e.g. 2.25 / 8) so that the half-cell rules are tested without rounding noise.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from utils.boxes import bbox_iou
from utils.loss import (
    ComputeLoss,
    FocalLoss,
    match_anchors,
    objectness_balance,
    scaled_loss_gains,
    smooth_bce_targets,
    targets_per_anchor,
)

HYP = {"box": 0.05, "obj": 1.0, "cls": 0.5, "cls_pw": 1.0, "obj_pw": 1.0, "anchor_t": 4.0, "fl_gamma": 0.0}
LOG2 = math.log(2.0)


class FakeDetect(nn.Module):
    """Just the attributes the loss reads from a Detect head."""

    def __init__(self, anchors: list[list[list[float]]], nc: int, strides: list[float]) -> None:
        super().__init__()
        self.nc, self.nl, self.na = nc, len(anchors), len(anchors[0])
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32))  # (nl, na, 2) cells
        self.register_buffer("stride", torch.tensor(strides, dtype=torch.float32))


class FakeModel(nn.Module):
    def __init__(self, anchors: list[list[list[float]]], nc: int = 3, strides: list[float] | None = None):
        super().__init__()
        self.detect = FakeDetect(anchors, nc, strides or [8.0 * 2**i for i in range(len(anchors))])
        self.weight = nn.Parameter(torch.zeros(1))


def make_loss(anchors, nc=3, imgsz=640, label_smoothing=0.0, **hyp) -> ComputeLoss:
    return ComputeLoss(FakeModel(anchors, nc), {**HYP, **hyp}, imgsz=imgsz, label_smoothing=label_smoothing)


def make_preds(grids: list[tuple[int, int]], na: int, nc: int, bs: int = 1, fill: float = 0.0):
    """Logit tensors (bs, na, ny, nx, 5 + nc) for grids given as (ny, nx)."""
    return [torch.full((bs, na, ny, nx, 5 + nc), fill) for ny, nx in grids]


def one_target(x: float, y: float, w: float, h: float, image: int = 0, cls: int = 0) -> torch.Tensor:
    return torch.tensor([[image, cls, x, y, w, h]], dtype=torch.float32)


def assigned_cells(loss: ComputeLoss, preds, targets, level: int = 0) -> list[tuple[int, int]]:
    _, _, indices, _ = loss.build_targets(preds, targets)
    _, _, gj, gi = indices[level]
    return list(zip(gj.tolist(), gi.tolist(), strict=True))


# ---------------------------------------------------------------- anchor matching


@pytest.mark.parametrize(
    ("wh", "matched"),
    [
        ((2.0, 2.0), True),  # r = 2
        ((3.99, 1.0), True),  # just under anchor_t
        ((4.0, 1.0), False),  # r = anchor_t exactly: the rule is strict
        ((0.25, 1.0), False),  # 1/r = 4 exactly
        ((0.2505, 1.0), True),  # 1/r = 3.992
        ((1.0, 5.0), False),  # width fine, height too tall: both sides must pass
    ],
)
def test_match_anchors_ratio_edges(wh, matched):
    targets = torch.tensor([[[0, 0, 3.5, 3.5, wh[0], wh[1], 0]]])  # (na=1, nt=1, 7)
    kept = match_anchors(targets, torch.tensor([[1.0, 1.0]]), anchor_t=4.0)
    assert kept.shape[0] == int(matched)


def test_build_targets_picks_anchors_by_ratio():
    # Target 2 x 2 cells; anchors 1 (r=2), 2 (r=1), 8 (1/r=4, rejected), 0.6 (r=3.33).
    loss = make_loss([[[1.0, 1.0], [2.0, 2.0], [8.0, 8.0], [0.6, 0.6]]])
    preds = make_preds([(8, 8)], na=4, nc=3)
    _, _, indices, anch = loss.build_targets(preds, one_target(2.5 / 8, 3.5 / 8, 0.25, 0.25))
    assert indices[0][1].tolist() == [0, 1, 3]
    assert torch.allclose(anch[0], torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.6, 0.6]]))


def test_anchor_t_comes_from_hyp():
    loss = make_loss([[[1.0, 1.0]]], anchor_t=2.0)
    preds = make_preds([(8, 8)], na=1, nc=3)
    assert assigned_cells(loss, preds, one_target(2.5 / 8, 3.5 / 8, 0.25, 0.25)) == []  # r = 2, not < 2


# ---------------------------------------------------------------- neighbour cells


@pytest.mark.parametrize(
    ("centre", "cells"),
    [
        ((2.25, 3.25), [(3, 2), (3, 1), (2, 2)]),  # top-left quarter: own, left, up
        ((2.75, 3.75), [(3, 2), (3, 3), (4, 2)]),  # bottom-right quarter: own, right, down
        ((2.75, 3.25), [(3, 2), (2, 2), (3, 3)]),  # top-right quarter: own, up, right
        ((2.25, 3.75), [(3, 2), (3, 1), (4, 2)]),  # bottom-left quarter: own, left, down
        ((2.5, 3.5), [(3, 2)]),  # exact cell centre: no neighbour is strictly within half a cell
        ((0.25, 0.25), [(0, 0)]),  # top-left border cell: left and up do not exist
        ((7.75, 7.75), [(7, 7)]),  # bottom-right border cell: right and down do not exist
        ((1.25, 6.75), [(6, 1), (6, 0), (7, 1)]),  # second column reaches column 0; row 6 reaches row 7
        ((0.75, 0.5), [(0, 0), (0, 1)]),  # first cell, right half: only the right neighbour
    ],
)
def test_neighbour_cells(centre, cells):
    loss = make_loss([[[2.0, 2.0]]])
    preds = make_preds([(8, 8)], na=1, nc=3)
    x, y = centre
    assert assigned_cells(loss, preds, one_target(x / 8, y / 8, 0.25, 0.25)) == cells


def test_centre_on_cell_edge_follows_half_cell_offsets():
    # x = 2.0 exactly: the left rule (frac 0 < 0.5) gives floor(1.5) = 1, and the right rule, tested on
    # nx - x = 6.0, shifts by half a cell the other way, floor(2.5) = 2 = the own cell again (as YOLOv5).
    loss = make_loss([[[2.0, 2.0]]])
    preds = make_preds([(8, 8)], na=1, nc=3)
    assert assigned_cells(loss, preds, one_target(2.0 / 8, 3.5 / 8, 0.25, 0.25)) == [(3, 2), (3, 1), (3, 2)]


def test_non_square_grid_keeps_axes_apart():
    # nx = 8, ny = 4: centre (2.25, 3.25) is in the last row, so only left and up neighbours.
    loss = make_loss([[[2.0, 2.0]]])
    preds = make_preds([(4, 8)], na=1, nc=3)
    cells = assigned_cells(loss, preds, one_target(2.25 / 8, 3.25 / 4, 0.25, 0.5))
    assert cells == [(3, 2), (3, 1), (2, 2)]
    # (3.75 row) is within half a cell of the bottom edge of the grid: no row 4.
    assert assigned_cells(loss, preds, one_target(2.5 / 8, 3.75 / 4, 0.25, 0.5)) == [(3, 2)]


def test_centre_on_far_image_edge_is_clamped_into_grid():
    # x = y = 8.0 (normalised 1.0): own cell (8, 8), left (8, 7) and up (7, 8) all clamp to (7, 7), and
    # the xy offset is measured from the clamped cell.
    loss = make_loss([[[2.0, 2.0]]])
    preds = make_preds([(8, 8)], na=1, nc=3)
    _, tbox, indices, _ = loss.build_targets(preds, one_target(1.0, 1.0, 0.25, 0.25))
    assert indices[0][2].tolist() == [7, 7, 7] and indices[0][3].tolist() == [7, 7, 7]
    assert torch.allclose(tbox[0], torch.tensor([[1.0, 1.0, 2.0, 2.0]] * 3))


# ---------------------------------------------------------------- target values


def test_tbox_and_class_and_image_index():
    loss = make_loss([[[2.0, 2.0]]])
    preds = make_preds([(8, 8)], na=1, nc=3, bs=2)
    target = one_target(2.25 / 8, 3.25 / 8, 0.25, 0.375, image=1, cls=2)  # wh = 2 x 3 cells
    tcls, tbox, indices, anch = loss.build_targets(preds, target)
    expected = torch.tensor([[0.25, 0.25, 2.0, 3.0], [1.25, 0.25, 2.0, 3.0], [0.25, 1.25, 2.0, 3.0]])
    assert torch.allclose(tbox[0], expected)
    assert tcls[0].tolist() == [2, 2, 2]
    assert indices[0][0].tolist() == [1, 1, 1]
    assert anch[0].tolist() == [[2.0, 2.0]] * 3
    assert all(t.dtype == torch.long for t in indices[0])


def test_each_level_uses_its_own_grid_and_anchors():
    # A 0.25-wide target is 4 cells at P3 (16 x 16), 2 at P4 (8 x 8), 1 at P5 (4 x 4).
    anchors = [[[4.0, 4.0], [20.0, 20.0]], [[2.0, 2.0], [20.0, 20.0]], [[0.2, 0.2], [1.0, 1.0]]]
    loss = make_loss(anchors)
    preds = make_preds([(16, 16), (8, 8), (4, 4)], na=2, nc=3)
    tcls, tbox, indices, _ = loss.build_targets(preds, one_target(0.5 + 1 / 64, 0.5 + 1 / 64, 0.25, 0.25))
    assert [idx[1].tolist() for idx in indices] == [[0, 0, 0], [0, 0, 0], [1, 1, 1]]
    assert [box[0, 2].item() for box in tbox] == [4.0, 2.0, 1.0]
    assert [(int(idx[2][0]), int(idx[3][0])) for idx in indices] == [(8, 8), (4, 4), (2, 2)]


def test_no_targets_gives_empty_assignments():
    loss = make_loss([[[1.0, 1.0], [2.0, 2.0]]] * 3)
    preds = make_preds([(8, 8), (4, 4), (2, 2)], na=2, nc=3)
    tcls, tbox, indices, anch = loss.build_targets(preds, torch.zeros((0, 6)))
    for level in range(3):
        assert tcls[level].shape == (0,) and tbox[level].shape == (0, 4) and anch[level].shape == (0, 2)
        assert all(i.shape == (0,) for i in indices[level])


def test_targets_per_anchor_appends_anchor_index():
    out = targets_per_anchor(torch.arange(12.0).view(2, 6), na=3)
    assert out.shape == (3, 2, 7)
    assert out[..., 6].tolist() == [[0, 0], [1, 1], [2, 2]]
    assert torch.equal(out[2, :, :6], torch.arange(12.0).view(2, 6))


def test_anchors_are_read_at_call_time():
    model = FakeModel([[[8.0, 8.0]]])
    loss = ComputeLoss(model, HYP)
    preds = make_preds([(8, 8)], na=1, nc=3)
    target = one_target(2.5 / 8, 3.5 / 8, 0.25, 0.25)
    assert loss.build_targets(preds, target)[1][0].shape[0] == 0
    model.detect.anchors[:] = 2.0  # as AutoAnchor does, in place
    assert loss.build_targets(preds, target)[1][0].shape[0] == 1


def _reference_assignment(targets, anchors, grid, anchor_t=4.0):
    """Rules of SPEC "Detect head and loss" applied target by target, in plain Python floats."""
    ny, nx = grid
    rows = []
    for image, cls, x, y, w, h in targets.tolist():
        gx, gy, gw, gh = x * nx, y * ny, w * nx, h * ny
        for a, (aw, ah) in enumerate(anchors):
            if max(gw / aw, aw / gw, gh / ah, ah / gh) >= anchor_t:
                continue
            shifts = [(0.0, 0.0)]
            shifts += [(0.5, 0.0)] if gx % 1 < 0.5 and gx > 1 else []
            shifts += [(0.0, 0.5)] if gy % 1 < 0.5 and gy > 1 else []
            shifts += [(-0.5, 0.0)] if (nx - gx) % 1 < 0.5 and nx - gx > 1 else []
            shifts += [(0.0, -0.5)] if (ny - gy) % 1 < 0.5 and ny - gy > 1 else []
            for sx, sy in shifts:
                gi = min(max(math.floor(gx - sx), 0), nx - 1)
                gj = min(max(math.floor(gy - sy), 0), ny - 1)
                rows.append((int(image), a, gj, gi, int(cls), round(gx - gi, 4), round(gy - gj, 4)))
    return sorted(rows)


def test_vectorised_assignment_matches_per_target_rules():
    torch.manual_seed(1)
    anchors = [
        [[1.25, 1.625], [2.0, 3.75], [4.125, 2.875]],
        [[1.875, 3.8125], [3.875, 2.8125], [3.6875, 7.4375]],
    ]
    loss = make_loss(anchors, nc=5)
    preds = make_preds([(16, 8), (8, 4)], na=3, nc=5, bs=3)
    n = 40
    image, cls = torch.randint(0, 3, (n, 1)), torch.randint(0, 5, (n, 1))
    xy, wh = torch.rand(n, 2), torch.rand(n, 2) * 0.5 + 0.02
    targets = torch.cat((image, cls, xy, wh), dim=1).float()
    tcls, tbox, indices, _ = loss.build_targets(preds, targets)
    for level, grid in enumerate([(16, 8), (8, 4)]):
        b, a, gj, gi = (t.tolist() for t in indices[level])
        xy = tbox[level][:, :2].tolist()
        got = sorted(
            (b[k], a[k], gj[k], gi[k], int(tcls[level][k]), round(xy[k][0], 4), round(xy[k][1], 4))
            for k in range(len(b))
        )
        assert got == _reference_assignment(targets, anchors[level], grid)
        assert len(got) > n  # neighbours and several anchors per target were exercised


# ---------------------------------------------------------------- loss values


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def bce(logit: float, target: float) -> float:
    """BCE-with-logits of one element: softplus(x) - t * x."""
    return softplus(logit) - target * logit


def test_loss_by_hand_with_zero_logits():
    # One target 2 x 2 cells at the centre of cell (gj 3, gi 2): only anchor 1 x 1 matches (8 x 8 gives
    # 1/r = 4), no neighbours. Zero logits decode to a 1 x 1 box on the same centre: CIoU = IoU = 1/4.
    loss = make_loss([[[1.0, 1.0], [8.0, 8.0]]], nc=3)
    preds = make_preds([(8, 8)], na=2, nc=3, bs=2)
    z = 1.0
    preds[0][0, 0, 3, 2, 4] = z  # objectness logit of the assigned cell
    total, items = loss(preds, one_target(2.5 / 8, 3.5 / 8, 0.25, 0.25))

    box = (1 - 0.25) * 0.05 * 3  # gain box * 3/nl
    n_obj = 2 * 2 * 8 * 8
    obj = ((n_obj - 1) * LOG2 + bce(z, 0.25)) / n_obj * 4.0 * 1.0 * 3  # balance[0] = 4, gain obj * 3/nl
    cls = LOG2 * 0.5 * 3 / 80 * 3  # every class logit 0 -> log 2 whatever the target
    assert items.tolist() == pytest.approx([box, obj, cls], rel=1e-5)
    assert total.shape == (1,)
    assert total.item() == pytest.approx((box + obj + cls) * 2, rel=1e-5)
    assert not items.requires_grad


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p / (1 - p))


def test_exact_prediction_gives_zero_box_loss_and_unit_objectness_target():
    loss = make_loss([[[2.0, 2.0]]], nc=3)
    preds = make_preds([(8, 8)], na=1, nc=3)
    target = one_target(2.25 / 8, 3.25 / 8, 0.25, 0.375)  # 2 x 3 cells, assigned to 3 cells
    _, tbox, indices, anch = loss.build_targets(preds, target)
    b, a, gj, gi = indices[0]
    z = 2.0
    preds[0][b, a, gj, gi, 0:2] = _logit((tbox[0][:, :2] + 0.5) / 2)  # invert xy = 2 s - 0.5
    preds[0][b, a, gj, gi, 2:4] = _logit((tbox[0][:, 2:] / anch[0]).sqrt() / 2)  # invert wh = (2 s)^2 a
    preds[0][b, a, gj, gi, 4] = z
    _, items = loss(preds, target)
    assert items[0].item() == pytest.approx(0.0, abs=1e-5)
    obj = ((64 - 3) * LOG2 + 3 * bce(z, 1.0)) / 64 * 4.0 * 3
    assert items[1].item() == pytest.approx(obj, rel=1e-4)


def test_no_targets_gives_objectness_only():
    torch.manual_seed(0)
    anchors = [[[1.0, 1.0], [2.0, 2.0]]] * 3
    loss = make_loss(anchors, nc=5, imgsz=320)
    preds = [torch.randn(2, 2, n, n, 10) for n in (8, 4, 2)]
    total, items = loss(preds, torch.zeros((0, 6)))
    obj_gain = 1.0 * (320 / 640) ** 2 * 3 / 3
    expected = sum(
        sum(softplus(v) for v in p[..., 4].flatten().tolist()) / p[..., 4].numel() * balance * obj_gain
        for p, balance in zip(preds, (4.0, 1.0, 0.4), strict=True)
    )
    assert items.tolist() == pytest.approx([0.0, expected, 0.0], rel=1e-5)
    assert total.item() == pytest.approx(expected * 2, rel=1e-5)


def test_label_smoothing_targets_in_class_loss():
    assert smooth_bce_targets(0.0) == (1.0, 0.0)
    assert smooth_bce_targets(0.2) == pytest.approx((0.9, 0.1))
    loss = make_loss([[[2.0, 2.0]]], nc=4, label_smoothing=0.2)
    preds = make_preds([(8, 8)], na=1, nc=4)
    logits = [1.0, -1.0, 0.5, 2.0]
    preds[0][0, 0, 3, 2, 5:] = torch.tensor(logits)
    _, items = loss(preds, one_target(2.5 / 8, 3.5 / 8, 0.25, 0.25, cls=2))
    targets = [0.1, 0.1, 0.9, 0.1]
    cls = sum(bce(x, t) for x, t in zip(logits, targets, strict=True)) / 4 * 0.5 * 4 / 80 * 3
    assert items[2].item() == pytest.approx(cls, rel=1e-5)


def test_single_class_has_no_class_loss():
    loss = make_loss([[[2.0, 2.0]]], nc=1)
    preds = make_preds([(8, 8)], na=1, nc=1, fill=0.3)
    _, items = loss(preds, one_target(2.5 / 8, 3.5 / 8, 0.25, 0.25))
    assert items[2].item() == 0.0 and items[0].item() > 0


def test_gradients_flow_and_are_finite():
    torch.manual_seed(0)
    anchors = [[[1.25, 1.625], [2.0, 3.75], [4.125, 2.875]]] * 3
    loss = make_loss(anchors, nc=4)
    preds = [torch.randn(2, 3, n, n, 9, requires_grad=True) for n in (16, 8, 4)]
    targets = torch.tensor(
        [[0, 1, 0.3, 0.4, 0.2, 0.3], [0, 3, 0.7, 0.2, 0.1, 0.05], [1, 0, 0.5, 0.5, 0.6, 0.4]]
    )
    total, items = loss(preds, targets)
    total.backward()
    assert all(items > 0)
    for p in preds:
        assert torch.isfinite(p.grad).all()
        assert p.grad[..., :4].abs().sum() > 0 and p.grad[..., 4].abs().sum() > 0


# ---------------------------------------------------------------- gains, balance, focal, CIoU


def test_gain_scaling_with_nc_nl_and_imgsz():
    gains = scaled_loss_gains(HYP, nc=20, nl=3, imgsz=320)
    assert gains == pytest.approx({"box": 0.05, "cls": 0.5 * 20 / 80, "obj": 0.25})
    gains = scaled_loss_gains(HYP, nc=80, nl=4, imgsz=1280)
    assert gains == pytest.approx({"box": 0.05 * 0.75, "cls": 0.5 * 0.75, "obj": 4.0 * 0.75})
    hyp = dict(HYP)
    loss = ComputeLoss(FakeModel([[[1.0, 1.0]]] * 3, nc=20), hyp, imgsz=320)
    assert loss.gains == pytest.approx({"box": 0.05, "cls": 0.125, "obj": 0.25})
    assert hyp == HYP  # the caller's dict is left alone


def test_objectness_balance():
    assert objectness_balance(3) == (4.0, 1.0, 0.4)
    assert objectness_balance(5) == (4.0, 1.0, 0.25, 0.06, 0.02)
    assert objectness_balance(2) == (4.0, 1.0)
    with pytest.raises(ValueError, match="1 to 5 levels"):
        objectness_balance(6)


def test_focal_loss_by_hand():
    # Logit 0 -> p = 0.5: BCE = log 2, alpha_t = 0.25 for a positive, modulating (1 - 0.5)^2.
    focal = FocalLoss(gamma=2.0, alpha=0.25)
    assert focal(torch.zeros(1), torch.ones(1)).item() == pytest.approx(LOG2 * 0.25 * 0.25)
    assert focal(torch.zeros(1), torch.zeros(1)).item() == pytest.approx(LOG2 * 0.75 * 0.25)
    loss = make_loss([[[1.0, 1.0]]], fl_gamma=1.5)
    assert isinstance(loss.bce_obj, FocalLoss) and isinstance(loss.bce_cls, FocalLoss)
    preds = make_preds([(4, 4)], na=1, nc=3)
    _, items = loss(preds, torch.zeros((0, 6)))
    assert items[1].item() == pytest.approx(LOG2 * 0.75 * 0.5**1.5 * 4.0 * 3, rel=1e-5)


def _reference_ciou(b1: tuple[float, ...], b2: tuple[float, ...]) -> float:
    """CIoU of two xywh boxes from the definition (Zheng et al., 2020), in plain floats."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = b1, b2
    iw = max(0.0, min(x1 + w1 / 2, x2 + w2 / 2) - max(x1 - w1 / 2, x2 - w2 / 2))
    ih = max(0.0, min(y1 + h1 / 2, y2 + h2 / 2) - max(y1 - h1 / 2, y2 - h2 / 2))
    iou = iw * ih / (w1 * h1 + w2 * h2 - iw * ih)
    cw = max(x1 + w1 / 2, x2 + w2 / 2) - min(x1 - w1 / 2, x2 - w2 / 2)
    ch = max(y1 + h1 / 2, y2 + h2 / 2) - min(y1 - h1 / 2, y2 - h2 / 2)
    rho2 = (x1 - x2) ** 2 + (y1 - y2) ** 2
    v = 4 / math.pi**2 * (math.atan(w2 / h2) - math.atan(w1 / h1)) ** 2
    alpha = v / (1 - iou + v)
    return iou - rho2 / (cw**2 + ch**2) - alpha * v


@pytest.mark.parametrize(
    ("b1", "b2"),
    [
        ((0.5, 0.5, 1.0, 1.0), (0.5, 0.5, 2.0, 2.0)),
        ((0.25, 0.75, 1.5, 0.5), (0.6, 0.4, 1.0, 2.0)),
        ((0.0, 0.0, 1.0, 1.0), (3.0, 4.0, 2.0, 1.0)),  # disjoint: CIoU < 0
    ],
)
def test_bbox_ciou_used_by_the_loss_matches_definition(b1, b2):
    got = bbox_iou(torch.tensor([b1]), torch.tensor([b2]), CIoU=True)
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(_reference_ciou(b1, b2), abs=1e-6)


# ---------------------------------------------------------------- construction errors


def test_missing_hyp_key_is_named():
    hyp = {k: v for k, v in HYP.items() if k != "anchor_t"}
    with pytest.raises(KeyError, match="anchor_t"):
        ComputeLoss(FakeModel([[[1.0, 1.0]]]), hyp)


def test_model_without_detect_head_is_rejected():
    model = nn.Module()
    model.model = nn.Sequential(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="Detect head"):
        ComputeLoss(model, HYP)
    with pytest.raises(ValueError, match="Detect head"):
        ComputeLoss(nn.Linear(2, 2), HYP)


# ---------------------------------------------------------------- with the real model


def test_loss_on_detection_model():
    yolo = pytest.importorskip("models.yolo")
    torch.manual_seed(0)
    model = yolo.DetectionModel("yolov5n.yaml", nc=3).train()
    loss = ComputeLoss(model, HYP, imgsz=64)
    preds = model(torch.rand(2, 3, 64, 64))
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 2, 0.2, 0.3, 0.1, 0.1]])
    total, items = loss(preds, targets)
    total.backward()
    assert total.shape == (1,) and items.shape == (3,) and torch.isfinite(items).all()
    assert loss.gains["obj"] == pytest.approx((64 / 640) ** 2)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
