"""Kernel heads: the initial kernels (stage 0) and one kernel update round (spec §2.4, §3).

Letters used in shape comments, fixed for this module:
    B  images in the batch
    N  kernels (thing kernels, then stuff kernels for panoptic; one per class for semantic)
    C  feature / kernel channels
    K  classes
    H, W  height and width of the stride-8 feature map
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knet.model.neck import ConvGNReLU

# Bias that makes a fresh sigmoid classifier predict probability 0.01 (focal-loss prior).
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)


def assemble_group_features(
    masks: Tensor,
    features: Tensor,
    *,
    soft: bool,
    threshold: float = 0.5,
    normalize: bool = False,
) -> Tensor:
    """Group-feature assembling: pool the feature map inside every kernel's mask.

    Args:
        masks: (B, N, H, W) mask logits of the previous round (resized to ``features`` if needed).
        features: (B, C, H, W) feature map.
        soft: softmax over kernels as weights (semantic variant); otherwise hard sigmoid masks
            ``sigmoid > threshold`` with no gradient (instance / panoptic).
        normalize: divide by the mask area. The official code sums (False); the sum of up to
            H*W features overflows fp16, so the einsum always runs in fp32 either way.

    Returns:
        (B, N, C) group features, float32.
    """
    if masks.shape[-2:] != features.shape[-2:]:
        masks = F.interpolate(masks, size=features.shape[-2:], mode="bilinear", align_corners=False)
    with torch.autocast(device_type=features.device.type, enabled=False):
        if soft:
            weights = masks.float().softmax(dim=1)  # (B, N, H, W)
        else:
            weights = (masks.detach().float().sigmoid() > threshold).float()  # (B, N, H, W)
        group = torch.einsum("bnhw,bchw->bnc", weights, features.float())  # (B, N, C)
        if normalize:
            area = weights.sum(dim=(2, 3)).clamp(min=1.0)  # (B, N)
            group = group / area[..., None]
    return group


def predict_masks(kernels: Tensor, features: Tensor) -> Tensor:
    """1x1 dynamic convolution of every image's features with its own kernels, batched.

    Args:
        kernels: (B, N, C). features: (B, C, H, W).

    Returns:
        (B, N, H, W) mask logits.
    """
    return torch.einsum("bnc,bchw->bnhw", kernels, features.to(kernels.dtype))


class InitialKernelHead(nn.Module):
    """Stage 0 for instance / panoptic (the official ``ConvKernelHead``).

    Learned 1x1 kernels give the first thing masks M0; a sibling semantic classifier gives dense
    class logits whose stuff rows double as the panoptic stuff kernels.
    """

    def __init__(
        self,
        channels: int,
        num_kernels: int,
        num_classes: int,
        num_groups: int,
        kernel_init_std: float,
        hard_mask_threshold: float,
        normalize_group_features: bool,
    ) -> None:
        super().__init__()
        self.loc_conv = ConvGNReLU(channels, channels, 1, num_groups=num_groups)
        self.sem_conv = ConvGNReLU(channels, channels, 1, num_groups=num_groups)
        self.init_kernels = nn.Conv2d(channels, num_kernels, 1, bias=False)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.hard_mask_threshold = hard_mask_threshold
        self.normalize_group_features = normalize_group_features
        for conv in (self.loc_conv[0], self.sem_conv[0], self.conv_seg):
            nn.init.normal_(conv.weight, std=0.01)
        nn.init.normal_(self.init_kernels.weight, std=kernel_init_std)
        nn.init.constant_(self.conv_seg.bias, PRIOR_BIAS)

    def forward(self, loc: Tensor, sem: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Args: loc, sem (B, C, H, W) from the fuser.

        Returns:
            features X (B, C, H, W) shared by every update round, initial thing kernels
            (B, N, C), thing masks M0 (B, N, H, W), dense class logits (B, K, H, W).
        """
        loc = self.loc_conv(loc)
        sem = self.sem_conv(sem)
        masks = self.init_kernels(loc)  # (B, N, H, W)
        seg_logits = self.conv_seg(sem)  # (B, K, H, W)
        features = loc + sem
        pooled = assemble_group_features(
            masks,
            features,
            soft=False,
            threshold=self.hard_mask_threshold,
            normalize=self.normalize_group_features,
        )  # (B, N, C)
        weights = self.init_kernels.weight.flatten(1)  # (N, C, 1, 1) -> (N, C)
        kernels = weights[None] + pooled.to(weights.dtype)  # (B, N, C)
        return features, kernels, masks, seg_logits

    def stuff_kernels(self, num_thing_classes: int, batch: int) -> Tensor:
        """Panoptic stuff kernels: the semantic classifier's stuff rows, (B, S, C)."""
        weights = self.conv_seg.weight[num_thing_classes:].flatten(1)  # (S, C, 1, 1) -> (S, C)
        return weights[None].expand(batch, -1, -1)


