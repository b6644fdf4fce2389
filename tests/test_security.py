"""Untrusted files never run code: crafted checkpoints and YAMLs are refused with one clear message.

Every payload here would create a marker file if it were ever executed; each test checks that the
marker is absent afterwards. The command-line checks run the real scripts in subprocesses.
"""

from __future__ import annotations

import ast
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import hubconf
from models.backend import AutoBackend
from models.yolo import DetectionModel, load_model_yaml
from tests.conftest import ROOT, make_tiny_dataset, run_scripts
from utils.checkpoints import CheckpointError, load_checkpoint, model_from_checkpoint
from utils.dataset_config import check_dataset
from utils.general import yaml_load


class RunsCommand:
    """Unpickling calls os.system(command) (the classic malicious-pickle payload)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class OpensFile:
    """Unpickling calls open(path, 'w'), which creates the file without any shell."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _evil_files(folder: Path, marker: Path) -> dict[str, Path]:
    """Checkpoint-looking files, each of which creates ``marker`` if unpickled without weights_only."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    files["torch_save_system"] = folder / "system.pt"  # a project-like dict hiding a payload
    torch.save({"model_yaml": {"nc": 2}, "model": {}, "train_args": RunsCommand(f"touch '{marker}'")},
               files["torch_save_system"])  # fmt: skip
    files["torch_save_legacy"] = folder / "legacy.pt"  # pre-1.6 (non-zip) torch format
    torch.save({"model": OpensFile(marker)}, files["torch_save_legacy"], _use_new_zipfile_serialization=False)
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):  # a bare pickle renamed .pt
        files[f"pickle_protocol{protocol}"] = path = folder / f"pickle{protocol}.pt"
        path.write_bytes(pickle.dumps({"model": OpensFile(marker)}, protocol=protocol))
    return files


@pytest.fixture(scope="module")
def evil(tmp_path_factory) -> dict:
    """{'files': {kind: path}, 'marker': path that must never exist, 'data': tiny dataset YAML}."""
    root = tmp_path_factory.mktemp("evil")
    marker = root / "PWNED"
    dataset = make_tiny_dataset(root / "data", n_train=2, n_val=1)
    return {
        "files": _evil_files(root / "weights", marker),
        "marker": marker,
        "data": dataset.yaml,
        "root": root,
    }


def _assert_clean(evil: dict) -> None:
    assert not evil["marker"].exists(), "a payload ran: the marker file was created"


# ------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    "kind",
    ["torch_save_system", "torch_save_legacy", "pickle_protocol0", "pickle_protocol2", "pickle_protocol5"],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on protocol 4/5 files
def test_load_checkpoint_refuses_code_and_names_what_it_would_run(evil, kind):
    path = evil["files"][kind]
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "refused" in msg and "Nothing from it was run" in msg
    assert "weights_only` set to `False`" not in msg, "must not advise the user to disable the safety"
    if kind in ("torch_save_system", "torch_save_legacy"):
        assert ("system" in msg) or ("open" in msg), msg  # names the callable the file asked for
    _assert_clean(evil)


def test_pickled_whole_model_is_refused(tmp_path):
    """A YOLOv5-style checkpoint pickles the model class itself; loading it would import and run code."""
    path = tmp_path / "whole_model.pt"
    torch.save({"model": DetectionModel("yolov5n.yaml", nc=2, verbose=False)}, path)
    with pytest.raises(CheckpointError, match="refused.*DetectionModel"):
        load_checkpoint(path)


def test_every_python_loader_refuses(evil, monkeypatch):
    path = evil["files"]["torch_save_system"]
    with pytest.raises(CheckpointError):
        model_from_checkpoint(path)
    with pytest.raises(CheckpointError):
        AutoBackend(path)
    with pytest.raises(CheckpointError):
        hubconf.custom(path=str(path), _verbose=False)
    with pytest.raises(CheckpointError):
        torch.hub.load(str(ROOT), "custom", path=str(path), source="local", _verbose=False)
    monkeypatch.chdir(path.parent)  # pretrained=True looks for ./yolov5n.pt
    shutil.copy(path, path.parent / "yolov5n.pt")
    with pytest.raises(CheckpointError):
        hubconf.yolov5n(pretrained=True, _verbose=False)
    _assert_clean(evil)


def test_project_checkpoint_loads_with_weights_only(tiny_checkpoint):
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert {"model_yaml", "model", "ema", "names", "nc", "stride", "train_args", "hyp"} <= set(ckpt)
    assert model_from_checkpoint(ckpt).nc == 2


def test_scripts_refuse_malicious_checkpoints(evil, tmp_path):
    """train.py --weights / --resume, val.py, detect.py, export.py, models/yolo.py: one line, exit 1."""
    w, data = str(evil["files"]["torch_save_system"]), str(evil["data"])
    image = next((evil["data"].parent / "images" / "val").glob("*.png"))
    common = ["--project", str(tmp_path), "--name", "exp"]
    commands = [
        ["train.py", "--data", data, "--weights", w, "--img", "64", "--workers", "0", *common],
        ["train.py", "--resume", w, "--workers", "0"],
        ["val.py", "--data", data, "--weights", w, "--img", "64", "--workers", "0", *common],
        ["detect.py", "--weights", w, "--source", str(image), "--img", "64", *common],
        ["export.py", "--weights", w, "--include", "torchscript"],
    ]
    for result in run_scripts(commands):
        text = result.output
        assert result.returncode == 1, f"{result.argv}: exit {result.returncode}\n{text[-2000:]}"
        assert "Traceback" not in text, f"{result.argv}:\n{text[-3000:]}"
        assert "refused" in text and w in text, f"{result.argv}:\n{text[-2000:]}"
    _assert_clean(evil)
    assert not list(tmp_path.rglob("*.pt")), "nothing may be trained or exported from a refused file"


def test_backbone_weights_refuse_code(evil):
    """models/yolo.py --weights reads a torchvision state dict: a payload never runs."""
    w = str(evil["files"]["torch_save_system"])
    (result,) = run_scripts([["models/yolo.py", "--cfg", "yolov5-resnet50.yaml", "--weights", w]])
    _assert_clean(evil)
    assert result.returncode == 1


def test_backbone_weights_refusal_is_one_clear_line(evil):
    from models.pretrained import read_state_dict

    path = evil["files"]["torch_save_system"]
    with pytest.raises(ValueError, match="refused"):
        read_state_dict(path)


# ---------------------------------------------------------------------------------------------------- YAML
PYTHON_TAGS = [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/apply:builtins.open ['{marker}', 'w']",
    "!!python/object/new:builtins.open ['{marker}', 'w']",
    "!!python/name:os.system",
]


@pytest.mark.parametrize("tag", PYTHON_TAGS)
def test_python_yaml_tags_are_refused_everywhere(tmp_path, tag):
    marker = tmp_path / "PWNED"
    value = tag.format(marker=marker)
    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text(yaml.safe_dump(load_model_yaml("yolov5n.yaml")).replace("nc: 80", f"nc: {value}"))
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(f"train: images\nval: images\nnames: {value}\n")
    hyp_yaml = tmp_path / "hyp.yaml"
    hyp_yaml.write_text(f"lr0: {value}\n")
    for load, path in ((DetectionModel, model_yaml), (check_dataset, data_yaml), (yaml_load, hyp_yaml)):
        with pytest.raises(ValueError) as e:
            load(path)
        assert str(path) in str(e.value), str(e.value)
    assert not marker.exists()


def test_scripts_refuse_code_in_yaml(evil, tmp_path):
    """A model YAML with a code argument, a data YAML with a python tag or inline-code download."""
    marker = tmp_path / "PWNED"
    cfg = tmp_path / "evil_model.yaml"
    text = (ROOT / "models" / "yolov5n.yaml").read_text()
    cfg.write_text(
        text.replace("[64, 6, 2, 2]", f"[64, \"__import__('os').system('touch {marker}')\", 2, 2]")
    )
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(
        evil["data"].read_text() + f"\nnc: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    inline = tmp_path / "inline.yaml"
    inline.write_text(
        f"path: {tmp_path / 'missing'}\ntrain: images\nval: images\nnames: [a]\n"
        f"download: |\n  import os\n  os.system('touch {marker}')\n"
    )
    url = tmp_path / "url.yaml"
    url.write_text(f"path: {tmp_path / 'missing'}\ntrain: images\nval: images\nnames: [a]\n"
                   "download: https://example.com/evil.zip\n")  # fmt: skip
    base = ["train.py", "--img", "64", "--epochs", "1", "--workers", "0", "--project", str(tmp_path)]
    commands = [
        [*base, "--data", str(evil["data"]), "--cfg", str(cfg)],
        [*base, "--data", str(tagged), "--cfg", "yolov5n.yaml"],
        [*base, "--data", str(inline), "--cfg", "yolov5n.yaml"],
        [*base, "--data", str(url), "--cfg", "yolov5n.yaml"],
        ["models/yolo.py", "--cfg", str(cfg)],
    ]
    expected = [cfg.name, tagged.name, "refusing 'download'", "refusing 'download'", cfg.name]
    for result, needle in zip(run_scripts(commands), expected, strict=True):
        text = result.output
        assert result.returncode == 1 and "Traceback" not in text, f"{result.argv}:\n{text[-3000:]}"
        assert needle in text, f"{result.argv}:\n{text[-2000:]}"
    assert not marker.exists()
    assert not (tmp_path / "missing").exists(), "a refused download must not even create the folder"


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    """Nested YAML aliases expand to 9**8 strings if names or row arguments are walked naively."""
    levels = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    bomb = "\n".join(levels) + "\n"
    data = tmp_path / "data.yaml"
    data.write_text(bomb + "train: images\nval: images\nnames: [*a7, *a7]\n")
    with pytest.raises(ValueError, match="names"):
        check_dataset(data)
    model = tmp_path / "model.yaml"
    model.write_text(bomb + "nc: 2\nbackbone: [[-1, 1, Conv, [16, 3, 2, *a7]]]\nhead: [[-1, 1, Conv, [8]]]\n")
    with pytest.raises(ValueError, match="row 0"):
        DetectionModel(model, verbose=False)


# --------------------------------------------------------------------------------------- source guards
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_source_has_no_unsafe_loaders():
    """No eval/exec, pickle.load, yaml.load/unsafe_load, shell=True or os.system; torch.load always has
    weights_only=True and np.load never allow_pickle=True (tests and the virtualenv excluded)."""
    problems = []
    files = [p for p in ROOT.rglob("*.py") if not {".venv", "tests", "runs"} & set(p.relative_to(ROOT).parts)]
    assert len(files) > 20
    for path in files:
        for call, name in _calls(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(ROOT)}:{call.lineno} {name}"
            if name in ("eval", "exec", "os.system", "os.popen", "pickle.load", "pickle.loads", "yaml.load",
                        "yaml.unsafe_load", "yaml.full_load", "marshal.loads", "__import__"):  # fmt: skip
                problems.append(where)
            elif name == "torch.load" or name.endswith(".torch.load"):
                wo = _kw(call, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where} without weights_only=True")
            elif name in ("np.load", "numpy.load"):
                ap = _kw(call, "allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True:
                    problems.append(f"{where} with allow_pickle=True")
            if isinstance(_kw(call, "shell"), ast.Constant) and _kw(call, "shell").value is True:
                problems.append(f"{where} with shell=True")
    assert not problems, "unsafe calls:\n" + "\n".join(problems)
