"""The evaluation engine and val.py: exact metrics for known predictions, agreement with pycocotools,
and val.py end to end on a tiny generated dataset and an untrained yolov5n checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import val
from models.yolo import DetectionModel
from utils.checkpoints import build_checkpoint, save_checkpoint
from utils.coco_eval import dataset_to_coco, score_with_pycocotools
from utils.dataloaders import create_dataloader
from utils.evaluator import HEADER, EvalResult, evaluate
from utils.general import LOGGER
from utils.loss import ComputeLoss

ROOT = Path(__file__).resolve().parents[1]
NAMES = {0: "red", 1: "blue"}
COLORS_BGR = {0: (40, 40, 230), 1: (230, 60, 40)}
HYP = {"box": 0.05, "cls": 0.5, "cls_pw": 1.0, "obj": 1.0, "obj_pw": 1.0, "anchor_t": 4.0, "fl_gamma": 0.0}
CURVES = ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png", "confusion_matrix.png")


def _write_image(root: Path, stem: str, rng: np.random.Generator) -> None:
    """One 64..128 px image with 2-6 filled rectangles of two colours and its YOLO label file."""
    w, h = (int(v) for v in rng.integers(64, 129, size=2))
    im = np.full((h, w, 3), 110, np.uint8)
    rows = []
    for _ in range(int(rng.integers(2, 7))):
        c = int(rng.integers(0, 2))
        bw, bh = int(rng.integers(10, w // 2)), int(rng.integers(10, h // 2))
        x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        cv2.rectangle(im, (x1, y1), (x1 + bw - 1, y1 + bh - 1), COLORS_BGR[c], -1)
        rows.append(f"{c} {(x1 + bw / 2) / w:.6f} {(y1 + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
    cv2.imwrite(str(root / "images" / f"{stem}.png"), im)
    (root / "labels" / f"{stem}.txt").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def dataset_yaml(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        _write_image(root, f"{i:06d}" if i % 3 else f"img_{i}", rng)  # numeric and non-numeric stems
    yaml_file = root / "tiny.yaml"
    yaml_file.write_text(f"path: {root}\ntrain: images\nval: images\nnames:\n  0: red\n  1: blue\n")
    return yaml_file


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=2, verbose=False)
    model.names = dict(NAMES)
    path = tmp_path_factory.mktemp("weights") / "tiny_n.pt"
    save_checkpoint(build_checkpoint(model), path)
    return path


def _loader(yaml_file: Path, imgsz: int = 128, batch_size: int = 4):
    return create_dataloader(
        str(yaml_file.parent / "images"), imgsz, batch_size, 32, rect=True, pad=0.5, workers=0
    )


class ReplayModel:
    """Fake detector: for the n-th call it returns predictions made from the n-th batch's labels.

    ``make(labels_px (m, 5) [cls, xc, yc, w, h], rng) -> (k, 6) [xc, yc, w, h, conf, cls]`` per image; the
    output is (bs, k_max, 5 + nc) with objectness 1 and the class score = conf, as a real head gives.
    """

    def __init__(self, batches, make, nc: int = 2, seed: int = 0):
        self.targets = [b[1] for b in batches]
        self.make, self.nc, self.calls = make, nc, 0
        self.rng = np.random.default_rng(seed)

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        targets = self.targets[self.calls].clone()
        self.calls += 1
        bs, _, h, w = im.shape
        targets[:, 2:] *= torch.tensor([w, h, w, h])
        rows = [self.make(targets[targets[:, 0] == i, 1:], self.rng) for i in range(bs)]
        pred = torch.zeros(bs, max(1, *(len(r) for r in rows)), 5 + self.nc)
        for i, r in enumerate(rows):
            pred[i, : len(r), :4] = r[:, :4]
            pred[i, : len(r), 4] = 1.0
            pred[i, torch.arange(len(r)), 5 + r[:, 5].long()] = r[:, 4]
        return pred


def _exact(labels: torch.Tensor, rng) -> torch.Tensor:
    conf = torch.full((len(labels), 1), 0.9)
    return torch.cat((labels[:, 1:5], conf, labels[:, :1]), 1)


def _noisy(labels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Jittered copies of the labels (some missed or mislabelled) plus false positives, varied confidences."""
    out = []
    for cls, xc, yc, w, h in labels.tolist():
        if rng.random() < 0.15:
            continue  # missed
        dx, dy = rng.normal(0, 0.05, 2) * (w, h)
        sw, sh = np.exp(rng.normal(0, 0.08, 2))
        c = 1 - cls if rng.random() < 0.1 else cls
        out.append([xc + dx, yc + dy, w * sw, h * sh, rng.uniform(0.2, 1.0), c])
    for _ in range(int(rng.integers(0, 8))):
        size = rng.uniform(8, 50, 2)
        out.append([*rng.uniform(10, 118, 2), *size, rng.uniform(0.01, 0.9), int(rng.integers(0, 2))])
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 6)


