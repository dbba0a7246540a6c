"""Training and test transforms (spec §4.4, §5.2): resize, flip, crop, normalise, pad.

Letters: G segments, H, W image height and width. Ground-truth masks leave the transform as
soft stride-4 masks of the image padded to ``size_divisor``, so a worker never holds more than
one image's full-resolution masks (the official code's users hit host-RAM OOM here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from knet.config import DataConfig
from knet.structures import IGNORE_LABEL, downsample_masks

# ImageNet statistics on the 0-255 scale, RGB (torchvision / mmdet).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
MASK_STRIDE = 4


@dataclass
class TransformedSample:
    image: Tensor  # (3, Hp, Wp) float, normalised, zero-padded to size_divisor
    masks: Tensor  # (G, Hp / 4, Wp / 4) float soft masks
    semantic: Tensor | None  # (Hp, Wp) int64, IGNORE_LABEL in the padding
    image_size: tuple[int, int]  # (h, w) after resizing, before padding


def scaled_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """Size with the shorter side ``short`` and the longer side at most ``max_size``."""
    scale = min(short / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


class Transform:
    """Callable on (image uint8 (H, W, 3), masks bool (G, H, W), semantic (H, W) or None).

    Training: a shorter side drawn from ``data.min_size`` (one value, or a [low, high] range),
    horizontal flip with ``data.flip_prob``, optional random crop to ``data.crop_size``.
    Test: shorter side ``data.test_size``. Both keep the aspect ratio under ``data.max_size``.
    Randomness comes from ``torch``'s generator, which DataLoader seeds per worker.
    """

    def __init__(self, cfg: DataConfig, train: bool) -> None:
        self.cfg = cfg
        self.train = train
        self.mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
        self.std = torch.tensor(PIXEL_STD).view(3, 1, 1)

    def __call__(self, image: Tensor, masks: Tensor, semantic: Tensor | None) -> TransformedSample:
        height, width = image.shape[:2]
        size = scaled_size(height, width, self._short_side(), self.cfg.max_size)
        img = image.permute(2, 0, 1)[None].float()  # (H, W, 3) -> (1, 3, H, W)
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)[0]
        masks = _resize_nearest(masks, size)  # (G, h, w) bool
        if semantic is not None:
            semantic = _resize_nearest(semantic[None], size)[0]
        if self.train and torch.rand(()) < self.cfg.flip_prob:
            img, masks = img.flip(-1), masks.flip(-1)
            semantic = None if semantic is None else semantic.flip(-1)
        if self.train and self.cfg.crop_size:
            img, masks, semantic = self._crop(img, masks, semantic)
        img = (img - self.mean) / self.std
        image_size = (img.shape[-2], img.shape[-1])
        padded = _round_up(image_size, self.cfg.size_divisor)
        pad = (0, padded[1] - image_size[1], 0, padded[0] - image_size[0])
        img = F.pad(img, pad)
        soft = downsample_masks(masks, padded, MASK_STRIDE)
        if semantic is not None:
            semantic = F.pad(semantic, pad, value=IGNORE_LABEL)
        return TransformedSample(img, soft, semantic, image_size)

    def _short_side(self) -> int:
        sizes = self.cfg.min_size
        if not self.train:
            return self.cfg.test_size
        if len(sizes) == 1:
            return sizes[0]
        low, high = min(sizes), max(sizes)
        return int(torch.randint(low, high + 1, ()))

    def _crop(
        self, img: Tensor, masks: Tensor, semantic: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        crop_h, crop_w = self.cfg.crop_size
        height, width = img.shape[-2:]
        top = int(torch.randint(0, max(height - crop_h, 0) + 1, ()))
        left = int(torch.randint(0, max(width - crop_w, 0) + 1, ()))
        window = (slice(top, top + crop_h), slice(left, left + crop_w))
        img = img[:, window[0], window[1]]
        masks = masks[:, window[0], window[1]]
        if semantic is not None:
            semantic = semantic[window]
        return img, masks, semantic


def _resize_nearest(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(G, H, W) integer or bool maps -> (G, h, w), nearest neighbour."""
    if maps.shape[0] == 0:
        return maps.new_zeros((0, *size))
    dtype = maps.dtype
    resized = F.interpolate(
        maps[None].to(torch.uint8 if dtype == torch.bool else torch.float32),
        size=size,
        mode="nearest",
    )[0]
    return resized.to(dtype)


def _round_up(size: tuple[int, int], divisor: int) -> tuple[int, int]:
    return (math.ceil(size[0] / divisor) * divisor, math.ceil(size[1] / divisor) * divisor)
