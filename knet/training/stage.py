"""``knet train``, the stage: check the inputs, train (in this process or on Ray Train),
publish the final checkpoint and the DVC metrics.

Run names are deterministic (``train.run_name`` or the params digest), so rerunning the same
command resumes from the latest checkpoint in ``train.storage_path``; a crashed worker group
restarts from it (``train.max_failures``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knet.config import Config, absolute_paths
from knet.data.prepare import scale_advice
from knet.io import check_output_file, dumps, write_output_file
from knet.method.checkpoint import check_checkpoint_output, load_checkpoint
from knet.tracking import TrackingUnreachableError, check_tracking_uri, lineage_tags
from knet.training.cluster import fit_on_ray
from knet.training.context import LocalContext
from knet.training.errors import ServiceUnreachableError, TrainSetupError
from knet.training.faults import from_environment
from knet.training.loop import train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What ``knet train`` did: the CLI prints it, the flows and tests read it, and
    :func:`knet.io.dumps` writes it as JSON."""

    run_name: str
    epochs: int
    final: dict[str, Any]  # the last epoch's history entry: loss, lr, val_* metrics, ...
    checkpoint: str | None  # train.output (after a failure: the last good one), None if none
    mlflow_run_id: str | None
    seconds: float
    worker_nodes: list[str] = field(default_factory=list)
    worker_hosts: list[str] = field(default_factory=list)
    worker_images_per_s: list[float | None] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part of the loop
    ray_path: str | None = None  # Ray Train's run folder (None in-process)


def train(
    cfg: Config,
    root: str | Path = ".",
    run_name: str | None = None,
    address: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``cfg`` on Ray Train (or in-process with ``train.num_workers=0``).

    Args:
        root: project root; relative paths in ``cfg`` are taken from here.
        run_name: overrides ``train.run_name``; the same name resumes the same run.
        address: a Ray cluster to join (``auto`` or ``host:port``); None starts a local one.
        progress: rank 0 draws a progress bar per epoch (the epoch lines show either way).

    Returns:
        The :class:`TrainResult`: run name, epochs, final metrics, checkpoint, MLflow run id,
        seconds, the workers and their speeds.
        A run that fails (NaN losses past ``train.max_bad_steps``, a worker group out of
        retries) keeps its last good checkpoint at ``train.output`` and raises.
    """
    root = Path(root).resolve()
    params_hash = cfg.digest()  # of the params as written, before paths are made absolute
    run_name = run_name or cfg.train.run_name or default_run_name(cfg)
    cfg = absolute_paths(cfg, root)
    check_inputs(cfg)
    for path in metrics_files(cfg):  # a file of the user's there is never replaced
        check_output_file(path, "metrics")
    tags = lineage_tags(cfg, root, params_hash) if cfg.tracking.enabled else {}
    loop_config = {
        "config": cfg.to_dict(),
        "run_name": run_name,
        "tags": tags,
        "progress": progress,
        "faults": from_environment(),  # tests only; {} in every normal run
    }
    start = time.perf_counter()
    if cfg.train.num_workers == 0:
        summary, error, scratch = _train_here(loop_config)
    else:
        summary, error = fit_on_ray(loop_config, cfg, run_name, address)
        scratch = Path(summary["checkpoint"]).parent if summary.get("checkpoint") else None
    try:
        if summary.get("checkpoint"):  # after a failure: the last good one, where DVC expects it
            summary["checkpoint"] = publish(summary["checkpoint"], cfg)
    finally:
        if scratch is not None:  # temporary copies; the published one is at train.output
            shutil.rmtree(scratch, ignore_errors=True)
    if error is not None:
        raise error
    fields = {k: summary[k] for k in TrainResult.__dataclass_fields__ if k in summary}
    seconds = round(time.perf_counter() - start, 1)
    return TrainResult(run_name=run_name, seconds=seconds, **fields)


def _train_here(loop_config: dict[str, Any]) -> tuple[dict[str, Any], Exception | None, Path]:
    """The loop in this process: its summary, the error that ended it, its scratch folder."""
    ctx = LocalContext()
    try:
        return train_loop_per_worker(loop_config, ctx), None, ctx.local_dir
    except Exception as err:
        return {"checkpoint": ctx.last_checkpoint}, err, ctx.local_dir


def default_run_name(cfg: Config) -> str:
    """``knet-<task>-<digest of the params>``: same params, same run, so reruns resume."""
    return f"knet-{cfg.model.task}-{cfg.digest()}"


def check_inputs(cfg: Config) -> None:
    """Fail fast with a clear message: missing prepared data, an output that is not knet's
    checkpoint, unusable tracking URI."""
    check_checkpoint_output(cfg.train.output)
    _warn_about_scale(cfg)
    for split in (cfg.data.train_split, cfg.data.val_split):
        index = Path(cfg.data.prepared) / split / "index.json"
        if not index.exists():
            raise TrainSetupError(
                f"prepared data {index} does not exist; run `dvc repro prepare` "
                f"(or `knet data synth && knet data prepare`) first"
            )
    if cfg.tracking.enabled:
        try:
            check_tracking_uri(cfg.tracking.uri)
        except TrackingUnreachableError as err:
            raise ServiceUnreachableError(str(err)) from None
        except RuntimeError as err:
            raise TrainSetupError(str(err)) from None


def _warn_about_scale(cfg: Config) -> None:
    """Say before training when the prepared things are too small for the mask stride."""
    manifest = Path(cfg.data.prepared) / "manifest.json"
    try:
        split = json.loads(manifest.read_text())["splits"][cfg.data.train_split]
    except (OSError, ValueError, KeyError):
        return
    advice = scale_advice(split, cfg.data.test_size)
    if advice:
        log.warning("knet: warning: %s", advice)


def publish(checkpoint: str | Path, cfg: Config) -> str:
    """Copy the final checkpoint to ``train.output`` atomically; write the DVC metrics.

    ``train.metrics`` (``metrics/train.json``) holds the last epoch's numbers and
    ``<its stem>_history.json`` one entry per epoch (the DVC plots).
    """
    output = Path(cfg.train.output)
    check_checkpoint_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.copyfile(checkpoint, tmp)
    os.replace(tmp, output)
    payload = load_checkpoint(output)
    history = payload.get("history", [])
    if history:
        metrics, history_file = metrics_files(cfg)
        write_output_file(metrics, dumps(history[-1], indent=2), "metrics")
        write_output_file(history_file, dumps(history, indent=1), "metrics")
    return str(output)


def metrics_files(cfg: Config) -> tuple[Path, Path]:
    """``train.metrics`` and the per-epoch history beside it (``<stem>_history.json``)."""
    metrics = Path(cfg.train.metrics)
    return metrics, metrics.with_name(f"{metrics.stem}_history.json")


__all__ = ["TrainResult", "check_inputs", "default_run_name", "publish", "train"]