class SemanticKernelHead(nn.Module):
    """Stage 0 for semantic segmentation: a per-class classifier whose weights are the kernels.

    The official semantic K-Net puts this on FCN / PSP / ASPP / UPerNet decode heads with 512
    channels; here the decode head is the same semantic FPN the other tasks use (C channels),
    which removes the 512-as-two-256 updator quirk (spec §9.16).
    """

    def __init__(self, channels: int, num_classes: int, num_groups: int, dropout: float) -> None:
        super().__init__()
        self.loc_conv = ConvGNReLU(channels, channels, 1, num_groups=num_groups)
        self.sem_conv = ConvGNReLU(channels, channels, 1, num_groups=num_groups)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        for conv in (self.loc_conv[0], self.sem_conv[0], self.conv_seg):
            nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, loc: Tensor, sem: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns features X (B, C, H, W), kernels (B, K, C) and class logits (B, K, H, W)."""
        features = self.loc_conv(loc) + self.sem_conv(sem)
        logits = self.conv_seg(self.dropout(features))  # (B, K, H, W)
        weights = self.conv_seg.weight.flatten(1)  # (K, C, 1, 1) -> (K, C)
        kernels = weights[None].expand(features.shape[0], -1, -1)  # (B, K, C)
        return features, kernels, logits


class KernelUpdator(nn.Module):
    """Adaptive kernel update (paper Eqs. 4-5, official ``KernelUpdator``), gated by F^G."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        self.dynamic_layer = nn.Linear(c, 2 * c)  # group features -> (phi_1, psi_3)
        self.input_layer = nn.Linear(c, 2 * c)  # old kernels -> (phi_2, psi_4)
        self.update_gate = nn.Linear(c, c)  # gate on the group features, G^F
        self.input_gate = nn.Linear(c, c)  # gate on the old kernels, G^K
        self.norm_in = nn.LayerNorm(c)
        self.input_norm_in = nn.LayerNorm(c)
        self.norm_out = nn.LayerNorm(c)
        self.input_norm_out = nn.LayerNorm(c)
        self.fc_layer = nn.Linear(c, c)
        self.fc_norm = nn.LayerNorm(c)

    def forward(self, group_features: Tensor, kernels: Tensor) -> Tensor:
        """Args: group features F^K (B, N, C), kernels K (B, N, C). Returns kernels (B, N, C)."""
        a_in, a_out = self.dynamic_layer(group_features).chunk(2, dim=-1)  # 2 x (B, N, C)
        b_in, b_out = self.input_layer(kernels).chunk(2, dim=-1)  # 2 x (B, N, C)
        gate_features = a_in * b_in  # F^G
        update_gate = self.norm_in(self.update_gate(gate_features)).sigmoid()
        input_gate = self.input_norm_in(self.input_gate(gate_features)).sigmoid()
        mixed = update_gate * self.norm_out(a_out) + input_gate * self.input_norm_out(b_out)
        return F.relu(self.fc_norm(self.fc_layer(mixed)))


def _fc_ln_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU(inplace=True)
    )


# Table 4a switches (``model.kernel_updater``): the official gated update, a plain sum of the
# group feature and the kernel, or no update (the kernels pass through the round unchanged).
KERNEL_UPDATERS = ("adaptive", "sum", "none")


