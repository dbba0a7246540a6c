"""``knet tune``: the paper's Table 4 as one Ray Tune sweep over any config keys
(``tune.grid`` / ``--grid``; the params' default varies the update rounds, the kernel count and
the kernel update one at a time, Tables 4a, 4c, 4d; rounds x kernels without a grid).

:func:`tune` (checks, Ray, the sweep's parent MLflow run, restore or start) -> a Ray Tune
``Tuner`` over :func:`trial_driver` (one trial per grid point: the Tune-over-Train V2 pattern,
building **the TorchTrainer of** ``knet train`` through
:func:`knet.training.build_trainer`, with a ``TuneReportCallback``) ->
:func:`knet.training.train_loop_per_worker` -> :mod:`knet.experiments.ablation`
(``reports/ablation.{csv,md,png}``, logged to the parent run).

The sweep's name is derived from the params and from knet's source, so rerunning the same
command after a crash restores the sweep (``Tuner.restore``): finished trials are not rerun,
failed and unfinished ones are, and each resumes its Train run from its last checkpoint (the
Train run is named after the Tune trial id).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from knet.config import Config, ConfigError, absolute_paths, apply_override, config_from_dict
from knet.data.categories import Categories
from knet.experiments.ablation import (
    REPORT_FILES,
    check_reports,
    format_value,
    hashable,
    reference_cell,
    write_reports,
)
from knet.io import write_json_atomic
from knet.training import (
    TrainSetupError,
    build_trainer,
    check_inputs,
    check_placement,
    connect,
    faults,
)

log = logging.getLogger(__name__)

SWEEP_FILE = "knet_sweep.json"  # <storage>/<name>/: what the sweep was started with
TRIALS_DIR = "knet_trials"  # <storage>/<name>/<dir>/<trial id>.json: timings, run ids
DRIVER_CPU = 0.0  # the trial driver only waits for its Train workers: it reserves memory, no CPU
DRIVER_RESOURCES = {"CPU": DRIVER_CPU, "memory": 64 * 2**20}
HEADLINE = {"panoptic": "val_pq", "instance": "val_ap", "semantic": "val_miou"}


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What ``knet tune`` did: the CLI prints it, the ablate flow and tests read it, and
    :func:`knet.io.dumps` writes it as JSON."""

    name: str
    path: str  # the sweep's folder under tune.storage_path (Ray Tune's state, trial records)
    axes: list[str]  # the swept keys
    rows: list[dict[str, Any]]  # one per trial: its point, seed, status, metric value, ...
    reports: dict[str, str]  # csv / md / png -> path
    best: dict[str, Any] | None  # the best finished trial's row (and checkpoint)
    metric: str
    failed: int  # trials that failed or did not finish
    parent_run_id: str | None
    restored: bool  # an earlier, interrupted run of the same sweep was continued
    seconds: float


def tune(
    cfg: Config,
    root: str | Path = ".",
    address: str | None = None,
) -> SweepResult:
    """Run (or restore) the ablation sweep of ``cfg.tune``; write and log its reports.

    Args:
        root: project root; relative paths in ``cfg`` are taken from here.
        address: a Ray cluster to join (``auto`` or ``host:port``); None starts a local one
            with the dashboard on 127.0.0.1:8265.

    Returns:
        The :class:`SweepResult`: name, path, rows (one per trial), reports, best trial,
        parent MLflow run id, failed trial count, seconds, and whether it was restored.
    """
    # Concurrent trials print look-alike epoch lines, which Ray's log deduplication would merge
    # (read when ray is first imported).
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    started = time.perf_counter()
    sweep = _plan(cfg, Path(root).resolve(), address)
    try:
        results, restored = _fit(sweep)
    except BaseException:
        if sweep.parent:
            sweep.parent.end("FAILED")
        raise
    rows = [_row(result, sweep) for result in results]
    return _report(sweep, rows, restored, time.perf_counter() - started)


@dataclasses.dataclass(frozen=True)
class PooledReport:
    """What ``knet tune --pool`` did: the trials of several sweeps as one report."""

    sources: list[str]  # the ablation.csv files read
    axes: list[str]
    rows: list[dict[str, Any]]
    reports: dict[str, str]  # csv / md / png -> path
    metric: str


