"""Framework-free training and inference loops (plain PyTorch).

The plain loop, the Ray Train loop and the evaluation command share every line of the step:
:func:`train_step` -> :func:`train_one_epoch`, and :func:`predict_batch` -> :func:`run_inference`.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from knet.config import OptimConfig, PostprocessConfig
from knet.data.dataset import Batch
from knet.losses import KNetCriterion
from knet.model import KNetOutput
from knet.optim import clip_gradients
from knet.postprocess import postprocess


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled; a no-op on CPU (spec: AMP off on CPU)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class NonFiniteLossError(RuntimeError):
    """Too many steps with a NaN/inf loss (``train.max_bad_steps``)."""


def train_step(
    model: nn.Module,
    criterion: KNetCriterion,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    optim_cfg: OptimConfig,
    amp: bool = True,
) -> dict[str, torch.Tensor] | None:
    """One optimisation step; the detached loss terms and ``loss``, or None when skipped.

    A step whose loss is NaN/inf updates nothing (one host sync; the matcher syncs anyway).
    """
    device = batch.images.device
    with autocast(device, amp):
        outputs = model(batch.images)
    losses = criterion(outputs, batch.targets)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    if not bool(torch.isfinite(loss)):
        return None
    loss.backward()
    clip_gradients(model, optim_cfg)
    optimizer.step()
    return {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}


def train_one_epoch(
    model: nn.Module,
    criterion: KNetCriterion,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    optim_cfg: OptimConfig,
    device: torch.device,
    amp: bool = True,
    progress: bool = False,
    max_bad_steps: int | None = None,
    bad_steps: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader``: mean loss terms, images, images/s and ``bad_steps``.

    ``bad_steps`` counts NaN/inf steps so far (over the run); past ``max_bad_steps`` the epoch
    stops with :class:`NonFiniteLossError`. ``on_step(step)`` is called before each step.
    """
    model.train()
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    steps = images = 0
    start = time.perf_counter()
    for step, batch in enumerate(
        tqdm(loader, desc="train", unit="batch", disable=not progress, leave=False, mininterval=2.0)
    ):
        if on_step is not None:
            on_step(step)
        batch = batch.to(device, non_blocking=True)
        losses = train_step(model, criterion, batch, optimizer, optim_cfg, amp)
        if losses is None:
            bad_steps += 1
            if max_bad_steps is not None and bad_steps > max_bad_steps:
                raise NonFiniteLossError(
                    f"{bad_steps} steps had a NaN/inf loss (train.max_bad_steps="
                    f"{max_bad_steps}); stopping. The last good checkpoint is kept."
                )
            continue
        for name, value in losses.items():
            sums[name] += value
        if scheduler is not None:
            scheduler.step()
        steps += 1
        images += len(batch)
    seconds = time.perf_counter() - start
    means = {name: float(total) / max(steps, 1) for name, total in sums.items()}  # one sync
    return {
        **means,
        "images": images,
        "bad_steps": bad_steps,
        "images_per_s": images / seconds if seconds else 0.0,
    }


@dataclass
class Prediction:
    """One image's results for every task the model answers, and the step timings."""

    image_id: int
    index: int  # position in the dataset
    results: dict[str, object]  # task -> InstanceResult | PanopticResult | Tensor


@torch.no_grad()
def predict_batch(
    model: nn.Module,
    batch: Batch,
    tasks: Iterable[str],
    num_thing_classes: int,
    num_stuff_classes: int,
    cfg: PostprocessConfig,
    amp: bool = True,
) -> tuple[KNetOutput, list[dict[str, object]], dict[str, float]]:
    """Forward + post-processing of one batch for each of ``tasks``.

    Returns the raw outputs, per image a dict task -> result, and the seconds spent in the
    forward pass and in post-processing (synchronised on CUDA so the split is honest).
    """
    device = batch.images.device
    start = time.perf_counter()
    with autocast(device, amp):
        outputs = model(batch.images)
    _sync(device)
    forward = time.perf_counter()
    per_image: list[dict[str, object]] = [{} for _ in range(len(batch))]
    for task in tasks:
        results = postprocess(
            outputs,
            task,
            num_thing_classes,
            num_stuff_classes,
            batch.image_sizes,
            batch.output_sizes,
            cfg,
        )
        for store, result in zip(per_image, results, strict=True):
            store[task] = result
    _sync(device)
    done = time.perf_counter()
    return outputs, per_image, {"forward_s": forward - start, "postprocess_s": done - forward}


def run_inference(
    model: nn.Module,
    loader: Iterable[Batch],
    tasks: Iterable[str],
    num_thing_classes: int,
    num_stuff_classes: int,
    cfg: PostprocessConfig,
    device: torch.device,
    amp: bool = True,
    progress: bool = False,
    on_outputs: Callable[[Batch, KNetOutput], None] | None = None,
    timings: dict[str, float] | None = None,
) -> Iterator[Prediction]:
    """Yield a :class:`Prediction` per image; ``timings`` accumulates forward/post seconds."""
    model.eval()
    tasks = tuple(tasks)
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress, leave=False):
        batch = batch.to(device, non_blocking=True)
        outputs, per_image, seconds = predict_batch(
            model, batch, tasks, num_thing_classes, num_stuff_classes, cfg, amp
        )
        if timings is not None:
            for key, value in seconds.items():
                timings[key] = timings.get(key, 0.0) + value
            timings["images"] = timings.get("images", 0) + len(batch)
        if on_outputs is not None:
            on_outputs(batch, outputs)
        for image_id, index, results in zip(batch.image_ids, batch.indices, per_image, strict=True):
            yield Prediction(image_id, index, results)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
