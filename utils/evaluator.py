"""Validation engine shared by val.py and train.py: run a detector over a dataloader and score it.

``evaluate(model, dataloader, names, ...)`` returns an ``EvalResult`` with YOLOv5's figures: P and R at the
confidence of best mean F1, mAP@0.5 and mAP@0.5:0.95 (101-point COCO interpolation), per-class rows,
mean validation losses, a confusion matrix and the time per image of each stage. Optionally it writes
the val_batch mosaics, PR/F1/P/R curves, the confusion matrix, labels/*.txt and a COCO detections JSON.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from utils.boxes import non_max_suppression, scale_boxes, xywh2xyxy, xyxy2xywh
from utils.coco_eval import detections_to_coco, image_id_from_path, write_json
from utils.general import LOGGER
from utils.metrics import ConfusionMatrix, DetMetrics, match_predictions
from utils.plots import (
    output_to_target,
    plot_confusion_matrix,
    plot_images,
    plot_mc_curve,
    plot_pr_curve,
)
from utils.torch_utils import half_dtype, time_sync

IOU_VECTOR = torch.linspace(0.5, 0.95, 10)  # mAP@0.5:0.95 thresholds
HEADER = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
ROW_FORMAT = "%22s" + "%11i" * 2 + "%11.3g" * 4
PLOTTED_BATCHES = 3  # val_batch0..2
PER_CLASS_TABLE_MAX_NC = 50  # outside training, per-class rows are printed for fewer classes than this


@dataclass
class ClassRow:
    """One table row: images holding the class, its label count, P, R, AP@0.5 and AP@0.5:0.95."""

    name: str
    images: int
    instances: int
    p: float
    r: float
    map50: float
    map: float

    def format(self) -> str:
        """The row as printed under ``HEADER``."""
        return ROW_FORMAT % (self.name, self.images, self.instances, self.p, self.r, self.map50, self.map)


@dataclass
class EvalResult:
    """Outcome of ``evaluate``.

    ``losses`` (3,) are mean [box, obj, cls] validation losses per batch (zeros without ``compute_loss``);
    ``maps`` (nc,) the per-class mAP@0.5:0.95 (classes without labels get ``map``); ``speed_ms`` the
    milliseconds per image of pre-processing, inference and NMS; ``class_rows`` one row per class that has
    labels; ``pycocotools`` ``(map50_95, map50)`` when a caller scored the JSON with pycocotools.
    """

    mp: float = 0.0
    mr: float = 0.0
    map50: float = 0.0
    map: float = 0.0
    losses: np.ndarray = field(default_factory=lambda: np.zeros(3))
    maps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    speed_ms: tuple[float, float, float] = (0.0, 0.0, 0.0)
    seen: int = 0
    instances: int = 0
    class_rows: list[ClassRow] = field(default_factory=list)
    confusion: ConfusionMatrix | None = None
    json_path: Path | None = None
    pycocotools: tuple[float, float] | None = None

    def as_tuple(self) -> tuple[float, ...]:
        """``(mp, mr, map50, map, box_loss, obj_loss, cls_loss)``, the metric columns of results.csv."""
        return (self.mp, self.mr, self.map50, self.map, *(float(v) for v in self.losses))

    def fitness(self) -> float:
        """``0.1 * mAP@0.5 + 0.9 * mAP@0.5:0.95`` (selects best.pt)."""
        return 0.1 * self.map50 + 0.9 * self.map

    def all_row(self) -> ClassRow:
        """The ``all`` row: every image and label, mean P, R and mAPs."""
        return ClassRow("all", self.seen, self.instances, self.mp, self.mr, self.map50, self.map)

    def table(self, per_class: bool = True) -> str:
        """The YOLOv5 results table: header, ``all`` row and (with ``per_class``) one row per class."""
        rows = [self.all_row()] + (self.class_rows if per_class else [])
        return "\n".join([HEADER, *(row.format() for row in rows)])


def _forward(model: Callable, im: torch.Tensor, augment: bool) -> tuple[torch.Tensor, Any]:
    """(pred (bs, N, 5 + nc), raw maps or None): a DetectionModel returns both, an AutoBackend pred only."""
    out = model(im, augment=True) if augment else model(im)
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


def _all_finite(pred: torch.Tensor, raw: Sequence[torch.Tensor] | None) -> bool:
    return bool(torch.isfinite(pred).all()) and all(bool(torch.isfinite(x).all()) for x in raw or ())


def _to_original(boxes: torch.Tensor, im_hw: Sequence[int], shape_info: Any) -> torch.Tensor:
    """(n, 4) xyxy boxes on the letterboxed input (h, w) -> original image pixels, clipped.

    ``shape_info`` is the loader's ``((h0, w0), ((gain_h, gain_w), (padw, padh)))`` (None: no letterbox).
    """
    if shape_info is None:
        return scale_boxes(im_hw, boxes.clone(), im_hw, ((1.0, 1.0), (0.0, 0.0)))
    return scale_boxes(im_hw, boxes.clone(), shape_info[0], shape_info[1])


@dataclass(frozen=True)
class _Options:
    """The settings of one ``evaluate`` call (see its docstring)."""

    device: torch.device
    conf_thres: float
    iou_thres: float
    max_det: int
    single_cls: bool
    augment: bool
    compute_loss: Callable | None
    half_dtype: torch.dtype | None  # autocast precision for --half: half_dtype(device), None for fp32
    save_dir: Path | None
    plots: bool
    save_txt: bool
    save_hybrid: bool
    save_conf: bool
    save_json: bool
    verbose: bool
    json_file: Path | None
    category_ids: Sequence[int] | None


class _Evaluation:
    """Accumulates per-image statistics and outputs over the batches of one evaluation run."""

    def __init__(self, names: dict[int, str], opts: _Options) -> None:
        self.names, self.o = names, opts
        self.nc = len(names)
        self.iouv = IOU_VECTOR.to(opts.device)
        self.confusion = ConfusionMatrix(nc=self.nc)
        self.stats: list[tuple[np.ndarray, ...]] = []
        self.images_per_class = np.zeros(self.nc, dtype=np.int64)
        self.loss = torch.zeros(3, device=opts.device)
        self.jdict: list[dict[str, Any]] = []
        self.dt = [0.0, 0.0, 0.0]  # seconds in pre-processing, inference, NMS
        self.seen = self.batches = 0
        self.half_overflows = self.fp32_reruns = 0  # batches whose --half outputs held inf or nan

    def step(self, model: Callable, batch_i: int, batch: Sequence[Any]) -> None:
        """Run and score one batch ``(imgs uint8 (B,3,H,W), targets (n,6), paths, shapes)``."""
        ims, targets, paths, shapes = batch
        im, targets, targets_px, preds = self._infer(model, ims, targets)
        for si, det in enumerate(preds):
            labels = targets_px[targets_px[:, 0] == si, 1:]
            self._score_image(det, labels, im.shape[2:], paths[si], shapes[si])
        save_dir = self.o.save_dir
        if self.o.plots and save_dir is not None and batch_i < PLOTTED_BATCHES:
            plot_images(im, targets, paths, save_dir / f"val_batch{batch_i}_labels.jpg", self.names)
            predictions = output_to_target(preds, max_det=15)
            plot_images(im, predictions, paths, save_dir / f"val_batch{batch_i}_pred.jpg", self.names)

    def _infer(
        self, model: Callable, ims: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Pre-process, forward, loss and NMS of one batch, each timed.

        Returns (im float (B,3,H,W) 0..1, targets (n,6) normalised, targets in input pixels, NMS output).
        """
        o = self.o
        t0 = time_sync()
        im = ims.to(o.device, non_blocking=True).float() / 255
        targets = targets.to(o.device)
        height, width = im.shape[2:]
        t1 = time_sync()
        autocast = (
            torch.autocast(o.device.type, dtype=o.half_dtype)
            if o.half_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            pred, raw = _forward(model, im, o.augment)
        if o.half_dtype is not None and not _all_finite(pred, raw):
            # fp16 holds values up to 65504; a half-trained model's activations can pass that (seen on CUDA).
            self.half_overflows += 1
            if not getattr(model, "fp16", False):  # fp32 weights under autocast: this batch again in fp32
                pred, raw = _forward(model, im, o.augment)
                self.fp32_reruns += 1
        t2 = time_sync()
        if o.compute_loss is not None and raw is not None:
            self.loss += o.compute_loss([x.float() for x in raw], targets)[1].to(self.loss.device)
        targets_px = targets.clone()
        targets_px[:, 2:] *= torch.tensor((width, height, width, height), device=targets.device)
        hybrid = [targets_px[targets_px[:, 0] == i, 1:] for i in range(len(im))] if o.save_hybrid else []
        preds = non_max_suppression(
            pred.float(), o.conf_thres, o.iou_thres, labels=hybrid, multi_label=True,
            agnostic=o.single_cls, max_det=o.max_det,
        )  # fmt: skip
        t3 = time_sync()
        self.dt = [self.dt[0] + t1 - t0, self.dt[1] + t2 - t1, self.dt[2] + t3 - t2]
        self.batches += 1
        return im, targets, targets_px, preds

    def _score_image(
        self, det: torch.Tensor, labels: torch.Tensor, im_hw: Sequence[int], path: str, shape_info: Any
    ) -> None:
        """Match one image's detections (k, 6) to its pixel labels (m, 5) ``[cls, xc, yc, w, h]``."""
        self.seen += 1
        if self.o.single_cls:
            det[:, 5] = 0
            labels[:, 0] = 0
        classes = labels[:, 0].long().cpu().numpy()
        self.images_per_class[np.unique(classes)] += 1
        labelsn = torch.cat((labels[:, :1], _to_original(xywh2xyxy(labels[:, 1:5]), im_hw, shape_info)), 1)
        predn = det.clone()
        predn[:, :4] = _to_original(det[:, :4], im_hw, shape_info)
        correct = match_predictions(predn, labelsn, self.iouv)
        self.confusion.process_batch(predn if len(det) else None, labelsn)
        self.stats.append((correct.cpu().numpy(), det[:, 4].cpu().numpy(), det[:, 5].cpu().numpy(), classes))
        if self.o.save_txt and len(det):
            original_hw = shape_info[0] if shape_info is not None else im_hw
            self._save_txt(predn, original_hw, Path(path).stem)
        if self.o.save_json:
            self.jdict += detections_to_coco(predn, image_id_from_path(path), self.o.category_ids)

    def _save_txt(self, predn: torch.Tensor, original_hw: Sequence[int], stem: str) -> None:
        """labels/<stem>.txt rows ``class xc yc w h [conf]`` normalised to the original image."""
        h, w = original_hw[0], original_hw[1]
        xywhn = xyxy2xywh(predn[:, :4]).cpu() / torch.tensor((w, h, w, h))
        rows = torch.cat((predn[:, 5:6].cpu(), xywhn, predn[:, 4:5].cpu()), 1)
        rows = rows if self.o.save_conf else rows[:, :5]
        lines = [f"{int(r[0])} " + " ".join(f"{v:.6g}" for v in r[1:]) for r in rows.tolist()]
        with open(self.o.save_dir / "labels" / f"{stem}.txt", "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def concatenated_stats(self) -> tuple[np.ndarray, ...]:
        """(tp (n, 10), conf (n,), pred_cls (n,), target_cls (m,)) over every image."""
        if not self.stats:
            return np.zeros((0, len(self.iouv)), bool), np.zeros(0), np.zeros(0), np.zeros(0)
        return tuple(np.concatenate(parts, 0) for parts in zip(*self.stats))


def _class_rows(
    metrics: DetMetrics, names: Mapping[int, str], images_per_class: np.ndarray, target_cls: np.ndarray
) -> list[ClassRow]:
    """One ClassRow per class that has labels."""
    instances = np.bincount(target_cls.astype(int), minlength=len(images_per_class))
    rows = []
    for i, c in enumerate(metrics.result.ap_class.tolist()):
        p, r, ap50, ap = metrics.class_result(i)
        rows.append(
            ClassRow(names.get(c, str(c)), int(images_per_class[c]), int(instances[c]), p, r, ap50, ap)
        )
    return rows


def _plot_curves(metrics: DetMetrics, names: Mapping[int, str], save_dir: Path) -> None:
    """PR_curve.png, F1_curve.png, P_curve.png and R_curve.png."""
    res = metrics.result
    labels = [names.get(int(c), str(c)) for c in res.ap_class]
    plot_pr_curve(res.px, res.prec_values, res.ap, save_dir / "PR_curve.png", labels)
    for curve, fname, ylabel in (
        (res.f1_curve, "F1_curve.png", "F1"),
        (res.p_curve, "P_curve.png", "Precision"),
        (res.r_curve, "R_curve.png", "Recall"),
    ):
        plot_mc_curve(res.px, curve, save_dir / fname, labels, ylabel=ylabel)


def _overflow_message(e: _Evaluation) -> str:
    dtype = str(e.o.half_dtype).replace("torch.", "")
    said = f"WARNING: {dtype} overflowed (inf or nan in the outputs) in {e.half_overflows} of {e.batches} batches; "
    if e.fp32_reruns == e.half_overflows:
        return said + "those batches were evaluated again in fp32"
    return said + "their detections are wrong: evaluate without --half"


def _finish(evaluation: _Evaluation, training: bool) -> EvalResult:
    """Score the accumulated statistics, log the table, write plots and JSON; build the EvalResult."""
    o, names = evaluation.o, evaluation.names
    tp, conf, pred_cls, target_cls = evaluation.concatenated_stats()
    metrics = DetMetrics.from_stats(tp, conf, pred_cls, target_cls, evaluation.nc)
    seen = max(evaluation.seen, 1)
    result = EvalResult(
        *metrics.mean_results(),
        losses=(evaluation.loss / max(evaluation.batches, 1)).cpu().numpy(),
        maps=metrics.maps,
        speed_ms=tuple(t / seen * 1e3 for t in evaluation.dt),
        seen=evaluation.seen,
        instances=len(target_cls),
        class_rows=_class_rows(metrics, names, evaluation.images_per_class, target_cls),
        confusion=evaluation.confusion,
    )
    per_class = (o.verbose or (evaluation.nc < PER_CLASS_TABLE_MAX_NC and not training)) and evaluation.nc > 1
    LOGGER.info(result.table(per_class))
    if not len(target_cls):
        LOGGER.warning("WARNING: no labels found in this split, so metrics cannot be computed")
    if evaluation.half_overflows:
        LOGGER.warning(_overflow_message(evaluation))
    if o.plots and o.save_dir is not None:
        _plot_curves(metrics, names, o.save_dir)
        plot_confusion_matrix(evaluation.confusion.matrix, names, o.save_dir / "confusion_matrix.png")
    if o.save_json:
        json_file = o.json_file or (o.save_dir / "predictions.json" if o.save_dir else None)
        if json_file is None:
            LOGGER.warning("WARNING: save_json needs save_dir or json_file; no JSON written")
        else:
            result.json_path = write_json(evaluation.jdict, json_file)
            LOGGER.info(f"Saved {len(evaluation.jdict)} detections to {result.json_path}")
    return result


def _class_names(names: Mapping[int, str] | Sequence[str], single_cls: bool) -> dict[int, str]:
    names = dict(names) if isinstance(names, Mapping) else dict(enumerate(names))
    names = {int(k): str(v) for k, v in names.items()}
    if single_cls and len(names) != 1:
        return {0: "item"}
    return names


@torch.no_grad()
def evaluate(
    model: Callable,
    dataloader: Iterable,
    names: Mapping[int, str] | Sequence[str],
    *,
    device: str | torch.device = "cpu",
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    single_cls: bool = False,
    augment: bool = False,
    compute_loss: Callable | None = None,
    half: bool = False,
    save_dir: Path | None = None,
    plots: bool = True,
    save_txt: bool = False,
    save_hybrid: bool = False,
    save_conf: bool = False,
    save_json: bool = False,
    verbose: bool = False,
    json_file: Path | None = None,
    category_ids: Sequence[int] | None = None,
) -> EvalResult:
    """Evaluate a detector on every batch of ``dataloader``.

    Args:
        model: a DetectionModel (eval forward returns ``(pred, raw)``; ``raw`` feeds ``compute_loss``) or an
            AutoBackend (returns ``pred`` (bs, N, 5 + nc), input pixels, sigmoided scores). It should already
            be on ``device``; nn.Modules are put in eval mode for the run and restored afterwards.
        dataloader: yields ``(imgs uint8 (B,3,H,W) RGB, targets (n,6) normalised, paths, shapes)``.
        names: class names by index (dict or list).
        compute_loss: ``ComputeLoss``; when given the run counts as part of training (per-class rows only
            with ``verbose``) and mean [box, obj, cls] losses are returned.
        half: run inference under autocast to ``half_dtype(device)``: fp16 on CUDA, bf16 on a CPU with
            native bf16, ignored elsewhere.
        save_dir: folder for plots (``plots``), ``labels/*.txt`` (``save_txt``) and the default JSON.
        save_hybrid: add the labels to the predictions before NMS (autolabelling; inflates mAP).
        save_json: write COCO results to ``json_file`` (default ``save_dir/predictions.json``), image id =
            file stem (int if numeric), category id = ``category_ids[cls]`` (class index if None).

    Returns:
        EvalResult (see there). Matching uses IoU thresholds 0.5:0.05:0.95 in original-image pixels.
    """
    device = torch.device(device)
    save_dir = Path(save_dir) if save_dir is not None else None
    if save_txt and save_dir is not None:
        (save_dir / "labels").mkdir(parents=True, exist_ok=True)
    names = _class_names(names, single_cls)
    opts = _Options(
        device=device,
        conf_thres=conf_thres,
        iou_thres=iou_thres,
        max_det=max_det,
        single_cls=single_cls,
        augment=augment,
        compute_loss=compute_loss,
        half_dtype=half_dtype(device) if half else None,
        save_dir=save_dir,
        plots=plots,
        save_txt=save_txt and save_dir is not None,
        save_hybrid=save_hybrid,
        save_conf=save_conf,
        save_json=save_json,
        verbose=verbose,
        json_file=json_file,
        category_ids=category_ids,
    )
    evaluation = _Evaluation(names, opts)
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        for batch_i, batch in enumerate(
            tqdm(dataloader, desc=HEADER, total=total, bar_format="{l_bar}{bar:10}{r_bar}")
        ):
            evaluation.step(model, batch_i, batch)
    finally:
        if was_training:
            model.train()
    return _finish(evaluation, training=compute_loss is not None)
