"""Pre-packed oneDNN convolutions (models/packed.py): same results as Conv2d, in every case they meet."""

from __future__ import annotations

import copy
import pickle
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import models.packed as packed_module
from models.backend import AutoBackend
from models.common import Conv, ResNetStage
from models.packed import PackedBottleneck, PackedConv2d, pack_convolutions, packing_supported
from models.yolo import DetectionModel
from utils.benchmark import trained_like

pytestmark = pytest.mark.skipif(not packing_supported(), reason="this PyTorch build has no oneDNN")


def _latest_key(layer: PackedConv2d) -> tuple:
    """(input shape, dtype, ...) of the packed copy a layer used last."""
    return next(reversed(layer._copies))


def _nhwc(*shape: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=8, out_channels=16, kernel_size=1),
        dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=1),
        dict(in_channels=8, out_channels=8, kernel_size=3, padding=2, dilation=2, groups=4, bias=False),
        dict(in_channels=3, out_channels=16, kernel_size=7, stride=2, padding=3, bias=False),
    ],
)
@pytest.mark.parametrize("activation", [None, nn.SiLU(), nn.ReLU(), nn.Sigmoid()])
def test_packed_conv_equals_conv_then_activation(kwargs, activation):
    conv = nn.Conv2d(**kwargs).eval()
    packed = PackedConv2d(conv, activation)
    x = _nhwc(2, kwargs["in_channels"], 13, 11)
    with torch.inference_mode():
        expected = conv(x) if activation is None else activation(conv(x))
        y = packed(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert packed._copies  # the oneDNN path ran, not the F.conv2d fallback
    assert (packed.post_op == "none") == (activation is None)  # the activation ran inside oneDNN


def test_packed_conv_repacks_for_a_new_shape_and_for_new_weights():
    conv = nn.Conv2d(4, 6, 3, padding=1).eval()
    packed = PackedConv2d(conv)
    with torch.inference_mode():
        for shape in [(1, 4, 8, 8), (1, 4, 16, 12), (3, 4, 8, 8), (1, 4, 8, 8)]:
            x = _nhwc(*shape)
            torch.testing.assert_close(packed(x), conv(x), rtol=1e-5, atol=1e-5)
            assert _latest_key(packed)[0] == shape
    with torch.no_grad():
        conv.weight.mul_(-2.0)  # shared with the packed module, changed in place
    x = _nhwc(1, 4, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), conv(x), rtol=1e-5, atol=1e-5)


def test_packed_conv_keeps_copies_for_the_last_few_shapes(monkeypatch):
    """Alternating shapes (--augment's three scales) reuse their copies; the least recently used goes
    when a fourth arrives; weights changed in place drop every copy."""
    reorders = []
    original = packed_module.reorder_weight
    monkeypatch.setattr(
        packed_module, "reorder_weight", lambda *a: reorders.append(tuple(a[-1])) or original(*a)
    )
    assert packed_module.PACKED_SHAPES == 3
    conv = nn.Conv2d(4, 6, 3, padding=1).eval()
    packed = PackedConv2d(conv)
    a, b, c, d = (1, 4, 8, 8), (1, 4, 8, 12), (1, 4, 12, 8), (1, 4, 16, 16)

    def run(*shapes):
        for shape in shapes:
            x = _nhwc(*shape)
            with torch.inference_mode():
                torch.testing.assert_close(packed(x), conv(x), rtol=1e-5, atol=1e-5)

    run(a, b, c, a, b, c, a)
    assert reorders == [a, b, c]
    run(d, c, a)  # d pushes out the least recently used (b); c and a are still there
    assert reorders == [a, b, c, d]
    run(b)
    assert reorders == [a, b, c, d, b]
    with torch.no_grad():
        conv.weight.mul_(-2.0)
    run(b, a)
    assert reorders == [a, b, c, d, b, b, a]
    assert not copy.deepcopy(packed)._copies


def test_packed_conv_under_bf16_autocast_gives_what_autocast_gives_a_conv2d():
    conv = nn.Conv2d(16, 32, 3, padding=1).eval()
    packed = PackedConv2d(conv, nn.SiLU())
    x = _nhwc(1, 16, 12, 12)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = nn.functional.silu(conv(x))
        y = packed(x)
    assert y.dtype == expected.dtype == torch.bfloat16
    assert packed._copies and _latest_key(packed)[1] == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), rtol=0.02, atol=0.02)
    with torch.inference_mode():  # autocast off again: repacked in fp32
        torch.testing.assert_close(packed(x), nn.functional.silu(conv(x)), rtol=1e-5, atol=1e-5)
    assert _latest_key(packed)[1] == torch.float32


def test_packed_conv_falls_back_to_conv2d_for_training_and_other_dtypes():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    packed = PackedConv2d(conv, nn.SiLU())
    x = _nhwc(2, 4, 8, 8).requires_grad_()
    y = packed(x)  # gradients wanted: the differentiable F.conv2d path
    y.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None and not packed._copies
    packed.double()  # converts the parameters it shares with conv
    xd = x.detach().double()
    with torch.no_grad():
        torch.testing.assert_close(packed(xd), nn.functional.silu(conv(xd)))
    assert not packed._copies


