"""Dataset loading: verification of bad files, class-id check, label cache, rect batches, augmentation."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from utils.dataloaders import (
    LoadImagesAndLabels,
    create_dataloader,
    get_image_files,
    img2label_paths,
    rect_batch_shapes,
    start_workers,
)
from utils.general import LOGGER

COLOURS_BGR = np.array([[0, 0, 255], [0, 255, 0], [255, 0, 0]])  # class k is painted COLOURS_BGR[k]
GREY = np.array([114, 114, 114])
SIZES = [(120, 160), (160, 120), (100, 200), (150, 150), (90, 140), (200, 110), (128, 128), (140, 100)]
AUG_HYP = {
    "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0, "degrees": 0.0, "translate": 0.1, "scale": 0.5, "shear": 0.0,
    "perspective": 0.0, "flipud": 0.5, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0,
}  # fmt: skip


def make_dataset(root: Path, sizes=SIZES, ext: str = ".png") -> Path:
    """images/train/*.png with up to 3 rectangles, class k in the k-th vertical third, away from edges.

    Rectangles never touch each other or the image border, so even in a mosaic each box can be
    checked against the pixels of its colour near it. Returns the image folder.
    """
    rng = np.random.default_rng(0)
    im_dir, lb_dir = root / "images" / "train", root / "labels" / "train"
    im_dir.mkdir(parents=True)
    lb_dir.mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        im = np.full((h, w, 3), 114, np.uint8)
        rows = []
        band, margin_x, margin_y = w // 3, w // 12, h // 12
        for k in range(1 + i % 3):
            x1 = k * band + margin_x + int(rng.integers(0, band // 4))
            x2 = x1 + int(rng.integers(6, (k + 1) * band - margin_x - x1))
            y1 = margin_y + int(rng.integers(0, h // 3))
            y2 = y1 + int(rng.integers(6, h - margin_y - y1))
            im[y1:y2, x1:x2] = COLOURS_BGR[k]
            rows.append(f"{k} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}")
        cv2.imwrite(str(im_dir / f"im{i}{ext}"), im)
        (lb_dir / f"im{i}.txt").write_text("\n".join(rows) + "\n")
    return im_dir


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds")


@pytest.fixture
def log_records():
    """Records of the project logger (it may not propagate to the root logger)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    old_level = LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.DEBUG)
    yield records
    LOGGER.removeHandler(handler)
    LOGGER.setLevel(old_level)


def colour_box_rgb(im_chw: torch.Tensor, k: int, region: np.ndarray) -> np.ndarray | None:
    """xyxy of pixels inside ``region`` (xyxy) nearest to class k's colour among grey and all colours."""
    h, w = im_chw.shape[1:]
    x1, y1 = (max(int(v), 0) for v in np.floor(region[:2]))
    x2, y2 = min(int(np.ceil(region[2])), w), min(int(np.ceil(region[3])), h)
    rgb = im_chw[:, y1:y2, x1:x2].numpy().transpose(1, 2, 0).astype(int)
    palette = np.concatenate([GREY[None], COLOURS_BGR[:, ::-1]])
    nearest = np.abs(rgb[:, :, None] - palette[None, None]).sum(-1).argmin(-1)
    ys, xs = np.nonzero(nearest == k + 1)
    return (
        None
        if len(xs) == 0
        else np.array([xs.min() + x1, ys.min() + y1, xs.max() + 1 + x1, ys.max() + 1 + y1], float)
    )


def assert_targets_on_pixels(ims: torch.Tensor, targets: torch.Tensor, tol: float = 2.0) -> None:
    """Each target box equals the extent of its colour's pixels found near it (within tol px)."""
    assert len(targets) > 0
    h, w = ims.shape[2:]
    for i, cls, xc, yc, bw, bh in targets.tolist():
        box = np.array([(xc - bw / 2) * w, (yc - bh / 2) * h, (xc + bw / 2) * w, (yc + bh / 2) * h])
        found = colour_box_rgb(ims[int(i)], int(cls), box + np.array([-1, -1, 1, 1]) * (tol + 1))
        assert found is not None, f"no pixels of class {int(cls)} near its box {box}"
        np.testing.assert_allclose(box, found, atol=tol)


def test_image_sources_and_label_paths(dataset_dir: Path, tmp_path: Path):
    files = get_image_files(dataset_dir)
    assert len(files) == len(SIZES)
    listing = tmp_path / "ds" / "list.txt"
    listing.write_text("".join(f"./images/train/{Path(f).name}\n" for f in files[:3]))
    assert get_image_files(listing) == files[:3]
    assert get_image_files([listing, str(dataset_dir / "im7.png")]) == sorted(files[:3] + files[7:])
    assert get_image_files(str(dataset_dir / "im[01].png")) == files[:2]
    assert img2label_paths(["/a/images/b/images/x.jpg"]) == ["/a/images/b/labels/x.txt"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_image_files(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found"):
        get_image_files(tmp_path / "empty")


def test_loader_batches_match_interface(dataset_dir: Path):
    loader, ds = create_dataloader(dataset_dir, 128, 4, 32, workers=0, nc=3)
    assert ds.n == len(SIZES) and len(ds.labels) == ds.n and ds.shapes.shape == (ds.n, 2)
    assert ds.shapes[0].tolist() == [160, 120]  # (w, h)
    ims, targets, paths, shapes = next(iter(loader))
    assert ims.dtype == torch.uint8 and ims.shape == (4, 3, 128, 128)
    assert targets.shape[1] == 6 and set(targets[:, 0].tolist()) == {0.0, 1.0, 2.0, 3.0}
    assert len(paths) == 4 and paths[0].endswith("im0.png")
    (h0, w0), ((gh, gw), (padw, padh)) = shapes[0]
    assert (h0, w0) == (120, 160) and gh == pytest.approx(96 / 120) and (padw, padh) == (0.0, 16.0)
    assert_targets_on_pixels(ims, targets)


def test_rect_batches(dataset_dir: Path):
    loader, ds = create_dataloader(dataset_dir, 128, 4, 32, rect=True, workers=0, pad=0.5, nc=3)
    aspects = ds.shapes[:, 1] / ds.shapes[:, 0]
    assert (np.diff(aspects) >= 0).all()
    for (ims, targets, _, _), shape in zip(loader, ds.batch_shapes, strict=True):
        assert ims.shape[2:] == tuple(shape) and shape[0] % 32 == 0 and shape[1] % 32 == 0
        assert_targets_on_pixels(ims, targets)
    shapes = rect_batch_shapes(np.array([[200, 100], [200, 150]]), np.array([0, 0]), 640, 32, 0.0)
    assert shapes.tolist() == [[480, 640]]


def test_workers_started_early_serve_every_batch_later(dataset_dir: Path):
    """start_workers forks a persistent loader's workers at once; the next pass over the loader still
    yields every batch once, in order, from those same processes."""
    loader, ds = create_dataloader(dataset_dir, 128, 4, 32, rect=True, workers=2, pad=0.5, nc=3)
    expected = [paths for _, _, paths, _ in create_dataloader(dataset_dir, 128, 4, 32, rect=True, workers=0,
                                                               pad=0.5, nc=3)[0]]  # fmt: skip
    start_workers(loader)
    workers = [w.pid for w in loader._iterator._workers]
    assert len(workers) == 2 and all(w.is_alive() for w in loader._iterator._workers)
    for _ in range(2):  # the pass right after the start, and one more
        assert [paths for _, _, paths, _ in loader] == expected
    assert [w.pid for w in loader._iterator._workers] == workers
    plain, _ = create_dataloader(dataset_dir, 128, 4, 32, workers=0, nc=3)
    start_workers(plain)  # no workers to start: nothing happens
    assert plain._iterator is None


def test_augmented_mosaic_and_flips_keep_boxes_on_pixels(dataset_dir: Path):
    loader, _ = create_dataloader(dataset_dir, 128, 4, 32, hyp=AUG_HYP, augment=True, workers=0, shuffle=True)
    for _ in range(3):
        for ims, targets, _, shapes in loader:
            assert ims.shape[2:] == (128, 128) and shapes[0] is None
            assert_targets_on_pixels(ims, targets)


def test_augmented_letterbox_path(dataset_dir: Path):
    hyp = {**AUG_HYP, "mosaic": 0.0, "degrees": 20.0, "scale": 0.2}
    loader, ds = create_dataloader(dataset_dir, 128, 8, 32, hyp=hyp, augment=True, workers=0)
    assert ds.mosaic  # enabled, but probability 0 sends every sample down the letterbox path
    ims, targets, _, shapes = next(iter(loader))
    assert shapes[0] is not None
    assert_targets_on_pixels(ims, targets, tol=3.0)


def test_augment_requires_hyp_keys(dataset_dir: Path):
    with pytest.raises(ValueError, match="needs hyp"):
        LoadImagesAndLabels(dataset_dir, augment=True)
    with pytest.raises(ValueError, match="mixup"):
        LoadImagesAndLabels(dataset_dir, augment=True, hyp={k: v for k, v in AUG_HYP.items() if k != "mixup"})


def _corrupt_copy(dataset_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "bad"
    shutil.copytree(dataset_dir.parents[1], root)
    im_dir, lb_dir = root / "images" / "train", root / "labels" / "train"
    good = cv2.imencode(".jpg", np.full((64, 64, 3), 90, np.uint8))[1].tobytes()
    (im_dir / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (im_dir / "not_image.jpg").write_text("this is not an image")
    (im_dir / "tiny.png").write_bytes(cv2.imencode(".png", np.zeros((5, 40, 3), np.uint8))[1].tobytes())
    for name, text in {
        "im0": "0 0.5 0.5 0.2\n",  # 4 columns
        "im1": "1 0.5 1.5 0.2 0.2\n",  # coordinate > 1
        "im2": "0 nan 0.5 0.2 0.2\n",  # NaN
    }.items():
        (lb_dir / f"{name}.txt").write_text(text)
    (lb_dir / "im3.txt").write_text("0 0.5 0.5 0.2 0.2\n" * 3 + "1 0.25 0.25 0.1 0.1\n")  # duplicates
    (im_dir / "im4.png").rename(im_dir / "nolabel.png")  # missing label file: background image
    return im_dir


def test_corrupt_files_are_reported_once_and_skipped(dataset_dir: Path, tmp_path: Path, log_records):
    im_dir = _corrupt_copy(dataset_dir, tmp_path)
    ds = LoadImagesAndLabels(im_dir, img_size=128, nc=3)
    names = sorted(Path(f).name for f in ds.im_files)
    assert names == ["im3.png", "im5.png", "im6.png", "im7.png", "nolabel.png"]
    warnings = [r.getMessage() for r in log_records if r.levelno >= logging.WARNING]
    skipped = [m for m in warnings if "corrupt image/label pairs" in m]
    assert len(skipped) == 1
    for bad, reason in [
        ("truncated.jpg", "truncated"),
        ("not_image.jpg", "decode"),
        ("tiny.png", "smaller"),
        ("im0.png", "4 columns"),
        ("im1.png", "outside 0..1"),
        ("im2.png", "non-finite"),
    ]:
        line = next((ln for ln in skipped[0].splitlines() if bad in ln), "")
        assert reason in line, (bad, skipped[0])
    assert "skipped 6" in skipped[0]
    assert any("duplicate" in m for m in warnings)
    im3 = ds.labels[names.index("im3.png")]
    assert im3.shape == (2, 5)
    assert len(ds.labels[names.index("nolabel.png")]) == 0
    # a second load from the cache reports the same
    log_records.clear()
    ds2 = LoadImagesAndLabels(im_dir, img_size=128, nc=3)
    assert ds2.im_files == ds.im_files
    assert any("cache loaded" in r.getMessage() for r in log_records)
    assert sum("corrupt image/label pairs" in r.getMessage() for r in log_records) == 1


def test_class_id_out_of_range_raises(dataset_dir: Path):
    label = dataset_dir.parents[1] / "labels" / "train" / "im5.txt"
    label.write_text("7 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ValueError, match=r"class ids \[7\].*nc=3") as err:
        LoadImagesAndLabels(dataset_dir, nc=3)
    assert str(label) in str(err.value)
    ds = LoadImagesAndLabels(dataset_dir, nc=3, single_cls=True)  # single-class training ignores ids
    assert all((lb[:, 0] == 0).all() for lb in ds.labels)
    label.write_text("-1 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ValueError, match="class ids"):
        LoadImagesAndLabels(dataset_dir)


def test_cache_is_plain_npz_and_invalidated_by_changes(dataset_dir: Path, log_records):
    ds = LoadImagesAndLabels(dataset_dir, nc=3)
    cache = dataset_dir.parents[1] / "labels" / "train.cache"
    with np.load(cache, allow_pickle=False) as z:  # readable without pickle
        assert len(z["im_files"]) == len(SIZES)
    label = Path(ds.label_files[0])
    label.write_text("2 0.5 0.5 0.5 0.25\n")
    log_records.clear()
    ds2 = LoadImagesAndLabels(dataset_dir, nc=3)
    assert any("cache saved" in r.getMessage() for r in log_records)
    np.testing.assert_allclose(ds2.labels[0], [[2, 0.5, 0.5, 0.5, 0.25]])
    cache.write_bytes(b"garbage")  # unreadable caches are rebuilt, never trusted
    ds3 = LoadImagesAndLabels(dataset_dir, nc=3)
    np.testing.assert_allclose(ds3.labels[0], ds2.labels[0])


def test_all_bad_split_raises(tmp_path: Path):
    im_dir = tmp_path / "images"
    im_dir.mkdir()
    (im_dir / "a.jpg").write_text("nope")
    with pytest.raises(ValueError, match="no usable images"):
        LoadImagesAndLabels(im_dir)


@pytest.mark.parametrize("cache", ["ram", "disk"])
def test_image_cache_gives_same_samples(dataset_dir: Path, cache: str):
    plain = LoadImagesAndLabels(dataset_dir, img_size=128)
    cached = LoadImagesAndLabels(dataset_dir, img_size=128, cache_images=cache)
    for i in range(plain.n):
        torch.testing.assert_close(plain[i][0], cached[i][0])
    if cache == "disk":
        assert len(list(dataset_dir.glob("*.npy"))) == len(SIZES)


def _batches(loader, epochs: int = 2) -> list[torch.Tensor]:
    return [torch.cat([ims.flatten().float(), t.flatten()]) for _ in range(epochs) for ims, t, _, _ in loader]


def test_seeded_loading_is_reproducible(dataset_dir: Path):
    kw = {"hyp": {**AUG_HYP, "hsv_v": 0.4}, "augment": True, "shuffle": True}
    a = _batches(create_dataloader(dataset_dir, 96, 4, 32, workers=0, seed=3, **kw)[0])
    b = _batches(create_dataloader(dataset_dir, 96, 4, 32, workers=0, seed=3, **kw)[0])
    c = _batches(create_dataloader(dataset_dir, 96, 4, 32, workers=0, seed=4, **kw)[0])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    w1 = _batches(create_dataloader(dataset_dir, 96, 4, 32, workers=2, seed=3, **kw)[0])
    w2 = _batches(create_dataloader(dataset_dir, 96, 4, 32, workers=2, seed=3, **kw)[0])
    assert all(torch.equal(x, y) for x, y in zip(w1, w2, strict=True))


def test_image_weight_indices_are_used_by_the_sampler(dataset_dir: Path):
    loader, ds = create_dataloader(dataset_dir, 64, 8, 32, workers=0, image_weights=True)
    ds.indices = [5] * ds.n
    _, _, paths, _ = next(iter(loader))
    assert set(paths) == {ds.im_files[5]}


def test_quad_collate(dataset_dir: Path):
    loader, _ = create_dataloader(dataset_dir, 64, 8, 32, workers=0, quad=True)
    torch.manual_seed(0)
    for ims, targets, paths, _ in loader:
        assert ims.shape == (2, 3, 128, 128) and ims.dtype == torch.uint8 and len(paths) == 2
        assert_targets_on_pixels(ims, targets, tol=3.0)
