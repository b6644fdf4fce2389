"""--visualize: feature grids for every layer, CBAM spatial heatmaps and channel bar plots."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import detect
from models.yolo import DetectionModel, load_model_yaml
from tests.test_detect import draw_scene, make_checkpoint
from utils.sources import prepare_image
from utils.visualize import HEADER, FeatureVisualizer, feature_grid, unletterbox


def _scene(tmp_path: Path, h: int = 90, w: int = 120) -> Path:
    path = tmp_path / "scene.jpg"
    cv2.imwrite(str(path), draw_scene(h, w))
    return path


def test_unletterbox_recovers_the_image_area():
    im0 = np.zeros((60, 120, 3), np.uint8)
    lb = prepare_image(im0, 128, stride=32, auto=False)  # 64x128 image padded top and bottom to 128x128
    mask = np.zeros(lb.shape[1:], np.float32)
    mask[32:96, :] = 1.0  # exactly the image area of the letterboxed input
    back = unletterbox(mask, lb.shape[1:], im0.shape)
    assert back.shape == (60, 120) and back.min() > 0.99


def test_feature_grid_layout():
    grid = feature_grid(torch.rand(40, 5, 7), n=32)  # 32 of 40 channels, 8 per row, tiles enlarged
    assert grid.dtype == np.uint8 and grid.ndim == 3
    assert grid.shape[0] > grid.shape[1] / 4 and grid.shape[1] >= 8 * 64


def test_visualizer_hooks_are_removed(tmp_path):
    model = DetectionModel({"nc": 1, "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "CBAM", []],
                            [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "Conv", [64, 3, 2]],
                            [-1, 1, "Conv", [64, 3, 2]], [-1, 1, "Conv", [64, 3, 2]]],
                            "head": [[[3, 4, 5], 1, "Detect", ["nc", 3]]]}, verbose=False).eval()  # fmt: skip
    image = draw_scene(64, 64)
    with FeatureVisualizer(model, tmp_path, image) as vis, torch.no_grad():
        model(torch.rand(1, 3, 64, 64), visualize=vis)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "stage01_CBAM_spatial.png" in names and "stage01_CBAM_channel.png" in names
    assert "stage05_Conv_features.png" in names and not any("Detect" in n for n in names)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    heat = cv2.imread(str(tmp_path / "stage01_CBAM_spatial.png"))
    assert heat.shape[0] >= 64 + HEADER  # image (enlarged for readability) under a caption


def test_detect_visualize_feature_grids_for_yolov5n(tmp_path):
    weights = make_checkpoint(tmp_path / "n.pt")
    result = detect.run(weights=weights, source=_scene(tmp_path), imgsz=64, project=tmp_path, visualize=True,
                        nosave=True)  # fmt: skip
    files = sorted(p.name for p in (result.save_dir / "scene").iterdir())
    assert len(files) == 24 and files[0] == "stage00_Conv_features.png"  # every layer but Detect
    assert cv2.imread(str(result.save_dir / "scene" / "stage23_C3_features.png")) is not None


@pytest.mark.slow
def test_detect_visualize_cbam_attention(tmp_path):
    # The ResNet50 + CBAM backbone as in the YAML; the head thinned (ResNet rows ignore the multiples)
    # so the checkpoint is ~100 MB smaller and the test stays quick.
    cfg = load_model_yaml("yolov5-resnet50-cbam.yaml")
    cfg.update(depth_multiple=0.33, width_multiple=0.25)
    weights = make_checkpoint(tmp_path / "cbam.pt", cfg=cfg)
    source = _scene(tmp_path, 90, 120)
    result = detect.run(weights=weights, source=source, imgsz=128, project=tmp_path, visualize=True,
                        nosave=True)  # fmt: skip
    out = result.save_dir / "scene"
    for row in (2, 4, 6, 8):  # the four CBAM rows of the YAML
        heat = cv2.imread(str(out / f"stage{row:02d}_CBAM_spatial.png"))
        bars = cv2.imread(str(out / f"stage{row:02d}_CBAM_channel.png"))
        assert heat is not None and bars is not None
        assert heat.shape[0] == round(90 * 360 / 120) + HEADER  # original aspect, enlarged to 360 wide
    assert (out / "stage07_ResNetStage_features.png").is_file()
