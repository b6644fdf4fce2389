"""detect.py end to end on generated images and videos, the source loaders, and TTA."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import detect
from models.backend import AutoBackend
from models.tta import augmented_forward, descale, scale_image
from models.yolo import DetectionModel
from utils.boxes import xywhn2xyxy
from utils.checkpoints import build_checkpoint, save_checkpoint
from utils.general import LOGGER
from utils.predict import describe
from utils.sources import LoadImages, LoadStreams, SourceError, classify_source, prepare_image

NAMES = {0: "circle", 1: "square"}
IMAGE_SIZES = ((96, 128), (120, 90), (64, 64))  # (h, w) of the generated images
VIDEO = {"frames": 12, "w": 96, "h": 64, "fps": 7.0}


def make_checkpoint(path: Path, cfg: str | dict = "yolov5n.yaml", objectness_bias: float = 6.0) -> Path:
    """Untrained 2-class model saved as a project checkpoint; raised objectness gives many boxes."""
    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=2, verbose=False)
    model.names = dict(NAMES)
    with torch.no_grad():
        for conv in model.detect.m:
            conv.bias.view(model.detect.na, -1)[:, 4] += objectness_bias
    save_checkpoint(build_checkpoint(model.eval()), path)
    return path


def draw_scene(h: int, w: int, shift: int = 0) -> np.ndarray:
    """Grey BGR image with a red disc and a blue square."""
    im = np.full((h, w, 3), 190, np.uint8)
    cv2.circle(im, (w // 3 + shift, h // 2), max(min(h, w) // 5, 3), (0, 0, 230), -1)
    cv2.rectangle(im, (w // 2 + shift, h // 5), (w // 2 + shift + w // 4, h // 5 + h // 3), (230, 40, 0), -1)
    return im


def make_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (h, w) in enumerate(IMAGE_SIZES):
        paths.append(folder / f"scene{k}.jpg")
        cv2.imwrite(str(paths[-1]), draw_scene(h, w))
    return paths


def make_video(path: Path) -> Path:
    writer = cv2.VideoWriter(
        str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO["fps"], (VIDEO["w"], VIDEO["h"])
    )
    for f in range(VIDEO["frames"]):
        writer.write(draw_scene(VIDEO["h"], VIDEO["w"], shift=2 * f))
    writer.release()
    return path


def video_info(path: Path) -> tuple[int, int, int, float]:
    """(frames actually decodable, width, height, fps) of a video file."""
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"{path} does not open"
    w, h, fps = (
        int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
        int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        cap.get(cv2.CAP_PROP_FPS),
    )
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n, w, h, fps


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("detect")
    make_images(root / "images")
    return {
        "root": root,
        "weights": make_checkpoint(root / "n.pt"),
        "images": root / "images",
        "video": make_video(root / "clip.mp4"),
    }


FAST = {"imgsz": 64, "conf_thres": 0.3, "max_det": 20}


# ----------------------------------------------------------------------------------------- sources


@pytest.mark.parametrize(
    ("source", "webcam", "is_file", "is_url"),
    [
        ("0", True, False, False),
        ("cams.streams", True, False, False),
        ("rtsp://host/live", True, False, True),
        ("https://host/video.mp4", False, True, True),
        ("images/", False, False, False),
        ("clip.MP4", False, True, False),
        ("a.jpg", False, True, False),
        ("list.txt", False, False, False),
    ],
)
def test_classify_source(source, webcam, is_file, is_url):
    kind = classify_source(source)
    assert (kind.webcam, kind.is_file, kind.is_url) == (webcam, is_file, is_url)


def test_load_images_folder_glob_list_and_unreadable(assets, tmp_path):
    folder = assets["images"]
    assert len(list(LoadImages(folder, img_size=64))) == 3
    assert len(list(LoadImages(str(folder / "*1.jpg"), img_size=64))) == 1
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'scene0.jpg'}\n{folder / 'scene2.jpg'}\n")
    items = list(LoadImages(listing, img_size=64))
    assert [Path(p).name for p, *_ in items] == ["scene0.jpg", "scene2.jpg"]
    path, im, im0, cap, log = items[0]
    assert im.shape[0] == 3 and im.dtype == np.uint8 and im.flags.c_contiguous
    assert im0.shape == (*IMAGE_SIZES[0], 3) and cap is None and log.startswith("image 1/2 ")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "ok.jpg").write_bytes((folder / "scene1.jpg").read_bytes())
    assert [Path(p).name for p, *_ in LoadImages(tmp_path, img_size=64)] == ["ok.jpg"]  # broken one skipped
    with pytest.raises(SourceError, match="not found"):
        LoadImages(tmp_path / "missing")


def test_prepare_image_is_rgb_letterbox():
    im0 = np.zeros((40, 80, 3), np.uint8)
    im0[..., 2] = 255  # red in BGR
    im = prepare_image(im0, 64, stride=32, auto=True)
    assert im.shape == (3, 32, 64)
    assert im[0].max() == 255 and im[2, 16, 32] == 0  # RGB: red is channel 0
    assert prepare_image(im0, 64, stride=32, auto=False).shape == (3, 64, 64)


def test_load_video_frames_and_stride(assets):
    frames = list(LoadImages(assets["video"], img_size=64))
    assert len(frames) == VIDEO["frames"]
    assert frames[2][4].startswith(f"video 1/1 (frame 3/{VIDEO['frames']}) ")
    assert (
        len(list(LoadImages(assets["video"], img_size=64, vid_stride=5))) == VIDEO["frames"] // 5
    )  # frames 5 and 10


def test_load_streams_from_streams_file(assets, tmp_path):
    listing = tmp_path / "cams.streams"
    listing.write_text(f"{assets['video']}\n")
    with LoadStreams(str(listing), img_size=64) as streams:
        batches = list(streams)
    assert 1 <= len(batches) <= VIDEO["frames"]
    sources, im, im0s, cap, _ = batches[0]
    assert im.shape[0] == 1 and im.shape[1] == 3 and len(im0s) == 1 and cap is None
    missing = tmp_path / "no_such_camera.mp4"
    expected = re.escape(f"failed to open stream '{missing}' (check the camera index or URL)")
    with pytest.raises(SourceError, match=expected):
        LoadStreams(str(missing))


# ------------------------------------------------------------------------------------------ detect


def test_detect_images_writes_annotations_labels_crops_csv(assets, tmp_path):
    result = detect.run(weights=assets["weights"], source=assets["images"], project=tmp_path, name="exp",
                        save_txt=True, save_conf=True, save_crop=True, save_csv=True, **FAST)  # fmt: skip
    assert result.save_dir == tmp_path / "exp"
    assert len(result.predictions) == 3 and sum(len(p.boxes) for p in result.predictions) > 0
    for pred in result.predictions:
        original = cv2.imread(pred.path)
        annotated = cv2.imread(str(result.save_dir / Path(pred.path).name))
        assert annotated.shape == original.shape
        if len(pred.boxes):
            assert np.abs(annotated.astype(int) - original.astype(int)).sum() > 0  # boxes were drawn
            rows = np.loadtxt(result.save_dir / "labels" / f"{Path(pred.path).stem}.txt", ndmin=2)
            h, w = original.shape[:2]
            np.testing.assert_array_equal(rows[:, 0], pred.boxes[:, 5])
            np.testing.assert_allclose(xywhn2xyxy(rows[:, 1:5], w, h), pred.boxes[:, :4], atol=0.01)
            np.testing.assert_allclose(rows[:, 5], pred.boxes[:, 4], atol=1e-5)
    n_boxes = sum(len(p.boxes) for p in result.predictions)
    assert len(list((result.save_dir / "crops").rglob("*.jpg"))) == n_boxes
    csv_lines = (result.save_dir / "predictions.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("Image Name,Prediction,Confidence") and len(csv_lines) == n_boxes + 1
    again = detect.run(weights=assets["weights"], source=assets["images"], project=tmp_path, name="exp",
                       nosave=True, **FAST)  # fmt: skip
    assert again.save_dir == tmp_path / "exp2" and not list(again.save_dir.glob("*.jpg"))


def test_detect_filters_classes_and_max_det(assets, tmp_path):
    result = detect.run(weights=assets["weights"], source=assets["images"], project=tmp_path, nosave=True,
                        classes=[1], imgsz=64, conf_thres=0.01, max_det=3)  # fmt: skip
    boxes = np.concatenate([p.boxes for p in result.predictions])
    assert len(boxes) and set(boxes[:, 5].tolist()) == {1.0}
    assert all(len(p.boxes) <= 3 for p in result.predictions)


def test_detect_video_keeps_frames_size_and_fps(assets, tmp_path):
    result = detect.run(
        weights=assets["weights"], source=assets["video"], project=tmp_path, save_txt=True, **FAST
    )
    assert [p.frame for p in result.predictions] == list(range(1, VIDEO["frames"] + 1))
    frames, w, h, fps = video_info(result.save_dir / "clip.mp4")
    assert (frames, w, h) == (VIDEO["frames"], VIDEO["w"], VIDEO["h"])
    assert fps == pytest.approx(VIDEO["fps"], rel=1e-3)
    assert (result.save_dir / "labels" / "clip_3.txt").is_file() or not len(result.predictions[2].boxes)


def test_interrupted_video_run_leaves_a_playable_file(assets, tmp_path, monkeypatch):
    original = AutoBackend.forward
    calls = {"n": 0}

    def flaky_forward(self, im, augment=False, visualize=False):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return original(self, im, augment=augment, visualize=visualize)

    monkeypatch.setattr(AutoBackend, "forward", flaky_forward)
    with pytest.raises(KeyboardInterrupt):
        detect.run(weights=assets["weights"], source=assets["video"], project=tmp_path, name="cut", **FAST)
    frames, w, h, _ = video_info(tmp_path / "cut" / "clip.mp4")
    assert (frames, w, h) == (5, VIDEO["w"], VIDEO["h"])


def test_detect_streams_list_writes_video(assets, tmp_path):
    listing = tmp_path / "one.streams"
    listing.write_text(f"{assets['video']}\n")
    result = detect.run(weights=assets["weights"], source=listing, project=tmp_path, **FAST)
    frames, w, h, _ = video_info(result.save_dir / "clip.mp4")
    assert frames == len(result.predictions) >= 1 and (w, h) == (VIDEO["w"], VIDEO["h"])


def test_detect_with_tta_runs(assets, tmp_path):
    result = detect.run(weights=assets["weights"], source=assets["images"] / "scene0.jpg", project=tmp_path,
                        augment=True, nosave=True, **FAST)  # fmt: skip
    assert len(result.predictions) == 1 and result.predictions[0].boxes.shape[1] == 6


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("which", ["weights", "source"])
def test_user_errors_print_one_line_and_exit_nonzero(assets, tmp_path, which):
    args = {"weights": str(assets["weights"]), "source": str(assets["images"])}
    args[which] = str(tmp_path / f"missing_{which}")
    handler = _Collect()
    LOGGER.addHandler(handler)
    try:
        rc = detect.main(
            ["--weights", args["weights"], "--source", args["source"], "--project", str(tmp_path)]
        )
    finally:
        LOGGER.removeHandler(handler)
    errors = [m for m in handler.messages if m.startswith("ERROR")]
    assert rc == 1 and len(errors) == 1 and f"missing_{which}" in errors[0] and "\n" not in errors[0]


def test_parse_opt_defaults_and_imgsz():
    opt = detect.parse_opt(["--img", "320"])
    assert (
        opt.imgsz == [320, 320] and opt.conf_thres == 0.25 and opt.iou_thres == 0.45 and opt.max_det == 1000
    )
    assert opt.line_thickness == 3 and opt.vid_stride == 1 and opt.name == "exp"
    assert detect.parse_opt(["--imgsz", "320", "256"]).imgsz == [320, 256]


# --------------------------------------------------------------------------------------------- TTA


def test_tta_scale_and_descale_by_hand():
    x = torch.rand(1, 3, 64, 96)
    assert scale_image(x, 1.0) is x
    assert scale_image(x, 0.67, stride=32).shape[-2:] == (64, 96)  # 42x64 padded up to multiples of 32
    pred = torch.tensor([[[10.0, 20.0, 8.0, 6.0, 0.9, 0.5]]])
    back = descale(pred, 0.5, "lr", (64, 96))
    assert back[0, 0, :4].tolist() == [96 - 20.0, 40.0, 16.0, 12.0] and back[0, 0, 4] == pytest.approx(0.9)
    assert descale(pred, 1.0, "ud", (64, 96))[0, 0, 1] == 44.0


def test_augmented_forward_drops_the_right_levels():
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=2, verbose=False).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        pred, none = model(x, augment=True)
    assert none is None
    na = model.detect.na

    def per_level(side):  # predictions per level for a side x side input
        return [na * math.ceil(side / s) ** 2 for s in (8, 16, 32)]

    full, mid, small = per_level(64), per_level(64), per_level(64)  # 0.83 and 0.67 pad back to 64
    expected = sum(full[:-1]) + sum(mid) + sum(small[1:])
    assert pred.shape == (1, expected, 7)
    with pytest.raises(ValueError, match="eval"):
        augmented_forward(model.train(), x)


def test_log_line_counts_classes_with_english_plurals():
    det = torch.tensor([[0, 0, 1, 1, 0.9, 0], [0, 0, 1, 1, 0.8, 0], [0, 0, 1, 1, 0.7, 1], [0, 0, 1, 1, 0.6, 2],
                        [0, 0, 1, 1, 0.5, 2]])  # fmt: skip
    assert describe(det, {0: "cross", 1: "circle", 2: "box"}) == "2 crosses, 1 circle, 2 boxes, "
    assert describe(torch.zeros((0, 6)), {0: "cross"}) == ""


def test_detect_and_val_run_with_the_imports_frozen_out_of_full_collections(monkeypatch):
    """Full GC passes over ~350k import-time objects stalled a video stream for ~150 ms every ~30
    frames; main() runs with them frozen and hands them back to the collector afterwards."""
    import gc

    import val
    from utils.general import gc_frozen

    seen = []
    monkeypatch.setattr(detect, "run", lambda **kwargs: seen.append(gc.get_freeze_count()))
    monkeypatch.setattr(val, "run_task", lambda opt: seen.append(gc.get_freeze_count()))
    before = gc.get_freeze_count()
    assert detect.main(["--weights", "w.pt"]) == 0 and val.main(["--weights", "w.pt"]) == 0
    assert len(seen) == 2 and all(n > 1000 for n in seen) and gc.get_freeze_count() == before

    class Node:
        pass

    with gc_frozen():
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made while frozen is still collected
        del a, b
        assert gc.collect() >= 2
