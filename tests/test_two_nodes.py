"""Two Ray nodes on this machine (separate `ray start` processes), one training run across both."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.test_train import make_data, run_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str) -> None:
    exe = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run([str(exe), *args], check=True, env=env, capture_output=True, timeout=120)


def _processes_under(folder: Path) -> list[psutil.Process]:
    """The Ray processes whose command line names this node's own temp folder."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(folder) in cmdline:
            found.append(proc)
    return found


@pytest.fixture
def two_nodes(tmp_path):
    # Short temp folders: Ray's unix socket paths must stay under ~107 characters.
    head_dir = Path(f"/tmp/knet-head-{os.getpid()}")
    worker_dir = Path(f"/tmp/knet-node-{os.getpid()}")
    port = _free_port()
    try:
        _ray(
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            f"--temp-dir={head_dir}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        )
        _ray(
            "start",
            f"--address=127.0.0.1:{port}",
            "--num-cpus=1",
            f"--temp-dir={worker_dir}",
            "--disable-usage-stats",
        )
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        ray.shutdown()
        # Stop exactly the processes of these two nodes, by PID (never `ray stop`).
        procs = _processes_under(head_dir) + _processes_under(worker_dir)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=15)
        for proc in alive:
            proc.kill()
        for folder in (head_dir, worker_dir):
            shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_run_on_two_nodes(two_nodes, tmp_path):
    from knet.train import train

    data = make_data(tmp_path / "data")
    # One CPU per worker and one CPU per node: the two workers must land on different nodes.
    run = run_config(
        data,
        tmp_path,
        "train.num_workers=2",
        "train.cpus_per_worker=1",
        "train.epochs=1",
        "train.eval_every=1",
        "tracking.enabled=false",
    )
    start = time.time()
    summary = train(run, root=tmp_path, address=two_nodes)
    assert summary["epochs"] == 1
    assert len(set(summary["worker_nodes"])) == 2, summary["worker_nodes"]
    assert time.time() - start < 300
