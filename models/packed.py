"""Convolutions for CPU inference (fp32, or bf16 under --half) with weights laid out once for oneDNN.

PyTorch's eager CPU convolution hands oneDNN its weights in the plain (O, I, kH, kW) layout, and
oneDNN reorders them into the blocked layout its kernel wants on every call. Where a layer has many
weights and few output pixels (ResNet layer4 and the P5 head at 320: 10x10 maps, up to 4M weights)
that reorder costs more than the multiply: a 4096 -> 1024 1x1 convolution at 10x10 ran at 164
GFLOP/s eager and 425 with its weights reordered ahead of time, on a 2-core AVX512 CPU whose GEMM
peak is about 470. ``pack_convolutions`` swaps every Conv2d of a fused model for a ``PackedConv2d``
that keeps the reordered copy and calls oneDNN's fused convolution (+ activation) directly:
yolov5-resnet50-cbam at 320, batch 1, 2 threads, 100 -> 77 ms (``python benchmarks.py --speed``).
ResNet bottlenecks become ``PackedBottleneck``s, whose last convolution also adds the residual and
applies the ReLU in the same call (another 1-5%).

The blocked layout oneDNN picks depends on the input shape, and weights packed for one shape are
slower than plain ones at another, so a layer packs a copy per input shape and keeps the last
``PACKED_SHAPES`` of them: test-time augmentation's three scales, or a few alternating image sizes,
stay packed; each copy costs another copy of the weights (about 200 MB for yolov5-resnet50-cbam
in fp32). A new shape costs one reorder, what eager pays inside every call, so ever-changing shapes
cost about what eager costs and a steady stream (video, a fixed --imgsz) pays it once.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import Conv, ResNetBottleneck
from utils.general import LOGGER

PACKED_SHAPES = 3  # packed copies kept per layer, one per input shape: --augment runs three scales

# Activations oneDNN can apply inside the convolution, by the post-op name its fused kernel takes
FUSABLE_ACTIVATIONS: dict[type[nn.Module], str] = {nn.SiLU: "swish", nn.ReLU: "relu", nn.Sigmoid: "sigmoid"}


def packing_supported() -> bool:
    """Whether this PyTorch build has oneDNN's pre-packed convolution ops."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def reorder_weight(weight: torch.Tensor, padding: tuple[int, ...], stride: tuple[int, ...],
                   dilation: tuple[int, ...], groups: int, input_shape: torch.Size) -> torch.Tensor:  # fmt: skip
    """``weight`` (O, I/groups, kH, kW) in the blocked layout oneDNN picks for inputs of ``input_shape``."""
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, padding, stride, dilation, groups, list(input_shape)
    )


