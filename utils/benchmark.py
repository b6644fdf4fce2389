"""Measurements behind benchmarks.py: export formats, CPU inference efficiency, training throughput.

Every figure is measured on the machine it runs on; nothing here is a unit test.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models.packed import PackedBottleneck, PackedConv2d, pack_convolutions
from utils.general import LOGGER
from utils.torch_utils import (
    compile_for_inference,
    conv_memory_format,
    count_flops,
    cpu_bf16_supported,
    half_dtype,
    retain_freed_memory,
    select_device,
)

EXPORT_DIR = Path("runs/benchmarks/exports")  # the formats table's exports, apart from the user's own


def median_seconds(fn: Callable[[], Any], runs: int = 10, warmup: int = 2) -> float:
    """Median wall time of fn() over `runs` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_peak(n: int = 2048, runs: int = 10, trials: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Measured matrix-multiply throughput of this machine in FLOP/s, fp32 unless ``dtype`` says otherwise.

    The better of two GEMM libraries: ``torch.matmul`` of two n x n matrices (MKL or OpenBLAS) and
    a 1x1 convolution in channels_last, which oneDNN runs as a (64*64, 1024) x (1024, 1024) matrix
    multiply, with plain weights and with weights pre-packed as inference runs them (models/packed.py).
    On AMD CPUs MKL's sgemm reaches well under half of what oneDNN reaches, so the matmul alone would
    understate the peak. The best of a few trials of each: a peak is what the machine can reach, and
    one trial can be slowed by frequency ramp-up or a neighbour on the cores.
    """
    a, b = torch.rand(n, n, dtype=dtype), torch.rand(n, n, dtype=dtype)
    c, hw = 1024, 64
    x = torch.rand(1, c, hw, hw, dtype=dtype).contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(c, c, 1, bias=False).eval().to(memory_format=torch.channels_last)
    plain = copy.deepcopy(conv).to(dtype)
    packed = PackedConv2d(conv)  # packs fp32 weights, or bf16 ones under bf16 autocast

    def run_plain() -> None:
        plain(x)

    def run_packed() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            packed(x)

    with torch.inference_mode():
        matmul = max(2 * n**3 / median_seconds(lambda: a @ b, runs=runs) for _ in range(trials))
        conv1x1 = max(
            2 * c * c * hw * hw / median_seconds(f, runs=runs)
            for _ in range(trials)
            for f in (run_plain, run_packed)
        )
    return max(matmul, conv1x1)


def cuda_gemm_peak(device: torch.device, n: int = 8192, runs: int = 10) -> float:
    """Measured fp16 matrix-multiply throughput of a CUDA device in FLOP/s (the rate AMP trains at)."""
    a = torch.rand(n, n, device=device, dtype=torch.float16)
    b = torch.rand(n, n, device=device, dtype=torch.float16)

    def matmul() -> None:
        a @ b
        torch.cuda.synchronize(device)

    return 2 * n**3 / median_seconds(matmul, runs=runs, warmup=3)


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random statistics and affine parameters, in place, as training would.

    A fresh model's ResNet bottlenecks end in a zero BatchNorm weight (identity start), so fusing
    leaves all-zero convolutions; some tools treat those specially (onnxruntime's quantiser rejects
    them), and a benchmark should time the model as it is deployed.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


# ------------------------------------------------------------------------------------ export formats
def formats_table(weights: str, data: str, imgsz: int, formats: tuple[str, ...], device: str = "cpu",
                  batch_size: int = 1, export_dir: Path = EXPORT_DIR) -> list[dict[str, Any]]:  # fmt: skip
    """Export to each format, validate it and collect size, mAP50-95 and inference ms per image.

    The exports go to ``export_dir`` (through a link to the weights there), never beside the weights,
    where they would replace the user's own exports. A format name ending in ``-int8``
    (``openvino-int8``) is exported with int8 post-training quantisation calibrated on ``data``.
    ``pytorch-half`` validates the .pt with ``--half`` (fp16 on CUDA, bf16 autocast on a CPU with
    native bf16); it is left out where the device has neither.
    """
    import val
    from utils.export.common import path_size
    from utils.export.runner import ExportOptions, run_export

    if "pytorch-half" in formats and half_dtype(select_device(device)) is None:
        LOGGER.info(f"pytorch-half: left out, no faster reduced precision on device {device!r}")
        formats = tuple(f for f in formats if f != "pytorch-half")
    rows = []
    exportable = None  # the weights as seen from export_dir, made at the first export
    for fmt in ("pytorch", *formats):
        path, size = Path(weights), path_size(Path(weights))
        try:
            if fmt not in ("pytorch", "pytorch-half"):
                exportable = exportable or _link_into(Path(weights), export_dir)
                base, int8 = fmt.removesuffix("-int8"), fmt.endswith("-int8")  # openvino-int8: quantised
                options = ExportOptions(include=(base,), imgsz=(imgsz, imgsz), device=device, int8=int8,
                                        data=data if int8 else None)  # fmt: skip
                result = run_export(exportable, options).result(base)
                if not result.ok:
                    raise RuntimeError(result.error)
                path, size = Path(result.path), path_size(Path(result.path))
            res = val.run(data=data, weights=str(path), imgsz=imgsz, batch_size=batch_size, device=device,
                          half=fmt == "pytorch-half", plots=False, project="runs/benchmarks", name=fmt,
                          exist_ok=True, workers=2)  # fmt: skip
            rows.append({"format": fmt, "size_mb": size / 1e6, "map": res.map, "ms": res.speed_ms[1]})
        except Exception as e:  # one failing format must not hide the others
            LOGGER.warning(f"{fmt}: failed ({type(e).__name__}: {e})")
            rows.append({"format": fmt, "size_mb": float("nan"), "map": float("nan"), "ms": float("nan")})
    base = rows[0]["ms"]
    for r in rows:
        r["speedup"] = base / r["ms"] if r["ms"] == r["ms"] and r["ms"] > 0 else float("nan")
    return rows


def _link_into(weights: Path, folder: Path) -> Path:
    """``folder/<weights name>``: a symbolic link to ``weights`` (a copy where links are refused)."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / weights.name
    if link.resolve() == weights.resolve():
        return link  # weights already in the folder
    link.unlink(missing_ok=True)
    try:
        link.symlink_to(weights.resolve())
    except OSError:  # e.g. Windows without the privilege
        shutil.copy2(weights, link)
    return link


def print_formats(rows: list[dict[str, Any]], imgsz: int) -> None:
    LOGGER.info(f"\nBenchmarks at {imgsz}x{imgsz}, batch 1, {torch.get_num_threads()} CPU threads")
    w = max([len("format"), *(len(r["format"]) for r in rows)]) + 2
    LOGGER.info(f"{'format':<{w}}{'size (MB)':>10}{'mAP50-95':>10}{'ms/img':>10}{'speed vs pt':>12}")
    for r in rows:
        LOGGER.info(
            f"{r['format']:<{w}}{r['size_mb']:>10.1f}{r['map']:>10.4f}{r['ms']:>10.1f}{r['speedup']:>11.2f}x"
        )


# ------------------------------------------------------------------------------------ inference speed
PROFILED_VARIANT = "+ residual adds fused (.pt default)"  # the path whose time --speed also breaks down


@dataclass
class SpeedRow:
    variant: str
    imgsz: int
    ms: float
    gflops: float  # model FLOPs per image (fp32 eager count)
    peak_gflops: float
    shares: dict[str, float] | None = None  # where the wall time goes (time_shares), profiled rows only
    conv_alone: dict[str, tuple[float, float]] | None = None  # convolutions_alone, profiled rows only

    @property
    def efficiency(self) -> float:
        """Achieved FLOP/s as a fraction of the measured GEMM peak."""
        return self.gflops / (self.ms / 1e3) / self.peak_gflops


def _runner(model: Callable[[torch.Tensor], Any], device_type: str, channels_last: bool,
            amp_dtype: torch.dtype | None = None) -> Callable[[torch.Tensor], Any]:  # fmt: skip
    """model(x) with x in the given memory format, under autocast to ``amp_dtype`` when one is given."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def run(x: torch.Tensor) -> Any:
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model(x.contiguous(memory_format=fmt))

    return run


def _packed_copy(model: nn.Module, bottlenecks: bool = True) -> nn.Module:
    """What a .pt model runs as on a CPU: fused, channels_last, convolution weights pre-packed
    (``bottlenecks=False``: ResNet residual additions left out of the convolutions)."""
    packed = copy.deepcopy(model).eval().fuse().to(memory_format=torch.channels_last)
    pack_convolutions(packed, bottlenecks)
    return packed


def _eager_variants(
    model: nn.Module, packed: nn.Module, compile: bool
) -> dict[str, Callable[[torch.Tensor], Any]]:
    """The .pt paths: eager fp32 unfused / fused / channels_last / pre-packed (``packed``: the default,
    ``_packed_copy(model)``), bf16 autocast (--half) and, with ``compile``, torch.compile with frozen
    weights (--compile), fp32 and under bf16 autocast."""
    unfused = copy.deepcopy(model).eval()
    fused = copy.deepcopy(model).eval().fuse()
    fused_cl = copy.deepcopy(fused).to(memory_format=torch.channels_last)
    native_bf16 = cpu_bf16_supported()
    bf16_name = "bf16 autocast (--half)" if native_bf16 else "bf16 autocast (emulated)"
    variants = {"eager fp32 unfused": unfused, "eager fp32 fused": fused,
                "fused + channels_last": _runner(fused_cl, "cpu", True),
                "+ packed weights": _runner(_packed_copy(model, bottlenecks=False), "cpu", True),
                PROFILED_VARIANT: _runner(packed, "cpu", True),
                "bf16 autocast, not packed": _runner(fused_cl, "cpu", True, torch.bfloat16),
                bf16_name: _runner(packed, "cpu", True, torch.bfloat16)}  # fmt: skip
    if compile:
        torch._dynamo.reset()  # a fresh compile per input size, not a dynamic-shape recompile
        variants["torch.compile frozen (--compile)"] = _runner(compile_for_inference(fused_cl), "cpu", True)
        if native_bf16:
            compiled_bf16 = compile_for_inference(copy.deepcopy(fused_cl))
            variants["compile + bf16 (--compile --half)"] = _runner(
                compiled_bf16, "cpu", True, torch.bfloat16
            )
    return variants


def _onnx_variants(model: nn.Module, imgsz: int, tmp: Path, int8: bool) -> dict[str, Callable]:
    """onnxruntime fp32 (and dynamic int8 when asked) on a fixed-size export of the fused model."""
    try:
        import onnxruntime as ort
    except ImportError:
        LOGGER.warning("onnxruntime not installed (pip install onnxruntime): skipping ONNX Runtime rows")
        return {}
    from utils.export.common import PredictionOnly
    from utils.export.onnx_format import trace_to_onnx

    path = tmp / f"model_{imgsz}.onnx"
    wrapped = PredictionOnly(copy.deepcopy(model).eval().fuse())
    trace_to_onnx(wrapped, torch.zeros(1, 3, imgsz, imgsz), path)
    paths = {"onnxruntime fp32": path}
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q = tmp / f"model_{imgsz}_int8.onnx"
        quantize_dynamic(str(path), str(q), weight_type=QuantType.QUInt8)
        paths["onnxruntime int8 (dynamic)"] = q
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    out = {}
    for name, p in paths.items():
        session = ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        out[name] = lambda x, s=session, n=input_name: s.run(None, {n: x.numpy()})
    return out


def inference_speed(cfg: str, sizes: list[int], runs: int = 10, onnx: bool = True, int8: bool = True,
                    compile: bool = True, tmp: Path = Path("runs/benchmarks")) -> list[SpeedRow]:  # fmt: skip
    """Batch-1 latency of each inference path of a model built from cfg (random weights).

    torch.compile rows include no compile time: the first calls (warmup) compile."""
    from models.yolo import DetectionModel

    tmp.mkdir(parents=True, exist_ok=True)
    retain_freed_memory()  # as AutoBackend does for .pt on a CPU
    model = trained_like(DetectionModel(cfg, verbose=False).eval())
    peak = gemm_peak() / 1e9
    rows = []
    for s in sizes:
        x = torch.rand(1, 3, s, s)
        gflops = count_flops(copy.deepcopy(model).eval(), x) / 1e9
        packed = _packed_copy(model)
        variants = _eager_variants(model, packed, compile)
        if onnx:
            variants.update(_onnx_variants(model, s, tmp, int8))
        for name, fn in variants.items():
            with torch.inference_mode():
                ms = median_seconds(lambda fn=fn, x=x: fn(x), runs=runs) * 1e3
            shares = alone = None
            if name == PROFILED_VARIANT:
                shares = time_shares(fn, x)
                alone = convolutions_alone(packed, x.contiguous(memory_format=torch.channels_last))
            rows.append(SpeedRow(name, s, ms, gflops, peak, shares, alone))
            LOGGER.info(f"  {name:<34} {s:>4}  {ms:8.1f} ms")
    return rows


def time_shares(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, runs: int = 5) -> dict[str, float]:
    """Fractions of the wall time of ``runs`` calls fn(x) under ``torch.profiler``: in convolutions, in
    other operators, and outside any operator (the Python between layers, dispatch, the profiler's own
    cost). Operators' own (self) times are summed, so nested calls are not counted twice."""
    from torch.profiler import ProfilerActivity, profile

    # The profiler's own log (USDT start/stop lines, "ERROR ... gpuGetDeviceCount failed" on a machine
    # without a GPU) would land in the middle of the table; read when it starts, so set here.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with torch.inference_mode():
        fn(x)  # packs, allocates: not part of the steady state
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(runs):
                fn(x)
            wall = time.perf_counter() - t0
    events = prof.key_averages()
    ops = sum(e.self_cpu_time_total for e in events) / 1e6
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key) / 1e6
    return {"convolutions": conv / wall, "other operators": (ops - conv) / wall,
            "outside operators": max(wall - ops, 0.0) / wall}  # fmt: skip


