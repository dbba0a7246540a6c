"""Shared fixtures: a tiny model config and a small synthetic batch with real masks."""

from __future__ import annotations

import os

import pytest
import torch

from knet.config import Config, load_config
from knet.structures import Targets, downsample_masks

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

NUM_THINGS = 3
NUM_STUFF = 2
TINY_OVERRIDES = [
    "model.backbone.depth=18",
    "model.backbone.base_channels=16",
    "model.backbone.frozen_stages=-1",
    "model.backbone.norm_eval=false",
    "model.channels=32",
    "model.num_groups=8",
    "model.num_kernels=8",
    "model.num_stages=2",
    "model.num_heads=4",
    "model.ffn_channels=64",
]


def tiny_config(task: str = "panoptic", *extra: str) -> Config:
    """Tiny model (few channels, 2 rounds, 8 kernels) for shape and training tests."""
    return load_config(None, [*TINY_OVERRIDES, f"model.task={task}", *extra])


def synthetic_batch(
    task: str, batch: int = 2, size: int = 64, seed: int = 0
) -> tuple[torch.Tensor, list[Targets]]:
    """Images with coloured rectangles (things) over two textured stuff halves.

    Returns images (B, 3, size, size) and one Targets per image with stride-4 masks, thing ids
    0..NUM_THINGS-1, stuff ids NUM_THINGS.. (panoptic), and the semantic map.
    """
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    palette = torch.tensor(
        [
            [1.0, -1.0, -1.0],
            [-1.0, 1.0, -1.0],
            [-1.0, -1.0, 1.0],
            [0.5, 0.5, -0.5],
            [-0.5, 0.5, 0.5],
        ]
    )
    for _ in range(batch):
        image = 0.1 * torch.randn(3, size, size, generator=gen)
        semantic = torch.empty(size, size, dtype=torch.int64)
        half = size // 2
        semantic[:half] = NUM_THINGS
        semantic[half:] = NUM_THINGS + 1
        masks, labels = [], []
        for _ in range(3):
            label = int(torch.randint(0, NUM_THINGS, (1,), generator=gen))
            h, w = (int(v) for v in torch.randint(size // 6, size // 3, (2,), generator=gen))
            y, x = (int(v) for v in torch.randint(0, size - max(h, w), (2,), generator=gen))
            mask = torch.zeros(size, size, dtype=torch.bool)
            mask[y : y + h, x : x + w] = True
            masks = [m & ~mask for m in masks]
            masks.append(mask)
            labels.append(label)
            semantic[mask] = label
        for s in range(NUM_STUFF):
            stuff = semantic == NUM_THINGS + s
            if task != "instance" and stuff.any():
                masks.append(stuff)
                labels.append(NUM_THINGS + s)
        keep = [i for i, m in enumerate(masks) if m.any()]
        full = torch.stack([masks[i] for i in keep])  # (G, size, size)
        lab = torch.tensor([labels[i] for i in keep])
        for m, label in zip(full, lab, strict=True):
            image[:, m] += palette[label][:, None]
        images.append(image)
        targets.append(Targets(downsample_masks(full, (size, size)), lab, semantic))
    return torch.stack(images), targets


@pytest.fixture
def tiny():
    return tiny_config


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA exists; elsewhere they are skipped, never faked."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
