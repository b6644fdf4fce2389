"""--visualize: what each layer sees, and where CBAM attends.

For every layer a grid of its first 32 feature maps (``stageNN_<type>_features.png``). For every row
that holds CBAM (a CBAM row, or a ResNet stage with CBAM inside its blocks, whose last block is shown)
also the spatial-attention map as a heatmap over the original image (``stageNN_<type>_spatial.png``)
and the channel-attention weights as a bar plot (``stageNN_<type>_channel.png``).

Attention weights are recomputed from each CBAM branch's input by forward hooks, so the models are
untouched; the hooks live only inside a ``with FeatureVisualizer(...)`` block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn

from models.attention import CBAM

GRID_COLUMNS = 8
TILE_MIN = 64  # smallest tile side in pixels; small maps are enlarged (nearest) to this
GAP = 2  # pixels between tiles
HEADER = 28  # caption strip height in pixels
FONT = cv2.FONT_HERSHEY_SIMPLEX
OVERLAY_MIN_WIDTH = 360  # heatmap panels narrower than this are enlarged


def normalise(a: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Array scaled to 0..1 by its own min/max (constant arrays give zeros), plus that min and max."""
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a), lo, hi


def _caption(im: np.ndarray, text: str) -> np.ndarray:
    """Image with a white caption strip of ``HEADER`` pixels on top; the text shrinks to fit (BGR)."""
    strip = np.full((HEADER, im.shape[1], 3), 255, np.uint8)
    scale = 0.5
    while scale > 0.3 and cv2.getTextSize(text, FONT, scale, 1)[0][0] > im.shape[1] - 12:
        scale -= 0.02
    cv2.putText(strip, text, (6, HEADER - 9), FONT, scale, (30, 30, 30), 1, cv2.LINE_AA)
    return np.vstack((strip, im))


def feature_grid(features: torch.Tensor, n: int = 32) -> np.ndarray:
    """First ``n`` channels of one (C, H, W) feature map as a BGR mosaic (viridis, each tile normalised)."""
    maps = features[:n].detach().float().cpu().numpy()
    c, h, w = maps.shape
    scale = max(1, math.ceil(TILE_MIN / max(h, w)))
    th, tw = h * scale, w * scale
    cols = min(GRID_COLUMNS, c)
    rows = math.ceil(c / cols)
    grid = np.full((rows * (th + GAP) + GAP, cols * (tw + GAP) + GAP, 3), 255, np.uint8)
    for k in range(c):
        tile = (normalise(maps[k])[0] * 255).astype(np.uint8)
        tile = cv2.applyColorMap(
            cv2.resize(tile, (tw, th), interpolation=cv2.INTER_NEAREST), cv2.COLORMAP_VIRIDIS
        )
        y, x = GAP + (k // cols) * (th + GAP), GAP + (k % cols) * (tw + GAP)
        grid[y : y + th, x : x + tw] = tile
    return grid


def unletterbox(a: np.ndarray, input_hw: Sequence[int], original_hw: Sequence[int]) -> np.ndarray:
    """Map a 2-D array covering the letterboxed model input onto the original image (crop pad, resize)."""
    h1, w1 = input_hw[:2]
    h0, w0 = original_hw[:2]
    full = cv2.resize(a.astype(np.float32), (w1, h1), interpolation=cv2.INTER_LINEAR)
    gain = min(h1 / h0, w1 / w0)
    pw, ph = (w1 - round(w0 * gain)) / 2, (h1 - round(h0 * gain)) / 2
    top, left = round(ph - 0.1), round(pw - 0.1)  # the letterbox's own rounding of the padding
    crop = full[top : top + round(h0 * gain), left : left + round(w0 * gain)]
    return cv2.resize(crop, (w0, h0), interpolation=cv2.INTER_LINEAR)


def _colorbar(height: int, lo: float, hi: float, width: int = 56) -> np.ndarray:
    """Vertical JET scale with its value range written at both ends (BGR)."""
    ramp = np.linspace(255, 0, max(height - 2 * HEADER, 2)).astype(np.uint8)[:, None].repeat(16, 1)
    bar = np.full((height, width, 3), 255, np.uint8)
    bar[HEADER : HEADER + len(ramp), 6:22] = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)
    cv2.putText(bar, f"{hi:.4g}", (2, HEADER - 8), FONT, 0.38, (30, 30, 30), 1, cv2.LINE_AA)
    cv2.putText(bar, f"{lo:.4g}", (2, height - 10), FONT, 0.38, (30, 30, 30), 1, cv2.LINE_AA)
    return bar


def attention_overlay(attention: np.ndarray, image: np.ndarray, input_hw: Sequence[int], title: str,
                      alpha: float = 0.5) -> np.ndarray:  # fmt: skip
    """Spatial attention (h, w) in 0..1 as a JET heatmap blended over the original BGR image.

    The map is stretched to its own min..max (the colour bar gives the real range) so structure
    stays visible even when an untrained or well-calibrated map is nearly flat.
    """
    mapped = unletterbox(attention, input_hw, image.shape)
    scale = OVERLAY_MIN_WIDTH / image.shape[1]
    if scale > 1:  # small frames are enlarged so the caption and colour bar stay readable
        size = (OVERLAY_MIN_WIDTH, round(image.shape[0] * scale))
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        mapped = cv2.resize(mapped, size, interpolation=cv2.INTER_LINEAR)
    scaled, lo, hi = normalise(mapped)
    heat = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blended = cv2.addWeighted(image, 1 - alpha, heat, alpha, 0)
    panel = _caption(blended, title)
    return np.hstack((panel, _colorbar(panel.shape[0], lo, hi)))


