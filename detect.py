"""Run a detector on images, videos, folders, globs, webcams and streams.

Usage:
    python detect.py --weights best.pt --source img.jpg            # image
                                                 path/             # folder
                                                 'path/*.jpg'      # glob
                                                 list.txt          # list of paths
                                                 vid.mp4           # video
                                                 0                 # webcam
                                                 list.streams      # several streams
                                                 'rtsp://host/live'  # RTSP, RTMP, HTTP stream

Results go to runs/detect/expN (see utils/detect_outputs.py for the layout).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
DEFAULT_SOURCE = ROOT / "data/images"  # as YOLOv5; this repository ships no sample images
if str(ROOT) not in sys.path:  # allow `python /path/to/detect.py` from anywhere
    sys.path.insert(0, str(ROOT))

from models.backend import AutoBackend  # noqa: E402
from utils.checkpoints import CheckpointError  # noqa: E402
from utils.detect_outputs import Frame, RunOutputs, SaveOptions  # noqa: E402
from utils.general import (  # noqa: E402
    LOGGER,
    check_img_size,
    colorstr,
    gc_frozen,
    increment_path,
    print_args,
    setup_logging,
    yaml_load,
)
from utils.predict import NMSConfig, Timer, can_show_images, describe, postprocess, to_tensor  # noqa: E402
from utils.sources import DEFAULT_STREAM_FPS, LoadStreams, SourceError, classify_source, create_source  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402
from utils.visualize import FeatureVisualizer  # noqa: E402

USER_ERRORS = (FileNotFoundError, SourceError, CheckpointError, ValueError)


@dataclass
class FramePrediction:
    """Detections of one image or frame: boxes (k, 6) ``[x1, y1, x2, y2, conf, cls]`` in original pixels."""

    path: str
    frame: int
    boxes: np.ndarray
    save_path: Path | None = None


@dataclass
class DetectRun:
    """What run() returns: the run folder, every frame's detections and mean ms per image."""

    save_dir: Path
    predictions: list[FramePrediction] = field(default_factory=list)
    speed: tuple[float, float, float] = (0.0, 0.0, 0.0)  # pre-process, inference, NMS


def _single_weights(weights: str | Path | Sequence[str | Path]) -> Path:
    if isinstance(weights, (list, tuple)):
        if len(weights) != 1:
            raise ValueError(
                f"--weights takes one model here ({len(weights)} given); ensembles are not supported"
            )
        weights = weights[0]
    return Path(weights)


def _size_pair(imgsz: int | Sequence[int]) -> list[int]:
    """--imgsz as [h, w]: one value means a square."""
    sizes = [int(imgsz)] if isinstance(imgsz, int) else [int(v) for v in imgsz]
    if len(sizes) not in (1, 2):
        raise ValueError(f"--imgsz takes one or two integers (h w), got {sizes}")
    return sizes * 2 if len(sizes) == 1 else sizes


def _model_size(backend: AutoBackend, imgsz: list[int]) -> list[int]:
    """[h, w] rounded up to the stride, or the fixed size of an export (with a warning if it differs)."""
    if backend.imgsz is not None:
        fixed = [int(v) for v in backend.imgsz]
        if fixed != imgsz:
            size = fixed[0] if fixed[0] == fixed[1] else f"{fixed[0]} {fixed[1]}"
            LOGGER.warning(
                f"WARNING: {backend.weights.name} takes {fixed[0]}x{fixed[1]} inputs only; using --imgsz {size}"
            )
        return fixed
    return check_img_size(imgsz, backend.stride)


