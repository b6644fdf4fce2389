"""check_dataset: names/nc, path resolution, required keys, and the guarded download step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils import dataset_config
from utils.dataset_config import check_dataset, resolve_download_script
from utils.general import ROOT


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
    return tmp_path


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_list_names_become_dict(data_root: Path):
    y = write_yaml(
        data_root / "d.yaml", f"path: {data_root}\ntrain: images/train\nval: images/val\nnames: [a, b]\n"
    )
    d = check_dataset(y)
    assert d["names"] == {0: "a", 1: "b"} and d["nc"] == 2
    assert d["train"] == str(data_root / "images" / "train") and d["test"] is None
    assert d["yaml_file"] == str(y.resolve()) and d["path"] == str(data_root)


def test_dict_names_and_lists_of_splits(data_root: Path):
    d = check_dataset(
        {"path": str(data_root), "train": ["images/train", "images/val"], "val": "images/val",
         "names": {1: "b", 0: "a"}, "nc": 2}
    )  # fmt: skip
    assert d["names"] == {0: "a", 1: "b"}
    assert d["train"] == [str(data_root / "images" / "train"), str(data_root / "images" / "val")]
    assert d["yaml_file"] is None


def test_names_from_nc_only(data_root: Path):
    d = check_dataset({"path": str(data_root), "train": "images/train", "val": "images/val", "nc": 3})
    assert d["names"] == {0: "class0", 1: "class1", 2: "class2"}


def test_nc_mismatch_names_the_file(data_root: Path):
    y = write_yaml(
        data_root / "bad.yaml",
        f"path: {data_root}\ntrain: images/train\nval: images/val\nnc: 3\nnames: [a, b]\n",
    )
    with pytest.raises(ValueError, match=r"bad\.yaml.*nc=3.*2 entries"):
        check_dataset(y)


@pytest.mark.parametrize("missing", ["train", "val"])
def test_missing_split_key(data_root: Path, missing: str):
    cfg = {"path": str(data_root), "train": "images/train", "val": "images/val", "names": ["a"]}
    del cfg[missing]
    with pytest.raises(ValueError, match=f"missing required key '{missing}'"):
        check_dataset(cfg)


def test_names_with_gaps_rejected(data_root: Path):
    with pytest.raises(ValueError, match="without gaps"):
        check_dataset(
            {"path": str(data_root), "train": "images/train", "val": "images/val", "names": {0: "a", 2: "c"}}
        )


def test_relative_path_resolves_against_repo_root(data_root: Path):
    rel = os.path.relpath(data_root, ROOT)
    d = check_dataset({"path": rel, "train": "images/train", "val": "images/val", "names": ["a"]})
    assert d["path"] == str(data_root.resolve())


def test_missing_data_without_download(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="Place the dataset at"):
        check_dataset(
            {"path": str(tmp_path / "none"), "train": "images/train", "val": "images/val", "names": ["a"]}
        )


@pytest.mark.parametrize(
    "download",
    [
        "import os; open('PWNED', 'w')",
        "https://example.com/data.zip",
        "bash data/scripts/get.sh && rm -rf /",
        "utils/general.py",
        "data/scripts/../../utils/general.py",
        "data/scripts/make_shapes.py\nimport os",
        ["data/scripts/make_shapes.py"],
    ],
)
def test_download_values_other_than_a_script_are_refused(tmp_path: Path, monkeypatch, download):
    monkeypatch.chdir(tmp_path)
    called = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: called.append(a))
    cfg = {
        "path": str(tmp_path / "d"),
        "train": "images/train",
        "val": "images/val",
        "names": ["a"],
        "download": download,
    }
    with pytest.raises(ValueError, match="refusing 'download'.*Place the dataset at"):
        check_dataset(cfg)
    assert not called and not (tmp_path / "PWNED").exists()


def test_download_script_runs_without_shell(tmp_path: Path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs))
        out = Path(cmd[cmd.index("--out") + 1])
        for split in ("train", "val"):
            (out / "images" / split).mkdir(parents=True)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(dataset_config.subprocess, "run", fake_run)
    cfg = {"path": str(tmp_path / "shapes"), "train": "images/train", "val": "images/val", "names": ["a"],
           "download": "data/scripts/make_shapes.py"}  # fmt: skip
    d = check_dataset(cfg)
    ((cmd, kwargs),) = calls
    assert cmd == [sys.executable, str(ROOT / "data" / "scripts" / "make_shapes.py"), "--out", d["path"]]
    assert not kwargs.get("shell")
    with pytest.raises(FileNotFoundError):
        check_dataset({**cfg, "path": str(tmp_path / "other")}, autodownload=False)


def test_failed_download_script_is_reported(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(
        dataset_config.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 2)
    )
    cfg = {"path": str(tmp_path / "x"), "train": "images/train", "val": "images/val", "names": ["a"],
           "download": "data/scripts/make_shapes.py"}  # fmt: skip
    with pytest.raises(FileNotFoundError, match="exited with code 2"):
        check_dataset(cfg)


def test_resolve_download_script():
    assert (
        resolve_download_script("data/scripts/make_shapes.py") == ROOT / "data" / "scripts" / "make_shapes.py"
    )
    assert resolve_download_script("data/scripts/missing.py") is None
    assert resolve_download_script(None) is None


def test_shapes_yaml_is_found_by_name():
    d = (
        check_dataset("shapes.yaml", autodownload=False)
        if (ROOT.parent / "datasets" / "shapes").exists()
        else None
    )
    if d is None:
        with pytest.raises(FileNotFoundError, match=str(ROOT.parent / "datasets" / "shapes")):
            check_dataset("shapes.yaml", autodownload=False)
    else:
        assert d["nc"] == 6 and d["names"][5] == "cross"


def test_invalid_yaml_and_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="dataset YAML not found"):
        check_dataset(tmp_path / "nope.yaml")
    bad = write_yaml(tmp_path / "b.yaml", "train: [unclosed\n")
    with pytest.raises(ValueError, match=r"b\.yaml"):
        check_dataset(bad)