def convolutions_alone(model: nn.Module, x: torch.Tensor, runs: int = 10) -> dict[str, tuple[float, float]]:
    """Seconds and FLOPs of model(x)'s convolutions by kernel size ("1x1", "3x3", ...), each convolution
    timed on its own (median of ``runs``) on the input it gets in the forward pass, summed: their time
    with warm caches and nothing between them, to set beside their share of the model's own time."""
    seen: list[tuple[nn.Module, torch.Tensor, torch.Size]] = []

    def record(conv: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen.append((conv, args[0], out.shape))

    def record_conv3(
        conv3: PackedConv2d, conv2: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> None:
        seen.append((conv3, out, conv3._output_shape(out)))  # conv3's input is conv2's output

    fused_conv3 = {id(m.conv3) for m in model.modules() if isinstance(m, PackedBottleneck)}
    hooks = [
        m.register_forward_hook(record)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, PackedConv2d)) and id(m) not in fused_conv3
    ]
    for m in model.modules():
        if isinstance(m, PackedBottleneck):  # conv3 runs inside add_relu_into, which forward hooks miss
            hooks.append(m.conv2.register_forward_hook(partial(record_conv3, m.conv3)))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    totals: dict[str, tuple[float, float]] = {}
    with torch.inference_mode():
        for conv, inp, out_shape in seen:
            seconds = median_seconds(lambda conv=conv, inp=inp: conv(inp), runs=runs)
            flops = 2 * out_shape.numel() * conv.weight[0].numel()  # (C_in / groups) * kH * kW MACs each
            kernel = "x".join(map(str, conv.weight.shape[2:]))
            t, f = totals.get(kernel, (0.0, 0.0))
            totals[kernel] = (t + seconds, f + flops)
    return dict(sorted(totals.items()))


