"""Export a trained detector to TorchScript, ONNX and OpenVINO, each file carrying its metadata.

``run_export(weights, ExportOptions(...))`` is what export.py calls; the per-format functions
(``export_torchscript``, ``export_onnx``, ``export_openvino``) take a model and an example input.
"""

from utils.export.common import (
    ExportError,
    ExportResult,
    MissingDependencyError,
    PredictionOnly,
    require,
)
from utils.export.metadata import ExportMetadata
from utils.export.onnx_format import check_onnx_ops, export_onnx, onnx_node_types
from utils.export.openvino_format import export_openvino
from utils.export.runner import FORMAT_NAMES, ExportOptions, ExportRun, export_path, parse_include, run_export
from utils.export.torchscript import export_torchscript

__all__ = [
    "FORMAT_NAMES",
    "ExportError",
    "ExportMetadata",
    "ExportOptions",
    "ExportResult",
    "ExportRun",
    "MissingDependencyError",
    "PredictionOnly",
    "check_onnx_ops",
    "export_onnx",
    "export_openvino",
    "export_path",
    "export_torchscript",
    "onnx_node_types",
    "parse_include",
    "require",
    "run_export",
]
