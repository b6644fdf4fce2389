"""Matching, AP, confusion matrix and fitness against hand-computed values."""

import warnings

import numpy as np
import pytest
import torch

from utils.metrics import (
    ConfusionMatrix,
    DetMetrics,
    ap_per_class,
    compute_ap,
    fitness,
    match_predictions,
    smooth,
)

IOUV = torch.linspace(0.5, 0.95, 10)


# ---------------------------------------------------------------- matching


def test_match_predictions_hand_case():
    labels = torch.tensor([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30]], dtype=torch.float32)
    detections = torch.tensor(
        [
            [0, 0, 10, 10, 0.9, 0],  # exact hit on label 0
            [0, 0, 10, 11, 0.8, 0],  # duplicate of label 0 (IoU 0.91): label already taken
            [20, 20, 30, 30, 0.7, 0],  # right place, wrong class
            [21.5, 20, 30, 30, 0.6, 1],  # label 1 at IoU 0.85
        ]
    )
    correct = match_predictions(detections, labels, IOUV)
    assert correct.dtype == torch.bool and correct.shape == (4, 10)
    assert correct[0].all()
    assert not correct[1].any() and not correct[2].any()
    assert correct[3].tolist() == [True] * 8 + [False] * 2  # thresholds 0.50 .. 0.85


def test_match_predictions_each_threshold_matches_independently():
    # The more confident detection has IoU 0.83, the other IoU 1.0: at low thresholds the label goes to the
    # confident one; above 0.83 only the exact one qualifies.
    labels = torch.tensor([[0, 0, 0, 10, 10]], dtype=torch.float32)
    detections = torch.tensor([[0, 0, 10, 12, 0.9, 0], [0, 0, 10, 10, 0.5, 0]])
    correct = match_predictions(detections, labels, IOUV)
    assert correct[0].tolist() == [True] * 7 + [False] * 3
    assert correct[1].tolist() == [False] * 7 + [True] * 3


def test_match_predictions_empty_inputs():
    labels = torch.tensor([[0, 0, 0, 10, 10]], dtype=torch.float32)
    assert match_predictions(torch.zeros(0, 6), labels, IOUV).shape == (0, 10)
    dets = torch.tensor([[0, 0, 10, 10, 0.9, 0]])
    assert not match_predictions(dets, torch.zeros(0, 5), IOUV).any()


# ---------------------------------------------------------------- AP


def test_compute_ap_perfect_detector_is_one():
    ap, mpre, mrec = compute_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]))
    assert ap == pytest.approx(1.0)
    assert mrec[0] == 0 and mrec[-1] == 1 and len(mpre) == len(mrec) == 4


def test_compute_ap_half_recall():
    # Recall reaches 0.5 with precision 1: the 51 recall points 0.00 .. 0.50 score 1, the rest 0.
    ap, _, _ = compute_ap(np.array([0.5]), np.array([1.0]))
    assert ap == pytest.approx(51 / 101)


def test_compute_ap_envelope():
    # Two labels; detections TP, FP, TP by confidence: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    # Envelope: 1 up to recall 0.5 (51 points), then 2/3 (50 points).
    ap, mpre, _ = compute_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3]))
    assert ap == pytest.approx((51 + 50 * 2 / 3) / 101)
    np.testing.assert_allclose(mpre, [1, 1, 2 / 3, 2 / 3, 0])


def test_compute_ap_no_detections():
    ap, _, _ = compute_ap(np.zeros(0), np.zeros(0))
    assert ap == 0.0


def test_smooth_keeps_length_and_constants():
    y = np.full(1000, 0.3)
    np.testing.assert_allclose(smooth(y, 0.1), y)
    assert smooth(np.arange(10.0), 0.1).shape == (10,)


def _stats_two_classes():
    """Class 0: TP, FP, TP with 2 labels; class 1: one perfect detection; one class-2 detection, no labels."""
    tp = np.zeros((5, 10), dtype=bool)
    tp[[0, 2, 3]] = True
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.95])
    pred_cls = np.array([0, 0, 0, 1, 2])
    target_cls = np.array([0, 0, 1])
    return tp, conf, pred_cls, target_cls


