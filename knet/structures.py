"""Typed ground truth shared by the datasets, the criterion and the metrics.

Letters: G ground-truth segments of one image, H, W the padded input size, h, w = H / 4, W / 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_LABEL = 255


@dataclass
class Targets:
    """Ground truth of one image, as the criterion consumes it.

    Training ids are contiguous with things first: ``labels < num_thing_classes`` are things,
    the rest stuff. Instance / panoptic losses read ``masks`` and ``labels``; semantic losses read
    ``semantic``.
    """

    masks: Tensor  # (G, h, w) float in [0, 1]: soft masks at stride 4 of the padded input
    labels: Tensor  # (G,) int64 training ids
    semantic: Tensor | None = None  # (H, W) int64 class ids, IGNORE_LABEL where unlabelled
    is_thing: Tensor | None = None  # (G,) bool, the dataset's isthing flag of each segment

    def to(self, device: torch.device | str) -> Targets:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return Targets(
            self.masks.to(device), self.labels.to(device), move(self.semantic), move(self.is_thing)
        )


def downsample_masks(masks: Tensor, padded_size: tuple[int, int], stride: int = 4) -> Tensor:
    """Full-resolution binary masks -> soft masks at ``stride`` of the padded input (spec §4.1).

    Args:
        masks: (G, H0, W0) binary masks of the resized image (H0 <= H, W0 <= W).
        padded_size: (H, W) of the padded batch, multiples of ``stride``.

    Returns:
        (G, H / stride, W / stride) float masks: zero-padded, then bilinearly resized.
    """
    height, width = padded_size
    if masks.shape[0] == 0:
        return masks.new_zeros((0, height // stride, width // stride), dtype=torch.float32)
    padded = F.pad(masks.float(), (0, width - masks.shape[-1], 0, height - masks.shape[-2]))
    small = F.interpolate(
        padded[None], size=(height // stride, width // stride), mode="bilinear", align_corners=False
    )  # (1, G, H/stride, W/stride)
    return small[0]
