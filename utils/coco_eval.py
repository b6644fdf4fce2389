"""COCO-format I/O for ``--save-json``: detections JSON, ground truth built from YOLO labels, and
scoring with pycocotools' ``COCOeval`` (optional dependency).

Works for any YOLO-format dataset, not only COCO:

- image ids are the file stem, as an int when the stem is numeric (``000000397133.jpg`` -> 397133);
- category ids are the class indices 0..nc-1 unless a ``category_ids`` list maps class i to
  ``category_ids[i]`` (for COCO's own annotation files, ``coco80_to_coco91()``). The same mapping must be
  used for the detections and the ground truth.

COCO boxes are ``[x, y, w, h]`` with ``x, y`` the top-left corner, in pixels of the ORIGINAL image.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.boxes import xyxy2xywh
from utils.general import LOGGER

PYCOCOTOOLS_HINT = "pycocotools is not installed; `pip install pycocotools` to score --save-json results"
COCO91_UNUSED = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)  # ids 1..90 that COCO 2017 leaves out


def image_id_from_path(path: str | Path) -> int | str:
    """COCO image id of an image file: its stem, as an int when the stem is all digits."""
    stem = Path(path).stem
    return int(stem) if stem.isnumeric() else stem


def coco80_to_coco91() -> list[int]:
    """Category id (1..90, COCO paper numbering) of each of the 80 COCO 2017 detection classes."""
    return [i for i in range(1, 91) if i not in COCO91_UNUSED]


def _category(cls: int, category_ids: Sequence[int] | None) -> int:
    return int(category_ids[cls]) if category_ids is not None else int(cls)


def detections_to_coco(
    det: torch.Tensor, image_id: int | str, category_ids: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """(k, 6) ``[x1, y1, x2, y2, conf, cls]`` detections of one image (original pixels) -> COCO results.

    Each entry is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``; bbox rounded to
    1/1000 pixel, score to 5 decimals.
    """
    det = det.detach().cpu().double()
    boxes = xyxy2xywh(det[:, :4])
    boxes[:, :2] -= boxes[:, 2:] / 2  # centre -> top-left corner
    return [
        {
            "image_id": image_id,
            "category_id": _category(int(c), category_ids),
            "bbox": [round(float(v), 3) for v in box],
            "score": round(float(s), 5),
        }
        for box, s, c in zip(boxes.tolist(), det[:, 4].tolist(), det[:, 5].tolist())
    ]


def labels_to_coco(
    im_files: Sequence[str],
    labels: Sequence[np.ndarray],
    shapes_wh: np.ndarray,
    names: Mapping[int, str],
    category_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """COCO ground-truth dict from YOLO labels.

    Args:
        im_files: N image paths (their stems become image ids, see ``image_id_from_path``).
        labels: N float arrays (n, 5) ``[class, xc, yc, w, h]`` normalised to 0..1.
        shapes_wh: (N, 2) original image sizes ``(w, h)`` in pixels.
        names: class names by index 0..nc-1.
        category_ids: optional class index -> category id map (identity when None).

    Returns:
        ``{"info", "images", "annotations", "categories"}`` with boxes in original pixels, ``area = w*h``,
        ``iscrowd = 0`` and annotation ids from 1 (COCOeval treats id 0 as "unmatched").

    Raises:
        ValueError: two images share an id (same file stem in different folders).
    """
    images, annotations, seen = [], [], {}
    for path, lb, (w, h) in zip(im_files, labels, np.asarray(shapes_wh).tolist()):
        image_id = image_id_from_path(path)
        if image_id in seen:
            raise ValueError(
                f"COCO image ids must be unique, but {path} and {seen[image_id]} share the id {image_id!r} "
                "(image ids are file stems); rename one of them to score with pycocotools"
            )
        seen[image_id] = path
        images.append({"id": image_id, "file_name": Path(path).name, "width": int(w), "height": int(h)})
        for cls, xc, yc, bw, bh in np.asarray(lb, dtype=np.float64).reshape(-1, 5).tolist():
            box = [(xc - bw / 2) * w, (yc - bh / 2) * h, bw * w, bh * h]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": _category(int(cls), category_ids),
                    "bbox": [round(v, 3) for v in box],
                    "area": round(box[2] * box[3], 3),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": _category(i, category_ids), "name": str(n)} for i, n in sorted(names.items())]
    info = {"description": "ground truth built from YOLO-format labels"}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def dataset_to_coco(
    dataset: Any, names: Mapping[int, str], category_ids: Sequence[int] | None = None
) -> dict[str, Any]:
    """COCO ground truth of a ``LoadImagesAndLabels`` split (uses ``im_files``, ``labels``, ``shapes``)."""
    return labels_to_coco(dataset.im_files, dataset.labels, dataset.shapes, names, category_ids)


def write_json(data: Any, path: str | Path) -> Path:
    """Write ``data`` as JSON to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return path


def _load(source: str | Path | dict | list) -> Any:
    if isinstance(source, (str, Path)):
        with open(source, encoding="utf-8") as f:
            return json.load(f)
    return source


def _contiguous_ids(gt: dict[str, Any], dets: list[dict[str, Any]]) -> tuple[dict, list]:
    """Copies with image ids renumbered 0..N-1 (COCOeval sorts ids, so int and str ids must not mix)."""
    index = {img["id"]: i for i, img in enumerate(gt["images"])}
    unknown = {d["image_id"] for d in dets} - index.keys()
    if unknown:
        raise ValueError(
            f"detections name image ids missing from the ground truth: {sorted(map(str, unknown))[:5]}"
        )
    gt = {**gt, "images": [{**img, "id": index[img["id"]]} for img in gt["images"]]}
    gt["annotations"] = [{**a, "image_id": index[a["image_id"]]} for a in gt["annotations"]]
    return gt, [{**d, "image_id": index[d["image_id"]]} for d in dets]


def score_with_pycocotools(
    ground_truth: str | Path | dict, detections: str | Path | list, verbose: bool = True
) -> tuple[float, float]:
    """COCO bbox mAP@0.5:0.95 and mAP@0.5 of ``detections`` against ``ground_truth`` (dicts or JSON paths).

    Every ground-truth image is evaluated. pycocotools keeps the 100 most confident detections per
    image, matches in score order and ignores crowd boxes. With ``verbose`` its 12-line summary is
    logged. Returns ``(map50_95, map50)``, 0.0 when there is nothing to score.

    Raises:
        ImportError: pycocotools is missing (the message names the pip package).
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError(PYCOCOTOOLS_HINT) from None
    gt, dets = _contiguous_ids(_load(ground_truth), list(_load(detections)))
    if not dets or not gt["annotations"]:
        return 0.0, 0.0
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # index/loading chatter; the summary is printed below
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()
    if verbose:
        LOGGER.info(summary.getvalue().rstrip())
    map50_95, map50 = (max(float(v), 0.0) for v in evaluator.stats[:2])  # -1 means "no ground truth"
    return map50_95, map50