def print_speed(rows: list[SpeedRow], cfg: str) -> None:
    peak = rows[0].peak_gflops if rows else float("nan")
    LOGGER.info(
        f"\n{cfg}: batch 1, {torch.get_num_threads()} threads, measured fp32 GEMM peak {peak:.1f} GFLOP/s"
    )
    LOGGER.info(f"{'variant':<36}{'img':>5}{'GFLOPs':>9}{'ms':>9}{'GFLOP/s':>9}{'of peak':>9}{'vs eager':>9}")
    base = {r.imgsz: r.ms for r in rows if r.variant == "eager fp32 unfused"}
    for r in rows:
        LOGGER.info(f"{r.variant:<36}{r.imgsz:>5}{r.gflops:>9.2f}{r.ms:>9.1f}{r.gflops / r.ms * 1e3:>9.1f}"
                    f"{r.efficiency:>8.0%}{base[r.imgsz] / r.ms:>8.2f}x")  # fmt: skip
    for r in rows:
        if r.shares:
            parts = ", ".join(f"{k} {v:.0%}" for k, v in r.shares.items())
            LOGGER.info(f"Profile of '{r.variant}' at {r.imgsz}: {parts} of the wall time")
        if r.conv_alone:
            seconds = sum(t for t, _ in r.conv_alone.values())
            flops = sum(f for _, f in r.conv_alone.values())
            in_model = r.shares["convolutions"] * r.ms if r.shares else float("nan")
            kinds = ", ".join(f"{k} {f / t / 1e9 / r.peak_gflops:.0%}" for k, (t, f) in r.conv_alone.items())
            LOGGER.info(
                f"  its {flops / 1e9:.2f} GFLOPs of convolutions: {seconds * 1e3:.1f} ms timed one by one on "
                f"their own inputs ({flops / seconds / 1e9 / r.peak_gflops:.0%} of peak; by kernel {kinds}), "
                f"about {in_model:.1f} ms inside the model; 90% of peak for the whole pass is "
                f"{r.gflops / (0.9 * r.peak_gflops) * 1e3:.1f} ms"
            )


