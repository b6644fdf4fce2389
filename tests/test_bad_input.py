"""Bad data and bad command lines: corrupt files are reported by path and skipped; a dataset or command
line that cannot work stops with one clear message (no traceback) before any training starts."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import CliResult, make_tiny_checkpoint, make_tiny_dataset, run_scripts
from utils.checkpoints import CheckpointError, load_checkpoint
from utils.dataloaders import create_dataloader
from utils.label_checks import scan_pair
from utils.torch_utils import select_device


def _encoded(suffix: str, h: int = 48, w: int = 64) -> bytes:
    im = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    return cv2.imencode(suffix, im)[1].tobytes()


def _half(suffix: str) -> bytes:
    data = _encoded(suffix)
    return data[: len(data) // 2]


# name: (file suffix, file bytes, words the reason must contain)
BAD_IMAGES = {
    "empty file": (".png", lambda: b"", "cannot be decoded"),
    "text named .jpg": (".jpg", lambda: b"not an image at all\n", "cannot be decoded"),
    "random bytes": (".png", lambda: np.random.default_rng(1).bytes(4000), "cannot be decoded"),
    "truncated PNG": (".png", lambda: _half(".png"), "cannot be decoded"),
    "PNG header only": (".png", lambda: _encoded(".png")[:24], "cannot be decoded"),
    "truncated JPEG": (".jpg", lambda: _half(".jpg"), "truncated JPEG"),
    "truncated BMP": (".bmp", lambda: _half(".bmp"), "cannot be decoded"),
    "truncated TIFF": (".tif", lambda: _half(".tiff"), "cannot be decoded"),
    "truncated WEBP": (".webp", lambda: _half(".webp"), "cannot be decoded"),
    "5 px tall image": (".png", lambda: _encoded(".png", h=5), "smaller than"),
}
GOOD_LABEL = "0 0.5 0.5 0.25 0.25\n"
# name: (label text, words the reason must contain)
BAD_LABELS = {
    "4 columns": ("0 0.5 0.5 0.2\n", "4 columns"),
    "6 columns": ("0 0.5 0.5 0.2 0.2 0.9\n", "6 columns"),
    "class name instead of id": ("dog 0.5 0.5 0.2 0.2\n", "non-numeric"),
    "comma separated": ("0,0.5,0.5,0.2,0.2\n", "non-numeric"),
    "binary garbage": ("\x00\xff\x13garbage\x00\n", "non-numeric"),
    "nan coordinate": ("0 nan 0.5 0.2 0.2\n", "non-finite"),
    "inf size": ("0 0.5 0.5 inf 0.2\n", "non-finite"),
    "x above 1": ("0 1.5 0.5 0.2 0.2\n", "outside 0..1"),
    "negative y": ("0 0.5 -0.2 0.2 0.2\n", "outside 0..1"),
    "pixel coordinates": ("0 320 240 50 60\n", "outside 0..1"),
    "zero width": ("0 0.5 0.5 0 0.2\n", "zero width"),
    "fractional class": ("1.5 0.5 0.5 0.2 0.2\n", "non-integer class"),
    "bad second line": (GOOD_LABEL + "0 0.5\n", "line 2"),
}
# name: (label text, expected (n, 5) rows or None for "same as GOOD_LABEL")
ACCEPTED_LABELS = {
    "empty file (background)": ("", 0),
    "blank lines": ("\n\n" + GOOD_LABEL + "\n\n", 1),
    "windows line ends": (GOOD_LABEL.replace("\n", "\r\n") * 2 + "1 0.2 0.2 0.1 0.1\r\n", 2),
    "tabs": (GOOD_LABEL.replace(" ", "\t"), 1),
    "utf-8 byte order mark": ("\ufeff" + GOOD_LABEL, 1),
    "duplicate rows removed": (GOOD_LABEL * 3, 1),
    "polygon row becomes its box": ("0 0.1 0.2 0.5 0.2 0.3 0.6\n", 1),
    "tiny overshoot clipped": ("0 0.5 0.5 1.0005 0.2\n", 1),
    "scientific notation": ("0 5e-1 5E-1 2.5e-1 0.25\n", 1),
}


def _good_image(folder: Path, stem: str = "ok") -> Path:
    path = folder / f"{stem}.png"
    cv2.imwrite(str(path), np.full((48, 64, 3), 114, np.uint8))
    return path


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_corrupt_image_is_reported_with_reason(tmp_path, kind):
    suffix, make, reason = BAD_IMAGES[kind]
    image = tmp_path / f"bad{suffix}"
    image.write_bytes(make())
    label = tmp_path / "bad.txt"
    label.write_text(GOOD_LABEL)
    result = scan_pair(str(image), str(label))
    assert not result.ok and reason in result.error, result.error


@pytest.mark.parametrize("kind", BAD_LABELS)
def test_corrupt_label_is_reported_with_path_and_reason(tmp_path, kind):
    text, reason = BAD_LABELS[kind]
    label = tmp_path / "bad.txt"
    label.write_bytes(text.encode("utf-8", "surrogateescape"))
    result = scan_pair(str(_good_image(tmp_path)), str(label))
    assert not result.ok and str(label) in result.error and reason in result.error, result.error


@pytest.mark.parametrize("kind", ACCEPTED_LABELS)
def test_unusual_but_valid_labels_are_accepted(tmp_path, kind):
    text, rows = ACCEPTED_LABELS[kind]
    label = tmp_path / "ok.txt"
    label.write_text(text, newline="")
    result = scan_pair(str(_good_image(tmp_path)), str(label))
    assert result.ok, result.error
    assert result.labels.shape == (rows, 5) and result.labels.dtype == np.float32
    assert ((result.labels[:, 1:] >= 0) & (result.labels[:, 1:] <= 1)).all()


@pytest.mark.parametrize("kind", ["grey", "rgba", "16-bit"])
def test_unusual_but_valid_images_are_accepted(tmp_path, kind):
    im = {"grey": np.zeros((40, 40), np.uint8), "rgba": np.zeros((40, 40, 4), np.uint8),
          "16-bit": np.full((40, 40, 3), 60000, np.uint16)}[kind]  # fmt: skip
    cv2.imwrite(str(tmp_path / "im.png"), im)
    result = scan_pair(str(tmp_path / "im.png"), str(tmp_path / "missing.txt"))
    assert result.ok and result.shape == (40, 40) and result.missing_label


def test_loader_skips_every_bad_pair_and_names_each_one(tmp_path, project_log):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    good = [_good_image(images, f"good{i}") for i in range(3)]
    for p in good:
        (labels / f"{p.stem}.txt").write_text(GOOD_LABEL)
    bad = []
    for i, (suffix, make, _) in enumerate(list(BAD_IMAGES.values())[:5]):
        bad.append(images / f"badimage{i}{suffix}")
        bad[-1].write_bytes(make())
    for i, (text, _) in enumerate(list(BAD_LABELS.values())[:5]):
        bad.append(_good_image(images, f"badlabel{i}"))
        (labels / f"badlabel{i}.txt").write_text(text)
    loader, dataset = create_dataloader(images, 64, 4, 32, workers=0, nc=2)
    assert sorted(dataset.im_files) == sorted(map(str, good))
    text = "\n".join(project_log)
    assert "3 images usable, 10 skipped as corrupt" in text
    for path in bad:
        assert str(path) in text, f"{path.name} not named in the log"
    imgs, targets, _, _ = next(iter(loader))
    assert imgs.shape == (3, 3, 64, 64) and targets.shape == (3, 6)


@pytest.mark.parametrize("cls", [-1, 2])
def test_class_id_out_of_range_names_the_label_file(tmp_path, cls):
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "labels").mkdir()
    _good_image(images)
    label = tmp_path / "labels" / "ok.txt"
    label.write_text(f"{cls} 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ValueError, match="outside the valid range") as e:
        create_dataloader(images, 64, 2, 32, workers=0, nc=2)
    assert str(label) in str(e.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"PK\x03\x04 not really a zip", b"\x80\x02}q\x00.", b"hello"],
    ids=["empty", "zip", "pickle", "text"],
)
def test_unreadable_checkpoint_is_a_checkpoint_error(tmp_path, tiny_checkpoint, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(path)
    truncated = tmp_path / "truncated.pt"
    data = tiny_checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)


@pytest.mark.parametrize("device", ["7", "foo", "0,1", "cuda:9", "-1"])
def test_unknown_device_is_a_value_error_listing_choices(device):
    if torch.cuda.device_count() > 9:
        pytest.skip("this machine has that many GPUs")
    with pytest.raises(ValueError, match="use (--device )?cpu"):
        select_device(device)


# --------------------------------------------------------------------------------------- command lines
@pytest.fixture(scope="module")
def cli_world(tmp_path_factory) -> dict[str, Path]:
    """A tiny dataset, data YAMLs with one mistake each, a checkpoint and an image."""
    root = tmp_path_factory.mktemp("cli")
    ds = make_tiny_dataset(root / "data", n_train=4, n_val=2)
    world = {"root": root, "data": ds.yaml, "image": next(ds.images("val").glob("*.png"))}
    world["weights"] = make_tiny_checkpoint(root / "tiny.pt")
    base = f"path: {ds.root}\ntrain: images/train\n"
    (ds.root / "images" / "empty").mkdir()
    (ds.root / "images" / "empty" / "notes.txt").write_text("no images here")
    bad_train = ds.root / "images" / "corrupt"
    bad_train.mkdir()
    for i in range(2):
        (bad_train / f"x{i}.jpg").write_bytes(_half(".jpg"))
    yamls = {
        "empty_split": base + "val: images/empty\nnames: [red, blue]\n",
        "missing_folder": base + "val: images/nope\nnames: [red, blue]\n",
        "nc_mismatch": base + "val: images/val\nnc: 3\nnames: [red, blue]\n",
        "class_too_big": base + "val: images/val\nnames: [red]\n",
        "all_corrupt": f"path: {ds.root}\ntrain: images/corrupt\nval: images/val\nnames: [red, blue]\n",
    }
    for name, text in yamls.items():
        world[name] = root / f"{name}.yaml"
        world[name].write_text(text)
    world["garbage_pt"] = root / "garbage.pt"
    world["garbage_pt"].write_bytes(b"not a checkpoint")
    return world


def _train(world: dict, *args: str, data: str = "data") -> list[str]:
    return ["train.py", "--data", str(world[data]), "--cfg", "yolov5n.yaml", "--img", "64", "--epochs", "1",
            "--batch-size", "4", "--workers", "0", "--noplots", "--noautoanchor",
            "--project", str(world["root"] / "runs"), "--name", "exp", *args]  # fmt: skip


def _val(world: dict, *args: str) -> list[str]:
    return ["val.py", "--data", str(world["data"]), "--weights", str(world["weights"]), "--img", "64",
            "--workers", "0", "--project", str(world["root"] / "val"), *args]  # fmt: skip


def _detect(world: dict, *args: str) -> list[str]:
    return ["detect.py", "--weights", str(world["weights"]), "--source", str(world["image"]), "--img", "64",
            "--project", str(world["root"] / "detect"), *args]  # fmt: skip


def _export(world: dict, *args: str) -> list[str]:
    return ["export.py", "--weights", str(world["weights"]), "--include", "torchscript", "--img", "64", *args]


def call_main(argv: list[str], log: list[str]) -> CliResult:
    """Run a script's main() in this process (no start-up cost); an escaping exception fails the test."""
    import detect
    import export
    import train
    import val

    mains = {"train.py": lambda a: train.main(train.parse_opt(a)), "val.py": val.main, "detect.py": detect.main,
             "export.py": export.main}  # fmt: skip
    start = len(log)
    code = mains[argv[0]](argv[1:])
    return CliResult(argv, code, "\n".join(log[start:]))


