"""Drawing and plotting for runs: box annotation, image mosaics, PR/F1 curves, confusion matrix,
label statistics and training curves.

Figures are built on ``matplotlib.figure.Figure`` objects and saved through the Agg canvas directly,
so no pyplot state or global backend is touched. Text on images is drawn with OpenCV's built-in
Hershey font: nothing is ever downloaded. Every plot function writes a valid file even for empty input.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from utils.boxes import clip_boxes, xywh2xyxy, xyxy2xywh
from utils.metrics import smooth

Color = tuple[int, int, int]
Names = Mapping[int, str] | Sequence[str] | None
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_PIXELS = 22  # approximate cap height in pixels of FONT at scale 1


class Colors:
    """Palette of ``n`` well-separated colours: hues step by the golden ratio, so neighbours differ.

    ``colors(i)`` returns an RGB tuple of ints 0..255, ``colors(i, bgr=True)`` the BGR one for OpenCV.
    """

    def __init__(self, n: int = 20) -> None:
        golden = (math.sqrt(5) - 1) / 2
        self.palette: list[Color] = []
        for i in range(n):
            value = 1.0 if i % 2 == 0 else 0.75  # alternate brightness to separate similar hues
            rgb = colorsys.hsv_to_rgb((0.02 + i * golden) % 1.0, 0.85, value)
            self.palette.append(tuple(int(round(255 * c)) for c in rgb))

    @property
    def n(self) -> int:
        """Number of distinct colours before the palette repeats."""
        return len(self.palette)

    def __call__(self, i: int, bgr: bool = False) -> Color:
        c = self.palette[int(i) % self.n]
        return (c[2], c[1], c[0]) if bgr else c


colors = Colors()


def _class_name(names: Names, c: int) -> str:
    """Name of class ``c`` from a dict or list of names, or the index itself when unknown."""
    if isinstance(names, Mapping):
        return str(names.get(c, c))
    if names is not None and 0 <= c < len(names):
        return str(names[c])
    return str(c)


def _int_color(color: Sequence[float]) -> Color:
    return tuple(int(v) for v in color[:3])


class Annotator:
    """Draws boxes and text onto an HxWx3 uint8 image with OpenCV (in place when the array is contiguous).

    Colours are used in the image's own channel order (pass ``colors(i, bgr=True)`` for BGR images).
    ``line_width`` defaults to about 0.3% of the image size; ``font_size`` is a text height in pixels.
    """

    def __init__(self, im: np.ndarray, line_width: int | None = None, font_size: float | None = None) -> None:
        self.im = np.ascontiguousarray(im)
        self.lw = line_width or max(round(sum(self.im.shape[:2]) / 2 * 0.003), 2)
        self.font_scale = font_size / FONT_PIXELS if font_size else self.lw / 3
        self.font_thickness = max(round(self.font_scale * 2), 1)

    def box_label(
        self,
        box: Sequence[float],
        label: str = "",
        color: Sequence[float] = (128, 128, 128),
        txt_color: Sequence[float] = (255, 255, 255),
    ) -> None:
        """Draw xyxy pixel ``box`` and, when given, ``label`` on a filled tag above it (inside if no room)."""
        p1, p2 = (int(box[0]), int(box[1])), (int(box[2]), int(box[3]))
        cv2.rectangle(self.im, p1, p2, _int_color(color), self.lw, cv2.LINE_AA)
        if not label:
            return
        (w, h), baseline = cv2.getTextSize(label, FONT, self.font_scale, self.font_thickness)
        tag_h = h + baseline + 2
        outside = p1[1] - tag_h >= 0
        top = p1[1] - tag_h if outside else p1[1]
        cv2.rectangle(self.im, (p1[0], top), (p1[0] + w + 2, top + tag_h), _int_color(color), -1, cv2.LINE_AA)
        cv2.putText(
            self.im,
            label,
            (p1[0] + 1, top + h + 1),
            FONT,
            self.font_scale,
            _int_color(txt_color),
            self.font_thickness,
            cv2.LINE_AA,
        )

    def rectangle(
        self, box: Sequence[float], color: Sequence[float] = (255, 255, 255), width: int = 1
    ) -> None:
        """Draw an xyxy outline (``width`` < 0 fills it)."""
        p1, p2 = (int(box[0]), int(box[1])), (int(box[2]), int(box[3]))
        cv2.rectangle(self.im, p1, p2, _int_color(color), width, cv2.LINE_AA)

    def text(
        self,
        xy: Sequence[float],
        text: str,
        txt_color: Sequence[float] = (255, 255, 255),
        outline: Sequence[float] | None = None,
    ) -> None:
        """Write ``text`` with its top-left corner at pixel ``xy``, optionally outlined for busy backgrounds."""
        (_, h), _ = cv2.getTextSize(text, FONT, self.font_scale, self.font_thickness)
        origin = (int(xy[0]), int(xy[1]) + h)
        strokes = [(outline, self.font_thickness + 2)] if outline is not None else []
        for color, thickness in [*strokes, (txt_color, self.font_thickness)]:
            cv2.putText(
                self.im, text, origin, FONT, self.font_scale, _int_color(color), thickness, cv2.LINE_AA
            )

    def result(self) -> np.ndarray:
        """The annotated image (HxWx3 uint8)."""
        return self.im


def _new_figure(figsize: tuple[float, float], rows: int = 1, cols: int = 1):
    """A pyplot-free figure and its axes (an array when rows * cols > 1)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, tight_layout=True)
    return fig, fig.subplots(rows, cols)


