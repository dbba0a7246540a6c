"""FPN neck, 2-D sine positional encoding and K-Net's semantic-FPN feature fuser."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FPN",
    "POSITIONAL_ENCODINGS",
    "ConvGNReLU",
    "SemanticFPNFuser",
    "coord_features",
    "sine_positional_encoding",
]

# Table 4b switches (``model.positional_encoding``) of the P5 input: the official sine encoding
# (added), CoordConv (two coordinate channels concatenated, official ``cat_coors``) or none.
POSITIONAL_ENCODINGS = ("sine", "coordconv", "none")


class FPN(nn.Module):
    """Feature pyramid network (mmdet style, no norm, no extra levels).

    Args:
        in_channels: channels of the input maps, fine to coarse (e.g. C2..C5).
        out_channels: channels of every output level.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        if len(in_channels) == 0:
            raise ValueError("FPN needs at least one input level")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in self.in_channels)
        self.fpn_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.in_channels
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """Build the pyramid.

        Args:
            feats: ``[C2, C3, C4, C5]``; level i is (B, in_channels[i], H_i, W_i).

        Returns:
            ``[P2, P3, P4, P5]``; level i is (B, out_channels, H_i, W_i).
        """
        if len(feats) != len(self.lateral_convs):
            raise ValueError(
                f"FPN expects {len(self.lateral_convs)} feature maps, got {len(feats)}"
            )
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, feats, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            # (B, C, H_i, W_i) -> (B, C, H_{i-1}, W_{i-1}), added to the finer lateral
            up = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + up
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=True)]


def sine_positional_encoding(
    batch: int,
    height: int,
    width: int,
    num_feats: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    temperature: float = 10000.0,
) -> Tensor:
    """DETR-style normalized 2-D sine positional encoding for an all-valid mask.

    Row ``r`` (0-based) gets the coordinate ``(r + 1) / (height + 1e-6) * 2 * pi`` (columns
    likewise); each axis is encoded with ``num_feats`` channels
    ``[sin(c / t_0), cos(c / t_0), sin(c / t_1), cos(c / t_1), ...]`` where
    ``t_k = temperature ** (2 * k / num_feats)``.

    Returns:
        (B, 2 * num_feats, H, W): channels ``[0, num_feats)`` encode y, the rest encode x.
    """
    if num_feats < 2 or num_feats % 2:
        raise ValueError(f"num_feats must be a positive even number, got {num_feats}")
    eps = 1e-6
    scale = 2 * math.pi
    # computed in float32 and cast at the end so half-precision callers stay accurate
    y = torch.arange(1, height + 1, device=device, dtype=torch.float32)  # (H,)
    x = torch.arange(1, width + 1, device=device, dtype=torch.float32)  # (W,)
    y = y / (height + eps) * scale
    x = x / (width + eps) * scale
    idx = torch.arange(num_feats, device=device, dtype=torch.float32)  # (F,)
    dim_t = temperature ** (2 * torch.div(idx, 2, rounding_mode="floor") / num_feats)  # (F,)
    pos_y = y[:, None] / dim_t  # (H, F)
    pos_x = x[:, None] / dim_t  # (W, F)
    # interleave sin (even channels) and cos (odd channels): (H, F/2, 2) -> (H, F)
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    pos = torch.cat(
        (
            pos_y[:, None, :].expand(height, width, num_feats),  # (H, W, F)
            pos_x[None, :, :].expand(height, width, num_feats),  # (H, W, F)
        ),
        dim=2,
    )  # (H, W, 2F)
    pos = pos.permute(2, 0, 1).to(dtype)  # (2F, H, W)
    return pos.unsqueeze(0).expand(batch, -1, -1, -1).contiguous()  # (B, 2F, H, W)


def coord_features(x: Tensor) -> Tensor:
    """CoordConv's two channels for ``x`` (B, C, H, W): x then y, each linear in [-1, 1].

    Returns:
        (B, 2, H, W) in ``x``'s dtype and device.
    """
    b, _, h, w = x.shape
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)  # (W,)
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)  # (H,)
    grid = torch.stack((xs[None, :].expand(h, w), ys[:, None].expand(h, w)))  # (2, H, W)
    return grid[None].expand(b, -1, -1, -1)


