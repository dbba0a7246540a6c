"""MLflow tracking: the only module of knet that imports mlflow.

A :class:`Tracker` lives on rank 0 of a training run: flattened params, per-epoch metrics,
system information, lineage tags (git commit and dirty flag, the DVC hash of the prepared
data, the params digest) and artifacts (the final checkpoint, kernel pictures).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from knet.config import Config, TrackingConfig

log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """The tracking URI cannot be used (unwritable sqlite folder, unreachable server)."""


class TrackingUnreachableError(TrackingError):
    """The tracking server does not answer (yet): worth retrying, unlike a bad URI."""


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before any work when the tracking store cannot be written or reached."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        folder = path.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(
                f"tracking.uri {uri}: folder {folder} does not exist or is not writable"
            )
        if path.exists() and not os.access(path, os.W_OK):
            raise TrackingError(f"tracking.uri {uri}: {path} is not writable")
        return
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
        except (urllib.error.URLError, OSError) as err:
            raise TrackingUnreachableError(f"tracking.uri {uri} is not reachable: {err}") from None
        return
    raise TrackingError(f"tracking.uri {uri}: use sqlite:///path/to/file.db or http(s)://host")


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params -> ``{"model.num_stages": "3", ...}`` (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


def lineage_tags(cfg: Config, root: Path, params_hash: str | None = None) -> dict[str, str]:
    """git commit + dirty flag, DVC hash of the prepared data, params digest."""
    tags = {"params_hash": params_hash or cfg.digest(), "knet.task": cfg.model.task}
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
        tags.update({"git_commit": commit, "git_dirty": str(dirty).lower()})
    except (OSError, subprocess.CalledProcessError):
        tags.update({"git_commit": "unknown", "git_dirty": "unknown"})
    tags["data_hash"] = data_hash(cfg, root)
    return tags


def data_hash(cfg: Config, root: Path) -> str:
    """The prepared data's DVC hash from ``dvc.lock`` when DVC produced it, else its manifest's."""
    import yaml

    prepared = Path(cfg.data.prepared)
    lock = root / "dvc.lock"
    if lock.exists():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("prepare", {}).get("outs", []):
            if (root / out["path"]).resolve() == prepared.resolve():
                return f"dvc:{out.get('md5', '?')}"
    manifest = prepared / "manifest.json"
    if manifest.exists():
        return f"manifest:{json.loads(manifest.read_text())['content_hash'][:32]}"
    return "unknown"


def system_info() -> dict[str, str]:
    import torch

    info = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": str(os.cpu_count()),
        "cuda": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return {f"sys.{k}": v for k, v in info.items()}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, check=True, capture_output=True, text=True, timeout=10
    ).stdout.strip()


def experiment_id(cfg: TrackingConfig) -> str:
    """The id of ``cfg.experiment``, created (artifacts under ``artifact_location``) if new."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(cfg.uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if cfg.uri.startswith("sqlite:"):
        location = Path(cfg.artifact_location).resolve().as_uri()
    try:
        return mlflow.create_experiment(cfg.experiment, artifact_location=location)
    except MlflowException:  # created meanwhile by a concurrent run
        return mlflow.get_experiment_by_name(cfg.experiment).experiment_id


def ui_address(uri: str, page: str) -> str:
    """The MLflow UI's ``page`` (``experiments/E/runs/R``, ``models/M/versions/V``) for the
    store ``uri``: on a tracking server its URL; for a local store the page ``mlflow ui``
    (``make mlflow-ui``) serves, and the command that serves it."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/{page}"
    return f"http://127.0.0.1:5000/#/{page} (mlflow ui --backend-store-uri {uri} --host 127.0.0.1)"


def run_address(uri: str, run_id: str, experiment_id: str | None = None) -> str:
    """The UI page of run ``run_id`` (:func:`ui_address`)."""
    if experiment_id is None:
        import mlflow

        experiment_id = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    return ui_address(uri, f"experiments/{experiment_id}/runs/{run_id}")


def run_exists(cfg: TrackingConfig, run_id: str) -> bool:
    """Whether ``run_id`` is a run of the store ``cfg.uri`` (a checkpoint may come from
    another store)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient(cfg.uri).get_run(run_id)
    except MlflowException:
        return False
    return True


class Tracker:
    """One MLflow run; resumes the same run when given its id (training restarts)."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_name: str,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        system_metrics: bool = False,
    ) -> None:
        """``system_metrics``: sample CPU, memory, disk and network (GPU with pynvml) every
        ``cfg.system_metrics_interval_s`` into the run (``system/...`` metrics)."""
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(cfg.uri)
        sample = system_metrics and cfg.system_metrics_interval_s > 0
        if sample:
            # Its start / stop / "skip GPU metrics" INFO lines would be the log's only noise.
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
            mlflow.set_system_metrics_sampling_interval(cfg.system_metrics_interval_s)
            mlflow.set_system_metrics_samples_before_logging(1)
        self.run = mlflow.start_run(
            run_id=run_id,
            run_name=None if run_id else run_name,
            experiment_id=experiment_id(cfg),
            tags=dict(tags or {}),
            log_system_metrics=sample,
        )
        self.run_id = self.run.info.run_id

    def log_params(self, params: Mapping[str, str]) -> None:
        existing = self.mlflow.get_run(self.run_id).data.params
        fresh = {k: v for k, v in params.items() if k not in existing}
        items = list(fresh.items())
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self.mlflow.log_params(dict(items[start : start + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        clean = {
            k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and v == v
        }  # drop NaN
        self.mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.mlflow.set_tags(dict(tags))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def close_children(self, status: str = "KILLED") -> int:
        """End the child runs still RUNNING (their process died); returns how many."""
        client = self.mlflow.MlflowClient()
        children = client.search_runs(
            [self.run.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' "
            "and attributes.status = 'RUNNING'",
        )
        for child in children:
            client.set_terminated(child.info.run_id, status=status)
        return len(children)

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def log_output_run(  # 7 parameters: what an output run is (name, kind, source), where, and what
    cfg: TrackingConfig,
    run_name: str,
    kind: str,
    source: str,
    parent_run_id: str | None,
    metrics: Mapping[str, float],
    artifacts: Iterable[tuple[Path, str]],
) -> str:
    """One finished MLflow run for what a model produced (an evaluation, a prediction): its
    ``metrics``, the ``(file, artifact folder)`` pairs, tags ``knet.kind`` and
    ``knet.source``; nested under ``parent_run_id`` (the run that trained the model) when that
    run is in the same store. A failure marks the run FAILED. Returns the run id."""
    tags = {"knet.source": source, "knet.kind": kind}
    if parent_run_id and run_exists(cfg, parent_run_id):
        tags["mlflow.parentRunId"] = parent_run_id
    tracker = Tracker(cfg, run_name, tags=tags)
    try:
        tracker.log_metrics(metrics, step=0)
        for path, folder in artifacts:
            tracker.log_artifact(path, folder)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    log.info("%s logged to MLflow run %s (%s)", kind, tracker.run_id, cfg.uri)
    return tracker.run_id
