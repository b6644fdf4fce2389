"""Train a YOLO detector on a YOLO-format dataset.

Usage:
    python train.py --data shapes.yaml --cfg yolov5-resnet50-cbam.yaml --weights '' --img 320 --epochs 30
    python train.py --data D.yaml --weights runs/train/exp/weights/best.pt      # fine-tune a checkpoint
    python train.py --resume                                                    # continue the latest run
    python -m torch.distributed.run --nproc_per_node 2 train.py ... --device 0,1  # several GPUs / machines
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.checkpoints import CheckpointError, load_checkpoint, resume_epoch  # noqa: E402
from utils.general import LOGGER, check_file, increment_path, print_args, setup_logging, yaml_load  # noqa: E402
from utils.trainer import TrainingDiverged  # noqa: E402

LOCAL_RANK = int(os.getenv("LOCAL_RANK", -1))
RANK = int(os.getenv("RANK", -1))
WORLD_SIZE = int(os.getenv("WORLD_SIZE", 1))


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--weights", type=str, default="", help="checkpoint or torchvision ResNet50 .pth; '' = scratch"
    )
    p.add_argument("--cfg", type=str, default="", help="model YAML (path or name in models/)")
    p.add_argument("--data", type=str, default="data/shapes.yaml", help="dataset YAML")
    p.add_argument("--hyp", type=str, default="data/hyps/hyp.scratch-low.yaml", help="hyperparameters YAML")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument(
        "--time", type=float, default=None, help="time budget in hours; sets the epochs (overrides --epochs)"
    )
    p.add_argument("--batch-size", "--batch", type=int, default=16, help="total batch size over all devices")
    p.add_argument(
        "--imgsz", "--img", "--img-size", type=int, default=640, help="train/val image size (pixels)"
    )
    p.add_argument("--rect", action="store_true", help="rectangular training batches")
    p.add_argument(
        "--resume", nargs="?", const=True, default=False, help="resume the latest or the given last.pt"
    )
    p.add_argument("--nosave", action="store_true", help="only save the final checkpoint")
    p.add_argument("--noval", action="store_true", help="only validate after the final epoch")
    p.add_argument("--noautoanchor", action="store_true", help="disable AutoAnchor")
    p.add_argument("--noplots", action="store_true", help="save no plot files")
    p.add_argument(
        "--evolve", type=int, nargs="?", const=300, help="evolve hyperparameters for N generations"
    )
    p.add_argument("--cache", type=str, nargs="?", const="ram", help="cache images in ram (default) or disk")
    p.add_argument("--image-weights", action="store_true", help="sample images by class rarity")
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    p.add_argument("--multi-scale", action="store_true", help="vary image size +/- 50%%")
    p.add_argument("--single-cls", action="store_true", help="train all classes as one")
    p.add_argument("--optimizer", type=str, choices=["SGD", "Adam", "AdamW"], default="SGD")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm, DDP only")
    p.add_argument("--workers", type=int, default=8, help="max dataloader workers (per rank in DDP)")
    p.add_argument("--project", default="runs/train", help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name, do not increment")
    p.add_argument("--quad", action="store_true", help="quad dataloader")
    p.add_argument("--cos-lr", action="store_true", help="cosine LR schedule")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing epsilon")
    p.add_argument(
        "--patience", type=int, default=100, help="early stop after this many epochs without improvement"
    )
    p.add_argument(
        "--freeze", nargs="+", type=int, default=[0], help="freeze layers: backbone=10, first3=0 1 2"
    )
    p.add_argument("--save-period", type=int, default=-1, help="save a checkpoint every N epochs")
    p.add_argument("--seed", type=int, default=0, help="global training seed")
    p.add_argument(
        "--no-amp",
        action="store_true",
        help="train in fp32; by default AMP runs fp16 on CUDA and bf16 on a CPU with native bf16",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by torch.distributed.run")
    return p.parse_args(argv)


def resolve_resume(opt: argparse.Namespace) -> argparse.Namespace:
    """Replace the options by those saved in the checkpoint being resumed."""
    from utils.train_setup import latest_run

    last = Path(opt.resume) if isinstance(opt.resume, str) else latest_run()
    ckpt = load_checkpoint(check_file(last, what="--resume checkpoint"))
    saved = dict(ckpt.get("train_args") or {})
    if not saved:
        raise ValueError(f"{last} holds no training arguments; start a new run with --weights {last}")
    resume_epoch(ckpt, int(saved.get("epochs", 0)), last)  # a finished run: say so before building anything
    new = argparse.Namespace(**{**vars(parse_opt([])), **saved})
    new.weights, new.resume, new.cfg = str(last), True, ""
    new.device, new.workers = opt.device, opt.workers  # the machine may have changed
    new.exist_ok, new.save_dir = True, str(last.parent.parent)
    if new.time:  # the epochs planned before the stop stand; the clock is not restarted
        LOGGER.info(f"--time {new.time:g} h: resuming the plan of {new.epochs} epochs made before the stop")
        new.time = None
    return new


def check_options(opt: argparse.Namespace) -> argparse.Namespace:
    """Validate paths and fill derived options; one clear message per mistake."""
    if opt.resume and not opt.evolve:
        return resolve_resume(opt)
    if not opt.cfg and not opt.weights:
        raise ValueError("pass --cfg (model YAML) and/or --weights (checkpoint)")
    if opt.weights:
        check_file(opt.weights, what="--weights")
    opt.hyp = str(check_file(opt.hyp, (ROOT, ROOT / "data" / "hyps"), what="--hyp"))
    if opt.evolve and opt.project == "runs/train":
        opt.project = "runs/evolve"
    opt.save_dir = str(
        increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok or bool(opt.evolve))
    )
    return opt


def main(opt: argparse.Namespace) -> int:
    setup_logging(rank=RANK)
    from utils.distributed import SIGTERM_EXIT, check_ddp_options, run_training
    from utils.torch_utils import select_device

    try:
        opt = check_options(opt)
        check_ddp_options(opt, RANK, WORLD_SIZE)
        if RANK in (-1, 0):
            print_args(vars(opt), "train")
        device = select_device(opt.device, batch_size=opt.batch_size)
        if opt.evolve:
            from utils.evolve import evolve

            evolve(opt, device)
            return 0
        hyp = (
            yaml_load(opt.hyp)
            if not opt.resume
            else load_checkpoint(opt.weights).get("hyp") or yaml_load(opt.hyp)
        )
        run_training(opt, hyp, device, LOCAL_RANK, RANK, WORLD_SIZE)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        LOGGER.error(f"ERROR: {e}")
        return 1
    except TrainingDiverged as e:
        LOGGER.error(f"ERROR: {e}")
        return 1
    except OSError as e:  # disk full, permissions: the previous checkpoint is intact (atomic writes)
        LOGGER.error(f"ERROR: {e}. The last complete checkpoint is kept; free the space and --resume")
        return 1
    except KeyboardInterrupt:
        LOGGER.error("Interrupted: the last saved checkpoint is intact; continue with --resume")
        return 130
    except SystemExit as e:
        if e.code != SIGTERM_EXIT:
            raise
        LOGGER.error("Terminated (SIGTERM): the last saved checkpoint is intact; continue with --resume")
        return SIGTERM_EXIT
    return 0


def run(**kwargs) -> argparse.Namespace:
    """In-process use: train.run(data='shapes.yaml', cfg='yolov5n.yaml', epochs=1); returns the options used."""
    opt = parse_opt([])
    for k, v in kwargs.items():
        setattr(opt, k, v)
    code = main(opt)
    if code:
        raise SystemExit(code)
    return opt


if __name__ == "__main__":
    sys.exit(main(parse_opt()))