def _assert_one_error(result: CliResult, *needles: str) -> None:
    text = result.output
    assert result.returncode == 1, f"{result.argv}: exit {result.returncode}\n{text[-3000:]}"
    assert "Traceback" not in text, f"{result.argv}:\n{text[-3000:]}"
    errors = [ln for ln in text.splitlines() if ("ERROR" in ln or "error:" in ln) and not ln.startswith("[")]
    assert len(errors) == 1, f"{result.argv}: expected one error line, got {errors}"  # '[ERROR:..' is OpenCV
    message = text[text.index(errors[0]) :]  # the error line and the lines it lists (files, ids)
    for needle in needles:
        assert needle in message, f"{result.argv}: {needle!r} not in {message[:2000]!r}"
    assert "Starting training" not in text


BAD_DATASETS = {  # data YAML -> what the message must name
    "empty_split": lambda w: str(w["data"].parent / "images" / "empty"),
    "missing_folder": lambda w: str(w["missing_folder"]),
    "nc_mismatch": lambda w: str(w["nc_mismatch"]),
    "class_too_big": lambda w: str(w["data"].parent / "labels" / "train"),
    "all_corrupt": lambda w: str(w["data"].parent / "images" / "corrupt"),
}


@pytest.mark.parametrize("name", BAD_DATASETS)
def test_bad_dataset_stops_training_before_it_starts(cli_world, project_log, name):
    result = call_main(_train(cli_world, "--name", name, data=name), project_log)
    _assert_one_error(result, BAD_DATASETS[name](cli_world))
    assert not list((cli_world["root"] / "runs").rglob("*.pt")), "no checkpoint may be written"


