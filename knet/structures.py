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
    # A CPU copy of ``labels``, kept by :meth:`to`, so the criterion can plan its indexing on
    # the host without reading the device (a GPU step syncs only in the matcher).
    labels_host: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Targets:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Targets(
            move(self.masks),
            move(self.labels),
            move(self.semantic),
            move(self.is_thing),
            self.host_labels() if self.labels.device.type == "cpu" else self.labels_host,
        )

    def pin_memory(self) -> Targets:
        """Page-locked copies (the DataLoader's ``pin_memory=True`` calls this), so the copy
        to the GPU can be asynchronous."""

        def pin(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.pin_memory()

        return Targets(
            pin(self.masks),
            pin(self.labels),
            pin(self.semantic),
            pin(self.is_thing),
            self.host_labels(),
        )

    def host_labels(self) -> Tensor:
        """``labels`` on the CPU: the kept copy, or a device read for targets built there."""
        if self.labels_host is not None:
            return self.labels_host
        return self.labels.cpu()


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