class _SlowLookups(OrderedDict):
    """An OrderedDict whose lookups let other threads run before the caller goes on."""

    def get(self, key, default=None):
        found = super().get(key, default)
        time.sleep(1e-4)
        return found


def test_threads_sharing_a_packed_conv_with_different_shapes_get_right_results():
    """More shapes than kept copies from four threads, each pausing after its lookup: every result is
    the convolution's (no copy evicted between a thread's lookup and its use) and at most
    PACKED_SHAPES copies are left."""
    conv = nn.Conv2d(4, 6, 3, padding=1).eval()
    packed = PackedConv2d(conv)
    packed._copies = _SlowLookups()
    inputs = [_nhwc(1, 4, 6 + i, 6, seed=i) for i in range(packed_module.PACKED_SHAPES + 2)]
    with torch.inference_mode():
        expected = [conv(x) for x in inputs]
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            with torch.inference_mode():
                for i in range(40):
                    k = (i + offset) % len(inputs)
                    torch.testing.assert_close(packed(inputs[k]), expected[k], rtol=1e-5, atol=1e-5)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(offset,)) for offset in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, repr(errors[0])
    assert 1 <= len(packed._copies) <= packed_module.PACKED_SHAPES


def test_pack_convolutions_keeps_outputs_state_dict_copy_and_pickle():
    model = trained_like(DetectionModel("yolov5-resnet50-cbam.yaml", verbose=False).eval()).fuse()
    model.to(memory_format=torch.channels_last)
    packed = copy.deepcopy(model)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert pack_convolutions(packed) == convs
    assert not any(type(m) is nn.Conv2d for m in packed.modules())
    blocks = [m for m in packed.modules() if isinstance(m, Conv)]
    assert blocks and all(isinstance(b.act, nn.Identity) and b.conv.post_op == "swish" for b in blocks)
    assert list(packed.state_dict()) == list(model.state_dict())
    x = _nhwc(1, 3, 96, 64)
    with torch.inference_mode():
        expected = model(x)[0]
        torch.testing.assert_close(packed(x)[0], expected, rtol=1e-3, atol=1e-3)
        again = copy.deepcopy(packed)  # after packing: the opaque oneDNN copies are left behind
        restored = pickle.loads(pickle.dumps(packed))
        assert all(not m._copies for m in again.modules() if isinstance(m, PackedConv2d))
        torch.testing.assert_close(again(x)[0], expected, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(restored(x)[0], expected, rtol=1e-3, atol=1e-3)


def test_autobackend_packs_a_cpu_pt_model_unless_compiled(monkeypatch, tiny_checkpoint: Path):
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    eager = AutoBackend(tiny_checkpoint)
    compiled = AutoBackend(tiny_checkpoint, compile=True)
    assert any(isinstance(m, PackedConv2d) for m in eager.model.modules())
    assert not any(isinstance(m, PackedConv2d) for m in compiled.model.modules())
    x = torch.rand(1, 3, 64, 96)
    expected = compiled(x)  # outside no_grad: the inference model has no gradients to track
    packed = [m for m in eager.model.modules() if isinstance(m, PackedConv2d)]
    assert all(not m._copies for m in packed)
    torch.testing.assert_close(eager(x), expected, rtol=1e-4, atol=1e-3)
    assert all(m._copies for m in packed)  # the packed path ran, not the F.conv2d fallback


def test_a_failing_onednn_call_falls_back_to_conv2d_with_one_warning(monkeypatch, project_log):
    def refuse(*args, **kwargs):
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(packed_module, "convolution", refuse)
    packed_module._warn_unavailable.cache_clear()
    convs = [nn.Conv2d(4, 4, 3, padding=1).eval() for _ in range(2)]
    layers = [PackedConv2d(c, nn.ReLU()) for c in convs]
    x = _nhwc(1, 4, 8, 8)
    with torch.inference_mode():
        for _ in range(2):
            for conv, layer in zip(convs, layers):
                torch.testing.assert_close(layer(x), torch.relu(conv(x)))
    assert all(layer._failed for layer in layers)
    assert sum("pre-packed oneDNN convolution failed" in line for line in project_log) == 1


def test_wrong_input_channels_raise_torchs_error_and_keep_packing():
    layer = PackedConv2d(nn.Conv2d(4, 4, 1).eval())
    with torch.inference_mode(), pytest.raises(RuntimeError, match="channels"):
        layer(_nhwc(1, 3, 8, 8))
    assert not layer._failed
    with torch.inference_mode():
        layer(_nhwc(1, 4, 8, 8))
    assert layer._copies


def _fused_stage(c1: int, c2: int, blocks: int, stride: int = 1, attention: str | None = None) -> nn.Module:
    stage = trained_like(ResNetStage(c1, c2, blocks, stride, attention).eval())
    for block in stage:
        block.fuse()
    return stage.to(memory_format=torch.channels_last)


def _spy_on_fused_additions(monkeypatch) -> list[bool]:
    """Results of PackedConv2d.add_relu_into calls: True where oneDNN added the residual in the conv."""
    results, original = [], PackedConv2d.add_relu_into

    def spy(self, x, out):
        results.append(original(self, x, out))
        return results[-1]

    monkeypatch.setattr(PackedConv2d, "add_relu_into", spy)
    return results


def test_packed_bottlenecks_add_the_residual_inside_conv3_and_overwrite_only_their_own_buffers(monkeypatch):
    """Block 0 writes into its downsample's output, later blocks into their input (the previous block's
    output); the stage's input is never written, and the stage computes what the fused stage does."""
    stage = _fused_stage(64, 256, 3, stride=2)
    packed = copy.deepcopy(stage)
    assert pack_convolutions(packed) == 3 * 3 + 1
    assert [type(b) for b in packed] == [PackedBottleneck] * 3
    assert [b.owns_input for b in packed] == [False, True, True]
    assert list(packed.state_dict()) == list(stage.state_dict())
    fused = _spy_on_fused_additions(monkeypatch)
    x = _nhwc(1, 64, 16, 16)
    before = x.clone()
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), stage(x), rtol=1e-4, atol=1e-4)
    assert fused == [True, True, True]
    torch.testing.assert_close(x, before, rtol=0, atol=0)


