"""PyTorch helpers: devices, seeding, weight init, model size and FLOPs, EMA."""

from __future__ import annotations

import ctypes
import math
import os
import random
import sys
import time
from collections.abc import Callable
from copy import deepcopy
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from utils.general import LOGGER


def select_device(device: str | int = "", batch_size: int = 0) -> torch.device:
    """'' (CUDA 0 if available, else CPU), 'cpu', 'mps', '0' or '0,1,2,3' -> torch.device.

    Raises ValueError with the valid choices when the request cannot be met.
    """
    spec = str(device).strip().lower().replace("cuda:", "").replace(" ", "")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError("--device mps requested but MPS is not available; use --device cpu")
        return torch.device("mps")
    if spec == "":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    ids = spec.split(",")
    if not all(i.isdigit() for i in ids):
        raise ValueError(f"invalid --device {device!r}; use cpu, mps, or CUDA indices like 0 or 0,1,2,3")
    n = torch.cuda.device_count()
    missing = [i for i in ids if int(i) >= n]
    if missing:
        have = f"{n} CUDA device(s)" if n else "no CUDA device"
        raise ValueError(f"invalid --device {device!r}: this machine has {have}; use --device cpu")
    if batch_size and len(ids) > 1 and batch_size % len(ids):
        raise ValueError(f"--batch-size {batch_size} is not a multiple of the {len(ids)} GPUs")
    return torch.device(f"cuda:{ids[0]}")


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with deterministic, ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        os.environ["PYTHONHASHSEED"] = str(seed)


def conv_memory_format(device: torch.device) -> torch.memory_format:
    """The layout convolutions run fastest in on this device, for models and their inputs.

    NHWC (channels_last) on both. On CPU oneDNN runs inference 10-16% and a training step 17-25%
    faster in it (yolov5s at 320, yolov5-resnet50-cbam at 128; ``python benchmarks.py --speed`` /
    ``--train-speed``). On an H200 the cuDNN tensor-core kernels gain more: an AMP training step of
    yolov5-resnet50-cbam at 320, batch 64, 29% and of yolov5s 75%; AMP inference at batch 16, 14% and
    11% (``--train-speed --memory-format ...``, ``--throughput``). Other devices keep PyTorch's default.
    """
    return torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format


M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h> mallopt parameters
GLIBC_MALLOC_SETTINGS = ((M_MMAP_THRESHOLD, 2**31 - 1), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 2**30))


def retain_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the system.

    A CPU training step allocates and frees the same large activation buffers every iteration. By
    default glibc serves each block above its mmap threshold with a fresh mmap() and trims the heap
    top, so every step page-faults its whole working set in again (it shows as system time).
    Raising the mmap and trim thresholds and padding the heap keep those pages mapped: yolov5s at
    320, batch 16, 2 cores, 1.26 -> 0.73 s per batch (``python benchmarks.py --train-speed``);
    yolov5-resnet50-cbam inference at 640, batch 1: 360 -> 315 ms. Called by the trainer and by
    AutoBackend on a CPU. The process then stays at its peak resident size. Returns False, changing
    nothing, off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    accepted = [mallopt(param, value) == 1 for param, value in GLIBC_MALLOC_SETTINGS]  # every one tried
    return all(accepted)


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bf16 matrix maths natively (AVX512-BF16 or AMX), so bf16 autocast pays.

    Without it oneDNN emulates bf16 in fp32 and autocast only adds conversions.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def half_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision ``--half`` runs in on ``device``, or None where it would not be faster.

    CUDA: fp16 weights and inputs. CPU: bf16 autocast where the CPU has native bf16, else None (fp32).
    """
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_bf16_supported():
        return torch.bfloat16
    return None


def compile_for_inference(model: nn.Module) -> Callable[..., Any]:
    """``torch.compile`` for a model whose weights no longer change (detect, val, benchmarks).

    Inductor's freezing treats the weights as constants: on the CPU it folds them into oneDNN's
    pre-packed layouts and fuses convolutions with the activations and additions after them, which
    plain compilation cannot do (yolov5-resnet50-cbam at 320, batch 1, 2 cores: 93 -> 69 ms). Dynamo
    reads the freezing flag while it traces, at the first call of each new input shape, and only with
    gradients off; ``torch.compile(options=...)`` would set it later, for inductor alone, and leave the
    weights as graph inputs. So every call runs under ``no_grad`` with the flag set. Each new input
    shape compiles a static graph (a dynamic one would not know the shapes oneDNN packs weights for);
    past Dynamo's recompile limit (8 shapes) further shapes run eager. The weights must not change
    after the first call: the compiled graph keeps the values it saw.
    """
    import torch._inductor.config as inductor_config  # imported on use: heavy, and --compile is rare

    compiled = torch.compile(model, dynamic=False)  # static shapes: oneDNN packs weights per shape

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return run


def time_sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def initialize_weights(model: nn.Module) -> None:
    """In-place activations everywhere they are safe; conv init stays torch's default."""
    for m in model.modules():
        if isinstance(m, (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)):
            m.inplace = True


