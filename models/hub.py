"""Predictor: the model ``torch.hub.load`` returns, called on images of any common kind.

Pre-processing is detect.py's (``utils.sources.prepare_image``: letterbox to ``size`` with
minimum-rectangle padding, ``auto=True``, for models that accept any shape; full ``size`` padding
for fixed-shape exports), and post-processing is the same ``utils.predict.postprocess``. Each image
is letterboxed on its own and images that come out the same shape are batched together, so a result
never depends on which other images were in the call: the same image at the same size gives the same
boxes as ``python detect.py --imgsz size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from utils.general import LOGGER, check_img_size
from utils.predict import NMSConfig, Timer, postprocess, to_tensor
from utils.results import Detections
from utils.sources import SourceError, prepare_image, read_image

ImageLike = Any  # str | Path | np.ndarray | PIL.Image.Image


def as_bgr(im: ImageLike, index: int) -> tuple[np.ndarray, str]:
    """One input -> (HxWx3 uint8 BGR array, file name for saving).

    Paths and URLs are read with OpenCV; PIL images are converted from RGB; numpy arrays are taken as
    OpenCV BGR (HxW grey, HxWx4 BGRA and 3xHxW are converted; float arrays are taken as 0..1).
    """
    if isinstance(im, (str, Path)):
        data = read_image(im)
        if data is None:
            raise SourceError(f"cannot read image {im}")
        return data, Path(str(im)).name
    name = f"image{index}.jpg"
    if hasattr(im, "convert") and hasattr(im, "size"):  # PIL.Image without importing PIL
        rgb = np.asarray(im.convert("RGB"))
        return np.ascontiguousarray(rgb[..., ::-1]), Path(getattr(im, "filename", "") or name).with_suffix(
            ".jpg"
        ).name
    if isinstance(im, np.ndarray):
        return _normalise_array(im), name
    raise TypeError(
        f"unsupported image type {type(im).__name__}; pass a path, URL, numpy BGR array or PIL image"
    )


def _normalise_array(im: np.ndarray) -> np.ndarray:
    if im.ndim == 3 and im.shape[0] in (1, 3) and im.shape[2] not in (1, 3, 4):
        im = im.transpose(1, 2, 0)  # CHW -> HWC
    if im.dtype != np.uint8:
        scale = 255.0 if np.issubdtype(im.dtype, np.floating) and im.max() <= 1.0 else 1.0
        im = (im.astype(np.float32) * scale).clip(0, 255).astype(np.uint8)
    if im.ndim == 2:
        im = im[..., None]
    if im.ndim != 3 or im.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxW, HxWx3 or HxWx4 image array, got shape {im.shape}")
    if im.shape[2] == 1:
        im = np.repeat(im, 3, axis=2)
    return np.ascontiguousarray(im[..., :3])


class Predictor(nn.Module):
    """Wraps a DetectionModel or AutoBackend: ``Predictor(model)(images, size=640) -> Detections``.

    Settable attributes, as on YOLOv5's AutoShape: conf (0.25), iou (0.45), classes (None),
    agnostic (False), multi_label (False), max_det (1000).
    """

    def __init__(self, model: nn.Module, names: dict[int, str] | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.names = dict(names or getattr(model, "names", {}))
        stride = getattr(model, "stride", 32)
        self.stride = int(stride.max()) if isinstance(stride, torch.Tensor) else int(stride)
        self.conf, self.iou, self.max_det = 0.25, 0.45, 1000
        self.classes: Sequence[int] | None = None
        self.agnostic = self.multi_label = False

    @property
    def device(self) -> torch.device:
        device = getattr(self.model, "device", None)  # AutoBackend knows it; a bare model has parameters
        return torch.device(device) if device is not None else next(self.model.parameters()).device

    def _raw(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        out = self.model(x, augment=augment)
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def forward(self, ims: ImageLike | Sequence[ImageLike] | torch.Tensor, size: int | Sequence[int] = 640,
                augment: bool = False) -> Detections | torch.Tensor:  # fmt: skip
        """Detect objects in one image or a list; a float BCHW tensor is passed to the model unchanged."""
        if isinstance(ims, torch.Tensor):
            return self._raw(ims.to(self.device), augment)
        items = list(ims) if isinstance(ims, (list, tuple)) else [ims]
        size = list(size) if isinstance(size, (list, tuple)) else [size, size]
        fixed = getattr(self.model, "imgsz", None)  # a fixed-shape export takes only its own size
        if fixed is not None and [int(v) for v in fixed] != [int(v) for v in size]:
            LOGGER.warning(f"WARNING: this export takes {fixed[0]}x{fixed[1]} inputs; size={size} ignored")
        size = [int(v) for v in fixed] if fixed is not None else check_img_size(size, self.stride)
        auto = bool(getattr(self.model, "dynamic", True))
        cfg = NMSConfig(self.conf, self.iou, self.classes, self.agnostic, self.multi_label, self.max_det)
        timers = [Timer(self.device) for _ in range(3)]
        with timers[0]:
            originals, files = zip(*(as_bgr(im, i) for i, im in enumerate(items))) if items else ((), ())
            inputs = [prepare_image(im, size, self.stride, auto) for im in originals]
        preds: list[torch.Tensor | None] = [None] * len(items)
        shape: tuple[int, ...] = ()
        for idx in _same_shape_groups(inputs):
            with timers[0]:
                x = to_tensor(
                    np.stack([inputs[i] for i in idx]),
                    self.device,
                    half=bool(getattr(self.model, "fp16", False)),
                )
            with timers[1]:
                raw = self._raw(x, augment)
            with timers[2]:
                dets = postprocess(raw, x.shape[2:], [originals[i].shape for i in idx], cfg)
            shape = tuple(x.shape)
            for i, det in zip(idx, dets):
                preds[i] = det
        times = [t.total for t in timers]
        return Detections(list(originals), preds, list(files), times, self.names, shape)


def _same_shape_groups(inputs: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of inputs grouped by array shape, in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(inputs):
        groups.setdefault(im.shape, []).append(i)
    return list(groups.values())
