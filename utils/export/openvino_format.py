"""OpenVINO export: IR (.xml + .bin) converted from the ONNX graph, metadata.yaml, optional INT8.

The folder is ``<stem>_openvino_model/`` holding ``<stem>.xml``, ``<stem>.bin`` and ``metadata.yaml``.
Converting the ONNX graph (the one ONNX export checks) takes about a tenth of the time of OpenVINO's
own PyTorch tracing. INT8 uses NNCF post-training quantisation calibrated on a dataset's images.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.export.common import quiet_loggers, require
from utils.export.metadata import OPENVINO_METADATA, ExportMetadata
from utils.export.onnx_format import trace_to_onnx
from utils.general import LOGGER, yaml_load, yaml_save

OPENVINO_SUFFIX = "_openvino_model"
# keep the box decoding (sigmoid, multiplies) in float: INT8 there costs box accuracy for no speed
INT8_IGNORED_TYPES = ["Multiply", "Subtract", "Sigmoid"]


def openvino_folder(weights: str | Path, int8: bool = False) -> Path:
    """best.pt -> best_openvino_model/ beside it; best_int8_openvino_model/ for an int8 export."""
    weights = Path(weights)
    return weights.with_name(f"{weights.stem}{'_int8' if int8 else ''}{OPENVINO_SUFFIX}")


def export_openvino(model: nn.Module, im: torch.Tensor, folder: str | Path, meta: ExportMetadata,
                    dynamic: bool = False, half: bool = False,
                    calibration: Iterable[np.ndarray] | None = None) -> Path:  # fmt: skip
    """Convert an fp32 CPU ``model`` traced on ``im`` (B, 3, H, W) to IR in ``folder``; returns the folder.

    ``dynamic`` leaves batch, height and width open; ``half`` stores weights as fp16 (inputs and
    outputs stay fp32); ``calibration`` (float32 (B, 3, H, W) arrays in 0..1) turns on INT8.
    """
    ov = require("openvino", purpose="OpenVINO export")
    if calibration is not None:
        require("nncf", purpose="--int8 OpenVINO quantisation")  # fail before the slow conversion
    if next(model.parameters()).dtype != torch.float32 or im.device.type != "cpu":
        raise ValueError("export_openvino takes an fp32 model on CPU (fp16 weights come from half=True)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder.name.removesuffix(OPENVINO_SUFFIX) or "model"
    int8 = calibration is not None
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # the IR is saved while the ONNX file exists
        onnx_path = trace_to_onnx(model, im, Path(tmp) / "graph.onnx", dynamic=dynamic)
        ov_model = ov.convert_model(str(onnx_path))
        if int8:
            ov_model = quantize_int8(ov_model, calibration)
        ov.save_model(ov_model, str(folder / f"{stem}.xml"), compress_to_fp16=half)
    fields = meta.with_format("openvino", dynamic=dynamic, half=half, int8=int8).to_dict()
    yaml_save(folder / OPENVINO_METADATA, fields)
    return folder


def quantize_int8(ov_model: Any, calibration: Iterable[np.ndarray], subset_size: int = 300) -> Any:
    """NNCF post-training INT8 quantisation of an OpenVINO model on up to subset_size batches."""
    nncf = require("nncf", purpose="--int8 OpenVINO quantisation")
    batches = list(calibration)
    if not batches:
        raise ValueError("--int8: the calibration set is empty; check --data")
    LOGGER.info(f"OpenVINO: INT8 quantisation with NNCF {nncf.__version__} on {len(batches)} batches")
    # nncf logs each layer it leaves in float at INFO; torch warns of no CUDA when nncf loads its extensions
    with quiet_loggers("nncf"), quiet_loggers("torch.utils.cpp_extension", level=logging.ERROR):
        return nncf.quantize(
            ov_model,
            nncf.Dataset(batches),
            preset=nncf.QuantizationPreset.MIXED,
            subset_size=min(subset_size, len(batches)),
            ignored_scope=nncf.IgnoredScope(types=INT8_IGNORED_TYPES, validate=False),
        )


def calibration_batches(data: str | Path, imgsz: tuple[int, int], batch_size: int, stride: int,
                        limit: int = 300) -> Iterator[np.ndarray]:  # fmt: skip
    """Float32 (B, 3, h, w) batches in 0..1 from the val split of a dataset YAML, for INT8 calibration.

    Images are letterboxed to max(imgsz) by the dataloader, then resized to exactly ``imgsz`` so a
    fixed-shape model accepts them; at most ``limit`` batches are produced.
    """
    from utils.dataloaders import create_dataloader  # local: only --int8 needs the data pipeline
    from utils.dataset_config import check_dataset

    cfg = check_dataset(data, autodownload=False)
    split = cfg.get("val") or cfg.get("train")
    if not split:
        raise ValueError(f"{data}: no val or train images to calibrate --int8 on")
    loader, _ = create_dataloader(split, max(imgsz), batch_size, stride, workers=0, prefix="calibration: ")
    for i, (imgs, *_rest) in enumerate(loader):
        if i >= limit:
            break
        x = imgs.float() / 255
        if tuple(x.shape[2:]) != tuple(imgsz):
            x = F.interpolate(x, size=tuple(imgsz), mode="bilinear", align_corners=False)
        yield x.numpy()


def read_openvino_metadata(folder: str | Path) -> dict[str, Any]:
    """metadata.yaml of an OpenVINO folder ({} when absent)."""
    path = Path(folder) / OPENVINO_METADATA
    return yaml_load(path) if path.is_file() else {}


def find_openvino_xml(weights: str | Path) -> Path:
    """The .xml of an OpenVINO folder (or the .xml path itself); clear error when there is none."""
    weights = Path(weights)
    if weights.suffix.lower() == ".xml":
        if not weights.is_file():
            raise FileNotFoundError(f"OpenVINO model not found: {weights}")
        return weights
    xmls = sorted(weights.glob("*.xml")) if weights.is_dir() else []
    if len(xmls) != 1:
        found = f"found {len(xmls)}" if weights.is_dir() else "folder does not exist"
        raise FileNotFoundError(f"{weights}: expected one .xml in an OpenVINO model folder ({found})")
    return xmls[0]