def _class_names(backend: AutoBackend, data: str | Path | None) -> dict[int, str]:
    """The model's names; a --data YAML's names replace them only when the model has none of its own."""
    names = dict(backend.names)
    if not data or names != {i: str(i) for i in range(len(names))}:
        return names
    loaded = yaml_load(data).get("names")
    if isinstance(loaded, list):
        loaded = dict(enumerate(loaded))
    return {int(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else names


def _visualize_dir(save_dir: Path, path: str, mode: str, frame: int) -> Path:
    stem = Path(path).stem
    return save_dir / (stem if mode == "image" else f"{stem}_{frame}")


def _infer(backend: AutoBackend, x: torch.Tensor, augment: bool, vis_dir: Path | None, im0: np.ndarray):
    """Forward pass; with vis_dir, per-layer figures for the first image go there."""
    if vis_dir is None:
        return backend(x, augment=augment)
    with FeatureVisualizer(backend.model, vis_dir, im0) as vis:
        return backend(x, augment=augment, visualize=vis)


def run(
    weights: str | Path | Sequence[str | Path] = ROOT / "yolov5s.pt",
    source: str | Path = DEFAULT_SOURCE,
    data: str | Path | None = None,
    imgsz: int | Sequence[int] = (640, 640),
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    max_det: int = 1000,
    device: str = "",
    view_img: bool = False,
    save_txt: bool = False,
    save_conf: bool = False,
    save_crop: bool = False,
    save_csv: bool = False,
    nosave: bool = False,
    classes: Sequence[int] | None = None,
    agnostic_nms: bool = False,
    augment: bool = False,
    visualize: bool = False,
    update: bool = False,
    project: str | Path = ROOT / "runs/detect",
    name: str = "exp",
    exist_ok: bool = False,
    line_thickness: int = 3,
    hide_labels: bool = False,
    hide_conf: bool = False,
    half: bool = False,
    dnn: bool = False,
    vid_stride: int = 1,
    compile: bool = False,
) -> DetectRun:
    """Detect objects in ``source`` with ``weights`` and write the outputs the flags ask for."""
    source = str(source)
    weights = _single_weights(weights)
    if not weights.exists():  # a file, or an OpenVINO model folder
        raise FileNotFoundError(f"--weights {weights} not found")
    kind = classify_source(source)
    if not (kind.webcam or kind.is_url or glob_or_exists(source)):
        hint = " (the default; pass --source: an image, folder, glob, video, URL or 0 for a webcam)"
        raise FileNotFoundError(f"--source {source} not found{hint if source == str(DEFAULT_SOURCE) else ''}")
    backend = AutoBackend(weights, device=select_device(device), dnn=dnn, fp16=half, compile=compile)
    imgsz = _model_size(backend, _size_pair(imgsz))
    view_img, visualize, augment = _check_flags(backend, kind.webcam, view_img, visualize, augment, update)
    dataset = create_source(source, imgsz, backend.stride, auto=backend.dynamic, vid_stride=vid_stride)
    names = _class_names(backend, data)
    save_dir = increment_path(
        Path(project) / name, exist_ok=exist_ok, mkdir=True
    )  # only once inputs are fine
    options = SaveOptions(not nosave, save_txt, save_conf, save_crop, save_csv, view_img, line_thickness,
                          hide_labels, hide_conf)  # fmt: skip
    cfg = NMSConfig(conf_thres, iou_thres, classes, agnostic_nms, False, max_det)
    result = DetectRun(save_dir)
    timers = [Timer(backend.device) for _ in range(3)]
    if backend.device.type != "cpu":
        backend.warmup((1, 3, *imgsz))
    outputs = RunOutputs(save_dir, names, options)
    try:
        _predict_loop(dataset, backend, names, cfg, outputs, timers, result, augment, visualize, vid_stride)
    finally:
        outputs.close()  # every video writer released, even on Ctrl-C or an error: the file stays playable
        if isinstance(dataset, LoadStreams):
            dataset.close()
    seen = max(len(result.predictions), 1)
    result.speed = tuple(t.total / seen * 1e3 for t in timers)
    _summary(result, imgsz, outputs, options)
    return result


def _check_flags(backend: AutoBackend, webcam: bool, view_img: bool, visualize: bool, augment: bool,
                 update: bool) -> tuple[bool, bool, bool]:  # fmt: skip
    """(view_img, visualize, augment) that can actually be honoured, with a warning for each dropped."""
    if view_img and not can_show_images():
        LOGGER.warning("WARNING: --view-img needs a display (none found); continuing without showing frames")
    view_img = (view_img or webcam) and can_show_images()
    if (visualize or augment) and not backend.pt:
        LOGGER.warning("WARNING: --visualize and --augment need PyTorch .pt weights; ignored for this export")
        visualize = augment = False
    if update:
        LOGGER.info("--update: nothing to do, checkpoints of this project hold no pickled code to refresh")
    return view_img, visualize, augment


def glob_or_exists(source: str) -> bool:
    """True for an existing path or a pattern with glob characters (LoadImages checks it matches)."""
    return Path(source).expanduser().exists() or any(ch in source for ch in "*?[")


def _predict_loop(dataset, backend: AutoBackend, names: dict[int, str], cfg: NMSConfig, outputs: RunOutputs,
                  timers: list[Timer], result: DetectRun, augment: bool, visualize: bool, vid_stride: int) -> None:  # fmt: skip
    """Pre-process, infer, NMS and write outputs for every batch the loader yields."""
    streams = isinstance(dataset, LoadStreams)
    for step, (path, im, im0s, cap, log) in enumerate(dataset, start=1):
        paths, frames = (path, im0s) if streams else ([path], [im0s])
        mode = "stream" if streams else dataset.mode
        if mode == "image":
            frame_no = 0
        else:
            frame_no = step if streams else dataset.frame
        with timers[0]:
            x = to_tensor(im, backend.device, backend.fp16)
        vis_dir = _visualize_dir(result.save_dir, paths[0], mode, frame_no) if visualize else None
        with timers[1]:
            pred = _infer(backend, x, augment, vis_dir, frames[0])
        with timers[2]:
            dets = postprocess(pred, x.shape[2:], [f.shape for f in frames], cfg)
        for i, det in enumerate(dets):
            fps = _output_fps(cap, dataset, i, vid_stride)
            frame = Frame(paths[i], frames[i], det, mode, frame_no, fps, i)
            save_path = outputs.write(frame)
            result.predictions.append(FramePrediction(paths[i], frame_no, det.numpy(), save_path))
            prefix = f"{i}: " if streams else log
            found = describe(det, names) or "(no detections), "
            LOGGER.info(f"{prefix}{x.shape[2]}x{x.shape[3]} {found}{timers[1].last * 1e3:.1f}ms")


def _output_fps(cap, dataset, index: int, vid_stride: int) -> float:
    """Frame rate for the output video: the source's, divided by --vid-stride so durations stay true."""
    if isinstance(dataset, LoadStreams):
        fps = dataset.fps[index]
    else:
        fps = cap.get(cv2.CAP_PROP_FPS) if cap is not None else 0.0
    fps = fps if math.isfinite(fps) and fps > 0 else DEFAULT_STREAM_FPS
    return fps / max(vid_stride, 1)


def _summary(result: DetectRun, imgsz: Sequence[int], outputs: RunOutputs, options: SaveOptions) -> None:
    t = result.speed
    LOGGER.info(f"Speed: {t[0]:.1f}ms pre-process, {t[1]:.1f}ms inference, {t[2]:.1f}ms NMS per image at "
                f"shape {(1, 3, *imgsz)}")  # fmt: skip
    if options.save_txt or options.save_img or options.save_crop or options.save_csv:
        labels = (
            f"\n{outputs.labels_written} labels saved to {result.save_dir / 'labels'}"
            if options.save_txt
            else ""
        )
        LOGGER.info(f"Results saved to {colorstr('bold', str(result.save_dir))}{labels}")


def parse_opt(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Detect objects in images, videos and streams.")
    parser.add_argument(
        "--weights", nargs="+", type=str, default=[str(ROOT / "yolov5s.pt")], help="model .pt path"
    )
    parser.add_argument("--source", type=str, default=str(DEFAULT_SOURCE),
                        help="file, folder, glob, .txt list, video, 0 (webcam), URL or .streams list")  # fmt: skip
    parser.add_argument(
        "--data", type=str, default=None, help="dataset YAML, for class names the model lacks"
    )
    parser.add_argument(
        "--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="inference size h,w"
    )
    parser.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--view-img", action="store_true", help="show results (needs a display)")
    parser.add_argument("--save-txt", action="store_true", help="save results to labels/*.txt")
    parser.add_argument("--save-conf", action="store_true", help="add confidences to --save-txt labels")
    parser.add_argument("--save-crop", action="store_true", help="save cropped prediction boxes")
    parser.add_argument("--save-csv", action="store_true", help="save results to predictions.csv")
    parser.add_argument("--nosave", action="store_true", help="do not save images/videos")
    parser.add_argument(
        "--classes", nargs="+", type=int, help="filter by class: --classes 0, or --classes 0 2 3"
    )
    parser.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    parser.add_argument("--augment", action="store_true", help="augmented inference (TTA)")
    parser.add_argument("--visualize", action="store_true", help="save feature maps and CBAM attention maps")
    parser.add_argument("--update", action="store_true", help="kept for compatibility; nothing to update")
    parser.add_argument("--project", default=str(ROOT / "runs/detect"), help="save results to project/name")
    parser.add_argument("--name", default="exp", help="save results to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--line-thickness", default=3, type=int, help="bounding box thickness (pixels)")
    parser.add_argument("--hide-labels", action="store_true", help="hide labels")
    parser.add_argument("--hide-conf", action="store_true", help="hide confidences")
    parser.add_argument(
        "--half", action="store_true", help="fp16 on CUDA, bf16 autocast on a CPU with native bf16"
    )
    parser.add_argument("--dnn", action="store_true", help="use OpenCV DNN for ONNX inference")
    parser.add_argument("--vid-stride", type=int, default=1, help="video frame-rate stride")
    parser.add_argument("--compile", action="store_true", help="torch.compile a .pt model (slow first batch)")
    opt = parser.parse_args(argv)
    if len(opt.imgsz) not in (1, 2):
        parser.error(f"--imgsz takes one or two integers (h w), got {len(opt.imgsz)}")
    opt.imgsz = opt.imgsz * 2 if len(opt.imgsz) == 1 else opt.imgsz
    return opt


def main(argv: Sequence[str] | None = None) -> int:
    opt = parse_opt(argv)
    setup_logging()
    print_args(vars(opt), "detect")
    try:
        with gc_frozen():  # no full-collection stalls between frames
            run(**vars(opt))
    except USER_ERRORS as e:
        LOGGER.error(f"ERROR: {e}")
        return 1
    except KeyboardInterrupt:
        LOGGER.warning("Interrupted; outputs written so far are kept (videos are closed and playable)")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
