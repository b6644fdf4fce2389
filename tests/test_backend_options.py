"""AutoBackend's --half and --compile paths for .pt weights: what runs where, and that results hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models.backend as backend_module
from models.backend import AutoBackend
from models.yolo import Detect
from utils import torch_utils


def _image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _predict(backend: AutoBackend, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return backend(x, **kwargs)


@pytest.mark.parametrize("bf16_cpu", [True, False])
def test_half_dtype_per_device(monkeypatch, bf16_cpu: bool):
    monkeypatch.setattr(torch_utils, "cpu_bf16_supported", lambda: bf16_cpu)
    assert torch_utils.half_dtype(torch.device("cuda")) == torch.float16
    assert torch_utils.half_dtype(torch.device("cpu")) == (torch.bfloat16 if bf16_cpu else None)
    assert torch_utils.half_dtype(torch.device("mps")) is None


def test_half_on_bf16_cpu_runs_autocast_and_keeps_fp32_boxes(monkeypatch, tiny_checkpoint: Path):
    monkeypatch.setattr(backend_module, "half_dtype", lambda device: torch.bfloat16)
    x = _image()
    reference = _predict(AutoBackend(tiny_checkpoint), x)
    backend = AutoBackend(tiny_checkpoint, fp16=True)
    assert backend.bf16 and not backend.fp16
    pred = _predict(backend, x)
    assert pred.dtype == torch.float32  # decoded in fp32, whatever the convolutions ran in
    assert not torch.equal(pred, reference)  # bf16 convolutions did run
    torch.testing.assert_close(pred[..., :4], reference[..., :4], rtol=0.05, atol=1.0)  # pixels
    torch.testing.assert_close(pred[..., 4:], reference[..., 4:], rtol=0.0, atol=0.05)  # scores


def test_half_without_faster_precision_warns_and_runs_fp32(monkeypatch, tiny_checkpoint: Path, project_log):
    monkeypatch.setattr(backend_module, "half_dtype", lambda device: None)
    x = _image()
    backend = AutoBackend(tiny_checkpoint, fp16=True)
    assert not (backend.bf16 or backend.fp16)
    assert any("--half" in line and "running fp32" in line for line in project_log)
    torch.testing.assert_close(
        _predict(backend, x), _predict(AutoBackend(tiny_checkpoint), x), rtol=0, atol=0
    )


def test_decode_of_bf16_maps_is_fp32():
    detect = Detect(nc=2, anchors=([10, 13, 16, 30, 33, 23],), ch=(8,))
    detect.stride = torch.tensor([8.0])
    detect.anchors /= detect.stride.view(-1, 1, 1)
    raw = torch.randn(1, 3, 4, 4, 7)
    decoded = detect.decode(raw.bfloat16(), 0)
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, detect.decode(raw.bfloat16().float(), 0))


def test_compile_wraps_plain_forward_only(monkeypatch, tiny_checkpoint: Path):
    calls = []

    def fake_compile(model, **kwargs):
        def compiled(x):
            calls.append(tuple(x.shape))
            return model(x)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    x = _image()
    eager = AutoBackend(tiny_checkpoint)
    backend = AutoBackend(tiny_checkpoint, compile=True)
    assert backend.compiled is not None and eager.compiled is None
    torch.testing.assert_close(_predict(backend, x), _predict(eager, x), rtol=0, atol=0)
    assert calls == [(1, 3, 64, 64)]
    _predict(backend, x, augment=True)  # test-time augmentation runs the eager model
    assert len(calls) == 1


def test_compile_for_inference_freezes_the_weights():
    """A real compile: the weights are constants of the graph (what lets inductor pre-pack and fuse
    them), so changing them after the first call changes nothing; with the freezing flag set too
    late for Dynamo they stay graph inputs and the output follows them. Calls need no no_grad."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.SiLU()).eval()
    x = torch.rand(1, 3, 8, 8)
    run = torch_utils.compile_for_inference(model)
    first = run(x)
    assert not first.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(first, model(x))
        model[0].weight.add_(1.0)
        changed = model(x)
    assert not torch.allclose(changed, first)
    torch.testing.assert_close(run(x), first, rtol=0, atol=0)
    torch._dynamo.reset()


def test_retain_freed_memory_sets_glibc_malloc_options_or_changes_nothing(monkeypatch):
    """On glibc: mmap threshold, trim threshold and top pad all set; elsewhere False, no call."""
    import ctypes
    import sys

    from utils import torch_utils

    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1

    monkeypatch.setattr(
        ctypes, "CDLL", lambda name: type("FakeLibc", (), {"mallopt": staticmethod(mallopt)})()
    )
    monkeypatch.setattr(sys, "platform", "linux")
    assert torch_utils.retain_freed_memory() is True
    assert calls == [(-3, 2**31 - 1), (-1, 2**31 - 1), (-2, 2**30)]

    def no_glibc(name):
        raise OSError(f"{name}: not found")

    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    assert torch_utils.retain_freed_memory() is False
    monkeypatch.setattr(sys, "platform", "darwin")
    calls.clear()
    assert torch_utils.retain_freed_memory() is False and calls == []
