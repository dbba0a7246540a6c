"""The K-Net model: backbone -> FPN -> fused stride-8 map -> initial kernels -> update rounds.

Letters used in shape comments, fixed for this module:
    B  images, N  kernels, C  channels, K  classes
    H, W  height and width of the padded input images; h, w = H / 8, W / 8
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from knet.model.backbone import ResNet
from knet.model.heads import InitialKernelHead, KernelUpdateHead, SemanticKernelHead
from knet.model.neck import FPN, SemanticFPNFuser


@dataclass
class StageOutput:
    """Predictions of one round. Stage 0 has no class logits."""

    mask_logits: Tensor  # (B, N, h, w), stride 8
    cls_logits: Tensor | None  # (B, N, K) sigmoid logits, or None


@dataclass
class KNetOutput:
    """What :class:`KNet` returns, in training and in evaluation alike.

    ``stages[0]`` is the initial round (thing kernels only for instance / panoptic; the class
    logits of the dense classifier for semantic); ``stages[1:]`` are the update rounds, whose
    kernels are the thing kernels followed by the stuff kernels for panoptic.
    """

    stages: list[StageOutput]
    # Stage-0 dense class logits (B, K, h, w) of the semantic branch; None for semantic models,
    # whose stage-0 masks already are class logits.
    semantic_logits: Tensor | None

    @property
    def last(self) -> StageOutput:
        return self.stages[-1]


class KNet(nn.Module):
    """K-Net for one task; build it with :func:`knet.model.build_model`."""

    def __init__(  # 8 parameters: the model's parts, as build_model makes them
        self,
        backbone: ResNet,
        fpn: FPN,
        fuser: SemanticFPNFuser,
        kernel_head: InitialKernelHead | SemanticKernelHead,
        update_heads: list[KernelUpdateHead],
        num_thing_classes: int,
        num_stuff_classes: int,
        panoptic: bool,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.fpn = fpn
        self.fuser = fuser
        self.kernel_head = kernel_head
        self.update_heads = nn.ModuleList(update_heads)
        self.num_thing_classes = num_thing_classes
        self.num_stuff_classes = num_stuff_classes
        self.panoptic = panoptic

    @property
    def semantic(self) -> bool:
        return isinstance(self.kernel_head, SemanticKernelHead)

    def forward(self, images: Tensor) -> KNetOutput:
        """Args: images (B, 3, H, W), normalised, H and W multiples of 32.

        Returns:
            :class:`KNetOutput` with stride-8 logits for every round.
        """
        loc, sem = self.fuser(self.fpn(self.backbone(images)))  # 2 x (B, C, h, w)
        if self.semantic:
            features, kernels, masks = self.kernel_head(loc, sem)
            stages = [StageOutput(masks, None)]
            semantic_logits = None
        else:
            features, kernels, masks, semantic_logits = self.kernel_head(loc, sem)
            stages = [StageOutput(masks, None)]
            if self.panoptic and self.num_stuff_classes:
                stuff = self.kernel_head.stuff_kernels(self.num_thing_classes, images.shape[0])
                kernels = torch.cat([kernels, stuff.to(kernels.dtype)], dim=1)  # (B, N + S, C)
                stuff_masks = semantic_logits[:, self.num_thing_classes :]  # (B, S, h, w)
                masks = torch.cat([masks, stuff_masks.to(masks.dtype)], dim=1)  # (B, N + S, h, w)
        for head in self.update_heads:
            kernels, masks, cls_logits = head(features, kernels, masks)
            stages.append(StageOutput(masks, cls_logits))
        return KNetOutput(stages=stages, semantic_logits=semantic_logits)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component (every parameter, trainable or frozen), plus ``total``."""
        parts = {
            "backbone": self.backbone,
            "fpn": self.fpn,
            "fuser": self.fuser,
            "kernel_head": self.kernel_head,
            **{f"update_head.{i}": head for i, head in enumerate(self.update_heads)},
        }
        counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split into ``backbone`` and ``head`` (for the lr multiplier)."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        ids = {id(p) for p in self.backbone.parameters()}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return {"backbone": backbone, "head": head}
