"""Model core: YAML parsing, registered modules, strides, attention formulas, ResNet weights, fusion."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import ATTENTION, CBAM, create_attention
from models.common import ResNetStage
from models.pretrained import load_backbone_weights
from models.registry import MODULES, YamlError
from models.yolo import MODELS_DIR, DetectionModel, parse_model

ROOT = Path(__file__).resolve().parents[1]
ALL_YAMLS = sorted(p.name for p in MODELS_DIR.glob("*.yaml"))

# One YAML row's args per registered module (input 32 channels).
ROW_ARGS = {
    "Conv": [24, 3, 2],
    "Bottleneck": [32],
    "C3": [48],
    "SPP": [40, [5, 9]],
    "SPPF": [40, 5],
    "Focus": [16, 3],
    "ResNetStem": [64],
    "ResNetStage": [128, 2],
    "CBAM": [8],
    "ChannelAttention": [8],
    "SpatialAttention": [7],
    "SE": [],
    "ECA": [],
    "CoordAtt": [],
    "SimAM": [],
    "BAM": [],
    "Attention": ["eca"],
}


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"Concat", "Detect"}))
def test_registered_module_declares_its_channels(name):
    assert name in ROW_ARGS, f"add a test row for newly registered module {name}"
    d = {"nc": 2, "backbone": [[-1, 2 if name == "C3" else 1, name, ROW_ARGS[name]]], "head": []}
    layers, _ = parse_model(d, ch=32, verbose=False)
    declared = _declared_channels(d, 32)
    out = layers(torch.rand(2, 32, 32, 32))
    assert out.shape[1] == declared


def _declared_channels(d, ch):
    from models.registry import BuildContext, lookup

    f, n, name, args = d["backbone"][0]
    return lookup(name).yaml_args([ch], args, n, BuildContext(nc=2, anchors=[])).c_out


def test_concat_and_nn_rows_declare_channels():
    d = {
        "nc": 2,
        "backbone": [[-1, 1, "Conv", [16, 3, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]]],
        "head": [[[-1, 0], 1, "Concat", [1]], [-1, 1, "Conv", [8, 1, 1]]],
    }
    layers, save = parse_model(d, ch=3, verbose=False)
    assert save == [0]
    assert layers[3].conv.in_channels == 32  # 16 (upsampled) + 16 (row 0)


@pytest.mark.parametrize("cfg", ALL_YAMLS)
def test_every_yaml_builds_with_strides_and_shapes(cfg):
    model = DetectionModel(cfg, nc=3, verbose=False)
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    model.eval()
    with torch.no_grad():
        pred, raw = model(torch.rand(1, 3, 128, 96))
    na = model.detect.na
    assert [tuple(r.shape) for r in raw] == [(1, na, 128 // s, 96 // s, 8) for s in (8, 16, 32)]
    assert pred.shape == (1, na * sum((128 // s) * (96 // s) for s in (8, 16, 32)), 8)


@pytest.mark.parametrize(
    "cfg, nc, params",
    [
        ("yolov5n.yaml", 80, 1_872_157),
        ("yolov5s.yaml", 80, 7_235_389),
        ("yolov5s.yaml", 6, 7_035_811),
        ("yolov5m.yaml", 80, 21_190_557),
        ("yolov5l.yaml", 80, 46_563_709),
        ("yolov5x.yaml", 80, 86_749_405),
    ],
)
def test_yolov5_parameter_counts_match_v7(cfg, nc, params):
    model = DetectionModel(cfg, nc=nc, verbose=False)
    assert sum(p.numel() for p in model.parameters()) == params


def test_resnet50_cbam_layout():
    model = DetectionModel("yolov5-resnet50-cbam.yaml", verbose=False)
    types = [m.type for m in model.model]
    assert types[:10] == ["ResNetStem", "ResNetStage", "CBAM", "ResNetStage", "CBAM", "ResNetStage", "CBAM",
                          "ResNetStage", "CBAM", "SPPF"]  # fmt: skip
    assert [len(model.model[i]) for i in (1, 3, 5, 7)] == [3, 4, 6, 3]
    assert model.model[-1].f == [17, 20, 23]
    assert model.model[12].f == [-1, 6] and model.model[16].f == [-1, 4]
    bns = [m for m in model.model[:9].modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(bn.eps == 1e-5 for bn in bns)


def test_detect_bias_and_anchor_init():
    model = DetectionModel("yolov5s.yaml", nc=80, verbose=False)
    detect = model.detect
    px = (detect.anchors * detect.stride.view(-1, 1, 1)).view(3, -1).tolist()
    assert px == [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
    torch.manual_seed(0)
    fresh = nn.Conv2d(128, 255, 1)  # torch's default bias init is uniform in +-1/sqrt(fan_in)
    bound = 1 / 128**0.5
    obj = detect.m[0].bias.view(3, -1)[:, 4]
    expected = torch.log(torch.tensor(8 / (640 / 8) ** 2))
    assert ((obj - expected).abs() <= bound + 1e-6).all()
    assert fresh is not None


def test_reversed_anchors_are_reordered():
    d = copy.deepcopy(DetectionModel("yolov5n.yaml", verbose=False).yaml)
    d["anchors"] = d["anchors"][::-1] if "anchors" in d else None
    model = DetectionModel(d, verbose=False)
    px = model.detect.anchors * model.detect.stride.view(-1, 1, 1)
    areas = px.prod(-1).mean(-1)
    assert areas[0] < areas[1] < areas[2]


def _reference_cbam(x, cbam: CBAM):
    """The paper's formulas written out with functional ops."""
    w1, w2 = cbam.channel.fc1.weight[:, :, 0, 0], cbam.channel.fc2.weight[:, :, 0, 0]

    def mlp(v):  # (B, C)
        return F.relu(v @ w1.T) @ w2.T

    avg, mx = x.mean((2, 3)), x.flatten(2).max(-1).values
    mc = torch.sigmoid(mlp(avg) + mlp(mx))[:, :, None, None]
    f1 = x * mc
    s = torch.cat((f1.mean(1, keepdim=True), f1.max(1, keepdim=True).values), 1)
    ms = torch.sigmoid(F.conv2d(s, cbam.spatial.conv.weight, padding=3))
    return f1 * ms


