"""Detection metrics: prediction/label matching, average precision, confusion matrix and fitness.

Pure functions on numpy arrays and torch tensors; plotting lives in ``utils.plots``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from utils.boxes import box_iou

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO mAP@0.5:0.95 thresholds
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO 101-point recall sampling
FITNESS_WEIGHTS = np.array([0.0, 0.0, 0.1, 0.9])  # weights of [P, R, mAP@0.5, mAP@0.5:0.95]


def _unique_first(keys: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct value in ``keys``."""
    return np.unique(keys, return_index=True)[1]


def match_predictions(detections: torch.Tensor, labels: torch.Tensor, iouv: torch.Tensor) -> torch.Tensor:
    """Mark which detections are true positives at each IoU threshold.

    Args:
        detections: (n, 6) ``[x1, y1, x2, y2, conf, cls]`` in pixels.
        labels: (m, 5) ``[cls, x1, y1, x2, y2]`` in the same pixel frame.
        iouv: (t,) IoU thresholds, usually ``0.50:0.05:0.95``.

    Returns:
        (n, t) bool tensor on ``detections.device``. Per threshold, candidate pairs share the class and
        have IoU >= threshold; each detection keeps its highest-IoU label, then each label keeps its most
        confident detection (ties: the earlier row). This gives YOLOv5's results for NMS output, whose
        rows are already sorted by confidence.
    """
    n, t = detections.shape[0], iouv.shape[0]
    correct = np.zeros((n, t), dtype=bool)
    if n and labels.shape[0]:
        iou = box_iou(labels[:, 1:5], detections[:, :4]).cpu().numpy()  # (m, n)
        same_class = (labels[:, 0:1] == detections[:, 5]).cpu().numpy()
        confidence_rank = np.argsort(np.argsort(-detections[:, 4].cpu().numpy(), kind="stable"))
        for k, threshold in enumerate(iouv.tolist()):
            label_idx, det_idx = np.nonzero((iou >= threshold) & same_class)
            if not len(det_idx):
                continue
            by_iou = np.argsort(-iou[label_idx, det_idx], kind="stable")
            label_idx, det_idx = label_idx[by_iou], det_idx[by_iou]
            best = _unique_first(det_idx)  # each detection: its highest-IoU label
            label_idx, det_idx = label_idx[best], det_idx[best]
            by_conf = np.argsort(confidence_rank[det_idx], kind="stable")
            label_idx, det_idx = label_idx[by_conf], det_idx[by_conf]
            correct[det_idx[_unique_first(label_idx)], k] = True  # each label: its most confident match
    return torch.from_numpy(correct).to(detections.device)


