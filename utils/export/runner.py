"""Export a checkpoint to several formats in one go: option checks, model preparation, summary."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from utils.checkpoints import model_from_checkpoint
from utils.export.common import ExportError, ExportResult, MissingDependencyError, PredictionOnly, require
from utils.export.metadata import ExportMetadata
from utils.export.onnx_format import export_onnx
from utils.export.openvino_format import calibration_batches, export_openvino, openvino_folder
from utils.export.torchscript import check_mobile_optimize, export_torchscript
from utils.general import LOGGER, check_file, check_img_size
from utils.torch_utils import select_device

FORMAT_NAMES = {"torchscript": "TorchScript", "onnx": "ONNX", "openvino": "OpenVINO"}
REQUIREMENTS = {  # format -> (module, purpose); pip package names equal the module names here
    "torchscript": (),
    "onnx": (("onnx", "ONNX export"),),
    "openvino": (("openvino", "OpenVINO export"), ("onnx", "OpenVINO export (via the ONNX graph)")),
}


@dataclass
class ExportOptions:
    """The export.py flags; see ``python export.py --help`` for each one."""

    include: tuple[str, ...] = ("torchscript", "onnx")
    imgsz: tuple[int, int] = (640, 640)
    batch_size: int = 1
    device: str = "cpu"
    half: bool = False
    inplace: bool = False
    optimize: bool = False
    int8: bool = False
    dynamic: bool = False
    simplify: bool = False
    opset: int | None = None
    nms: bool = False
    data: str | None = None
    notes: list[str] = field(default_factory=list)  # what check_options changed or ignored


def parse_include(include: str | Iterable[str]) -> tuple[str, ...]:
    """Format names, lower-cased, commas allowed ('onnx,openvino'); ValueError lists the valid ones."""
    items = [include] if isinstance(include, str) else list(include)
    names = [n.strip().lower() for item in items for n in str(item).split(",") if n.strip()]
    unknown = [n for n in names if n not in FORMAT_NAMES]
    if unknown or not names:
        raise ValueError(
            f"--include {' '.join(unknown) or '(nothing)'}: supported formats are {', '.join(FORMAT_NAMES)}"
        )
    return tuple(dict.fromkeys(names))


def export_path(weights: str | Path, fmt: str, int8: bool = False) -> Path:
    """Where a format is written beside the weights: best.torchscript, best.onnx, best_openvino_model/
    (best_int8_openvino_model/ with ``int8``, so an fp32 export beside it stays)."""
    weights = Path(weights)
    return openvino_folder(weights, int8) if fmt == "openvino" else weights.with_suffix(f".{fmt}")


def check_options(opt: ExportOptions, device: torch.device) -> ExportOptions:
    """Resolve flags that cannot apply here into warnings (recorded in ``notes``); raise on conflicts."""
    opt = replace(opt, include=parse_include(opt.include), notes=list(opt.notes))
    if opt.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {opt.batch_size}")
    if opt.half and device.type != "cuda":
        opt.half = False
        opt.notes.append("--half needs a CUDA device (--device 0); exporting fp32 on CPU")
    if opt.optimize and device.type != "cpu":
        opt.optimize = False
        opt.notes.append("--optimize (TorchScript mobile optimisation) works on CPU only; skipped")
    if opt.int8 and "openvino" not in opt.include:
        opt.notes.append("--int8 applies to OpenVINO only; add openvino to --include")
    if opt.int8 and "openvino" in opt.include and not opt.data:
        raise ValueError("--int8 needs calibration images: pass --data DATASET.yaml")
    if opt.inplace:
        opt.notes.append(
            "--inplace has no effect: Detect always decodes out of place, which every format accepts"
        )
    if opt.nms:
        opt.notes.append(
            "--nms is not supported yet: exports return decoded predictions (bs, N, 5+nc); "
            "detect.py and val.py run NMS after inference"
        )
    return opt


def prepare_model(weights: str | Path, device: torch.device, half: bool = False) -> PredictionOnly:
    """Checkpoint -> fused eval model, gradients off, wrapped to return predictions only."""
    model = model_from_checkpoint(check_file(weights, what="weights"), device=device, fuse=True)
    model.requires_grad_(False)
    wrapped = PredictionOnly(model).eval()
    return wrapped.half() if half else wrapped


@dataclass
class ExportRun:
    """All formats of one export.py call, the metadata they share (None if none ran) and total seconds."""

    results: list[ExportResult]
    meta: ExportMetadata | None
    seconds: float

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def result(self, fmt: str) -> ExportResult:
        return next(r for r in self.results if r.format == fmt)

    def summary(self) -> list[str]:
        """Human summary: one row per format (time, size, path or error), then how to use the files."""
        lines = [f"\nExport complete ({self.seconds:.1f}s)"]
        for r in self.results:
            status = f"{r.seconds:6.1f}s {r.size_mb:8.1f} MB  {r.path}" if r.ok else f"FAILED: {r.error}"
            lines.append(f"  {FORMAT_NAMES[r.format]:<12} {status}")
        done = [r for r in self.results if r.ok]
        if not done or self.meta is None:
            return lines
        h, w = self.meta.imgsz
        size = "" if self.meta.dynamic else f" --imgsz {h}" if h == w else f" --imgsz {h} {w}"
        lines.append("Use the exports:")
        for r in done:
            lines.append(f"  Detect:   python detect.py --weights {r.path} --source IMAGES_OR_VIDEO{size}")
            lines.append(f"  Validate: python val.py --weights {r.path} --data DATA.yaml{size}")
        return lines


def preflight(fmt: str, opt: ExportOptions, device: torch.device) -> str:
    """Why ``fmt`` cannot be exported here ('' when it can): a missing package or an unusable flag.

    Checked before the model is loaded, so a missing package costs no time.
    """
    needs = list(REQUIREMENTS[fmt]) + (
        [("nncf", "--int8 OpenVINO quantisation")] if fmt == "openvino" and opt.int8 else []
    )
    try:
        for module, purpose in needs:
            require(module, purpose=purpose)
        if fmt == "torchscript" and opt.optimize:
            check_mobile_optimize(device)
    except (MissingDependencyError, ExportError) as e:
        return str(e)
    return ""


def run_export(weights: str | Path, opt: ExportOptions | None = None) -> ExportRun:
    """Export ``weights`` to every format in ``opt.include``; one failed format does not stop the rest.

    Raises FileNotFoundError, CheckpointError or ValueError for problems that stop every format.
    """
    t0 = time.perf_counter()
    weights = check_file(weights, what="weights")
    device = select_device(opt.device if opt else "cpu")
    opt = check_options(opt or ExportOptions(), device)
    for note in opt.notes:
        LOGGER.warning(f"WARNING: {note}")
    blocked = {fmt: preflight(fmt, opt, device) for fmt in opt.include}
    for fmt, why in blocked.items():
        if why:
            LOGGER.error(f"{FORMAT_NAMES[fmt]}: export failure: {why}")
    todo = [fmt for fmt in opt.include if not blocked[fmt]]
    done: dict[str, ExportResult] = {}
    meta = None
    if todo:
        wrapped, im, meta = _prepare(weights, device, opt)
        done = {fmt: _export_one(fmt, weights, wrapped, im, meta, opt) for fmt in todo}
    results = [
        done[fmt] if fmt in done else ExportResult(fmt, None, 0.0, blocked[fmt]) for fmt in opt.include
    ]
    return ExportRun(results, meta, time.perf_counter() - t0)


def _prepare(
    weights: Path, device: torch.device, opt: ExportOptions
) -> tuple[PredictionOnly, torch.Tensor, ExportMetadata]:
    """Loaded model, example input (B, 3, H, W) of the export size, and the metadata all formats share."""
    wrapped = prepare_model(weights, device, opt.half)
    model = wrapped.model
    stride = int(max(model.stride.max(), 32))
    imgsz = tuple(check_img_size([int(s) for s in opt.imgsz], stride))
    im = torch.zeros(opt.batch_size, 3, *imgsz, device=device)
    im = im.half() if opt.half else im
    with torch.no_grad():
        for _ in range(2):  # dry runs: catch shape errors before any exporter does
            shape = tuple(wrapped(im).shape)
    LOGGER.info(f"PyTorch: starting from {weights} with input {tuple(im.shape)}, output {shape}")
    cfg = Path(str(model.yaml.get("yaml_file", ""))).stem
    meta = ExportMetadata(
        stride=stride,
        names=dict(model.names),
        imgsz=imgsz,
        batch=opt.batch_size,
        dynamic=opt.dynamic,
        half=opt.half,
        description=f"YOLO detector {cfg}".strip(),
    )
    return wrapped, im, meta


def _export_one(fmt: str, weights: Path, wrapped: PredictionOnly, im: torch.Tensor, meta: ExportMetadata,
                opt: ExportOptions) -> ExportResult:  # fmt: skip
    name = FORMAT_NAMES[fmt]
    target = export_path(weights, fmt, int8=opt.int8 and fmt == "openvino")
    LOGGER.info(f"{name}: exporting to {target} ...")
    t0 = time.perf_counter()
    try:
        if fmt == "torchscript":
            path = export_torchscript(wrapped, im, target, meta, optimize=opt.optimize)
        elif fmt == "onnx":
            path = export_onnx(
                wrapped, im, target, meta, opset=opt.opset, dynamic=opt.dynamic, simplify=opt.simplify
            )
        else:
            calib = None
            if opt.int8:
                calib = calibration_batches(opt.data, tuple(im.shape[2:]), opt.batch_size, meta.stride)
            fp32 = copy.deepcopy(wrapped).float().cpu()  # the shared model may be fp16 on CUDA
            path = export_openvino(fp32, im.float().cpu(), target, meta, dynamic=opt.dynamic, half=opt.half,
                                   calibration=calib)  # fmt: skip
    except (MissingDependencyError, ExportError, ValueError, FileNotFoundError) as e:
        LOGGER.error(f"{name}: export failure: {e}")
        return ExportResult(fmt, None, time.perf_counter() - t0, str(e))
    result = ExportResult(fmt, path, time.perf_counter() - t0)
    LOGGER.info(f"{name}: export success, {result.seconds:.1f}s, saved as {path} ({result.size_mb:.1f} MB)")
    return result
