"""Every plot writes a readable, non-empty file, for normal and for empty inputs."""

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from utils.metrics import ap_per_class
from utils.plots import (
    Annotator,
    Colors,
    colors,
    output_to_target,
    plot_confusion_matrix,
    plot_images,
    plot_labels,
    plot_mc_curve,
    plot_pr_curve,
    plot_results,
    save_one_box,
)

NAMES = {0: "person", 1: "car", 2: "dog"}
RESULT_HEADER = (
    "epoch,train/box_loss,train/obj_loss,train/cls_loss,metrics/precision,metrics/recall,metrics/mAP_0.5,"
    "metrics/mAP_0.5:0.95,val/box_loss,val/obj_loss,val/cls_loss,x/lr0,x/lr1,x/lr2"
)


def _assert_image_file(path, min_size=(50, 50)):
    assert path.is_file() and path.stat().st_size > 0
    im = cv2.imread(str(path))
    assert im is not None, f"{path} is not a readable image"
    assert im.shape[0] >= min_size[0] and im.shape[1] >= min_size[1]
    return im


def test_import_has_no_plotting_side_effects():
    code = "import sys, utils.plots; assert 'matplotlib.pyplot' not in sys.modules and 'seaborn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_colors_palette():
    palette = Colors()
    assert palette.n == 20 and len(set(palette.palette)) == 20
    assert colors(3) == colors(3 + colors.n)
    r, g, b = colors(5)
    assert colors(5, bgr=True) == (b, g, r)
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in colors(7))


def test_annotator_draws_box_label_and_text():
    im = np.zeros((100, 120, 3), dtype=np.uint8)
    annotator = Annotator(im)
    annotator.box_label([10, 30, 60, 80], "car 0.9", color=(0, 255, 0))
    annotator.box_label([0, 0, 20, 20], "top", color=(255, 0, 0))  # no room above: label inside
    annotator.text((70, 5), "hi", outline=(0, 0, 0))
    out = annotator.result()
    assert out is im  # contiguous input is drawn in place
    assert out[55, 10, 1] == 255  # left edge of the green box
    assert out[25, 12:40].any()  # label tag above the box
    assert out[:20, 70:].any()


@pytest.mark.parametrize("empty", [False, True])
def test_curves_and_confusion_matrix(tmp_path, empty):
    rng = np.random.default_rng(0)
    n = 0 if empty else 60
    tp = rng.random((n, 10)) < 0.6
    result = ap_per_class(tp, rng.random(n), rng.integers(0, 3, n), rng.integers(0, 3, 0 if empty else 40))
    names = [NAMES[int(c)] for c in result.ap_class]
    files = [
        plot_pr_curve(result.px, result.prec_values, result.ap, tmp_path / "PR_curve.png", names),
        plot_mc_curve(result.px, result.f1_curve, tmp_path / "F1_curve.png", names, ylabel="F1"),
        plot_mc_curve(result.px, result.p_curve, tmp_path / "P_curve.png", names, ylabel="Precision"),
    ]
    matrix = np.zeros((4, 4)) if empty else rng.integers(0, 9, (4, 4)).astype(float)
    files.append(plot_confusion_matrix(matrix, NAMES, tmp_path / "confusion_matrix.png"))
    files.append(plot_confusion_matrix(matrix, NAMES, tmp_path / "cm_counts.png", normalize=False))
    for path in files:
        _assert_image_file(path)


@pytest.mark.parametrize("n", [0, 200])
def test_plot_labels(tmp_path, n):
    rng = np.random.default_rng(1)
    labels = np.c_[rng.integers(0, 3, n), rng.uniform(0.1, 0.9, (n, 2)), rng.uniform(0.01, 0.3, (n, 2))]
    path = plot_labels(labels, NAMES, tmp_path)
    assert path == tmp_path / "labels.jpg"
    _assert_image_file(path)


def test_plot_images_labels_predictions_and_empty(tmp_path):
    images = torch.randint(0, 255, (5, 3, 64, 96), dtype=torch.uint8)
    labels = torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.4], [3, 0, 0.2, 0.3, 0.2, 0.2]])
    im = _assert_image_file(
        plot_images(images, labels, [f"img{i}.jpg" for i in range(5)], tmp_path / "a.jpg")
    )
    assert im.shape == (2 * 64, 3 * 96, 3)  # 5 tiles: 3 per row, 2 rows
    preds = np.array([[0, 2, 40, 30, 20, 20, 0.9], [1, 1, 10, 10, 5, 5, 0.1]])
    _assert_image_file(plot_images(images.float() / 255, preds, None, tmp_path / "b.jpg", NAMES))
    _assert_image_file(plot_images(images, torch.zeros(0, 6), None, tmp_path / "c.jpg"))
    _assert_image_file(
        plot_images(torch.zeros(0, 3, 64, 64), np.zeros((0, 6)), None, tmp_path / "d.jpg"), (1, 1)
    )


def test_plot_images_downscales_large_mosaics(tmp_path):
    images = torch.zeros(4, 3, 640, 640, dtype=torch.uint8)
    labels = torch.tensor([[2, 0, 0.5, 0.5, 0.2, 0.2]])
    im = _assert_image_file(plot_images(images, labels, None, tmp_path / "big.jpg", max_size=640))
    assert im.shape[:2] == (640, 640)
    # The label box of image 2 (bottom-left tile, 320 px) sits around pixel (160, 480).
    assert im[480 - 32 : 480 + 33, 160 - 40 : 160 + 40].max() > 100


def test_output_to_target():
    out = [torch.tensor([[0.0, 0.0, 10.0, 20.0, 0.9, 2.0]]), torch.zeros(0, 6)]
    target = output_to_target(out)
    np.testing.assert_allclose(target, [[0, 2, 5, 10, 10, 20, 0.9]], rtol=1e-6)
    assert output_to_target([]).shape == (0, 7)


def test_save_one_box(tmp_path):
    im = np.zeros((100, 100, 3), dtype=np.uint8)
    crop = save_one_box([20, 30, 40, 50], im, tmp_path / "crops" / "car" / "a.jpg", gain=1.0, pad=0)
    assert crop.shape == (20, 20, 3)
    assert (tmp_path / "crops" / "car" / "a.jpg").is_file()
    assert save_one_box([90, 90, 120, 95], im, gain=1.0, pad=0, save=False).shape[1] == 10  # clipped


def test_plot_results(tmp_path):
    rows = [RESULT_HEADER]
    for epoch in range(12):
        rows.append(
            ",".join([str(epoch)] + [f"{0.1 * np.exp(-epoch / 5) + 0.01 * k:.5f}" for k in range(13)])
        )
    csv = tmp_path / "results.csv"
    csv.write_text("\n".join(rows) + "\n")
    path = plot_results(csv)
    assert path == tmp_path / "results.png"
    _assert_image_file(path)


@pytest.mark.parametrize(
    "content", ["", RESULT_HEADER + "\n", RESULT_HEADER + "\n0," + ",".join(["0.1"] * 13)]
)
def test_plot_results_empty_or_short(tmp_path, content):
    (tmp_path / "results.csv").write_text(content)
    _assert_image_file(plot_results(tmp_path))  # a run folder works too


def test_plot_results_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.csv"):
        plot_results(tmp_path / "results.csv")
