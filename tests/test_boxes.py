"""Box conversions, IoU variants, clipping, rescaling and NMS against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from utils.boxes import (
    bbox_iou,
    box_area,
    box_iou,
    clip_boxes,
    non_max_suppression,
    scale_boxes,
    xyn2xy,
    xywh2xyxy,
    xywhn2xyxy,
    xyxy2xywh,
    xyxy2xywhn,
)

# Two 10x10 squares overlapping in a 5x5 corner: IoU = 25 / (100 + 100 - 25) = 1/7.
SQUARE_A = [0.0, 0.0, 10.0, 10.0]
SQUARE_B = [5.0, 5.0, 15.0, 15.0]


# ---------------------------------------------------------------- conversions


@pytest.mark.parametrize("kind", [torch.tensor, np.array])
def test_xyxy_xywh_known_values_and_round_trip(kind):
    xyxy = kind([[0.0, 0.0, 10.0, 20.0], [4.0, 6.0, 8.0, 7.0]])
    xywh = xyxy2xywh(xyxy)
    assert type(xywh) is type(xyxy)
    np.testing.assert_allclose(np.asarray(xywh), [[5, 10, 10, 20], [6, 6.5, 4, 1]])
    np.testing.assert_allclose(np.asarray(xywh2xyxy(xywh)), np.asarray(xyxy))
    np.testing.assert_allclose(np.asarray(xyxy), [[0, 0, 10, 20], [4, 6, 8, 7]])  # input untouched


def test_conversions_promote_integers_and_keep_leading_dims():
    out = xyxy2xywh(np.array([[0, 0, 3, 3]]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[1.5, 1.5, 3, 3]])
    batched = torch.zeros(2, 3, 4)
    assert xywh2xyxy(batched).shape == (2, 3, 4)


@pytest.mark.parametrize("kind", [torch.tensor, np.array])
def test_normalised_conversions(kind):
    xywhn = kind([[0.5, 0.5, 0.5, 0.5]])
    xyxy = xywhn2xyxy(xywhn, w=100, h=200, padw=10, padh=0)
    np.testing.assert_allclose(np.asarray(xyxy), [[35, 50, 85, 150]])
    back = xyxy2xywhn(xyxy - kind([[10.0, 0.0, 10.0, 0.0]]), w=100, h=200)
    np.testing.assert_allclose(np.asarray(back), np.asarray(xywhn))


def test_xyxy2xywhn_clip_works_on_a_copy():
    xyxy = np.array([[-10.0, 0.0, 50.0, 250.0]])
    out = xyxy2xywhn(xyxy, w=100, h=200, clip=True)
    np.testing.assert_allclose(out, [[0.25, 0.5, 0.5, 1.0]])
    np.testing.assert_allclose(xyxy, [[-10, 0, 50, 250]])


def test_xyn2xy():
    points = np.array([[0.0, 0.0], [0.5, 1.0]])
    np.testing.assert_allclose(xyn2xy(points, w=100, h=50, padw=1, padh=2), [[1, 2], [51, 52]])


# ---------------------------------------------------------------- IoU


def test_box_area_and_pairwise_iou():
    boxes = torch.tensor([SQUARE_A, SQUARE_B, [20.0, 20.0, 30.0, 30.0]])
    assert box_area(boxes).tolist() == [100, 100, 100]
    iou = box_iou(boxes, boxes)
    assert iou.shape == (3, 3)
    assert torch.allclose(iou.diagonal(), torch.ones(3))
    assert iou[0, 1] == pytest.approx(1 / 7, abs=1e-6)
    assert iou[0, 2] == 0 and iou[1, 2] == 0
    assert box_iou(boxes, torch.zeros(0, 4)).shape == (3, 0)


def test_bbox_iou_variants_known_values():
    a, b = torch.tensor([SQUARE_A]), torch.tensor([SQUARE_B])
    assert bbox_iou(a, b, xywh=False).item() == pytest.approx(1 / 7, abs=1e-6)
    # Enclosing box 15x15 = 225, union 175: GIoU = 1/7 - 50/225.
    assert bbox_iou(a, b, xywh=False, GIoU=True).item() == pytest.approx(1 / 7 - 2 / 9, abs=1e-6)
    # Centres (5,5) and (10,10): distance^2 50, enclosing diagonal^2 450: DIoU = 1/7 - 1/9.
    assert bbox_iou(a, b, xywh=False, DIoU=True).item() == pytest.approx(1 / 7 - 1 / 9, abs=1e-6)
    # Same aspect ratio, so the CIoU aspect term vanishes.
    assert bbox_iou(a, b, xywh=False, CIoU=True).item() == pytest.approx(1 / 7 - 1 / 9, abs=1e-6)


def test_ciou_aspect_term():
    # 2x2 square inside a 4x2 box: IoU 0.5, centres 1 apart, enclosing diagonal^2 = 20.
    a, b = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[0.0, 0.0, 4.0, 2.0]])
    v = 4 / math.pi**2 * (math.atan(4 / 2) - math.atan(2 / 2)) ** 2
    alpha = v / (v - 0.5 + 1)
    expected = 0.5 - 1 / 20 - alpha * v
    assert bbox_iou(a, b, xywh=False, CIoU=True).item() == pytest.approx(expected, abs=1e-6)


def test_bbox_iou_xywh_and_broadcasting():
    a_xywh = torch.tensor([[5.0, 5.0, 10.0, 10.0]])
    b_xywh = torch.tensor([[10.0, 10.0, 10.0, 10.0], [5.0, 5.0, 10.0, 10.0], [100.0, 100.0, 1.0, 1.0]])
    iou = bbox_iou(b_xywh, a_xywh)
    assert iou.shape == (3, 1)
    np.testing.assert_allclose(iou.squeeze(1).numpy(), [1 / 7, 1.0, 0.0], atol=1e-6)


def test_ciou_gradient_flows():
    a = torch.tensor([[5.0, 5.0, 4.0, 8.0]], requires_grad=True)
    loss = (1 - bbox_iou(a, torch.tensor([[6.0, 5.0, 6.0, 6.0]]), CIoU=True)).sum()
    loss.backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


# ---------------------------------------------------------------- clipping and rescaling


def test_clip_boxes_in_place_tensor_and_array():
    t = torch.tensor([[-5.0, -5.0, 700.0, 300.0]])
    assert clip_boxes(t, (200, 640)) is t
    assert t.tolist() == [[0, 0, 640, 200]]
    a = np.array([[-5.0, 10.0, 700.0, 300.0]])
    clip_boxes(a, (200, 640))
    np.testing.assert_allclose(a, [[0, 10, 640, 200]])


def test_scale_boxes_recomputes_letterbox():
    # 240x320 image letterboxed into 640x640: gain 2, 80 px of padding top and bottom.
    boxes = torch.tensor([[100.0, 180.0, 200.0, 280.0]])
    out = scale_boxes((640, 640), boxes, (240, 320))
    assert out.tolist() == [[50, 50, 100, 100]]
    assert boxes.tolist() == [[50, 50, 100, 100]]  # in place, as callers rely on


def test_scale_boxes_with_ratio_pad_and_clipping():
    boxes = np.array([[0.0, 70.0, 660.0, 570.0]])
    scale_boxes((640, 640), boxes, (480, 640), ratio_pad=((1.0, 1.0), (0, 80)))
    np.testing.assert_allclose(boxes, [[0, 0, 640, 480]])


# ---------------------------------------------------------------- NMS


def _prediction(rows, nc=2):
    """(1, n, 5 + nc) prediction from rows [xc, yc, w, h, obj, cls scores...]."""
    return torch.tensor([rows], dtype=torch.float32).reshape(1, -1, 5 + nc)


# A: class 0 conf 0.81; B: same place as C, class 0 conf 0.72, IoU(A, B) = 360/440 > 0.45;
# C: like B but class 1; D: far away, class 1 conf 0.54 (class 0 gives 0.27); E: objectness too low.
ROWS = [
    [50, 50, 20, 20, 0.9, 0.9, 0.1],  # A
    [52, 50, 20, 20, 0.8, 0.9, 0.1],  # B
    [52, 50, 20, 20, 0.8, 0.1, 0.9],  # C
    [150, 150, 20, 20, 0.9, 0.3, 0.6],  # D
    [300, 300, 20, 20, 0.1, 1.0, 0.0],  # E
]


def _summary(det):
    return [(round(c, 4), int(k)) for c, k in zip(det[:, 4].tolist(), det[:, 5].tolist())]


def test_nms_suppresses_same_class_and_keeps_other_classes():
    (det,) = non_max_suppression(_prediction(ROWS))
    assert det.shape == (3, 6)
    assert _summary(det) == [(0.81, 0), (0.72, 1), (0.54, 1)]
    assert det[0, :4].tolist() == [40, 40, 60, 60]  # xywh -> xyxy


def test_nms_agnostic_suppresses_across_classes():
    (det,) = non_max_suppression(_prediction(ROWS), agnostic=True)
    assert _summary(det) == [(0.81, 0), (0.54, 1)]


def test_nms_max_det_classes_and_max_nms():
    assert _summary(non_max_suppression(_prediction(ROWS), max_det=1)[0]) == [(0.81, 0)]
    assert _summary(non_max_suppression(_prediction(ROWS), classes=[1])[0]) == [(0.72, 1), (0.54, 1)]
    assert _summary(non_max_suppression(_prediction(ROWS), max_nms=1)[0]) == [(0.81, 0)]


def test_nms_multi_label_keeps_every_class_above_threshold():
    (det,) = non_max_suppression(_prediction(ROWS), multi_label=True)
    assert _summary(det) == [(0.81, 0), (0.72, 1), (0.54, 1), (0.27, 0)]


def test_nms_class_offsets_with_negative_coordinates():
    rows = [[-5, -5, 20, 20, 0.9, 0.9, 0.1], [-4, -5, 20, 20, 0.9, 0.1, 0.8]]
    (det,) = non_max_suppression(_prediction(rows))
    assert sorted(det[:, 5].tolist()) == [0, 1]


def test_nms_labels_are_added_as_confident_predictions():
    labels = [torch.tensor([[1.0, 400.0, 400.0, 10.0, 10.0]])]
    (det,) = non_max_suppression(_prediction(ROWS), labels=labels)
    assert _summary(det)[0] == (1.0, 1)
    assert det[0, :4].tolist() == [395, 395, 405, 405]


def test_nms_batches_tuple_input_and_empty_images():
    pred = torch.cat((_prediction(ROWS), torch.zeros(1, 5, 7)), 0)
    out = non_max_suppression((pred, [torch.zeros(1)]))
    assert len(out) == 2 and len(out[0]) == 3
    assert out[1].shape == (0, 6)
    assert non_max_suppression(torch.zeros(1, 0, 7))[0].shape == (0, 6)


def test_nms_single_class_model():
    rows = [[50, 50, 20, 20, 0.9, 1.0], [51, 50, 20, 20, 0.8, 1.0]]
    (det,) = non_max_suppression(_prediction(rows, nc=1), multi_label=True)
    assert _summary(det) == [(0.9, 0)]


@pytest.mark.parametrize("kwargs", [{"conf_thres": 1.5}, {"iou_thres": -0.1}])
def test_nms_rejects_invalid_thresholds(kwargs):
    with pytest.raises(ValueError, match="valid values"):
        non_max_suppression(_prediction(ROWS), **kwargs)