# ------------------------------------------------------------------------------- throughput by batch
THROUGHPUT_BATCHES = (1, 16, 64)


@dataclass
class ThroughputRow:
    variant: str
    batch: int
    ms: float  # per batch

    @property
    def images_per_second(self) -> float:
        return self.batch / self.ms * 1e3


def _throughput_variants(model: nn.Module, device: torch.device, compile: bool) -> dict[str, Callable]:
    """fp32, AMP (fp16 on CUDA, bf16 on a CPU with native bf16), channels_last, pre-packed weights (CPU),
    then torch.compile of the fastest-looking combination. The model is fused and in eval mode."""
    amp_dtype = half_dtype(device)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    variants = {
        "fp32": _runner(model, device.type, False),
        "fp32 + channels_last": _runner(cl_model, device.type, True),
    }
    if device.type == "cpu" and pack_convolutions(packed := copy.deepcopy(cl_model)):
        variants["fp32 + channels_last + packed"] = _runner(packed, "cpu", True)
    if amp_dtype is not None:
        variants["AMP"] = _runner(model, device.type, False, amp_dtype)
        variants["AMP + channels_last"] = _runner(cl_model, device.type, True, amp_dtype)
    if compile:
        variants[f"{'AMP' if amp_dtype else 'fp32'} + channels_last + torch.compile"] = _runner(
            compile_for_inference(cl_model), device.type, True, amp_dtype
        )
    return variants


