"""``knet train``: K-Net on Ray Train (V2): DDP workers, checkpoints, resume, MLflow.

One function per step of the paper-free plumbing:
:func:`train` (the stage: checks, Ray, fit, final checkpoint) -> :func:`build_trainer`
(shared with ``knet tune``) -> :func:`train_loop_per_worker` (every worker) ->
:func:`knet.engine.train_one_epoch` (shared with the plain loop).

Run names are deterministic (``train.run_name`` or the params digest), so rerunning the same
command resumes from the latest checkpoint in ``train.storage_path``; a crashed worker group
restarts from it (``train.max_failures``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from knet.checkpoint import check_checkpoint_output, load_checkpoint, save_checkpoint
from knet.config import Config, absolute_paths, config_from_dict
from knet.data.dataset import build_dataset, build_loader
from knet.data.prepare import scale_advice
from knet.engine import NonFiniteLossError, accelerate, train_one_epoch
from knet.evaluate import accumulate_metrics, summarize
from knet.io import write_json_atomic
from knet.losses import KNetCriterion
from knet.metrics import gather
from knet.model import build_model
from knet.optim import build_optimizer, build_scheduler
from knet.tracking import (
    TrackingUnreachableError,
    check_tracking_uri,
    flatten,
    lineage_tags,
    system_info,
)

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"


class TrainSetupError(ValueError):
    """A run that cannot start (bad inputs, unreachable cluster); raised before any work."""


class ServiceUnreachableError(TrainSetupError):
    """A Ray head or tracking server that does not answer (yet): worth retrying."""


# ------------------------------------------------------------------------------- the stage


def train(
    cfg: Config,
    root: str | Path = ".",
    run_name: str | None = None,
    address: str | None = None,
    test_hooks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` on Ray Train (or in-process with ``train.num_workers=0``).

    Args:
        root: project root; relative paths in ``cfg`` are taken from here.
        run_name: overrides ``train.run_name``; the same name resumes the same run.
        address: a Ray cluster to join (``auto`` or ``host:port``); None starts a local one.
        test_hooks: test-only fault injection, e.g. ``{"kill": {"rank": 1, "epoch": 1,
            "step": 2, "marker": "/tmp/x"}}`` (off in normal runs).

    Returns:
        A summary: run name, epochs, final metrics, checkpoint path, MLflow run id, seconds.
    """
    root = Path(root).resolve()
    params_hash = cfg.digest()  # of the params as written, before paths are made absolute
    run_name = run_name or cfg.train.run_name or default_run_name(cfg)
    cfg = absolute_paths(cfg, root)
    check_inputs(cfg)
    tags = lineage_tags(cfg, root, params_hash) if cfg.tracking.enabled else {}
    loop_config = {
        "config": cfg.to_dict(),
        "run_name": run_name,
        "tags": tags,
        "test_hooks": test_hooks or {},
    }
    start = time.perf_counter()
    if cfg.train.num_workers == 0:
        ctx = _Context(ray_worker=False)
        try:
            summary = train_loop_per_worker(loop_config, ctx)
        except NonFiniteLossError:
            if ctx.last_checkpoint:  # keep the last good checkpoint where DVC expects it
                publish(ctx.last_checkpoint, cfg)
            shutil.rmtree(ctx.local_dir, ignore_errors=True)
            raise
        scratch = ctx.local_dir
    else:
        summary = _train_on_ray(loop_config, cfg, run_name, address)
        scratch = Path(summary["checkpoint"]).parent if summary.get("checkpoint") else None
    try:
        if summary.get("checkpoint"):
            summary["checkpoint"] = publish(summary["checkpoint"], cfg)
    finally:
        if scratch is not None:  # temporary copies; the published one is at train.output
            shutil.rmtree(scratch, ignore_errors=True)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["run_name"] = run_name
    return summary


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


