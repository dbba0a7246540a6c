"""The training loop of every worker: one loop for Ray Train workers and the in-process run.

:func:`train_loop_per_worker` builds the model, data and optimizer, restores the latest
checkpoint, runs :func:`knet.method.engine.train_one_epoch` per epoch, validates, and reports
through its context (:mod:`knet.training.context`: this process or a Ray Train worker; the loop
has no mode branches). Faults for tests come from the loop config (:mod:`knet.training.faults`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from knet.config import Config, config_from_dict
from knet.data.dataset import build_dataset, build_loader
from knet.method.engine import EpochSettings, accelerate, train_one_epoch
from knet.method.losses import KNetCriterion
from knet.method.metrics import accumulate_metrics, gather, summarize
from knet.method.optim import build_optimizer, build_scheduler
from knet.model import build_model
from knet.training.context import LocalContext, RayContext
from knet.training.faults import Faults
from knet.training.run_tracking import finish_tracker, start_tracker


def train_loop_per_worker(
    loop_config: dict[str, Any], ctx: LocalContext | None = None
) -> dict[str, Any]:
    """The training loop of one worker (Ray Train) or of the driver (``num_workers=0``).

    ``loop_config`` holds the config, the run name, MLflow tags (``knet tune`` adds the parent
    run's id), optional ``extra_params`` for MLflow, ``kernel_maps`` (log the kernel pictures at
    the end; default true), ``label`` (a prefix for the epoch lines), ``progress`` (rank 0's
    progress bar; default true) and ``faults`` (tests).
    ``ctx`` is None in a Ray Train worker (Ray calls the loop with the config only).
    """
    began = time.perf_counter()
    ctx = ctx or RayContext()
    run, state = _build(
        config_from_dict(loop_config["config"]), ctx, loop_config.get("progress", True)
    )
    cfg = run.cfg
    # Where every rank runs (node id, host address), for the summary.
    placed = ctx.all_gather((ctx.node_id(), ctx.host()))
    tracking_began = time.perf_counter()
    tracker = start_tracker(cfg, loop_config, state) if ctx.rank == 0 else None
    timings = {"tracking_s": time.perf_counter() - tracking_began}
    timings["setup_s"] = time.perf_counter() - began - timings["tracking_s"]
    try:
        history, epoch_times = _epochs(run, ctx, state, loop_config, tracker)
    except BaseException:
        if tracker:
            tracker.end("FAILED")
        ctx.close()
        raise
    timings["epochs_s"] = sum(epoch_times)
    # Each rank's mean images/s over the epochs this worker group trained (a group restarted
    # after a failure reports only its own epochs).
    speeds = [m["images_per_s"] for m in history[len(history) - len(epoch_times) :]]
    worker_speeds = ctx.all_gather(round(sum(speeds) / len(speeds), 2) if speeds else None)
    summary = {
        "epochs": cfg.train.epochs,
        "final": history[-1] if history else {},
        "checkpoint": ctx.last_checkpoint,
        "mlflow_run_id": tracker.run_id if tracker else None,
        "worker_nodes": [node for node, _ in placed],
        "worker_hosts": [host for _, host in placed],
        "worker_images_per_s": worker_speeds,
    }
    if tracker:
        finishing = time.perf_counter()
        kernel_maps = loop_config.get("kernel_maps", True)
        finish_tracker(tracker, run.model, cfg, run.cats, ctx.last_checkpoint, kernel_maps)
        timings["tracking_s"] += time.perf_counter() - finishing
    ctx.close()
    timings["loop_s"] = time.perf_counter() - began
    summary["timings"] = {k: round(v, 2) for k, v in timings.items()}
    return summary


@dataclasses.dataclass
class _Run:
    """What one worker trains with: the config, the model (and its DDP wrapper), the data."""

    cfg: Config
    model: torch.nn.Module
    ddp_model: torch.nn.Module
    criterion: KNetCriterion
    loader: Any
    optimizer: Any
    scheduler: Any
    val_set: Any
    cats: Any
    settings: EpochSettings  # its device is the run's


def _build(cfg: Config, ctx: LocalContext, progress: bool) -> tuple[_Run, dict[str, Any]]:
    """The model, data, optimizer and schedule of this worker, at the restored checkpoint;
    ``progress``: rank 0 draws its progress bar."""
    device = ctx.setup(cfg)
    torch.manual_seed(cfg.train.seed + ctx.rank)
    train_set = build_dataset(cfg.data, cfg.data.train_split, cfg.model.task, train=True)
    val_set = build_dataset(cfg.data, cfg.data.val_split, cfg.model.task, train=False)
    cats = train_set.categories
    model = build_model(cfg.model, cats.num_things, cats.num_stuff).to(device)
    channels_last = accelerate(model, device, cfg.train.channels_last, cfg.train.compile)
    optimizer = build_optimizer(model, cfg.optim)
    loader = ctx.prepare_loader(
        build_loader(
            train_set,
            cfg.train.batch_size,
            train=True,
            num_workers=cfg.data.num_workers,
            seed=cfg.train.seed,
            pin_memory=device.type == "cuda",
        )
    )
    scheduler = build_scheduler(optimizer, cfg.optim, len(loader))
    state = ctx.restore(model, optimizer, scheduler)
    resume_schedule(scheduler, state.get("epoch", 0), len(loader))
    run = _Run(
        cfg=cfg,
        model=model,
        ddp_model=ctx.prepare_model(model),
        criterion=KNetCriterion(cfg.loss, cfg.model.task, cats.num_things, cats.num_stuff),
        loader=loader,
        optimizer=optimizer,
        scheduler=scheduler,
        val_set=val_set,
        cats=cats,
        settings=EpochSettings(
            optim=cfg.optim,
            device=device,
            amp=cfg.train.amp,
            progress=progress and ctx.rank == 0,
            max_bad_steps=cfg.train.max_bad_steps,
            channels_last=channels_last,
        ),
    )
    return run, state


def resume_schedule(scheduler, epoch: int, iters_per_epoch: int) -> None:
    """Put a restored schedule at the start of ``epoch`` for this worker group's iterations.

    The schedule counts iterations, and an elastic group that changed size since the
    checkpoint has another number of them per epoch: without this, its LR steps would come
    late (fewer workers) or early (more).
    """
    if epoch:
        scheduler.last_epoch = epoch * iters_per_epoch


def _epochs(
    run: _Run,
    ctx: LocalContext,
    state: dict[str, Any],
    loop_config: dict[str, Any],
    tracker,
) -> tuple[list[dict[str, Any]], list[float]]:
    """Train from the restored epoch to ``train.epochs``; report and checkpoint each one."""
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    history: list[dict[str, Any]] = state.get("history", [])
    bad_steps = state.get("bad_steps", 0)
    epoch_times: list[float] = []
    faults = Faults.from_config(loop_config.get("faults"))
    for epoch in range(state.get("epoch", 0), cfg.train.epochs):
        faults.before_epoch(epoch)
        start = time.perf_counter()
        ctx.set_epoch(run.loader, epoch)
        stats = train_one_epoch(
            run.ddp_model,
            faults.criterion(run.criterion, epoch),
            run.loader,
            optimizer,
            run.scheduler,
            dataclasses.replace(run.settings, on_step=faults.on_step(ctx.rank, epoch)),
            bad_steps=bad_steps,
        )
        bad_steps = int(stats["bad_steps"])
        metrics = {
            "epoch": epoch + 1,
            **{k: round(v, 5) for k, v in stats.items()},
            "lr": optimizer.param_groups[-1]["lr"],
        }
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            metrics.update(_validate(model, run.val_set, cfg, run.cats, run.settings.device, ctx))
        epoch_times.append(time.perf_counter() - start)
        metrics["epoch_s"] = round(epoch_times[-1], 2)
        history.append(metrics)
        run_id = tracker.run_id if tracker else state.get("mlflow_run_id")
        ctx.report(
            metrics,
            model,
            cfg,
            run.cats,
            optimizer=optimizer.state_dict(),
            scheduler=run.scheduler.state_dict(),
            epoch=epoch + 1,
            history=history,
            bad_steps=bad_steps,
            mlflow_run_id=run_id,
        )
        if ctx.rank == 0:
            _print_epoch(metrics, cfg.train.epochs, epoch_times, loop_config.get("label", ""))
            if tracker:
                tracker.log_metrics(metrics, step=epoch + 1)
    return history, epoch_times


def _validate(model, val_set, cfg: Config, cats, device, ctx: LocalContext) -> dict[str, float]:
    """PQ / AP / mIoU on the val split: each worker a disjoint shard, states gathered once."""
    indices = list(range(ctx.rank, len(val_set), ctx.world_size))
    metrics = accumulate_metrics(model, val_set, cfg.model.task, cats, cfg, device, indices=indices)
    states = {name: metric.state_dict() for name, metric in metrics.items()}
    gathered = ctx.all_gather(states)
    if ctx.rank != 0:
        return {}  # rank 0 reports the numbers
    merged = {name: gather([s[name] for s in gathered]) for name in states}
    computed = summarize({name: metric.compute() for name, metric in merged.items()})
    return {f"val_{k}": v for k, v in computed.items()}


# Bootstrap interval ends: logged to MLflow and the ablation, not printed in the epoch line.
BOUNDS = ("_low", "_high")


def _print_epoch(metrics: dict[str, Any], epochs: int, times: list[float], label: str = "") -> None:
    remaining = (epochs - metrics["epoch"]) * (sum(times) / len(times))
    shown = " ".join(
        f"{k[4:]} {v:.1f}"
        for k, v in metrics.items()
        if k.startswith("val_") and isinstance(v, float) and v == v and not k.endswith(BOUNDS)
    )
    prefix = f"{label}  " if label else ""
    print(
        f"{prefix}epoch {metrics['epoch']}/{epochs}  loss {metrics['loss']:.3f}  {shown}  "
        f"{metrics['images_per_s']:.1f} img/s  ETA {remaining / 60:.1f} min",
        flush=True,
    )


__all__ = ["resume_schedule", "train_loop_per_worker"]
