"""Property tests: random label files, dataset YAMLs and model rows give a result or a documented error.

Documented errors are ValueError (LabelError, YamlError are subclasses) and FileNotFoundError, each
with a message; anything else (TypeError, RuntimeError, KeyError, RecursionError ...) is a bug.
"""

from __future__ import annotations

import tempfile
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.registry import MODULES
from models.yolo import DetectionModel, load_model_yaml
from utils.dataset_config import check_dataset
from utils.label_checks import LabelError, parse_label_file

DOCUMENTED = (ValueError, FileNotFoundError)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_TMP = Path(tempfile.mkdtemp(prefix="fuzz_"))  # hypothesis reruns examples; a fixture tmp_path is per test


def _write(name: str, text: str) -> Path:
    path = _TMP / name
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


def _assert_documented(e: BaseException) -> None:
    assert isinstance(e, DOCUMENTED), f"undocumented {type(e).__name__}: {e}"
    assert str(e).strip(), f"{type(e).__name__} without a message"


# ----------------------------------------------------------------------------------------------- labels
number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(lambda v: f"{v:.6g}"),
    st.integers(-3, 12).map(str),
    st.sampled_from(["nan", "inf", "-0", "1e40", "0x10", "1,5", "", "abc", "0.5.5", "\u0660", "\ufeff0"]),
)
label_line = st.lists(number, min_size=0, max_size=12).map(" ".join)
label_text = st.one_of(
    st.lists(label_line, max_size=8).map("\n".join),
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
)


@FUZZ
@given(text=label_text, newline=st.sampled_from(["\n", "\r\n", "\r"]))
def test_label_files_parse_or_raise_label_error(text, newline):
    path = _write("label.txt", text.replace("\n", newline))
    try:
        labels, duplicates = parse_label_file(path)
    except LabelError as e:
        _assert_documented(e)
        return
    assert labels.dtype == np.float32 and labels.ndim == 2 and labels.shape[1] == 5
    assert np.isfinite(labels).all() and duplicates >= 0
    if len(labels):
        assert (labels[:, 0] == np.round(labels[:, 0])).all()
        assert (labels[:, 1:] >= 0).all() and (labels[:, 1:] <= 1).all() and (labels[:, 3:] > 0).all()


# ---------------------------------------------------------------------------------------- dataset YAML
scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 10), st.floats(-10, 10),
                   st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.text(max_size=12))  # fmt: skip
plain = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                     max_leaves=12)  # fmt: skip
data_dict = st.fixed_dictionaries(
    {},
    optional={
        "path": plain,
        "train": st.one_of(plain, st.just("images"), st.just(["images", "more"])),
        "val": st.one_of(plain, st.just("images")),
        "test": plain,
        "names": st.one_of(
            plain, st.lists(st.text(max_size=5), max_size=4), st.dictionaries(scalar, scalar, max_size=4)
        ),
        "nc": st.one_of(st.integers(-2, 5), plain),
        "download": st.one_of(plain, st.just("data/scripts/none.py"), st.just("https://x.invalid/a.zip")),
    },
)


@FUZZ
@given(text=st.one_of(st.text(max_size=300), data_dict.map(lambda d: yaml.safe_dump(d, allow_unicode=True))))
def test_check_dataset_returns_or_raises_documented_errors(text):
    path = _write("data.yaml", text)
    try:
        cfg = check_dataset(path, autodownload=True)
    except Exception as e:  # the test is about which exceptions escape
        _assert_documented(e)
        return
    assert isinstance(cfg["names"], dict) and cfg["nc"] == len(cfg["names"])


# ------------------------------------------------------------------------------------------ model YAML
TINY_MODEL = {
    "nc": 2,
    "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
    "backbone": [
        [-1, 1, "Conv", [8, 3, 2]],  # 0 P1/2
        [-1, 1, "Conv", [8, 3, 2]],  # 1 P2/4
        [-1, 1, "Conv", [16, 3, 2]],  # 2 P3/8
        [-1, 1, "Conv", [16, 3, 2]],  # 3 P4/16
        [-1, 1, "Conv", [16, 3, 2]],  # 4 P5/32
    ],
    "head": [[[2, 3, 4], 1, "Detect", ["nc", "anchors"]]],
}
SAFE_NN = ["nn.Identity", "nn.ReLU", "nn.SiLU", "nn.BatchNorm2d", "nn.MaxPool2d", "nn.Dropout", "nn.Linear"]
JUNK = ["NoSuchModule", "nn.Upsample(None)", "eval", "nn.__class__", "Conv()", "", "nn.", "__import__"]
arg = st.one_of(st.integers(-2, 16), st.floats(-2, 4, allow_nan=False), st.booleans(), st.none(),
                st.sampled_from(["nc", "anchors", "None", "cbam", "se", "nearest", "x.y", "__class__", "1+1"]),
                st.lists(st.integers(-1, 9), max_size=3))  # fmt: skip
row = st.tuples(
    st.one_of(st.integers(-4, 8), st.lists(st.integers(-4, 8), min_size=1, max_size=3), st.text(max_size=3)),
    st.one_of(st.integers(-1, 3), st.text(max_size=2)),
    st.sampled_from(sorted(set(MODULES) - {"Detect", "ResNetStem", "ResNetStage"}) + SAFE_NN + JUNK),
    st.one_of(st.lists(arg, max_size=4), arg),
).map(list)
model_edit = st.tuples(st.integers(0, 5), st.lists(row, min_size=1, max_size=2), st.booleans())


@FUZZ
@given(edit=model_edit)
def test_detection_model_on_random_rows(edit):
    at, rows, replace = edit
    cfg = deepcopy(TINY_MODEL)
    cfg["backbone"][at : at + int(replace)] = rows
    try:
        model = DetectionModel(cfg, verbose=False)
    except Exception as e:
        _assert_documented(e)
        return
    with torch.no_grad():
        pred, raw = model.eval()(torch.zeros(1, 3, 64, 64))
    assert pred.shape[-1] == 5 + model.nc and len(raw) == model.detect.nl


top_level = st.dictionaries(
    st.sampled_from(
        ["nc", "depth_multiple", "width_multiple", "anchors", "activation", "backbone", "head", "ch"]
    ),
    plain,
    max_size=6,
)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), top_level.map(yaml.safe_dump)))
def test_load_model_yaml_on_random_text(text):
    path = _write("model.yaml", text)
    try:
        d = load_model_yaml(path)
        DetectionModel(d, verbose=False)
    except Exception as e:
        _assert_documented(e)


@FUZZ
@given(
    key=st.sampled_from(["nc", "depth_multiple", "width_multiple", "anchors", "activation", "ch"]),
    value=plain,
)
def test_model_settings_of_any_type(key, value):
    cfg = deepcopy(TINY_MODEL)
    cfg[key] = value
    try:
        DetectionModel(cfg, verbose=False)
    except Exception as e:
        _assert_documented(e)


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "a: " + "{b: " * 3000 + "1" + "}" * 3000])
def test_deeply_nested_yaml_is_a_value_error(text):
    with pytest.raises(ValueError, match="nested too deeply"):
        check_dataset(_write("deep.yaml", text))
