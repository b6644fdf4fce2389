"""benchmarks.py helpers: the arithmetic behind the printed tables (timings themselves are not tested)."""

from __future__ import annotations

from pathlib import Path

import pytest

import benchmarks
from utils.benchmark import SpeedRow, median_seconds


def test_efficiency_is_achieved_flops_over_peak():
    row = SpeedRow("eager", 320, ms=200.0, gflops=30.0, peak_gflops=150.0)
    assert row.efficiency == pytest.approx(30.0 / 0.2 / 150.0)  # 150 GFLOP/s achieved = 100%


def test_median_seconds_calls_warmup_plus_runs():
    calls = []
    t = median_seconds(lambda: calls.append(1), runs=5, warmup=2)
    assert len(calls) == 7 and t >= 0


def test_formats_table_needs_weights(capsys):
    assert benchmarks.main(["--data", "shapes.yaml"]) == 1


def test_int8_format_exports_quantised_openvino_calibrated_on_the_data(monkeypatch, tmp_path):
    """'openvino-int8' in the formats table is an OpenVINO export with --int8 and --data set."""
    from types import SimpleNamespace

    import val
    from utils import benchmark
    from utils.export import runner

    weights = tmp_path / "user" / "w.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"0" * 1000)
    bench = tmp_path / "bench"
    seen, exported_from = [], []

    def fake_export(w, options):
        seen.append(options)
        exported_from.append(Path(w))
        (bench / "w_openvino_model").mkdir(exist_ok=True)
        result = SimpleNamespace(ok=True, path=str(bench / "w_openvino_model"), error=None)
        return SimpleNamespace(result=lambda fmt: result)

    monkeypatch.setattr(runner, "run_export", fake_export)
    monkeypatch.setattr(val, "run", lambda **kw: SimpleNamespace(map=0.5, speed_ms=(0.0, 10.0, 0.0)))
    formats = ("openvino", "openvino-int8")
    rows = benchmark.formats_table(str(weights), "shapes.yaml", 64, formats, export_dir=bench)
    # exported from a link in the benchmark's folder, so nothing is written beside the user's weights
    assert exported_from == [bench / "w.pt"] * 2 and (bench / "w.pt").read_bytes() == weights.read_bytes()
    assert sorted(p.name for p in weights.parent.iterdir()) == ["w.pt"]
    assert [o.include for o in seen] == [("openvino",), ("openvino",)]
    assert [o.int8 for o in seen] == [False, True]
    assert seen[1].data == "shapes.yaml" and seen[0].data is None
    assert [r["format"] for r in rows] == ["pytorch", "openvino", "openvino-int8"]


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_half_row_validates_the_pt_with_half_where_the_device_has_it(monkeypatch, tmp_path, dtype):
    """'pytorch-half' is the .pt validated with --half, and is left out where --half would be fp32."""
    from types import SimpleNamespace

    import torch

    import val
    from utils import benchmark

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"0" * 1000)
    calls = []
    monkeypatch.setattr(benchmark, "half_dtype", lambda device: dtype and torch.bfloat16)
    monkeypatch.setattr(
        val, "run", lambda **kw: calls.append(kw) or SimpleNamespace(map=0.5, speed_ms=(0.0, 10.0, 0.0))
    )
    rows = benchmark.formats_table(str(weights), "shapes.yaml", 64, ("pytorch-half",))
    expected = ["pytorch", "pytorch-half"] if dtype else ["pytorch"]
    assert [r["format"] for r in rows] == expected
    assert [c["half"] for c in calls] == [False, True][: len(expected)]
    assert all(c["weights"] == str(weights) for c in calls)