def compute_ap(recall: np.ndarray, precision: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Average precision of one class from its cumulative recall and precision curves.

    Args:
        recall: (n,) non-decreasing recall after each detection (sorted by confidence, descending).
        precision: (n,) precision after each detection.

    Returns:
        ``(ap, mpre, mrec)``: AP in 0..1 as COCO defines it (the precision envelope, i.e. the best
        precision at any recall >= r, averaged over the 101 recall points r = 0, 0.01, ..., 1; a point
        the detector never reaches counts 0), and the envelope ``mpre`` over ``mrec`` with sentinels
        (recall 0 and 1, precision 1 and 0) added at the ends, for plotting.
    """
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    # First curve index whose recall reaches each sample point; beyond the curve the sentinel (0) applies.
    idx = np.searchsorted(mrec[1:-1], RECALL_POINTS, side="left") + 1
    sampled = np.where(idx <= len(recall), mpre[np.minimum(idx, len(mpre) - 1)], 0.0)
    return float(sampled.mean()), mpre, mrec


def smooth(y: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Box-filter ``y`` (n,) over an odd window of about ``fraction * n`` points, edges padded by repetition."""
    pad = round(len(y) * fraction / 2)  # 1000 points at fraction 0.1 -> a 101-point window
    padded = np.concatenate((np.full(pad, y[0]), y, np.full(pad, y[-1])))
    return np.convolve(padded, np.ones(2 * pad + 1) / (2 * pad + 1), mode="valid")


@dataclass
class APResult:
    """Per-class detection statistics; c = number of classes that have labels (``ap_class``).

    ``tp``/``fp``/``p``/``r``/``f1`` are (c,) values at the confidence that maximises the smoothed mean F1;
    ``ap`` is (c, t) AP per IoU threshold; ``px`` (1000,) the confidence (or recall) axis of the curves;
    ``prec_values`` (c, 1000) precision envelope at IoU 0.5 sampled at recall ``px``; ``p_curve``,
    ``r_curve``, ``f1_curve`` (c, 1000) precision, recall and F1 against confidence ``px``.
    """

    tp: np.ndarray
    fp: np.ndarray
    p: np.ndarray
    r: np.ndarray
    f1: np.ndarray
    ap: np.ndarray
    ap_class: np.ndarray
    px: np.ndarray
    prec_values: np.ndarray
    p_curve: np.ndarray
    r_curve: np.ndarray
    f1_curve: np.ndarray


def _class_curves(tp: np.ndarray, conf: np.ndarray, n_labels: int, px: np.ndarray, eps: float):
    """Curves of one class from its (k, t) ``tp`` sorted by confidence; returns (ap, p, r, prec_at_recall)."""
    tp_cum = tp.cumsum(0)
    fp_cum = (1 - tp).cumsum(0)
    recall = tp_cum / (n_labels + eps)
    precision = tp_cum / (tp_cum + fp_cum)
    # Curves against confidence: np.interp needs an increasing x axis, hence the negations.
    r_curve = np.interp(-px, -conf, recall[:, 0], left=0)
    p_curve = np.interp(-px, -conf, precision[:, 0], left=1)
    ap = np.zeros(tp.shape[1])
    prec_at_recall = np.zeros_like(px)
    for j in range(tp.shape[1]):
        ap[j], mpre, mrec = compute_ap(recall[:, j], precision[:, j])
        if j == 0:
            prec_at_recall = np.interp(px, mrec, mpre)
    return ap, p_curve, r_curve, prec_at_recall


def ap_per_class(
    tp: np.ndarray,
    conf: np.ndarray,
    pred_cls: np.ndarray,
    target_cls: np.ndarray,
    eps: float = 1e-16,
) -> APResult:
    """Precision, recall, F1 and AP per class over a whole dataset.

    Args:
        tp: (n, t) bool, true positive at each IoU threshold (see ``match_predictions``).
        conf: (n,) detection confidence 0..1.
        pred_cls: (n,) predicted class.
        target_cls: (m,) class of every label.
        eps: guards divisions by zero.

    Only classes that have labels are scored (detections of other classes are ignored, as in YOLOv5);
    ``ap_class`` lists them in increasing order.
    """
    tp = np.asarray(tp, dtype=np.float64)
    tp = tp[:, None] if tp.ndim == 1 else tp
    order = np.argsort(-np.asarray(conf), kind="stable")
    tp, conf, pred_cls = tp[order], np.asarray(conf)[order], np.asarray(pred_cls)[order]
    classes, n_labels = np.unique(np.asarray(target_cls), return_counts=True)
    nc, t = len(classes), tp.shape[1]
    px = np.linspace(0, 1, 1000)
    ap, prec_values = np.zeros((nc, t)), np.zeros((nc, len(px)))
    p_curve, r_curve = np.zeros((nc, len(px))), np.zeros((nc, len(px)))
    for ci, c in enumerate(classes):
        mask = pred_cls == c
        if mask.any():
            ap[ci], p_curve[ci], r_curve[ci], prec_values[ci] = _class_curves(
                tp[mask], conf[mask], n_labels[ci], px, eps
            )
    f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + eps)
    best = int(smooth(f1_curve.mean(0), 0.1).argmax()) if nc else 0
    p, r, f1 = p_curve[:, best], r_curve[:, best], f1_curve[:, best]
    tp_count = (r * n_labels).round()
    fp_count = (tp_count / (p + eps) - tp_count).round()
    return APResult(
        tp_count, fp_count, p, r, f1, ap, classes.astype(int), px, prec_values, p_curve, r_curve, f1_curve
    )


def fitness(metrics: np.ndarray) -> np.ndarray:
    """Model fitness ``0.1 * mAP@0.5 + 0.9 * mAP@0.5:0.95`` from (..., >=4) ``[P, R, mAP50, mAP50-95, ...]``."""
    return (np.asarray(metrics, dtype=np.float64)[..., :4] * FITNESS_WEIGHTS).sum(-1)


