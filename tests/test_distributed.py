"""DDP training on the CPU (Gloo): 2 processes match 1 process, rank 0 alone writes, failures end the job.

The multi-process tests launch ``python -m torch.distributed.run --standalone --nproc_per_node 2`` on a
tiny generated dataset (8 images of 64 x 64 pixels, yolov5n), running tests/distributed_worker.py or
train.py; each has a timeout so that a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from models.yolo import DetectionModel
from utils.checkpoints import load_checkpoint, save_checkpoint
from utils.distributed import (
    GlobalMeanLoss,
    check_ddp_options,
    ddp_device,
    global_mean_scales,
    local_main_first,
    sigterm_as_exit,
)
from utils.general import ROOT, yaml_load
from utils.loss import ComputeLoss

WORKER = ROOT / "tests" / "distributed_worker.py"
BOXES_PER_IMAGE = (1, 4, 2, 3, 1, 1, 3, 2)  # uneven, so ranks hold different numbers of targets
NO_AUGMENT = {k: 0.0 for k in ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear",
                               "perspective", "flipud", "fliplr", "mosaic", "mixup")}  # fmt: skip


# ----------------------------------------------------------------------------------------------- fixtures
def make_dataset(root: Path) -> Path:
    """8 images with 1..4 coloured rectangles each (2 classes); returns the data YAML."""
    rng = np.random.default_rng(0)
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for i, n in enumerate(BOXES_PER_IMAGE):
        im = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        rows = []
        for j in range(n):
            w, h = (int(v) for v in rng.integers(12, 30, 2))
            x, y = (int(v) for v in rng.integers(0, 64 - 30, 2))
            cls = j % 2
            cv2.rectangle(im, (x, y), (x + w, y + h), (40, 200, 240) if cls else (240, 120, 40), -1)
            rows.append(f"{cls} {(x + w / 2) / 64:.6f} {(y + h / 2) / 64:.6f} {w / 64:.6f} {h / 64:.6f}")
        cv2.imwrite(str(root / "images" / "train" / f"im{i}.png"), im)
        (root / "labels" / "train" / f"im{i}.txt").write_text("\n".join(rows) + "\n")
    data = {"path": str(root), "train": "images/train", "val": "images/train", "names": {0: "a", 1: "b"}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(data))
    return root / "tiny.yaml"


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    """(data YAML, hyp YAML without augmentation) in tmp_path."""
    data = make_dataset(tmp_path / "data")
    hyp = {**yaml_load(ROOT / "data" / "hyps" / "hyp.scratch-low.yaml"), **NO_AUGMENT}
    (tmp_path / "hyp.yaml").write_text(yaml.safe_dump(hyp))
    return data, tmp_path / "hyp.yaml"


def train_args(data: Path, hyp: Path, project: Path, batch: int = 8) -> list[str]:
    """fp32 (--no-amp): the ranks' weights are compared to 1e-7, beyond what bf16 autocast keeps."""
    return ["--data", str(data), "--hyp", str(hyp), "--cfg", "yolov5n.yaml", "--weights", "", "--imgsz", "64",
            "--batch-size", str(batch), "--epochs", "1", "--device", "cpu", "--workers", "0", "--noautoanchor",
            "--project", str(project), "--seed", "0", "--no-amp"]  # fmt: skip