def channel_bar_plot(weights: np.ndarray, title: str, path: Path, top: int = 5) -> Path:
    """Bar plot of channel-attention weights (C,) in 0..1, highest ``top`` channels marked (matplotlib, Agg).

    Bars are one line collection (``vlines``), not C rectangles, so 2048 channels draw in well under a second.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), tight_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    c = len(weights)
    pad = 0.25 * max(float(weights.max() - weights.min()), 1e-4)
    low, high = max(0.0, float(weights.min()) - pad), min(1.0, float(weights.max()) + pad)
    dpi = 110
    bar_width = max(72 / dpi, 0.85 * 650 / c)  # points: the axes width shared out, at least one pixel
    colours = colormaps["viridis"](normalise(weights)[0])
    ax.vlines(np.arange(c), low, weights, colors=colours, linewidth=bar_width, antialiased=c < 512)
    ax.axhline(
        float(weights.mean()),
        color="tab:red",
        linestyle="--",
        linewidth=1,
        label=f"mean {weights.mean():.4f}",
    )
    best = np.argsort(weights)[::-1][:top]
    ax.scatter(
        best,
        weights[best],
        s=14,
        color="tab:red",
        zorder=3,
        label=f"top {len(best)}: {', '.join(map(str, best))}",
    )
    ax.set(xlim=(-0.5, c - 0.5), ylim=(low, high), xlabel="channel", ylabel="weight (sigmoid)", title=title)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=dpi)
    return path


class FeatureVisualizer:
    """Callable for ``model(x, visualize=...)`` that writes per-layer figures for the first image.

    Use as ``with FeatureVisualizer(model, save_dir, image0) as vis: model(x, visualize=vis)``.
    ``image0`` is the original BGR frame (for heatmap overlays); ``n`` feature channels per grid.
    """

    def __init__(self, model: nn.Module, save_dir: str | Path, image0: np.ndarray, n: int = 32) -> None:
        self.model, self.save_dir, self.image0, self.n = model, Path(save_dir), image0, n
        self.input_hw: tuple[int, int] | None = None
        self.captured: dict[int, dict[str, torch.Tensor]] = {}  # id(CBAM) -> {"channel": .., "spatial": ..}
        self.saved: list[Path] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> FeatureVisualizer:
        self.save_dir.mkdir(parents=True, exist_ok=True)
        for module in self.model.modules():
            if isinstance(module, CBAM):
                self._handles.append(module.channel.register_forward_hook(self._hook(module, "channel")))
                self._handles.append(module.spatial.register_forward_hook(self._hook(module, "spatial")))
        first = next(iter(self.model.model)) if hasattr(self.model, "model") else None
        if first is not None:
            self._handles.append(first.register_forward_pre_hook(self._remember_input))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _remember_input(self, module: nn.Module, inputs: tuple) -> None:
        self.input_hw = tuple(inputs[0].shape[-2:])

    def _hook(self, owner: CBAM, branch: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            with torch.no_grad():
                self.captured.setdefault(id(owner), {})[branch] = module.weights(inputs[0])[0].float().cpu()

        return hook

    def __call__(self, layer: nn.Module, output: object) -> None:
        row = int(getattr(layer, "i", 0))
        kind = str(getattr(layer, "type", type(layer).__name__)).split(".")[-1]
        stem, label = f"stage{row:02d}_{kind}", f"row {row} {kind}"
        if isinstance(output, torch.Tensor) and output.ndim == 4 and kind != "Detect":
            c, h, w = output.shape[1:]
            grid = _caption(
                feature_grid(output[0], self.n), f"{label}: {c}x{h}x{w}, first {min(c, self.n)} channels"
            )
            self._write(grid, f"{stem}_features.png")
        cbams = [m for m in layer.modules() if isinstance(m, CBAM) and id(m) in self.captured]
        if cbams:
            where = label if isinstance(layer, CBAM) else f"{label} (CBAM of its last block)"
            self._write_attention(stem, where, self.captured[id(cbams[-1])])
        for m in cbams:
            self.captured.pop(id(m), None)

    def _write_attention(self, stem: str, where: str, captured: dict[str, torch.Tensor]) -> None:
        if "spatial" in captured and self.input_hw is not None:
            spatial = captured["spatial"][0].numpy()
            title = f"{where}: spatial attention, {spatial.shape[0]}x{spatial.shape[1]} map"
            self._write(attention_overlay(spatial, self.image0, self.input_hw, title), f"{stem}_spatial.png")
        if "channel" in captured:
            weights = captured["channel"].flatten().numpy()
            path = self.save_dir / f"{stem}_channel.png"
            channel_bar_plot(weights, f"{where}: channel attention over {len(weights)} channels", path)
            self.saved.append(path)

    def _write(self, image: np.ndarray, name: str) -> None:
        path = self.save_dir / name
        cv2.imwrite(str(path), image)
        self.saved.append(path)
