"""Short CPU training runs on a tiny generated dataset: outputs, resume after a kill, bad data."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from tests.conftest import make_tiny_checkpoint
from utils.checkpoints import load_checkpoint
from utils.optim import epochs_within_budget, warmup_iterations
from utils.torch_utils import cpu_bf16_supported

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "hyp, batches, expected",
    [({"warmup_epochs": 3.0}, 10, 100), ({"warmup_epochs": 3.0}, 50, 150), ({"warmup_epochs": 0.0}, 50, 0),
     ({"warmup_epochs": 0.5, "warmup_min_iters": 10}, 38, 19),
     ({"warmup_epochs": 0.1, "warmup_min_iters": 10}, 38, 10)],
)  # fmt: skip
def test_warmup_lasts_epochs_but_at_least_the_minimum(hyp, batches, expected):
    assert warmup_iterations(hyp, batches) == expected


@pytest.mark.parametrize(
    "epoch, elapsed, train_s, val_s, expected",
    [(0, 70, 60, 0, 9),  # 10 min budget, first epoch 60 s + 10 s start-up: 530 s hold 8 more
     (3, 280, 60, 10, 8),  # 600 - 280 - 10 (this epoch's val) = 310 s left: 4 epochs of 70 s
     (5, 590, 60, 10, 6)],  # over budget: the current epoch is the last
)  # fmt: skip
def test_time_budget_plans_whole_epochs_that_fit(epoch, elapsed, train_s, val_s, expected):
    assert epochs_within_budget(epoch, 600, elapsed, train_s, val_s) == expected


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    subprocess.run(
        [sys.executable, "data/scripts/make_shapes.py", "--out", str(root), "--train", "24", "--val", "8",
         "--video-frames", "0"],
        cwd=ROOT, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    data = root / "tiny.yaml"
    names = "\n".join(
        f"  {i}: {n}" for i, n in enumerate(["circle", "square", "triangle", "star", "hexagon", "cross"])
    )
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return data


def _train_cmd(data: Path, project: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "--data", str(data), "--cfg", "yolov5n.yaml", "--img", "64",
            "--batch-size", "8", "--workers", "0", "--project", str(project), "--name", "exp", *extra]  # fmt: skip


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def test_short_training_run_writes_weights_and_results(tiny_data, tmp_path):
    out = subprocess.run(_train_cmd(tiny_data, tmp_path, "--epochs", "2"), cwd=ROOT, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    amp = "AMP: bfloat16 autocast" if cpu_bf16_supported() else "AMP: off, fp32: no faster precision on cpu"
    assert amp in out.stdout + out.stderr  # mixed precision by default where the CPU has native bf16
    assert "\x1b[34m\x1b[1mtrain: \x1b[0mweights=" in out.stdout + out.stderr  # options line, coloured once
    run = tmp_path / "exp"
    for name in ("weights/last.pt", "weights/best.pt", "results.csv", "results.png", "hyp.yaml", "opt.yaml",
                 "labels.jpg", "train_batch0.jpg", "confusion_matrix.png", "PR_curve.png"):  # fmt: skip
        assert (run / name).is_file(), f"missing {name}"
    rows = _rows(run / "results.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert list(rows[0])[:8] == ["epoch", "train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision",
                                 "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95"]  # fmt: skip
    assert all(float(r["train/box_loss"]) > 0 for r in rows)
    ckpt = torch.load(run / "weights/last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["names"][0] == "circle" and ckpt["model_yaml"]["nc"] == 6
    assert ckpt["optimizer"] is None and ckpt["ema"] is None  # finished runs keep the EMA weights only


def test_time_budget_overrides_epochs(tiny_data, tmp_path):
    out = subprocess.run(_train_cmd(tiny_data, tmp_path, "--epochs", "5", "--time", "1e-6", "--noplots", "--no-amp"),
                         cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "training for 1 epoch in all" in out.stdout + out.stderr
    assert "AMP: off (--no-amp), fp32" in out.stdout + out.stderr
    assert "0/?" in out.stdout + out.stderr and "0/4" not in out.stdout + out.stderr  # planned after epoch 0
    run = tmp_path / "exp"
    assert [r["epoch"] for r in _rows(run / "results.csv")] == ["0"]
    ckpt = load_checkpoint(run / "weights/last.pt")
    assert ckpt["epoch"] == 0 and ckpt["train_args"]["epochs"] == 1 and ckpt["optimizer"] is None


def test_resume_after_kill_continues_from_saved_epoch(tiny_data, tmp_path):
    proc = subprocess.Popen(_train_cmd(tiny_data, tmp_path, "--epochs", "4"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    last = tmp_path / "exp" / "weights" / "last.pt"
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if last.exists() and load_checkpoint(last)["epoch"] >= 0:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "training finished before it could be killed; make it longer"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    saved_epoch = load_checkpoint(last)["epoch"]
    assert saved_epoch < 3
    out = subprocess.run([sys.executable, "train.py", "--resume", str(last), "--workers", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"at epoch {saved_epoch + 1} of 4" in out.stdout + out.stderr
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 3
    epochs = [int(r["epoch"]) for r in _rows(tmp_path / "exp" / "results.csv")]
    assert epochs[-1] == 3 and epochs[-(3 - saved_epoch) :] == list(range(saved_epoch + 1, 4))


@pytest.mark.parametrize("group", [False, True], ids=["process", "process-group"])
def test_sigterm_stops_like_ctrl_c_and_keeps_the_checkpoint(tiny_data, tmp_path, group):
    """`kill PID` (or a scheduler signalling the whole group, loader workers included) ends the run
    with one line and exit status 143; the saved checkpoint still loads and resumes."""
    proc = subprocess.Popen(_train_cmd(tiny_data, tmp_path, "--epochs", "50", "--workers", "2"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    last = tmp_path / "exp" / "weights" / "last.pt"
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None and not last.exists():
            time.sleep(0.2)
        assert proc.poll() is None, "training finished before it could be stopped; make it longer"
        time.sleep(1.0)  # into the next epoch, its loader workers running
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, output[-3000:]
    assert "Terminated (SIGTERM): the last saved checkpoint is intact; continue with --resume" in output
    assert "Traceback" not in output, output[-3000:]
    assert load_checkpoint(last)["epoch"] >= 0


def test_label_class_out_of_range_stops_before_training(tiny_data, tmp_path):
    root = tiny_data.parent
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\nnames: [a, b]\n"
    )  # nc=2, labels go to 5
    out = subprocess.run(_train_cmd(bad, tmp_path, "--epochs", "1"), cwd=ROOT, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "nc" in text and "Traceback" not in text
    assert not list(tmp_path.glob("exp*/weights/*.pt"))


def test_resume_keeps_the_epochs_a_time_budget_planned(tmp_path):
    last = make_tiny_checkpoint(tmp_path / "exp" / "weights" / "last.pt", epoch=2,
                                train_args={"epochs": 7, "time": 0.1, "data": "d.yaml"})  # fmt: skip
    opt = train.resolve_resume(train.parse_opt(["--resume", str(last)]))
    assert opt.resume is True and opt.epochs == 7 and opt.time is None


def test_resuming_a_finished_run_says_so_before_building_anything(tmp_path):
    """The dataset of the finished run is gone: the message must come before anything looks for it."""
    last = make_tiny_checkpoint(tmp_path / "exp" / "weights" / "last.pt", epoch=6,
                                train_args={"epochs": 7, "data": str(tmp_path / "gone.yaml")})  # fmt: skip
    with pytest.raises(ValueError, match=r"finished 7 epochs already; nothing to resume.*--weights"):
        train.resolve_resume(train.parse_opt(["--resume", str(last)]))


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_optimizer_is_fused_where_torch_can_and_steps_like_the_per_tensor_loop(monkeypatch, name):
    """build_optimizer asks for torch's fused kernel when it has one; the update is the same."""
    import copy

    from models.yolo import DetectionModel
    from utils import optim

    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=2, verbose=False)
    looped_model = copy.deepcopy(model)
    fused = optim.build_optimizer(model, name, lr=0.01, momentum=0.9, decay=5e-4)
    assert fused.defaults.get("fused", False) == optim.fused_supported(type(fused), torch.device("cpu"))
    monkeypatch.setattr(optim, "fused_supported", lambda cls, device: False)
    looped = optim.build_optimizer(looped_model, name, lr=0.01, momentum=0.9, decay=5e-4)
    assert not looped.defaults.get("fused", False)
    assert [len(g["params"]) for g in fused.param_groups] == [len(g["params"]) for g in looped.param_groups]
    start = copy.deepcopy(model)
    for _ in range(3):
        for m, opt in ((model, fused), (looped_model, looped)):
            torch.manual_seed(1)
            for p in m.parameters():
                p.grad = torch.randn_like(p) * 0.1
            opt.step()
    pairs = list(zip(model.parameters(), looped_model.parameters()))
    assert max((a - b).abs().max().item() for a, b in pairs) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(model.parameters(), start.parameters())) > 1e-3
