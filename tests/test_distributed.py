"""Loss normalisation across data-parallel workers, on a real two-process gloo group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from knet.method.losses import KNetCriterion
from knet.model import build_model
from tests.conftest import NUM_STUFF, NUM_THINGS, free_port, synthetic_batch, tiny_config


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        cfg = tiny_config("instance")
        model = build_model(cfg.model, NUM_THINGS, NUM_STUFF)
        criterion = KNetCriterion(cfg.loss, "instance", NUM_THINGS, NUM_STUFF)
        # Rank 0 sees two images, rank 1 one image with no objects: different #positives.
        images, targets = synthetic_batch("instance", batch=2 if rank == 0 else 1, seed=rank)
        if rank == 1:
            targets[0].masks = targets[0].masks[:0]
            targets[0].labels = targets[0].labels[:0]
        losses = criterion(model(images), targets)
        results[rank] = {k: float(v.detach()) for k, v in losses.items()}
    finally:
        dist.destroy_process_group()


def test_focal_loss_is_normalised_by_the_mean_number_of_positives_over_workers():
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(free_port(), results), nprocs=2, start_method="spawn")
    distributed = dict(results)

    # The same computation on one process: rank 0 alone normalises by its own count.
    torch.manual_seed(0)
    cfg = tiny_config("instance")
    model = build_model(cfg.model, NUM_THINGS, NUM_STUFF)
    criterion = KNetCriterion(cfg.loss, "instance", NUM_THINGS, NUM_STUFF)
    images, targets = synthetic_batch("instance", batch=2, seed=0)
    alone = {k: float(v.detach()) for k, v in criterion(model(images), targets).items()}
    local_pos = sum(min(8, len(t.labels)) for t in targets)
    mean_pos = local_pos / 2  # rank 1 has no positives
    ratio = local_pos / mean_pos
    for key in ("s1.cls", "s2.cls"):
        assert abs(distributed[0][key] - alone[key] * ratio) < 1e-4 * max(1.0, alone[key])
    # Mask and dice terms are local means and do not depend on other workers.
    assert abs(distributed[0]["s1.dice"] - alone["s1.dice"]) < 1e-5
