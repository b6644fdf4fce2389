"""The synthetic shapes dataset: labels are tight on the drawn pixels, output is deterministic."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from utils.dataloaders import LoadImagesAndLabels
from utils.general import ROOT, yaml_load

SCRIPT = ROOT / "data" / "scripts" / "make_shapes.py"


@pytest.fixture(scope="module")
def shapes():
    spec = importlib.util.spec_from_file_location("make_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, shapes) -> Path:
    return shapes.generate(tmp_path_factory.mktemp("shapes"), n_train=24, n_val=8, seed=0, video_frames=6)


def digest(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".jpg", ".txt"))
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("cls", range(6))
def test_shape_window_never_clips_the_shape(shapes, cls):
    rng = np.random.default_rng(cls)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(60, 200, 2))
        centre = (rng.uniform(0, w), rng.uniform(0, h))
        win, mask = shapes.shape_mask(cls, centre, rng.uniform(2, 50), rng.uniform(0, 2 * math.pi), (h, w))
        (r0, r1), (c0, c1) = (win[0].start, win[0].stop), (win[1].start, win[1].stop)
        if mask.size == 0:
            continue
        # the shape may touch the window's edge only where that edge is the image border
        assert r0 == 0 or not mask[0].any()
        assert r1 == h or not mask[-1].any()
        assert c0 == 0 or not mask[:, 0].any()
        assert c1 == w or not mask[:, -1].any()


def test_rendered_boxes_match_pixels_on_plain_background(shapes):
    rng = np.random.default_rng(7)
    for _ in range(30):
        im, labels = shapes.render_scene(rng, 200, 260, n_shapes=1, plain=True)
        assert labels.shape == (1, 5)
        ys, xs = np.nonzero((im != 114).any(-1))
        np.testing.assert_array_equal(labels[0, 1:], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def test_occluded_scenes_label_visible_pixels(shapes):
    rng = np.random.default_rng(3)
    for _ in range(10):
        im, labels = shapes.render_scene(rng, 240, 240, n_shapes=8, plain=True)
        assert len(labels) >= 2
        painted = (im != 114).any(-1)
        union = np.zeros_like(painted)
        for _, x1, y1, x2, y2 in labels.astype(int):
            union[y1:y2, x1:x2] = True
        assert not (painted & ~union).any()  # every painted pixel lies in some box
        for _, x1, y1, x2, y2 in labels.astype(int):  # and every box edge touches painted pixels
            assert painted[y1:y2, x1].any() and painted[y1:y2, x2 - 1].any()
            assert painted[y1, x1:x2].any() and painted[y2 - 1, x1:x2].any()


def test_generated_dataset_layout_and_labels(small_dataset: Path):
    for split, n in (("train", 24), ("val", 8)):
        assert len(list((small_dataset / "images" / split).glob("*.jpg"))) == n
        assert len(list((small_dataset / "labels" / split).glob("*.txt"))) == n
    ds = LoadImagesAndLabels(small_dataset / "images" / "train", img_size=320, nc=6)
    assert ds.n == 24  # every file verifies
    labels = np.concatenate(ds.labels)
    assert len(labels) > 24 and set(np.unique(labels[:, 0]).astype(int)) <= set(range(6))
    assert (labels[:, 3:] > 0.01).all() and (labels[:, 3:] <= 0.55).all()
    sides = ds.shapes
    assert sides.min() >= 320 and sides.max() <= 480
    demos = sorted((small_dataset / "demo").glob("*.jpg"))
    assert len(demos) >= 3
    cap = cv2.VideoCapture(str(small_dataset / "demo" / "shapes.mp4"))
    frames = 0
    while cap.read()[0]:
        frames += 1
    assert frames == 6


def test_files_hold_what_render_scene_drew(shapes, small_dataset: Path):
    """Each saved image/label pair is the render_scene output for its seed (whose boxes are tested above)."""
    for i in range(8):
        rng = shapes.image_rng(0, "val", i)
        h, w = (int(v) for v in rng.integers(320, 481, 2))
        im, labels = shapes.render_scene(rng, h, w)
        saved = cv2.imread(str(small_dataset / "images" / "val" / f"val_{i:05d}.jpg"))
        assert saved.shape == im.shape
        assert np.abs(saved.astype(int) - im).mean() < 6  # only JPEG loss
        text = (small_dataset / "labels" / "val" / f"val_{i:05d}.txt").read_text()
        assert text == shapes.labels_to_text(labels, h, w)


def test_same_seed_same_bytes_other_seed_differs(shapes, small_dataset: Path, tmp_path: Path):
    again = shapes.generate(tmp_path / "again", n_train=24, n_val=8, seed=0, video_frames=0)
    other = shapes.generate(tmp_path / "other", n_train=24, n_val=8, seed=1, video_frames=0)
    reference = digest(small_dataset)
    assert digest(again) == reference
    assert digest(other) != reference


def test_regeneration_replaces_stale_files(shapes, tmp_path: Path):
    out = shapes.generate(tmp_path / "d", n_train=6, n_val=2, seed=0, video_frames=0)
    shapes.generate(out, n_train=3, n_val=2, seed=0, video_frames=0)
    assert len(list((out / "images" / "train").glob("*.jpg"))) == 3
    assert len(list((out / "labels" / "train").glob("*.txt"))) == 3


def test_cli_and_yaml(tmp_path: Path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(out),
        "--train",
        "4",
        "--val",
        "2",
        "--seed",
        "5",
        "--video-frames",
        "3",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    assert len(list((out / "images" / "val").glob("*.jpg"))) == 2
    cfg = yaml_load(ROOT / "data" / "shapes.yaml")
    assert cfg["path"] == "../datasets/shapes" and cfg["download"] == "data/scripts/make_shapes.py"
    assert list(cfg["names"].values()) == ["circle", "square", "triangle", "star", "hexagon", "cross"]
