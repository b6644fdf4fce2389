"""The Python API: torch.hub entry points, the Predictor wrapper and the Detections results object."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import detect
import hubconf
from models.hub import Predictor
from models.yolo import DetectionModel
from tests.test_detect import NAMES, make_checkpoint, make_images
from utils.results import XYXY_COLUMNS, Detections

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def hub_assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hub")
    weights = make_checkpoint(root / "n.pt")
    model = torch.hub.load(str(ROOT), "custom", path=str(weights), source="local", _verbose=False)
    model.conf, model.max_det = 0.3, 20
    return {"root": root, "weights": weights, "images": make_images(root / "images"), "model": model}


def test_hub_boxes_equal_detect_py_boxes(hub_assets, tmp_path):
    model, images = hub_assets["model"], hub_assets["images"]
    assert isinstance(model, Predictor) and model.names == NAMES
    results = model([str(p) for p in images], size=SIZE)
    run = detect.run(weights=hub_assets["weights"], source=images[0].parent, imgsz=SIZE, conf_thres=0.3,
                     max_det=20, project=tmp_path, nosave=True)  # fmt: skip
    by_name = {Path(p.path).name: p.boxes for p in run.predictions}
    assert sum(len(b) for b in by_name.values()) > 0
    for file, xyxy in zip(results.files, results.xyxy):
        np.testing.assert_array_equal(xyxy.numpy(), by_name[file])


def test_path_numpy_pil_and_list_inputs_agree(hub_assets, tmp_path):
    model = hub_assets["model"]
    bgr = cv2.imread(str(hub_assets["images"][1]))
    path = tmp_path / "scene.png"  # lossless, so PIL and OpenCV decode the same pixels
    cv2.imwrite(str(path), bgr)
    pil = Image.open(path)
    results = model([str(path), bgr, pil], size=SIZE)
    assert len(results) == 3 and results.files[1] == "image1.jpg"
    for other in results.xyxy[1:]:
        torch.testing.assert_close(other, results.xyxy[0])
    single = model(bgr, size=SIZE)
    assert len(single) == 1 and torch.equal(single.xyxy[0], results.xyxy[0])
    grey = model(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), size=SIZE)  # HxW arrays are accepted too
    assert grey.ims[0].shape == bgr.shape


def test_box_formats_and_pandas(hub_assets):
    results = hub_assets["model"](str(hub_assets["images"][0]), size=SIZE)
    h, w = results.ims[0].shape[:2]
    xyxy, xywh = results.xyxy[0], results.xywh[0]
    assert len(xyxy) > 0 and xyxy.shape[1] == 6
    gain = torch.tensor([w, h, w, h, 1, 1], dtype=torch.float32)
    torch.testing.assert_close(results.xyxyn[0] * gain, xyxy)
    torch.testing.assert_close(results.xywhn[0] * gain, xywh)
    torch.testing.assert_close(xywh[:, 2], xyxy[:, 2] - xyxy[:, 0])
    df = results.pandas().xyxy[0]
    assert tuple(df.columns) == XYXY_COLUMNS and len(df) == len(xyxy)
    assert set(df["name"]) <= set(NAMES.values())
    np.testing.assert_allclose(df[["xmin", "ymin", "xmax", "ymax"]].to_numpy(), xyxy[:, :4].numpy())
    assert list(results.pandas().xywhn[0].columns[:4]) == ["xcenter", "ycenter", "width", "height"]


def test_print_render_save_crop(hub_assets, tmp_path):
    results = hub_assets["model"]([str(p) for p in hub_assets["images"][:2]], size=SIZE)
    text = str(results)
    assert text.startswith("image 1/2: 96x128 ") and "Speed:" in text and "image 2/2: 120x90" in text
    results.print()
    rendered = results.render()
    assert [r.shape for r in rendered] == [im.shape for im in results.ims]
    assert not np.array_equal(rendered[0], results.ims[0])  # boxes drawn on a copy
    save_dir = results.save(tmp_path / "exp")
    assert sorted(p.name for p in save_dir.glob("*.jpg")) == ["scene0.jpg", "scene1.jpg"]
    crops = results.crop(tmp_path / "exp", exist_ok=True)
    assert len(crops) == sum(len(p) for p in results.pred) == len(list((save_dir / "crops").rglob("*.jpg")))
    assert {"box", "conf", "cls", "label", "im"} <= set(crops[0])
    assert [len(r) for r in results.tolist()] == [1, 1]


def test_predictor_settings_filter(hub_assets):
    model = hub_assets["model"]
    try:
        model.classes, model.max_det = [0], 2
        results = model(str(hub_assets["images"][0]), size=SIZE)
    finally:
        model.classes, model.max_det = None, 20
    assert len(results.xyxy[0]) <= 2 and set(results.xyxy[0][:, 5].tolist()) <= {0.0}
    raw = model(torch.zeros(1, 3, SIZE, SIZE))  # a tensor goes straight to the model
    assert raw.ndim == 3 and raw.shape[0] == 1


def test_empty_detections_object():
    empty = Detections([np.zeros((10, 20, 3), np.uint8)], [torch.zeros((0, 6))], ["a.jpg"], names=NAMES)
    assert len(empty) == 1 and "(no detections)" in str(empty)
    assert empty.pandas().xyxy[0].empty and empty.render()[0].shape == (10, 20, 3)


def test_yaml_constructors():
    model = hubconf.yolov5n(pretrained=False, classes=3, _verbose=False)
    assert isinstance(model, Predictor) and model.model.nc == 3
    assert len(model(np.zeros((40, 50, 3), np.uint8), size=SIZE)) == 1
    raw = hubconf.yolov5n(pretrained=False, autoshape=False, _verbose=False)
    assert isinstance(raw, DetectionModel)
    for name in ("yolov5s", "yolov5m", "yolov5l", "yolov5x", "yolov5_resnet50", "yolov5_resnet50_cbam",
                 "yolov5_resnet50_cbam_inblock", "yolov5_resnet50_se"):  # fmt: skip
        assert callable(getattr(hubconf, name))


def test_pretrained_missing_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="pretrained=False"):
        hubconf.yolov5n(pretrained=True, _verbose=False)


def test_pretrained_found_locally(hub_assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "yolov5n.pt").write_bytes(hub_assets["weights"].read_bytes())
    model = hubconf.yolov5n(pretrained=True, classes=2, _verbose=False)
    assert model.names == NAMES  # same class count: the checkpoint is used as it is