CLI_MISTAKES = [  # (script, extra arguments, words the one error line must contain)
    ("train", ["--data", "nope.yaml"], ["nope.yaml", "not found"]),
    ("train", ["--weights", "nope.pt"], ["--weights", "nope.pt"]),
    ("train", ["--cfg", "nope_model.yaml"], ["nope_model.yaml", "not found"]),
    ("train", ["--hyp", "nope_hyp.yaml"], ["nope_hyp.yaml", "not found"]),
    ("train", ["--device", "foo"], ["--device", "foo"]),
    ("train", ["--device", "7"], ["--device", "7"]),
    ("val", ["--data", "nope.yaml"], ["nope.yaml", "not found"]),
    ("val", ["--weights", "nope.pt"], ["nope.pt", "not found"]),
    ("val", ["--device", "foo"], ["--device", "foo"]),
    ("val", ["--device", "7"], ["--device", "7"]),
    ("detect", ["--weights", "nope.pt"], ["nope.pt", "not found"]),
    ("detect", ["--source", "nope_dir/"], ["nope_dir", "not found"]),
    ("detect", ["--device", "foo"], ["--device", "foo"]),
    ("detect", ["--device", "7"], ["--device", "7"]),
    ("export", ["--weights", "nope.pt"], ["nope.pt", "not found"]),
    ("export", ["--device", "foo"], ["--device", "foo"]),
    ("export", ["--device", "7"], ["--device", "7"]),
]


