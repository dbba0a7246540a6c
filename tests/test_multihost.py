"""Two hosts on one machine: a Ray head and a Ray worker node in two network namespaces.

The namespaces are joined by a veth pair, so each host has its own address and Ray, Gloo and
the driver cross a real (virtual) link, which the tests cut. The storage path is a folder both
hosts see, as an NFS mount would be. `knet train` and `ray job submit` run as a user types them,
from the head host.

Where network namespaces are refused (no root, no iproute2), the module falls back to two
`ray start` nodes on 127.0.0.1 and says so; "cutting the link" then kills the worker node.
Every process is stopped by PID (the namespaces' own PIDs, or those of the nodes' temp
folders), never with `ray stop`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from knet.method.checkpoint import load_checkpoint
from tests.hosts import BIN, Hosts
from tests.test_train import ROOT, make_data, run_overrides

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    cluster = Hosts(tmp_path_factory.mktemp("hosts"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("multihost-data"))


@pytest.fixture
def two_hosts(hosts):
    hosts.restore()  # after a test that cut the link
    return hosts


def _train_cmd(data: Path, tmp: Path, address: str, *extra: str) -> list[str]:
    items = run_overrides(
        data,
        tmp,
        "train.num_workers=2",
        "train.cpus_per_worker=1",
        "tracking.enabled=false",
        *extra,
    )
    return [
        str(BIN / "knet"), "train", "--params", str(ROOT / "params.yaml"),
        "--set", *items, "--address", address,
    ]  # fmt: skip


def _workers(output: str) -> list[tuple[str, float]]:
    """The `workers:` line of `knet train`: (host, images/s) per rank."""
    line = re.search(r"^workers: (.+)$", output, re.MULTILINE)
    assert line, output[-3000:]
    return [(h, float(v)) for h, v in re.findall(r"(\S+) \(([\d.]+) img/s\)", line.group(1))]


def _registered(run_dir: Path) -> tuple[int, Path] | None:
    """The latest checkpoint Ray Train's controller has registered: (epoch, folder).

    A folder in storage is not enough: the controller takes a report a moment later, and a
    restart resumes from what it had registered.
    """
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    latest = snapshot.get("latest_checkpoint_result")
    if not latest:
        return None
    return int(latest["metrics"]["epoch"]), run_dir / latest["checkpoint_dir_name"]


def _wait_for_epoch(run_dir: Path, epoch: int, proc: subprocess.Popen, log: Path) -> int:
    deadline = time.time() + 240
    while (found := _registered(run_dir)) is None or found[0] < epoch:
        if proc.poll() is not None:
            tail = log.read_text()[-3000:]
            pytest.fail(f"knet train ended (rc {proc.returncode}) early:\n{tail}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint of epoch {epoch} in 240 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return found[0]


def _cut_mid_run(hosts, cmd: list[str], run_dir: Path, log: Path) -> tuple[int, int, float]:
    """Start ``cmd`` on the head, cut the worker host's link once epoch 2 is registered, and
    wait for the run: (exit code, registered epoch at the cut, time of the cut)."""
    proc = hosts.popen(cmd, log)
    try:
        at_cut = _wait_for_epoch(run_dir, 2, proc, log)
        cut_at = time.time()
        hosts.cut()
        return proc.wait(timeout=480), at_cut, cut_at
    finally:  # never leave a driver holding the cluster for the next test
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_knet_train_runs_on_both_hosts(two_hosts, data, tmp_path):
    start = time.time()
    cmd = _train_cmd(data, tmp_path, two_hosts.address, "train.epochs=2", "train.eval_every=1")
    done = two_hosts.run("head", cmd)
    seconds = time.time() - start
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    workers = _workers(done.stdout)
    assert {host for host, _ in workers} == {two_hosts.ip["head"], two_hosts.ip["worker"]} or (
        not two_hosts.netns and len(workers) == 2
    ), workers
    checkpoint = load_checkpoint(tmp_path / "out" / "model.pt")
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]) == 2
    print(f"two-host knet train: {seconds:.1f} s, workers {workers}")


@pytest.mark.parametrize("form", ["installed", "working-dir"])
def test_ray_job_submit_runs_knet_train(two_hosts, data, tmp_path, form):
    """Both forms of infra/README.md: the installed `knet`, and a checkout shipped as the
    job's working directory (`python -m knet` imports from it)."""
    job_id = f"knet-test-{form}-{os.getpid()}"
    train = _train_cmd(data, tmp_path, "auto", "train.epochs=2", "train.num_workers=1")
    ship = []
    marker = f"knet-shipped-copy-{os.getpid()}"
    if form == "working-dir":
        # A copy of the checkout whose knet announces itself on import: the job's driver and
        # its Train worker must run this code, not the knet installed in the venv.
        copy = tmp_path / "checkout"
        tracked = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True
        ).stdout.split()
        for name in tracked:
            if (ROOT / name).is_file():
                (copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / name, copy / name)
        # The Train worker's loop announces itself (its lines carry "RayTrainWorker"; an
        # import-time print runs in the worker setup hook, before the actor has its name).
        with (copy / "knet" / "training" / "loop.py").open("a") as module:
            module.write(
                f"\nprint({marker!r}, flush=True)\n"
                "_shipped_loop = train_loop_per_worker\n\n"
                "def train_loop_per_worker(loop_config, ctx=None):\n"
                f"    print({marker!r}, flush=True)\n"
                "    return _shipped_loop(loop_config, ctx)\n"
            )
        train = ["python", "-m", "knet", *train[1:]]
        ship = [f"--working-dir={copy}"]
    submit = [
        str(BIN / "ray"), "job", "submit", f"--address={two_hosts.dashboard_url}",
        f"--submission-id={job_id}", *ship,
        "--runtime-env-json", json.dumps({"env_vars": {"RAY_AUTH_MODE": "disabled"}}),
        "--", *train,
    ]  # fmt: skip
    done = two_hosts.run("head", submit)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    ray_job = [f"--address={two_hosts.dashboard_url}", job_id]
    logs = two_hosts.run("head", [str(BIN / "ray"), "job", "logs", *ray_job])
    assert "epoch 1/2" in logs.stdout and "epoch 2/2" in logs.stdout, logs.stdout[-3000:]
    if form == "working-dir":
        worker_lines = [line for line in logs.stdout.splitlines() if "RayTrainWorker" in line]
        assert any(marker in line for line in worker_lines), logs.stdout[-3000:]
    else:
        assert marker not in logs.stdout
    status = two_hosts.run("head", [str(BIN / "ray"), "job", "status", *ray_job])
    assert f"job {job_id!r} succeeded" in status.stdout.lower(), status.stdout
    assert load_checkpoint(tmp_path / "out" / "model.pt")["epoch"] == 2


