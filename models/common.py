"""Building blocks for model YAMLs: YOLO blocks (Conv, C3, SPPF, ...) and ResNet stem/stages.

Attention layers live in models/attention.py and are re-exported here, so ``from models.common import
CBAM`` works as users expect.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from models.attention import (  # noqa: F401  (re-exported building blocks)
    BAM,
    CBAM,
    ECA,
    SE,
    Attention,
    ChannelAttention,
    CoordAtt,
    SimAM,
    SpatialAttention,
    create_attention,
)
from models.registry import BuildContext, LayerSpec, ScaledChannels, register


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """'Same' padding for an odd kernel k with dilation d."""
    if p is not None:
        return p
    return (d * (k - 1) + 1) // 2


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One Conv2d (with bias) equal to bn(conv(x)) in eval mode."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
    ).to(conv.weight.device)
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    fused.weight.data.copy_(conv.weight.detach() * scale.view(-1, 1, 1, 1))
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.data.copy_(bn.bias.detach() + (bias - bn.running_mean) * scale)
    fused.requires_grad_(False)
    return fused


class FusableConvBN(nn.Module):
    """Base for blocks holding (conv, bn) pairs; ``fuse()`` folds each bn into its conv."""

    conv_bn_pairs: tuple[tuple[str, str], ...] = ()

    def fuse(self) -> None:
        for conv_name, bn_name in self.conv_bn_pairs:
            bn = getattr(self, bn_name)
            if isinstance(bn, nn.BatchNorm2d):
                setattr(self, conv_name, fuse_conv_bn(getattr(self, conv_name), bn))
                setattr(self, bn_name, nn.Identity())


@register
class Conv(ScaledChannels, FusableConvBN):
    """Conv2d -> BatchNorm2d -> activation (SiLU unless told otherwise)."""

    conv_bn_pairs = (("conv", "bn"),)

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 d: int = 1, act: bool | nn.Module = True):  # fmt: skip
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU() if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


@register
class Bottleneck(ScaledChannels, nn.Module):
    """1x1 then 3x3 Conv, with a residual add when shapes allow."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5, act: Any = True):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c_, c2, 3, 1, g=g, act=act)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


@register
class C3(ScaledChannels, nn.Module):
    """CSP block with three convolutions: n Bottlenecks on one half, concatenated with the other."""

    repeats_inside = True

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5,
                 act: Any = True):  # fmt: skip
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c1, c_, 1, 1, act=act)
        self.cv3 = Conv(2 * c_, c2, 1, act=act)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0, act=act) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


@register
class SPP(ScaledChannels, nn.Module):
    """Spatial pyramid pooling with parallel max-pools of sizes k."""

    def __init__(self, c1: int, c2: int, k: tuple[int, ...] = (5, 9, 13), act: Any = True):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c_ * (len(k) + 1), c2, 1, 1, act=act)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


@register
class SPPF(ScaledChannels, nn.Module):
    """Fast SPP: three chained k x k max-pools, equal to SPP(k, 2k-1, 3k-2) with less work."""

    def __init__(self, c1: int, c2: int, k: int = 5, act: Any = True):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c_ * 4, c2, 1, 1, act=act)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


@register
class Focus(ScaledChannels, nn.Module):
    """Space-to-depth (2x2 pixels into channels) followed by a Conv."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 act: Any = True):  # fmt: skip
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = (x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2])
        return self.conv(torch.cat(parts, 1))


@register
class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension`` (channels by default)."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    @classmethod
    def yaml_args(cls, ch: list[int], args: list[Any], n: int, ctx: BuildContext) -> LayerSpec:
        return LayerSpec(list(args), sum(ch))

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class _FixedShape:
    """Mixin for ResNet rows: args[0] is the output width, never scaled by the model multiples."""

    @classmethod
    def yaml_args(cls, ch: list[int], args: list[Any], n: int, ctx: BuildContext) -> LayerSpec:
        return LayerSpec([ch[0], *args], int(args[0]) if args else cls.default_out)


@register
class ResNetStem(_FixedShape, FusableConvBN):
    """ResNet input stem: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool (stride 4 in all).

    Parameter names (conv1, bn1) match torchvision's so its weights load directly.
    """

    default_out = 64
    conv_bn_pairs = (("conv1", "bn1"),)

    def __init__(self, c1: int = 3, c2: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(c1, c2, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(c2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class ResNetBottleneck(FusableConvBN):
    """ResNet v1.5 bottleneck: 1x1, 3x3 (carries the stride), 1x1 with expansion 4.

    ``attention`` (a name from models.attention, or None) is applied after bn3 and before the
    residual addition, the placement of the CBAM paper.
    """

    expansion = 4
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, c1: int, width: int, stride: int = 1, attention: str | None = None):
        super().__init__()
        c2 = width * self.expansion
        self.conv1 = nn.Conv2d(c1, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c2, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c2)
        self.relu = nn.ReLU(inplace=True)
        self.attention = create_attention(attention, c2)
        self.downsample = None
        if stride != 1 or c1 != c2:
            self.downsample = nn.Sequential(nn.Conv2d(c1, c2, 1, stride, bias=False), nn.BatchNorm2d(c2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise for training from scratch as torchvision's ResNet does, with zero-init residuals.

        He-normal (fan_out) convolutions; bn3 starts at zero so that every block begins as the
        identity, which trains a deep ResNet faster from scratch (Goyal et al., 2017). ImageNet
        weights, when loaded, replace all of it.
        """
        convs = [self.conv1, self.conv2, self.conv3]
        if self.downsample is not None:
            convs.append(self.downsample[0])
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.bn3.weight)

    def fuse(self) -> None:
        super().fuse()
        if self.downsample is not None and isinstance(self.downsample[1], nn.BatchNorm2d):
            self.downsample = nn.Sequential(
                fuse_conv_bn(self.downsample[0], self.downsample[1]), nn.Identity()
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.attention(self.bn3(self.conv3(y)))
        return self.relu(y + identity)


@register
class ResNetStage(nn.Sequential):
    """One ResNet stage (torchvision's layer1..layer4): ``blocks`` bottlenecks, the first with ``stride``.

    YAML row ``[-1, blocks, ResNetStage, [c_out, stride, attention]]``: the row's number is the block
    count and c_out = 4 x width; neither is scaled by depth_multiple or width_multiple, since the ResNet50
    shape is fixed. Children are named 0, 1, ... with torchvision's parameter names inside.
    """

    def __init__(self, c1: int, c2: int, blocks: int = 1, stride: int = 1, attention: str | None = None):
        if c2 % ResNetBottleneck.expansion:
            raise ValueError(f"ResNetStage output channels must be a multiple of 4, got {c2}")
        width = c2 // ResNetBottleneck.expansion
        layers = [ResNetBottleneck(c1, width, stride, attention)]
        layers += [ResNetBottleneck(c2, width, 1, attention) for _ in range(blocks - 1)]
        super().__init__(*layers)

    @classmethod
    def yaml_args(cls, ch: list[int], args: list[Any], n: int, ctx: BuildContext) -> LayerSpec:
        c2, *rest = args
        return LayerSpec([ch[0], int(c2), int(n), *rest], int(c2))
