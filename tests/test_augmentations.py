"""Augmentations keep boxes on the pixels they describe.

Each test paints filled rectangles of unique colours on a grey image, labels them, transforms both,
and checks every output box against the bounding box of its colour's pixels.
"""

from __future__ import annotations

import numpy as np
import pytest

from utils.augmentations import (
    augment_hsv,
    box_candidates,
    flip_lr,
    flip_ud,
    letterbox,
    mixup,
    mosaic4,
    random_perspective,
    transform_boxes,
)

GREY = np.array([114, 114, 114])
COLOURS = np.array([[0, 0, 255], [0, 255, 0], [255, 0, 0], [0, 255, 255]])  # BGR, one per class
TOL = 2.0  # pixels


def painted(h: int, w: int, boxes: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Grey image with box k filled in COLOURS[k]; labels (n, 5) [class, x1, y1, x2, y2] pixels."""
    im = np.full((h, w, 3), 114, np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        im[y1:y2, x1:x2] = COLOURS[k]
    labels = np.array([[k, *b] for k, b in enumerate(boxes)], dtype=np.float32).reshape(-1, 5)
    return im, labels


def colour_box(im: np.ndarray, k: int) -> np.ndarray | None:
    """xyxy (x2, y2 exclusive) of pixels nearer to COLOURS[k] than to grey or any other colour."""
    palette = np.concatenate([GREY[None], COLOURS])  # index 0 is grey
    dist = np.abs(im.astype(int)[:, :, None] - palette[None, None]).sum(-1)
    ys, xs = np.nonzero(dist.argmin(-1) == k + 1)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)


def assert_aligned(im: np.ndarray, labels: np.ndarray, tol: float = TOL) -> None:
    assert len(labels) > 0
    for row in labels:
        found = colour_box(im, int(row[0]))
        assert found is not None, f"class {int(row[0])} labelled but not visible"
        np.testing.assert_allclose(row[1:5], found, atol=tol, err_msg=f"class {int(row[0])}")


@pytest.mark.parametrize(
    "hw,new_shape,kw",
    [
        ((300, 500), 640, {}),
        ((500, 300), 320, {"auto": False}),
        ((200, 100), 640, {"auto": False, "scaleup": False}),
        ((333, 517), (256, 320), {"auto": False, "scaleFill": True}),
        ((480, 640), 640, {}),
    ],
)
def test_letterbox_maps_boxes(hw, new_shape, kw):
    h, w = hw
    im, labels = painted(h, w, [(10, 20, 60, 90), (w // 2, h // 3, w - 5, h - 7)])
    out, (rw, rh), (dw, dh) = letterbox(im, new_shape, **kw)
    mapped = labels.copy()
    mapped[:, [1, 3]] = labels[:, [1, 3]] * rw + dw
    mapped[:, [2, 4]] = labels[:, [2, 4]] * rh + dh
    assert_aligned(out, mapped)
    th, tw = (new_shape, new_shape) if isinstance(new_shape, int) else new_shape
    if kw.get("auto", True):
        assert out.shape[0] % 32 == 0 and out.shape[1] % 32 == 0
        assert max(out.shape[:2]) == max(th, tw)
    else:
        assert out.shape[:2] == (th, tw)
    assert (out[0, 0] == 114).all() or dh < 0.5 and dw < 0.5


def test_letterbox_no_scaleup_keeps_size():
    im, _ = painted(100, 200, [])
    out, ratio, _ = letterbox(im, 640, auto=False, scaleup=False)
    assert ratio == (1.0, 1.0) and out.shape[:2] == (640, 640)


@pytest.mark.parametrize(
    "params",
    [
        {"degrees": 0, "translate": 0.1, "scale": 0.5, "shear": 0},
        {"degrees": 30, "translate": 0.1, "scale": 0.3, "shear": 0},
        {"degrees": 0, "translate": 0.0, "scale": 0.2, "shear": 5},
        {"degrees": 0, "translate": 0.05, "scale": 0.0, "shear": 0, "perspective": 0.0005},
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_perspective_keeps_boxes_on_pixels(params, seed):
    im, labels = painted(320, 400, [(100, 80, 180, 200), (220, 150, 300, 230)])
    out, out_labels = random_perspective(im, labels, np.random.default_rng(seed), **params)
    assert out.shape == im.shape
    tol = TOL if params["degrees"] == 0 and params["shear"] == 0 else 3.0
    assert_aligned(out, out_labels, tol)


def test_random_perspective_rotation_of_rectangle_is_exact_bbox():
    im, labels = painted(300, 300, [(110, 120, 190, 170)])
    for seed in range(5):
        out, out_labels = random_perspective(
            im, labels, np.random.default_rng(seed), degrees=45, translate=0, scale=0, shear=0
        )
        assert_aligned(out, out_labels, tol=2.0)


def test_random_perspective_border_changes_size_and_drops_outside_boxes():
    im, labels = painted(400, 400, [(5, 5, 40, 40), (150, 150, 250, 250)])
    out, out_labels = random_perspective(
        im, labels, np.random.default_rng(0), degrees=0, translate=0, scale=0, shear=0, border=(-100, -100)
    )
    assert out.shape[:2] == (200, 200)
    assert out_labels[:, 0].tolist() == [1]  # box 0 lies in the cropped-away border
    assert_aligned(out, out_labels)


def test_identity_transform_keeps_image():
    im, labels = painted(64, 96, [(10, 10, 30, 40)])
    out, out_labels = random_perspective(im, labels, np.random.default_rng(0), 0, 0, 0, 0, 0)
    np.testing.assert_array_equal(out, im)
    np.testing.assert_allclose(out_labels, labels)


def test_transform_boxes_by_translation():
    m = np.eye(3)
    m[0, 2], m[1, 2] = 5, -3
    np.testing.assert_allclose(transform_boxes(np.array([[0.0, 10, 20, 30]]), m), [[5, 7, 25, 27]])
    assert transform_boxes(np.zeros((0, 4)), m).shape == (0, 4)


def test_box_candidates_thresholds():
    before = np.array([[0, 0, 100, 100], [0, 0, 100, 100], [0, 0, 100, 100], [0, 0, 300, 1]], float)
    after = np.array([[0, 0, 90, 90], [0, 0, 5, 5], [0, 0, 100, 2], [0, 0, 300, 3]], float)
    assert box_candidates(before, after).tolist() == [True, False, False, False]


def test_flips_mirror_boxes():
    im, labels = painted(120, 200, [(20, 10, 70, 50)])
    h, w = im.shape[:2]
    xywhn = np.array([[0, 45 / w, 30 / h, 50 / w, 40 / h]], np.float32)
    original = xywhn.copy()
    for flip in (flip_lr, flip_ud):
        out, lab = flip(im, xywhn)
        xc, yc, bw, bh = lab[0, 1:]
        box = np.array([(xc - bw / 2) * w, (yc - bh / 2) * h, (xc + bw / 2) * w, (yc + bh / 2) * h])
        np.testing.assert_allclose(box, colour_box(out, 0), atol=1e-4)
    np.testing.assert_array_equal(xywhn, original)  # input untouched


@pytest.mark.parametrize("seed", range(6))
def test_mosaic_then_perspective_keeps_boxes_on_pixels(seed):
    rng = np.random.default_rng(seed)
    s = 160
    images, labels = [], []
    for k, (h, w) in enumerate([(160, 120), (100, 160), (160, 160), (80, 160)]):
        x1, y1 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        im, _ = painted(h, w, [])
        im[y1 : y1 + h // 3, x1 : x1 + w // 3] = COLOURS[k]
        images.append(im)
        labels.append(np.array([[k, x1, y1, x1 + w // 3, y1 + h // 3]], np.float32))
    center = (int(rng.uniform(s / 2, 1.5 * s)), int(rng.uniform(s / 2, 1.5 * s)))
    canvas, canvas_labels = mosaic4(images, labels, s, center)
    assert canvas.shape == (2 * s, 2 * s, 3)
    keep = (canvas_labels[:, 3] > canvas_labels[:, 1]) & (canvas_labels[:, 4] > canvas_labels[:, 2])
    assert_aligned(canvas, canvas_labels[keep])
    out, out_labels = random_perspective(
        canvas, canvas_labels, rng, degrees=0, translate=0.1, scale=0.5, shear=0, border=(-s // 2, -s // 2)
    )
    assert out.shape == (s, s, 3)
    if len(out_labels):
        assert_aligned(out, out_labels)


def test_augment_hsv_is_seeded_and_zero_gain_is_identity():
    im, _ = painted(50, 60, [(5, 5, 30, 30)])
    assert augment_hsv(im, np.random.default_rng(0), 0, 0, 0) is im
    a = augment_hsv(im, np.random.default_rng(1), 0.015, 0.7, 0.4)
    b = augment_hsv(im, np.random.default_rng(1), 0.015, 0.7, 0.4)
    np.testing.assert_array_equal(a, b)
    assert a.shape == im.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(im[0, 0], [114, 114, 114])  # input untouched


def test_mixup_blends_and_concatenates():
    a, la = painted(40, 40, [(0, 0, 10, 10)])
    b = np.zeros_like(a)
    out, labels = mixup(a, la, b, la + 1, np.random.default_rng(0))
    assert labels.shape == (2, 5)
    assert 0 < out[20, 20, 0] < 114
