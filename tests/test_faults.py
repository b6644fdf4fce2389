"""Faults while training: a kill at any moment, a full disk, a diverging loss.

Resuming after a SIGKILL of a real training run (train.py --resume continues from last.pt) is
covered end to end by tests/test_train.py::test_resume_after_kill_continues_from_saved_epoch; here
the kill lands at random moments inside save_checkpoint itself.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from tests.conftest import make_tiny_dataset
from utils import checkpoints
from utils.checkpoints import load_checkpoint, save_checkpoint
from utils.general import yaml_load
from utils.label_checks import load_cache, save_cache, scan_pairs
from utils.trainer import Trainer, TrainingDiverged

MODEL_YAML = {"nc": 1, "backbone": [], "head": []}


def _checkpoint(epoch: int, weights: torch.Tensor) -> dict:
    return {"epoch": epoch, "model_yaml": MODEL_YAML, "model": {"w": weights}, "ema": None}


def _save_forever(path: str, weights: torch.Tensor) -> None:
    """Child process: save checkpoints with increasing epochs until killed."""
    for epoch in range(1_000_000):
        save_checkpoint(_checkpoint(epoch, weights), path)


def test_checkpoints_get_the_permissions_of_any_new_file(tmp_path):
    """The temp file behind the atomic write is owner-only; the checkpoint must not stay so."""
    old = os.umask(0o022)
    try:
        save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
        save_checkpoint({"epoch": 2}, tmp_path / "last.pt")  # replacing one as well
        os.umask(0o027)
        save_checkpoint({"epoch": 1}, tmp_path / "best.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "best.pt").stat().st_mode & 0o777 == 0o640


def test_sigkill_at_random_moments_never_tears_the_checkpoint(tmp_path):
    """Kill a process mid-save 15 times; each time last.pt loads and holds one complete checkpoint."""
    path = tmp_path / "weights" / "last.pt"
    weights = torch.from_numpy(np.random.default_rng(0).random(1_500_000, dtype=np.float32))  # 6 MB
    save_checkpoint(_checkpoint(-1, weights), path)
    fork = multiprocessing.get_context("fork")  # the child shares the tensor; no re-import of torch
    rng = random.Random(0)
    epochs = []
    for _ in range(15):
        before = path.stat().st_mtime_ns
        child = fork.Process(target=_save_forever, args=(str(path), weights), daemon=True)
        child.start()
        deadline = time.time() + 30
        while path.stat().st_mtime_ns == before and time.time() < deadline:  # a save has completed
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        ckpt = load_checkpoint(path)
        assert torch.equal(ckpt["model"]["w"], weights)
        epochs.append(ckpt["epoch"])
    assert max(epochs) > 0, "the child never saved twice; the kills did not land during saving"
    leftovers = sorted(p.name for p in path.parent.iterdir() if p.name != "last.pt")
    assert len(leftovers) <= 1, f"temp files of killed saves pile up: {leftovers}"
    save_checkpoint(_checkpoint(99, weights), path)  # the next save removes what a killed one left
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def _fail_partway(fail_at: str, monkeypatch) -> None:
    """Make save_checkpoint hit ENOSPC at ``fail_at``: in torch.save after some bytes, fsync or rename."""
    full = OSError(errno.ENOSPC, "No space left on device")

    def partial_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + b"\x00" * 4096)  # a torn zip header, as a real partial write leaves
        raise full

    def raise_full(*args, **kwargs):
        raise full

    target = {"torch.save": (checkpoints.torch, "save", partial_save), "fsync": (checkpoints.os, "fsync", raise_full),
              "rename": (checkpoints.os, "replace", raise_full)}[fail_at]  # fmt: skip
    monkeypatch.setattr(*target)


@pytest.mark.parametrize("fail_at", ["torch.save", "fsync", "rename"])
def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "last.pt"
    old = torch.arange(10.0)
    save_checkpoint(_checkpoint(0, old), path)
    before = path.read_bytes()
    _fail_partway(fail_at, monkeypatch)
    with pytest.raises(OSError) as e:
        save_checkpoint(_checkpoint(1, torch.zeros(10)), path)
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["model"]["w"], old)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "a temp file was left behind"


def test_full_disk_while_writing_the_label_cache(tmp_path, monkeypatch, project_log):
    ds = make_tiny_dataset(tmp_path / "data", n_train=2, n_val=0)
    images = sorted(map(str, ds.images().glob("*.png")))
    labels = [str(ds.labels() / (Path(p).stem + ".txt")) for p in images]
    cache = tmp_path / "labels.cache"
    results = scan_pairs(images, labels)
    assert save_cache(cache, results, "key1")
    before = cache.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    assert not save_cache(cache, results, "key2")
    monkeypatch.undo()
    assert cache.read_bytes() == before and load_cache(cache, "key1") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "labels.cache"]
    assert any("cache not saved" in line for line in project_log)


# ------------------------------------------------------------------------------------------- divergence
@pytest.fixture
def tiny_run(tmp_path) -> list[str]:
    """train.py arguments for 2 quick epochs on a tiny dataset (no validation or plots before the end)."""
    ds = make_tiny_dataset(tmp_path / "data", n_train=4, n_val=2)
    return ["--data", str(ds.yaml), "--cfg", "yolov5n.yaml", "--img", "64", "--epochs", "2", "--batch-size", "4",
            "--workers", "0", "--noval", "--noplots", "--noautoanchor", "--project", str(tmp_path / "runs")]  # fmt: skip


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_diverging_loss_stops_training_and_keeps_last_good_checkpoint(tiny_run, bad):
    opt = train.check_options(train.parse_opt(tiny_run))
    trainer = Trainer(opt, yaml_load(opt.hyp), torch.device("cpu"))
    real_loss = trainer.train_loss

    def loss_going_bad_in_epoch_1(preds, targets):
        loss, items = real_loss(preds, targets)
        return (loss * bad if trainer.epoch == 1 else loss), items

    trainer.train_loss = loss_going_bad_in_epoch_1
    with pytest.raises(TrainingDiverged) as e:
        trainer.fit()
    msg = str(e.value)
    assert f"loss is {bad}" in msg and "epoch 1" in msg and "last good checkpoint" in msg
    last = Path(opt.save_dir) / "weights" / "last.pt"
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [p.name for p in last.parent.iterdir()] == ["best.pt", "last.pt"]


def test_train_py_reports_divergence_in_one_line(tiny_run, monkeypatch, project_log):
    import utils.trainer

    class LossGoesNaN(utils.trainer.ComputeLoss):
        calls = 0

        def __call__(self, preds, targets):
            loss, items = super().__call__(preds, targets)
            if torch.is_grad_enabled():  # training steps only; 1 batch per epoch here
                type(self).calls += 1
                if type(self).calls > 1:
                    loss = loss * float("nan")
            return loss, items

    monkeypatch.setattr(utils.trainer, "ComputeLoss", LossGoesNaN)
    opt = train.parse_opt(tiny_run)
    assert train.main(opt) == 1
    errors = [line for line in project_log if "ERROR" in line]
    assert len(errors) == 1 and "loss is nan" in errors[0]
    assert load_checkpoint(Path(opt.save_dir) / "weights" / "last.pt")["epoch"] == 0


def test_train_py_reports_full_disk_in_one_line_and_keeps_last_good_checkpoint(
    tiny_run, monkeypatch, project_log
):
    real_save, calls = torch.save, []

    def save_until_disk_fills(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # epoch 0 writes last.pt and best.pt; epoch 1 finds the disk full
            f.write(b"PK\x03\x04")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", save_until_disk_fills)
    opt = train.parse_opt(tiny_run)
    code = train.main(opt)
    monkeypatch.undo()
    weights = Path(opt.save_dir) / "weights"
    assert load_checkpoint(weights / "last.pt")["epoch"] == 0
    assert sorted(p.name for p in weights.iterdir()) == ["best.pt", "last.pt"]
    errors = [line for line in project_log if "ERROR" in line]
    assert code == 1 and len(errors) == 1 and "No space left on device" in errors[0]