def torchrun(args: list[str], nproc: int | None = 2) -> list[str]:
    """Command running a script under torch.distributed.run with nproc processes (or plainly for None)."""
    if not nproc:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start cmd in its own process group (so the test can signal or kill every rank), output to log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> tuple[int | None, str]:
    """(return code, output) once proc exits. Returns (None, output) after a timeout, or when a process
    of the job outlived the launcher; what is left of the job is killed either way."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    if group_alive(proc.pid):
        code = None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return code, log.read_text(errors="replace")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def launch(args: list[str], log: Path, nproc: int | None = 2, timeout: float = 150) -> tuple[int | None, str]:
    return finish(start(torchrun(args, nproc), log), log, timeout)


def lines_of(output: str, rank: int) -> list[str]:
    return [ln for ln in output.splitlines() if f"[rank {rank}]" in ln]


# ------------------------------------------------------------------------------------------- fast, in-process
def test_global_mean_scales_by_hand():
    local = torch.tensor([3.0, 0.0, 1.0])
    total = torch.tensor([4.0, 0.0, 5.0])
    assert torch.allclose(
        global_mean_scales(local, total, 2), torch.tensor([1.5, 0.0, 0.4], dtype=torch.float64)
    )


@pytest.fixture
def one_thread():
    """Small CPU models run faster on one thread than on cores shared with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_split_batch_gradient_equals_full_batch(one_thread):
    """Two 'ranks' with uneven target counts: averaged gradients of loss * W equal the full-batch gradient."""
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=2).train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()  # batch statistics would differ between half and full batches
    hyp = yaml_load(ROOT / "data" / "hyps" / "hyp.scratch-low.yaml")
    imgs = torch.rand(4, 3, 64, 64)
    boxes = {0: 3, 1: 1, 2: 0, 3: 2}  # image -> number of targets; rank 0 gets images 0, 2 and rank 1 1, 3
    rows = [[i, k % 2, 0.2 + 0.15 * k, 0.5, 0.2 + 0.1 * k, 0.3] for i, n in boxes.items() for k in range(n)]
    targets = torch.tensor(rows)

    def grads(loss_fn, x, t, factor=1.0):
        model.zero_grad()
        (loss_fn(model(x), t)[0] * factor).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    full = grads(ComputeLoss(model, hyp, imgsz=64), imgs, targets)
    shards = []
    for images in ([0, 2], [1, 3]):
        t = targets[torch.isin(targets[:, 0], torch.tensor(images))].clone()
        t[:, 0] = torch.tensor([images.index(int(i)) for i in t[:, 0]], dtype=t.dtype)
        shards.append((imgs[images], t))
    plain = ComputeLoss(model, hyp, imgsz=64)
    counts = [
        torch.tensor([a.image.shape[0] for a in plain.assign_targets(model(x), t)], dtype=torch.float64)
        for x, t in shards
    ]
    total = counts[0] + counts[1]
    assert counts[0].sum() != counts[1].sum()
    ddp = sum(grads(GlobalMeanLoss(model, hyp, 64, world_size=2, sum_counts=lambda _: total), x, t, 2.0)
              for x, t in shards) / 2  # fmt: skip
    per_rank_means = sum(grads(plain, x, t, 2.0) for x, t in shards) / 2
    scale = full.abs().max()
    assert (ddp - full).abs().max() / scale < 1e-5
    assert (per_rank_means - full).abs().max() / scale > 1e-3  # what plain per-rank means would give


def test_check_ddp_options():
    opt = Namespace(batch_size=16, image_weights=False, evolve=None, sync_bn=False, device="0,1")
    check_ddp_options(opt, rank=0, world_size=4)
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        check_ddp_options(opt, rank=0, world_size=3)
    with pytest.raises(ValueError, match="--image-weights"):
        check_ddp_options(Namespace(**{**vars(opt), "image_weights": True}), rank=1, world_size=2)
    with pytest.raises(ValueError, match="--evolve"):
        check_ddp_options(Namespace(**{**vars(opt), "evolve": 300}), rank=0, world_size=2)
    check_ddp_options(Namespace(**{**vars(opt), "image_weights": True, "evolve": 10}), rank=-1, world_size=1)