def test_cbam_matches_paper_formulas():
    torch.manual_seed(1)
    cbam = CBAM(64, reduction=16)
    x = torch.randn(2, 64, 9, 7)
    assert cbam.channel.fc1.out_channels == 4 and cbam.spatial.conv.kernel_size == (7, 7)
    torch.testing.assert_close(cbam(x), _reference_cbam(x, cbam))


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention_factory_keeps_shape(name):
    layer = create_attention(name, 32)
    x = torch.randn(2, 32, 8, 6)
    assert layer(x).shape == x.shape
    with pytest.raises(ValueError, match="valid"):
        create_attention("nope", 32)


def _torchvision_pair(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = torchvision.models.resnet50()
    for m in tv.modules():  # non-trivial BN statistics so that eval mode really is checked
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet50.pth"
    torch.save(tv.state_dict(), path)
    return tv.eval(), path


def test_torchvision_weights_transfer_and_stage_outputs_match(tmp_path):
    tv, path = _torchvision_pair(tmp_path)
    model = DetectionModel("yolov5-resnet50-cbam.yaml", verbose=False)
    report = load_backbone_weights(model, path)
    assert report.summary() == "Transferred 318/318 ResNet50 tensors"
    for i in (2, 4, 6, 8):  # bypass CBAM rows for the comparison
        model.model[i] = nn.Identity()
    model.eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        y = model.model[0](x)
        ours = []
        for i in range(1, 8):
            y = model.model[i](y)
            ours.append(y)
        t = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        t1 = tv.layer1(t)
        t2 = tv.layer2(t1)
        t3 = tv.layer3(t2)
        t4 = tv.layer4(t3)
    for a, b in ((ours[2], t2), (ours[4], t3), (ours[6], t4)):
        torch.testing.assert_close(a, b)


def test_yolo_cli_reports_transfer(tmp_path):
    _, path = _torchvision_pair(tmp_path)
    out = subprocess.run(
        [sys.executable, "models/yolo.py", "--cfg", "yolov5-resnet50-cbam.yaml", "--weights", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "Transferred 318/318 ResNet50 tensors" in text
    assert "strides: [8, 16, 32]" in text and "GFLOPs" in text


@pytest.mark.parametrize(
    "cfg", ["yolov5s.yaml", "yolov5-resnet50-cbam.yaml", "yolov5-resnet50-cbam-inblock.yaml"]
)
def test_fused_model_gives_same_output(cfg):
    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=4, verbose=False)
    for m in model.modules():  # zero-init residual BNs would hide their conv from the comparison
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.1)
    model.train()
    with torch.no_grad():  # a few training passes so BN statistics are not the identity
        for _ in range(2):
            model(torch.rand(2, 3, 96, 96))
    model.eval()
    x = torch.rand(1, 3, 128, 96)
    with torch.no_grad():
        ref = model(x)[0]
        fused = copy.deepcopy(model).fuse()
        out = fused(x)[0]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


def _yaml_with(tmp_path, row):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "nc: 2\nbackbone:\n  [[-1, 1, Conv, [16, 3, 2]],\n   "
        + row
        + "]\nhead:\n  [[-1, 1, Conv, [8, 1, 1]]]\n"
    )
    return path


