"""Multi-process training with torch.distributed: process group, device per rank, ordering, shutdown.

A job is started by ``python -m torch.distributed.run`` (torchrun), which launches one process per
device and gives each the environment variables RANK (0..WORLD_SIZE-1 over all machines), LOCAL_RANK
(0..nproc_per_node-1 on this machine) and WORLD_SIZE. train.py reads them and calls ``run_training``,
which joins the process group (NCCL on CUDA devices, Gloo on CPU) and runs the Trainer as one rank.

Equivalence with one process: ``--batch-size`` is the global batch; each rank loads
``batch_size / WORLD_SIZE`` images (a DistributedSampler gives rank r the indices r, r + W, r + 2W ...
of the epoch's permutation), DDP averages gradients over ranks and the trainer multiplies each rank's
loss by WORLD_SIZE, so the summed gradient is that of the global batch. The loss's per-target means
(box and class terms) are divided by the target count of the whole global batch (``GlobalMeanLoss``),
which makes one DDP step equal to one single-process step on the same global batch (BatchNorm aside:
use --sync-bn on GPUs for batch statistics over the global batch).
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
from argparse import Namespace
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from utils.general import LOGGER
from utils.loss import ComputeLoss, LevelTargets

# Longest a rank waits in one collective: the other ranks wait in a broadcast while rank 0 validates
# and saves at the end of an epoch, so this bounds the validation time of a large dataset.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


# ------------------------------------------------------------------------------------------ options, device
def check_ddp_options(opt: Namespace, rank: int, world_size: int) -> None:
    """Raise ValueError for options that cannot work in a DDP job; warn about ones that do nothing."""
    if rank == -1:
        if opt.sync_bn:
            LOGGER.warning("WARNING: --sync-bn only applies to DDP jobs (torch.distributed.run); ignored")
        gpus = str(opt.device).replace(" ", "").split(",")
        if len(gpus) > 1:
            LOGGER.warning(
                f"WARNING: --device {opt.device} without torch.distributed.run trains on cuda:{gpus[0]} only; "
                f"for all of them run: python -m torch.distributed.run --nproc_per_node {len(gpus)} train.py ..."
            )
        return
    if opt.batch_size % world_size:
        raise ValueError(
            f"--batch-size {opt.batch_size} is the global batch and must be a multiple of the "
            f"{world_size} processes (WORLD_SIZE); try --batch-size {world_size * max(opt.batch_size // world_size, 1)}"
        )
    if opt.image_weights:
        raise ValueError("--image-weights is not supported with DDP: run on one process, or drop it")
    if opt.evolve:
        raise ValueError(
            "--evolve is not supported with DDP: run it on one process (python train.py --evolve)"
        )


def ddp_device(device_spec: str, local_rank: int) -> torch.device:
    """CUDA device of the process with ``local_rank``: the local_rank-th index of --device, else cuda:local_rank.

    ``--device 2,3`` with two processes per machine puts LOCAL_RANK 0 on cuda:2 and 1 on cuda:3.
    """
    spec = str(device_spec).strip().lower().replace("cuda:", "").replace(" ", "")
    ids = [s for s in spec.split(",") if s.isdigit()]
    if ids and local_rank >= len(ids):
        raise ValueError(
            f"--device {device_spec} lists {len(ids)} GPU(s) but this machine runs more processes "
            f"(LOCAL_RANK {local_rank}); pass one index per process, e.g. --nproc_per_node {len(ids)}"
        )
    index = int(ids[local_rank]) if ids else local_rank
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {local_rank} needs cuda:{index} but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s); lower --nproc_per_node or fix --device"
        )
    return torch.device("cuda", index)


def setup_ddp(device: torch.device, local_rank: int, device_spec: str = "") -> torch.device:
    """Join the process group started by torch.distributed.run (NCCL on CUDA, Gloo on CPU); returns
    this rank's device. Blocks until every rank of the job has joined."""
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"DDP runs on CUDA devices or on the CPU, not on {device.type}; use --device cpu")
    if device.type == "cuda":
        device = ddp_device(device_spec, local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    LOGGER.info(f"DDP: rank {dist.get_rank()} of {dist.get_world_size()} on {device} ({dist.get_backend()})")
    return device


def env_local_rank() -> int:
    """This process's rank on its machine (LOCAL_RANK, set by torch.distributed.run); -1 outside DDP."""
    return int(os.environ.get("LOCAL_RANK", -1)) if dist.is_initialized() else -1


def _barrier() -> None:
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@contextmanager
def local_main_first() -> Iterator[None]:
    """Run the body on LOCAL_RANK 0 of each machine first; the other ranks wait, then run it.

    For work that writes a shared file once (the dataset download, the label cache): the first
    process writes it, the others find it. Every rank passes exactly one barrier, also on error.
    No-op outside a process group.
    """
    lr = env_local_rank()
    if lr > 0:
        _barrier()
    try:
        yield
    finally:
        if lr == 0:
            _barrier()


# ---------------------------------------------------------------------------------------------------- loss
def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of x over all ranks (a new tensor; a collective every rank must call)."""
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def global_mean_scales(local_counts: Tensor, total_counts: Tensor, world_size: int) -> Tensor:
    """Factor turning a rank's mean over its n_r items into its share of the mean over all N items.

    mean_r * n_r * W / N: summed over the W ranks and divided by W (DDP's gradient average) this is
    the mean over the whole global batch. Levels with no items anywhere get 0.
    """
    total = total_counts.to(torch.float64)
    scale = local_counts.to(torch.float64) * world_size / total.clamp(min=1)
    return torch.where(total > 0, scale, torch.zeros_like(scale))


class GlobalMeanLoss(ComputeLoss):
    """ComputeLoss for DDP training whose box and class means run over the targets of all ranks.

    ComputeLoss averages the box (1 - CIoU) and class BCE terms over the targets assigned on each level;
    per rank that is a mean over that rank's targets, which differs from the global-batch mean when ranks
    hold different numbers of targets. Here each level's count is summed over ranks (one small
    all-reduce per step) and the means are rescaled by ``global_mean_scales``. The objectness mean runs
    over grid cells, whose number is the same on every rank, so it needs no change.

    Every rank must call it once per step (it is a collective): use it for training only, and plain
    ComputeLoss for rank-0 validation. ``sum_counts`` replaces the all-reduce in tests.
    """

    def __init__(self, model: nn.Module, hyp: dict[str, Any], imgsz: int = 640, label_smoothing: float = 0.0,
                 world_size: int | None = None, sum_counts: Callable[[Tensor], Tensor] | None = None):  # fmt: skip
        super().__init__(model, hyp, imgsz=imgsz, label_smoothing=label_smoothing)
        self.world_size = world_size if world_size is not None else dist.get_world_size()
        self.sum_counts = sum_counts or all_reduce_sum
        self._scales: list[tuple[LevelTargets, float]] = []

    def assign_targets(self, preds: Sequence[Tensor], targets: Tensor) -> list[LevelTargets]:
        assigned = super().assign_targets(preds, targets)
        local = torch.tensor(
            [a.image.shape[0] for a in assigned], dtype=torch.float64, device=preds[0].device
        )
        scales = global_mean_scales(local, self.sum_counts(local), self.world_size)
        self._scales = list(zip(assigned, scales.tolist(), strict=True))
        return assigned

    def _level_losses(self, pred: Tensor, assigned: LevelTargets) -> tuple[Tensor, Tensor, Tensor]:
        box, obj, cls = super()._level_losses(pred, assigned)
        scale = next((s for a, s in self._scales if a is assigned), None)
        if scale is None:
            raise RuntimeError("GlobalMeanLoss: level targets did not come from this step's assign_targets")
        return box * scale, obj, cls * scale


# ------------------------------------------------------------------------------------------------ run a rank
SIGTERM_EXIT = 128 + signal.SIGTERM  # the exit status sigterm_as_exit raises, as a shell reports a SIGTERM


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """While active, SIGTERM raises SystemExit(143) so that finally blocks (atomic saves, log files) run.

    torch.distributed.run sends SIGTERM to the surviving ranks when one rank fails or the job is cancelled;
    ``kill`` and job schedulers send it to a single-process run.
    The previous handler is restored on exit; does nothing off the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(_signum: int, _frame: Any) -> None:
        raise SystemExit(SIGTERM_EXIT)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_reason(e: BaseException) -> str:
    """One line saying why a rank stopped."""
    if isinstance(e, KeyboardInterrupt):
        return "KeyboardInterrupt (Ctrl-C)"
    if isinstance(e, SystemExit) and e.code == SIGTERM_EXIT:
        return "SIGTERM (another rank failed or the job was cancelled)"
    return f"{type(e).__name__}: {e}"


def run_training(opt: Namespace, hyp: dict[str, Any], device: torch.device, local_rank: int = -1,
                 rank: int = -1, world_size: int = 1) -> tuple[float, ...]:  # fmt: skip
    """Train on one process, or as one rank of a DDP job; the process group is always torn down.

    Options are assumed checked by ``check_ddp_options``. A failing rank logs which rank it is and
    re-raises, so its process exits non-zero and torch.distributed.run stops the other ranks (which then
    unwind through ``sigterm_as_exit``).
    """
    from utils.trainer import Trainer

    if local_rank == -1:
        with sigterm_as_exit():  # `kill` or a job scheduler: unwind like Ctrl-C
            return Trainer(opt, hyp, device).fit()
    with sigterm_as_exit():
        try:
            device = setup_ddp(device, local_rank, opt.device)
            if opt.sync_bn and device.type != "cuda":
                LOGGER.warning("WARNING: --sync-bn needs CUDA devices (NCCL); ignored on CPU")
            return Trainer(opt, hyp, device, rank=rank, world_size=world_size).fit()
        except BaseException as e:
            LOGGER.error(f"DDP rank {rank} stopped by {stop_reason(e)}; ending the job")
            raise
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
