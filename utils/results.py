"""Detections: what the Python API (``torch.hub.load(...)(images)``) returns.

Boxes are in original-image pixels. Images are kept as given to the model, in OpenCV's BGR order, and
``render()`` returns annotated BGR copies (write them with ``cv2.imwrite`` as they are).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from utils.boxes import xyxy2xywh
from utils.general import LOGGER, increment_path
from utils.plots import Annotator, colors, save_one_box
from utils.predict import can_show_images, describe, label_text, tag_font_size

XYXY_COLUMNS = ("xmin", "ymin", "xmax", "ymax", "confidence", "class", "name")
XYWH_COLUMNS = ("xcenter", "ycenter", "width", "height", "confidence", "class", "name")


@dataclass
class PandasDetections:
    """Per-image pandas DataFrames, one list per box format (columns as YOLOv5's results.pandas())."""

    xyxy: list
    xyxyn: list
    xywh: list
    xywhn: list


class Detections:
    """Detections for a batch of images.

    Args:
        ims: original images, HxWx3 uint8 BGR.
        pred: per image a (k, 6) tensor ``[x1, y1, x2, y2, conf, cls]`` in original pixels.
        files: a file name per image (used by save/crop).
        times: total (pre-process, inference, NMS) seconds for the batch.
        names: class index -> name.
        shape: the model input shape (B, 3, h, w) of the last batch, for the speed line.
    """

    def __init__(self, ims: Sequence[np.ndarray], pred: Sequence[torch.Tensor], files: Sequence[str],
                 times: Sequence[float] = (0.0, 0.0, 0.0), names: Mapping[int, str] | None = None,
                 shape: Sequence[int] = ()):  # fmt: skip
        if not (len(ims) == len(pred) == len(files)):
            raise ValueError(f"ims, pred and files differ in length: {len(ims)}, {len(pred)}, {len(files)}")
        self.ims = list(ims)
        self.pred = [p.detach().float().cpu() for p in pred]
        self.files = list(files)
        self.names = dict(names or {})
        self.n = len(self.pred)
        self.t = tuple(1000 * x / max(self.n, 1) for x in times)  # ms per image
        self.s = tuple(shape)
        gains = [
            torch.tensor([im.shape[1], im.shape[0]] * 2 + [1, 1], dtype=torch.float32) for im in self.ims
        ]
        self.xyxy = self.pred
        self.xywh = [torch.cat((xyxy2xywh(p[:, :4]), p[:, 4:]), 1) for p in self.pred]
        self.xyxyn = [p / g for p, g in zip(self.xyxy, gains)]
        self.xywhn = [p / g for p, g in zip(self.xywh, gains)]

    def __len__(self) -> int:
        return self.n

    def _line(self, i: int) -> str:
        h, w = self.ims[i].shape[:2]
        found = describe(self.pred[i], self.names).rstrip(", ") or "(no detections)"
        return f"image {i + 1}/{self.n}: {h}x{w} {found}"

    def __str__(self) -> str:
        lines = [self._line(i) for i in range(self.n)]
        lines.append(
            f"Speed: {self.t[0]:.1f}ms pre-process, {self.t[1]:.1f}ms inference, {self.t[2]:.1f}ms NMS "
            f"per image at shape {self.s}"
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.n} image(s)>\n{self}"

    def print(self) -> None:
        """Log the per-image summary and the speed line."""
        LOGGER.info(str(self))

    def render(self, labels: bool = True, line_width: int | None = None) -> list[np.ndarray]:
        """Annotated BGR copies of the images (the originals are kept)."""
        out = []
        for im, det in zip(self.ims, self.pred):
            annotator = Annotator(im.copy(), line_width=line_width, font_size=tag_font_size(im.shape))
            for *box, conf, cls in reversed(det.tolist()):  # highest confidence drawn last, on top
                c = int(cls)
                annotator.box_label(
                    box, label_text(c, conf, self.names) if labels else "", colors(c, bgr=True)
                )
            out.append(annotator.result())
        return out

    def save(
        self, save_dir: str | Path = "runs/detect/exp", labels: bool = True, exist_ok: bool = False
    ) -> Path:
        """Write annotated images into ``save_dir`` (incremented unless exist_ok); returns the folder."""
        save_dir = increment_path(save_dir, exist_ok=exist_ok, mkdir=True)
        for file, im in zip(self.files, self.render(labels)):
            cv2.imwrite(str(save_dir / file), im)
        LOGGER.info(f"Saved {self.n} image{'s' * (self.n != 1)} to {save_dir}")
        return save_dir

    def crop(
        self, save_dir: str | Path = "runs/detect/exp", save: bool = True, exist_ok: bool = False
    ) -> list[dict]:
        """Crops of every box (as ``save_one_box`` cuts them); saved under save_dir/crops/<class>/ when save.

        Returns dicts with box (xyxy list), conf, cls, label and im (the BGR crop).
        """
        if save:
            save_dir = increment_path(save_dir, exist_ok=exist_ok, mkdir=True)
        crops = []
        for file, im, det in zip(self.files, self.ims, self.pred):
            for *box, conf, cls in det.tolist():
                c = int(cls)
                name = self.names.get(c, str(c))
                target = (
                    increment_path(Path(save_dir) / "crops" / name / f"{Path(file).stem}.jpg")
                    if save
                    else None
                )
                crop = save_one_box(box, im, file=target or "crop.jpg", save=save)
                crops.append({"box": box, "conf": conf, "cls": c, "label": f"{name} {conf:.2f}", "im": crop})
        if save:
            LOGGER.info(f"Saved {len(crops)} crop{'s' * (len(crops) != 1)} to {Path(save_dir) / 'crops'}")
        return crops

    def show(self, labels: bool = True) -> None:
        """Show the annotated images in windows when a display exists (warns otherwise)."""
        if not can_show_images():
            LOGGER.warning("WARNING: no display available; use .save() or .render() instead of .show()")
            return
        for file, im in zip(self.files, self.render(labels)):
            cv2.imshow(file, im)
        cv2.waitKey(0)

    def pandas(self) -> PandasDetections:
        """Per-image DataFrames: ``.pandas().xyxy[i]`` has xmin ymin xmax ymax confidence class name."""
        import pandas as pd

        def frames(boxes: list[torch.Tensor], columns: Sequence[str]) -> list:
            out = []
            for p in boxes:
                rows = [[*r[:5], int(r[5]), self.names.get(int(r[5]), str(int(r[5])))] for r in p.tolist()]
                out.append(pd.DataFrame(rows, columns=list(columns)))
            return out

        return PandasDetections(
            xyxy=frames(self.xyxy, XYXY_COLUMNS),
            xyxyn=frames(self.xyxyn, XYXY_COLUMNS),
            xywh=frames(self.xywh, XYWH_COLUMNS),
            xywhn=frames(self.xywhn, XYWH_COLUMNS),
        )

    def tolist(self) -> list[Detections]:
        """One single-image Detections per image."""
        times = tuple(t / 1000 for t in self.t)
        return [Detections([self.ims[i]], [self.pred[i]], [self.files[i]], times, self.names, self.s)
                for i in range(self.n)]  # fmt: skip
