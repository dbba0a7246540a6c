"""Framework-free training and inference loops (plain PyTorch).

The plain loop, the Ray Train loop and the evaluation command share every line of the step:
:func:`train_step` -> :func:`train_one_epoch`, and :func:`predict_batch` -> :func:`run_inference`.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from knet.config import OptimConfig, PostprocessConfig
from knet.data.dataset import Batch
from knet.method.losses import KNetCriterion
from knet.method.optim import clip_gradients, step_unless_nonfinite
from knet.method.postprocess import postprocess
from knet.model import KNetOutput


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled; a no-op on CPU (spec: AMP off on CPU)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def channels_last_on(device: torch.device, enabled: bool) -> bool:
    """Whether ``train.channels_last`` applies here: on CUDA only (on a CPU it did not pay)."""
    return enabled and device.type == "cuda"


def accelerate(model: nn.Module, device: torch.device, channels_last: bool, compile: bool) -> bool:
    """Apply ``train.channels_last`` (CUDA only) and ``train.compile`` to a K-Net in place.

    Compiles the backbone, FPN and fuser with ``Module.compile`` (their parameter names stay,
    so checkpoints and DDP are unaffected). Returns whether the input images should be
    channels-last too.
    """
    channels_last = channels_last_on(device, channels_last)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        for name in ("backbone", "fpn", "fuser"):
            getattr(model, name).compile()
    return channels_last


class NonFiniteLossError(RuntimeError):
    """Too many steps with a NaN/inf loss (``train.max_bad_steps``)."""


def train_step(
    model: nn.Module,
    criterion: KNetCriterion,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    optim_cfg: OptimConfig,
    amp: bool = True,
) -> dict[str, torch.Tensor]:
    """One optimisation step; the detached loss terms, ``loss`` and ``skipped``.

    A step whose gradients are NaN/inf (a NaN loss, an overflow) updates nothing; ``skipped``
    (a 0-dim float tensor) is 1 for it. The decision stays on the device (the fused AdamW's
    ``found_inf``), so the step's only host sync is the matcher's cost transfer. The gradient
    norm is all-reduced under DDP, so every rank skips the same steps.
    """
    device = batch.images.device
    with autocast(device, amp):
        outputs = model(batch.images)
    losses = criterion(outputs, batch.targets)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = clip_gradients(model, optim_cfg)
    skipped = (~torch.isfinite(norm)).float()
    step_unless_nonfinite(optimizer, skipped)
    return {
        "loss": loss.detach(),
        **{k: v.detach() for k, v in losses.items()},
        "skipped": skipped,
    }


class LaggedCount:
    """Sums 0-dim device flags without waiting for them.

    On CUDA each flag is copied to pinned host memory behind an event and added once the GPU
    has got there (:meth:`settled` never blocks unless asked to), so counting skipped steps
    costs the training loop no sync; on a CPU the flag is added at once.
    """

    def __init__(self, device: torch.device, start: int = 0) -> None:
        self.device, self.total = device, start
        self.pending: collections.deque = collections.deque()

    def add(self, flag: torch.Tensor) -> None:
        if self.device.type != "cuda":
            self.total += int(flag)
            return
        host = torch.empty((), dtype=flag.dtype, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((event, host))

    def settled(self, wait: bool = False) -> int:
        """The flags the GPU has finished (all of them with ``wait``) and everything before."""
        while self.pending and (wait or self.pending[0][0].query()):
            event, host = self.pending.popleft()
            event.synchronize()
            self.total += int(host)
        return self.total


@dataclass(frozen=True)
class EpochSettings:
    """How an epoch trains: fixed for a run, except ``on_step`` (a per-step callback, the
    tests' fault hook)."""

    optim: OptimConfig
    device: torch.device
    amp: bool = True
    progress: bool = False
    # Past this many NaN/inf steps (over the run) the epoch stops; None: never.
    max_bad_steps: int | None = None
    channels_last: bool = False  # convert the images to channels-last memory
    on_step: Callable[[int], None] | None = None  # called with the step index before each step


def train_one_epoch(  # 65 lines: the step loop and its lagged NaN count (one sync)
    model: nn.Module,
    criterion: KNetCriterion,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    settings: EpochSettings,
    bad_steps: int = 0,
) -> dict[str, float]:
    """One pass over ``loader``: mean loss terms, images, images/s and ``bad_steps``.

    ``bad_steps`` counts NaN/inf steps so far (over the run), read without stalling the GPU
    (:class:`LaggedCount`, so on CUDA a step or two late); past ``settings.max_bad_steps`` the
    epoch stops with :class:`NonFiniteLossError`. Skipped steps are left out of the mean losses.
    """
    device, max_bad_steps, on_step = settings.device, settings.max_bad_steps, settings.on_step
    model.train()
    names: list[str] = []
    totals = torch.zeros(0, device=device)  # the loss terms' sums over the kept steps
    good = torch.zeros((), device=device)
    bad = LaggedCount(device, bad_steps)
    images = 0
    start = time.perf_counter()

    def check(total: int) -> None:
        if max_bad_steps is not None and total > max_bad_steps:
            raise NonFiniteLossError(
                f"{total} steps had a NaN/inf loss (train.max_bad_steps="
                f"{max_bad_steps}); stopping. The last good checkpoint is kept."
            )

    for step, batch in enumerate(
        tqdm(
            loader,
            desc="train",
            unit="batch",
            disable=not settings.progress,
            leave=False,
            mininterval=2.0,
        )
    ):
        if on_step is not None:
            on_step(step)
        batch = batch.to(device, non_blocking=True, channels_last=settings.channels_last)
        losses = train_step(model, criterion, batch, optimizer, settings.optim, settings.amp)
        skipped = losses.pop("skipped")
        names = list(losses)
        terms = torch.where(skipped == 0, torch.stack(list(losses.values())), 0.0)
        totals = totals + terms if len(totals) else terms  # a few kernels per step, not per term
        good += 1 - skipped
        bad.add(skipped)
        check(bad.settled())
        if scheduler is not None:
            scheduler.step()
        images += len(batch)
    check(bad.settled(wait=True))
    seconds = time.perf_counter() - start
    steps = max(float(good), 1.0)  # the epoch's syncs: this and the means
    means = dict(zip(names, (totals / steps).tolist(), strict=True))
    return {
        **means,
        "images": images,
        "bad_steps": bad.total,
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


def run_inference(  # 12 parameters: evaluate's and predict's options passed through
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
    channels_last: bool = False,
) -> Iterator[Prediction]:
    """Yield a :class:`Prediction` per image; ``timings`` accumulates forward/post seconds."""
    model.eval()
    tasks = tuple(tasks)
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress, leave=False):
        batch = batch.to(device, non_blocking=True, channels_last=channels_last)
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
