"""The costs around the model: the plain loop vs Ray Train with 1 worker, ``dvc repro`` when
nothing changed, and the ``make pipeline`` flow's stage breakdown.

``python -m benchmarks.systems [--train-images 400 --epochs 8]`` (``python -m benchmarks`` runs
it as its ``systems`` section). Everything runs in a scratch copy of the project (its tracked
files in a fresh git + DVC repository, with the synthetic set cut to ``--train-images``), so
this checkout's data, DVC cache, MLflow store and Ray results are untouched. Prints one JSON
line.

- plain vs Ray Train: the same config and data, ``train.num_workers=0`` (the engine loop in
  this process) and ``=1`` (one Ray Train worker with both cores); images/s is the median of
  the second half of the epochs (steady state), wall time includes start-up. Each run's CPU
  seconds are summed per process role (driver, train worker, its data loaders, Ray Train's
  actors, Ray's daemons), sampled from ``/proc`` with psutil: where Ray's extra time goes.
  ``--repeats N`` alternates N pairs and reports the median run of each kind; ``--env
  KEY=VALUE`` sets a variable for every run (``OMP_WAIT_POLICY=PASSIVE`` shows what the
  OpenMP threads' spinning is worth).
- ``dvc repro prepare`` twice: the first generates and prepares the data, the second finds
  everything up to date (what every flow run pays before training).
- the train-knet flow (``make pipeline``) for ``--flow-epochs`` on that data: its own per-stage
  seconds (``stage_s`` of the summary) and the wall time including the ephemeral Prefect API.
- time to a good model: on the full default data (a second scratch project), ``knet train`` as
  a user types it (Ray Train, 1 worker) with validation after every epoch; the wall seconds
  from the command's start to the first validation line with PQ >= ``--quality-pq``
  (``--skip-quality`` leaves it out: it trains the whole default schedule).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("knet", "pipelines", "configs", "dvc.yaml", "params.yaml", "pyproject.toml")

FLOW = r"""
import json, sys, time
from pipelines.flows import train_knet
epochs = int(sys.argv[1])
start = time.perf_counter()
summary = train_knet(epochs=epochs, overrides=[f"optim.lr_steps=[{max(epochs - 1, 1)}]"])
summary["wall_s"] = time.perf_counter() - start
print(json.dumps(summary, default=str))
"""


def environment(project: Path) -> dict[str, str]:
    """This interpreter's tools first on PATH, local-only services, Prefect state in ``project``."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env["PREFECT_HOME"] = str(project / ".prefect")
    env["PYTHONPATH"] = str(project)
    env.pop("PREFECT_API_URL", None)  # an ephemeral API, as `make pipeline` without servers
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def scratch_project(folder: Path, train_images: int, val_images: int) -> Path:
    """The project's code, pipeline and params in a fresh git + DVC repository."""
    project = folder / "project"
    project.mkdir()
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["synth"].update(train_images=train_images, val_images=val_images)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = environment(project)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=project, env=env, check=True)
    return project


def timed_run(cmd: list[str], project: Path) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(
        cmd, cwd=project, env=environment(project), check=True, capture_output=True, text=True
    )
    return time.perf_counter() - start, out.stdout


# Where the CPU of a run goes: every process started during it (the driver, Ray's daemons and
# actors, the Train worker, data-loader processes), by the role its command line names.
ROLES = (  # process titles are cut to 15 characters where the full one is not readable
    ("train worker", ("ray::raytrainwo",)),
    ("Ray Train actors (controller, sync, datasets, placement-group cleaner, autoscaling)",
     ("ray::traincontr", "ray::synchroniz", "ray::datasetman", "ray::placementg",
      "ray::_autoscali", "ray::preemption", "ray::trainstate")),
    ("Ray daemons (GCS, raylet, dashboard agent, log monitor)",
     ("gcs_server", "raylet", "agent", "log_monitor", "monitor.py", "ray/", "dashboard")),
    ("idle Ray workers", ("ray::idle", "default_worker.py")),
)  # fmt: skip


def _role(proc, driver_pid: int, worker_pids: set[int]) -> str:
    cmdline = " ".join(proc.info.get("cmdline") or []) or (proc.info.get("name") or "")
    if proc.pid == driver_pid:
        return "knet train (driver / plain loop)"
    if proc.info.get("ppid") in worker_pids:
        return "data loaders (of the train worker)"
    if proc.info.get("ppid") == driver_pid and not cmdline.startswith("ray"):
        return "data loaders (of the driver)"  # forked from it (Ray's processes are not)
    for role, needles in ROLES:
        if any(n in cmdline.lower() for n in needles):
            return role
    return "other"


