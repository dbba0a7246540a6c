"""The Prefect flows ``train-knet`` and ``ablate-knet`` (``pipelines/`` is the only Prefect user).

Both are thin: they order the knet stage functions as tasks (``pipelines/tasks.py``), pass the
parameters, and publish a summary as a Prefect markdown artifact::

    train-knet:  load-params -> check-services -> prepare-data (dvc repro prepare)
                 -> train (Ray Train) -> evaluate -> promote (MLflow registry) -> predict
    ablate-knet: load-params -> check-services -> prepare-data -> tune (Ray Tune)
                 -> promote the best trial as a challenger

Run them with ``python -m pipelines train-knet`` (``make pipeline``: an ephemeral Prefect API),
or deploy them (``prefect.yaml``) and ``prefect deployment run train-knet/train-knet``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from knet.experiments.registry import Promotion
from knet.experiments.tune import command_line_sweep
from pipelines.guard import check_address, check_params, check_root, check_tracking_uri
from pipelines.tasks import (
    check_services,
    evaluate_model,
    load_params,
    predict_samples,
    prepare_data,
    promote_model,
    train_model,
)


def _overrides(
    overrides: list[str] | None,
    epochs: int | None,
    num_stages: int | None,
    num_kernels: int | None,
    tracking_uri: str | None,
) -> list[str]:
    """The flow's parameters as ``dotted.key=value`` overrides (explicit ones last win)."""
    items = []
    if epochs is not None:
        items.append(f"train.epochs={epochs}")
    if num_stages is not None:
        items.append(f"model.num_stages={num_stages}")
    if num_kernels is not None:
        items.append(f"model.num_kernels={num_kernels}")
    if tracking_uri:
        items.append(f"tracking.uri={tracking_uri}")
    return items + list(overrides or [])


@flow(name="train-knet", log_prints=True)
def train_knet(  # 9 parameters: the deployment's parameters (prefect deployment run --param)
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    epochs: int | None = None,
    num_stages: int | None = None,
    num_kernels: int | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    root: str = ".",
    predict_images: int = 4,
) -> dict[str, Any]:
    """Prepare the data (DVC), train (Ray Train), evaluate, register and promote, predict.

    Args:
        params: the params file (relative to ``root``); DVC's prep stage reads params.yaml.
        overrides: ``dotted.key=value`` overrides, applied after the named parameters.
        epochs, num_stages, num_kernels: shorthands for train.epochs, model.num_stages,
            model.num_kernels.
        address: a Ray cluster (``auto`` or ``host:port``); None starts a local instance.
        tracking_uri: an MLflow tracking URI instead of ``tracking.uri``.
        root: the project (a DVC repository) the flow works in.
        predict_images: how many val images get overlay pictures.
    """
    root = check_root(root)  # a caller may not point the worker at another dvc.yaml
    address = check_address(address)  # "" (deployments' default): start a local instance
    times: dict[str, float] = {}
    clock = _Clock(times)
    items = _overrides(overrides, epochs, num_stages, num_kernels, tracking_uri)
    cfg, data = _prepare(params, items, root, address, clock)
    with clock("train"):
        trained = train_model(cfg, root, address)
    with clock("evaluate"):
        metrics = evaluate_model(cfg, root, trained.checkpoint)
    with clock("registry"):
        decision = promote_model(cfg, root, trained.checkpoint)
    model_uri = decision.model_uri
    with clock("predict"):
        pictures = predict_samples(cfg, root, model_uri, predict_images)
    summary = {
        "data_hash": data,
        "run": trained.run_name,
        "mlflow_run_id": trained.mlflow_run_id,
        **_links(cfg, root, trained.mlflow_run_id, decision),
        "train_s": trained.seconds,
        "metrics": {k: metrics[k] for k in ("pq", "pq_th", "pq_st", "ap", "miou") if k in metrics},
        "model": decision.model,
        "version": decision.version,
        "decision": decision.decision,
        "reason": decision.reason,
        "champion": decision.champion,
        "pictures": pictures["out"],
        "checkpoint": trained.checkpoint,
        "stage_s": {k: round(v, 1) for k, v in times.items()},
    }
    _publish("train-knet-summary", "train-knet", summary)
    return summary


@task(name="tune", timeout_seconds=12 * 3600)
def tune_sweep(cfg, root: str, address: str | None):
    """Ray Tune's sweep (:class:`knet.experiments.tune.SweepResult`)."""
    from knet.experiments.tune import tune

    return tune(cfg, root=root, address=address)