def test_throughput_table_rows_per_variant_and_batch(monkeypatch, project_log):
    """Every inference mode at every batch; AMP rows only where --half has a faster precision."""
    import torch

    from utils import benchmark

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kwargs: compiled.append(m) or m)
    monkeypatch.setattr(benchmark, "half_dtype", lambda device: None)
    rows = benchmark.throughput_table("yolov5n.yaml", 64, "cpu", batches=(1, 2), runs=1)
    variants = [
        "fp32",
        "fp32 + channels_last",
        "fp32 + channels_last + packed",
        "fp32 + channels_last + torch.compile",
    ]
    assert [(r.variant, r.batch) for r in rows] == [(v, b) for v in variants for b in (1, 2)]
    assert len(compiled) == 1 and all(r.images_per_second > 0 for r in rows)
    assert rows[1].images_per_second == pytest.approx(2 / rows[1].ms * 1e3)
    benchmark.print_throughput(rows, "yolov5n.yaml", 64, "cpu")
    table = project_log[project_log.index("yolov5n.yaml at 64, device cpu: images/s by batch size") :]
    assert table[1].split() == ["variant", "batch", "1", "batch", "2"]
    assert [line.split()[0] for line in table[2:]] == ["fp32"] * 4


def test_throughput_table_adds_amp_rows_where_half_is_faster(monkeypatch):
    import torch

    from utils import benchmark

    monkeypatch.setattr(benchmark, "half_dtype", lambda device: torch.bfloat16)
    rows = benchmark.throughput_table("yolov5n.yaml", 64, "cpu", batches=(1,), compile=False, runs=1)
    assert [r.variant for r in rows] == [
        "fp32", "fp32 + channels_last", "fp32 + channels_last + packed", "AMP", "AMP + channels_last"
    ]  # fmt: skip


def test_trained_like_gives_every_batchnorm_nonzero_random_parameters():
    """Benchmarks time a model whose fused convolutions are all non-zero, as after training."""
    import torch

    from models.yolo import DetectionModel
    from utils.benchmark import trained_like

    model = DetectionModel("yolov5-resnet50-cbam.yaml", verbose=False).eval()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(bool((bn.weight == 0).all()) for bn in bns)  # identity-start bottlenecks
    assert trained_like(model) is model
    assert all(bool((bn.weight >= 0.5).all()) and bool((bn.running_var >= 0.5).all()) for bn in bns)
    fused = model.fuse()
    convs = [m for m in fused.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(bool(c.weight.abs().sum() > 0) for c in convs)
    again = trained_like(DetectionModel("yolov5-resnet50-cbam.yaml", verbose=False).eval())
    assert torch.equal(
        next(m for m in again.modules() if isinstance(m, torch.nn.BatchNorm2d)).weight, bns[0].weight
    )


def test_gemm_peak_is_the_better_of_matmul_and_a_onednn_1x1_convolution(monkeypatch):
    """The peak is not held down by a slow BLAS: a faster oneDNN GEMM (1x1 conv) sets it."""
    from utils import benchmark

    # 3 matmul trials, then 3 trials of the conv with plain and with pre-packed weights (seconds)
    times = iter([1.0, 2.0, 1.0, 0.5, 0.6, 0.4, 0.25, 0.5, 0.5])

    def fake_median(fn, runs=10, warmup=2):
        fn()
        return next(times)

    monkeypatch.setattr(benchmark, "median_seconds", fake_median)
    conv_flops = 2 * 1024 * 1024 * 64 * 64
    assert benchmark.gemm_peak(n=8, runs=1, trials=3) == conv_flops / 0.25
    times = iter([1e-9, 1.0, 1.0, *[1.0] * 6])  # a fast matmul wins
    assert benchmark.gemm_peak(n=8, runs=1, trials=3) == 2 * 8**3 / 1e-9


@pytest.mark.parametrize("bf16", [False, True])
def test_speed_rows_include_the_compiled_paths(monkeypatch, bf16):
    """--speed times --compile (frozen weights) and, on a CPU with bf16, --compile --half too."""
    from utils import benchmark

    compiled = []
    monkeypatch.setattr(benchmark, "compile_for_inference", lambda m: compiled.append(m) or m)
    monkeypatch.setattr(benchmark, "cpu_bf16_supported", lambda: bf16)
    monkeypatch.setattr(benchmark, "gemm_peak", lambda: 1e11)
    rows = benchmark.inference_speed("yolov5n.yaml", [64], runs=1, onnx=False)
    names = [r.variant for r in rows]
    extra = ["compile + bf16 (--compile --half)"] if bf16 else []
    assert names[-1 - len(extra) :] == ["torch.compile frozen (--compile)", *extra]
    assert len(compiled) == 1 + bf16 and all(r.ms > 0 and r.imgsz == 64 for r in rows)
    assert rows[0].peak_gflops == 100.0
    profiled = [r for r in rows if r.shares]  # the .pt default path, broken down by a profiler trace
    assert [r.variant for r in profiled] == [benchmark.PROFILED_VARIANT]
    shares = profiled[0].shares
    alone = profiled[0].conv_alone  # every convolution found and timed alone: all the model's FLOPs
    assert set(alone) == {"1x1", "3x3", "6x6"} and all(t > 0 for t, _ in alone.values())  # 6x6: the stem
    assert sum(f for _, f in alone.values()) == pytest.approx(profiled[0].gflops * 1e9, rel=1e-6)
    assert shares["convolutions"] > 0 and shares["other operators"] > 0
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.02) or shares["outside operators"] == 0.0


