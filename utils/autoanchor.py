"""AutoAnchor: check that the anchors fit the labels and refit them (k-means + evolution) when not."""

from __future__ import annotations

import numpy as np
import torch

from utils.general import LOGGER, colorstr

PREFIX = colorstr("AutoAnchor: ")
BPR_TARGET = 0.98


def label_wh(dataset, imgsz: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Box sizes (n, 2) in pixels at training size, each image jittered in scale by 0.9-1.1."""
    shapes = imgsz * dataset.shapes / dataset.shapes.max(1, keepdims=True)  # (N, 2) w, h
    scale = (rng or np.random.default_rng(0)).uniform(0.9, 1.1, size=(len(shapes), 1))
    parts = [lab[:, 3:5] * s for s, lab in zip(shapes * scale, dataset.labels) if len(lab)]
    return np.concatenate(parts, 0) if parts else np.zeros((0, 2))


def _ratio_metric(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """(n, k) worst-side ratio match in 0..1 between every box and every anchor."""
    r = wh[:, None] / anchors[None]
    return np.minimum(r, 1 / r).min(2)


def anchor_fit(wh: np.ndarray, anchors: np.ndarray, thr: float) -> tuple[float, float]:
    """(best possible recall, anchors above threshold per box) for pixel anchors (k, 2)."""
    if not len(wh):
        return 1.0, 0.0
    x = _ratio_metric(wh, anchors)
    best = x.max(1)
    return float((best > 1 / thr).mean()), float((x > 1 / thr).sum(1).mean())


def _fitness(wh: np.ndarray, anchors: np.ndarray, thr: float) -> float:
    best = _ratio_metric(wh, anchors).max(1)
    return float((best * (best > 1 / thr)).mean())


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator, iters: int = 30) -> np.ndarray:
    """Plain Lloyd k-means with k-means++ seeding; returns (k, dims) centroids."""
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        d = np.min(((points[:, None] - np.array(centres)[None]) ** 2).sum(-1), 1)
        centres.append(
            points[rng.choice(len(points), p=d / d.sum()) if d.sum() else rng.integers(len(points))]
        )
    c = np.array(centres, dtype=np.float64)
    for _ in range(iters):
        assign = ((points[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        for j in range(k):
            if (assign == j).any():
                c[j] = points[assign == j].mean(0)
    return c


def fit_anchors(
    wh: np.ndarray, n: int = 9, thr: float = 4.0, generations: int = 1000, seed: int = 0
) -> np.ndarray:
    """k-means on whitened box sizes, then random mutation keeping improvements; (n, 2) sorted by area."""
    rng = np.random.default_rng(seed)
    wh = wh[(wh >= 2.0).any(1)].astype(np.float64)  # tiny boxes say nothing about anchor shape
    if len(wh) < n:
        raise ValueError(f"only {len(wh)} usable boxes, need at least {n} to fit anchors")
    sigma = wh.std(0)
    anchors = kmeans(wh / sigma, n, rng) * sigma
    best = _fitness(wh, anchors, thr)
    for _ in range(generations):
        mutate = (rng.random(anchors.shape) < 0.9) * rng.standard_normal(anchors.shape) * 0.1 + 1
        candidate = (anchors * mutate.clip(0.3, 3.0)).clip(min=2.0)
        f = _fitness(wh, candidate, thr)
        if f > best:
            best, anchors = f, candidate
    return anchors[np.argsort(anchors.prod(1))]


def check_anchors(dataset, model, thr: float = 4.0, imgsz: int = 640) -> bool:
    """Refit the model's anchors in place when best possible recall < 0.98; True if anchors changed."""
    detect = model.detect
    stride = detect.stride.view(-1, 1, 1)
    current = (detect.anchors * stride).view(-1, 2).cpu().numpy()
    wh = label_wh(dataset, imgsz)
    bpr, aat = anchor_fit(wh, current, thr)
    msg = f"{aat:.2f} anchors/target, {bpr:.3f} Best Possible Recall (BPR). "
    if bpr >= BPR_TARGET:
        LOGGER.info(f"{PREFIX}{msg}Current anchors are a good fit to dataset")
        return False
    LOGGER.info(f"{PREFIX}{msg}Anchors are a poor fit to dataset, attempting to improve...")
    try:
        new = fit_anchors(wh, n=current.shape[0], thr=thr)
    except ValueError as e:
        LOGGER.warning(f"{PREFIX}WARNING: {e}; keeping the original anchors")
        return False
    new_bpr, _ = anchor_fit(wh, new, thr)
    if new_bpr <= bpr:
        LOGGER.info(
            f"{PREFIX}Fitted anchors are not better (BPR {new_bpr:.3f}); keeping the original anchors"
        )
        return False
    t = torch.tensor(new, dtype=detect.anchors.dtype, device=detect.anchors.device).view_as(detect.anchors)
    detect.anchors[:] = t / stride
    LOGGER.info(
        f"{PREFIX}Done: BPR {new_bpr:.3f}. New anchors saved to model: {np.round(new).astype(int).tolist()}"
    )
    return True
