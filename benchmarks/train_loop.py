"""Training throughput: the plain engine loop vs Ray Train with 1 and 2 workers, same config.

``python -m benchmarks.train_loop``: the tiny default (``params.yaml``) on the default synthetic
data (run ``dvc repro prepare`` first), 4 epochs each, validation and tracking off. Images/s is
the median of the per-epoch numbers after the first epoch (start-up excluded); wall time is
the ``knet train`` child process's, start-up included (:func:`benchmarks.systems.train_speed`).
Also times ``save_checkpoint`` and reports the checkpoint's size.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.systems import train_speed


def run(workers: int, folder: Path) -> dict:
    """``knet train`` here, with the run's outputs in ``folder`` (both cores shared)."""
    return {"workers": workers, **train_speed(Path.cwd(), workers, 4, folder, cpus=2)}


def checkpoint_cost(folder: Path) -> dict:
    import torch

    from knet.config import load_config
    from knet.data.dataset import build_dataset
    from knet.method.checkpoint import save_checkpoint
    from knet.method.optim import build_optimizer
    from knet.model import build_model

    cfg = load_config("params.yaml")
    cats = build_dataset(cfg.data, cfg.data.train_split, cfg.model.task, train=False).categories
    model = build_model(cfg.model, cats.num_things, cats.num_stuff)
    optimizer = build_optimizer(model, cfg.optim)
    model(torch.randn(1, 3, 128, 128)).last.mask_logits.sum().backward()
    optimizer.step()  # AdamW state exists, as in a training checkpoint
    path = folder / "ckpt.pt"
    times = []
    for _ in range(5):
        start = time.perf_counter()
        save_checkpoint(path, model, cfg, cats, optimizer=optimizer.state_dict(), epoch=1)
        times.append(time.perf_counter() - start)
    return {
        "checkpoint_mib": round(path.stat().st_size / 2**20, 2),
        "save_s_median": round(statistics.median(times), 4),
    }


def main() -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for workers in (0, 1, 2):
            rows.append(run(workers, folder))
        cost = checkpoint_cost(folder)
    plain = rows[0]["images_per_s"]
    print(f"cpu cores {os.cpu_count()}")
    print(
        "| loop | train images/s, all workers (median of epochs 2-4) | ratio to plain | "
        "wall s (4 epochs) |"
    )
    print("|---|---:|---:|---:|")
    for r in rows:
        name = "plain engine loop" if r["workers"] == 0 else f"Ray Train, {r['workers']} worker(s)"
        print(
            f"| {name} | {r['images_per_s']:.1f} | {r['images_per_s'] / plain:.2f} | "
            f"{r['wall_s']:.1f} |"
        )
    print(
        f"checkpoint (weights + AdamW state + config): {cost['checkpoint_mib']} MiB, "
        f"save {cost['save_s_median'] * 1000:.0f} ms (median of 5)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
