"""benchmarks.py helpers: the arithmetic behind the printed tables (timings themselves are not tested)."""

from __future__ import annotations

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

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"0" * 1000)
    (tmp_path / "w_openvino_model").mkdir()
    seen = []

    def fake_export(w, options):
        seen.append(options)
        result = SimpleNamespace(ok=True, path=str(tmp_path / "w_openvino_model"), error=None)
        return SimpleNamespace(result=lambda fmt: result)

    monkeypatch.setattr(runner, "run_export", fake_export)
    monkeypatch.setattr(val, "run", lambda **kw: SimpleNamespace(map=0.5, speed_ms=(0.0, 10.0, 0.0)))
    rows = benchmark.formats_table(str(weights), "shapes.yaml", 64, ("openvino", "openvino-int8"))
    assert [o.include for o in seen] == [("openvino",), ("openvino",)]
    assert [o.int8 for o in seen] == [False, True]
    assert seen[1].data == "shapes.yaml" and seen[0].data is None
    assert [r["format"] for r in rows] == ["pytorch", "openvino", "openvino-int8"]
