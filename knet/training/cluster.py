"""The Ray plumbing of a training run: connect, check placement, build the trainer, fit.

:func:`connect` joins a cluster or starts a local instance bound to 127.0.0.1;
:func:`check_placement` refuses a worker group the cluster can never place;
:func:`build_trainer` is the ``TorchTrainer`` of ``knet train`` and of every ``knet tune``
trial (elastic scaling, failure retries, checkpoints); :func:`fit_on_ray` runs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from knet.config import Config
from knet.training.context import CHECKPOINT_FILE
from knet.training.errors import ServiceUnreachableError, TrainSetupError
from knet.training.loop import train_loop_per_worker


def connect(address: str | None, dashboard: bool = False) -> None:
    # 61 lines: mostly comments on why each Ray setting is what it is
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
        "worker_process_setup_hook": "knet.training.cluster.quiet_ray_worker",
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
DEPRECATED_BY_RAY_TRAIN = r"`ExecutionOptions\.exclude_resources` is deprecated"


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
    # Ray Train's own controller builds Ray Data's ExecutionOptions with a deprecated argument
    # (Ray 2.60): two lines per run, per trial in a sweep, that no knet setting can avoid.
    warnings.filterwarnings("ignore", message=DEPRECATED_BY_RAY_TRAIN)


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


def fit_on_ray(
    loop_config: dict[str, Any], cfg: Config, run_name: str, address: str | None
) -> tuple[dict[str, Any], BaseException | None]:
    """Run ``loop_config`` on a Ray Train worker group.

    Returns rank 0's summary, whose ``checkpoint`` is a local copy of the last checkpoint (or
    None), and the error that ended a run that failed after its retries (None when it
    finished), so the stage can keep the last good checkpoint before it raises.
    """
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
        return {"checkpoint": checkpoint}, result.error
    summary = dict(result.return_value or {})
    summary["checkpoint"] = checkpoint
    summary["ray_path"] = result.path
    return summary, None


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


__all__ = [
    "build_trainer",
    "check_placement",
    "check_reachable",
    "connect",
    "fit_on_ray",
    "quiet_ray_worker",
]