class KernelUpdateHead(nn.Module):
    """One kernel update round: assemble, update, interact, then classify and predict masks."""

    def __init__(  # 9 parameters: the official KernelUpdateHead's hyper-parameters, one each
        self,
        channels: int,
        num_classes: int,
        num_heads: int,
        ffn_channels: int,
        soft_assembling: bool,
        hard_mask_threshold: float,
        normalize_group_features: bool,
        updater: str = "adaptive",
        interaction: bool = True,
    ) -> None:
        """``num_classes=0`` builds no classification branch (semantic: kernel k is class k).

        ``updater`` and ``interaction`` are the ablation switches of the paper's Table 4a; the
        official head is ``"adaptive"`` with interaction. A switched-off part has no parameters.
        """
        super().__init__()
        if updater not in KERNEL_UPDATERS:
            raise ValueError(
                f"updater must be one of {', '.join(KERNEL_UPDATERS)}; got {updater!r}"
            )
        c = channels
        self.soft_assembling = soft_assembling
        self.hard_mask_threshold = hard_mask_threshold
        self.normalize_group_features = normalize_group_features
        self.updater = updater
        self.feat_transform = nn.Conv2d(c, c, 1)
        self.updator = KernelUpdator(c) if updater == "adaptive" else None
        self.attention: nn.MultiheadAttention | None = None
        self.attention_norm: nn.LayerNorm | None = None
        self.ffn: nn.Sequential | None = None
        self.ffn_norm: nn.LayerNorm | None = None
        if interaction:
            self.attention = nn.MultiheadAttention(c, num_heads, dropout=0.0, batch_first=True)
            self.attention_norm = nn.LayerNorm(c)
            self.ffn = nn.Sequential(
                nn.Linear(c, ffn_channels), nn.ReLU(inplace=True), nn.Linear(ffn_channels, c)
            )
            self.ffn_norm = nn.LayerNorm(c)
        self.cls_fc = _fc_ln_relu(c) if num_classes else None
        self.cls_logits = nn.Linear(c, num_classes) if num_classes else None
        self.mask_fc = _fc_ln_relu(c)
        self.mask_kernels = nn.Linear(c, c)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # The official feature transform is an mmcv ConvModule, whose bias starts at zero.
        nn.init.zeros_(self.feat_transform.bias)
        if self.cls_logits is not None:
            nn.init.constant_(self.cls_logits.bias, PRIOR_BIAS)

    def forward(
        self, features: Tensor, kernels: Tensor, masks: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Args:
            features: X (B, C, H, W), the shared stride-8 map.
            kernels: K_{i-1} (B, N, C).
            masks: M_{i-1} (B, N, H, W) logits of the previous round.

        Returns:
            kernels K_i (B, N, C) for the next round, masks M_i (B, N, H, W) and class logits
            (B, N, K), or None without a classification branch.
        """
        features = self.feat_transform(features)  # X'
        if self.updater != "none":
            group = assemble_group_features(
                masks,
                features,
                soft=self.soft_assembling,
                threshold=self.hard_mask_threshold,
                normalize=self.normalize_group_features,
            ).to(kernels.dtype)  # (B, N, C)
            kernels = kernels + group if self.updator is None else self.updator(group, kernels)
        kernels = self.interact_kernels(kernels)
        cls_logits = None
        if self.cls_logits is not None:
            cls_logits = self.cls_logits(self.cls_fc(kernels))  # (B, N, K)
        mask_kernels = self.mask_kernels(self.mask_fc(kernels))  # (B, N, C)
        return kernels, predict_masks(mask_kernels, features), cls_logits

    def interact_kernels(self, kernels: Tensor) -> Tensor:
        """Kernel interaction: post-norm MHSA then post-norm FFN over an image's kernels (the
        identity when ``interaction`` is off)."""
        if self.attention is None:
            return kernels
        assert self.attention_norm is not None and self.ffn is not None
        assert self.ffn_norm is not None
        attended, _ = self.attention(kernels, kernels, kernels, need_weights=False)
        kernels = self.attention_norm(kernels + attended)
        return self.ffn_norm(kernels + self.ffn(kernels))