def test_an_elastic_run_goes_on_without_the_lost_host(two_hosts, data, tmp_path):
    log = tmp_path / "train.log"
    cmd = _train_cmd(
        data,
        tmp_path,
        two_hosts.address,
        "train.epochs=12",
        "train.eval_every=100",
        "train.min_workers=1",
        "train.placement_timeout_s=15",
        "train.run_name=elastic",
    )
    rc, at_cut, cut_at = _cut_mid_run(two_hosts, cmd, tmp_path / "ray" / "elastic", log)
    output = log.read_text()
    assert rc == 0, output[-4000:]
    resumed = re.search(r"resuming after epoch (\d+)", output)
    assert resumed and int(resumed.group(1)) >= at_cut, output[-4000:]
    workers = _workers(output)
    assert [host for host, _ in workers] == [two_hosts.ip["head"]], workers
    assert load_checkpoint(tmp_path / "out" / "model.pt")["epoch"] == 12
    print(f"elastic: went on with 1 worker, finished {time.time() - cut_at:.1f} s after the cut")


def test_a_cut_link_fails_clearly_and_keeps_the_checkpoint(two_hosts, data, tmp_path):
    log = tmp_path / "train.log"
    cmd = _train_cmd(
        data,
        tmp_path,
        two_hosts.address,
        "train.epochs=12",
        "train.eval_every=100",
        "train.placement_timeout_s=15",
        "train.placement_retries=1",
        "train.run_name=fixed",
    )
    run_dir = tmp_path / "ray" / "fixed"
    rc, _, cut_at = _cut_mid_run(two_hosts, cmd, run_dir, log)
    failed_after = time.time() - cut_at
    output = log.read_text()
    assert rc != 0, output[-4000:]
    assert "could not place the worker group" in output, output[-4000:]
    assert "rerun the same command" in output
    # The checkpoint the run would resume from is whole: it loads, mid-run, as registered.
    epoch, folder = _registered(run_dir)
    assert load_checkpoint(folder / "model.pt")["epoch"] == epoch and 2 <= epoch < 12

    # The host comes back; the same command resumes from the last checkpoint, on both hosts.
    two_hosts.restore()
    done = two_hosts.run("head", cmd)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    resumed = re.search(r"resuming after epoch (\d+)", done.stdout + done.stderr)
    assert resumed and int(resumed.group(1)) == epoch, done.stdout[-3000:]
    assert len(_workers(done.stdout)) == 2
    assert load_checkpoint(tmp_path / "out" / "model.pt")["epoch"] == 12
    print(f"fixed group: failed {failed_after:.1f} s after the cut; resumed at epoch "
          f"{resumed.group(1)} once the host was back")  # fmt: skip