@dataclass
class DetMetrics:
    """Dataset-level detection metrics built from an ``APResult`` for a model with ``nc`` classes.

    ``maps`` (nc,) holds mAP@0.5:0.95 per class, filled with the overall ``map`` for classes without labels.
    """

    result: APResult
    nc: int

    @classmethod
    def from_stats(cls, tp, conf, pred_cls, target_cls, nc: int) -> DetMetrics:
        """Score concatenated per-image statistics (arguments as in ``ap_per_class``)."""
        return cls(ap_per_class(tp, conf, pred_cls, target_cls), nc)

    @property
    def ap50(self) -> np.ndarray:
        """(c,) AP@0.5 of each class in ``ap_class``."""
        return self.result.ap[:, 0] if self.result.ap.size else np.zeros(0)

    @property
    def ap(self) -> np.ndarray:
        """(c,) AP@0.5:0.95 of each class in ``ap_class``."""
        return self.result.ap.mean(1) if self.result.ap.size else np.zeros(0)

    @property
    def mp(self) -> float:
        """Mean precision over classes with labels."""
        return float(self.result.p.mean()) if len(self.result.p) else 0.0

    @property
    def mr(self) -> float:
        """Mean recall over classes with labels."""
        return float(self.result.r.mean()) if len(self.result.r) else 0.0

    @property
    def map50(self) -> float:
        """mAP@0.5."""
        return float(self.ap50.mean()) if len(self.ap50) else 0.0

    @property
    def map(self) -> float:
        """mAP@0.5:0.95."""
        return float(self.ap.mean()) if len(self.ap) else 0.0

    @property
    def maps(self) -> np.ndarray:
        """(nc,) mAP@0.5:0.95 per class; classes without labels get the overall ``map``."""
        maps = np.full(self.nc, self.map)
        maps[self.result.ap_class] = self.ap
        return maps

    def mean_results(self) -> tuple[float, float, float, float]:
        """``(mp, mr, map50, map)``."""
        return self.mp, self.mr, self.map50, self.map

    def class_result(self, i: int) -> tuple[float, float, float, float]:
        """``(p, r, ap50, ap)`` of the i-th entry of ``ap_class``."""
        return float(self.result.p[i]), float(self.result.r[i]), float(self.ap50[i]), float(self.ap[i])

    def fitness(self) -> float:
        """Fitness of these metrics (see ``fitness``)."""
        return float(fitness(np.array(self.mean_results())))


class ConfusionMatrix:
    """Detection confusion matrix; rows are predicted classes, columns true classes, index ``nc`` = background.

    ``matrix[p, t]`` counts labels of class t matched to a detection of class p; the last row counts
    missed labels, the last column detections that matched no label.
    """

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45) -> None:
        self.nc = nc
        self.conf = conf
        self.iou_thres = iou_thres
        self.matrix = np.zeros((nc + 1, nc + 1))

    def process_batch(self, detections: torch.Tensor | None, labels: torch.Tensor) -> None:
        """Add one image: ``detections`` (n, 6) ``[x1, y1, x2, y2, conf, cls]`` or None, ``labels`` (m, 5)
        ``[cls, x1, y1, x2, y2]`` (a bare (m,) class vector is also accepted when there are no detections).

        Detections below ``conf`` are ignored. Pairs with IoU > ``iou_thres`` match regardless of class,
        greedily by IoU, one label per detection and one detection per label. Unlike YOLOv5, unmatched
        detections always count as background, also in images without any match.
        """
        gt_classes = (labels[:, 0] if labels.ndim == 2 else labels).long().cpu().numpy()
        if detections is None or labels.ndim == 1:
            np.add.at(self.matrix, (self.nc, gt_classes), 1)
            return
        detections = detections[detections[:, 4] > self.conf]
        det_classes = detections[:, 5].long().cpu().numpy()
        label_idx, det_idx = self._match(detections, labels)
        np.add.at(self.matrix, (det_classes[det_idx], gt_classes[label_idx]), 1)
        np.add.at(self.matrix, (self.nc, np.delete(gt_classes, label_idx)), 1)
        np.add.at(self.matrix, (np.delete(det_classes, det_idx), self.nc), 1)

    def _match(self, detections: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Greedy one-to-one matching by IoU; returns matched (label indices, detection indices)."""
        if not len(detections) or not len(labels):
            return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
        iou = box_iou(labels[:, 1:5], detections[:, :4]).cpu().numpy()
        label_idx, det_idx = np.nonzero(iou > self.iou_thres)
        by_iou = np.argsort(-iou[label_idx, det_idx], kind="stable")
        label_idx, det_idx = label_idx[by_iou], det_idx[by_iou]
        keep = _unique_first(det_idx)
        label_idx, det_idx = label_idx[keep], det_idx[keep]
        by_iou = np.argsort(-iou[label_idx, det_idx], kind="stable")
        label_idx, det_idx = label_idx[by_iou], det_idx[by_iou]
        keep = _unique_first(label_idx)
        return label_idx[keep], det_idx[keep]

    def tp_fp(self) -> tuple[np.ndarray, np.ndarray]:
        """(nc,) true positives (diagonal) and false positives (rest of each predicted row), background excluded."""
        tp = self.matrix.diagonal()
        fp = self.matrix.sum(1) - tp
        return tp[:-1], fp[:-1]
