"""Exports: TorchScript, ONNX and OpenVINO match PyTorch, carry their metadata, load through AutoBackend."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import export as export_cli
from models.backend import AutoBackend, weights_format
from models.registry import MODULES, KeepsChannels, ScaledChannels
from models.yolo import DetectionModel, parse_model
from utils.checkpoints import CheckpointError, build_checkpoint, model_from_checkpoint, save_checkpoint
from utils.export import (
    ExportError,
    ExportMetadata,
    ExportOptions,
    MissingDependencyError,
    PredictionOnly,
    check_onnx_ops,
    export_onnx,
    export_openvino,
    export_torchscript,
    onnx_node_types,
    parse_include,
    run_export,
)
from utils.export.torchscript import load_torchscript
from utils.general import yaml_load

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None

NAMES = {0: "circle", 1: "square", 2: "triangle"}
TOL = {"rtol": 1e-4, "atol": 1e-3}  # boxes are in pixels, scores in 0..1


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), **TOL)


def _checkpoint(cfg: str, path: Path) -> Path:
    model = DetectionModel(cfg, nc=len(NAMES), verbose=False)
    model.names = dict(NAMES)
    save_checkpoint(build_checkpoint(model), path)
    return path


def _reference(weights: Path) -> nn.Module:
    """The checkpoint's unfused PyTorch model, so fusion is covered by the comparison too."""
    return PredictionOnly(model_from_checkpoint(weights, fuse=False)).eval()


@pytest.fixture
def yolo_log(caplog):
    """caplog fed straight from the project logger (which may not propagate to the root logger)."""
    logger = logging.getLogger("yolo")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger="yolo"):
        yield caplog
    logger.removeHandler(caplog.handler)


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------------------- yolov5s
@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    """yolov5s (3 classes): a dynamic export at 1x128x128 and a fixed one at 2x96x128."""
    root = tmp_path_factory.mktemp("small")
    dyn = _checkpoint("yolov5s.yaml", root / "dyn.pt")
    fixed = root / "fixed.pt"
    fixed.write_bytes(dyn.read_bytes())
    formats = ("torchscript", "onnx", "openvino") if HAS_OPENVINO else ("torchscript", "onnx")
    dyn_run = run_export(dyn, ExportOptions(include=formats, imgsz=(128, 128), dynamic=True))
    fixed_run = run_export(fixed, ExportOptions(include=formats, imgsz=(96, 128), batch_size=2))
    assert dyn_run.ok and fixed_run.ok, [r.error for r in dyn_run.results + fixed_run.results]
    return {"weights": dyn, "dyn": dyn_run, "fixed": fixed_run, "ref": _reference(dyn)}


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "openvino"])
def test_dynamic_export_matches_pytorch_at_other_batch_and_size(small, fmt):
    if fmt == "openvino" and not HAS_OPENVINO:
        pytest.skip("openvino not installed")
    backend = AutoBackend(small["dyn"].result(fmt).path)
    assert backend.dynamic and backend.imgsz is None and backend.batch_size is None
    assert (backend.stride, backend.names, backend.nc) == (32, NAMES, 3)
    x = torch.rand(3, 3, 64, 160)  # exported at 1x3x128x128
    pred = _predict(backend, x)
    assert pred.shape == (3, 3 * (8 * 20 + 4 * 10 + 2 * 5), 8)
    _close(pred, _predict(small["ref"], x))


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
@pytest.mark.parametrize(
    ("half", "native_bf16", "hint"), [(False, True, "f32"), (True, True, "bf16"), (True, False, "f32")]
)
def test_openvino_precision_is_fp32_unless_half_asks_for_bf16(small, monkeypatch, half, native_bf16, hint):
    """OpenVINO would choose bf16 itself on a bf16 CPU; the backend sets f32, or bf16 for --half."""
    import openvino as ov

    from models import backend as backend_module

    configs = []

    class RecordingCore(ov.Core):
        def compile_model(self, model, device, config=None):
            configs.append((device, config))
            return super().compile_model(model, device, config)

    monkeypatch.setattr(ov, "Core", RecordingCore)
    monkeypatch.setattr(backend_module, "half_dtype", lambda device: torch.bfloat16 if native_bf16 else None)
    backend = AutoBackend(small["dyn"].result("openvino").path, fp16=half)
    assert configs == [("CPU", {"INFERENCE_PRECISION_HINT": hint})]
    if hint == "f32":  # fp32 everywhere, whatever the CPU
        x = torch.rand(1, 3, 64, 96)
        _close(_predict(backend, x), _predict(small["ref"], x))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "openvino"])
