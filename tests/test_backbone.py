from __future__ import annotations

import pytest
import torch
from torch import nn

from knet.model.backbone import ResNet, build_backbone

# torchvision totals minus the 1000-way fc layer
TORCHVISION_PARAMS_NO_FC = {
    18: 11_689_512 - (512 * 1000 + 1000),
    34: 21_797_672 - (512 * 1000 + 1000),
    50: 25_557_032 - (2048 * 1000 + 1000),
    101: 44_549_160 - (2048 * 1000 + 1000),
}


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("depth", "expected"),
    [(18, 11_176_512), (34, 21_284_672), (50, 23_508_032), (101, 42_500_160)],
)
def test_param_count_matches_torchvision(depth: int, expected: int) -> None:
    assert TORCHVISION_PARAMS_NO_FC[depth] == expected
    assert _num_params(ResNet(depth)) == expected


@pytest.mark.parametrize("depth", [0, 26, 152, "50"])
def test_unsupported_depth(depth) -> None:
    with pytest.raises(ValueError, match=repr(depth)):
        ResNet(depth)


@pytest.mark.parametrize(
    ("depth", "channels"), [(18, (64, 128, 256, 512)), (50, (256, 512, 1024, 2048))]
)
def test_output_shapes(depth: int, channels: tuple[int, ...]) -> None:
    model = ResNet(depth).eval()
    assert model.out_channels == channels
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 64, 96))
    assert len(feats) == 4
    for f, c, s in zip(feats, channels, (4, 8, 16, 32), strict=True):
        assert f.shape == (2, c, 64 // s, 96 // s)


@pytest.mark.parametrize(
    ("depth", "channels"), [(18, (16, 32, 64, 128)), (50, (64, 128, 256, 512))]
)
def test_base_channels_scales_widths(depth: int, channels: tuple[int, ...]) -> None:
    model = ResNet(depth, base_channels=16).eval()
    assert model.out_channels == channels
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == list(channels)
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_torchvision_key_names() -> None:
    keys50 = set(ResNet(50).state_dict())
    for k in (
        "conv1.weight",
        "bn1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer1.0.bn1.running_mean",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.bias",
        "layer3.5.bn3.running_var",
        "layer4.2.conv3.weight",
        "layer4.2.bn3.num_batches_tracked",
    ):
        assert k in keys50, k
    assert "layer1.1.downsample.0.weight" not in keys50
    assert "layer3.6.conv1.weight" not in keys50
    keys18 = set(ResNet(18).state_dict())
    for k in (
        "layer2.0.downsample.1.num_batches_tracked",
        "layer4.1.bn2.running_var",
        "layer1.0.conv2.weight",
    ):
        assert k in keys18, k
    assert "layer1.0.downsample.0.weight" not in keys18  # R-18 stage 1 has no projection
    assert "layer1.0.conv3.weight" not in keys18
    assert not any(k.startswith("fc.") for k in keys50 | keys18)


def test_stride_on_3x3_in_bottleneck() -> None:
    model = ResNet(50)
    assert model.layer2[0].conv1.stride == (1, 1)
    assert model.layer2[0].conv2.stride == (2, 2)
    assert model.layer2[0].downsample[0].stride == (2, 2)


def _torchvision_like_checkpoint(depth: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = ResNet(depth).state_dict()
    state = {k: (v + torch.rand_like(v) if v.is_floating_point() else v) for k, v in state.items()}
    state["fc.weight"] = torch.randn(1000, 512 if depth < 50 else 2048)
    state["fc.bias"] = torch.randn(1000)
    return state


def test_checkpoint_round_trip(tmp_path) -> None:
    state = _torchvision_like_checkpoint(50)
    path = tmp_path / "r50.pth"
    torch.save(state, path)
    model = build_backbone(50, weights=path)
    loaded = model.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}
    for k, v in loaded.items():
        assert torch.equal(v, state[k]), k

    # a {"state_dict": ...} wrapper is accepted too
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state, "meta": {"epoch": 90}}, wrapped)
    model2 = build_backbone(50, weights=str(wrapped))
    assert torch.equal(model2.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])


