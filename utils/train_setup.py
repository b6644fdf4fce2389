"""Training set-up steps that do not belong to the loop: model from weights, freezing, resume lookup."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.pretrained import is_torchvision_resnet, load_backbone_weights
from models.yolo import DetectionModel
from utils.checkpoints import CheckpointError, load_checkpoint
from utils.general import LOGGER


def build_model(weights: str, cfg: str, nc: int, hyp: dict[str, Any], resume: bool):
    """DetectionModel for training, and the project checkpoint it came from (or None).

    weights may be '' (scratch from cfg), a checkpoint of this project (its YAML unless cfg is given;
    matching tensors transferred) or a torchvision ResNet50 state dict (backbone of cfg).
    """
    anchors = hyp.get("anchors")
    if not weights:
        if not cfg:
            raise ValueError("nothing to train: pass --cfg (a model YAML) and/or --weights (a checkpoint)")
        return DetectionModel(cfg, nc=nc, anchors=anchors), None
    try:
        ckpt = load_checkpoint(weights)  # read once: project checkpoints are the common case
    except CheckpointError:
        if not is_torchvision_resnet(weights):
            raise
        if not cfg:
            raise ValueError(
                f"{weights} holds ResNet50 backbone weights only: also pass --cfg (a ResNet50 model YAML)"
            ) from None
        model = DetectionModel(cfg, nc=nc, anchors=anchors)
        LOGGER.info(load_backbone_weights(model, weights).summary())
        return model, None
    model = DetectionModel(cfg or ckpt["model_yaml"], nc=nc, anchors=anchors)
    keep_anchors = (cfg or anchors) and not resume  # new YAML anchors win over the checkpoint's
    source = ckpt["ema"] if ckpt.get("ema") else ckpt["model"]
    own = model.state_dict()
    sd = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if keep_anchors:
        sd = {k: v for k, v in sd.items() if "anchors" not in k}
    model.load_state_dict(sd, strict=False)
    LOGGER.info(f"Transferred {len(sd)}/{len(own)} items from {weights}")
    return model, ckpt


def freeze_layers(model: torch.nn.Module, freeze: list[int]) -> list[str]:
    """Stop gradients for layers given as one count N (layers 0..N-1) or a list of indices."""
    indices = list(range(freeze[0])) if len(freeze) == 1 else list(freeze)
    prefixes = tuple(f"model.{i}." for i in indices)
    frozen = []
    for name, p in model.named_parameters():
        p.requires_grad = True
        if prefixes and name.startswith(prefixes):
            p.requires_grad = False
            frozen.append(name)
    if frozen:
        LOGGER.info(f"freezing {len(frozen)} tensors in layers {indices}")
    return frozen


def latest_run(search_dir: str | Path = "runs") -> Path:
    """Most recent last.pt under search_dir, for a bare --resume."""
    found = glob.glob(f"{search_dir}/**/last*.pt", recursive=True)
    if not found:
        raise FileNotFoundError(
            f"--resume: no last.pt found under {search_dir}/; pass the path: --resume PATH"
        )
    return Path(max(found, key=os.path.getctime))


def class_weights(labels: list[np.ndarray], nc: int) -> np.ndarray:
    """(nc,) inverse class frequency, normalised to sum 1 (classes absent get weight of a count of 1)."""
    cls = (
        np.concatenate([lab[:, 0] for lab in labels if len(lab)], 0).astype(int)
        if labels
        else np.zeros(0, int)
    )
    counts = np.bincount(cls, minlength=nc).astype(np.float64)
    counts[counts == 0] = 1
    w = 1 / counts
    return w / w.sum()


def image_weights(labels: list[np.ndarray], nc: int, cw: np.ndarray) -> np.ndarray:
    """(n,) sampling weight per image: sum of its class counts times class weights."""
    counts = np.array([np.bincount(lab[:, 0].astype(int), minlength=nc) for lab in labels])
    return (cw.reshape(1, nc) * counts).sum(1) if len(counts) else np.zeros(0)