def test_a_first_block_without_downsample_leaves_the_stage_input_alone(monkeypatch):
    stage = _fused_stage(256, 256, 2)  # block 0 adds the stage input itself: not its buffer to write
    packed = copy.deepcopy(stage)
    pack_convolutions(packed)
    fused = _spy_on_fused_additions(monkeypatch)
    x = _nhwc(1, 256, 8, 8)
    before = x.clone()
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), stage(x), rtol=1e-4, atol=1e-4)
    assert fused == [True]  # block 1 only; block 0 added with a separate pass
    torch.testing.assert_close(x, before, rtol=0, atol=0)


def test_packed_bottleneck_falls_back_for_gradients_attention_and_bf16(monkeypatch):
    fused = _spy_on_fused_additions(monkeypatch)
    stage = _fused_stage(32, 128, 2, stride=2)
    packed = copy.deepcopy(stage)
    pack_convolutions(packed)
    x = _nhwc(1, 32, 8, 8).requires_grad_()
    y = packed(x)  # gradients needed: F.conv2d and a separate addition
    y.sum().backward()
    assert x.grad is not None and fused == [False, False]  # asked, refused
    torch.testing.assert_close(y, stage(x), rtol=1e-4, atol=1e-4)
    fused.clear()

    with_attention = _fused_stage(32, 128, 2, stride=2, attention="cbam")  # attention before the addition
    packed = copy.deepcopy(with_attention)
    pack_convolutions(packed)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x.detach()), with_attention(x.detach()), rtol=1e-4, atol=1e-4)
    assert fused == []  # not asked

    packed = copy.deepcopy(stage)
    pack_convolutions(packed)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = stage(x.detach())
        out = packed(x.detach())
    assert out.dtype == expected.dtype == torch.bfloat16 and fused == [True, True]
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.05, atol=0.1)


def test_a_failing_fused_addition_falls_back_with_one_warning(monkeypatch, project_log):
    def refuse(*args, **kwargs):
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(packed_module, "convolution_add_relu_", refuse)
    packed_module._warn_unavailable.cache_clear()
    stage = _fused_stage(32, 128, 2, stride=2)
    packed = copy.deepcopy(stage)
    pack_convolutions(packed)
    x = _nhwc(1, 32, 8, 8)
    with torch.inference_mode():
        for _ in range(2):
            torch.testing.assert_close(packed(x), stage(x), rtol=1e-4, atol=1e-4)
    assert all(block.conv3._failed for block in packed)
    assert sum("pre-packed oneDNN convolution failed" in line for line in project_log) == 1


def test_convolutions_alone_finds_every_convolution_of_a_packed_resnet_stage():
    """conv3 of a packed bottleneck runs inside add_relu_into, not its forward: still timed and counted."""
    from utils.benchmark import convolutions_alone
    from utils.torch_utils import count_flops

    stage = _fused_stage(32, 128, 2, stride=2)
    x = _nhwc(1, 32, 16, 16)
    flops = count_flops(copy.deepcopy(stage), x)
    pack_convolutions(stage)
    alone = convolutions_alone(stage, x, runs=1)
    assert set(alone) == {"1x1", "3x3"} and all(t > 0 for t, _ in alone.values())
    assert sum(f for _, f in alone.values()) == pytest.approx(flops, rel=1e-6)


def test_pack_convolutions_can_leave_bottleneck_additions_apart():
    stage = _fused_stage(32, 128, 2, stride=2)
    packed = copy.deepcopy(stage)
    assert pack_convolutions(packed, bottlenecks=False) == 2 * 3 + 1
    assert not any(isinstance(m, PackedBottleneck) for m in packed.modules())
    assert not any(type(m) is nn.Conv2d for m in packed.modules())
    x = _nhwc(1, 32, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), stage(x), rtol=1e-4, atol=1e-4)
