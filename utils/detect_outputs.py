"""What detect.py writes for each frame: annotated images and videos, label files, crops, a CSV.

Run folder layout (``runs/detect/expN``)::

    <name>.jpg / <name>.mp4        annotated image / video (mp4v, source fps and size)
    labels/<stem>[_<frame>].txt    rows ``cls xc yc w h [conf]`` normalised to 0..1 (--save-txt)
    crops/<class>/<stem>.jpg       one crop per box from the un-annotated frame (--save-crop)
    predictions.csv                Image Name, Prediction, Confidence, Frame, xmin, ymin, xmax, ymax

``RunOutputs.close()`` releases every video writer; detect.py calls it in a ``finally`` so a video
stays playable after an error or Ctrl-C.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from utils.general import LOGGER, increment_path
from utils.plots import Annotator, colors, save_one_box
from utils.predict import label_rows, label_text, tag_font_size

CSV_COLUMNS = ("Image Name", "Prediction", "Confidence", "Frame", "xmin", "ymin", "xmax", "ymax")


@dataclass
class SaveOptions:
    """Which outputs to write and how boxes are drawn (detect.py flags)."""

    save_img: bool = True
    save_txt: bool = False
    save_conf: bool = False
    save_crop: bool = False
    save_csv: bool = False
    view_img: bool = False
    line_thickness: int = 3
    hide_labels: bool = False
    hide_conf: bool = False


@dataclass
class Frame:
    """One image or video frame with its detections (k, 6) ``[x1, y1, x2, y2, conf, cls]`` in its pixels."""

    path: str
    im0: np.ndarray  # HxWx3 BGR original
    det: torch.Tensor
    mode: str  # "image", "video" or "stream"
    frame: int = 0  # 1-based frame number for videos and streams
    fps: float = 30.0  # output video frame rate
    stream: int = 0  # index of the source among a batch of streams


class VideoSink:
    """One cv2.VideoWriter that is (re)opened when its target file changes."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.writer: cv2.VideoWriter | None = None
        self.frames = 0

    def write(self, path: Path, im: np.ndarray, fps: float) -> None:
        if path != self.path:
            self.release()
            h, w = im.shape[:2]
            self.writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            if not self.writer.isOpened():
                raise OSError(f"cannot open a video writer for {path} (mp4v codec, {w}x{h} at {fps:.2f} FPS)")
            self.path, self.frames = path, 0
        self.writer.write(im)
        self.frames += 1

    def release(self) -> None:
        if self.writer is not None:
            self.writer.release()
            LOGGER.debug(f"closed {self.path} after {self.frames} frames")
        self.writer = None
        self.path = None


class RunOutputs:
    """Writes every output a detect run asked for; use as a context manager (or call close())."""

    def __init__(self, save_dir: Path, names: Mapping[int, str], options: SaveOptions) -> None:
        self.save_dir, self.names, self.opt = Path(save_dir), dict(names), options
        self.sinks: dict[int, VideoSink] = {}
        self.labels_written = 0
        self.csv_path = self.save_dir / "predictions.csv" if options.save_csv else None
        if options.save_txt:
            (self.save_dir / "labels").mkdir(parents=True, exist_ok=True)
        if self.csv_path is not None:
            with open(self.csv_path, "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow(CSV_COLUMNS)

    def __enter__(self) -> RunOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, f: Frame) -> Path | None:
        """All outputs for one frame; returns the annotated image/video path (None when not saved)."""
        p = Path(f.path)
        stem = p.stem if f.mode == "image" else f"{p.stem}_{f.frame}"
        if self.opt.save_txt and len(f.det):
            rows = label_rows(f.det, f.im0.shape, self.opt.save_conf)
            (self.save_dir / "labels" / f"{stem}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
            self.labels_written += 1
        if self.opt.save_crop:
            for *box, _, cls in f.det.tolist():
                name = self.names.get(int(cls), str(int(cls)))
                save_one_box(
                    box, f.im0, file=increment_path(self.save_dir / "crops" / name / f"{p.stem}.jpg")
                )
        if self.csv_path is not None and len(f.det):
            with open(self.csv_path, "a", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                for *box, conf, cls in f.det.tolist():
                    name = self.names.get(int(cls), str(int(cls)))
                    writer.writerow([p.name, name, f"{conf:.2f}", f.frame, *(f"{v:.1f}" for v in box)])
        if not (self.opt.save_img or self.opt.view_img):
            return None
        annotated = self.annotate(f.im0, f.det)
        if self.opt.view_img:
            self._show(str(f.path), annotated)
        return self._save_image(f, annotated) if self.opt.save_img else None

    def annotate(self, im0: np.ndarray, det: torch.Tensor) -> np.ndarray:
        """A BGR copy of the frame with boxes and tags (highest confidence drawn last, on top)."""
        annotator = Annotator(
            im0.copy(), line_width=self.opt.line_thickness, font_size=tag_font_size(im0.shape)
        )
        for *box, conf, cls in reversed(det.tolist()):
            c = int(cls)
            label = label_text(c, conf, self.names, self.opt.hide_labels, self.opt.hide_conf)
            annotator.box_label(box, label, colors(c, bgr=True))
        return annotator.result()

    def _save_image(self, f: Frame, annotated: np.ndarray) -> Path:
        p = Path(f.path)
        if f.mode == "image":
            path = self.save_dir / p.name
            cv2.imwrite(str(path), annotated)
            return path
        path = self.save_dir / f"{p.stem or f'stream{f.stream}'}.mp4"
        self.sinks.setdefault(f.stream, VideoSink()).write(path, annotated, f.fps)
        return path

    def _show(self, title: str, im: np.ndarray) -> None:
        try:
            cv2.imshow(title, im)
            cv2.waitKey(1)
        except cv2.error as e:  # a GUI backend that fails at run time: stop trying, keep detecting
            LOGGER.warning(f"WARNING: cannot show images ({str(e).splitlines()[0]}); --view-img disabled")
            self.opt.view_img = False

    def close(self) -> None:
        """Release every video writer (safe to call twice)."""
        for sink in self.sinks.values():
            sink.release()
