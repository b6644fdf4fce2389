"""Export a trained checkpoint to TorchScript, ONNX and OpenVINO.

Usage:
    python export.py --weights runs/train/exp/weights/best.pt --include torchscript onnx openvino
    python export.py --weights best.pt --include onnx --dynamic --simplify --opset 17

Files are written beside the weights: best.torchscript, best.onnx, best_openvino_model/ (with --int8:
best_int8_openvino_model/). Each maps float BCHW RGB images in 0..1 to decoded predictions
(bs, N, 5 + nc) and stores stride, names, imgsz, batch and dynamic for the loader
(models/backend.py AutoBackend).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # allow `python export.py` from anywhere
    sys.path.insert(0, str(ROOT))

from utils.checkpoints import CheckpointError  # noqa: E402
from utils.export.runner import FORMAT_NAMES, ExportOptions, run_export  # noqa: E402
from utils.general import LOGGER, print_args, setup_logging  # noqa: E402


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Export a checkpoint to TorchScript, ONNX and OpenVINO.")
    p.add_argument("--weights", type=str, default="yolov5s.pt", help="checkpoint (.pt) to export")
    p.add_argument(
        "--include", nargs="+", default=["torchscript", "onnx"], help=f"formats: {', '.join(FORMAT_NAMES)}"
    )
    p.add_argument(
        "--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="image size h (w)"
    )
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the exported input")
    p.add_argument("--device", default="cpu", help="cpu or a CUDA index like 0")
    p.add_argument("--half", action="store_true", help="fp16 export (CUDA devices only)")
    p.add_argument(
        "--inplace", action="store_true", help="accepted for compatibility; decoding is never in place"
    )
    p.add_argument("--optimize", action="store_true", help="TorchScript: optimise for mobile (CPU only)")
    p.add_argument(
        "--int8", action="store_true", help="OpenVINO: INT8 post-training quantisation (needs nncf, --data)"
    )
    p.add_argument(
        "--dynamic", action="store_true", help="ONNX/OpenVINO/TorchScript: dynamic batch, height, width"
    )
    p.add_argument(
        "--simplify", action="store_true", help="ONNX: simplify the graph (needs onnxslim or onnxsim)"
    )
    p.add_argument(
        "--opset", type=int, default=None, help="ONNX opset (default 17, or the newest onnx knows)"
    )
    p.add_argument("--nms", action="store_true", help="append NMS to the graph (not supported yet)")
    p.add_argument("--data", type=str, default=None, help="dataset YAML whose images calibrate --int8")
    opt = p.parse_args(argv)
    if len(opt.imgsz) not in (1, 2):
        p.error(f"--imgsz takes one or two integers, got {opt.imgsz}")
    opt.imgsz = opt.imgsz * 2 if len(opt.imgsz) == 1 else opt.imgsz
    return opt


def main(argv: list[str] | None = None) -> int:
    opt = parse_opt(argv)
    setup_logging()
    print_args(vars(opt), "export")
    options = ExportOptions(include=tuple(opt.include), imgsz=tuple(opt.imgsz), batch_size=opt.batch_size,
                            device=opt.device, half=opt.half, inplace=opt.inplace, optimize=opt.optimize,
                            int8=opt.int8, dynamic=opt.dynamic, simplify=opt.simplify, opset=opt.opset,
                            nms=opt.nms, data=opt.data)  # fmt: skip
    try:
        run = run_export(opt.weights, options)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        LOGGER.error(f"ERROR: {e}")
        return 1
    for line in run.summary():
        LOGGER.info(line)
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