def _mark_empty(ax, message: str = "no data") -> None:
    """Write ``message`` in the middle of an axes that has nothing to show."""
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=14, color="grey")


def _save_figure(fig, path: str | Path, dpi: int = 200) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def plot_pr_curve(
    px: np.ndarray, py: np.ndarray, ap: np.ndarray, save_path: str | Path, names: Sequence[str] = ()
) -> Path:
    """Precision-recall curves: ``py`` (c, k) precision at recall ``px`` (k,), ``ap`` (c, t) with AP@0.5 first.

    ``names`` label the c rows; classes are listed in the legend when there are fewer than 21.
    """
    py, ap = np.asarray(py).reshape(-1, len(px)), np.asarray(ap, dtype=np.float64)
    ap = ap[:, None] if ap.ndim == 1 else ap
    fig, ax = _new_figure((9, 6))
    per_class_legend = 0 < len(py) < 21 and len(names) == len(py)
    for i, y in enumerate(py):
        if per_class_legend:
            ax.plot(px, y, linewidth=1, label=f"{names[i]} {ap[i, 0]:.3f}")
        else:
            ax.plot(px, y, linewidth=1, color="grey")
    if len(py):
        ax.plot(px, py.mean(0), linewidth=3, color="blue", label=f"all classes {ap[:, 0].mean():.3f} mAP@0.5")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1), title="Precision-Recall Curve")
    if len(py):
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    else:
        _mark_empty(ax, "no labels")
    return _save_figure(fig, save_path, dpi=250)


def plot_mc_curve(
    px: np.ndarray,
    py: np.ndarray,
    save_path: str | Path,
    names: Sequence[str] = (),
    xlabel: str = "Confidence",
    ylabel: str = "Metric",
) -> Path:
    """Metric-confidence curves (F1, P or R): ``py`` (c, k) against confidence ``px`` (k,).

    The bold line is the smoothed class mean; its legend gives its maximum and where it occurs.
    """
    py = np.asarray(py).reshape(-1, len(px))
    fig, ax = _new_figure((9, 6))
    per_class_legend = 0 < len(py) < 21 and len(names) == len(py)
    for i, y in enumerate(py):
        if per_class_legend:
            ax.plot(px, y, linewidth=1, label=str(names[i]))
        else:
            ax.plot(px, y, linewidth=1, color="grey")
    if len(py):
        mean = smooth(py.mean(0), 0.05)
        best = int(mean.argmax())
        ax.plot(px, mean, linewidth=3, color="blue", label=f"all classes {mean[best]:.2f} at {px[best]:.3f}")
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    else:
        _mark_empty(ax, "no labels")
    ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1), title=f"{ylabel}-Confidence Curve")
    return _save_figure(fig, save_path, dpi=250)