def cpu_accounted_run(cmd: list[str], project: Path, interval: float = 0.25) -> dict:
    """Run ``cmd`` and sum the CPU seconds of every process started meanwhile, by role.

    Processes are sampled every ``interval`` seconds (``psutil``); the last sample of each is
    kept, so a process that exits loses at most one interval.
    """
    import psutil

    start_wall = time.time()
    start = time.perf_counter()
    last: dict[int, tuple[str, float]] = {}
    proc = subprocess.Popen(
        cmd, cwd=project, env=environment(project), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    workers: set[int] = set()
    while True:
        running = proc.poll() is None
        for p in psutil.process_iter(["pid", "ppid", "cmdline", "name", "create_time"]):
            try:
                if p.info["create_time"] < start_wall - 1:
                    continue
                times = p.cpu_times()
                cmdline = " ".join(p.info.get("cmdline") or [])
                # Loader processes fork from the worker and inherit its title: the parent is
                # the worker, so they are counted as loaders.
                title = cmdline or p.info.get("name") or ""
                if title.startswith("ray::RayTrainWo") and p.info["ppid"] not in workers:
                    workers.add(p.pid)
                last[p.pid] = (
                    _role(p, proc.pid, workers),
                    times.user + times.system,
                    cmdline[:100] or p.info.get("name") or "",
                )
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not running:
            break
        time.sleep(interval)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode} in {project}")
    by_role: dict[str, float] = {}
    for role, seconds, _ in last.values():
        by_role[role] = round(by_role.get(role, 0.0) + seconds, 1)
    top = sorted(last.values(), key=lambda item: -item[1])[:10]
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": by_role,
        "top_processes": [[role, round(cpu, 1), cmd] for role, cpu, cmd in top],
    }


def run_overrides(run: Path, workers: int, name: str) -> list[str]:
    """``--set`` items of a benchmark's ``knet train``: ``workers``, no tracking, every output
    under ``run``, the run named ``name``."""
    return [
        f"train.num_workers={workers}",
        "tracking.enabled=false",
        f"train.storage_path={run / 'ray'}",
        f"train.output={run / 'model.pt'}",
        f"train.metrics={run / 'train.json'}",
        f"train.run_name={name}",
    ]


def train_speed(
    project: Path, workers: int, epochs: int, folder: Path | None = None, cpus: float = 0
) -> dict:
    """One ``knet train`` run in ``project`` (a child process); images/s from its history.

    The run's outputs go to ``folder`` (default: the project); ``cpus`` > 0 shares that many
    CPUs among the Ray workers (``train.cpus_per_worker``), else the params' value stands.
    Images/s is the median over the epochs after the first, summed over the workers.
    """
    run = (folder or project) / f"loop-{workers}"
    overrides = [
        *run_overrides(run, workers, f"bench-{workers}"),
        f"train.epochs={epochs}",
        "train.eval_every=1000",
        "train.max_failures=0",
    ]
    if workers and cpus:
        overrides.append(f"train.cpus_per_worker={cpus / workers}")
    accounted = cpu_accounted_run(["knet", "train", "--set", *overrides], project)
    seconds = accounted["wall_s"]
    history = json.loads((run / "train_history.json").read_text())
    # Each rank reports images/s over its own shard; the run's throughput is their sum.
    per_epoch = [round(h["images_per_s"] * max(workers, 1), 1) for h in history]
    # Steady state: the second half of the epochs. Ray Train starts five actor processes
    # (controller, synchronisation, dataset manager, placement-group cleaner, autoscaling
    # coordinator) that each import Ray Train, ~20 CPU-s in all: on 2 cores that slows the
    # first epochs of a short run, and is reported as start-up (cpu_s), not as throughput.
    steady = per_epoch[len(per_epoch) // 2 :]
    return {
        "images_per_s": statistics.median(steady),
        "images_per_s_after_first": statistics.median(per_epoch[1:] or per_epoch),
        "wall_s": seconds,
        "epochs": epochs,
        "images_per_s_by_epoch": per_epoch,
        "cpu_s": accounted["cpu_s"],
        "cpu_s_total": round(sum(accounted["cpu_s"].values()), 1),
        "top_processes": accounted["top_processes"],
    }


EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)\s+loss \S+\s+pq ([\d.]+) pq_th ([\d.]+)")


