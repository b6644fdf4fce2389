"""Validate a trained detector on a dataset split.

Usage:
    python val.py --data data/shapes.yaml --weights runs/train/exp/weights/best.pt --img 640
    python val.py --data D.yaml --weights a.pt b.pt --task speed      # timings per image
    python val.py --data D.yaml --weights a.pt --task study           # mAP and speed against image size
    python val.py --data D.yaml --weights a.pt --save-json            # COCO JSON + pycocotools mAP

Tasks: val / test (score that split), speed (conf 0.25, IoU 0.45, no plots; prints the time per image of
pre-processing, inference and NMS), study (val at image sizes 256..1024 step 128, or --study-sizes; writes
study_<data>_<weights>.txt and study.png). Results go to runs/val/exp, exp2, ... unless --exist-ok.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # allow `python val.py` from anywhere
    sys.path.insert(0, str(ROOT))

from models.backend import AutoBackend  # noqa: E402
from utils.checkpoints import CheckpointError  # noqa: E402
from utils.coco_eval import (  # noqa: E402
    coco80_to_coco91,
    dataset_to_coco,
    score_with_pycocotools,
    write_json,
)
from utils.dataloaders import create_dataloader  # noqa: E402
from utils.dataset_config import check_dataset  # noqa: E402
from utils.evaluator import EvalResult, evaluate  # noqa: E402
from utils.general import (  # noqa: E402
    LOGGER,
    check_img_size,
    colorstr,
    gc_frozen,
    increment_path,
    print_args,
    setup_logging,
)
from utils.torch_utils import select_device  # noqa: E402

TASKS = ("val", "test", "speed", "study")
STUDY_SIZES = tuple(range(256, 1024 + 1, 128))
STUDY_COLUMNS = "imgsz P R mAP50 mAP50-95 box_loss obj_loss cls_loss pre_ms inference_ms nms_ms"


def parse_opt(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of val.py (YOLOv5 flag names and defaults)."""
    p = argparse.ArgumentParser(description="Validate a YOLO detector on a dataset split.")
    p.add_argument("--data", type=str, default=str(ROOT / "data/shapes.yaml"), help="dataset YAML")
    p.add_argument("--weights", nargs="+", type=str, default=["yolov5s.pt"], help="one or more weights files")
    p.add_argument("--batch-size", "--batch", type=int, default=32, help="batch size")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="inference size (pixels)")
    p.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    p.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    p.add_argument("--task", default="val", choices=TASKS, help="val, test, speed or study")
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    p.add_argument("--workers", type=int, default=8, help="max dataloader workers")
    p.add_argument("--single-cls", action="store_true", help="treat as single-class dataset")
    p.add_argument("--augment", action="store_true", help="augmented inference (TTA)")
    p.add_argument("--verbose", action="store_true", help="report mAP by class")
    p.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    p.add_argument("--save-hybrid", action="store_true", help="save label+prediction hybrid results to *.txt")
    p.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    p.add_argument("--save-json", action="store_true", help="save a COCO-JSON results file")
    p.add_argument("--project", default=str(ROOT / "runs/val"), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    p.add_argument(
        "--half", action="store_true", help="fp16 on CUDA, bf16 autocast on a CPU with native bf16"
    )
    p.add_argument("--dnn", action="store_true", help="use OpenCV DNN for ONNX inference")
    p.add_argument("--compile", action="store_true", help="torch.compile a .pt model (slow first batch)")
    p.add_argument(
        "--study-sizes", nargs="+", type=int, default=list(STUDY_SIZES), help="image sizes of --task study"
    )
    return p.parse_args(argv)


def _single_weights(weights: str | Path | Sequence[str | Path]) -> Path:
    """The one weights file ``run`` evaluates (a one-element list is accepted), checked to exist."""
    if not isinstance(weights, (str, Path)):
        if len(weights) != 1:
            raise ValueError(
                f"run() evaluates one weights file at a time, got {len(weights)}; call it per file"
            )
        weights = weights[0]
    path = Path(weights)
    if not path.exists():  # a file, or an OpenVINO model folder
        raise FileNotFoundError(f"--weights {weights}: file not found")
    return path


def _split(data: dict[str, Any], task: str) -> str | list[str]:
    key = "test" if task == "test" else "val"
    if not data.get(key):
        raise ValueError(
            f"{data.get('yaml_file') or 'dataset'} has no '{key}' split; add one or use --task val"
        )
    return data[key]


def _is_coco(data: dict[str, Any]) -> bool:
    """The COCO 2017 val split as YOLOv5 lays it out (category ids then follow COCO's 1..90 numbering)."""
    val = data.get("val")
    return isinstance(val, str) and Path(val).as_posix().endswith("coco/val2017.txt")


def _input_size(backend: AutoBackend, imgsz: int, batch_size: int) -> tuple[int, int]:
    """(imgsz, batch size) the backend accepts: a multiple of its stride; fixed-shape exports force theirs."""
    imgsz = check_img_size(imgsz, backend.stride)
    if backend.imgsz is not None:
        h, w = backend.imgsz
        if h != w:
            raise ValueError(
                f"this export has a fixed non-square input {h}x{w}; re-export it square to validate"
            )
        if h != imgsz:
            LOGGER.warning(f"WARNING: {backend.weights.name} takes {h}x{w} inputs only; using --imgsz {h}")
        imgsz = h
    fixed_batch = None if backend.dynamic else (getattr(backend, "batch_size", None) or 1)
    if fixed_batch is not None and batch_size != fixed_batch:
        LOGGER.info(f"This export has a fixed batch shape: using --batch-size {fixed_batch}")
        batch_size = fixed_batch
    return imgsz, batch_size


def _class_names(
    backend: AutoBackend, data: dict[str, Any], weights: Path, single_cls: bool
) -> dict[int, str]:
    """The dataset's class names, after checking the weights predict as many classes."""
    names = data["names"]
    if single_cls:
        return names if len(names) == 1 else {0: "item"}
    if len(backend.names) != len(names):
        raise ValueError(
            f"{weights} predicts {len(backend.names)} classes but {data.get('yaml_file') or 'the dataset'} "
            f"has {len(names)}; pass the matching --data/--weights, or --single-cls"
        )
    return names


def _pycocotools_map(
    result: EvalResult,
    data: dict[str, Any],
    dataset: Any,
    names: dict[int, str],
    category_ids: list[int] | None,
    save_dir: Path,
) -> tuple[float, float] | None:
    """Score the predictions JSON with pycocotools against COCO ground truth built from the split's labels
    (or COCO's own instances_val2017.json when validating COCO and it is present)."""
    official = Path(data["path"]) / "annotations" / "instances_val2017.json"
    if category_ids is not None and official.is_file():
        gt_file = official
    else:
        gt_file = write_json(dataset_to_coco(dataset, names, category_ids), save_dir / "ground_truth.json")
    LOGGER.info(f"\nEvaluating pycocotools mAP on {result.json_path} against {gt_file}...")
    try:
        coco_map, coco_map50 = score_with_pycocotools(gt_file, result.json_path)
    except (ImportError, ValueError) as e:
        LOGGER.warning(f"WARNING: pycocotools unable to run: {e}")
        return None
    LOGGER.info(
        f"pycocotools mAP50-95 {coco_map:.4f}  mAP50 {coco_map50:.4f}   "
        f"(this project: mAP50-95 {result.map:.4f}  mAP50 {result.map50:.4f})"
    )
    return coco_map, coco_map50


def run(
    data: str | Path | dict,
    weights: str | Path | Sequence[str | Path],
    batch_size: int = 32,
    imgsz: int = 640,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    task: str = "val",
    device: str = "",
    workers: int = 8,
    single_cls: bool = False,
    augment: bool = False,
    verbose: bool = False,
    save_txt: bool = False,
    save_hybrid: bool = False,
    save_conf: bool = False,
    save_json: bool = False,
    project: str | Path = ROOT / "runs/val",
    name: str = "exp",
    exist_ok: bool = False,
    half: bool = False,
    dnn: bool = False,
    compile: bool = False,
    plots: bool = True,
    **_: Any,  # other command-line options (study_sizes) are accepted and ignored
) -> EvalResult:
    """Evaluate one weights file on the val (or test) split of ``data``; arguments as on the command line.

    Returns the EvalResult; ``result.as_tuple()`` is (P, R, mAP50, mAP50-95, box, obj, cls losses) and
    ``result.speed_ms`` (pre-process, inference, NMS) milliseconds per image. Output: project/name(N).
    """
    if task not in TASKS:
        raise ValueError(f"--task {task!r} is invalid; valid tasks: {', '.join(TASKS)}")
    weights = _single_weights(weights)
    data = check_dataset(data)
    split = _split(data, task)
    device = select_device(device, batch_size)
    backend = AutoBackend(weights, device=device, dnn=dnn, fp16=half, compile=compile)
    imgsz, batch_size = _input_size(backend, imgsz, batch_size)
    names = _class_names(backend, data, weights, single_cls)
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)

    # any model that accepts any input shape (checkpoints and dynamic exports) gets the same rect batches
    pad, rect = (0.0, False) if task == "speed" else (0.5, bool(backend.dynamic))
    loader, dataset = create_dataloader(
        split,
        imgsz,
        batch_size,
        backend.stride,
        single_cls,
        pad=pad,
        rect=rect,
        workers=workers,
        prefix=colorstr(f"{task}: "),
        nc=len(names),
    )
    with torch.no_grad():  # warm-up, so the first batch's timing is not inflated
        backend(torch.zeros((1 if backend.dynamic else batch_size, 3, imgsz, imgsz), device=device))
    category_ids = coco80_to_coco91() if _is_coco(data) and len(names) == 80 else None
    result = evaluate(
        backend,
        loader,
        names,
        device=device,
        conf_thres=conf_thres,
        iou_thres=iou_thres,
        max_det=max_det,
        single_cls=single_cls,
        augment=augment,
        half=half,
        save_dir=save_dir,
        plots=plots,
        save_txt=save_txt,
        save_hybrid=save_hybrid,
        save_conf=save_conf,
        save_json=save_json,
        verbose=verbose,
        json_file=save_dir / f"{weights.stem}_predictions.json",
        category_ids=category_ids,
    )
    pre, inference, nms = result.speed_ms
    LOGGER.info(
        f"Speed: {pre:.1f}ms pre-process, {inference:.1f}ms inference, {nms:.1f}ms NMS per image "
        f"at shape {(batch_size, 3, imgsz, imgsz)}"
    )
    if save_json and result.json_path is not None:
        result.pycocotools = _pycocotools_map(result, data, dataset, names, category_ids, save_dir)
    n_txt = len(list((save_dir / "labels").glob("*.txt"))) if save_txt else 0
    LOGGER.info(
        f"Results saved to {colorstr('bold', str(save_dir))}"
        + (f", {n_txt} labels in labels/" if save_txt else "")
    )
    return result