def plot_confusion_matrix(
    matrix: np.ndarray, names: Names, save_path: str | Path, normalize: bool = True
) -> Path:
    """Heatmap of an (nc+1, nc+1) confusion matrix (rows predicted, columns true, background last).

    With ``normalize`` each column is divided by its total, so a column shows where labels of that class went.
    """
    import seaborn as sns

    matrix = np.asarray(matrix, dtype=np.float64)
    nc = len(matrix) - 1
    array = matrix / (matrix.sum(0, keepdims=True) + 1e-9) if normalize else matrix.copy()
    array[array < 0.005] = np.nan  # hide near-zero cells
    vmax = 1.0 if normalize else max(float(np.nanmax(array)) if np.isfinite(array).any() else 1.0, 1.0)
    labels = [_class_name(names, i) for i in range(nc)] + ["background"]
    ticks = labels if nc < 99 else False
    fig, ax = _new_figure((12, 9))
    sns.heatmap(
        array,
        ax=ax,
        annot=nc < 30,
        annot_kws={"size": 8},
        cmap="Blues",
        fmt=".2f" if normalize else ".0f",
        square=True,
        vmin=0.0,
        vmax=vmax,
        xticklabels=ticks,
        yticklabels=ticks,
    ).set_facecolor((1, 1, 1))
    ax.set(
        xlabel="True", ylabel="Predicted", title="Confusion Matrix" + (" (normalised)" if normalize else "")
    )
    ax.tick_params(axis="y", labelrotation=0)  # horizontal names keep clear of the axis title
    if not matrix.any():
        _mark_empty(ax)
    return _save_figure(fig, save_path, dpi=250)


def _draw_box_overlay(cls: np.ndarray, boxes: np.ndarray, size: int = 1000, limit: int = 1000) -> np.ndarray:
    """White ``size`` x ``size`` RGB canvas with up to ``limit`` xywhn boxes drawn centred on it."""
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    cv2.rectangle(canvas, (0, 0), (size - 1, size - 1), (200, 200, 200), 2)  # frame = whole image
    centred = boxes[:limit].copy()
    centred[:, :2] = 0.5
    for c, box in zip(cls[:limit], xywh2xyxy(centred * size)):
        p1, p2 = (int(box[0]), int(box[1])), (int(box[2]), int(box[3]))
        cv2.rectangle(canvas, p1, p2, colors(int(c)), 1, cv2.LINE_AA)
    return canvas


def plot_labels(labels: np.ndarray, names: Names, save_dir: str | Path) -> Path:
    """Dataset label statistics -> ``save_dir/labels.jpg``.

    ``labels`` (n, 5) ``[cls, xc, yc, w, h]`` normalised. Panels: instances per class, box shapes
    (centred overlay), centre positions (2D histogram) and width/height (2D histogram).
    """
    labels = np.asarray(labels, dtype=np.float64).reshape(-1, 5)
    cls, boxes = labels[:, 0].astype(int), labels[:, 1:]
    n_names = len(names) if names is not None else 0
    nc = max(n_names, int(cls.max()) + 1 if len(cls) else 0, 1)
    fig, axs = _new_figure((10, 10), 2, 2)
    axs = axs.ravel()

    counts = np.bincount(cls, minlength=nc)
    axs[0].bar(range(nc), counts, color=[tuple(v / 255 for v in colors(i)) for i in range(nc)])
    axs[0].set(ylabel="instances", title=f"{len(cls)} labels", ylim=(0, max(counts.max(), 1) * 1.05))
    if nc < 30:
        axs[0].set_xticks(range(nc), [_class_name(names, i) for i in range(nc)], rotation=90, fontsize=9)
    else:
        axs[0].set_xlabel("classes")

    axs[1].imshow(_draw_box_overlay(cls, boxes))
    axs[1].set_title("box sizes (centred)")
    axs[1].axis("off")
    for ax, (i, j), (xlabel, ylabel) in zip(axs[2:], ((0, 1), (2, 3)), (("x", "y"), ("width", "height"))):
        bins = int(np.clip(np.sqrt(len(boxes)), 10, 50))
        ax.hist2d(boxes[:, i], boxes[:, j], bins=bins, range=((0, 1), (0, 1)), cmap="Blues", cmin=1, vmin=0)
        ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1), aspect="equal")
    axs[2].invert_yaxis()  # image convention: y grows downwards
    if not len(cls):
        for ax in axs:
            _mark_empty(ax, "no labels")
    return _save_figure(fig, Path(save_dir) / "labels.jpg")


