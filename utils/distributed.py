"""Single-process or DistributedDataParallel training entry: process group set-up and teardown."""

from __future__ import annotations

import datetime
from argparse import Namespace
from typing import Any

import torch
import torch.distributed as dist

from utils.general import LOGGER


def setup_ddp(device: torch.device, local_rank: int, world_size: int, batch_size: int) -> torch.device:
    """Join the process group started by torch.distributed.run: NCCL on GPUs, Gloo on CPU."""
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of WORLD_SIZE {world_size}")
    if device.type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise ValueError(
                f"LOCAL_RANK {local_rank} has no CUDA device (found {torch.cuda.device_count()})"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return device


def run_training(opt: Namespace, hyp: dict[str, Any], device: torch.device, local_rank: int = -1,
                 rank: int = -1, world_size: int = 1) -> tuple[float, ...]:  # fmt: skip
    """Train on one process, or as one rank of a DDP job; the group is always torn down."""
    from utils.trainer import Trainer

    if local_rank != -1:
        device = setup_ddp(device, local_rank, world_size, opt.batch_size)
    try:
        return Trainer(opt, hyp, device, rank=rank, world_size=world_size).fit()
    except BaseException:
        if dist.is_initialized() and world_size > 1:
            LOGGER.error(f"rank {rank} failed; stopping the job")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
