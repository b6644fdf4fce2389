"""One loader for every weights format: PyTorch checkpoints, TorchScript, ONNX and OpenVINO.

``AutoBackend(weights)`` returns a callable that maps a float BCHW RGB 0..1 batch to decoded
predictions (bs, N, 5 + nc) in input pixels, plus the stride and class names a caller needs.
Exported files carry their own metadata (written by export.py), so no checkpoint is needed beside them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from models.packed import pack_convolutions
from utils.checkpoints import load_checkpoint, model_from_checkpoint
from utils.export.common import require
from utils.export.metadata import ExportMetadata
from utils.general import LOGGER
from utils.torch_utils import compile_for_inference, conv_memory_format, half_dtype, retain_freed_memory

SUPPORTED_FORMATS = {
    "PyTorch": ".pt",
    "TorchScript": ".torchscript",
    "ONNX": ".onnx (onnxruntime, or OpenCV DNN with dnn=True)",
    "OpenVINO": "*_openvino_model/ folder or its .xml",
}

Runner = Callable[[torch.Tensor], torch.Tensor]  # one batch in (model dtype), predictions out


def weights_format(weights: str | Path) -> str:
    """'pt', 'torchscript', 'onnx' or 'openvino' from the path; ValueError listing the supported formats."""
    p = Path(weights)
    suffix = p.suffix.lower()
    if suffix in (".pt", ".torchscript", ".onnx"):
        return suffix[1:]
    if suffix == ".xml" or p.name.endswith("_openvino_model") or (p.is_dir() and any(p.glob("*.xml"))):
        return "openvino"
    formats = "; ".join(f"{k} {v}" for k, v in SUPPORTED_FORMATS.items())
    raise ValueError(f"unsupported weights format {suffix or p.name!r} for {weights}; supported: {formats}")


class AutoBackend(nn.Module):
    """Inference wrapper over a .pt checkpoint or an export of one.

    Attributes: stride (int, pixels), names ({id: name}), nc, pt/jit/onnx/xml (which format),
    dnn, dynamic (any batch and size accepted), imgsz ((h, w) of a fixed-size export, else None),
    batch_size (batch of a fixed-batch export, else None), fp16 (inputs are cast to half), bf16
    (a .pt model runs under CPU bf16 autocast), compiled (the torch.compile wrapper of a .pt model, or None).

    ``fp16`` asks for reduced precision, as ``--half`` does: fp16 weights on CUDA; bf16 autocast on
    a CPU with native bf16 (AVX512-BF16 or AMX); elsewhere a warning and fp32, which is faster there.
    ``compile`` wraps a .pt model in ``torch.compile`` with frozen weights: the first batch of each
    new input shape is slow while it compiles, later ones are faster; --augment and --visualize run
    the eager model. Without it, a fused .pt model on a CPU runs its convolutions with weights
    pre-packed for oneDNN (models/packed.py).
    """

    def __init__(self, weights: str | Path, device: torch.device | str = "cpu", dnn: bool = False,
                 fp16: bool = False, fuse: bool = True, compile: bool = False):  # fmt: skip
        super().__init__()
        self.weights = Path(weights)
        self.device = torch.device(device)
        fmt = weights_format(self.weights)
        if fmt != "openvino" and not self.weights.is_file():
            raise FileNotFoundError(f"weights not found: {self.weights}")
        self.pt, self.jit, self.onnx, self.xml = (fmt == f for f in ("pt", "torchscript", "onnx", "openvino"))
        self.dnn = bool(dnn and self.onnx)
        self.fp16 = self.bf16 = False
        self.compiled: Runner | None = None
        self.dynamic = True
        self.imgsz: tuple[int, int] | None = None  # fixed input size of an export, None if any
        self.batch_size: int | None = None  # fixed batch of an export, None if any
        if compile and not self.pt:
            LOGGER.warning(f"WARNING: --compile applies to .pt weights; {self.weights.name} runs as exported")
        if self.pt:
            self._load_pt(fuse, fp16, compile)
        else:
            self._load_export(fmt, fp16)

    def _load_pt(self, fuse: bool, half: bool, compile: bool) -> None:
        ckpt = load_checkpoint(self.weights)  # a foreign pickle raises CheckpointError: never caught here
        self.model = model_from_checkpoint(ckpt, device=self.device, fuse=fuse).requires_grad_(False)
        dtype = _half_dtype_or_warn(self.device) if half else None
        self.fp16, self.bf16 = dtype == torch.float16, dtype == torch.bfloat16
        if self.fp16:
            self.model.half()
        self.memory_format = conv_memory_format(self.device)
        self.model.to(memory_format=self.memory_format)
        if self.device.type == "cpu":
            retain_freed_memory()  # 640 px, batch 1: 360 -> 315 ms (no page faults on activations)
        if compile:
            self.compiled = compile_for_inference(self.model)  # inductor packs weights itself
        elif self.device.type == "cpu" and fuse:  # weights reordered once, not per call: 320 px 100 -> 77 ms
            pack_convolutions(self.model)
        self.stride = int(self.model.stride.max())
        self.names: dict[int, str] = dict(self.model.names)
        self.nc = len(self.names)

    def _load_export(self, fmt: str, half: bool) -> None:
        self.model = None  # no nn.Module to visualise or fuse: the runtime owns the graph
        loaders = {"torchscript": _load_torchscript, "onnx": _load_dnn if self.dnn else _load_onnx,
                   "openvino": partial(_load_openvino, half=half)}  # fmt: skip
        self._run, raw_meta, model_fp16 = loaders[fmt](self.weights, self.device)
        self.fp16 = model_fp16  # the file decides its input dtype, not the caller
        meta = _parse_metadata(raw_meta, self.weights)
        self.stride = meta.stride
        self.names = dict(meta.names)
        self.nc = len(self.names)
        self.dynamic = meta.dynamic
        if not meta.dynamic:
            self.imgsz, self.batch_size = tuple(meta.imgsz), meta.batch
        LOGGER.info(f"Loaded {self.weights} ({fmt}, {'dynamic' if self.dynamic else f'fixed {self.imgsz}'})")

    def forward(self, im: torch.Tensor, augment: bool = False, visualize: Any = False) -> torch.Tensor:
        """(B, 3, H, W) float 0..1 -> predictions (B, N, 5 + nc) on im's device."""
        if self.pt:
            x = im.to(self.device)
            x = x.half() if self.fp16 else x.float()
            x = x.contiguous(memory_format=self.memory_format)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                if self.compiled is not None and not (augment or visualize):
                    y = self.compiled(x)
                else:
                    y = self.model(x, augment=augment, visualize=visualize)
            return y[0].to(im.device)
        if augment or visualize:
            raise ValueError(f"--augment and --visualize need .pt weights; {self.weights.name} is an export")
        self._check_shape(im)
        x = im.to(self.device)
        x = x.half() if self.fp16 else x.float()
        step = self.batch_size or x.shape[0]
        preds = [self._run(x[i : i + step]) for i in range(0, x.shape[0], step)]  # fixed batch: chunks
        return torch.cat(preds, 0).to(im.device)

    def _check_shape(self, im: torch.Tensor) -> None:
        if self.imgsz is not None and tuple(im.shape[2:]) != tuple(self.imgsz):
            h, w = self.imgsz
            raise ValueError(
                f"{self.weights.name} was exported for {h}x{w} images but got {im.shape[2]}x{im.shape[3]}; "
                f"use --imgsz {h} {w} or re-export with --dynamic"
            )
        if self.batch_size is not None and im.shape[0] % self.batch_size:
            raise ValueError(
                f"{self.weights.name} was exported for batch {self.batch_size} but got {im.shape[0]} images; "
                f"use a multiple of {self.batch_size} or re-export with --dynamic"
            )

    def warmup(self, imgsz: tuple[int, int, int, int] = (1, 3, 640, 640)) -> None:
        """One blank forward pass (at the export's own fixed shape when it has one)."""
        b, c, h, w = imgsz
        if self.imgsz is not None:
            h, w = self.imgsz
        if self.batch_size is not None:
            b = self.batch_size
        with torch.no_grad():
            self.forward(torch.zeros(b, c, h, w, device=self.device))