def pool(cfg: Config, files: Sequence[str | Path], root: str | Path = ".") -> PooledReport:
    """One report over the trials of finished sweeps of the same grid, read from their
    ``ablation.csv``: more seeds per cell without rerunning any (e.g. the default sweep's seeds
    0-2 and a second sweep with ``train.seed=3 tune.seeds=5``). Nothing is trained; the cells,
    the reference cell and the metric are ``cfg``'s, as for the sweep itself.
    """
    from knet.experiments.ablation import pool_rows, read_rows

    root = Path(root).resolve()
    cfg = absolute_paths(cfg, root)
    axes, metric = grid_axes(cfg), metric_name(cfg)
    outputs = {(Path(cfg.tune.report_dir) / name).resolve() for name in REPORT_FILES}
    sources: dict[str, list[dict[str, Any]]] = {}
    for file in files:
        path = root / file
        if not path.is_file():
            raise FileNotFoundError(f"knet tune --pool {file}: no such file")
        if path.resolve() in outputs:
            raise ValueError(
                f"knet tune --pool {file}: the pooled report would replace it; pool into "
                "another folder (--set tune.report_dir=reports/pooled)"
            )
        rows = read_rows(path)
        other = sorted({str(r.get("metric")) for r in rows} - {metric})
        if other:
            raise ValueError(f"{file}: its trials are scored by {other[0]}, not {metric}")
        sources[str(file)] = rows
    check_reports(cfg.tune.report_dir)  # before anything is written
    rows = pool_rows(sources, axes)
    seeds = ", ".join(str(s) for s in sorted({r["seed"] for r in rows}))
    header = {
        "pooled from": "; ".join(f"`{name}` ({len(r)} trials)" for name, r in sources.items()),
        "metric": f"{metric} ({cfg.tune.mode})",
        "grid": grid_text(axes) + f"; seeds {seeds}",
    }
    reports = write_reports(
        rows,
        cfg.tune.report_dir,
        metric=metric,
        axes=axes,
        reference=reference_cell(axes, base_values(cfg, axes)),
        header=header,
        design=cfg.tune.design,
    )
    return PooledReport(
        sources=list(sources),
        axes=list(axes),
        rows=rows,
        reports={k: str(v) for k, v in reports.items()},
        metric=metric,
    )


@dataclasses.dataclass
class _Sweep:
    """What a sweep runs, computed once: its config, grid, trials' configs, Ray and MLflow."""

    cfg: Config  # paths absolute
    name: str
    metric: str
    axes: dict[str, tuple[Any, ...]]
    grid: dict[tuple[Any, ...], dict[str, Any]]  # (cell..., seed) -> point
    trial_cfgs: dict[tuple[Any, ...], Config]
    folder: Path
    state: dict[str, Any]  # SWEEP_FILE: digest, params, lineage tags, parent run id
    concurrency: int
    parent: Any  # the parent MLflow run's tracker, or None

    @property
    def epochs(self) -> int:
        return next(iter(self.trial_cfgs.values())).train.epochs

    @property
    def early(self) -> str:
        """The status of a trial that ran fewer epochs: ASHA stopped it, or it was cut off."""
        return "stopped" if self.cfg.tune.scheduler == "asha" else "unfinished"

    @functools.cached_property
    def parameters(self) -> dict[tuple[Any, ...], int]:
        return parameter_counts(self.cfg, self.grid)

    @functools.cached_property
    def by_name(self) -> dict[str, dict[str, Any]]:
        """Each point by its trial name (a trial that never ran has only its folder's name)."""
        return {_point_name(point): point for point in self.grid.values()}


def _plan(cfg: Config, root: Path, address: str | None) -> _Sweep:
    """Check everything before any work, start Ray and the parent run, record the sweep."""
    params_hash = cfg.digest()
    digest = sweep_digest(cfg)  # of the params as written, before paths are made absolute
    name = cfg.tune.name or default_sweep_name(cfg, digest)
    cfg = absolute_paths(cfg, root)
    if cfg.train.num_workers < 1:
        raise TrainSetupError("knet tune needs Ray Train workers: set train.num_workers >= 1")
    axes = grid_axes(cfg)
    grid = grid_points(cfg, axes)
    trial_cfgs = {key: trial_config(cfg, point, Path()) for key, point in grid.items()}
    check_inputs(cfg)
    check_reports(cfg.tune.report_dir)  # before hours of trials, not after them
    folder = Path(cfg.tune.storage_path) / name
    state = _sweep_state(folder, name, digest, cfg, root)
    connect(address, dashboard=True)
    first = next(iter(trial_cfgs.values()))  # the resources of every trial are the same
    check_placement(first)
    concurrency = concurrent_trials(first, cfg.tune.max_concurrent_trials)
    parent = _start_parent_run(cfg, name, state, root, params_hash)
    state["parent_run_id"] = parent.run_id if parent else None
    write_json_atomic(folder / SWEEP_FILE, state, indent=2)
    metric = metric_name(cfg)
    _print_start(name, folder, len(grid), concurrency, metric)
    if parent:
        from knet.tracking import run_address

        info = parent.run.info
        log.info("  MLflow: %s", run_address(cfg.tracking.uri, info.run_id, info.experiment_id))
    return _Sweep(cfg, name, metric, axes, grid, trial_cfgs, folder, state, concurrency, parent)