def test_ap_per_class_hand_case_and_class_without_labels():
    result = ap_per_class(*_stats_two_classes())
    assert result.ap_class.tolist() == [0, 1]  # class 2 has no labels: not scored
    np.testing.assert_allclose(result.ap[0], (51 + 50 * 2 / 3) / 101)
    np.testing.assert_allclose(result.ap[1], 1.0)
    assert result.ap.shape == (2, 10)
    assert result.px.shape == (1000,)
    for curve in (result.prec_values, result.p_curve, result.r_curve, result.f1_curve):
        assert curve.shape == (2, 1000)
    # The best mean F1 is reached below confidence 0.7, where class 0 has P 2/3, R 1 and class 1 is perfect.
    np.testing.assert_allclose(result.p, [2 / 3, 1.0], atol=1e-6)
    np.testing.assert_allclose(result.r, [1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(result.f1, [0.8, 1.0], atol=1e-6)
    np.testing.assert_allclose(result.tp, [2, 1])
    np.testing.assert_allclose(result.fp, [1, 0])


def test_ap_per_class_perfect_detector():
    result = ap_per_class(np.ones((3, 10), bool), np.array([0.9, 0.8, 0.7]), np.zeros(3), np.zeros(3))
    np.testing.assert_allclose(result.ap, 1.0)
    np.testing.assert_allclose([result.p[0], result.r[0]], [1.0, 1.0])


def test_ap_per_class_empty_predictions():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = ap_per_class(np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), np.array([0, 0, 1]))
    assert result.ap_class.tolist() == [0, 1]
    assert result.ap.shape == (2, 10) and not result.ap.any()
    assert not result.p.any() and not result.r.any()


def test_ap_per_class_empty_labels():
    tp, conf, pred_cls, _ = _stats_two_classes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = ap_per_class(tp, conf, pred_cls, np.zeros(0))
        metrics = DetMetrics(result, nc=3)
    assert result.ap.shape == (0, 10) and result.ap_class.shape == (0,)
    assert metrics.mean_results() == (0.0, 0.0, 0.0, 0.0)
    np.testing.assert_allclose(metrics.maps, 0.0)


def test_det_metrics_means_and_maps():
    metrics = DetMetrics.from_stats(*_stats_two_classes(), nc=4)
    ap0 = (51 + 50 * 2 / 3) / 101
    mp, mr, map50, map5095 = metrics.mean_results()
    assert mp == pytest.approx((2 / 3 + 1) / 2, abs=1e-6)
    assert mr == pytest.approx(1.0, abs=1e-6)
    assert map50 == pytest.approx((ap0 + 1) / 2)
    assert map5095 == pytest.approx((ap0 + 1) / 2)
    # Classes 2 and 3 have no labels: they get the overall mAP.
    np.testing.assert_allclose(metrics.maps, [ap0, 1.0, map5095, map5095])
    assert metrics.class_result(1) == pytest.approx((1.0, 1.0, 1.0, 1.0))
    assert metrics.fitness() == pytest.approx(0.1 * map50 + 0.9 * map5095)


def test_fitness_weights():
    assert fitness(np.array([0.5, 0.6, 0.7, 0.4])) == pytest.approx(0.07 + 0.36)
    rows = np.array([[0.5, 0.6, 0.7, 0.4, 9.0], [1, 1, 0, 0, 0]])
    np.testing.assert_allclose(fitness(rows), [0.43, 0.0])


# ---------------------------------------------------------------- confusion matrix


def test_confusion_matrix_tiny_case():
    cm = ConfusionMatrix(nc=2)
    labels = torch.tensor([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30], [1, 50, 50, 60, 60]], dtype=torch.float32)
    detections = torch.tensor(
        [
            [0, 0, 10, 10, 0.9, 0],  # correct class 0
            [20, 20, 30, 30, 0.8, 0],  # a class-1 object called class 0
            [80, 80, 90, 90, 0.7, 1],  # nothing there: background predicted as 1
            [50, 50, 60, 60, 0.1, 1],  # below conf 0.25: ignored, so label 2 is missed
        ]
    )
    cm.process_batch(detections, labels)
    np.testing.assert_array_equal(cm.matrix, [[1, 1, 0], [0, 0, 1], [0, 1, 0]])
    tp, fp = cm.tp_fp()
    assert tp.tolist() == [1, 0] and fp.tolist() == [1, 1]


def test_confusion_matrix_without_detections_or_labels():
    cm = ConfusionMatrix(nc=2)
    cm.process_batch(None, torch.tensor([0.0, 1.0, 1.0]))  # class vector, no detections
    cm.process_batch(torch.zeros(0, 6), torch.tensor([[0, 0, 0, 5, 5]], dtype=torch.float32))
    cm.process_batch(torch.tensor([[0, 0, 10, 10, 0.9, 1]]), torch.zeros(0, 5))
    np.testing.assert_array_equal(cm.matrix, [[0, 0, 0], [0, 0, 1], [2, 2, 0]])