def test_checkpoint_without_num_batches_tracked(tmp_path) -> None:
    # pre-0.4.1 checkpoints (original torchvision ImageNet weights) lack these buffers
    state = _torchvision_like_checkpoint(18)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old_r18.pth"
    torch.save(state, path)
    model = build_backbone(18, weights=path)
    assert torch.equal(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert model.layer4[1].bn2.num_batches_tracked.item() == 0


def test_checkpoint_missing_key(tmp_path) -> None:
    state = _torchvision_like_checkpoint(50)
    del state["layer4.2.conv3.weight"]
    path = tmp_path / "r50.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        build_backbone(50, weights=path)
    msg = str(err.value)
    assert str(path) in msg
    assert "ResNet-50" in msg
    assert "missing" in msg and "layer4.2.conv3.weight" in msg


def test_checkpoint_wrong_shape_and_unexpected(tmp_path) -> None:
    state = _torchvision_like_checkpoint(18)
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        build_backbone(18, weights=path)
    assert str(path) in str(err.value)
    assert "layer2.0.conv1.weight" in str(err.value)

    state = _torchvision_like_checkpoint(18)
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "unexpected.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="layer5.0.conv1.weight"):
        build_backbone(18, weights=path)

    # a ResNet-18 checkpoint is not a ResNet-50 one
    path18 = tmp_path / "r18.pth"
    torch.save(_torchvision_like_checkpoint(18), path18)
    with pytest.raises(ValueError, match="ResNet-50"):
        build_backbone(50, weights=path18)


def test_checkpoint_missing_file(tmp_path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone(18, weights=path)


def test_weights_require_base_64(tmp_path) -> None:
    with pytest.raises(ValueError, match="base_channels"):
        build_backbone(18, weights=tmp_path / "x.pth", base_channels=16)


def _bn_modules(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_frozen_stages_and_norm_eval() -> None:
    model = ResNet(18, base_channels=16, frozen_stages=1, norm_eval=True)
    model.train()
    assert model.training
    for mod in (model.conv1, model.bn1, model.layer1):
        for p in mod.parameters():
            assert not p.requires_grad
    for mod in (model.layer2, model.layer3, model.layer4):
        for p in mod.parameters():
            assert p.requires_grad
    # BN affine params of non-frozen stages stay trainable
    assert model.layer2[0].bn1.weight.requires_grad
    assert all(not bn.training for bn in _bn_modules(model))

    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(2, 3, 64, 64)).pop().sum().backward()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert model.conv1.weight.grad is None
    assert model.layer2[0].conv1.weight.grad is not None
    assert model.layer2[0].bn1.weight.grad is not None

    model.eval()
    assert all(not m.training for m in model.modules())
    model.train()
    assert all(not bn.training for bn in _bn_modules(model))


def test_frozen_stages_without_norm_eval() -> None:
    model = ResNet(18, base_channels=16, frozen_stages=1, norm_eval=False).train()
    assert not model.bn1.training
    assert not model.layer1.training and not model.layer1[0].bn1.training
    assert model.layer2.training and model.layer2[0].bn1.training
    before = model.layer2[0].bn1.running_mean.clone()
    frozen_before = model.layer1[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(before, model.layer2[0].bn1.running_mean)
    assert torch.equal(frozen_before, model.layer1[0].bn1.running_mean)


def test_frozen_stages_minus_one_freezes_nothing() -> None:
    model = ResNet(18, base_channels=16, frozen_stages=-1, norm_eval=False).train()
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
    model = ResNet(18, base_channels=16, frozen_stages=-1, norm_eval=True).train()
    assert all(p.requires_grad for p in model.parameters())
    assert all(not bn.training for bn in _bn_modules(model))


def test_frozen_stages_zero_freezes_only_the_stem_as_in_mmdet() -> None:
    model = ResNet(18, base_channels=16, frozen_stages=0, norm_eval=False).train()
    assert not model.conv1.weight.requires_grad and not model.bn1.training
    assert all(p.requires_grad for p in model.layer1.parameters())
    assert model.layer1[0].bn1.training


def test_init() -> None:
    model = ResNet(18, base_channels=16)
    assert torch.all(model.layer3[0].bn2.weight == 1)
    assert torch.all(model.layer3[0].bn2.bias == 0)
    w = model.layer4[0].conv1.weight  # (128, 64, 3, 3): fan_out = 128 * 9
    expected_std = (2.0 / (w.shape[0] * 9)) ** 0.5
    assert abs(w.std().item() - expected_std) / expected_std < 0.1
