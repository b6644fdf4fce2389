"""Benchmarks: export formats (size, mAP, speed), CPU inference efficiency and training throughput.

Usage:
    python benchmarks.py --weights best.pt --data shapes.yaml --img 320            # formats table
    python benchmarks.py --speed --cfg yolov5-resnet50-cbam.yaml --img 320 640     # inference paths
    python benchmarks.py --train-speed --cfg yolov5s.yaml yolov5-resnet50-cbam.yaml --data shapes.yaml --img 320
    python benchmarks.py --throughput --device 0 --img 640                          # GPU: batch 1/16/64
    python benchmarks.py --train-speed --device 0 --batch-size 64 --workers 8 --img 320  # GPU training
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.general import LOGGER, setup_logging  # noqa: E402


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=str, default="", help="checkpoint for the formats table")
    p.add_argument("--data", type=str, default="data/shapes.yaml")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, nargs="+", default=[640])
    p.add_argument(
        "--include",
        nargs="+",
        default=["pytorch-half", "torchscript", "onnx", "openvino", "openvino-int8"],
        help="formats for the table; pytorch-half = the .pt with --half (bf16 on a CPU that has it), "
        "openvino-int8 = OpenVINO with nncf int8 quantisation",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--speed", action="store_true", help="batch-1 latency of every CPU inference path")
    p.add_argument("--train-speed", action="store_true", help="training images/s: loader, model, both")
    p.add_argument(
        "--cfg", nargs="+", default=["yolov5-resnet50-cbam.yaml"], help="model YAML(s) for --speed and others"
    )
    p.add_argument(
        "--throughput",
        action="store_true",
        help="images/s by batch: fp32, AMP, channels_last, torch.compile (for a GPU)",
    )
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64], help="batch sizes for --throughput")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="leave the torch.compile rows out of --speed and --throughput",
    )
    p.add_argument("--batch-size", type=int, default=16, help="batch for --train-speed")
    p.add_argument("--workers", type=int, default=2, help="dataloader workers for --train-speed")
    p.add_argument("--no-amp", action="store_true", help="--train-speed in fp32 (as train.py --no-amp)")
    p.add_argument(
        "--memory-format",
        default="auto",
        choices=["auto", "channels_last", "contiguous"],
        help="layout for --train-speed; auto = what train.py uses on the device",
    )
    p.add_argument("--runs", type=int, default=10, help="timed runs per --speed variant")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 ONNX Runtime row")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opt = parse_opt(argv)
    setup_logging()
    from utils import benchmark as bm

    try:
        if opt.speed:
            for cfg in opt.cfg:
                bm.print_speed(
                    bm.inference_speed(
                        cfg, opt.imgsz, runs=opt.runs, int8=not opt.no_int8, compile=not opt.no_compile
                    ),
                    cfg,
                )
        elif opt.throughput:
            for cfg in opt.cfg:
                for s in opt.imgsz:
                    rows = bm.throughput_table(
                        cfg, s, opt.device, tuple(opt.batches), not opt.no_compile, opt.runs
                    )
                    bm.print_throughput(rows, cfg, s, opt.device)
        elif opt.train_speed:
            for cfg in opt.cfg:
                for s in opt.imgsz:
                    r = bm.train_speed(cfg, opt.data, s, opt.batch_size, workers=opt.workers,
                                       device=opt.device, memory_format=opt.memory_format, amp=not opt.no_amp)  # fmt: skip
                    bm.print_train_speed(cfg, s, opt.batch_size, r)
        else:
            if not opt.weights:
                raise ValueError(
                    "pass --weights (a checkpoint) for the formats table, or --speed / --train-speed"
                )
            for s in opt.imgsz:
                bm.print_formats(
                    bm.formats_table(opt.weights, opt.data, s, tuple(opt.include), opt.device), s
                )
    except (FileNotFoundError, ValueError) as e:
        LOGGER.error(f"ERROR: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