def test_fixed_export_through_autobackend(small, fmt):
    if fmt == "openvino" and not HAS_OPENVINO:
        pytest.skip("openvino not installed")
    backend = AutoBackend(small["fixed"].result(fmt).path)
    assert (backend.dynamic, backend.imgsz, backend.batch_size) == (False, (96, 128), 2)
    assert [backend.jit, backend.onnx, backend.xml, backend.pt] == [
        fmt == f for f in ("torchscript", "onnx", "openvino", "pt")
    ]
    x = torch.rand(4, 3, 96, 128)  # two chunks of the fixed batch
    _close(_predict(backend, x), _predict(small["ref"], x))
    backend.warmup()
    with pytest.raises(ValueError, match="exported for 96x128"):
        backend(torch.rand(2, 3, 128, 128))
    with pytest.raises(ValueError, match="batch 2"):
        backend(torch.rand(3, 3, 96, 128))


def test_onnx_dnn_backend_matches(small):
    backend = AutoBackend(small["dyn"].result("onnx").path, dnn=True)
    assert backend.dnn and backend.names == NAMES
    x = torch.rand(1, 3, 96, 96)
    _close(_predict(backend, x), _predict(small["ref"], x))


def test_every_file_carries_its_metadata(small):
    run = small["fixed"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # torch.jit.load's deprecation notice is not for users
        _, ts_meta = load_torchscript(run.result("torchscript").path)
    props = {p.key: p.value for p in onnx.load(str(run.result("onnx").path)).metadata_props}
    for raw in (ts_meta, props):
        meta = ExportMetadata.from_dict(raw)
        assert (meta.stride, meta.names, meta.imgsz, meta.batch, meta.dynamic) == (
            32,
            NAMES,
            (96, 128),
            2,
            False,
        )
    assert json.loads(props["names"]) == {str(k): v for k, v in NAMES.items()}
    if HAS_OPENVINO:
        folder = run.result("openvino").path
        assert folder.name == "fixed_openvino_model"
        assert {p.name for p in folder.iterdir()} == {"fixed.xml", "fixed.bin", "metadata.yaml"}
        assert AutoBackend(folder / "fixed.xml").imgsz == (96, 128)


def test_onnx_graph_io(small):
    session = ort.InferenceSession(str(small["dyn"].result("onnx").path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape, inp.type) == ("images", ["batch", 3, "height", "width"], "tensor(float)")
    assert (out.name, out.shape[:2], out.type) == ("output0", ["batch", "anchors"], "tensor(float)")


def test_cli_writes_beside_weights_and_explains_flags(small, tmp_path, yolo_log):
    weights = tmp_path / "best.pt"
    weights.write_bytes(small["weights"].read_bytes())
    argv = [
        "--weights",
        str(weights),
        "--include",
        "onnx",
        "--imgsz",
        "64",
        "96",
        "--half",
        "--nms",
        "--inplace",
    ]
    assert export_cli.main(argv) == 0
    assert (tmp_path / "best.onnx").is_file()
    log = yolo_log.text
    assert "--half needs a CUDA device" in log and "--nms is not supported yet" in log and "--inplace" in log
    assert (
        f"python detect.py --weights {tmp_path / 'best.onnx'} --source IMAGES_OR_VIDEO --imgsz 64 96" in log
    )
    assert export_cli.main(["--weights", str(weights), "--include", "tflite"]) == 1
    assert export_cli.main(["--weights", str(tmp_path / "missing.pt")]) == 1


# ------------------------------------------------------------------------------ ResNet50 + CBAM
@pytest.fixture(scope="module")
def cbam(tmp_path_factory) -> dict:
    """yolov5-resnet50-cbam (3 classes), fused once; dynamic exports at 1x128x128, fixed ONNX at 1x128x96."""
    root = tmp_path_factory.mktemp("cbam")
    model = DetectionModel("yolov5-resnet50-cbam.yaml", nc=3, verbose=False).eval()
    model.names = dict(NAMES)
    ref = PredictionOnly(model).eval()
    fused = PredictionOnly(copy.deepcopy(model).fuse())
    meta = ExportMetadata(stride=32, names=NAMES, imgsz=(128, 128), dynamic=True)
    im = torch.zeros(1, 3, 128, 128)
    files = {
        "torchscript": export_torchscript(fused, im, root / "cbam.torchscript", meta),
        "onnx": export_onnx(fused, im, root / "cbam.onnx", meta, dynamic=True),
        "fixed": export_onnx(
            fused, im[..., :96], root / "fixed.onnx", meta.with_format("onnx", imgsz=(128, 96), dynamic=False)
        ),
    }
    return {"ref": ref, **files}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_cbam_dynamic_export_matches_pytorch(cbam, fmt):
    backend = AutoBackend(cbam[fmt])
    x = torch.rand(2, 3, 96, 160)
    _close(_predict(backend, x), _predict(cbam["ref"], x))


@pytest.mark.slow
def test_cbam_fixed_onnx_through_autobackend(cbam):
    backend = AutoBackend(cbam["fixed"])
    assert (backend.imgsz, backend.batch_size, backend.dynamic) == ((128, 96), 1, False)
    x = torch.rand(1, 3, 128, 96)
    _close(_predict(backend, x), _predict(cbam["ref"], x))


@pytest.mark.slow
def test_cbam_onnx_graph_has_no_adaptive_pooling(cbam):
    ops = onnx_node_types(cbam["onnx"])
    assert not [op for op in ops if "adaptive" in op.lower()]
    assert "GlobalMaxPool" not in ops and "ATen" not in ops
    assert {"ReduceMax", "ReduceMean"} <= ops  # CBAM's channel and spatial pooling


def test_onnx_check_refuses_adaptive_pooling_and_aten_fallbacks():
    helper, proto = onnx.helper, onnx.TensorProto
    io = [helper.make_tensor_value_info(n, proto.FLOAT, [1, 4, 8, 8]) for n in ("x", "y")]
    for op in ("AdaptiveMaxPool2d", "ATen"):
        graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g", io[:1], io[1:])
        with pytest.raises(ExportError, match=op):
            check_onnx_ops(helper.make_model(graph))


# ------------------------------------------------------------------------ every registered module
ROW_ARGS = {  # YAML args of a one-row model; modules not listed get [16] (scaled) or [] (attention)
    "Conv": [24, 3, 2],
    "SPP": [16, [3, 5]],
    "Focus": [16, 3],
    "ResNetStem": [64],
    "ResNetStage": [64, 2, "cbam"],
    "Attention": ["cbam"],
}
EXPORTABLE = sorted(set(MODULES) - {"Detect", "Concat"})  # those two are exported inside whole models


def _row_args(name: str) -> list:
    if name in ROW_ARGS:
        return ROW_ARGS[name]
    cls = MODULES[name]
    if issubclass(cls, ScaledChannels):
        return [16]
    assert issubclass(cls, KeepsChannels), f"add {name} to ROW_ARGS"
    return []


def _randomise_batchnorm(module: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


@pytest.mark.parametrize("name", EXPORTABLE)
def test_registered_module_exports_to_onnx_alone(name, tmp_path):
    layers, _ = parse_model(
        {"nc": 3, "backbone": [[-1, 1, name, _row_args(name)]], "head": []}, 16, verbose=False
    )
    _randomise_batchnorm(layers)
    layers.eval()
    meta = ExportMetadata(stride=1, names=NAMES, imgsz=(32, 32), dynamic=True)
    path = export_onnx(layers, torch.rand(1, 16, 32, 32), tmp_path / f"{name}.onnx", meta, dynamic=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 16, 64, 48)  # another batch and size than traced
    out = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    torch.testing.assert_close(out, _predict(layers, x), rtol=1e-4, atol=1e-5)


def test_exportable_list_covers_the_registry():
    assert {"CBAM", "ResNetStage", "ResNetStem", "C3", "SPPF"} <= set(EXPORTABLE)
    assert len(EXPORTABLE) == len(MODULES) - 2


# --------------------------------------------------------------------- options, errors, metadata
def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU()).eval()


def test_missing_optional_packages_name_the_pip_package(monkeypatch, tmp_path):
    meta = ExportMetadata(stride=1, names=NAMES, imgsz=(8, 8))
    im = torch.rand(1, 3, 8, 8)
    for module in ("onnx", "openvino", "nncf", "onnxruntime"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(MissingDependencyError, match="pip install onnx"):
        export_onnx(_tiny(), im, tmp_path / "m.onnx", meta)
    with pytest.raises(MissingDependencyError, match="pip install openvino"):
        export_openvino(_tiny(), im, tmp_path / "m_openvino_model", meta)
    monkeypatch.setitem(sys.modules, "openvino", types.ModuleType("openvino"))  # nncf is checked first
    with pytest.raises(MissingDependencyError, match="pip install nncf"):
        export_openvino(_tiny(), im, tmp_path / "m_openvino_model", meta, calibration=[im.numpy()])
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(MissingDependencyError, match="pip install onnxruntime"):
        AutoBackend(tmp_path / "m.onnx")


def test_run_export_reports_missing_package_per_format(small, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    run = run_export(small["weights"], ExportOptions(include=("onnx",), imgsz=(64, 64)))
    assert not run.ok and "pip install onnx" in run.result("onnx").error
    assert "FAILED: " in "\n".join(run.summary())


def test_simplify_without_simplifier_warns_and_exports(monkeypatch, tmp_path, yolo_log):
    monkeypatch.setitem(sys.modules, "onnxslim", None)
    monkeypatch.setitem(sys.modules, "onnxsim", None)
    meta = ExportMetadata(stride=1, names=NAMES, imgsz=(8, 8))
    path = export_onnx(_tiny(), torch.rand(1, 3, 8, 8), tmp_path / "m.onnx", meta, simplify=True)
    assert path.is_file() and "pip install onnxslim" in yolo_log.text


def test_int8_needs_data_and_optimize_needs_xnnpack_or_cpu(small, tmp_path):
    weights = small["weights"]
    with pytest.raises(ValueError, match="--data"):
        run_export(weights, ExportOptions(include=("openvino",), int8=True))
    run = run_export(weights, ExportOptions(include=("torchscript",), imgsz=(64, 64), optimize=True))
    import torch.backends.xnnpack

    assert run.ok == bool(torch.backends.xnnpack.enabled)
    if not run.ok:
        assert "XNNPACK" in run.result("torchscript").error


@pytest.mark.skipif(not (HAS_OPENVINO and importlib.util.find_spec("nncf")), reason="needs openvino and nncf")
def test_openvino_int8_quantisation_runs(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    meta = ExportMetadata(stride=1, names=NAMES, imgsz=(32, 32))
    calibration = [torch.rand(1, 3, 32, 32).numpy() for _ in range(4)]
    folder = export_openvino(
        model, torch.rand(1, 3, 32, 32), tmp_path / "q_openvino_model", meta, calibration=calibration
    )
    backend = AutoBackend(folder)
    x = torch.rand(1, 3, 32, 32)
    assert ExportMetadata.from_dict(yaml_load(folder / "metadata.yaml")).int8
    torch.testing.assert_close(_predict(backend, x), _predict(model, x), rtol=0.1, atol=0.1)


def test_parse_include():
    assert parse_include(["TorchScript", "onnx,openvino", "onnx"]) == ("torchscript", "onnx", "openvino")
    with pytest.raises(ValueError, match="supported formats are torchscript, onnx, openvino"):
        parse_include(["engine"])


def test_metadata_round_trips_through_every_spelling():
    meta = ExportMetadata(stride=32, names=NAMES, imgsz=(96, 128), batch=2, dynamic=True, format="onnx")
    assert ExportMetadata.from_dict(meta.to_strings()).to_dict() == meta.to_dict()
    assert ExportMetadata.from_dict(json.loads(meta.to_json())).to_dict() == meta.to_dict()
    with pytest.raises(ValueError, match="lacks stride, names"):
        ExportMetadata.from_dict({"imgsz": "[64, 64]"}, source="x.onnx")


def test_quiet_loggers_raises_levels_inside_and_restores_them(caplog):
    from utils.export.common import quiet_loggers

    chatty, other = logging.getLogger("test.chatty"), logging.getLogger("test.other")
    chatty.setLevel(logging.INFO)
    with caplog.at_level(logging.INFO, logger="test"):
        with quiet_loggers("test.chatty"), quiet_loggers("test.other", level=logging.ERROR):
            chatty.info("per-layer chatter")
            chatty.warning("a real warning")
            other.warning("no CUDA")
        chatty.info("after")
    assert [r.getMessage() for r in caplog.records] == ["a real warning", "after"]
    assert chatty.level == logging.INFO and other.level == logging.NOTSET


def test_int8_openvino_exports_get_their_own_folder():
    """An int8 export beside an fp32 one replaces nothing, and both load as OpenVINO."""
    from utils.export.runner import export_path

    fp32, int8 = export_path("w/best.pt", "openvino"), export_path("w/best.pt", "openvino", int8=True)
    assert fp32 == Path("w/best_openvino_model") and int8 == Path("w/best_int8_openvino_model")
    assert export_path("w/best.pt", "onnx", int8=True) == Path("w/best.onnx")
    assert weights_format(int8) == "openvino"


def test_autobackend_refuses_foreign_files(tmp_path):
    pickled = tmp_path / "foreign.pt"
    torch.save(_tiny(), pickled)  # a whole pickled module: needs code to load
    with pytest.raises(CheckpointError, match="refused to load"):
        AutoBackend(pickled)
    with pytest.raises(ValueError, match=r"supported: PyTorch \.pt; TorchScript"):
        AutoBackend(tmp_path / "model.engine")
    assert weights_format("a/best_openvino_model") == "openvino" and weights_format("b.xml") == "openvino"
    bare = tmp_path / "bare.onnx"
    torch.onnx.export(_tiny(), (torch.rand(1, 3, 8, 8),), str(bare), dynamo=False)
    with pytest.raises(ValueError, match="re-export the checkpoint with export.py"):
        AutoBackend(bare)


def test_val_on_onnx_gives_the_same_map_as_the_checkpoint(tmp_path):
    """val.py scores the ONNX export like the .pt it came from (big boxes so an untrained model scores > 0)."""
    import cv2
    import numpy as np

    import val

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
    for i in range(6):
        im = np.full((96, 128, 3), 114, np.uint8)
        w, h = rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.9)
        x1, y1 = int((1 - w) * 64), int((1 - h) * 48)
        cv2.rectangle(im, (x1, y1), (x1 + int(w * 128), y1 + int(h * 96)), (40, 40, 230), -1)
        cv2.imwrite(str(tmp_path / "images/val" / f"{i}.png"), im)
        (tmp_path / "labels/val" / f"{i}.txt").write_text(f"{i % 3} 0.5 0.5 {w:.4f} {h:.4f}\n")
    data = tmp_path / "data.yaml"
    data.write_text(f"path: {tmp_path}\ntrain: images/val\nval: images/val\nnames: {list(NAMES.values())}\n")
    weights = _checkpoint("yolov5n.yaml", tmp_path / "w.pt")
    run = run_export(weights, ExportOptions(include=("onnx",), imgsz=(128, 128), dynamic=True))
    assert run.ok
    kw = {"data": str(data), "imgsz": 128, "batch_size": 2, "plots": False, "project": str(tmp_path / "runs")}
    pt = val.run(weights=str(weights), name="pt", **kw)
    ox = val.run(weights=str(run.result("onnx").path), name="onnx", **kw)
    assert pt.map50 > 0  # the comparison means something
    assert abs(pt.map - ox.map) <= 0.001 and abs(pt.map50 - ox.map50) <= 0.001
