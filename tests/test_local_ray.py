"""The local Ray instance knet starts: loopback only, and a quiet log."""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import psutil
import pytest

from tests.conftest import TINY_OVERRIDES
from tests.test_train import make_data

ROOT = Path(__file__).resolve().parents[1]


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    found = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [(pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


@pytest.mark.ray
@pytest.mark.parametrize("dashboard", [False, True], ids=["train", "tune-with-dashboard"])
def test_the_local_instance_listens_only_on_loopback(dashboard):
    """knet train's instance, and knet tune's with the dashboard and its agents."""
    import ray

    from knet.training import connect

    if ray.is_initialized():
        ray.shutdown()
    connect(None, dashboard=dashboard)
    try:
        node = ray._private.worker._global_node
        pids = {p.process.pid for procs in node.all_processes.values() for p in procs}
        for pid in list(pids):  # the raylet's and GCS's own children (workers, agents)
            with contextlib.suppress(psutil.NoSuchProcess):
                pids |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        sockets = _listening(pids)
        assert sockets, "found no listening sockets of the local Ray instance"
        wide = [s for s in sockets if not _loopback(s[1])]
        assert not wide, f"listening beyond loopback (pid, address, port): {wide}"
    finally:
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_training_prints_one_line_per_epoch_and_no_repeated_warnings(tmp_path):
    data = make_data(tmp_path / "data")
    exe = shutil.which("knet", path=str(Path(sys.executable).parent))
    sets = [
        *TINY_OVERRIDES,
        f"data.raw={data / 'raw'}",
        f"data.prepared={data / 'prepared'}",
        "data.min_size=[64]",
        "data.max_size=64",
        "data.test_size=64",
        "data.num_workers=0",
        "train.batch_size=2",
        "train.epochs=2",
        "train.eval_every=1",
        "train.num_workers=1",
        "train.cpus_per_worker=1",
        f"train.storage_path={tmp_path / 'ray'}",
        f"train.output={tmp_path / 'out' / 'model.pt'}",
        f"train.metrics={tmp_path / 'metrics' / 'train.json'}",
        "tracking.enabled=false",
    ]
    out = subprocess.run(
        [exe, "train", "--params", str(ROOT / "params.yaml"), "--set", *sets],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    for noise in ("Failed to query Ray Train Controller", "Reporting training result"):
        assert noise not in log, noise
    for epoch in ("epoch 1/2 ", "epoch 2/2 "):
        assert sum(epoch in line for line in log.splitlines()) == 1, log[-3000:]


def test_the_worker_hook_drops_ray_trains_own_deprecation_warning_and_no_other():
    """Ray Train's controller trips a Ray Data deprecation (2 lines per trial of a sweep)."""
    from knet.training.cluster import quiet_ray_worker

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_ray_worker()
        warnings.warn(
            "`ExecutionOptions.exclude_resources` is deprecated and will be removed after "
            "January 2027. Use `ExecutionOptions.label_selector` to constrain Ray Data work.",
            DeprecationWarning,
            stacklevel=1,
        )
        warnings.warn("`ExecutionOptions.other` is deprecated", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`ExecutionOptions.other` is deprecated"]