def _train_on_ray(
    loop_config: dict[str, Any], cfg: Config, run_name: str, address: str | None
) -> dict[str, Any]:
    connect(address)
    check_placement(cfg)
    trainer = build_trainer(loop_config, cfg, run_name)
    try:
        result = trainer.fit()
    except Exception as err:  # V2 raises TrainingFailedError after the retries
        raise RuntimeError(f"training run {run_name} failed: {err}{_hint(err, cfg)}") from err
    checkpoint = None
    if result.checkpoint is not None:
        folder = Path(tempfile.mkdtemp(prefix="knet-final-"))
        result.checkpoint.to_directory(str(folder))
        checkpoint = str(folder / CHECKPOINT_FILE)
    if result.error is not None:
        if checkpoint:  # keep the last good checkpoint where DVC expects it
            publish(checkpoint, cfg)
        raise result.error
    summary = dict(result.return_value or {})
    summary["checkpoint"] = checkpoint
    summary["ray_path"] = result.path
    return summary


def _hint(err: Exception, cfg: Config) -> str:
    """What to do next, for the failure a lost host leaves behind."""
    if "startup timed out" not in str(err):
        return ""
    return (
        f"\nknet: the cluster could not place the worker group (train.num_workers="
        f"{cfg.train.num_workers}): train.placement_retries={cfg.train.placement_retries} "
        f"further attempts of train.placement_timeout_s={cfg.train.placement_timeout_s:g} s "
        f"(counted over the whole run) are used up; a host may be gone. "
        f"The checkpoints in {cfg.train.storage_path} are intact: rerun the same command once "
        f"the resources are back and it resumes from the latest one, or set train.min_workers "
        f"to go on with fewer workers (elastic)."
    )


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
        metrics = Path(cfg.train.metrics)
        write_json_atomic(metrics, history[-1], indent=2)
        write_json_atomic(metrics.with_name(f"{metrics.stem}_history.json"), history, indent=1)
    return str(output)


# --------------------------------------------------------------------------- Ray plumbing