def test_perfect_detector_scores_one(dataset_yaml, tmp_path):
    loader, dataset = _loader(dataset_yaml)
    batches = list(loader)
    result = evaluate(
        ReplayModel(batches, _exact), batches, NAMES, save_dir=tmp_path, save_json=True, plots=False
    )
    assert isinstance(result, EvalResult)
    assert (result.mp, result.mr, result.map50, result.map) == pytest.approx((1.0, 1.0, 1.0, 1.0), abs=1e-6)
    assert result.seen == 12 and result.instances == sum(len(lb) for lb in dataset.labels)
    assert result.maps == pytest.approx([1.0, 1.0])
    assert [row.name for row in result.class_rows] == ["red", "blue"]
    matrix = result.confusion.matrix
    assert matrix[:2, :2].trace() == result.instances and matrix.sum() == result.instances
    assert result.as_tuple() == pytest.approx((1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0), abs=1e-6)
    if _has_pycocotools():
        gt = dataset_to_coco(dataset, NAMES)  # independent path: labels -> original pixels directly
        assert score_with_pycocotools(gt, result.json_path, verbose=False) == pytest.approx(
            (1.0, 1.0), abs=1e-6
        )


def _has_pycocotools() -> bool:
    try:
        import pycocotools.cocoeval  # noqa: F401
    except ImportError:
        return False
    return True


def _one_image_batch(targets: torch.Tensor):
    """A single 64x64 image whose letterbox is the identity (gain 1, no padding)."""
    shapes = (((64, 64), ((1.0, 1.0), (0.0, 0.0))),)
    return [(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), targets, ("a/7.jpg",), shapes)]