def _plot_study(rows_by_weights: dict[str, np.ndarray], save_path: Path) -> Path:
    """study.png: mAP50-95 and mAP50 against image size, and mAP50-95 against inference ms per image."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), tight_layout=True)
    ax_size, ax_speed = fig.subplots(1, 2)
    for label, rows in rows_by_weights.items():
        (line,) = ax_size.plot(
            rows[:, 0], rows[:, 4], ".-", linewidth=2, markersize=8, label=f"{label} mAP50-95"
        )
        color = line.get_color()  # one colour per weights file in both panels
        ax_size.plot(
            rows[:, 0], rows[:, 3], ".--", color=color, linewidth=1, markersize=6, label=f"{label} mAP50"
        )
        ax_speed.plot(rows[:, 9], rows[:, 4], ".-", color=color, linewidth=2, markersize=8, label=label)
        for size, ms, m in zip(rows[:, 0], rows[:, 9], rows[:, 4]):
            ax_speed.annotate(f"{int(size)}", (ms, m), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax_size.set(xlabel="image size (pixels)", ylabel="mAP", title="Accuracy against image size")
    ax_speed.set(xlabel="inference time (ms per image)", ylabel="mAP50-95", title="Accuracy against speed")
    for ax in (ax_size, ax_speed):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.savefig(save_path, dpi=200)
    return save_path


def _study(opt: argparse.Namespace) -> Path:
    """Validate every weights file at every --study-sizes size; write study_*.txt files and study.png."""
    save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok, mkdir=True)
    kwargs = {
        **vars(opt),
        "project": save_dir.parent,
        "name": save_dir.name,
        "exist_ok": True,
        "plots": False,
    }
    rows_by_weights = {}
    for w in opt.weights:
        rows = []
        for size in opt.study_sizes:
            LOGGER.info(f"\nStudy: {w} at --imgsz {size}")
            r = run(**{**kwargs, "weights": w, "imgsz": size})
            rows.append([size, *r.as_tuple(), *r.speed_ms])
        rows_by_weights[Path(w).stem] = np.array(rows, dtype=np.float64)
        txt = save_dir / f"study_{Path(opt.data).stem}_{Path(w).stem}.txt"
        np.savetxt(txt, rows_by_weights[Path(w).stem], fmt="%10.4g", header=STUDY_COLUMNS)
        LOGGER.info(f"Study results saved to {txt}")
    return _plot_study(rows_by_weights, save_dir / "study.png")


def run_task(opt: argparse.Namespace) -> list[EvalResult]:
    """Run ``opt.task`` for every weights file; returns the EvalResults (none for a study)."""
    if opt.task in ("val", "test"):
        if opt.conf_thres > 0.001:
            LOGGER.warning(
                f"WARNING: --conf-thres {opt.conf_thres} > 0.001 gives invalid mAP (too few detections)"
            )
        if opt.save_hybrid:
            LOGGER.warning(
                "WARNING: --save-hybrid mixes labels into the predictions, so its mAP is not valid"
            )
        return [run(**{**vars(opt), "weights": w}) for w in opt.weights]
    if opt.task == "speed":
        speed = {"conf_thres": 0.25, "iou_thres": 0.45, "save_json": False, "plots": False}
        LOGGER.info(
            f"--task speed: timing at --conf-thres {speed['conf_thres']} --iou-thres {speed['iou_thres']} "
            "(detect.py's defaults), no JSON or plots; its mAP is not comparable with --task val's"
        )
        return [run(**{**vars(opt), **speed, "weights": w}) for w in opt.weights]
    LOGGER.info(f"Study plot saved to {_study(opt)}")
    return []


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; user errors print one line and return 1."""
    opt = parse_opt(argv)
    setup_logging()
    print_args(vars(opt), "val")
    try:
        with gc_frozen():  # no full-collection stalls between batches
            run_task(opt)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        LOGGER.error(f"ERROR: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
