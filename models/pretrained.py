"""Load torchvision ResNet50 ImageNet weights into the ResNet rows of a detection model.

torchvision names its tensors conv1/bn1 (stem) and layer1..layer4.K.* (stages); our ResNetStem and
ResNetStage rows use the same names inside, so the map is only a prefix change per row.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from models.common import ResNetStage, ResNetStem

TORCHVISION_FILE = "resnet50-11ad3fa6.pth"  # torchvision's IMAGENET1K_V2 file name
TORCH_HUB_DIR = Path(torch.hub.get_dir()) / "checkpoints"


@dataclass
class TransferReport:
    transferred: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # source tensors with no place or wrong shape
    total: int = 0

    def summary(self) -> str:
        line = f"Transferred {len(self.transferred)}/{self.total} ResNet50 tensors"
        if self.missing:
            line += f"; not transferred ({len(self.missing)}): {', '.join(self.missing[:8])}"
            line += " ..." if len(self.missing) > 8 else ""
        return line


def backbone_prefixes(model: nn.Module) -> dict[str, str]:
    """torchvision prefix ('', 'layer1.' ...) -> our state-dict prefix ('model.0.', 'model.1.' ...)."""
    layers = model.model if hasattr(model, "model") else model
    stems = [i for i, m in enumerate(layers) if isinstance(m, ResNetStem)]
    stages = [i for i, m in enumerate(layers) if isinstance(m, ResNetStage)]
    if len(stems) != 1 or len(stages) != 4:
        raise ValueError(
            f"model has {len(stems)} ResNetStem and {len(stages)} ResNetStage rows; need 1 and 4"
        )
    prefixes = {"": f"model.{stems[0]}."}
    prefixes.update({f"layer{k + 1}.": f"model.{i}." for k, i in enumerate(stages)})
    return prefixes


def _target_key(key: str, prefixes: dict[str, str]) -> str | None:
    if key.startswith("fc."):
        return None
    for src in sorted(prefixes, key=len, reverse=True):
        if src and key.startswith(src):
            return prefixes[src] + key[len(src) :]
    return prefixes[""] + key if key.split(".")[0] in ("conv1", "bn1") else None


def read_state_dict(weights: str | Path) -> dict[str, torch.Tensor]:
    """A torchvision ResNet50 state dict from a file (tensors only, never code)."""
    if str(weights) in TORCHVISION_NAMES:
        return _fetch_torchvision(str(weights))
    path = Path(weights)
    if not path.is_file():
        hub = TORCH_HUB_DIR / path.name
        if hub.is_file():
            path = hub
        else:
            raise FileNotFoundError(
                f"ResNet50 weights not found: {weights}. This machine does not download anything: place "
                f"torchvision's {TORCHVISION_FILE} (ResNet50_Weights.IMAGENET1K_V2) at that path or in {TORCH_HUB_DIR}"
            )
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path}: refused to load: not a plain state dict (unpickling it would run code); nothing from it was run"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not any(k.startswith("layer1.") for k in sd):
        raise ValueError(f"{path}: not a torchvision ResNet state dict (no layer1.* tensors)")
    return sd


TORCHVISION_NAMES = ("IMAGENET1K_V1", "IMAGENET1K_V2", "resnet50")


def _fetch_torchvision(name: str) -> dict[str, torch.Tensor]:
    """Weights through torchvision's API (cache first, download only when the user named them)."""
    from torchvision.models import ResNet50_Weights

    weights = ResNet50_Weights.IMAGENET1K_V2 if name == "resnet50" else ResNet50_Weights[name]
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # offline, proxy, disk: say where the file goes instead
        file = Path(weights.url).name
        raise FileNotFoundError(
            f"could not fetch torchvision {weights} ({type(e).__name__}: {e}); offline, place {file} in {TORCH_HUB_DIR}"
        ) from None


def load_backbone_weights(model: nn.Module, weights: str | Path | dict) -> TransferReport:
    """Copy every matching non-fc tensor of a torchvision ResNet50 into the model's ResNet rows."""
    sd = weights if isinstance(weights, dict) else read_state_dict(weights)
    prefixes = backbone_prefixes(model)
    own = model.state_dict()
    report = TransferReport()
    updates = {}
    for key, tensor in sd.items():
        if key.startswith("fc."):
            continue
        report.total += 1
        target = _target_key(key, prefixes)
        if target in own and own[target].shape == tensor.shape:
            updates[target] = tensor
            report.transferred.append(key)
        else:
            report.missing.append(key)
    model.load_state_dict(updates, strict=False)
    return report


def is_torchvision_resnet(path: str | Path) -> bool:
    """True for a file holding a bare torchvision ResNet state dict (not a checkpoint of this project)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(sd, dict) and "layer1.0.conv1.weight" in sd