@pytest.mark.parametrize("amp", [False, True])
def test_train_speed_reports_loader_model_and_total_against_the_limit(
    monkeypatch, tiny_dataset, project_log, amp
):
    """--train-speed: positive rates, the limit = peak / (3 x FLOPs per image), and the bf16 bound only
    for a bf16 run (AMP on a CPU with native bf16: forced here, as the machine may not have it)."""
    import torch

    from utils import benchmark

    monkeypatch.setattr(benchmark, "half_dtype", lambda device: torch.bfloat16)
    peaks = {torch.float32: 1e11, torch.bfloat16: 4e11}
    monkeypatch.setattr(benchmark, "gemm_peak", lambda dtype=torch.float32: peaks[dtype])
    ds = tiny_dataset(n_train=8, n_val=2)
    r = benchmark.train_speed("yolov5n.yaml", str(ds.yaml), 64, batch_size=2, batches=1, workers=0, amp=amp)
    assert min(r["loader_ips"], r["model_ips"], r["total_ips"]) > 0
    assert r["limit_ips"] == pytest.approx(100.0 / (3 * r["gflops"]))
    assert r["precision"] == ("bfloat16" if amp else "float32") and r["memory_format"] == "channels_last"
    benchmark.print_train_speed("yolov5n.yaml", 64, 2, r)
    bound = [line for line in project_log if "bf16 GEMM peak 400 GFLOP/s" in line]
    assert len(bound) == amp


def test_print_speed_sets_convolutions_alone_beside_the_goal(project_log):
    from utils.benchmark import PROFILED_VARIANT, print_speed

    shares = {"convolutions": 0.8, "other operators": 0.15, "outside operators": 0.05}
    rows = [SpeedRow("eager fp32 unfused", 320, 100.0, 30.0, 500.0),
            SpeedRow(PROFILED_VARIANT, 320, 80.0, 30.0, 500.0, shares,
                     conv_alone={"1x1": (0.02, 5e9), "3x3": (0.04, 25e9)})]  # fmt: skip
    print_speed(rows, "m.yaml")
    line = next(m for m in project_log if "timed one by one" in m)
    # 30 GFLOPs in 60 ms = 500 GFLOP/s = the peak; 80% of 80 ms in the model; 30 / (0.9 * 500) s = 66.7 ms
    assert "60.0 ms timed one by one" in line and "(100% of peak; by kernel 1x1 50%, 3x3 125%)" in line
    assert "about 64.0 ms inside the model" in line and "whole pass is 66.7 ms" in line
