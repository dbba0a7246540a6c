from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from knet.model.backbone import ResNet
from knet.model.neck import FPN, ConvGNReLU, SemanticFPNFuser, sine_positional_encoding


def _pyramid(batch: int, channels: int, height: int, width: int) -> list[torch.Tensor]:
    return [
        torch.randn(batch, channels, math.ceil(height / s), math.ceil(width / s))
        for s in (4, 8, 16, 32)
    ]


def test_fpn_shapes_and_params() -> None:
    in_channels = (16, 32, 64, 128)
    fpn = FPN(in_channels, out_channels=24)
    feats = [
        torch.randn(2, c, 64 // s, 96 // s)
        for c, s in zip(in_channels, (4, 8, 16, 32), strict=True)
    ]
    outs = fpn(feats)
    assert len(outs) == 4
    for o, s in zip(outs, (4, 8, 16, 32), strict=True):
        assert o.shape == (2, 24, 64 // s, 96 // s)
    assert all(conv.kernel_size == (1, 1) for conv in fpn.lateral_convs)
    assert all(conv.kernel_size == (3, 3) for conv in fpn.fpn_convs)
    assert all(torch.all(conv.bias == 0) for conv in fpn.fpn_convs)
    # R-50 FPN: lateral 1x1 (+bias) and 3x3 (+bias), 256 channels
    fpn50 = FPN((256, 512, 1024, 2048))
    lateral = sum((c + 1) * 256 for c in (256, 512, 1024, 2048))
    smooth = 4 * (256 * 256 * 9 + 256)
    assert sum(p.numel() for p in fpn50.parameters()) == lateral + smooth


def test_fpn_top_down_uses_nearest_upsampling() -> None:
    fpn = FPN((1, 1), out_channels=1)
    with torch.no_grad():
        for conv in fpn.lateral_convs:
            conv.weight.fill_(1.0)
        # identity 3x3 smoothing conv
        for conv in fpn.fpn_convs:
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0
    coarse = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    fine = torch.zeros(1, 1, 4, 4)
    p_fine, p_coarse = fpn([fine, coarse])
    assert torch.equal(p_coarse, coarse)
    expected = coarse.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.equal(p_fine, expected)


def test_fpn_odd_sizes() -> None:
    fpn = FPN((8, 8, 8, 8), out_channels=8)
    feats = _pyramid(1, 8, 100, 70)
    outs = fpn(feats)
    assert [o.shape[-2:] for o in outs] == [f.shape[-2:] for f in feats]


def test_positional_encoding_values() -> None:
    b, h, w, nf = 2, 6, 10, 16
    pos = sine_positional_encoding(b, h, w, nf, device="cpu", dtype=torch.float32)
    assert pos.shape == (b, 2 * nf, h, w)
    assert pos.dtype == torch.float32
    assert pos.min() >= -1 and pos.max() <= 1
    assert torch.equal(pos[0], pos[1])

    two_pi = 2 * math.pi
    # channel 0 (y, sin, dim_t = 1) at pixel (0, 0): normalized coordinate 1 / H
    assert pos[0, 0, 0, 0].item() == pytest.approx(math.sin(two_pi / h), abs=1e-5)
    # channel 1 (y, cos, dim_t = 1)
    assert pos[0, 1, 0, 0].item() == pytest.approx(math.cos(two_pi / h), abs=1e-5)
    # channel 2 (y, sin, dim_t = 10000 ** (2 / nf)) at row 3
    assert pos[0, 2, 3, 7].item() == pytest.approx(
        math.sin(two_pi * 4 / h / 10000 ** (2 / nf)), abs=1e-5
    )
    # last y channel: cos with dim_t = 10000 ** (2 * (nf // 2 - 1) / nf), row 5 (coordinate 1)
    assert pos[0, nf - 1, 5, 0].item() == pytest.approx(
        math.cos(two_pi / 10000 ** (2 * (nf // 2 - 1) / nf)), abs=1e-5
    )
    # x part starts at channel nf: depends on column only
    assert pos[0, nf, 4, 2].item() == pytest.approx(math.sin(two_pi * 3 / w), abs=1e-5)
    assert pos[0, nf + 3, 1, 9].item() == pytest.approx(
        math.cos(two_pi * 10 / w / 10000 ** (2 / nf)), abs=1e-5
    )
    assert torch.allclose(pos[:, :nf], pos[:, :nf, :, :1].expand(-1, -1, -1, w))
    assert torch.allclose(pos[:, nf:], pos[:, nf:, :1, :].expand(-1, -1, h, -1))


def test_positional_encoding_matches_naive_loop() -> None:
    h, w, nf = 3, 4, 8
    pos = sine_positional_encoding(1, h, w, nf, device=None, dtype=torch.float64)
    assert pos.dtype == torch.float64
    for c in range(2 * nf):
        k = c % nf
        t = 10000.0 ** (2 * (k // 2) / nf)
        fn = math.sin if k % 2 == 0 else math.cos
        for r in range(h):
            for col in range(w):
                coord = (r + 1) / (h + 1e-6) if c < nf else (col + 1) / (w + 1e-6)
                assert pos[0, c, r, col].item() == pytest.approx(
                    fn(coord * 2 * math.pi / t), abs=1e-6
                )


def test_conv_gn_relu() -> None:
    block = ConvGNReLU(8, 16, kernel_size=3, stride=2, num_groups=4)
    assert [name for name, _ in block.named_children()] == ["conv", "gn", "relu"]
    assert block.conv.bias is None
    assert block.gn.num_groups == 4
    out = block(torch.randn(2, 8, 9, 12))
    assert out.shape == (2, 16, 5, 6)
    assert out.min() >= 0
    with pytest.raises(ValueError, match="num_groups"):
        ConvGNReLU(8, 10, num_groups=4)


def test_fuser_param_count() -> None:
    fuser = SemanticFPNFuser(256)
    n_3x3 = sum(1 for m in fuser.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert n_3x3 == 7
    assert 7 * (589_824 + 512) + 2 * 66_048 == 4_264_448
    assert sum(p.numel() for p in fuser.parameters()) == 4_264_448


def test_fuser_shapes_256() -> None:
    fuser = SemanticFPNFuser(256)
    feats = _pyramid(2, 256, 128, 160)
    assert [tuple(f.shape[-2:]) for f in feats] == [(32, 40), (16, 20), (8, 10), (4, 5)]
    with torch.no_grad():
        loc, sem = fuser(feats)
    assert loc.shape == (2, 256, 16, 20)
    assert sem.shape == (2, 256, 16, 20)
    assert loc.min() >= 0 and sem.min() >= 0


def test_fuser_small_and_odd_sizes() -> None:
    fuser = SemanticFPNFuser(channels=32, num_groups=8)
    feats = _pyramid(2, 32, 128, 160)
    loc, sem = fuser(feats)
    assert loc.shape == sem.shape == (2, 32, 16, 20)
    (loc.sum() + sem.sum()).backward()
    assert all(p.grad is not None for p in fuser.parameters())

    # sizes that are not a multiple of 32 still land on the P3 grid
    feats = _pyramid(1, 32, 100, 70)
    loc, sem = fuser(feats)
    assert loc.shape == sem.shape == (1, 32, 13, 9)


def test_fuser_uses_positional_encoding() -> None:
    fuser = SemanticFPNFuser(channels=32, num_groups=8).eval()
    zeros = [torch.zeros_like(f) for f in _pyramid(1, 32, 64, 64)]
    with torch.no_grad():
        loc, _ = fuser(zeros)
        # all-zero inputs give a spatially varying output only through the P5 encoding
        fuser.towers[3][0].conv.weight.zero_()
        loc_no_pos, _ = fuser(zeros)
    assert loc.std() > 0
    assert loc_no_pos.std() == 0


def test_fuser_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        SemanticFPNFuser(channels=33, num_groups=3)
    with pytest.raises(ValueError):
        SemanticFPNFuser(channels=32, num_groups=5)
    with pytest.raises(ValueError, match="4 levels"):
        SemanticFPNFuser(channels=32, num_groups=8)(_pyramid(1, 32, 64, 64)[:3])


def test_backbone_fpn_fuser_chain() -> None:
    backbone = ResNet(18, base_channels=8).eval()
    fpn = FPN(backbone.out_channels, out_channels=32)
    fuser = SemanticFPNFuser(channels=32, num_groups=8)
    with torch.no_grad():
        loc, sem = fuser(fpn(backbone(torch.randn(1, 3, 96, 128))))
    assert loc.shape == sem.shape == (1, 32, 12, 16)