def test_ddp_device_follows_device_list(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert ddp_device("2,3", 1) == torch.device("cuda", 3)
    assert ddp_device("", 1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="lists 1 GPU"):
        ddp_device("0", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="1 CUDA device"):
        ddp_device("", 1)


def test_single_process_helpers_are_no_ops():
    with local_main_first():  # no process group: no barrier
        pass
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e, sigterm_as_exit():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert e.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------------------- 2 processes (Gloo)
@pytest.mark.slow
def test_two_ranks_step_like_one_process_and_only_rank0_writes(tiny, tmp_path):
    data, hyp = tiny
    args = [str(WORKER), "step", str(tmp_path / "ddp"), *train_args(data, hyp, tmp_path / "runs"), "--fit"]
    code, out = launch(args, tmp_path / "ddp.log")
    assert code == 0, out[-4000:]
    args = [str(WORKER), "step", str(tmp_path / "one"), *train_args(data, hyp, tmp_path / "runs1")]
    code_one, out_one = launch(args, tmp_path / "one.log", nproc=None)
    assert code_one == 0, out_one[-4000:]

    # the global batch (all 8 images) is split between the ranks; target counts differ between them
    batches = [(tmp_path / "ddp" / f"rank{r}" / "batch.txt").read_text().split() for r in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == 4 and not set(batches[0]) & set(batches[1])
    assert sorted(batches[0] + batches[1]) == sorted(
        (tmp_path / "one" / "rank0" / "batch.txt").read_text().split()
    )
    counts = [int((tmp_path / "ddp" / f"rank{r}" / "targets.txt").read_text()) for r in (0, 1)]
    assert counts[0] != counts[1]

    # one optimizer step: both ranks hold the same weights, equal to the single-process ones
    def load(run: str, rank: int, name: str = "weights.pt") -> dict[str, torch.Tensor]:
        return torch.load(tmp_path / run / f"rank{rank}" / name, weights_only=True)

    w0, w1, ref, before = load("ddp", 0), load("ddp", 1), load("one", 0), load("one", 0, "before.pt")
    floats = [k for k, v in ref.items() if v.is_floating_point()]
    assert all(torch.equal(load("ddp", 0, "before.pt")[k], before[k]) for k in floats)  # same start
    assert max((w0[k] - w1[k]).abs().max().item() for k in floats) < 1e-7
    assert max((w0[k] - ref[k]).abs().max().item() for k in floats) < 1e-5
    moved = {k: (ref[k] - before[k]).norm().item() for k in floats}
    assert max(moved.values()) > 1e-4  # the step did move the weights
    update_error = max((w0[k] - ref[k]).norm().item() / moved[k] for k in floats if moved[k] > 0)
    assert update_error < 1e-3  # and each tensor moved the same way in both runs

    # rank 0 alone wrote the run; the label cache was written once, by rank 0
    run0 = tmp_path / "runs" / "rank0"
    for name in ("weights/last.pt", "weights/best.pt", "results.csv", "hyp.yaml", "opt.yaml", "labels.jpg",
                 "train_batch0.jpg", "results.png"):  # fmt: skip
        assert (run0 / name).is_file(), name
    assert len((run0 / "results.csv").read_text().splitlines()) == 2  # header + 1 epoch
    assert not (tmp_path / "runs" / "rank1").exists()
    saved = [ln for ln in out.splitlines() if "label cache saved" in ln]
    assert len(saved) == 1 and saved[0].startswith("[rank 0]")
    assert any("label cache loaded" in ln for ln in lines_of(out, 1))
    assert all(any("worker done" in ln for ln in lines_of(out, r)) for r in (0, 1))


@pytest.mark.slow
def test_failing_rank_ends_the_job(tiny, tmp_path):
    data, hyp = tiny
    args = [str(WORKER), "fail", str(tmp_path / "out"), *train_args(data, hyp, tmp_path / "runs", 4)]
    code, out = launch(args, tmp_path / "fail.log", timeout=120)
    assert code is not None, "the job hung, or left a rank running, after rank 1 failed"
    assert code != 0
    assert "deliberate failure on rank 1" in out
    assert "DDP rank 1 stopped by RuntimeError" in out


@pytest.mark.slow
def test_train_py_ctrl_c_then_resume(tiny, tmp_path):
    """train.py under torch.distributed.run: Ctrl-C after the first epoch stops every rank, the checkpoint
    is intact, and --resume finishes the run (rank 0 alone writing)."""
    data, hyp = tiny
    run = tmp_path / "runs" / "exp"
    args = ["train.py", *train_args(data, hyp, tmp_path / "runs", 4), "--name", "exp", "--noplots"]
    args[args.index("--epochs") + 1] = "50"
    proc = start(torchrun(args), tmp_path / "first.log")
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (run / "weights" / "best.pt").is_file():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: every process of the job
    code, out = finish(proc, tmp_path / "first.log", timeout=60)
    assert code is not None, "Ctrl-C left the job (or one of its ranks) running"
    assert code != 0, out[-4000:]
    assert "DDP rank 1 stopped by KeyboardInterrupt" in out and "DDP rank 0 stopped by" in out
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["exp"]
    assert sorted(p.name for p in (run / "weights").iterdir()) == ["best.pt", "last.pt"]  # no temp files
    ckpt = load_checkpoint(run / "weights" / "last.pt")
    done = ckpt["epoch"] + 1
    assert done < 50

    ckpt["train_args"]["epochs"] = done + 1  # finish after one more epoch
    save_checkpoint(ckpt, run / "weights" / "last.pt")
    resume = ["train.py", "--resume", str(run / "weights" / "last.pt"), "--device", "cpu", "--workers", "0"]
    code, out = launch(resume, tmp_path / "resume.log")
    assert code == 0, out[-4000:]
    assert out.count("Resuming training from") == 1  # rank 0 logs; rank 1 resumes quietly
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["exp"]
    assert load_checkpoint(run / "weights" / "last.pt")["epoch"] == done
    rows = (run / "results.csv").read_text().splitlines()
    assert rows[-1].split(",")[0] == str(done) and len(rows) >= done + 2
