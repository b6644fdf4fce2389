"""Image augmentations for detection: letterbox, random affine/perspective, HSV jitter, mosaic, mixup, flips.

Every function takes numpy arrays and returns new ones (inputs are not modified). Images are
uint8 HWC BGR as OpenCV reads them. Random draws come from an explicit ``np.random.Generator``
so a caller controls reproducibility.

Box conventions:
- ``labels_xyxy``: float (n, 5) rows ``[class, x1, y1, x2, y2]`` in pixels of the image they go with.
- ``labels_xywhn``: float (n, 5) rows ``[class, xc, yc, w, h]`` normalised to 0..1.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

PAD_VALUE = 114  # grey used for every border and empty canvas, as YOLOv5 users expect


def letterbox(
    im: np.ndarray,
    new_shape: int | tuple[int, int] = 640,
    color: tuple[int, int, int] = (PAD_VALUE, PAD_VALUE, PAD_VALUE),
    auto: bool = True,
    scaleFill: bool = False,  # noqa: N803 - name kept for YOLOv5 users
    scaleup: bool = True,
    stride: int = 32,
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize keeping aspect ratio, then pad to ``new_shape`` (h, w).

    Args:
        im: (H, W, C) uint8 image.
        new_shape: target (h, w) in pixels, or one int for a square.
        auto: pad only up to the next multiple of ``stride`` (minimum rectangle) instead of ``new_shape``.
        scaleFill: stretch to ``new_shape`` without padding (aspect ratio not kept).
        scaleup: allow enlarging; False only shrinks (better for validation mAP).

    Returns:
        (image, (rw, rh) scale factors, (dw, dh) padding on each side in pixels, possibly fractional).
        A point maps as ``x_new = x * rw + dw``.
    """
    h0, w0 = im.shape[:2]
    th, tw = (int(new_shape), int(new_shape)) if np.isscalar(new_shape) else (int(v) for v in new_shape)
    r = min(th / h0, tw / w0)
    if not scaleup:
        r = min(r, 1.0)
    rw = rh = r
    new_w, new_h = round(w0 * r), round(h0 * r)
    dw, dh = tw - new_w, th - new_h
    if auto:
        dw, dh = dw % stride, dh % stride
    elif scaleFill:
        dw, dh = 0, 0
        new_w, new_h = tw, th
        rw, rh = tw / w0, th / h0
    dw, dh = dw / 2, dh / 2
    if (w0, h0) != (new_w, new_h):
        im = cv2.resize(im, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    # Splitting an odd padding: the extra pixel goes bottom/right; +-0.1 makes round() deterministic.
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return im, (rw, rh), (dw, dh)


def box_candidates(
    box_before: np.ndarray,
    box_after: np.ndarray,
    wh_thr: float = 2.0,
    ar_thr: float = 100.0,
    area_thr: float = 0.1,
    eps: float = 1e-16,
) -> np.ndarray:
    """Which boxes survive an augmentation.

    Args:
        box_before: (n, 4) xyxy boxes transformed but not yet clipped to the image.
        box_after: (n, 4) xyxy boxes after clipping.

    Returns:
        (n,) bool: width and height > ``wh_thr`` px, clipped area / unclipped area > ``area_thr``,
        and aspect ratio (either way) < ``ar_thr``.
    """
    w1, h1 = box_before[:, 2] - box_before[:, 0], box_before[:, 3] - box_before[:, 1]
    w2, h2 = box_after[:, 2] - box_after[:, 0], box_after[:, 3] - box_after[:, 1]
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    kept_area = (w2 * h2) / (w1 * h1 + eps)
    return (w2 > wh_thr) & (h2 > wh_thr) & (kept_area > area_thr) & (aspect < ar_thr)


def _affine_matrix(
    height: int,
    width: int,
    out_hw: tuple[int, int],
    rng: np.random.Generator,
    degrees: float,
    translate: float,
    scale: float,
    shear: float,
    perspective: float,
) -> tuple[np.ndarray, float]:
    """Random 3x3 homography mapping input pixels to output pixels, and its scale factor."""
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -width / 2, -height / 2  # move the image centre to the origin

    persp = np.eye(3)
    persp[2, 0], persp[2, 1] = rng.uniform(-perspective, perspective, size=2)

    angle = rng.uniform(-degrees, degrees)
    s = rng.uniform(1 - scale, 1 + scale)
    rot = np.eye(3)
    rot[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=angle, scale=s)

    shr = np.eye(3)
    shr[0, 1], shr[1, 0] = np.tan(np.radians(rng.uniform(-shear, shear, size=2)))

    out_h, out_w = out_hw
    move = np.eye(3)  # back from the origin to somewhere near the output centre
    move[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_w
    move[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_h
    return move @ shr @ rot @ persp @ centre, s


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Map (n, 4) xyxy boxes through a 3x3 homography by their 4 corners; returns the enclosing xyxy."""
    n = len(boxes)
    if n == 0:
        return boxes.reshape(0, 4).astype(np.float64)
    corners = np.ones((n * 4, 3))
    corners[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)  # x1y1, x2y2, x1y2, x2y1
    mapped = corners @ matrix.T
    xy = mapped[:, :2] / mapped[:, 2:3]
    xs, ys = xy[:, 0].reshape(n, 4), xy[:, 1].reshape(n, 4)
    return np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)


def random_perspective(
    im: np.ndarray,
    labels_xyxy: np.ndarray,
    rng: np.random.Generator,
    degrees: float = 10.0,
    translate: float = 0.1,
    scale: float = 0.1,
    shear: float = 10.0,
    perspective: float = 0.0,
    border: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation, scale, shear, translation and perspective of an image and its boxes.

    Args:
        im: (H, W, 3) uint8 image.
        labels_xyxy: (n, 5) ``[class, x1, y1, x2, y2]`` in pixels of ``im``.
        degrees, shear: ranges in degrees (+-); translate: fraction of output size (+-);
        scale: gain drawn from 1 +- scale; perspective: +- coefficient (0.0 to ~0.001).
        border: (top/bottom, left/right) pixels added on each side; negative crops. The output is
        (H + 2 * border[0], W + 2 * border[1]); a mosaic passes (-s/2, -s/2) to go from 2s to s.

    Returns:
        (image, labels) with labels in output pixels; boxes failing ``box_candidates`` are dropped.
    """
    out_h, out_w = im.shape[0] + 2 * border[0], im.shape[1] + 2 * border[1]
    matrix, _ = _affine_matrix(
        im.shape[0], im.shape[1], (out_h, out_w), rng, degrees, translate, scale, shear, perspective
    )
    fill = (PAD_VALUE, PAD_VALUE, PAD_VALUE)
    if border[0] != 0 or border[1] != 0 or not np.allclose(matrix, np.eye(3)):
        if perspective:
            im = cv2.warpPerspective(im, matrix, dsize=(out_w, out_h), borderValue=fill)
        else:
            im = cv2.warpAffine(im, matrix[:2], dsize=(out_w, out_h), borderValue=fill)

    labels = np.asarray(labels_xyxy, dtype=np.float32).reshape(-1, 5)
    if len(labels) == 0:
        return im, labels
    unclipped = transform_boxes(labels[:, 1:5].astype(np.float64), matrix)
    clipped = unclipped.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, out_w)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, out_h)
    keep = box_candidates(unclipped, clipped)
    out = np.concatenate([labels[keep, :1], clipped[keep].astype(np.float32)], axis=1)
    return im, out


def augment_hsv(
    im: np.ndarray, rng: np.random.Generator, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5
) -> np.ndarray:
    """Random multiplicative gains on hue, saturation and value of a (H, W, 3) uint8 BGR image."""
    if not (hgain or sgain or vgain):
        return im
    gains = rng.uniform(-1, 1, 3) * np.array([hgain, sgain, vgain]) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_h = ((x * gains[0]) % 180).astype(np.uint8)  # OpenCV hue runs 0..179 and wraps
    lut_s = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def mixup(
    im: np.ndarray, labels: np.ndarray, im2: np.ndarray, labels2: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Blend two same-size images with a Beta(32, 32) weight and keep the boxes of both."""
    r = rng.beta(32.0, 32.0)
    blended = (im.astype(np.float32) * r + im2.astype(np.float32) * (1 - r)).round().astype(np.uint8)
    return blended, np.concatenate([labels, labels2], axis=0)


def mosaic_placements(
    center: tuple[int, int], sizes: list[tuple[int, int]], canvas: int
) -> list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """Where each of 4 images goes around a centre: top-left, top-right, bottom-left, bottom-right.

    Args:
        center: (xc, yc) on the canvas in pixels.
        sizes: four (h, w) image sizes.
        canvas: side of the square canvas in pixels.

    Returns:
        Per image ((x1, y1, x2, y2) on the canvas, (x1, y1, x2, y2) source crop); both rectangles
        have the same size, each image touching the centre with one corner.
    """
    xc, yc = center
    out = []
    for k, (h, w) in enumerate(sizes):
        right, below = k in (1, 3), k in (2, 3)
        x1, x2 = (xc, min(xc + w, canvas)) if right else (max(xc - w, 0), xc)
        y1, y2 = (yc, min(yc + h, canvas)) if below else (max(yc - h, 0), yc)
        sx1 = 0 if right else w - (x2 - x1)
        sy1 = 0 if below else h - (y2 - y1)
        out.append(((x1, y1, x2, y2), (sx1, sy1, sx1 + x2 - x1, sy1 + y2 - y1)))
    return out


def mosaic4(
    images: list[np.ndarray], labels_xyxy: list[np.ndarray], size: int, center: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Tile 4 images around ``center`` on a grey (2*size, 2*size) canvas.

    Args:
        images: four (h, w, 3) uint8 images, each already resized so its long side is ``size``.
        labels_xyxy: four (n_i, 5) ``[class, x1, y1, x2, y2]`` arrays in pixels of their image.
        center: (xc, yc) canvas pixels, normally drawn from [0.5 * size, 1.5 * size].

    Returns:
        (canvas (2s, 2s, 3), labels (sum n_i, 5) in canvas pixels clipped to the canvas). Boxes are not
        filtered here; ``random_perspective`` with ``border=(-size // 2, -size // 2)`` follows.
    """
    side = 2 * size
    canvas = np.full((side, side, images[0].shape[2]), PAD_VALUE, dtype=np.uint8)
    placed = []
    places = mosaic_placements(center, [im.shape[:2] for im in images], side)
    for im, lab, ((x1, y1, x2, y2), (sx1, sy1, sx2, sy2)) in zip(images, labels_xyxy, places, strict=True):
        canvas[y1:y2, x1:x2] = im[sy1:sy2, sx1:sx2]
        shifted = np.asarray(lab, dtype=np.float32).reshape(-1, 5).copy()
        shifted[:, [1, 3]] += x1 - sx1
        shifted[:, [2, 4]] += y1 - sy1
        placed.append(shifted)
    labels = np.concatenate(placed, axis=0)
    labels[:, 1:] = labels[:, 1:].clip(0, side)
    return canvas, labels


def flip_lr(im: np.ndarray, labels_xywhn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right; labels (n, 5) normalised ``[class, xc, yc, w, h]``."""
    labels = labels_xywhn.copy()
    labels[:, 1] = 1 - labels[:, 1]
    return np.ascontiguousarray(im[:, ::-1]), labels


def flip_ud(im: np.ndarray, labels_xywhn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror top-bottom; labels (n, 5) normalised ``[class, xc, yc, w, h]``."""
    labels = labels_xywhn.copy()
    labels[:, 2] = 1 - labels[:, 2]
    return np.ascontiguousarray(im[::-1]), labels


def resize_long_side(im: np.ndarray, size: int, augment: bool) -> np.ndarray:
    """Resize so the long side is ``size`` px (aspect kept).

    Shrinking uses INTER_AREA (sharper) unless augmenting, where the faster INTER_LINEAR is fine.
    """
    h0, w0 = im.shape[:2]
    r = size / max(h0, w0)
    if r == 1:
        return im
    interp = cv2.INTER_LINEAR if (augment or r > 1) else cv2.INTER_AREA
    new_wh = (min(math.ceil(w0 * r), size), min(math.ceil(h0 * r), size))
    return cv2.resize(im, new_wh, interpolation=interp)