def test_half_wrong_case_by_hand(tmp_path):
    # Pixel labels on a 64x64 image: class 0 boxes 4..36 and 40..60, class 1 box 6..14 x 50..58.
    targets = torch.tensor([[0, 0, 20, 20, 32, 32], [0, 0, 50, 50, 20, 20], [0, 1, 10, 54, 8, 8]]) / 64
    targets[:, :2] *= 64
    rows = torch.tensor([[20, 20, 32, 32, 0.9, 0],  # exact hit on the first class-0 box
                         [50, 12, 8, 8, 0.8, 0],  # class-0 false positive, far from every label
                         [54, 50, 20, 20, 0.7, 0],  # second box shifted 4 px: IoU 16/24 = 0.667
                         # class-1 false positive below; the class-1 label is missed
                         [30, 56, 6, 6, 0.6, 1]])  # fmt: skip
    model = ReplayModel(_one_image_batch(targets), lambda labels, rng: rows)
    result = evaluate(model, _one_image_batch(targets), NAMES, save_dir=tmp_path, plots=True)
    # Class 0 by confidence: TP, FP, TP (the last only at IoU thresholds < 0.667).
    # Recall 0.5, 0.5, 1 and precision 1, 1/2, 2/3.
    ap50 = (51 * 1.0 + 50 * 2 / 3) / 101  # precision envelope at the 101 recall points
    ap_high = 51 / 101  # thresholds 0.70..0.95: only the exact hit counts
    ap0 = (4 * ap50 + 6 * ap_high) / 10  # 0.50, 0.55, 0.60, 0.65 see both hits
    assert result.class_rows[0].map50 == pytest.approx(ap50, abs=1e-6)
    assert result.class_rows[0].map == pytest.approx(ap0, abs=1e-6)
    assert result.class_rows[1].map50 == 0.0 and result.class_rows[1].map == 0.0
    assert result.map50 == pytest.approx(ap50 / 2, abs=1e-6) and result.map == pytest.approx(
        ap0 / 2, abs=1e-6
    )
    assert result.maps == pytest.approx([ap0, 0.0], abs=1e-6)
    # P and R at the confidence of best mean F1 (any threshold below 0.7): red 2/3 and 1, blue 0 and 0.
    assert (result.class_rows[0].p, result.class_rows[0].r) == pytest.approx((2 / 3, 1.0), abs=1e-3)
    assert (result.mp, result.mr) == pytest.approx((1 / 3, 0.5), abs=1e-3)
    assert (result.class_rows[0].instances, result.class_rows[1].instances) == (2, 1)
    cm = result.confusion.matrix  # conf > 0.25 and IoU > 0.45: two class-0 hits, one miss, two background FPs
    assert cm[0, 0] == 2 and cm[2, 1] == 1 and cm[0, 2] == 1 and cm[1, 2] == 1
    for name in CURVES:
        assert (tmp_path / name).stat().st_size > 10_000


def test_noisy_detections_agree_with_pycocotools(dataset_yaml, tmp_path, project_log):
    if not _has_pycocotools():
        pytest.skip("pycocotools not installed")
    loader, dataset = _loader(dataset_yaml)
    batches = list(loader)
    gt = dataset_to_coco(dataset, NAMES)
    for seed in range(4):
        model = ReplayModel(batches, _noisy, seed=seed)
        result = evaluate(
            model,
            batches,
            NAMES,
            save_dir=tmp_path,
            save_json=True,
            plots=False,
            json_file=tmp_path / f"seed{seed}.json",
        )
        dets = json.loads(result.json_path.read_text())
        assert dets and max(np.unique([d["image_id"] for d in dets], return_counts=True)[1]) <= 100
        coco_map, coco_map50 = score_with_pycocotools(gt, dets, verbose=False)
        ours = f"ours {result.map50:.4f} {result.map:.4f}"
        LOGGER.info(f"seed {seed} mAP50 mAP50-95: {ours}, pycocotools {coco_map50:.4f} {coco_map:.4f}")
        assert 0.2 < result.map < 0.95  # a meaningful, imperfect case
        assert result.map50 == pytest.approx(coco_map50, abs=0.01)
        assert result.map == pytest.approx(coco_map, abs=0.01)


def test_detection_model_val_losses(dataset_yaml, checkpoint):
    from utils.checkpoints import model_from_checkpoint

    model = model_from_checkpoint(checkpoint)
    model.train()  # evaluate() must switch to eval for the run and restore the mode after
    loader, _ = _loader(dataset_yaml, imgsz=64, batch_size=6)
    result = evaluate(model, loader, NAMES, compute_loss=ComputeLoss(model, HYP, imgsz=64), plots=False)
    assert model.training
    assert result.losses.shape == (3,) and (result.losses[:2] > 0).all()
    assert len(result.as_tuple()) == 7 and result.seen == 12
    assert all(t >= 0 for t in result.speed_ms)