def _fit(sweep: _Sweep):
    """Ray Tune's results of every trial, and whether an earlier run of the sweep was restored."""
    from ray import tune as ray_tune

    cfg = sweep.cfg
    payload = {
        "config": cfg.to_dict(),
        "sweep_dir": str(sweep.folder),
        "tags": {
            **sweep.state["tags"],
            "knet.sweep": sweep.name,
            **({"mlflow.parentRunId": sweep.parent.run_id} if sweep.parent else {}),
        },
        # tests only (knet.training.faults): per grid point, {} in every normal run
        "faults": faults.from_environment().get("trials", []),
        "source": source_digest(),
    }
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(trial_driver, payload=payload), DRIVER_RESOURCES
    )
    if ray_tune.Tuner.can_restore(str(sweep.folder)):
        log.info("restoring sweep %s: finished trials are kept, the rest run", sweep.name)
        tuner = ray_tune.Tuner.restore(
            str(sweep.folder), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
        return tuner.fit(), True
    tuner = ray_tune.Tuner(
        trainable,
        param_space=param_space(sweep.grid),
        tune_config=ray_tune.TuneConfig(
            metric=sweep.metric,
            mode=cfg.tune.mode,
            scheduler=_scheduler(cfg, sweep.epochs),
            max_concurrent_trials=sweep.concurrency,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=ray_tune.RunConfig(
            name=sweep.name,
            storage_path=cfg.tune.storage_path,
            failure_config=ray_tune.FailureConfig(max_failures=cfg.tune.max_failures),
            verbose=1,
        ),
    )
    return tuner.fit(), False


def _report(sweep: _Sweep, rows: list[dict], restored: bool, seconds: float) -> SweepResult:
    """Write the reports, log them to the parent run, and return the sweep's summary."""
    cfg, axes, tags = sweep.cfg, sweep.axes, sweep.state["tags"]
    design = "" if cfg.tune.design == "product" else " (one at a time around the params' values)"
    parent_id = sweep.parent.run_id if sweep.parent else None
    header = {
        "sweep": f"`{sweep.name}` ({'restored' if restored else 'new'}, "
        f"{sweep.concurrency} trial(s) at once)",
        "metric": f"{sweep.metric} ({cfg.tune.mode}), scheduler {cfg.tune.scheduler}",
        "time": f"{seconds:.0f} s wall in this invocation (trial times below include earlier ones)"
        if restored
        else _time_split(rows, seconds, sweep.concurrency),
        "grid": grid_text(axes)
        + design
        + f"; seeds {', '.join(str(p['seed']) for p in _seed_points(sweep.grid))}",
        "per trial": ", ".join(cfg.tune.overrides) or "the params as they are",
        "data": tags.get("data_hash", "?"),
        "commit": f"{tags.get('git_commit', '?')} (dirty: {tags.get('git_dirty', '?')})",
        "MLflow parent run": parent_id or "tracking disabled",
    }
    reports = write_reports(
        rows,
        cfg.tune.report_dir,
        metric=sweep.metric,
        axes=axes,
        reference=reference_cell(axes, base_values(cfg, axes)),
        header=header,
        design=cfg.tune.design,
    )
    best = _best(rows, cfg.tune.mode)
    failed = sum(r["status"] in ("error", "unfinished") for r in rows)
    if sweep.parent:
        _finish_parent(sweep.parent, rows, reports, best, sweep.metric, seconds, failed)
    return SweepResult(
        name=sweep.name,
        path=str(sweep.folder),
        axes=list(axes),
        rows=rows,
        reports={k: str(v) for k, v in reports.items()},
        best=best,
        metric=sweep.metric,
        failed=failed,
        parent_run_id=parent_id,
        restored=restored,
        seconds=round(seconds, 1),
    )


# ------------------------------------------------------------------------ the grid


def metric_name(cfg: Config) -> str:
    return cfg.tune.metric or HEADLINE[cfg.model.task]


def sweep_digest(cfg: Config) -> str:
    """The sweep's identity: a digest of the params and of knet's source."""
    return hashlib.sha256(f"{cfg.digest()}:{source_digest()}".encode()).hexdigest()[:12]


def default_sweep_name(cfg: Config, digest: str | None = None) -> str:
    """``ablation-<task>-<sweep digest>``."""
    return f"ablation-{cfg.model.task}-{digest or sweep_digest(cfg)}"


def source_digest() -> str:
    """Hash of knet's Python source: a code change starts a new sweep instead of mixing."""
    package = Path(__file__).resolve().parents[1]  # knet/, not only knet/experiments/
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# Grid keys that the trials' names, rows and MLflow params also give a short name.
SHORT_KEYS = {"model.num_stages": "num_stages", "model.num_kernels": "num_kernels"}
NAME_PREFIX = {"model.num_stages": "rounds", "model.num_kernels": "kernels"}


def grid_axes(cfg: Config) -> dict[str, tuple[Any, ...]]:
    """The sweep's axes: dotted key -> values, from ``tune.grid`` or rounds x kernels.

    Every value is checked by building a trial's config with it, so a wrong key or value fails
    before Ray starts, naming ``tune.grid[i]``.
    """
    items = cfg.tune.grid or (
        f"model.num_stages={','.join(map(str, cfg.tune.num_stages))}",
        f"model.num_kernels={','.join(map(str, cfg.tune.num_kernels))}",
    )
    overridden = {o.partition("=")[0].strip() for o in cfg.tune.overrides}
    axes: dict[str, tuple[Any, ...]] = {}
    for i, item in enumerate(items):
        where = f"tune.grid[{i}]" if cfg.tune.grid else "tune.num_stages / tune.num_kernels"
        key, _, raw = item.partition("=")
        key = key.strip()
        if key in axes:
            raise ConfigError(f"{where}: {key} is listed twice")
        if key == "train.seed":
            raise ConfigError(f"{where}: seeds are tune.seeds (train.seed, train.seed + 1, ...)")
        if key in overridden:
            raise ConfigError(f"{where}: {key} is also set by tune.overrides; keep one of them")
        try:
            values = yaml.safe_load(f"[{raw}]")
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: values {raw!r} are not valid YAML: {err}") from None
        if not values:
            raise ConfigError(f"{where}: {key} must list at least one value")
        if len({repr(hashable(v)) for v in values}) != len(values):
            raise ConfigError(f"{where}: {key} lists a value twice: {values}")
        for value in values:
            data = cfg.to_dict()
            try:
                apply_override(data, f"{key}={_yaml_value(value)}")
                config_from_dict(data)
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
        axes[key] = tuple(values)
    return axes


def grid_text(axes: dict[str, tuple[Any, ...]]) -> str:
    """The axes as the reports' header shows them: ``key = v1, v2; key = ...``."""
    return "; ".join(f"{k} = {', '.join(map(format_value, v))}" for k, v in axes.items())


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def grid_points(
    cfg: Config, axes: dict[str, tuple[Any, ...]] | None = None
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Every (axis values..., seed) of the sweep, in table order; the point holds the dotted
    keys and ``seed``. The cells are ``tune.design``'s: every combination of the axes, or the
    reference cell and each axis varied alone around it. ``axes``: :func:`grid_axes`, when
    the caller has them already."""
    axes = axes if axes is not None else grid_axes(cfg)
    seeds = [cfg.train.seed + i for i in range(cfg.tune.seeds)]
    points = {}
    for cell in sweep_cells(cfg, axes):
        originals = dict(zip(axes, _originals(axes, cell), strict=True))
        for seed in seeds:
            points[(*cell, seed)] = {**originals, "seed": seed}
    return points


def sweep_cells(cfg: Config, axes: dict[str, tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The cells of ``tune.design``; one at a time needs the params' value in every axis."""
    from knet.experiments.ablation import design_cells

    base = base_values(cfg, axes)
    if cfg.tune.design == "one_at_a_time":
        for i, (key, values) in enumerate(axes.items()):
            if hashable(base[key]) not in [hashable(v) for v in values]:
                where = f"tune.grid[{i}]" if cfg.tune.grid else f"tune.{SHORT_KEYS[key]}"
                raise ConfigError(
                    f"{where}: tune.design one_at_a_time varies {key} around the params' own "
                    f"value, {format_value(base[key])}, which the values "
                    f"{', '.join(map(format_value, values))} do not list"
                )
    return design_cells(axes, cfg.tune.design, reference_cell(axes, base))


def _originals(axes: dict[str, tuple[Any, ...]], cell: tuple[Any, ...]) -> list[Any]:
    """The axis values as written (lists stay lists) for a cell of hashable values."""
    return [
        next(v for v in values if hashable(v) == c)
        for values, c in zip(axes.values(), cell, strict=True)
    ]


def _seed_points(grid: dict[tuple[Any, ...], dict[str, Any]]) -> list[dict[str, Any]]:
    first = next(iter(grid.values()))
    return [p for p in grid.values() if all(p[k] == first[k] for k in first if k != "seed")]


def base_values(cfg: Config, axes: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    """The params' own value (after ``tune.overrides``) of every axis key: the reference cell."""
    data = cfg.to_dict()
    for item in cfg.tune.overrides:
        apply_override(data, item)
    values = {}
    for key in axes:
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        values[key] = node
    return values


def param_space(grid: dict[tuple[Any, ...], dict[str, Any]]) -> dict[str, Any]:
    """Tune's grid from the sweep's points (:func:`grid_points`): one ``cell`` (its dotted keys
    and values) per cell of the design, x seeds."""
    from ray import tune as ray_tune

    cells: dict[tuple[Any, ...], dict[str, Any]] = {}
    seeds: dict[int, None] = {}
    for key, point in grid.items():
        cells.setdefault(key[:-1], {k: v for k, v in point.items() if k != "seed"})
        seeds.setdefault(point["seed"])
    return {
        "cell": ray_tune.grid_search(list(cells.values())),
        "seed": ray_tune.grid_search(list(seeds)),
    }


def point_of(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's grid point from its Tune config: the cell's dotted keys and ``seed``."""
    return {**config.get("cell", {}), "seed": config["seed"]}


def _full_point(point: dict[str, Any]) -> dict[str, Any]:
    """``point`` with the short names (``num_stages``, ``num_kernels``) as dotted keys."""
    full = dict(point)
    for dotted, short in SHORT_KEYS.items():
        if short in full:
            full.setdefault(dotted, full.pop(short))
    return full


def explicit_overrides_win(cfg: Config, overrides: list[str]) -> tuple[Config, list[str]]:
    """``cfg`` without the ``tune.overrides`` items whose key ``overrides`` (``--set``) sets.

    ``tune.overrides`` are applied to every trial after the params, so without this a
    ``knet tune --set train.epochs=1`` was silently undone by the sweep's ``train.epochs=5``.
    Returns the config and the items dropped.
    """
    explicit = {item.partition("=")[0].strip() for item in overrides}
    kept = [o for o in cfg.tune.overrides if o.partition("=")[0].strip() not in explicit]
    dropped = [o for o in cfg.tune.overrides if o not in kept]
    if not dropped:
        return cfg, []
    tune_cfg = dataclasses.replace(cfg.tune, overrides=type(cfg.tune.overrides)(kept))
    return dataclasses.replace(cfg, tune=tune_cfg), dropped


ROUNDS_BY_KERNELS = ("tune.num_stages", "tune.num_kernels")


def command_line_sweep(
    cfg: Config, sets: list[str], grid: list[str] | None = None
) -> tuple[Config, list[str]]:
    """The sweep a command line asks for: ``--set`` items (``sets``, already in ``cfg``) and
    ``--grid`` items on top of the params. Returns the config and a line per thing of the
    params it left out, for the command to print; nothing is left out silently.

    - A key of ``sets`` or ``grid`` wins over the same key in ``tune.overrides``.
    - ``grid`` replaces the params' ``tune.grid``, and ``tune.num_stages`` / ``tune.num_kernels``
      in ``sets`` (without ``tune.grid``) sweep rounds x kernels instead of it.
    - Either way the cells are the product of the values (a grid, as Ray's ``grid_search``)
      unless ``sets`` choose ``tune.design``.
    """
    grid = list(grid or [])
    cfg, dropped = explicit_overrides_win(cfg, [*sets, *grid])
    notes = [f"--set / --grid win over tune.overrides: not applying {', '.join(dropped)}"]
    notes = notes if dropped else []
    keys = {item.partition("=")[0].strip() for item in sets}
    shorthand = sorted(keys & set(ROUNDS_BY_KERNELS))
    if grid:
        new_grid = tuple(grid)
    elif shorthand and "tune.grid" not in keys and cfg.tune.grid:
        new_grid = ()
        notes.append(
            f"{' and '.join(shorthand)} given: sweeping rounds x kernels instead of the params' "
            f"tune.grid ({'; '.join(cfg.tune.grid)})"
        )
    else:
        return cfg, notes
    design = cfg.tune.design if "tune.design" in keys else "product"
    if design != cfg.tune.design:
        notes.append(
            f"a grid from the command line runs every combination (tune.design {design}, not "
            f"the params' {cfg.tune.design}; --set tune.design={cfg.tune.design} to keep it)"
        )
    tune_cfg = dataclasses.replace(cfg.tune, grid=new_grid, design=design)
    return dataclasses.replace(cfg, tune=tune_cfg), notes


def trial_config(cfg: Config, point: dict[str, Any], sweep_dir: Path) -> Config:
    """``cfg`` with ``tune.overrides``, the grid point, and validation at every epoch.

    ``point`` holds dotted keys (``num_stages`` / ``num_kernels`` name the model's) and
    ``seed``. Every trial validates each epoch because Tune's schedulers compare trials at each
    report; its Train runs live under ``<sweep>/train``.
    """
    point = _full_point(point)
    data = cfg.to_dict()
    for i, item in enumerate(cfg.tune.overrides):
        key = item.partition("=")[0].strip()
        if key == "train.seed" or (key in point and key != "seed"):
            raise ConfigError(f"tune.overrides[{i}] sets {key}, which the sweep's grid sets")
        try:
            apply_override(data, item)
        except ConfigError as err:
            raise ConfigError(f"tune.overrides[{i}]: {err}") from None
    for key, value in point.items():
        if key != "seed":
            apply_override(data, f"{key}={_yaml_value(value)}")
    data["train"].update(seed=point["seed"], eval_every=1, storage_path=str(sweep_dir / "train"))
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"tune.overrides: {err}") from None


def concurrent_trials(cfg: Config, limit: int = 0) -> int:
    """``limit`` (``tune.max_concurrent_trials``), or as many trials of ``cfg``'s resources as
    the cluster can place at once."""
    import ray

    if limit:
        return limit
    total = ray.cluster_resources()
    per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker + DRIVER_CPU
    count = int(total.get("CPU", 0) / per_trial + 1e-9)
    if cfg.train.use_gpu:
        count = min(count, int(total.get("GPU", 0)) // cfg.train.num_workers)
    return max(1, count)


def parameter_counts(cfg: Config, grid) -> dict[tuple[Any, ...], int]:
    """Parameters per cell (the grid keys without the seed), with the train split's classes."""
    from knet.model import build_model

    index = Path(cfg.data.prepared) / cfg.data.train_split / "index.json"
    cats = Categories.from_json(json.loads(index.read_text())["categories"])
    counts = {}
    for key, point in grid.items():
        cell = key[:-1]
        if cell not in counts:
            model_cfg = trial_config(cfg, point, Path()).model
            model = build_model(model_cfg, cats.num_things, cats.num_stuff)
            counts[cell] = sum(p.numel() for p in model.parameters())
    return counts


def trial_name(trial) -> str:
    return _point_name(point_of(trial.config))


def _point_name(point: dict[str, Any]) -> str:
    """``rounds3-kernels16-seed0``; other keys as ``<last part>=<value>``."""
    parts = []
    for key, value in _full_point(point).items():
        if key == "seed":
            continue
        text = format_value(value)
        parts.append(
            f"{NAME_PREFIX[key]}{text}"
            if key in NAME_PREFIX
            else f"{key.rsplit('.', 1)[-1]}={text}"
        )
    name = "-".join([*parts, f"seed{point['seed']}"])
    return "".join(ch if ch.isalnum() or ch in "-_.=," else "_" for ch in name)


def trial_dirname(trial) -> str:
    return f"{trial.trial_id}-{trial_name(trial)}"


def _scheduler(cfg: Config, epochs: int):
    """Tune's scheduler for trials of ``epochs`` epochs (None: FIFO)."""
    if cfg.tune.scheduler == "fifo":
        return None  # Tune's FIFO: every trial runs to the end
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        max_t=epochs,
        grace_period=min(cfg.tune.grace_period, epochs),
        reduction_factor=cfg.tune.reduction_factor,
    )


# ---------------------------------------------------------------------- one trial


def trial_driver(config: dict[str, int], payload: dict[str, Any]) -> None:
    """One Tune trial: the Ray Train driver of one grid point (runs in a Tune actor).

    Builds the TorchTrainer of ``knet train`` with a ``TuneReportCallback`` (every epoch's
    rank-0 metrics and checkpoint path reach Tune), runs it, and writes the trial's timings.
    """
    began = time.perf_counter()
    if source_digest() != payload["source"]:
        # A trial that starts later imports knet afresh: had the code under the sweep been
        # edited, its cells would silently mix two versions of the code.
        raise RuntimeError(
            "knet's source changed since this sweep started; its trials would mix two versions "
            "of the code. Rerun the same command: a changed source starts a new sweep"
        )
    from ray import tune as ray_tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray_tune.get_context().get_trial_id()
    sweep_dir = Path(payload["sweep_dir"])
    point = point_of(config)
    cfg = trial_config(config_from_dict(payload["config"]), point, sweep_dir)
    short = {"num_stages": cfg.model.num_stages, "num_kernels": cfg.model.num_kernels}
    names = {**point, **short}
    loop_config = {
        "config": cfg.to_dict(),
        "run_name": _point_name(point),
        "tags": {**payload["tags"], "knet.trial_id": trial_id, "knet.grid": ",".join(point)},
        # The config's params are logged with dotted keys; these short ones ease the UI's
        # chart view (num_stages, num_kernels, seed are columns of every sweep).
        "extra_params": {**{k: str(v) for k, v in short.items()}, "seed": str(point["seed"])},
        "kernel_maps": False,
        "label": _point_name(point),
        # No progress bars: several trials' bars, 10 lines a second each streamed through
        # Ray's log monitor to this driver, cost the trials CPU; the epoch lines remain.
        "progress": False,
        "faults": faults.for_trial(payload["faults"], names),
    }
    trainer = build_trainer(loop_config, cfg, f"trial-{trial_id}", [TuneReportCallback()])
    fit_began = time.perf_counter()
    result = trainer.fit()  # raises after train.max_failures restarts; Tune then retries
    fit_s = time.perf_counter() - fit_began
    if result.error is not None:
        raise result.error
    summary = result.return_value or {}
    timings = dict(summary.get("timings", {}))
    timings.update(fit_s=round(fit_s, 2), driver_s=round(time.perf_counter() - began, 2))
    timings["ray_train_s"] = round(fit_s - timings.get("loop_s", fit_s), 2)
    record = {
        "trial_id": trial_id,
        "point": point,
        "timings": timings,
        "mlflow_run_id": summary.get("mlflow_run_id"),
        "worker_nodes": summary.get("worker_nodes"),
    }
    write_json_atomic(sweep_dir / TRIALS_DIR / f"{trial_id}.json", record, indent=2)


# ------------------------------------------------------------------------ results


def _row(result, sweep: _Sweep) -> dict:
    """One trial's row of the reports: its point, status, metrics, timings and run ids."""
    if result.config:
        config = point_of(result.config)
    else:  # the trial never ran: its folder is <trial id>-<point name> (trial_dirname)
        config = sweep.by_name[Path(result.path).name.partition("-")[2]]
    axes, metric, sweep_dir = sweep.axes, sweep.metric, sweep.folder
    cell = tuple(hashable(config[k]) for k in axes)
    trial_cfg = sweep.trial_cfgs[(*cell, config["seed"])]
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or Path(result.path).name.split("-")[0]
    record_path = sweep_dir / TRIALS_DIR / f"{trial_id}.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    timings = record.get("timings", {})
    history = result.metrics_dataframe
    speeds = []
    if history is not None and "images_per_s" in history:
        speeds = [float(v) for v in history["images_per_s"].dropna()]
    checkpoint = metrics.get("checkpoint_path")
    value = metrics.get(metric)
    status = "finished"
    if result.error is not None:
        status = "error"
    elif (metrics.get("epoch") or 0) < sweep.epochs:
        status = sweep.early
    row = {
        "trial_id": trial_id,
        "status": status,
        **{key: config[key] for key in axes},
        "num_stages": trial_cfg.model.num_stages,
        "num_kernels": trial_cfg.model.num_kernels,
        "seed": config["seed"],
        "epochs": metrics.get("epoch"),
        "metric": metric,
        "value": float(value) if isinstance(value, int | float) else math.nan,
        # the value's 95% bootstrap interval over validation images (PQ and mIoU metrics)
        "value_low": metrics.get(f"{metric}_low", math.nan),
        "value_high": metrics.get(f"{metric}_high", math.nan),
        "params": sweep.parameters.get(cell),
        "images_per_s": statistics.fmean(speeds) if speeds else math.nan,
        "trial_s": timings.get("driver_s", math.nan),
        "mlflow_run_id": record.get("mlflow_run_id"),
        "checkpoint": str(Path(checkpoint) / "model.pt") if checkpoint else None,
        "error": _first_line(result.error) if result.error is not None else None,
    }
    for key in ("val_pq", "val_pq_th", "val_pq_st", "val_sq", "val_rq", "val_ap", "val_miou"):
        row[key] = metrics.get(key, math.nan)
    for key in ("epochs_s", "ray_train_s", "setup_s", "tracking_s", "driver_s"):
        row[key] = timings.get(key, math.nan)
    return row


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]


def _best(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    done = [r for r in rows if r["status"] != "error" and math.isfinite(r["value"])]
    if not done:
        return None
    pick = max if mode == "max" else min
    return pick(done, key=lambda r: r["value"])


# -------------------------------------------------------------- sweep bookkeeping


def _sweep_state(
    sweep_dir: Path, name: str, digest: str, cfg: Config, root: Path
) -> dict[str, Any]:
    """The sweep's record; refuses a ``tune.name`` reused with other params or code."""
    from knet.tracking import lineage_tags

    path = sweep_dir / SWEEP_FILE
    if path.exists():
        state = json.loads(path.read_text())
        if state.get("digest") != digest:
            raise TrainSetupError(
                f"tune.name={name}: the sweep in {sweep_dir} was started with other params or "
                f"code (digest {state.get('digest')}, now {digest}); choose another tune.name, "
                f"leave it empty for a derived one, or remove {sweep_dir}"
            )
        return state
    tags = lineage_tags(cfg, root) if cfg.tracking.enabled else {}
    return {"name": name, "digest": digest, "tags": tags, "parent_run_id": None}


def _start_parent_run(cfg: Config, name: str, sweep: dict[str, Any], root: Path, params_hash):
    if not cfg.tracking.enabled:
        return None
    from knet.tracking import Tracker, flatten, system_info

    tags = {**sweep["tags"], "params_hash": params_hash, "knet.sweep": name, **system_info()}
    parent = Tracker(cfg.tracking, name, run_id=sweep.get("parent_run_id"), tags=tags)
    parent.log_params(flatten(cfg.to_dict()))
    return parent


def _finish_parent(parent, rows, reports, best, metric: str, seconds: float, failed: int) -> None:
    metrics = {
        "trials": len(rows),
        "trials_failed": failed,
        "sweep_s": seconds,
        "trial_s_mean": _mean(rows, "trial_s"),
        "epochs_s_mean": _mean(rows, "epochs_s"),
    }
    if best:
        metrics[f"best_{metric}"] = best["value"]
        parent.set_tags(
            {"best_trial": best["trial_id"], "best_run_id": str(best.get("mlflow_run_id"))}
        )
    parent.log_metrics(metrics, step=0)
    # Attempts that never closed their run (a killed worker, a trial the scheduler stopped).
    parent.close_children(status="KILLED")
    for path in reports.values():
        parent.log_artifact(path, "ablation")
    parent.end("FAILED" if failed else "FINISHED")


def _time_split(rows: list[dict[str, Any]], seconds: float, concurrency: int) -> str:
    """The sweep's wall time against the time spent inside trial drivers."""
    inside = sum(r["trial_s"] for r in rows if math.isfinite(r["trial_s"]))
    training = sum(r["epochs_s"] for r in rows if math.isfinite(r["epochs_s"]))
    outside = seconds - inside / concurrency
    return (
        f"{seconds:.0f} s wall; inside the trial drivers {inside:.0f} s, of which training and "
        f"validation {training:.0f} s; outside them (Ray start, Tune scheduling and state, the "
        f"parent run, reports) {outside:.0f} s with {concurrency} trial(s) at once"
    )


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows if isinstance(r.get(key), int | float)]
    values = [v for v in values if math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def _print_start(name: str, sweep_dir: Path, trials: int, concurrency: int, metric: str) -> None:
    try:  # the public API has no getter; ray.init's context is gone once Ray runs
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
    except (ImportError, AttributeError, RuntimeError):
        url = ""
    log.info(
        "sweep %s: %d trials, %d at once, metric %s\n  Tune folder: %s (tensorboard --logdir %s)",
        name,
        trials,
        concurrency,
        metric,
        sweep_dir,
        sweep_dir,
    )
    if url:
        log.info("  Ray dashboard: http://%s", url)


__all__ = [
    "base_values",
    "default_sweep_name",
    "grid_axes",
    "grid_points",
    "command_line_sweep",
    "trial_config",
    "trial_driver",
    "tune",
]
