"""Table of modules that model YAMLs may name, and safe parsing of YAML row arguments.

A class joins the table with ``@register``. Each registered class says how a YAML row maps to its
constructor through ``yaml_args`` (see ``LayerSpec``); ``parse_model`` only looks names up here (or in
``torch.nn``) and never grows a branch per class. Nothing from a YAML file is ever evaluated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from utils.general import make_divisible

MODULES: dict[str, type[nn.Module]] = {}

_SAFE_STRING = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_ACTIVATIONS = {
    "SiLU": nn.SiLU,
    "ReLU": nn.ReLU,
    "LeakyReLU": lambda: nn.LeakyReLU(0.1),
    "Hardswish": nn.Hardswish,
    "Mish": nn.Mish,
    "GELU": nn.GELU,
    "Identity": nn.Identity,
}


class YamlError(ValueError):
    """A model YAML that cannot be built; the message names the file and the row."""


@dataclass(frozen=True)
class BuildContext:
    """Model-wide settings a row may need: multiples, class count, anchors, activation."""

    nc: int
    anchors: list[list[float]]
    depth_multiple: float = 1.0
    width_multiple: float = 1.0
    activation: str | None = None

    def depth(self, n: int) -> int:
        return max(round(n * self.depth_multiple), 1) if n > 1 else n

    def width(self, c: int) -> int:
        return make_divisible(c * self.width_multiple, 8)

    def act_kwargs(self) -> dict[str, Any]:
        return {} if self.activation is None else {"act": make_activation(self.activation)}


@dataclass
class LayerSpec:
    """How to build one YAML row: constructor args/kwargs, output channels, and copies in sequence."""

    args: list[Any]
    c_out: int
    repeats: int = 1
    kwargs: dict[str, Any] = field(default_factory=dict)


def register(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make ``cls`` usable by name in model YAMLs."""
    if not hasattr(cls, "yaml_args"):
        raise TypeError(f"{cls.__name__} needs a yaml_args classmethod to be registered")
    MODULES[cls.__name__] = cls
    return cls


def lookup(name: Any) -> type[nn.Module]:
    """Registered class or ``nn.<Name>`` module class for a YAML module name."""
    if isinstance(name, str) and name.startswith("nn."):
        obj = getattr(nn, name[3:], None) if _SAFE_STRING.match(name[3:]) else None
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            return obj
    elif isinstance(name, str) and name in MODULES:
        return MODULES[name]
    valid = ", ".join(sorted(MODULES)) + ", nn.<any torch.nn module>"
    raise KeyError(f"unknown module {name!r}; valid names: {valid}")


def make_activation(spec: str | None) -> nn.Module:
    """'SiLU', 'nn.SiLU' or 'nn.SiLU()' -> module; only names from a fixed table are accepted."""
    m = re.fullmatch(r"(?:nn\.)?(\w+)(?:\(\))?", str(spec))
    if not m or m.group(1) not in _ACTIVATIONS:
        raise KeyError(f"unknown activation {spec!r}; valid: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[m.group(1)]()


def resolve_arg(value: Any, symbols: dict[str, Any]) -> Any:
    """Turn one YAML argument into a Python value without evaluating anything.

    Numbers, booleans, None and lists pass through; the strings 'nc', 'anchors', 'None', 'True',
    'False' become their values; other strings must look like plain names ('nearest', 'cbam').
    Anything else (calls, operators, dunders) is refused.
    """
    if isinstance(value, list):
        return [resolve_arg(v, symbols) for v in value]
    if not isinstance(value, str):
        return value
    if value in symbols:
        return symbols[value]
    constants = {"None": None, "True": True, "False": False}
    if value in constants:
        return constants[value]
    if not _SAFE_STRING.match(value) or "__" in value:
        raise ValueError(f"argument {value!r} is not a plain value (code in YAML is never run)")
    return value


class ScaledChannels:
    """Mixin for YOLO blocks: ``args[0]`` is output channels, scaled by width_multiple.

    Constructor is called as ``cls(c_in, c_out, *args[1:])``. With ``repeats_inside`` the row's
    ``number`` (scaled by depth_multiple) becomes the third constructor argument (like C3).
    """

    repeats_inside = False

    @classmethod
    def yaml_args(cls, ch: list[int], args: list[Any], n: int, ctx: BuildContext) -> LayerSpec:
        c2 = ctx.width(args[0])
        rest = list(args[1:])
        n = ctx.depth(n)
        if cls.repeats_inside:
            return LayerSpec([ch[0], c2, n, *rest], c2, 1, ctx.act_kwargs())
        return LayerSpec([ch[0], c2, *rest], c2, n, ctx.act_kwargs())


class KeepsChannels:
    """Mixin for attention layers: called as ``cls(c_in, *args)``; output channels equal input."""

    @classmethod
    def yaml_args(cls, ch: list[int], args: list[Any], n: int, ctx: BuildContext) -> LayerSpec:
        return LayerSpec([ch[0], *args], ch[0], ctx.depth(n))