def test_val_script_end_to_end(dataset_yaml, checkpoint, tmp_path):
    args = (f"--data {dataset_yaml} --weights {checkpoint} --imgsz 128 --batch-size 4 --workers 0 --device cpu "
            f"--project {tmp_path} --name exp --save-json --save-txt --save-conf --max-det 100")  # fmt: skip
    cmd = [sys.executable, str(ROOT / "val.py"), *args.split()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert HEADER.strip() in out
    assert any(line.split()[:3] == ["all", "12", str(_instances(dataset_yaml))] for line in out.splitlines())
    assert any(line.split()[:1] == ["red"] for line in out.splitlines())  # nc < 50: per-class rows
    save_dir = tmp_path / "exp"
    for name in (*CURVES, "val_batch0_labels.jpg", "val_batch0_pred.jpg", "val_batch2_labels.jpg"):
        assert (save_dir / name).stat().st_size > 1000, name
        assert cv2.imread(str(save_dir / name)) is not None, name
    dets = json.loads((save_dir / "tiny_n_predictions.json").read_text())
    _assert_coco_results(dets, dataset_yaml)
    if _has_pycocotools():
        assert "pycocotools mAP50-95" in out
    rows = [line.split() for p in (save_dir / "labels").glob("*.txt") for line in p.read_text().splitlines()]
    assert rows and all(len(r) == 6 and 0 <= float(r[5]) <= 1 for r in rows)


def _instances(dataset_yaml: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (dataset_yaml.parent / "labels").glob("*.txt"))


def _assert_coco_results(dets: list, dataset_yaml: Path) -> None:
    """A COCO detection results list: image ids from stems, category ids 0..1, xywh boxes, scores 0..1."""
    stems = {p.stem for p in (dataset_yaml.parent / "images").glob("*.png")}
    ids = {int(s) if s.isnumeric() else s for s in stems}
    assert isinstance(dets, list) and dets
    per_image = {}
    for d in dets:
        assert set(d) == {"image_id", "category_id", "bbox", "score"}
        assert d["image_id"] in ids and d["category_id"] in (0, 1) and 0 <= d["score"] <= 1
        x, y, w, h = d["bbox"]
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0 and x + w <= 129 and y + h <= 129
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    assert max(per_image.values()) <= 100


def test_run_in_process_task_speed(dataset_yaml, checkpoint, tmp_path, project_log):
    result = val.run(data=dataset_yaml, weights=[checkpoint], imgsz=64, batch_size=6, workers=0, device="cpu",
                     task="speed", project=tmp_path, plots=False, conf_thres=0.25, iou_thres=0.45)  # fmt: skip
    assert isinstance(result, EvalResult) and result.seen == 12 and len(result.speed_ms) == 3
    speed = [line for line in project_log if line.startswith("Speed:")]
    assert len(speed) == 1
    for stage in ("ms pre-process", "ms inference", "ms NMS per image"):
        assert stage in speed[0]
    assert (tmp_path / "exp").is_dir() and not (tmp_path / "exp" / "PR_curve.png").exists()


def test_task_speed_from_the_command_line_says_which_thresholds_it_uses(dataset_yaml, checkpoint, tmp_path,
                                                                        project_log):  # fmt: skip
    argv = (f"--data {dataset_yaml} --weights {checkpoint} --img 64 --batch-size 6 --workers 0 --device cpu "
            f"--task speed --conf-thres 0.001 --project {tmp_path}").split()  # fmt: skip
    assert val.main(argv) == 0
    notes = [line for line in project_log if line.startswith("--task speed:")]
    assert len(notes) == 1 and "--conf-thres 0.25 --iou-thres 0.45" in notes[0]
    assert sum(line.startswith("Speed:") for line in project_log) == 1


def test_task_study_writes_table_and_plot(dataset_yaml, checkpoint, tmp_path, project_log):
    argv = (f"--data {dataset_yaml} --weights {checkpoint} --batch-size 6 --workers 0 --device cpu "
            f"--task study --study-sizes 64 96 --project {tmp_path}").split()  # fmt: skip
    assert val.main(argv) == 0
    table = np.loadtxt(tmp_path / "exp" / "study_tiny_tiny_n.txt", ndmin=2)
    assert table.shape == (2, 11) and table[:, 0].tolist() == [64, 96]
    assert cv2.imread(str(tmp_path / "exp" / "study.png")) is not None


def test_missing_files_give_one_line_errors(dataset_yaml, checkpoint, tmp_path, project_log):
    common = ["--workers", "0", "--device", "cpu", "--project", str(tmp_path)]
    assert val.main(["--data", str(dataset_yaml), "--weights", str(tmp_path / "nope.pt"), *common]) == 1
    assert val.main(["--data", str(tmp_path / "nope.yaml"), "--weights", str(checkpoint), *common]) == 1
    errors = [line for line in project_log if line.startswith("ERROR: ")]
    assert len(errors) == 2
    assert "nope.pt" in errors[0] and "not found" in errors[0]
    assert "nope.yaml" in errors[1] and "not found" in errors[1]
    with pytest.raises(ValueError, match="has no 'test' split"):
        val.run(data=dataset_yaml, weights=checkpoint, task="test", workers=0, device="cpu", project=tmp_path)


class OverflowingModel(ReplayModel):
    """A ReplayModel whose first answer for each batch is all inf, as an fp16 overflow gives."""

    def __init__(self, batches, fp16: bool):
        super().__init__(batches, _exact)
        self.fp16, self.overflowed = fp16, set()

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        if self.fp16 or self.calls not in self.overflowed:
            self.overflowed.add(self.calls)
            return torch.full((im.shape[0], 1, 5 + self.nc), float("inf"))
        return super().__call__(im)


@pytest.mark.parametrize("fp16_weights", [False, True])
def test_half_overflow_is_rerun_in_fp32_or_reported(dataset_yaml, monkeypatch, project_log, fp16_weights):
    """--half outputs with inf or nan (fp16 overflow): batches of an fp32 model under autocast (validation during
    training) are evaluated again in fp32; with fp16 weights (val.py --half) the run says they are wrong."""
    from utils import evaluator

    options = evaluator._Options
    monkeypatch.setattr(evaluator, "_Options", lambda **kw: options(**{**kw, "half_dtype": torch.bfloat16}))
    loader, _ = _loader(dataset_yaml)
    batches = list(loader)
    model = OverflowingModel(batches, fp16=fp16_weights)
    result = evaluate(model, batches, NAMES, plots=False)
    warning = [line for line in project_log if "overflowed (inf or nan" in line]
    assert len(warning) == 1 and f"in {len(batches)} of {len(batches)} batches" in warning[0]
    if fp16_weights:
        assert "evaluate without --half" in warning[0] and result.map50 == 0.0
    else:
        assert "evaluated again in fp32" in warning[0]
        assert (result.map50, result.map) == pytest.approx((1.0, 1.0), abs=1e-6)


def test_fixed_size_exports_warn_alike_in_val_and_detect(project_log):
    """Both scripts name the export and the size they switch to, in the same words."""
    from types import SimpleNamespace

    import detect

    fixed = SimpleNamespace(
        imgsz=(128, 128), weights=Path("w/best.onnx"), stride=32, dynamic=False, batch_size=1
    )
    assert val._input_size(fixed, 320, 4) == (128, 1)
    assert detect._model_size(fixed, [320, 320]) == [128, 128]
    wide = SimpleNamespace(**{**vars(fixed), "imgsz": (128, 192)})
    assert detect._model_size(wide, [320, 320]) == [128, 192]
    warnings = [line for line in project_log if line.startswith("WARNING: best.onnx takes")]
    assert warnings == ["WARNING: best.onnx takes 128x128 inputs only; using --imgsz 128"] * 2 + [
        "WARNING: best.onnx takes 128x192 inputs only; using --imgsz 128 192"
    ]