class ConvGNReLU(nn.Sequential):
    """Conv (no bias) -> GroupNorm -> ReLU; submodules are named ``conv``, ``gn``, ``relu``.

    Padding is ``kernel_size // 2``, so the output is (B, out_channels, ceil(H / stride),
    ceil(W / stride)) for odd kernels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        num_groups: int = 32,
    ) -> None:
        if out_channels % num_groups:
            raise ValueError(
                f"out_channels={out_channels} is not divisible by num_groups={num_groups}"
            )
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(
                    in_channels,
                    out_channels,
                    kernel_size,
                    stride=stride,
                    padding=kernel_size // 2,
                    bias=False,
                ),
                gn=nn.GroupNorm(num_groups, out_channels),
                relu=nn.ReLU(inplace=True),
            )
        )


class SemanticFPNFuser(nn.Module):
    """Fuse P2..P5 into stride-8 features for K-Net's kernels (semantic-FPN style).

    Towers per level (every conv a 3x3 :class:`ConvGNReLU`, "up" = bilinear x2):

    - P2: conv with stride 2
    - P3: conv
    - P4: conv -> up -> conv
    - P5 (+ positional encoding): conv -> up -> conv -> up -> conv

    The tower outputs are summed and fed to two sibling 1x1 ConvGNReLU heads.

    Args:
        channels: channels of the inputs, of the towers and of both outputs.
        num_groups: GroupNorm groups.
        positional_encoding: what P5 gets before its tower, one of
            :data:`POSITIONAL_ENCODINGS`; ``"coordconv"`` widens the first P5 conv by 2 inputs.
    """

    def __init__(
        self, channels: int = 256, num_groups: int = 32, positional_encoding: str = "sine"
    ) -> None:
        super().__init__()
        if positional_encoding not in POSITIONAL_ENCODINGS:
            raise ValueError(
                f"positional_encoding must be one of {', '.join(POSITIONAL_ENCODINGS)}; "
                f"got {positional_encoding!r}"
            )
        if channels % 2 and positional_encoding == "sine":
            raise ValueError(f"channels must be even for the positional encoding, got {channels}")
        self.channels = channels
        self.num_groups = num_groups
        self.positional_encoding = positional_encoding
        coord = 2 if positional_encoding == "coordconv" else 0

        def conv3(stride: int = 1, extra: int = 0) -> ConvGNReLU:
            return ConvGNReLU(channels + extra, channels, 3, stride=stride, num_groups=num_groups)

        # towers[i][j]: j-th conv of level i; an upsample sits between consecutive convs
        self.towers = nn.ModuleList(
            [
                nn.ModuleList([conv3(stride=2)]),
                nn.ModuleList([conv3()]),
                nn.ModuleList([conv3(), conv3()]),
                nn.ModuleList([conv3(extra=coord), conv3(), conv3()]),
            ]
        )
        self.out_loc = ConvGNReLU(channels, channels, 1, num_groups=num_groups)
        self.out_sem = ConvGNReLU(channels, channels, 1, num_groups=num_groups)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Fuse the pyramid.

        Args:
            feats: ``[P2, P3, P4, P5]``, each (B, C, H / s, W / s) for s = 4, 8, 16, 32.

        Returns:
            ``(loc_features, sem_features)``, each (B, C, H / 8, W / 8) (the size of P3).
        """
        if len(feats) != len(self.towers):
            raise ValueError(f"SemanticFPNFuser expects 4 levels (P2..P5), got {len(feats)}")
        sizes = [tuple(f.shape[-2:]) for f in feats]
        target = sizes[1]  # stride-8 size of P3
        fused: Tensor | None = None
        for level, (x, convs) in enumerate(zip(feats, self.towers, strict=True)):
            if level == len(self.towers) - 1:
                x = self._encode_position(x)
            for j, conv in enumerate(convs):
                x = conv(x)
                if j < len(convs) - 1:
                    # (B, C, h, w) -> (B, C, 2h, 2w): sized like the next finer input level
                    x = F.interpolate(
                        x, size=sizes[level - j - 1], mode="bilinear", align_corners=False
                    )
            if tuple(x.shape[-2:]) != target:  # odd input sizes: snap onto the P3 grid
                x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
            fused = x if fused is None else fused + x  # (B, C, H/8, W/8)
        assert fused is not None
        return self.out_loc(fused), self.out_sem(fused)

    def _encode_position(self, p5: Tensor) -> Tensor:
        """P5 (B, C, h, w) with its positions: (B, C, h, w), or (B, C + 2, h, w) for CoordConv."""
        if self.positional_encoding == "sine":
            b, _, h, w = p5.shape
            pos = sine_positional_encoding(
                b, h, w, self.channels // 2, device=p5.device, dtype=p5.dtype
            )
            return p5 + pos
        if self.positional_encoding == "coordconv":
            return torch.cat((p5, coord_features(p5)), dim=1)
        return p5