def throughput_table(cfg: str, imgsz: int, device: str = "cpu", batches: tuple[int, ...] = THROUGHPUT_BATCHES,
                     compile: bool = True, runs: int = 10) -> list[ThroughputRow]:  # fmt: skip
    """Images/s of a fused ``cfg`` model (random weights) at each batch size, for each inference mode.

    Each mode is warmed up at each batch before timing (torch.compile compiles there), and CUDA is
    synchronised around every timed call. AMP rows appear where ``--half`` has a faster precision.
    """
    from models.yolo import DetectionModel

    dev = select_device(device)
    model = trained_like(DetectionModel(cfg, verbose=False).eval()).fuse().to(dev)
    rows = []
    for name, fn in _throughput_variants(model, dev, compile).items():
        for b in batches:
            x = torch.rand(b, 3, imgsz, imgsz, device=dev)

            def call(fn: Callable = fn, x: torch.Tensor = x) -> None:
                fn(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)

            with torch.inference_mode():
                ms = median_seconds(call, runs=runs, warmup=3) * 1e3
            rows.append(ThroughputRow(name, b, ms))
            LOGGER.info(f"  {name:<36} batch {b:>3}  {ms:9.1f} ms  {rows[-1].images_per_second:9.1f} img/s")
    return rows


def print_throughput(rows: list[ThroughputRow], cfg: str, imgsz: int, device: str) -> None:
    batches = sorted({r.batch for r in rows})
    LOGGER.info(f"\n{cfg} at {imgsz}, device {device}: images/s by batch size")
    LOGGER.info(f"{'variant':<38}" + "".join(f"{'batch ' + str(b):>12}" for b in batches))
    for name in dict.fromkeys(r.variant for r in rows):
        ips = {r.batch: r.images_per_second for r in rows if r.variant == name}
        LOGGER.info(f"{name:<38}" + "".join(f"{ips[b]:>12.1f}" for b in batches))


