"""Generate the offline 'shapes' detection dataset in YOLO format, deterministically from a seed.

Layout written under --out:
    images/train/*.jpg  labels/train/*.txt   (class xc yc w h, normalised)
    images/val/*.jpg    labels/val/*.txt
    demo/*.jpg          demo/shapes.mp4      (moving shapes, for detect.py)

Six classes (circle, square, triangle, star, hexagon, cross) of varied size (15% to 50% of the
image side), colour and rotation, partly overlapping, on gradient / blob / stripe / noise
backgrounds. Each box is the bounding box of the shape's visible pixels; a new shape may hide at
most 35% of an earlier one. Each image has its own generator seeded by (seed, split, index), so the
output does not depend on the order or number of images generated before it.

Usage: python data/scripts/make_shapes.py --out ../datasets/shapes [--train 600 --val 120 --seed 0]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("circle", "square", "triangle", "star", "hexagon", "cross")
SPLIT_CODES = {"train": 0, "val": 1, "demo": 2, "video": 3}
SIZE_RANGE = (0.15, 0.5)  # shape diameter as a fraction of the image's short side (log-uniform)
MAX_HIDDEN = 0.35  # a new shape may cover at most this fraction of an earlier shape's pixels
SUBPIXEL = 4  # cv2 drawing shift: coordinates carry 4 fractional bits


def _regular(n: int, phase: float = -math.pi / 2) -> np.ndarray:
    a = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(a), np.sin(a)], 1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    outer = _regular(2 * points)
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return outer * radius[:, None]


def _cross(arm: float = 0.3) -> np.ndarray:
    a = arm
    q = [
        (a, -1),
        (a, -a),
        (1, -a),
        (1, a),
        (a, a),
        (a, 1),
        (-a, 1),
        (-a, a),
        (-1, a),
        (-1, -a),
        (-a, -a),
        (-a, -1),
    ]
    return np.array(q, dtype=float) / math.hypot(1, a)  # circumradius 1


# Unit outlines (circumradius 1) per class; the circle is drawn with cv2.circle instead.
OUTLINES = {
    1: _regular(4, math.pi / 4),
    2: _regular(3),
    3: _star(),
    4: _regular(6),
    5: _cross(),
}


UNIT_AREAS = {0: math.pi, **{c: abs(cv2.contourArea(o.astype(np.float32))) for c, o in OUTLINES.items()}}


Window = tuple[slice, slice]


def shape_mask(
    cls: int, center: tuple[float, float], radius: float, angle: float, hw: tuple[int, int]
) -> tuple[Window, np.ndarray]:
    """Filled bool mask of one shape inside its window (the part of the image it can touch).

    Angle in radians, centre and radius in pixels. Returns ((row slice, col slice), mask of the
    window's size); an empty window when the shape lies outside the (h, w) image.
    """
    h, w = hw
    cx, cy = center
    reach = radius + 2
    x0, y0 = max(int(cx - reach), 0), max(int(cy - reach), 0)
    x1, y1 = max(min(int(cx + reach) + 1, w), x0), max(min(int(cy + reach) + 1, h), y0)
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    scale = 1 << SUBPIXEL
    if cls == 0:
        c = (round((cx - x0) * scale), round((cy - y0) * scale))
        cv2.circle(mask, c, round(radius * scale), 255, -1, cv2.LINE_8, SUBPIXEL)
    else:
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        pts = OUTLINES[cls] @ rot.T * radius + np.array([cx - x0, cy - y0])
        cv2.fillPoly(mask, [np.round(pts * scale).astype(np.int32)], 255, cv2.LINE_8, shift=SUBPIXEL)
    return (slice(y0, y1), slice(x0, x1)), mask.astype(bool)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.integers(0, 180), rng.integers(60, 256), rng.integers(60, 256)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32 background: linear gradient, smooth blobs, stripes or flat, plus grain."""
    c1, c2 = _random_colour(rng) * 0.8, _random_colour(rng) * 0.8
    kind = rng.integers(0, 4)
    xs, ys = np.arange(w, dtype=np.float32)[None], np.arange(h, dtype=np.float32)[:, None]
    if kind == 0:  # linear gradient at a random angle
        a = rng.uniform(0, 2 * math.pi)
        t = xs * np.float32(math.cos(a)) + ys * np.float32(math.sin(a))
        t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    elif kind == 1:  # smooth colour blobs: a coarse random grid blown up
        g = rng.uniform(0, 1, (int(rng.integers(3, 9)), int(rng.integers(3, 9)))).astype(np.float32)
        t = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    elif kind == 2:  # stripes / waves
        f = (rng.uniform(0.02, 0.15, 2) * rng.choice([-1, 1], 2)).astype(np.float32)
        t = 0.5 + 0.5 * np.sin(xs * f[0] + ys * f[1])
    else:  # flat
        t = np.zeros((h, w), np.float32)
    grain = rng.standard_normal((h, w), dtype=np.float32) * np.float32(rng.uniform(2, 12))
    # per channel then merged: much faster than broadcasting over (h, w, 3)
    return cv2.merge([t * (c2[i] - c1[i]) + c1[i] + grain for i in range(3)])


def _try_place(
    rng: np.random.Generator, owner: np.ndarray, visible: list[int], areas: list[int], cls: int, radius: float
) -> tuple[Window, np.ndarray] | None:
    """A shape that hides at most MAX_HIDDEN of each earlier one and is mostly inside; None after 10 tries."""
    h, w = owner.shape
    for _ in range(10):
        cx = rng.uniform(0.6 * radius, w - 0.6 * radius)
        cy = rng.uniform(0.6 * radius, h - 0.6 * radius)
        win, mask = shape_mask(cls, (cx, cy), radius, rng.uniform(0, 2 * math.pi), (h, w))
        if mask.sum() < max(0.6 * UNIT_AREAS[cls] * radius**2, 30):  # mostly off the image
            continue
        covered = np.bincount(owner[win][mask] + 1, minlength=len(areas) + 1)[1:]
        if np.all(np.array(visible) - covered >= (1 - MAX_HIDDEN) * np.array(areas)):
            for k, c in enumerate(covered):
                visible[k] -= int(c)
            return win, mask
    return None


def _fill(rng: np.random.Generator, im: np.ndarray, win: Window, mask: np.ndarray) -> None:
    """Paint a shape: a colour that differs from the background under it, sometimes shaded."""
    sub = im[win]  # a view: assignments below paint the image
    under = sub[mask].mean(0)
    colour = _random_colour(rng)
    for _ in range(10):
        if np.abs(colour - under).sum() > 150:
            break
        colour = _random_colour(rng)
    if rng.random() < 0.3:  # shaded: brightness ramps across the shape
        ys, xs = np.nonzero(mask)
        a = rng.uniform(0, 2 * math.pi)
        t = xs * math.cos(a) + ys * math.sin(a)
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
        sub[mask] = colour * (0.65 + 0.35 * t[:, None]).astype(np.float32)
    else:
        sub[mask] = colour


def _tight_boxes(owner: np.ndarray, windows: list[Window], classes: list[int]) -> np.ndarray:
    """(n, 5) ``[class, x1, y1, x2, y2]`` of each shape's visible pixels (x2, y2 exclusive)."""
    labels = np.zeros((len(classes), 5), np.float32)
    for k, (win, cls) in enumerate(zip(windows, classes, strict=True)):
        ys, xs = np.nonzero(owner[win] == k)
        labels[k] = (cls, xs.min() + win[1].start, ys.min() + win[0].start, xs.max() + 1 + win[1].start,
                     ys.max() + 1 + win[0].start)  # fmt: skip
    return labels


def render_scene(
    rng: np.random.Generator, h: int, w: int, n_shapes: int | None = None, plain: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image.

    Args:
        n_shapes: shapes to try to place (default random 0..8, mostly 2..5).
        plain: flat grey background, no grain or blur (for exact tests).

    Returns:
        (uint8 (h, w, 3) BGR image, float32 (n, 5) labels ``[class, x1, y1, x2, y2]`` in pixels,
        x2/y2 exclusive, i.e. the tight box of each shape's visible pixels).
    """
    im = np.full((h, w, 3), 114, np.float32) if plain else background(rng, h, w)
    if n_shapes is None:
        n_shapes = int(rng.choice(9, p=[0.03, 0.1, 0.15, 0.17, 0.17, 0.14, 0.1, 0.08, 0.06]))
    owner = np.full((h, w), -1, np.int32)
    areas: list[int] = []
    visible: list[int] = []
    windows: list[Window] = []
    classes: list[int] = []
    for _ in range(n_shapes):
        cls = int(rng.integers(0, len(CLASSES)))
        diameter = min(h, w) * math.exp(rng.uniform(math.log(SIZE_RANGE[0]), math.log(SIZE_RANGE[1])))
        placed = _try_place(rng, owner, visible, areas, cls, diameter / 2)
        if placed is None:
            continue
        win, mask = placed
        owner[win][mask] = len(areas)
        areas.append(int(mask.sum()))
        visible.append(areas[-1])
        windows.append(win)
        classes.append(cls)
        _fill(rng, im, win, mask)
    if not plain and rng.random() < 0.3:
        im = cv2.GaussianBlur(im, (3, 3), 0)
    np.clip(im + 0.5, 0, 255, out=im)
    return im.astype(np.uint8), _tight_boxes(owner, windows, classes)


def labels_to_text(labels: np.ndarray, h: int, w: int) -> str:
    """Pixel ``[class, x1, y1, x2, y2]`` rows as YOLO text ``class xc yc w h`` (normalised, 6 decimals)."""
    rows = []
    for cls, x1, y1, x2, y2 in labels.tolist():
        rows.append(
            f"{int(cls)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
        )
    return "".join(r + "\n" for r in rows)


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def write_split(out: Path, split: str, count: int, seed: int) -> None:
    """Write ``count`` images and labels for one split, replacing earlier generated files."""
    im_dir, lb_dir = out / "images" / split, out / "labels" / split
    for d, pattern in ((im_dir, f"{split}_*.jpg"), (lb_dir, f"{split}_*.txt")):
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob(pattern):
            stale.unlink()
    (out / "labels" / f"{split}.cache").unlink(missing_ok=True)
    for i in range(count):
        rng = image_rng(seed, split, i)
        h, w = (int(v) for v in rng.integers(320, 481, 2))
        im, labels = render_scene(rng, h, w)
        quality = int(rng.integers(80, 96))
        ok, buf = cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {split} image {i}")
        (im_dir / f"{split}_{i:05d}.jpg").write_bytes(buf.tobytes())
        (lb_dir / f"{split}_{i:05d}.txt").write_text(labels_to_text(labels, h, w))


def _video_state(rng: np.random.Generator, n: int, h: int, w: int) -> list[dict]:
    """Moving shapes for the demo video; shape k has class k % 6 so every class appears."""
    objs = []
    for k in range(n):
        r = min(h, w) * rng.uniform(0.08, 0.16)
        objs.append({
            "cls": k % len(CLASSES), "r": r, "colour": _random_colour(rng),
            "pos": rng.uniform([r, r], [w - r, h - r]), "vel": rng.uniform(-6, 6, 2),
            "angle": rng.uniform(0, 2 * math.pi), "spin": rng.uniform(-0.1, 0.1),
        })  # fmt: skip
    return objs


def write_demo(out: Path, seed: int, n_images: int = 6, frames: int = 60, fps: int = 15) -> None:
    """A few still images and a short mp4v video of shapes moving and spinning over a fixed background."""
    demo = out / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        rng = image_rng(seed, "demo", i)
        h, w = (int(v) for v in rng.integers(360, 641, 2))
        im, _ = render_scene(rng, h, w, n_shapes=int(rng.integers(4, 9)))
        cv2.imwrite(str(demo / f"demo_{i:02d}.jpg"), im, [cv2.IMWRITE_JPEG_QUALITY, 92])
    if frames <= 0:
        return
    rng = image_rng(seed, "video", 0)
    h, w = 360, 480
    bg = background(rng, h, w)
    objs = _video_state(rng, 6, h, w)
    writer = cv2.VideoWriter(str(demo / "shapes.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError("OpenCV cannot write mp4v video here")
    for _ in range(frames):
        frame = bg.copy()
        for o in objs:
            win, mask = shape_mask(o["cls"], tuple(o["pos"]), o["r"], o["angle"], (h, w))
            frame[win][mask] = o["colour"]
            o["pos"] += o["vel"]
            o["angle"] += o["spin"]
            for axis, limit in ((0, w), (1, h)):  # bounce off the edges
                if not o["r"] <= o["pos"][axis] <= limit - o["r"]:
                    o["vel"][axis] *= -1
                    o["pos"][axis] = np.clip(o["pos"][axis], o["r"], limit - o["r"])
        writer.write(np.clip(frame, 0, 255).astype(np.uint8))
    writer.release()


def generate(
    out: str | Path, n_train: int = 600, n_val: int = 120, seed: int = 0, video_frames: int = 60
) -> Path:
    """Write the whole dataset under ``out``; returns its absolute path."""
    out = Path(out).resolve()
    write_split(out, "train", n_train, seed)
    write_split(out, "val", n_val, seed)
    write_demo(out, seed, frames=video_frames)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate the synthetic shapes detection dataset (YOLO format).")
    p.add_argument("--out", required=True, help="dataset root to write (images/, labels/, demo/)")
    p.add_argument("--train", type=int, default=600, help="number of training images")
    p.add_argument("--val", type=int, default=120, help="number of validation images")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed gives identical files")
    p.add_argument("--video-frames", type=int, default=60, help="frames in demo/shapes.mp4 (0 = no video)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = generate(args.out, args.train, args.val, args.seed, args.video_frames)
    print(f"shapes dataset written to {out} ({args.train} train, {args.val} val images, classes {CLASSES})")


if __name__ == "__main__":
    main()