def count_flops(model: nn.Module, x: Any) -> int:
    """Floating-point operations (multiply and add counted separately) of one forward pass."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()


def model_gflops(model: nn.Module, imgsz: int = 640) -> float:
    """GFLOPs at imgsz x imgsz, measured on a small input and scaled by area, as YOLOv5 reports them.

    Exact for convolutions over the image; layers on pooled vectors (attention MLPs) do not grow with
    the area, so attention models come out slightly high (yolov5-resnet50-cbam: 113.3 against an
    exact 113.1 at 640, the count benchmarks.py uses)."""
    stride = int(max(getattr(model, "stride", torch.tensor([32])).max(), 32))
    ch = int(getattr(model, "yaml", {}).get("ch", 3))
    probe = torch.zeros(1, ch, stride * 2, stride * 2, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        flops = count_flops(model, probe)
    finally:
        model.train(was_training)
    return flops / 1e9 * (imgsz / (stride * 2)) ** 2


def model_info(model: nn.Module, verbose: bool = False, imgsz: int = 640) -> dict[str, float]:
    """Log and return layer count, parameters, gradients and GFLOPs at imgsz."""
    n_p = sum(p.numel() for p in model.parameters())
    n_g = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if verbose:
        for i, (name, p) in enumerate(model.named_parameters()):
            LOGGER.info(f"{i:5g} {name:>50} {p.requires_grad!s:>9} {p.numel():12g} {list(p.shape)!s:>20}")
    gflops = model_gflops(model, imgsz)
    layers = len(list(model.modules()))
    name = type(model).__name__
    cfg = getattr(model, "yaml", {}).get("yaml_file")
    label = f"{name} ({os.path.basename(cfg)})" if cfg else name
    LOGGER.info(f"{label} summary: {layers} layers, {n_p:,} parameters, {n_g:,} gradients, "
                f"{gflops:.1f} GFLOPs at {imgsz}")  # fmt: skip
    return {"layers": layers, "params": n_p, "gradients": n_g, "gflops": gflops}


def profile_layers(m: nn.Module, x: Any, runs: int = 3) -> tuple[float, float]:
    """(mean forward milliseconds, GFLOPs) of one layer on input x."""
    flops = count_flops(m, x) / 1e9
    with torch.no_grad():
        t0 = time_sync()
        for _ in range(runs):
            m(x)
        ms = (time_sync() - t0) / runs * 1000
    return ms, flops


def de_parallel(model: nn.Module) -> nn.Module:
    """The bare model inside DataParallel / DistributedDataParallel."""
    return (
        model.module
        if isinstance(model, (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel))
        else model
    )


class ModelEMA:
    """Exponential moving average of model weights; decay ramps up as 0.9999 * (1 - exp(-updates / 2000))."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = deepcopy(de_parallel(model)).eval()
        self.updates = updates
        self.decay_max, self.tau = decay, tau
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def decay(self) -> float:
        return self.decay_max * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay()
        msd = de_parallel(model).state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])
