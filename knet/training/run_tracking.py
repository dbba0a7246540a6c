"""A training run's MLflow calls: the run started with its params, closed with its pictures.

Only rank 0 tracks. The calls to MLflow itself are :class:`knet.tracking.Tracker`'s; this
module says what a training run logs at its start and its end.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from knet.config import Config
from knet.evaluation.evaluate import evaluate_model
from knet.tracking import Tracker, flatten, system_info


def start_tracker(cfg: Config, loop_config: dict[str, Any], state: dict[str, Any]):
    """The run's tracker (a resumed run continues its MLflow run), or None without tracking."""
    if not cfg.tracking.enabled:
        return None
    tracker = Tracker(
        cfg.tracking,
        loop_config["run_name"],
        run_id=state.get("mlflow_run_id"),
        tags={**loop_config["tags"], **system_info()},
        system_metrics=True,
    )
    tracker.log_params({**flatten(cfg.to_dict()), **loop_config.get("extra_params", {})})
    return tracker


def finish_tracker(
    tracker, model, cfg: Config, cats, checkpoint: str | None, kernel_maps: bool = True
) -> None:
    """Log the final checkpoint and the kernel pictures, then close the run."""
    if checkpoint:
        tracker.log_artifact(checkpoint, "checkpoint")
    if cfg.model.task != "semantic" and kernel_maps:
        with tempfile.TemporaryDirectory() as folder:
            evaluate_model(
                model,
                cfg.model.task,
                cats,
                cfg,
                out=Path(folder) / "eval",
                metrics_file=None,
                kernel_maps=True,
                progress=False,
            )
            for picture in sorted((Path(folder) / "eval").glob("*.png")):
                tracker.log_artifact(picture, "kernel_maps")
    tracker.end()


__all__ = ["finish_tracker", "start_tracker"]