def convolution(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, ...],
                stride: tuple[int, ...], dilation: tuple[int, ...], groups: int, post_op: str) -> torch.Tensor:  # fmt: skip
    """oneDNN convolution of NHWC/NCHW ``x`` with pre-packed weights, then ``post_op`` ("none", "swish", ...)."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, bias, padding, stride, dilation, groups, post_op, [], ""
    )


def convolution_add_relu_(out: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                          padding: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
                          groups: int) -> torch.Tensor:  # fmt: skip
    """relu(convolution(x) + out) written into ``out`` by one oneDNN call (a sum post-op, then ReLU)."""
    return torch.ops.mkldnn._convolution_pointwise_(
        out, x, packed, bias, padding, stride, dilation, groups, "add", 1.0, "relu", [], ""
    )


class PackedConv2d(nn.Module):
    """A Conv2d (optionally followed by an activation) for CPU inference, weights pre-packed.

    Holds the original fp32 weight and bias as parameters, so ``state_dict`` is unchanged, and
    packed copies for the last ``PACKED_SHAPES`` input shapes seen: fp32, or bf16 under CPU bf16
    autocast (``--half``), where the result is what autocast gives a Conv2d but the weights are not
    cast again each call.
    Other calls (gradients needed, another dtype, device or autocast dtype) run ``F.conv2d`` and the
    activation module instead. Threads may share one model: the copies are kept and dropped under a
    lock per layer.
    """

    def __init__(self, conv: nn.Conv2d, activation: nn.Module | None = None):
        super().__init__()
        if not _explicit_zero_padding(conv):
            raise ValueError(
                f"PackedConv2d needs explicit zero padding, got {conv.padding!r} / {conv.padding_mode}"
            )
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight, self.bias = conv.weight, conv.bias
        self.activation = activation if activation is not None else nn.Identity()
        self.post_op = "none" if activation is None else FUSABLE_ACTIVATIONS[type(activation)]
        # (input shape, dtype, weight versions) -> (packed weight, bias in that dtype), most recent last;
        # the packed weights are oneDNN opaque tensors: never saved, copied or pickled
        self._copies: OrderedDict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._lock = threading.Lock()  # guards _copies
        self._failed = False  # oneDNN refused once: plain F.conv2d from then on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._compute_dtype(x)
        if dtype is not None:
            try:
                return self._packed_forward(x, dtype)
            except RuntimeError as e:  # a oneDNN build or CPU without these kernels: plain from now on
                self._give_up(e)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self.activation(y)

    def _packed_forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        packed, bias = self._weights_for(x, dtype)
        return convolution(
            x.to(dtype), packed, bias, self.padding, self.stride, self.dilation, self.groups, self.post_op
        )

    def _weights_for(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The packed weight and bias for inputs shaped like x in dtype: a kept copy, or packed now."""
        key = (tuple(x.shape), dtype, _version(self.weight), _version(self.bias))
        with self._lock:
            found = self._copies.get(key)
            if found is not None:
                self._copies.move_to_end(key)
                return found
            if self._copies and next(iter(self._copies))[2:] != key[2:]:
                self._copies.clear()  # weights changed in place: copies of weights that are no more
            weight = self.weight.detach().to(dtype)
            packed = reorder_weight(weight, self.padding, self.stride, self.dilation, self.groups, x.shape)
            found = (packed, None if self.bias is None else self.bias.detach().to(dtype))
            self._copies[key] = found
            while len(self._copies) > PACKED_SHAPES:  # the least recently used go first
                self._copies.popitem(last=False)
        return found

    def add_relu_into(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Write relu(conv(x) + out) into ``out`` with one oneDNN call (its sum post-op adds the
        convolution to what ``out`` holds), ``self.activation`` aside. Returns False, changing nothing,
        where the packed path does not apply: see ``forward``, or ``out`` not the convolution's output
        shape, dtype and memory layout."""
        dtype = self._compute_dtype(x)
        if dtype is None or out.dtype != dtype or (torch.is_grad_enabled() and out.requires_grad):
            return False
        if out.shape != self._output_shape(x) or _layout(out) is None or _layout(out) != _layout(x):
            return False
        try:
            packed, bias = self._weights_for(x, dtype)
            convolution_add_relu_(
                out, x.to(dtype), packed, bias, self.padding, self.stride, self.dilation, self.groups
            )
        except RuntimeError as e:  # oneDNN refuses while setting up, before it writes: plain from now on
            self._give_up(e)
            return False
        return True

    def _give_up(self, error: RuntimeError) -> None:
        """Plain F.conv2d for this layer from now on, with one warning per distinct reason."""
        self._failed = True
        with self._lock:
            self._copies.clear()
        _warn_unavailable(str(error).splitlines()[0] if str(error) else type(error).__name__)

    def _output_shape(self, x: torch.Tensor) -> torch.Size:
        spatial = [
            (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
            for size, pad, dil, k, stride in zip(
                x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride
            )
        ]
        return torch.Size([x.shape[0], self.out_channels, *spatial])

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """fp32, or bf16 under CPU bf16 autocast (as autocast would run a Conv2d); None: not packable."""
        if self._failed:
            return None
        if x.device.type != "cpu" or x.dim() != 4 or self.weight.dtype != torch.float32:
            return None
        if x.shape[1] != self.in_channels:
            return None  # F.conv2d raises its clear error; packing stays on for later, valid inputs
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return None  # training: the differentiable path
        if not torch.is_autocast_enabled("cpu"):
            return torch.float32 if x.dtype == torch.float32 else None
        autocast_bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16
        return torch.bfloat16 if autocast_bf16 and x.dtype in (torch.float32, torch.bfloat16) else None

    def __getstate__(self) -> dict[str, Any]:  # deepcopy and pickle: the opaque packed copies stay behind
        state = self.__dict__.copy()
        state["_copies"] = OrderedDict()
        del state["_lock"]  # locks do not copy or pickle
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, post_op={self.post_op}")  # fmt: skip


@functools.cache
def _warn_unavailable(reason: str) -> None:
    """One warning per distinct reason, not one per layer."""
    LOGGER.warning(f"WARNING: pre-packed oneDNN convolution failed ({reason}); those layers run plain Conv2d")


def _explicit_zero_padding(conv: nn.Conv2d) -> bool:
    """What oneDNN's packed convolution takes: zero padding given as numbers, not "same"/"valid"."""
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _fused_conv_block(m: nn.Module) -> bool:
    """A ``Conv`` block whose BatchNorm is folded in: conv -> act."""
    return (
        isinstance(m, Conv)
        and type(m.conv) is nn.Conv2d
        and _explicit_zero_padding(m.conv)
        and isinstance(m.bn, nn.Identity)
    )


def _layout(t: torch.Tensor) -> str | None:
    """Layout of a dense 4-D tensor: "nhwc" (also where both fit, as with 1x1 maps), "nchw", or None."""
    if t.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return "nchw" if t.is_contiguous() else None


def _version(t: torch.Tensor | None) -> int | None:
    """In-place change counter of a parameter; None for inference-mode tensors, which keep none."""
    return None if t is None or t.is_inference() else t._version


class PackedBottleneck(nn.Module):
    """A fused ``ResNetBottleneck`` for packed inference: ReLU runs inside conv1 and conv2, and conv3
    adds the residual and applies the last ReLU in the same oneDNN call, writing into the residual's
    buffer, so the block's largest maps get no separate addition and ReLU passes.

    That buffer is the downsample's output or, with ``owns_input``, the block's own input, which is
    then overwritten: only for a block whose input nothing else holds (a block after the first of a
    ResNet stage receives the previous block's output). Without such a buffer, with attention before
    the residual addition, or where conv3 does not run packed (gradients, other dtypes), it computes
    what ResNetBottleneck computes. Parameter names are the block's, so ``state_dict`` is unchanged.
    """

    def __init__(self, block: ResNetBottleneck, owns_input: bool):
        super().__init__()
        self.conv1 = PackedConv2d(block.conv1, nn.ReLU(inplace=True))
        self.conv2 = PackedConv2d(block.conv2, nn.ReLU(inplace=True))
        self.conv3 = PackedConv2d(block.conv3)
        self.attention = block.attention
        self.downsample = block.downsample
        if self.downsample is not None:
            self.downsample[0] = PackedConv2d(self.downsample[0])
        self.owns_input = owns_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.conv2(self.conv1(x))
        writable = identity is not x or self.owns_input
        if writable and isinstance(self.attention, nn.Identity) and self.conv3.add_relu_into(y, identity):
            return identity
        return F.relu(self.attention(self.conv3(y)) + identity)


def _fused_bottleneck(m: nn.Module) -> bool:
    """A ``ResNetBottleneck`` whose BatchNorms are folded in, with explicitly zero-padded convolutions."""
    if not isinstance(m, ResNetBottleneck):
        return False
    convs = [m.conv1, m.conv2, m.conv3] + ([] if m.downsample is None else [m.downsample[0]])
    norms = [m.bn1, m.bn2, m.bn3] + ([] if m.downsample is None else [m.downsample[1]])
    return all(type(c) is nn.Conv2d and _explicit_zero_padding(c) for c in convs) and all(
        isinstance(n, nn.Identity) for n in norms
    )


def pack_convolutions(model: nn.Module, bottlenecks: bool = True) -> int:
    """Replace every Conv2d in a fused, eval-mode model with a PackedConv2d, in place; returns how many.

    The activation of a ``Conv`` block (SiLU, ReLU or Sigmoid) moves into its convolution, and with
    ``bottlenecks`` each ResNet bottleneck becomes a ``PackedBottleneck`` (ReLUs and the residual
    addition inside its convolutions; False leaves its additions and ReLUs separate, for comparison).
    Use on fp32 CPU inference models after ``fuse()`` (bf16 under autocast packs too); torch.compile
    packs by itself and needs the plain model.
    """
    if not packing_supported():
        return 0
    count = 0
    for parent in list(model.modules()) if bottlenecks else []:
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if _fused_bottleneck(child):
                follows_block = i > 0 and isinstance(children[i - 1][1], ResNetBottleneck)
                owns_input = isinstance(parent, nn.Sequential) and follows_block  # input: the previous output
                setattr(parent, name, PackedBottleneck(child, owns_input))
                count += 3 + (child.downsample is not None)
    for parent in list(model.modules()):
        if _fused_conv_block(parent) and type(parent.act) in FUSABLE_ACTIVATIONS:
            parent.conv, parent.act = PackedConv2d(parent.conv, parent.act), nn.Identity()
            count += 1
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d and _explicit_zero_padding(child):
                setattr(parent, name, PackedConv2d(child))
                count += 1
    return count