@flow(name="ablate-knet", log_prints=True)
def ablate_knet(  # 10 parameters: the deployment's parameters (prefect deployment run --param)
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    num_stages: list[int] | None = None,
    num_kernels: list[int] | None = None,
    seeds: int | None = None,
    grid: list[str] | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    root: str = ".",
    register_best: bool = True,
) -> dict[str, Any]:
    """Prepare the data, run the Ray Tune ablation, report, register the best trial.

    Args:
        num_stages, num_kernels, seeds: shorthands for tune.num_stages, tune.num_kernels,
            tune.seeds; the first two sweep rounds x kernels instead of the params' tune.grid.
        grid: ``dotted.key=v1,v2`` items sweeping every combination of any keys instead
            (tune.grid, as knet tune's --grid).
        register_best: register the best trial as a challenger (gated like any promotion).
        Other arguments as in :func:`train_knet`.
    """
    root = check_root(root)  # a caller may not point the worker at another dvc.yaml
    address = check_address(address)  # "" (deployments' default): start a local instance
    times: dict[str, float] = {}
    clock = _Clock(times)
    items = _overrides(overrides, None, None, None, tracking_uri)
    if num_stages:
        items.append(f"tune.num_stages={list(num_stages)}")
    if num_kernels:
        items.append(f"tune.num_kernels={list(num_kernels)}")
    if seeds:
        items.append(f"tune.seeds={seeds}")
    sets = list(items)
    if grid:
        items.append(f"tune.grid={json.dumps(list(grid))}")  # JSON is YAML; commas stay inside
    cfg, data = _prepare(params, items, root, address, clock)
    # as knet tune's --set / --grid: a caller's keys win over tune.overrides, and num_stages /
    # num_kernels or a grid replace the params' tune.grid; the flow's log says what was left out
    cfg, notes = command_line_sweep(cfg, sets, grid)
    for note in notes:
        print(note)
    with clock("tune"):
        sweep = tune_sweep(cfg, root, address)
    summary = {
        "data_hash": data,
        "sweep": sweep.name,
        "metric": sweep.metric,
        "failed_trials": sweep.failed,
        "reports": sweep.reports,
        "parent_run_id": sweep.parent_run_id,
    }
    best = sweep.best
    if best:
        keys = ("trial_id", *sweep.axes, "num_stages", "num_kernels", "seed", "value")
        summary["best"] = {k: best.get(k) for k in keys}
        if register_best and best.get("checkpoint"):
            with clock("registry"):
                decision = promote_model(cfg, root, best["checkpoint"])
            summary.update(
                model=decision.model,
                version=decision.version,
                decision=decision.decision,
                reason=decision.reason,
            )
    summary["stage_s"] = {k: round(v, 1) for k, v in times.items()}
    _publish("ablate-knet-summary", "ablate-knet", summary)
    return summary


def _links(cfg, root: str, run_id: str | None, decision: Promotion) -> dict[str, str]:
    """The MLflow UI pages of the training run and of the registered version."""
    from knet.config import resolve_uri
    from knet.tracking import run_address, ui_address

    if not cfg.tracking.enabled:
        return {}
    uri = resolve_uri(cfg.tracking.uri, Path(root).resolve())
    links = {
        "model_version_page": ui_address(
            uri, f"models/{decision.model}/versions/{decision.version}"
        )
    }
    if run_id:
        links["mlflow_run_page"] = run_address(uri, run_id)
    return links


def _prepare(params: str, items: list[str], root: str, address: str | None, clock: _Clock):
    """The flows' first stages: load the params, check the services, prepare the data (DVC).

    Returns the config and the prepared data's DVC hash.
    """
    with clock("params"):
        cfg = load_params(str(check_params(params, root)), items)
        if cfg.tracking.enabled:  # tracking_uri, overrides and the params file all end here
            check_tracking_uri(cfg.tracking.uri, root)
    with clock("services"):
        check_services(cfg, root, address)
    with clock("prepare"):
        data = prepare_data(root)
    return cfg, data


class _Clock:
    """``with clock("train"):`` adds the block's seconds to ``times["train"]``."""

    def __init__(self, times: dict[str, float]) -> None:
        self.times = times

    def __call__(self, name: str):
        self.name = name
        return self

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.times[self.name] = self.times.get(self.name, 0.0) + time.perf_counter() - self.start


def _publish(key: str, title: str, summary: dict[str, Any]) -> None:
    """Log the summary and publish it as a markdown artifact (a two-column table)."""
    rows = "\n".join(f"| {k} | {_cell(v)} |" for k, v in summary.items())
    markdown = f"# {title}\n\n| item | value |\n|---|---|\n{rows}\n"
    create_markdown_artifact(markdown=markdown, key=key, description=f"{title} summary")
    get_run_logger().info("%s summary: %s", title, summary)


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "/")
