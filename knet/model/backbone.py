"""ResNet backbone with torchvision-compatible parameter names.

The module tree mirrors torchvision's ``resnet{18,34,50,101}`` ("pytorch style": in a
Bottleneck the stride sits on the 3x3 conv) minus the classifier, so an ImageNet
``state_dict`` saved by torchvision loads without renaming (``fc.*`` keys are dropped).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "build_backbone", "RESNET_SPECS"]


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or projected) shortcut; used by ResNet-18/34."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _make_downsample(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 bottleneck block; used by ResNet-50/101."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _make_downsample(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _make_downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """1x1 strided projection + BN (names ``downsample.0`` / ``downsample.1``), or None."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


# depth -> (block type, number of blocks per stage)
RESNET_SPECS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """ResNet-18/34/50/101 feature extractor returning C2..C5.

    Args:
        depth: one of 18, 34, 50, 101.
        base_channels: width of the stem and of stage 1 (64 = torchvision); every stage
            width scales with it, so small values give a tiny model for CPU tests.
        frozen_stages: mmdet semantics: ``-1`` freezes nothing, ``0`` the stem, ``k >= 1`` the
            stem and ``layer1`` .. ``layer{k}`` (no gradients, kept in eval mode).
        norm_eval: keep every BatchNorm in eval mode (running statistics frozen) even in
            ``train()``; BN affine parameters of non-frozen stages remain trainable.
    """

    def __init__(
        self,
        depth: int,
        base_channels: int = 64,
        frozen_stages: int = 1,
        norm_eval: bool = True,
    ) -> None:
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(
                f"unsupported ResNet depth {depth!r}; expected one of {sorted(RESNET_SPECS)}"
            )
        if base_channels < 1:
            raise ValueError(f"base_channels must be positive, got {base_channels!r}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in [-1, 4], got {frozen_stages!r}")
        block, num_blocks = RESNET_SPECS[depth]
        self.depth = depth
        self.base_channels = base_channels
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        self.conv1 = nn.Conv2d(3, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_channels = base_channels
        out_channels: list[int] = []
        for stage, n in enumerate(num_blocks):
            width = base_channels * 2**stage
            stride = 1 if stage == 0 else 2
            blocks: list[nn.Module] = []
            for i in range(n):
                blocks.append(block(in_channels, width, stride if i == 0 else 1))
                in_channels = width * block.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            out_channels.append(in_channels)
        self.out_channels: tuple[int, int, int, int] = (
            out_channels[0],
            out_channels[1],
            out_channels[2],
            out_channels[3],
        )

        self._init_weights()
        self.train(self.training)  # apply frozen stages and norm_eval right away

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules: list[nn.Module] = [self.conv1, self.bn1]
        modules += [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        return modules

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNet:
        """Set train/eval mode, then re-apply the frozen stages and ``norm_eval``."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        """Extract the C2..C5 feature maps.

        Args:
            images: (B, 3, H, W) normalized images.

        Returns:
            ``[C2, C3, C4, C5]`` with shapes (B, out_channels[i], H / s, W / s) for
            s = 4, 8, 16, 32 (sizes rounded up for inputs not divisible by 32).
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # (B, base, H/4, W/4)
        c2 = self.layer1(x)  # (B, out_channels[0], H/4, W/4)
        c3 = self.layer2(c2)  # (B, out_channels[1], H/8, W/8)
        c4 = self.layer3(c3)  # (B, out_channels[2], H/16, W/16)
        c5 = self.layer4(c4)  # (B, out_channels[3], H/32, W/32)
        return [c2, c3, c4, c5]

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Load a torchvision ImageNet checkpoint (``fc.*`` keys are ignored).

        Accepts a plain state dict or a dict holding one under ``"state_dict"``.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: keys are missing/unexpected or a tensor has the wrong shape.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"backbone checkpoint not found: {path}")
        what = f"torchvision ResNet-{self.depth} checkpoint"
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ValueError(f"{path} does not look like a {what}: not a state dict")
        state = {k: v for k, v in obj.items() if not (isinstance(k, str) and k.startswith("fc."))}

        own = self.state_dict()
        # checkpoints written before PyTorch 0.4.1 (e.g. the original torchvision ImageNet
        # weights) have no BN ``num_batches_tracked`` buffers; keep the model's own values
        for k, v in own.items():
            if k.endswith(".num_batches_tracked") and k not in state:
                state[k] = v.clone()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        mismatched = [
            f"{k} (expected {tuple(own[k].shape)}, got {tuple(state[k].shape)})"
            for k in own
            if k in state and (not isinstance(state[k], Tensor) or state[k].shape != own[k].shape)
        ]
        problems = []
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if keys:
                shown = ", ".join(str(k) for k in keys[:5])
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                problems.append(f"{label} {shown}{more}")
        if problems:
            raise ValueError(f"{path} does not look like a {what}: " + "; ".join(problems))
        self.load_state_dict(state, strict=True)


def build_backbone(
    depth: int,
    weights: str | os.PathLike | None = None,
    base_channels: int = 64,
    frozen_stages: int = 1,
    norm_eval: bool = True,
) -> ResNet:
    """Build a :class:`ResNet` and optionally load torchvision ImageNet weights."""
    if weights is not None and base_channels != 64:
        raise ValueError(
            f"pretrained weights require base_channels=64, got base_channels={base_channels}"
        )
    model = ResNet(depth, base_channels, frozen_stages, norm_eval)
    if weights is not None:
        model.load_pretrained(weights)
    return model