def _parse_metadata(raw: dict[str, Any], weights: Path) -> ExportMetadata:
    try:
        return ExportMetadata.from_dict(raw, source=str(weights))
    except ValueError as e:
        raise ValueError(f"{e}; re-export the checkpoint with export.py") from None


def _load_torchscript(path: Path, device: torch.device) -> tuple[Runner, dict[str, Any], bool]:
    from utils.export.torchscript import load_torchscript

    module, meta = load_torchscript(path, map_location=device)
    module.eval()
    fp16 = any(p.dtype == torch.float16 for p in module.parameters())

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = module(x)
        return (out[0] if isinstance(out, (tuple, list)) else out).float()

    return run, meta, fp16


def _load_onnx(path: Path, device: torch.device) -> tuple[Runner, dict[str, Any], bool]:
    ort = require("onnxruntime", purpose="running .onnx weights")
    wanted = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device.type == "cuda"
        else ["CPUExecutionProvider"]
    )
    available = ort.get_available_providers()
    providers = [p for p in wanted if p in available]
    if device.type == "cuda" and "CUDAExecutionProvider" not in available:
        LOGGER.warning(
            "WARNING: onnxruntime has no CUDA provider (pip install onnxruntime-gpu); running on CPU"
        )
    session = ort.InferenceSession(str(path), providers=providers)
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    fp16 = inp.type == "tensor(float16)"

    def run(x: torch.Tensor) -> torch.Tensor:
        y = session.run([out.name], {inp.name: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(np.asarray(y, dtype=np.float32))

    return run, dict(session.get_modelmeta().custom_metadata_map), fp16


def _load_dnn(path: Path, device: torch.device) -> tuple[Runner, dict[str, Any], bool]:
    import cv2

    from utils.export.onnx_format import read_onnx_metadata

    net = cv2.dnn.readNetFromONNX(str(path))
    if device.type == "cuda":
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_CUDA)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CUDA)

    def run(x: torch.Tensor) -> torch.Tensor:
        net.setInput(x.detach().cpu().float().numpy())
        return torch.from_numpy(np.asarray(net.forward(), dtype=np.float32))

    return run, read_onnx_metadata(path), False


