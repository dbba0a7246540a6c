"""Prefect tasks: thin calls of the knet stage functions, with retries where a retry can help.

Only errors from services that may not answer *yet* (an MLflow server or a Ray head starting,
a dropped connection) are retried, with backoff. Everything else (a bad params key, missing
data, a model that fails the gate) fails the task at once with knet's message.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import task

from knet.config import Config, load_config
from knet.experiments.registry import Promotion
from knet.tracking import TrackingUnreachableError
from knet.training import ServiceUnreachableError, TrainResult

TRANSIENT = (ServiceUnreachableError, TrackingUnreachableError, ConnectionError, TimeoutError)
BACKOFF_S = [2, 10, 30]


def is_transient(task, task_run, state) -> bool:
    """Retry only errors of services that may come up: see :data:`TRANSIENT`."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except Exception:
        return False
    return False


def _retrying(**kwargs):
    return task(
        retries=len(BACKOFF_S),
        retry_delay_seconds=BACKOFF_S,
        retry_condition_fn=is_transient,
        **kwargs,
    )


@task(name="load-params")
def load_params(params: str, overrides: list[str]) -> Config:
    """The validated config (a bad key fails here, before any work, and is not retried)."""
    return load_config(params, overrides)


@_retrying(name="check-services", timeout_seconds=60)
def check_services(cfg: Config, root: str, address: str | None) -> None:
    """The tracking store and the Ray head answer (retried while they start)."""
    from knet.config import resolve_uri
    from knet.tracking import check_tracking_uri
    from knet.training import check_reachable

    if cfg.tracking.enabled:
        check_tracking_uri(resolve_uri(cfg.tracking.uri, Path(root).resolve()))
    if address and address != "auto":
        check_reachable(address)


def _dvc_key(context, parameters) -> str | None:
    """The prep task's cache key: the repository, its dvc.yaml, dvc.lock and params.yaml, and
    the prepared data's manifest; None (no caching) while the prepared data does not exist."""
    root = Path(parameters["root"]).resolve()
    cfg = _absolute(load_config(root / "params.yaml"), str(root))
    manifest = Path(cfg.data.prepared) / "manifest.json"
    if not manifest.exists():
        return None
    digest = hashlib.sha256(str(root).encode())
    for path in (root / "dvc.yaml", root / "dvc.lock", root / "params.yaml", manifest):
        digest.update(path.read_bytes() if path.exists() else b"-")
    return f"dvc-prepare-{digest.hexdigest()[:16]}"


@task(name="prepare-data", cache_key_fn=_dvc_key, timeout_seconds=1800)
def prepare_data(root: str) -> str:
    """``dvc repro prepare`` (synth -> prepare; unchanged stages skip); the data's DVC hash.

    Cached on the hash of dvc.yaml, dvc.lock and params.yaml: a rerun with nothing changed
    does not even start DVC.
    """
    bin_dir = Path(sys.executable).parent  # dvc, and the `knet` its stages run
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [str(bin_dir / "dvc"), "repro", "prepare"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"`dvc repro prepare` failed in {root}:\n{done.stdout}{done.stderr}")
    from knet.tracking import data_hash

    cfg = _absolute(load_config(Path(root) / "params.yaml"), root)
    return data_hash(cfg, Path(root))


@_retrying(name="train", timeout_seconds=6 * 3600)
def train_model(cfg: Config, root: str, address: str | None) -> TrainResult:
    from knet.training import train

    return train(cfg, root=root, address=address)


# pycocotools prints its AP table; Prefect's log_prints would turn it into 40 log lines.
@task(name="evaluate", timeout_seconds=3600, log_prints=False)
def evaluate_model(cfg: Config, root: str, checkpoint: str) -> dict[str, float]:
    from knet.evaluation.evaluate import evaluate_model as evaluate
    from knet.method.checkpoint import load_model

    model, trained, categories = load_model(checkpoint)
    ev = cfg.evaluate
    return evaluate(
        model,
        trained.model.task,
        categories,
        _absolute(cfg, root),
        split=ev.split or None,
        out=Path(root) / ev.out,
        metrics_file=Path(root) / ev.metrics,
        kernel_maps=ev.kernel_maps,
        progress=False,
    )


@_retrying(name="promote", timeout_seconds=3600, log_prints=False)
def promote_model(cfg: Config, root: str, checkpoint: str) -> Promotion:
    from knet.experiments.registry import promote

    return promote(cfg, root=root, checkpoint=checkpoint)


@task(name="predict", timeout_seconds=1800)
def predict_samples(cfg: Config, root: str, model_uri: str, images: int) -> dict[str, Any]:
    """Overlay PNGs and segment JSONs for the first ``images`` val images, from the registry;
    with tracking on, also an MLflow run under the version's training run."""
    from knet.evaluation.predict import expand_inputs, log_prediction, predict_checkpoint
    from knet.experiments.registry import load_registered

    absolute = _absolute(cfg, root)
    *loaded, version = load_registered(model_uri, absolute.tracking.uri)
    val = Path(absolute.data.raw) / absolute.data.images.format(split=absolute.data.val_split)
    inputs = expand_inputs([val])[:images]
    out = Path(root) / "outputs" / "predict"
    summary = predict_checkpoint(inputs, None, out, progress=False, loaded=loaded, track=False)
    run_id = None
    if absolute.tracking.enabled and summary.written:  # the project's store, not the worker's
        run_id = log_prediction(absolute.tracking, model_uri, summary, version.run_id)
    return {"out": str(out), "written": summary.written, "failed": summary.failed, "run_id": run_id}


def _absolute(cfg: Config, root: str) -> Config:
    from knet.config import absolute_paths

    return absolute_paths(cfg, Path(root).resolve())