def connect(address: str | None, dashboard: bool = False) -> None:
    """Join ``address`` or start a local Ray instance sized to this machine.

    ``dashboard`` starts the local instance with the Ray dashboard on 127.0.0.1:8265 (``knet
    tune`` does: its State API also lets Ray Train clean up the placement group of a trial
    that a scheduler stops).
    """
    import ray

    if address and address != "auto":
        check_reachable(address)
    if ray.is_initialized():
        return
    # Ray Train V2 turns every print() of a worker into a log record and also tees it, so each
    # epoch line came twice and pycocotools' summary escaped redirect_stdout; plain prints.
    # The setup hook runs in every worker process of the job (Ray Train's placement-group
    # cleaner included) and silences its repeated State-API warning.
    runtime_env = {
        "env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"},
        "worker_process_setup_hook": "knet.train.quiet_ray_worker",
    }
    if dashboard or address:
        # The dashboard's Train tab (knet tune's local instance, a cluster's head) lists runs
        # and their workers only with Ray Train's state actor, which this variable turns on
        # (read where a trainer is built: the driver, Tune's trial drivers by the runtime env).
        runtime_env["env_vars"][STATE_TRACKING_VAR] = "1"
        os.environ.setdefault(STATE_TRACKING_VAR, "1")
    try:
        if address:  # a running cluster: its auth mode is the cluster's (RAY_AUTH_MODE, token)
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local default; see README.md
            # Auth is off, so nothing may listen beyond this machine: with this variable every
            # listener of the local instance (GCS, raylet, object manager) binds to 127.0.0.1.
            # It is read when Ray is imported (the driver's copy is set too) and when Ray's
            # processes start, so it is set only around ray.init.
            # One machine that knet started is never drained by a cluster manager, so Ray
            # Train's preemption watcher has nothing to watch there; its only output was a
            # core-worker error line per run about its constructor arguments. On a cluster
            # (address given) it stays on.
            runtime_env["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
            with _loopback_only():
                # No dashboard: on a 2-core laptop it cost 10-15 % of the training throughput.
                # Ray Train's placement-group cleaner then warns that the State API is
                # unavailable (quiet_ray_worker drops that); for the dashboard, start a head
                # (docs/cluster.md) and --address. address="local": always a new instance, never a
                # cluster that `ray start` left in /tmp/ray/ray_current_cluster (a stopped
                # head there made ray.init hang).
                ray.init(
                    address="local",
                    include_dashboard=dashboard,
                    dashboard_host="127.0.0.1",
                    log_to_driver=True,
                    runtime_env=runtime_env,
                )
    except ValueError as err:  # e.g. a job's runtime_env that clashes with knet's: not transient
        raise TrainSetupError(f"cannot join the Ray cluster at {address!r}: {err}") from None
    except (ConnectionError, RuntimeError) as err:
        raise ServiceUnreachableError(
            f"cannot connect to the Ray cluster at {address!r}: {err}"
        ) from None


STATE_TRACKING_VAR = "RAY_TRAIN_ENABLE_STATE_TRACKING"

# Ray's switch that binds every listener of a new local instance to 127.0.0.1.
LOCAL_ONLY_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Start Ray's processes with :data:`LOCAL_ONLY_VAR` off: node IP 127.0.0.1, so every
    listener binds to loopback (``tests/test_local_ray.py`` reads their sockets)."""
    from ray._private import ray_constants  # the driver read the variable at import

    settings = {LOCAL_ONLY_VAR: "0", **LOCAL_RAY_ENV}
    previous = {k: os.environ.get(k) for k in settings}, ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(settings)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous[1]
        for key, value in previous[0].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# The local instance starts no idle Python workers ahead of need: on a 2-core machine the
# prestarted ones took ~10 CPU-seconds while the training worker was starting.
LOCAL_RAY_ENV = {"RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0"}
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


class _DropStateApiWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "State API may be temporarily unavailable" not in record.getMessage()


def quiet_ray_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for knet's jobs.

    Without the dashboard (the local default), Ray Train's placement-group cleaner cannot ask
    the State API whether the controller lives and warns about it every few seconds: 578 of
    the 1,217 lines of a 3-epoch ``make pipeline``. Only that message is dropped.
    """
    logging.getLogger(PG_CLEANER_LOGGER).addFilter(_DropStateApiWarning())
    # Ray Train names this module's logger by its file path, so LoggingConfig's level does not
    # reach its "Reporting training result ..." line (one per epoch, the whole metrics dict).
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    # "Creating initial MLflow database tables..." / "Updating database tables" on every run.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A quick TCP check, because ``ray.init`` retries an unreachable head for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        raise ServiceUnreachableError(
            f"cannot connect to the Ray cluster at {address!r}: {err}. Start a head with "
            f"`ray start --head` or give --address auto / HOST:PORT of a running one"
        ) from None


def check_placement(cfg: Config) -> None:
    """Refuse, before any work, a worker group the cluster can never place.

    With ``train.placement_retries: -1`` (an autoscaling cluster, whose GPU nodes come up on
    demand) the run waits for the resources instead.
    """
    import ray

    if cfg.train.placement_retries < 0:
        return
    total = dict(ray.cluster_resources())
    # An autoscaling cluster (the launcher, KubeRay) can add nodes up to its config's maximum:
    # check against that, as Ray Train itself does, not against the nodes up right now.
    try:
        from ray._private.state import state as ray_state

        most = ray_state.get_max_resources_from_cluster_config() or {}
    except Exception:  # a private API: without it, the nodes up now are the bound
        most = {}
    for key, value in most.items():
        total[key] = max(total.get(key, 0), value)
    workers = cfg.train.min_workers or cfg.train.num_workers  # an elastic group may start small
    need_cpu = workers * cfg.train.cpus_per_worker
    need_gpu = workers if cfg.train.use_gpu else 0
    if need_cpu > total.get("CPU", 0) or need_gpu > total.get("GPU", 0):
        key = "min_workers" if cfg.train.min_workers else "num_workers"
        raise TrainSetupError(
            f"train.{key}={workers} x (train.cpus_per_worker="
            f"{cfg.train.cpus_per_worker}{', 1 GPU' if cfg.train.use_gpu else ''}) needs "
            f"{need_cpu:g} CPUs and {need_gpu} GPUs, but the cluster has "
            f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs"
        )