@pytest.mark.parametrize(
    "script, args, needles", CLI_MISTAKES, ids=[f"{s} {' '.join(a)}" for s, a, _ in CLI_MISTAKES]
)
def test_command_line_mistake_gives_one_error_line(cli_world, project_log, script, args, needles):
    if "7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a GPU 7")
    build = {"train": _train, "val": _val, "detect": _detect, "export": _export}[script]
    _assert_one_error(call_main(build(cli_world, *args), project_log), *needles)


def test_detect_without_source_says_to_pass_one(cli_world, project_log, monkeypatch, tmp_path):
    """The default --source (data/images, as YOLOv5) is not shipped: the error says what to pass."""
    import detect

    monkeypatch.setattr(detect, "DEFAULT_SOURCE", tmp_path / "data" / "images")
    argv = ["detect.py", "--weights", str(cli_world["weights"]), "--img", "64"]
    _assert_one_error(call_main(argv, project_log), "images not found (the default; pass --source")


def test_command_line_mistakes_in_real_processes(cli_world):
    """The same checks through the real entry points: exit status 1 and no traceback on stderr."""
    w = cli_world
    commands = [
        _train(w, "--name", "sub", data="empty_split"),
        _train(w, "--resume", str(w["garbage_pt"])),
        _val(w, "--weights", "nope.pt"),
        _detect(w, "--source", "nope_dir/"),
        _export(w, "--device", "foo"),
    ]
    needles = [str(w["data"].parent / "images" / "empty"), "garbage.pt", "nope.pt", "nope_dir", "foo"]
    for result, needle in zip(run_scripts(commands), needles, strict=True):
        _assert_one_error(result, needle)


def test_image_size_not_a_stride_multiple_is_rounded_up_with_a_warning(cli_world, project_log):
    w = cli_world
    weights = shutil.copy(w["weights"], w["root"] / "export_me.pt")
    commands = [
        _train(w, "--name", "img65", "--img", "65", "--noval"),
        _val(w, "--img", "65"),
        _detect(w, "--img", "65"),
        ["export.py", "--weights", str(weights), "--include", "torchscript", "--img", "65"],
    ]
    for argv in commands:
        result = call_main(argv, project_log)
        assert result.returncode == 0, f"{argv}:\n{result.output[-3000:]}"
        assert "must be a multiple of max stride 32" in result.output, f"{argv}:\n{result.output[-2000:]}"
        assert "96" in result.output
    assert load_checkpoint(w["root"] / "runs" / "img65" / "weights" / "last.pt")["train_args"]["imgsz"] == 65
    assert (w["root"] / "export_me.torchscript").is_file()
