"""torch.hub entry points.

    import torch
    model = torch.hub.load(".", "custom", path="runs/train/exp/weights/best.pt", source="local")
    model = torch.hub.load(".", "yolov5_resnet50_cbam", pretrained=False, classes=3, source="local")
    results = model("image.jpg", size=640)      # also numpy BGR arrays, PIL images, lists, URLs
    results.print(); results.save(); results.pandas().xyxy[0]

Nothing is downloaded: ``pretrained=True`` looks for ``<name>.pt`` in the working directory, the
repository root and its weights/ folder, and says how to get one when it is missing.
"""

from __future__ import annotations

from pathlib import Path

dependencies = ["torch", "torchvision", "cv2", "yaml", "numpy", "pandas", "matplotlib"]

_ROOT = Path(__file__).resolve().parent


def _pretrained_file(name: str) -> Path:
    """The local checkpoint for a model name, or FileNotFoundError explaining the options."""
    places = [Path.cwd(), _ROOT, _ROOT / "weights"]
    for folder in places:
        if (folder / f"{name}.pt").is_file():
            return folder / f"{name}.pt"
    raise FileNotFoundError(
        f"pretrained weights for {name} not found (looked for {name}.pt in {', '.join(map(str, places))}). "
        f"This project downloads nothing: train one (python train.py --cfg {name.replace('_', '-')}.yaml ...) "
        f"and load it with torch.hub.load('.', 'custom', path='.../best.pt', source='local'), "
        f"or pass pretrained=False for an untrained model."
    )


def _wrap(model, autoshape: bool, device):
    from models.hub import Predictor
    from utils.torch_utils import select_device

    model = model.to(select_device("" if device is None else device)).eval()
    return Predictor(model) if autoshape else model


def _create(name: str, pretrained: bool = True, channels: int = 3, classes: int = 80, autoshape: bool = True,
            verbose: bool = True, device=None):  # fmt: skip
    """Model from models/<name>.yaml (underscores read as dashes when that file exists)."""
    from models.yolo import DetectionModel, resolve_cfg
    from utils.checkpoints import load_checkpoint, model_from_checkpoint
    from utils.general import LOGGER, setup_logging

    setup_logging(verbose)
    if pretrained:
        path = _pretrained_file(name)
        ckpt = load_checkpoint(path)
        if int(ckpt.get("nc", -1)) == classes and int(ckpt["model_yaml"].get("ch", 3)) == channels:
            return _wrap(model_from_checkpoint(ckpt), autoshape, device)
    cfg = name if (_ROOT / "models" / f"{name}.yaml").is_file() else name.replace("_", "-")
    model = DetectionModel(resolve_cfg(cfg), ch=channels, nc=classes, verbose=verbose)
    if pretrained:  # other class count or channels: keep every tensor whose shape still fits
        own = model.state_dict()
        kept = {
            k: v for k, v in (ckpt["ema"] or ckpt["model"]).items() if k in own and own[k].shape == v.shape
        }
        model.load_state_dict(kept, strict=False)
        LOGGER.info(f"Transferred {len(kept)}/{len(own)} tensors from {path}")
    return _wrap(model, autoshape, device)


def custom(path: str = "best.pt", autoshape: bool = True, _verbose: bool = True, device=None):
    """A trained checkpoint of this project (.pt); exported formats go through models.backend.AutoBackend."""
    from models.backend import AutoBackend
    from models.hub import Predictor
    from utils.general import setup_logging
    from utils.torch_utils import select_device

    setup_logging(_verbose)
    backend = AutoBackend(path, device=select_device("" if device is None else device))
    if autoshape:
        return Predictor(backend)
    return backend.model if backend.pt else backend  # the DetectionModel itself for .pt weights


def yolov5n(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    """YOLOv5-nano (models/yolov5n.yaml)."""
    return _create("yolov5n", pretrained, channels, classes, autoshape, _verbose, device)


def yolov5s(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    """YOLOv5-small (models/yolov5s.yaml)."""
    return _create("yolov5s", pretrained, channels, classes, autoshape, _verbose, device)


def yolov5m(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    """YOLOv5-medium (models/yolov5m.yaml)."""
    return _create("yolov5m", pretrained, channels, classes, autoshape, _verbose, device)


def yolov5l(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    """YOLOv5-large (models/yolov5l.yaml)."""
    return _create("yolov5l", pretrained, channels, classes, autoshape, _verbose, device)


def yolov5x(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    """YOLOv5-xlarge (models/yolov5x.yaml)."""
    return _create("yolov5x", pretrained, channels, classes, autoshape, _verbose, device)


def yolov5_resnet50(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    """YOLOv5l head on a plain ResNet50 backbone (models/yolov5-resnet50.yaml)."""
    return _create("yolov5_resnet50", pretrained, channels, classes, autoshape, _verbose, device)


def yolov5_resnet50_cbam(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    """YOLOv5l head on ResNet50 with one CBAM after each stage (models/yolov5-resnet50-cbam.yaml)."""
    return _create("yolov5_resnet50_cbam", pretrained, channels, classes, autoshape, _verbose, device)


def yolov5_resnet50_cbam_inblock(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True,
                                 device=None):  # fmt: skip
    """ResNet50 with CBAM inside every bottleneck (models/yolov5-resnet50-cbam-inblock.yaml)."""
    return _create("yolov5_resnet50_cbam_inblock", pretrained, channels, classes, autoshape, _verbose, device)


def yolov5_resnet50_se(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    """ResNet50 with squeeze-excitation after each stage (models/yolov5-resnet50-se.yaml)."""
    return _create("yolov5_resnet50_se", pretrained, channels, classes, autoshape, _verbose, device)