def time_to_quality(project: Path, target_pq: float, workers: int = 1) -> dict:
    """``knet train`` on ``project``'s data, validating every epoch; wall seconds from the
    command's start to each validation line (read as the driver prints it) and to the first
    with PQ >= ``target_pq``."""
    run = project / f"quality-{workers}"
    overrides = [*run_overrides(run, workers, "bench-quality"), "train.eval_every=1"]
    env = {**environment(project), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    curve = []
    with subprocess.Popen(
        ["knet", "train", "--set", *overrides],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            found = EPOCH_LINE.search(line)
            if found:
                epoch, _, pq, pq_th = found.groups()
                seconds = round(time.perf_counter() - start, 1)
                curve.append(
                    {"epoch": int(epoch), "pq": float(pq), "pq_th": float(pq_th), "s": seconds}
                )
    if proc.returncode:
        raise RuntimeError(f"knet train exited {proc.returncode} in {project}")
    reached = next((c for c in curve if c["pq"] >= target_pq), None)
    return {
        "target_pq": target_pq,
        "workers": workers,
        "seconds_to_target": reached["s"] if reached else None,
        "epoch_at_target": reached["epoch"] if reached else None,
        "wall_s": round(time.perf_counter() - start, 1),
        "final": curve[-1] if curve else None,
        "curve": curve,
    }


def measure_quality(args: argparse.Namespace) -> dict:
    """Time to ``--quality-pq`` on the full default data, in its own scratch project."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["synth"]
    with tempfile.TemporaryDirectory(prefix="knet-bench-quality-") as tmp:
        project = scratch_project(Path(tmp), params["train_images"], params["val_images"])
        timed_run(["dvc", "repro", "prepare"], project)
        return time_to_quality(project, args.quality_pq)


def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="knet-bench-") as tmp:
        project = scratch_project(Path(tmp), args.train_images, args.val_images)
        cold, _ = timed_run(["dvc", "repro", "prepare"], project)
        noop, out = timed_run(["dvc", "repro", "prepare"], project)
        if "didn't change" not in out and "up to date" not in out:
            raise RuntimeError(f"the second `dvc repro prepare` did work:\n{out}")
        pairs = [
            (train_speed(project, 0, args.epochs, Path(tmp) / f"plain-{i}"),
             train_speed(project, 1, args.epochs, Path(tmp) / f"ray-{i}"))
            for i in range(args.repeats)
        ]  # fmt: skip
        # The median run of each kind, by images/s; the ratio of their medians.
        plain, ray = (_median_run([pair[i] for pair in pairs]) for i in (0, 1))
        ratio = ray["images_per_s"] / plain["images_per_s"]
        if args.only_speed:
            speeds = [[a["images_per_s"], b["images_per_s"]] for a, b in pairs]
            return {
                "plain_loop": plain,
                "ray_train_1_worker": ray,
                "ray_over_plain": ratio,
                "repeats": speeds,
            }
        _, flow_out = timed_run([sys.executable, "-c", FLOW, str(args.flow_epochs)], project)
        flow = json.loads(flow_out.strip().splitlines()[-1])
    return {
        "train_images": args.train_images,
        "val_images": args.val_images,
        "dvc_repro_prepare_cold_s": round(cold, 2),
        "dvc_repro_noop_s": round(noop, 2),
        "plain_loop": plain,
        "ray_train_1_worker": ray,
        "ray_over_plain": ratio,
        "flow_epochs": args.flow_epochs,
        "flow_stage_s": flow["stage_s"],
        "flow_wall_s": round(flow["wall_s"], 1),
        "flow_pq": flow["metrics"].get("pq"),
        "time_to_quality": None if args.skip_quality else measure_quality(args),
    }


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["images_per_s"])[(len(runs) - 1) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--val-images", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=8, help="plain vs Ray Train epochs")
    parser.add_argument("--flow-epochs", type=int, default=2, help="train-knet flow epochs")
    parser.add_argument("--quality-pq", type=float, default=50.0, help="time to this val PQ")
    parser.add_argument("--skip-quality", action="store_true", help="no time-to-quality run")
    parser.add_argument(
        "--only-speed", action="store_true", help="only plain vs Ray Train (one JSON line)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="plain / Ray Train pairs, alternating (median)"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of every run, e.g. --env OMP_WAIT_POLICY=PASSIVE",
    )
    parser.add_argument(
        "--only-quality", action="store_true", help="only the time-to-quality run (one JSON line)"
    )
    args = parser.parse_args(argv)
    os.environ.update(item.split("=", 1) for item in args.env)  # the runs inherit it
    print(json.dumps(measure_quality(args) if args.only_quality else measure(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