def _half_dtype_or_warn(device: torch.device) -> torch.dtype | None:
    """``half_dtype(device)``, with a warning where --half falls back to fp32."""
    dtype = half_dtype(device)
    if dtype is None:
        LOGGER.warning(f"WARNING: --half: no faster reduced precision on {device} (fp16 needs CUDA, bf16 a CPU "
                       "with AVX512-BF16 or AMX); running fp32")  # fmt: skip
    return dtype


def _load_openvino(
    path: Path, device: torch.device, half: bool = False
) -> tuple[Runner, dict[str, Any], bool]:
    """OpenVINO on the CPU (its GPU device means Intel GPUs), in fp32 unless ``half``.

    OpenVINO would pick bf16 by itself on a CPU with native bf16; the precision is set explicitly so
    that, as for .pt weights, reduced precision is what ``--half`` asks for and nothing else.
    """
    ov = require("openvino", purpose="running OpenVINO weights")
    from utils.export.openvino_format import find_openvino_xml, read_openvino_metadata

    xml = find_openvino_xml(path)
    bf16 = half and _half_dtype_or_warn(torch.device("cpu")) == torch.bfloat16
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
    output = compiled.output(0)

    def run(x: torch.Tensor) -> torch.Tensor:
        y = compiled(x.detach().cpu().float().numpy())[output]
        return torch.from_numpy(np.asarray(y, dtype=np.float32))

    return run, read_openvino_metadata(xml.parent), False