# ------------------------------------------------------------------------------------ training speed
def train_speed(cfg: str, data: str, imgsz: int, batch_size: int = 16, batches: int = 5, workers: int = 2,
                device: str = "cpu", memory_format: str = "auto", amp: bool = True) -> dict[str, float]:  # fmt: skip
    """Images/s of the loader alone, the model step alone (forward, loss, backward, SGD) and both together.

    The step runs as the Trainer runs it: with ``amp``, under fp16 autocast and a gradient scaler on CUDA
    and bf16 autocast on a CPU with native bf16; else fp32. ``memory_format`` is "auto" (the Trainer's
    choice for the device), "channels_last" or "contiguous". The limit is always 3 x the model's FLOPs
    at the device's GEMM peak: fp32 on a CPU, fp16 on CUDA.
    """
    from models.yolo import DetectionModel
    from utils.dataloaders import create_dataloader
    from utils.dataset_config import check_dataset
    from utils.general import yaml_load
    from utils.loss import ComputeLoss

    hyp = yaml_load(Path(__file__).resolve().parents[1] / "data/hyps/hyp.scratch-low.yaml")
    d = check_dataset(data)
    dev = select_device(device)
    cuda = dev.type == "cuda"
    formats = {"auto": conv_memory_format(dev), "channels_last": torch.channels_last,
               "contiguous": torch.contiguous_format}  # fmt: skip
    if memory_format not in formats:
        raise ValueError(f"memory_format {memory_format!r}: use one of {', '.join(formats)}")
    fmt = formats[memory_format]
    model = DetectionModel(cfg, nc=d["nc"], verbose=False).train()
    gflops = count_flops(copy.deepcopy(model).eval(), torch.zeros(1, 3, imgsz, imgsz)) / 1e9
    if not cuda:
        retain_freed_memory()
    model.to(dev, memory_format=fmt)
    loss_fn = ComputeLoss(model, hyp, imgsz=imgsz)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    amp_dtype = half_dtype(dev) if amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    loader, _ = create_dataloader(d["train"], imgsz, batch_size, 32, hyp=hyp, augment=True, shuffle=True,
                                  workers=workers, nc=d["nc"])  # fmt: skip
    it = iter(loader)
    next(it)  # start the workers
    # Long enough that the batches prefetched before the clock starts do not inflate the rate.
    loader_batches = min(max(4 * batches, 20), len(loader) - 1 - batches)
    if loader_batches < 1:
        raise ValueError(f"{data}: too few training images for {batches + 2} batches of {batch_size}")
    t0 = time.perf_counter()
    batches_seen = [next(it) for _ in range(loader_batches)]
    loader_ips = loader_batches * batch_size / (time.perf_counter() - t0)

    def step(imgs: torch.Tensor, targets: torch.Tensor) -> None:
        imgs = imgs.to(dev, non_blocking=True).float().div_(255).contiguous(memory_format=fmt)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, _ = loss_fn(model(imgs), targets.to(dev))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(dev)

    imgs, targets = batches_seen[0][0], batches_seen[0][1]
    model_s = median_seconds(lambda: step(imgs, targets), runs=batches, warmup=3 if cuda else 1)
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        step(b[0], b[1])
    total_ips = batches * batch_size / (time.perf_counter() - t0)
    peak = (cuda_gemm_peak(dev) if cuda else gemm_peak()) / 1e9
    limit_ips = peak / (3 * gflops)
    # a CPU under bf16 autocast: the limit at the bf16 GEMM peak too, the fairer bound for that run
    bf16_peak = gemm_peak(dtype=torch.bfloat16) / 1e9 if amp_dtype == torch.bfloat16 else float("nan")
    return {"loader_ips": loader_ips, "model_ips": batch_size / model_s, "total_ips": total_ips,
            "s_per_batch": batch_size / total_ips, "gflops": gflops, "peak": peak, "limit_ips": limit_ips,
            "peak_kind": "fp16 CUDA" if cuda else "fp32 CPU", "memory_format": str(fmt).split(".")[-1],
            "precision": str(amp_dtype or torch.float32).replace("torch.", ""), "bf16_peak": bf16_peak}  # fmt: skip


def print_train_speed(cfg: str, imgsz: int, batch_size: int, r: dict[str, float]) -> None:
    LOGGER.info(f"\nTraining {cfg} at {imgsz}, batch {batch_size}, {r['precision']}, {r['memory_format']}: loader alone {r['loader_ips']:.1f} img/s, "
                f"model step alone {r['model_ips']:.1f} img/s, together {r['total_ips']:.1f} img/s "
                f"({r['s_per_batch']:.2f} s/batch). Limit at {r['peak_kind']} GEMM peak {r['peak']:.0f} GFLOP/s with "
                f"3 x {r['gflops']:.2f} GFLOPs/img: {r['limit_ips']:.1f} img/s -> "
                f"{r['total_ips'] / r['limit_ips']:.0%} of the limit")  # fmt: skip
    if not math.isnan(r["bf16_peak"]):  # a bf16 run
        bf16_limit = r["bf16_peak"] / (3 * r["gflops"])
        LOGGER.info(f"At the bf16 GEMM peak {r['bf16_peak']:.0f} GFLOP/s the limit is {bf16_limit:.1f} img/s -> "
                    f"{r['total_ips'] / bf16_limit:.0%} of it")  # fmt: skip
