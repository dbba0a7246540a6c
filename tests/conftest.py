"""Shared fixtures: a tiny model config and a small synthetic batch with real masks."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from knet.config import Config, load_config
from knet.structures import Targets, downsample_masks

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

ROOT = Path(__file__).resolve().parents[1]

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


@pytest.fixture(autouse=True)
def _restore_knet_logger():
    """``knet.cli.main`` gives the ``knet`` logger a handler on the stdout of the moment (a
    test's captured stream, closed after it), as the command line needs; every test that runs
    ``main`` in-process gets the logger back as it was, so no later test logs to a closed
    stream."""
    logger = logging.getLogger("knet")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def venv_env(**extra: str) -> dict[str, str]:
    """This environment with the venv's bin first on PATH (knet, ray, dvc, mlflow, prefect)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


# The ablation sweep's own pipeline (a plain `dvc repro` / `dvc exp run` does not start it).
ABLATION_DVC_YAML = "pipelines/ablation/dvc.yaml"


def make_dvc_repo(tmp: Path, **synth: int) -> Path:
    """A git + DVC repository at ``tmp/repo`` with the project's pipeline and code, and the
    synthetic dataset's params changed to ``synth`` (image_size, train_images, ...)."""
    repo = tmp / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ABLATION_DVC_YAML):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "knet", repo / "knet", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["synth"].update(synth)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=venv_env(), check=True)
    return repo