def build_trainer(
    loop_config: dict[str, Any], cfg: Config, run_name: str, callbacks: list | None = None
):
    """The TorchTrainer of a run (``knet tune`` builds the same one per trial)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # This run's value (a process may train several configs, e.g. a flow).
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(int(cfg.train.placement_timeout_s))
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    # (min, max) is Ray Train's elastic group: after a lost host it restarts on what fits.
    workers = cfg.train.num_workers
    if 0 < cfg.train.min_workers < workers:
        workers = (cfg.train.min_workers, cfg.train.num_workers)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=cfg.train.storage_path,
            # A worker group that cannot be placed (a fixed group after a lost host) is a
            # controller failure, which Ray retries forever by default: bound it.
            failure_config=FailureConfig(
                max_failures=cfg.train.max_failures,
                controller_failure_limit=cfg.train.placement_retries,
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            # Ray Train's INFO lines ("Reporting training result ...", "Checkpoint successfully
            # created ...") came twice per epoch; its warnings and errors still show.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


# ------------------------------------------------------------------------ every worker


def train_loop_per_worker(
    loop_config: dict[str, Any], ctx: _Context | None = None
) -> dict[str, Any]:
    """The training loop of one worker (Ray Train) or of the driver (``num_workers=0``).

    ``loop_config`` holds the config, the run name, MLflow tags (``knet tune`` adds the parent
    run's id), optional ``extra_params`` for MLflow, ``kernel_maps`` (log the kernel pictures at
    the end; default true), ``label`` (a prefix for the epoch lines) and test-only hooks.
    """
    began = time.perf_counter()
    cfg = config_from_dict(loop_config["config"])
    ctx = ctx or _Context(ray_worker=True)
    device = ctx.device(cfg)
    if ctx.ray_worker and device.type == "cpu":
        # Ray sets OMP_NUM_THREADS from the worker's CPUs; say it to torch explicitly too, so
        # a 2-CPU worker computes on 2 threads whatever the process inherited.
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
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
    ddp_model = ctx.prepare_model(model)
    criterion = KNetCriterion(cfg.loss, cfg.model.task, cats.num_things, cats.num_stuff)
    poisoned = _NaNAfter(criterion, loop_config.get("test_hooks", {}).get("nan_from_epoch"))
    # Where every rank runs (node id, host address), for the summary.
    placed = ctx.all_gather((ctx.node_id(), ctx.host()))
    tracking_began = time.perf_counter()
    tracker = _start_tracker(cfg, loop_config, state) if ctx.rank == 0 else None
    timings = {"tracking_s": time.perf_counter() - tracking_began}
    timings["setup_s"] = time.perf_counter() - began - timings["tracking_s"]
    try:
        run = _Run(
            cfg,
            model,
            ddp_model,
            poisoned,
            loader,
            optimizer,
            scheduler,
            val_set,
            cats,
            device,
            channels_last,
        )
        history, epoch_times = _epochs(run, ctx, state, loop_config, tracker)
    except BaseException:
        if tracker:
            tracker.end("FAILED")
        if ctx.ray_worker:  # Ray has the checkpoints in storage (the driver's loop keeps them)
            shutil.rmtree(ctx.local_dir, ignore_errors=True)
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
        _finish_tracker(tracker, model, val_set, cfg, cats, ctx, loop_config)
        timings["tracking_s"] += time.perf_counter() - finishing
    if ctx.ray_worker:  # Ray holds the checkpoints in storage; drop the local copies
        shutil.rmtree(ctx.local_dir, ignore_errors=True)
    timings["loop_s"] = time.perf_counter() - began
    summary["timings"] = {k: round(v, 2) for k, v in timings.items()}
    return summary


def resume_schedule(scheduler, epoch: int, iters_per_epoch: int) -> None:
    """Put a restored schedule at the start of ``epoch`` for this worker group's iterations.

    The schedule counts iterations, and an elastic group that changed size since the
    checkpoint has another number of them per epoch: without this, its LR steps would come
    late (fewer workers) or early (more).
    """
    if epoch:
        scheduler.last_epoch = epoch * iters_per_epoch


@dataclasses.dataclass
class _Run:
    """What one worker trains with: the config, the model (and its DDP wrapper), the data."""

    cfg: Config
    model: torch.nn.Module
    ddp_model: torch.nn.Module
    criterion: _NaNAfter
    loader: Any
    optimizer: Any
    scheduler: Any
    val_set: Any
    cats: Any
    device: torch.device
    channels_last: bool = False


def _epochs(
    run: _Run,
    ctx: _Context,
    state: dict[str, Any],
    loop_config: dict[str, Any],
    tracker,
) -> tuple[list[dict[str, Any]], list[float]]:
    """Train from the restored epoch to ``train.epochs``; report and checkpoint each one."""
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    history: list[dict[str, Any]] = state.get("history", [])
    bad_steps = state.get("bad_steps", 0)
    epoch_times: list[float] = []
    fail = loop_config.get("test_hooks", {}).get("fail")
    for epoch in range(state.get("epoch", 0), cfg.train.epochs):
        if fail and fail["epoch"] == epoch and Path(fail["while"]).exists():
            raise RuntimeError(f"test hook: failing at epoch {epoch} while {fail['while']} exists")
        start = time.perf_counter()
        ctx.set_epoch(run.loader, epoch)
        stats = train_one_epoch(
            run.ddp_model,
            run.criterion.at(epoch),
            run.loader,
            optimizer,
            run.scheduler,
            cfg.optim,
            run.device,
            amp=cfg.train.amp,
            progress=ctx.rank == 0,
            max_bad_steps=cfg.train.max_bad_steps,
            bad_steps=bad_steps,
            on_step=_kill_hook(loop_config, ctx.rank, epoch),
            channels_last=run.channels_last,
        )
        bad_steps = int(stats["bad_steps"])
        metrics = {
            "epoch": epoch + 1,
            **{k: round(v, 5) for k, v in stats.items()},
            "lr": optimizer.param_groups[-1]["lr"],
        }
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            metrics.update(_validate(model, run.val_set, cfg, run.cats, run.device, ctx))
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


def _validate(model, val_set, cfg: Config, cats, device, ctx: _Context) -> dict[str, float]:
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


def _kill_hook(loop_config: dict[str, Any], rank: int, epoch: int):
    """Test-only fault injection: kill this worker process once at (rank, epoch, step)."""
    kill = loop_config.get("test_hooks", {}).get("kill")
    if not kill or kill["rank"] != rank or kill["epoch"] != epoch:
        return None
    marker = Path(kill["marker"])

    def on_step(step: int) -> None:
        if step == kill["step"] and not marker.exists():
            marker.write_text(f"killed rank {rank} at epoch {epoch} step {step}\n")
            os._exit(1)  # a crash, not an exception: the worker group must restart

    return on_step


class _NaNAfter:
    """Test-only hook: from epoch ``start`` on, every loss term is NaN (off when None)."""

    def __init__(self, criterion: KNetCriterion, start: int | None) -> None:
        self.criterion, self.start = criterion, start

    def at(self, epoch: int):
        if self.start is None or epoch < self.start:
            return self.criterion
        return lambda outputs, targets: {
            k: v * float("nan") for k, v in self.criterion(outputs, targets).items()
        }


def _start_tracker(cfg: Config, loop_config: dict[str, Any], state: dict[str, Any]):
    if not cfg.tracking.enabled:
        return None
    from knet.tracking import Tracker

    tracker = Tracker(
        cfg.tracking,
        loop_config["run_name"],
        run_id=state.get("mlflow_run_id"),
        tags={**loop_config["tags"], **system_info()},
        system_metrics=True,
    )
    tracker.log_params({**flatten(cfg.to_dict()), **loop_config.get("extra_params", {})})
    return tracker


def _finish_tracker(
    tracker, model, val_set, cfg: Config, cats, ctx: _Context, loop_config: dict[str, Any]
) -> None:
    """Final checkpoint and the kernel pictures (rank 0), then close the run."""
    from knet.evaluate import evaluate_model

    if ctx.last_checkpoint:
        tracker.log_artifact(ctx.last_checkpoint, "checkpoint")
    if cfg.model.task != "semantic" and loop_config.get("kernel_maps", True):
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


class _Context:
    """What differs between a Ray Train worker and the in-process loop."""

    def __init__(self, ray_worker: bool) -> None:
        self.ray_worker = ray_worker
        self.rank, self.world_size = 0, 1
        self.last_checkpoint: str | None = None
        if ray_worker:
            import ray.train

            context = ray.train.get_context()
            self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        # Rank 0's scratch copy of each checkpoint before Ray persists it; created by the first
        # report, so the other ranks (and a run that fails early) leave no folder behind.
        self.local_dir = Path(tempfile.gettempdir()) / f"knet-ckpt-{uuid.uuid4().hex[:12]}"

    def node_id(self) -> str:
        if not self.ray_worker:
            return "local"
        import ray

        return ray.get_runtime_context().get_node_id()

    def host(self) -> str:
        """The address of this worker's node (what ``ray status`` and the dashboard show)."""
        if not self.ray_worker:
            return socket.gethostname()
        import ray.util

        return ray.util.get_node_ip_address()

    def device(self, cfg: Config) -> torch.device:
        if self.ray_worker:
            import ray.train.torch

            return ray.train.torch.get_device()
        use_cuda = cfg.train.use_gpu and torch.cuda.is_available()
        return torch.device("cuda" if use_cuda else "cpu")

    def prepare_loader(self, loader):
        if not self.ray_worker:
            return loader
        import ray.train.torch

        return ray.train.torch.prepare_data_loader(loader, move_to_device=False)

    def prepare_model(self, model):
        if not self.ray_worker:
            return model
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    def set_epoch(self, loader, epoch: int) -> None:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def restore(self, model, optimizer, scheduler) -> dict[str, Any]:
        """Load the latest checkpoint of this run, if any; returns its bookkeeping."""
        payload = None
        if self.ray_worker:
            import ray.train

            checkpoint = ray.train.get_checkpoint()
            if checkpoint is not None:
                with checkpoint.as_directory() as folder:
                    payload = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
        if payload is None:
            return {}
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if self.rank == 0:
            print(f"resuming after epoch {payload['epoch']}", flush=True)
        return {
            k: payload.get(k)
            for k in ("epoch", "history", "bad_steps", "mlflow_run_id")
            if payload.get(k) is not None
        }

    def report(self, metrics: dict[str, Any], model, cfg: Config, cats, **state: Any) -> None:
        """Rank 0 writes the checkpoint; every rank reports (it is a barrier in Ray)."""
        folder = self.local_dir / f"epoch-{state['epoch']}"
        if self.rank == 0:
            self.local_dir.mkdir(mode=0o700, exist_ok=True)  # private, as mkdtemp made it
            folder.mkdir(exist_ok=True)
            save_checkpoint(folder / CHECKPOINT_FILE, model, cfg, cats, **state)
            self.last_checkpoint = str(folder / CHECKPOINT_FILE)
        if not self.ray_worker:
            return
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(folder) if self.rank == 0 else None
        clean = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        ray.train.report(clean, checkpoint=checkpoint)
        if self.rank == 0:
            # Ray copied it to storage; keep only the newest local copy.
            for old in self.local_dir.glob("epoch-*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "ServiceUnreachableError",
    "TrainSetupError",
    "build_trainer",
    "train",
    "train_loop_per_worker",
]
