"""ONNX export with the TorchScript-based exporter, graph checks, optional simplification, metadata.

torch 2.9+ defaults ``torch.onnx.export`` to the dynamo exporter, which needs onnxscript; the
TorchScript-based exporter (``dynamo=False``) needs nothing extra and handles the dynamic batch,
height and width this model needs, so it is used throughout.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from utils.export.common import ExportError, PredictionOnly, is_installed, quiet_tracing, require
from utils.export.metadata import ExportMetadata
from utils.general import LOGGER

PREFERRED_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "output0"
DYNAMIC_AXES = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 1: "anchors"}}


def default_opset() -> int:
    """PREFERRED_OPSET, or the newest opset the installed onnx package knows if that is older."""
    onnx = require("onnx", purpose="ONNX export")
    return min(PREFERRED_OPSET, int(onnx.defs.onnx_opset_version()))


def trace_to_onnx(model: nn.Module, im: torch.Tensor, path: str | Path, opset: int | None = None,
                  dynamic: bool = False) -> Path:  # fmt: skip
    """Write the bare ONNX graph of ``model`` (wrapped to return predictions only) traced on ``im``.

    Input ``images`` (B, 3, H, W) float 0..1, output ``output0`` (B, N, 5 + nc); with ``dynamic``
    the batch, height and width axes are symbolic. Needs the onnx package (the exporter does).
    """
    require("onnx", purpose="ONNX export")
    opset = opset or default_opset()
    wrapped = model if isinstance(model, PredictionOnly) else PredictionOnly(model)
    wrapped.eval()
    params = inspect.signature(torch.onnx.export).parameters
    kwargs: dict[str, Any] = {"dynamo": False} if "dynamo" in params else {}
    try:
        with torch.no_grad(), quiet_tracing():
            torch.onnx.export(wrapped, (im,), str(path), opset_version=opset, do_constant_folding=True,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=DYNAMIC_AXES if dynamic else None, **kwargs)  # fmt: skip
    except (ValueError, RuntimeError) as e:  # e.g. an opset the exporter does not support
        raise ExportError(f"ONNX export failed at opset {opset}: {str(e).splitlines()[0]}") from e
    return Path(path)


def export_onnx(model: nn.Module, im: torch.Tensor, path: str | Path, meta: ExportMetadata,
                opset: int | None = None, dynamic: bool = False, simplify: bool = False) -> Path:  # fmt: skip
    """``trace_to_onnx``, then check the graph, optionally simplify it and store ``meta`` in it.

    Raises ExportError if the graph holds adaptive pooling or ATen fallback nodes,
    MissingDependencyError when onnx is not installed.
    """
    onnx = require("onnx", purpose="ONNX export")
    path = trace_to_onnx(model, im, path, opset, dynamic)
    model_onnx = onnx.load(str(path))
    onnx.checker.check_model(model_onnx)
    check_onnx_ops(model_onnx)
    if simplify:
        model_onnx = simplify_onnx(model_onnx)
    set_onnx_metadata(model_onnx, meta.with_format("onnx", dynamic=dynamic))
    onnx.save(model_onnx, str(path))
    return path


def onnx_node_types(model_onnx: Any) -> set[str]:
    """Every node op_type in a ModelProto (or .onnx path), subgraphs of If/Loop included."""
    if isinstance(model_onnx, (str, Path)):
        model_onnx = require("onnx").load(str(model_onnx))
    types: set[str] = set()
    stack = [model_onnx.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            types.add(node.op_type)
            stack.extend(a.g for a in node.attribute if a.HasField("g"))
            stack.extend(a.graphs for a in node.attribute if len(a.graphs))
    return types


def check_onnx_ops(model_onnx: Any) -> None:
    """Refuse graphs with adaptive pooling or ATen fallback ops (runtimes like OpenVINO reject them).

    CBAM here pools with mean/amax, which export as ReduceMean/ReduceMax.
    """
    bad = sorted(t for t in onnx_node_types(model_onnx) if "adaptive" in t.lower() or t == "ATen")
    if bad:
        raise ExportError(f"ONNX graph holds unsupported ops {bad}; replace adaptive pooling with mean/amax")


def simplify_onnx(model_onnx: Any) -> Any:
    """Simplify with onnxslim, else onnxsim; without either, warn and return the model unchanged."""
    if is_installed("onnxslim"):
        import onnxslim

        LOGGER.info(f"ONNX: simplifying with onnxslim {getattr(onnxslim, '__version__', '')}")
        return onnxslim.slim(model_onnx)
    if is_installed("onnxsim"):
        import onnxsim

        LOGGER.info(f"ONNX: simplifying with onnxsim {getattr(onnxsim, '__version__', '')}")
        simplified, ok = onnxsim.simplify(model_onnx)
        if not ok:
            raise ExportError("onnxsim could not verify the simplified graph; export without --simplify")
        return simplified
    LOGGER.warning(
        "WARNING: --simplify skipped: neither onnxslim nor onnxsim is installed (pip install onnxslim)"
    )
    return model_onnx


def set_onnx_metadata(model_onnx: Any, meta: ExportMetadata) -> None:
    """Replace the model's metadata_props with one JSON-encoded entry per metadata field."""
    del model_onnx.metadata_props[:]
    for key, value in meta.to_strings().items():
        entry = model_onnx.metadata_props.add()
        entry.key, entry.value = key, value


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """metadata_props of an .onnx file as a dict of strings (needs the onnx package)."""
    onnx = require("onnx", purpose="reading ONNX metadata")
    model_onnx = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model_onnx.metadata_props}
