"""YOLO detection model built from a YAML file: parse_model, the Detect head and DetectionModel.

Usage: python models/yolo.py --cfg yolov5-resnet50-cbam.yaml [--profile] [--test] [--weights FILE]
"""

from __future__ import annotations

import argparse
import math
import reprlib
import sys
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python models/yolo.py` from anywhere
    sys.path.insert(0, str(ROOT))

import models.common  # noqa: E402,F401  (registers the building blocks)
from models.registry import (  # noqa: E402
    BuildContext,
    LayerSpec,
    YamlError,
    lookup,
    make_activation,
    register,
    resolve_arg,  # noqa: E402
)
from utils.general import LOGGER, setup_logging, yaml_load  # noqa: E402
from utils.torch_utils import initialize_weights, model_info, profile_layers  # noqa: E402

MODELS_DIR = Path(__file__).resolve().parent
DEFAULT_ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


@register
class Detect(nn.Module):
    """Anchor-based head: per level a 1x1 conv to na * (5 + nc) channels, decoded to pixel boxes.

    Training returns raw maps (bs, na, ny, nx, 5 + nc); eval returns (decoded (bs, N, 5 + nc), raw maps)
    with xy = (2 s_xy - 0.5 + grid) * stride and wh = (2 s_wh)^2 * anchor, s = sigmoid(output).
    """

    def __init__(self, nc: int = 80, anchors: Any = (), ch: tuple[int, ...] = ()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        anchors_px = torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2)
        self.register_buffer("anchors", anchors_px)  # pixels until DetectionModel divides by stride
        self.register_buffer("stride", torch.ones(self.nl))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    @classmethod
    def yaml_args(cls, ch: list[int], args: list[Any], n: int, ctx: BuildContext) -> LayerSpec:
        nc, anchors = (list(args) + [ctx.nc, ctx.anchors])[:2]
        if isinstance(anchors, int):  # anchors: 3 -> placeholder geometric anchors, AutoAnchor refits
            anchors = [[float(a) for a in DEFAULT_ANCHORS[i % 3]][: 2 * anchors] for i in range(len(ch))]
        return LayerSpec([nc, anchors, list(ch)], 0)

    def decode(self, p: torch.Tensor, i: int) -> torch.Tensor:
        """Raw map (bs, na, ny, nx, no) of level i -> (bs, na*ny*nx, no) boxes in pixels, scores in 0..1."""
        if p.dtype == torch.bfloat16:  # 8 mantissa bits would round coordinates to whole pixels and worse
            p = p.float()
        bs, na, ny, nx, no = p.shape
        ys = torch.arange(ny, device=p.device, dtype=p.dtype)
        xs = torch.arange(nx, device=p.device, dtype=p.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack((gx, gy), -1).view(1, 1, ny, nx, 2) - 0.5
        anchor = (self.anchors[i] * self.stride[i]).view(1, na, 1, 1, 2).to(p.dtype)
        xy, wh, scores = p.sigmoid().split((2, 2, no - 4), -1)
        xy = (xy * 2 + grid) * self.stride[i]
        wh = (wh * 2) ** 2 * anchor
        return torch.cat((xy, wh, scores), -1).view(bs, -1, no)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        raw = []
        for i, x in enumerate(xs):
            y = self.m[i](x)
            bs, _, ny, nx = y.shape
            raw.append(y.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
        if self.training:
            return raw
        return torch.cat([self.decode(p, i) for i, p in enumerate(raw)], 1), raw


def resolve_cfg(cfg: str | Path) -> Path:
    """A path as given, or a bare name found in models/ (with or without .yaml)."""
    p = Path(cfg)
    candidates = [p, MODELS_DIR / p.name, MODELS_DIR / f"{p.name}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"model config not found: {cfg} (looked in . and {MODELS_DIR})")


def load_model_yaml(cfg: str | Path) -> dict[str, Any]:
    """Read a model YAML (safe loader) and check its top-level keys."""
    path = resolve_cfg(cfg)
    d = yaml_load(path)
    for key in ("backbone", "head"):
        if not isinstance(d.get(key), list):
            raise YamlError(f"{path}: missing or invalid '{key}' list")
    d["yaml_file"] = str(path)
    return d


# What building a row from wrong YAML values can raise inside torch and the block constructors.
BUILD_ERRORS = (KeyError, ValueError, TypeError, IndexError, RuntimeError, ArithmeticError)
MAX_ARG_ITEMS = 10_000  # YAML aliases can nest lists exponentially; real rows hold a few dozen values


def _source(d: dict) -> str:
    return str(d.get("yaml_file", "model YAML"))


def _reason(e: BaseException) -> str:
    """The message of an exception (KeyError's str() would add quotes around it)."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _row_error(d: dict, i: int, row: Any, msg: str) -> YamlError:
    return YamlError(f"{_source(d)}: row {i} {reprlib.repr(row)}: {msg}")


def _count_items(value: Any, limit: int) -> int:
    """Number of values in nested lists, counting stops past ``limit`` (so an alias bomb costs little)."""
    count, stack = 0, [value]
    while stack and count <= limit:
        v = stack.pop()
        count += 1
        if isinstance(v, (list, tuple)):
            stack.extend(v)
    return count


def _check_from(froms: list[Any], i: int) -> None:
    for x in froms:
        if isinstance(x, bool) or not isinstance(x, int) or not (x == -1 or -i <= x < i):
            raise ValueError(f"'from' {x!r} must be -1 or an earlier row (0..{i - 1}, or -1..-{i})")


def _positive(d: dict, key: str, default: float) -> float:
    value = float(d.get(key, default))
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"'{key}' must be a positive number, got {d.get(key)!r}")
    return value


def build_context(d: dict[str, Any]) -> BuildContext:
    """Model-wide settings of a model dict, checked; YamlError naming the file otherwise."""
    try:
        missing = [key for key in ("nc", "backbone", "head") if key not in d]
        if missing:
            raise ValueError(f"missing {', '.join(repr(k) for k in missing)}")
        if not isinstance(d["backbone"], list) or not isinstance(d["head"], list):
            raise TypeError("'backbone' and 'head' must be lists of rows")
        nc = int(d["nc"])
        if nc < 1 or isinstance(d["nc"], bool):
            raise ValueError(f"'nc' must be a positive number of classes, got {d['nc']!r}")
        anchors = d.get("anchors", DEFAULT_ANCHORS)
        if _count_items(anchors, MAX_ARG_ITEMS) > MAX_ARG_ITEMS:
            raise ValueError("'anchors' holds too many values")
        activation = d.get("activation")
        if activation is not None:
            make_activation(activation)  # fail early on unknown names
        return BuildContext(nc=nc, anchors=anchors, depth_multiple=_positive(d, "depth_multiple", 1.0),
                            width_multiple=_positive(d, "width_multiple", 1.0), activation=activation)  # fmt: skip
    except BUILD_ERRORS as e:
        raise YamlError(f"{_source(d)}: {_reason(e)}") from None


def parse_model(d: dict[str, Any], ch: int, verbose: bool = True) -> tuple[nn.Sequential, list[int]]:
    """Build the layers of a model dict. Returns (layers, sorted indices whose outputs later rows need)."""
    log = LOGGER.info if verbose else LOGGER.debug
    ctx = build_context(d)
    symbols = {"nc": ctx.nc, "anchors": ctx.anchors}
    log(f"\n{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<40}{'arguments':<30}")
    layers, save, channels = [], set(), []  # channels[j]: output channels of row j
    for i, row in enumerate(d["backbone"] + d["head"]):
        if not (isinstance(row, list) and len(row) == 4):
            raise _row_error(d, i, row, "each row must be [from, number, module, args]")
        f, n, name, args = row
        try:
            cls = lookup(name)
            if _count_items(args, MAX_ARG_ITEMS) > MAX_ARG_ITEMS:
                raise ValueError(f"arguments hold more than {MAX_ARG_ITEMS} values")
            args = resolve_arg(list(args) if isinstance(args, list) else [args], symbols)
            froms = [f] if isinstance(f, int) else list(f) if isinstance(f, list) else [f]
            _check_from(froms, i)
            ch_in = [channels[x] if channels else ch for x in froms]
            spec = _layer_spec(cls, ch_in, args, int(n), ctx)
            m = _instantiate(cls, spec)
        except BUILD_ERRORS as e:
            raise _row_error(d, i, row, _reason(e)) from None
        m.i, m.f, m.type = i, f, str(name)
        nparams = sum(p.numel() for p in m.parameters())
        log(f"{i:>3}{str(f):>18}{spec.repeats:>3}{nparams:10.0f}  {str(name):<40}{str(spec.args)[:60]:<30}")
        save.update(x % i for x in froms if x != -1)
        layers.append(m)
        channels.append(spec.c_out)
    return nn.Sequential(*layers), sorted(save)


def _layer_spec(cls: type[nn.Module], ch_in: list[int], args: list, n: int, ctx: BuildContext) -> LayerSpec:
    if hasattr(cls, "yaml_args"):
        return cls.yaml_args(ch_in, args, n, ctx)
    return LayerSpec(list(args), ch_in[0], ctx.depth(n))  # torch.nn modules keep their channels


def _instantiate(cls: type[nn.Module], spec: LayerSpec) -> nn.Module:
    if spec.repeats > 1:
        return nn.Sequential(*(cls(*spec.args, **spec.kwargs) for _ in range(spec.repeats)))
    return cls(*spec.args, **spec.kwargs)


class DetectionModel(nn.Module):
    """A YOLO detector assembled from a model YAML (path, bare name in models/, or dict)."""

    def __init__(self, cfg: str | Path | dict = "yolov5s.yaml", ch: int = 3, nc: int | None = None,
                 anchors: Any = None, verbose: bool = True):  # fmt: skip
        super().__init__()
        self.yaml = deepcopy(cfg) if isinstance(cfg, dict) else load_model_yaml(cfg)
        if nc is not None and nc != self.yaml.get("nc"):
            LOGGER.info(f"Overriding model.yaml nc={self.yaml.get('nc')} with nc={nc}")
            self.yaml["nc"] = int(nc)
        if anchors is not None:
            self.yaml["anchors"] = anchors
        try:  # a YAML whose rows build but do not fit together fails here: say which file
            ch = self.yaml["ch"] = int(self.yaml.get("ch", ch))
            if not 1 <= ch <= 1024:  # bounded: the stride probe allocates a ch x 64 x 64 image
                raise ValueError(f"'ch' (input channels) must be 1..1024, got {ch}")
            self.model, self.save = parse_model(self.yaml, ch, verbose)
            self.nc = int(self.yaml["nc"])
            self.names = {i: str(i) for i in range(self.nc)}
            self._setup_head(ch)
        except YamlError:
            raise
        except (*BUILD_ERRORS, AttributeError) as e:  # e.g. a row given a list input it cannot take
            raise YamlError(
                f"{_source(self.yaml)}: cannot build the model ({type(e).__name__}: {e})"
            ) from None
        initialize_weights(self)

    def _setup_head(self, ch: int) -> None:
        """Strides from a blank forward pass, anchors in stride units, prior biases."""
        detect = self.detect
        self.stride = self._probe_strides(ch)
        detect.stride.copy_(self.stride)
        check_anchor_order(detect)
        detect.anchors /= detect.stride.view(-1, 1, 1)
        self._initialize_biases()

    @property
    def detect(self) -> Detect:
        head = self.model[-1]
        if not isinstance(head, Detect):
            raise TypeError("the last row of a detection model YAML must be Detect")
        return head

    def _probe_strides(self, ch: int, size: int = 64) -> torch.Tensor:
        """Output strides from one forward pass of a blank image (train mode returns raw maps)."""
        was_training = self.training
        self.train()
        with torch.no_grad():
            outs = self._forward_once(torch.zeros(1, ch, size, size))
        self.train(was_training)
        return torch.tensor([size / o.shape[-2] for o in outs])

    def _initialize_biases(self) -> None:
        """Objectness prior of 8 objects per 640 image; class prior 0.6 spread over nc classes."""
        detect = self.detect
        for conv, s in zip(detect.m, detect.stride):
            b = conv.bias.detach().view(detect.na, -1)
            b[:, 4] += math.log(8 / (640 / float(s)) ** 2)
            b[:, 5 : 5 + detect.nc] += math.log(0.6 / (detect.nc - 0.99999))
            conv.bias.data.copy_(b.view(-1))

    def forward(self, x: torch.Tensor, augment: bool = False, profile: bool = False, visualize: Any = False):
        if augment:
            from models.tta import augmented_forward  # local: TTA is optional

            return augmented_forward(self, x)
        return self._forward_once(x, profile, visualize)

    def _forward_once(self, x: torch.Tensor, profile: bool = False, visualize: Any = False):
        outputs: list[torch.Tensor | None] = []
        timings = [] if profile else None
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            if timings is not None:
                timings.append(profile_layers(m, x))
            x = m(x)
            outputs.append(x if m.i in self.save else None)
            if visualize and callable(visualize):
                visualize(m, x)
        if timings is not None:
            _print_profile(self.model, timings)
        return x

    def fuse(self) -> DetectionModel:
        """Fold every BatchNorm into its convolution (YOLO and ResNet layers alike) for inference."""
        for m in self.modules():
            if m is not self and callable(getattr(m, "fuse", None)):
                m.fuse()
        return self

    def info(self, verbose: bool = False, imgsz: int = 640) -> dict[str, float]:
        return model_info(self, verbose=verbose, imgsz=imgsz)


Model = DetectionModel  # the name YOLOv5 users know


def check_anchor_order(detect: Detect) -> None:
    """Make anchor sizes grow with stride, flipping the level order if they were given backwards."""
    area = detect.anchors.prod(-1).mean(-1).view(-1)
    da, ds = area[-1] - area[0], detect.stride[-1] - detect.stride[0]
    if da and torch.sign(da) != torch.sign(ds):
        LOGGER.info("Reversing anchor order so that anchors grow with stride")
        detect.anchors[:] = detect.anchors.flip(0)


def _print_profile(layers: nn.Sequential, timings: list[tuple[float, float]]) -> None:
    LOGGER.info(f"{'time (ms)':>10s} {'GFLOPs':>10s} {'params':>10s}  module")
    for m, (ms, gflops) in zip(layers, timings):
        nparams = sum(p.numel() for p in m.parameters())
        LOGGER.info(f"{ms:10.2f} {gflops:10.2f} {nparams:10.0f}  {m.type}")
    LOGGER.info(f"{sum(t for t, _ in timings):10.2f} {'-':>10s} {'-':>10s}  Total")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a model from YAML and print its summary.")
    parser.add_argument("--cfg", type=str, default="yolov5s.yaml", help="model YAML path or name in models/")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--nc", type=int, default=None, help="override the YAML's class count")
    parser.add_argument(
        "--weights", type=str, default="", help="torchvision ResNet50 state dict for the backbone"
    )
    parser.add_argument("--profile", action="store_true", help="time and count FLOPs per layer")
    parser.add_argument("--test", action="store_true", help="build every YAML in models/")
    opt = parser.parse_args(argv)
    setup_logging()
    try:
        if opt.test:
            return _build_all()
        model = DetectionModel(opt.cfg, nc=opt.nc)
        if opt.weights:
            from models.pretrained import load_backbone_weights

            LOGGER.info(load_backbone_weights(model, opt.weights).summary())
        model.eval()
        model.info(verbose=False, imgsz=opt.imgsz)
        LOGGER.info(f"strides: {[int(s) for s in model.stride]}")
        if opt.profile:
            with torch.no_grad():
                model(torch.rand(opt.batch_size, 3, opt.imgsz, opt.imgsz), profile=True)
    except (FileNotFoundError, YamlError, ValueError) as e:
        LOGGER.error(f"ERROR: {e}")
        return 1
    return 0


def _build_all() -> int:
    failed = []
    for cfg in sorted(MODELS_DIR.glob("*.yaml")):
        try:
            model = DetectionModel(cfg, verbose=False)
            params = sum(p.numel() for p in model.parameters())
            LOGGER.info(f"{cfg.name:<36} OK  strides {[int(s) for s in model.stride]}  {params:>12,} params")
        except Exception as e:  # report every failure, then fail the run
            failed.append(cfg.name)
            LOGGER.error(f"{cfg.name:<36} FAILED: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
