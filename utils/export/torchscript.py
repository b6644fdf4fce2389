"""TorchScript export: a traced graph plus metadata as the extra file config.txt."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from utils.export.common import ExportError, PredictionOnly, quiet_tracing
from utils.export.metadata import TORCHSCRIPT_CONFIG, ExportMetadata
from utils.general import LOGGER


def export_torchscript(model: nn.Module, im: torch.Tensor, path: str | Path, meta: ExportMetadata,
                       optimize: bool = False) -> Path:  # fmt: skip
    """Trace ``model`` (wrapped to return predictions only) on ``im`` (B, 3, H, W) and save to ``path``.

    Shapes are traced as size ops, so the file runs at other batches and sizes too; ``meta.dynamic``
    tells loaders whether that was asked for. ``optimize`` applies mobile optimisation (CPU only).
    """
    path = Path(path)
    wrapped = model if isinstance(model, PredictionOnly) else PredictionOnly(model)
    wrapped.eval()
    if optimize:
        check_mobile_optimize(im.device)  # before the slow trace
    with torch.no_grad(), quiet_tracing():
        traced = torch.jit.trace(wrapped, im, strict=False, check_trace=False)  # tests compare outputs
        if optimize:
            traced = optimize_for_mobile(traced)
    extra = {TORCHSCRIPT_CONFIG: json.dumps(meta.with_format("torchscript").to_dict())}
    traced.save(str(path), _extra_files=extra)
    return path


def load_torchscript(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[torch.jit.ScriptModule, dict]:
    """(module, metadata dict from config.txt, {} when there is none) of a .torchscript file."""
    files = {TORCHSCRIPT_CONFIG: ""}
    with warnings.catch_warnings():  # TorchScript is deprecated upstream; the format is still supported here
        warnings.filterwarnings(
            "ignore", message=r"`?torch\.jit\.load`? is deprecated", category=FutureWarning
        )
        module = torch.jit.load(str(path), map_location=map_location, _extra_files=files)
    raw = files[TORCHSCRIPT_CONFIG]
    return module, (json.loads(raw) if raw else {})


def check_mobile_optimize(device: torch.device) -> None:
    """Raise ExportError unless mobile optimisation can run: CPU, and a PyTorch build with XNNPACK."""
    import torch.backends.xnnpack

    if device.type != "cpu":
        raise ExportError("--optimize (mobile optimisation) works on CPU only; use --device cpu")
    if not torch.backends.xnnpack.enabled:
        raise ExportError(
            "--optimize needs a PyTorch build with XNNPACK, and this one has none; drop --optimize"
        )


def optimize_for_mobile(traced: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """PyTorch's mobile optimisation (conv/bn folding, XNNPACK ops) of a traced CPU module."""
    from torch.utils import mobile_optimizer

    optimized = mobile_optimizer.optimize_for_mobile(traced)
    LOGGER.info("TorchScript: applied mobile optimisation")
    return optimized
