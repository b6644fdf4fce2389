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