def _to_uint8_images(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """BCHW images (uint8 0..255 or float 0..1) -> BHWC uint8 numpy array."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.size and images.max() <= 1.0:
        images = images * 255
    return images.clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _tile_boxes(ti: np.ndarray, w: int, h: int, scale: float) -> np.ndarray:
    """xyxy pixel boxes of one tile's targets: normalised labels are scaled to the tile, pixels by ``scale``."""
    boxes = xywh2xyxy(ti[:, 2:6].astype(np.float64))
    if len(boxes) and boxes.max() <= 1.01:  # normalised (labels); otherwise pixels (predictions)
        boxes[:, [0, 2]] *= w
        boxes[:, [1, 3]] *= h
    elif scale < 1:
        boxes *= scale
    return boxes


def plot_images(
    images: torch.Tensor | np.ndarray,
    targets: torch.Tensor | np.ndarray,
    paths: Sequence[str] | None = None,
    fname: str | Path = "images.jpg",
    names: Names = None,
    max_subplots: int = 16,
    max_size: int = 1920,
    conf_thres: float = 0.25,
) -> Path:
    """Save a mosaic of a batch with its boxes -> ``fname`` (jpg).

    Args:
        images: (B, 3, H, W) RGB, uint8 or float 0..1.
        targets: (n, 6) labels ``[image_index, cls, xc, yc, w, h]`` normalised, or (n, 7) predictions
            ``[image_index, cls, xc, yc, w, h, conf]`` in input pixels (see ``output_to_target``);
            predictions with conf <= ``conf_thres`` are not drawn.
        paths: image paths; their file names are written on the tiles.
        names: class names (dict or list).
        max_subplots: most images in the mosaic; max_size: longest mosaic side in pixels.
    """
    ims = _to_uint8_images(images)[:max_subplots]
    targets = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    targets = targets.reshape(-1, targets.shape[-1] if targets.ndim == 2 else 6)
    bs, h, w = (len(ims), *ims.shape[1:3]) if len(ims) else (1, 64, 64)
    ns = math.ceil(bs**0.5)  # tiles per row
    rows = math.ceil(bs / ns)
    mosaic = np.full((rows * h, ns * w, 3), 255, dtype=np.uint8)
    for i, im in enumerate(ims):
        y, x = h * (i // ns), w * (i % ns)
        mosaic[y : y + h, x : x + w] = im
    scale = max_size / ns / max(h, w)
    if scale < 1:
        h, w = math.ceil(scale * h), math.ceil(scale * w)
        mosaic = cv2.resize(mosaic, (ns * w, rows * h), interpolation=cv2.INTER_AREA)

    annotator = Annotator(
        mosaic, line_width=max(round(min(h, w) / 250), 1), font_size=max(min(h, w) / 22, 10)
    )
    for i in range(len(ims)):
        y, x = h * (i // ns), w * (i % ns)
        annotator.rectangle((x, y, x + w, y + h), (255, 255, 255), 2)
        if paths is not None and i < len(paths):
            annotator.text((x + 5, y + 5), Path(paths[i]).name[:40], (230, 230, 230), outline=(0, 0, 0))
        ti = targets[targets[:, 0] == i]
        is_label = ti.shape[1] == 6
        boxes = _tile_boxes(ti, w, h, scale)
        boxes[:, [0, 2]] += x
        boxes[:, [1, 3]] += y
        for j, box in enumerate(boxes):
            c = int(ti[j, 1])
            if is_label or ti[j, 6] > conf_thres:
                label = _class_name(names, c) if is_label else f"{_class_name(names, c)} {ti[j, 6]:.1f}"
                annotator.box_label(box, label, colors(c))
    fname = Path(fname)
    fname.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(fname), cv2.cvtColor(annotator.result(), cv2.COLOR_RGB2BGR))
    return fname


def output_to_target(output: Sequence[torch.Tensor], max_det: int = 300) -> np.ndarray:
    """NMS output (per image (k, 6) xyxy, conf, cls) -> (n, 7) ``[image_index, cls, xc, yc, w, h, conf]``."""
    rows = []
    for i, det in enumerate(output):
        det = det[:max_det].detach().cpu().float()
        index = torch.full((len(det), 1), float(i))
        rows.append(torch.cat((index, det[:, 5:6], xyxy2xywh(det[:, :4]), det[:, 4:5]), 1))
    return torch.cat(rows, 0).numpy() if rows else np.zeros((0, 7), dtype=np.float32)


def _gaussian_smooth(y: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """Gaussian-smoothed copy of the series ``y`` (n,), edges padded with their end values."""
    radius = int(3 * sigma)
    k = np.arange(-radius, radius + 1)
    kernel = np.exp(-(k**2) / (2 * sigma**2))
    padded = np.concatenate((np.full(radius, y[0]), y, np.full(radius, y[-1])))
    return np.convolve(padded, kernel / kernel.sum(), mode="valid")


RESULT_COLUMNS = (
    "train/box_loss",
    "train/obj_loss",
    "train/cls_loss",
    "metrics/precision",
    "metrics/recall",
    "val/box_loss",
    "val/obj_loss",
    "val/cls_loss",
    "metrics/mAP_0.5",
    "metrics/mAP_0.5:0.95",
)


def _read_results(csv_path: Path):
    """results.csv as a DataFrame with stripped column names (empty when the file holds no rows)."""
    import pandas as pd

    try:
        data = pd.read_csv(csv_path, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=["epoch", *RESULT_COLUMNS])
    data.columns = [str(c).strip() for c in data.columns]
    return data


def plot_results(csv_path: str | Path) -> Path:
    """Training curves from ``results.csv`` (or a run folder holding it) -> ``results.png`` beside it.

    A 2x5 grid: train box/obj/cls loss, precision, recall, then val box/obj/cls loss, mAP@0.5 and
    mAP@0.5:0.95 against epoch, each with a Gaussian-smoothed dotted line.
    """
    csv_path = Path(csv_path)
    csv_path = csv_path / "results.csv" if csv_path.is_dir() else csv_path
    if not csv_path.is_file():
        raise FileNotFoundError(f"plot_results: {csv_path} does not exist; pass the run's results.csv")
    data = _read_results(csv_path)
    x = data["epoch"].to_numpy(dtype=float) if "epoch" in data else np.arange(len(data), dtype=float)
    fig, axs = _new_figure((12, 6), 2, 5)
    for ax, column in zip(axs.ravel(), RESULT_COLUMNS):
        ax.set_title(column, fontsize=11)
        if column not in data or not len(data):
            continue
        y = data[column].to_numpy(dtype=float)
        ax.plot(x, y, marker=".", linewidth=2, markersize=8, label="results")
        if len(y) > 2:
            ax.plot(x, _gaussian_smooth(y), ":", linewidth=2, label="smooth")
    if len(data):
        axs[0, 0].legend()
    return _save_figure(fig, csv_path.with_name("results.png"))


def save_one_box(
    xyxy: Sequence[float] | torch.Tensor,
    im: np.ndarray,
    file: str | Path = "im.jpg",
    gain: float = 1.02,
    pad: int = 10,
    square: bool = False,
    save: bool = True,
) -> np.ndarray:
    """Crop HxWx3 BGR ``im`` to the xyxy pixel box, enlarged by ``gain`` and ``pad`` pixels (``--save-crop``).

    With ``square`` the crop is widened to a square. Saves to ``file`` (parents created) when ``save``.
    """
    box = torch.as_tensor(xyxy, dtype=torch.float32).reshape(1, 4)
    xywh = xyxy2xywh(box)
    if square:
        xywh[:, 2:] = xywh[:, 2:].max(1, keepdim=True).values
    xywh[:, 2:] = xywh[:, 2:] * gain + pad
    box = clip_boxes(xywh2xyxy(xywh), im.shape[:2]).long()[0]
    crop = im[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])]
    if save:
        file = Path(file)
        file.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(file), crop)
    return crop