def test_unknown_module_is_refused_with_valid_names(tmp_path):
    path = _yaml_with(tmp_path, "[-1, 1, NoSuchBlock, [16]],")
    with pytest.raises(YamlError) as e:
        DetectionModel(path, verbose=False)
    msg = str(e.value)
    assert "bad.yaml" in msg and "row 1" in msg and "NoSuchBlock" in msg and "CBAM" in msg


@pytest.mark.parametrize(
    "payload",
    [
        "__import__('os').system('touch PWNED')",
        "exec('import os')",
        "nn.Module.__subclasses__()",
        "open('x').read()",
    ],
)
def test_code_in_yaml_is_refused_and_not_run(tmp_path, payload, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _yaml_with(tmp_path, f'[-1, 1, Conv, [16, "{payload}"]],')
    with pytest.raises(YamlError, match="row 1"):
        DetectionModel(path, verbose=False)
    module_path = _yaml_with(tmp_path, f'[-1, 1, "{payload}", [16]],')
    with pytest.raises(YamlError, match="row 1"):
        DetectionModel(module_path, verbose=False)
    assert not (tmp_path / "PWNED").exists()


def test_resnet_stage_is_not_scaled():
    d = {"nc": 2, "depth_multiple": 0.33, "width_multiple": 0.25,
         "backbone": [[-1, 1, "ResNetStem", [64]], [-1, 3, "ResNetStage", [256, 1]]], "head": []}  # fmt: skip
    layers, _ = parse_model(d, ch=3, verbose=False)
    assert isinstance(layers[1], ResNetStage) and len(layers[1]) == 3
    assert layers[1](layers[0](torch.rand(1, 3, 64, 64))).shape[1] == 256


def test_models_cli_test_builds_everything():
    out = subprocess.run([sys.executable, "models/yolo.py", "--test"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (out.stdout + out.stderr).count(" OK ") == len(ALL_YAMLS)


def test_resnet_blocks_start_as_identity():
    """From scratch, each bottleneck's last BN starts at zero: the block passes relu(x) through."""
    torch.manual_seed(0)
    stage = ResNetStage(256, 256, blocks=2, stride=1, attention="CBAM").eval()
    for block in stage:
        assert torch.count_nonzero(block.bn3.weight) == 0
        assert block.conv1.weight.std() > 0  # the other layers are initialised, not zeroed
    x = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(stage(x), torch.relu(x))
