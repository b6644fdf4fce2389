"""COCO JSON conversion (detections and ground truth from YOLO labels) and pycocotools scoring."""

import sys

import numpy as np
import pytest
import torch

from utils.coco_eval import (
    coco80_to_coco91,
    detections_to_coco,
    image_id_from_path,
    labels_to_coco,
    score_with_pycocotools,
)

NAMES = {0: "red", 1: "blue"}


def test_image_id_is_stem_int_when_numeric():
    assert image_id_from_path("/data/images/val/000000397133.jpg") == 397133
    assert image_id_from_path("a/b/cat_01.png") == "cat_01"


def test_coco80_to_coco91_skips_unused_ids():
    ids = coco80_to_coco91()
    assert len(ids) == 80 and len(set(ids)) == 80
    assert ids[:11] == list(range(1, 12)) and ids[11] == 13 and ids[-1] == 90
    assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(ids)


def test_detections_to_coco_top_left_xywh_and_category_map():
    det = torch.tensor([[10.0, 20.0, 30.0, 60.0, 0.87654321, 1.0], [0.0, 0.0, 5.5, 4.0, 0.5, 0.0]])
    out = detections_to_coco(det, 7)
    assert out[0] == {"image_id": 7, "category_id": 1, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.87654}
    assert out[1]["bbox"] == [0.0, 0.0, 5.5, 4.0] and out[1]["category_id"] == 0
    mapped = detections_to_coco(det, "x", category_ids=[5, 9])
    assert [d["category_id"] for d in mapped] == [9, 5] and mapped[0]["image_id"] == "x"
    assert detections_to_coco(torch.zeros(0, 6), 1) == []


def test_labels_to_coco_hand_case():
    labels = [
        np.array([[1, 0.5, 0.5, 0.2, 0.4], [0, 0.1, 0.1, 0.2, 0.2]], np.float32),
        np.zeros((0, 5), np.float32),
    ]
    gt = labels_to_coco(
        ["d/images/12.jpg", "d/images/b.jpg"], labels, np.array([[200, 100], [50, 60]]), NAMES
    )
    assert gt["images"] == [
        {"id": 12, "file_name": "12.jpg", "width": 200, "height": 100},
        {"id": "b", "file_name": "b.jpg", "width": 50, "height": 60},
    ]
    first, second = gt["annotations"]
    assert first == {
        "id": 1,
        "image_id": 12,
        "category_id": 1,
        "bbox": [80.0, 30.0, 40.0, 40.0],
        "area": 1600.0,
        "iscrowd": 0,
    }
    assert second["id"] == 2 and second["bbox"] == [0.0, 0.0, 40.0, 20.0] and second["category_id"] == 0
    assert gt["categories"] == [{"id": 0, "name": "red"}, {"id": 1, "name": "blue"}]
    shifted = labels_to_coco(["12.jpg"], labels[:1], np.array([[200, 100]]), NAMES, category_ids=[1, 2])
    assert [a["category_id"] for a in shifted["annotations"]] == [2, 1]
    assert [c["id"] for c in shifted["categories"]] == [1, 2]


def test_labels_to_coco_rejects_duplicate_stems():
    labels = [np.zeros((0, 5), np.float32)] * 2
    with pytest.raises(ValueError, match="share the id"):
        labels_to_coco(["a/x.jpg", "b/x.png"], labels, np.array([[10, 10], [10, 10]]), NAMES)


def _two_box_gt():
    labels = [
        np.array([[0, 0.25, 0.25, 0.2, 0.2], [0, 0.75, 0.75, 0.2, 0.2]], np.float32),
        np.array([[1, 0.5, 0.5, 0.5, 0.5]], np.float32),
    ]
    return labels_to_coco(["1.jpg", "img_b.jpg"], labels, np.array([[100, 100], [100, 100]]), NAMES)


def test_pycocotools_perfect_and_half_recall():
    pytest.importorskip("pycocotools")
    gt = _two_box_gt()
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
    ]
    assert score_with_pycocotools(gt, perfect, verbose=False) == pytest.approx((1.0, 1.0))
    # Class 0: one of two boxes found -> recall 0.5 at precision 1 -> AP = 51/101 at every IoU; class 1: AP 1.
    half = perfect[:1] + perfect[2:]
    expected = (51 / 101 + 1) / 2
    assert score_with_pycocotools(gt, half, verbose=False) == pytest.approx((expected, expected), abs=1e-6)
    assert score_with_pycocotools(gt, [], verbose=False) == (0.0, 0.0)


def test_pycocotools_unknown_image_id_is_a_clear_error():
    pytest.importorskip("pycocotools")
    det = [{"image_id": 999, "category_id": 0, "bbox": [0, 0, 1, 1], "score": 0.5}]
    with pytest.raises(ValueError, match="missing from the ground truth"):
        score_with_pycocotools(_two_box_gt(), det, verbose=False)


def test_missing_pycocotools_names_the_pip_package(monkeypatch):
    for module in ("pycocotools", "pycocotools.coco", "pycocotools.cocoeval"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import` raise ImportError
    with pytest.raises(ImportError, match="pip install pycocotools"):
        score_with_pycocotools(_two_box_gt(), [])
