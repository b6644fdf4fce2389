"""Attention layers that keep their input shape: CBAM and its relatives, made by name.

Every layer takes ``channels`` first, so ``create_attention(name, channels)`` can build any of them and
an ablation is a one-word change in a model YAML. Global pooling uses ``mean``/``amax`` over the spatial
axes rather than adaptive pooling modules, which keeps the ONNX graph free of AdaptiveMaxPool2d.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from models.registry import KeepsChannels, register


def _hidden(channels: int, reduction: int) -> int:
    return max(channels // reduction, 1)


@register
class ChannelAttention(KeepsChannels, nn.Module):
    """CBAM channel attention: sigmoid(MLP(avgpool x) + MLP(maxpool x)) * x; shared MLP C -> C/r -> C."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = _hidden(channels, reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> channel weights (B, C, 1, 1) in 0..1."""
        pooled = torch.cat((x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)))  # (2B, C, 1, 1)
        avg, mx = self.act(self.fc1(pooled)).chunk(2)
        return torch.sigmoid(self.fc2(avg + mx))  # fc2 is linear (no bias): fc2(a) + fc2(b) == fc2(a + b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(x)


@register
class SpatialAttention(KeepsChannels, nn.Module):
    """CBAM spatial attention: sigmoid(conv7x7([mean_c x, max_c x])) * x."""

    def __init__(self, channels: int = 0, kernel_size: int = 7):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> spatial map (B, 1, H, W) in 0..1."""
        pooled = torch.cat((x.mean(1, keepdim=True), x.amax(1, keepdim=True)), 1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(x)


@register
class CBAM(KeepsChannels, nn.Module):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018): channel, then spatial attention."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


@register
class SE(KeepsChannels, nn.Module):
    """Squeeze-and-excitation (Hu et al., 2018): sigmoid(MLP(avgpool x)) * x."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = _hidden(channels, reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))


@register
class ECA(KeepsChannels, nn.Module):
    """Efficient channel attention (Wang et al., 2020): 1-D conv across pooled channels, k from C."""

    def __init__(self, channels: int, gamma: int = 2, b: int = 1):
        super().__init__()
        k = int(abs((math.log2(channels) + b) / gamma))
        k = k if k % 2 else k + 1
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3)).unsqueeze(1)  # (B, 1, C)
        y = torch.sigmoid(self.conv(y)).transpose(1, 2).unsqueeze(-1)  # (B, C, 1, 1)
        return x * y


@register
class CoordAtt(KeepsChannels, nn.Module):
    """Coordinate attention (Hou et al., CVPR 2021): direction-aware pooling along H and W."""

    def __init__(self, channels: int, reduction: int = 32):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act = nn.Hardswish()
        self.conv_h = nn.Conv2d(hidden, channels, 1)
        self.conv_w = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        pool_h = x.mean(3, keepdim=True)  # (B, C, H, 1)
        pool_w = x.mean(2, keepdim=True).transpose(2, 3)  # (B, C, W, 1)
        y = self.act(self.bn1(self.conv1(torch.cat((pool_h, pool_w), 2))))
        y_h, y_w = torch.split(y, [h, w], 2)
        a_h = torch.sigmoid(self.conv_h(y_h))
        a_w = torch.sigmoid(self.conv_w(y_w.transpose(2, 3)))
        return x * a_h * a_w


@register
class SimAM(KeepsChannels, nn.Module):
    """Parameter-free attention (Yang et al., ICML 2021) from a per-neuron energy function."""

    def __init__(self, channels: int = 0, e_lambda: float = 1e-4):
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[2] * x.shape[3] - 1
        d = (x - x.mean((2, 3), keepdim=True)).pow(2)
        energy_inv = d / (4 * (d.sum((2, 3), keepdim=True) / max(n, 1) + self.e_lambda)) + 0.5
        return x * torch.sigmoid(energy_inv)


@register
class BAM(KeepsChannels, nn.Module):
    """Bottleneck attention (Park et al., BMVC 2018): channel and spatial branches summed, one sigmoid.

    Output is x * (1 + sigmoid(Mc(x) + Ms(x))), the paper's residual form.
    """

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4):
        super().__init__()
        hidden = _hidden(channels, reduction)
        self.channel = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )
        d = dilation
        self.spatial = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=d, dilation=d),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=d, dilation=d),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = torch.sigmoid(self.channel(x.mean((2, 3), keepdim=True)) + self.spatial(x))
        return x * (1 + att)


ATTENTION: dict[str, type[nn.Module]] = {
    "cbam": CBAM,
    "se": SE,
    "eca": ECA,
    "coordatt": CoordAtt,
    "simam": SimAM,
    "bam": BAM,
    "channel": ChannelAttention,
    "spatial": SpatialAttention,
}


def create_attention(name: str | None, channels: int, **kwargs) -> nn.Module:
    """Attention layer by name (case-insensitive); None, '' or 'none' give nn.Identity."""
    if name is None or str(name).lower() in ("", "none"):
        return nn.Identity()
    key = str(name).lower()
    if key not in ATTENTION:
        raise ValueError(f"unknown attention {name!r}; valid: none, {', '.join(ATTENTION)}")
    return ATTENTION[key](channels, **kwargs)


@register
class Attention(KeepsChannels, nn.Module):
    """YAML row wrapper: ``[-1, 1, Attention, [cbam]]`` builds the named attention for the input."""

    def __init__(self, channels: int, name: str | None = "cbam"):
        super().__init__()
        self.name = str(name)
        self.layer = create_attention(name, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)
