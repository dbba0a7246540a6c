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

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest

from knet.checkpoint import load_checkpoint
from tests.conftest import free_port
from tests.test_train import ROOT, make_data, run_overrides

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent
RAY_PORT = 6379
DASHBOARD_PORT = 8265


def _kill(pids: list[int]) -> None:
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


class Hosts:
    """A head host and a worker host, one CPU each, and what a test does to them."""

    def __init__(self, base: Path) -> None:
        tag = f"kn{os.getpid() % 100000}"
        self.ns = {"head": f"{tag}-head", "worker": f"{tag}-work"}
        self.veth = {"head": f"{tag}h", "worker": f"{tag}w"}
        subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() // 50 % 250}"
        self.ip = {"head": f"{subnet}.1", "worker": f"{subnet}.2"}
        # Short folders: Ray's unix socket paths must stay under ~107 characters.
        self.temp = {
            "head": Path(f"/tmp/{tag}-head"),
            "worker": Path(f"/tmp/{tag}-work"),
        }
        self.logs = base
        self.netns = False
        self.ray_port = RAY_PORT
        self.dashboard_port = DASHBOARD_PORT
        self.cut_now = False

    # ----------------------------------------------------------------------- set-up

    def start(self) -> None:
        self.netns = self._make_namespaces()
        if not self.netns:
            message = (
                "network namespaces refused here: falling back to two `ray start` nodes on "
                "127.0.0.1 (cutting the link kills the worker node instead)"
            )
            print(message)
            warnings.warn(message, stacklevel=1)
            self.ip = {"head": "127.0.0.1", "worker": "127.0.0.1"}
            self.ray_port, self.dashboard_port = free_port(), free_port()
        self._start_node("head")
        self._start_node("worker")
        self._wait_for_nodes(2)

    def _make_namespaces(self) -> bool:
        ns, veth, ip = self.ns, self.veth, self.ip
        steps = [
            ["ip", "netns", "add", ns["head"]],
            ["ip", "netns", "add", ns["worker"]],
            ["ip", "link", "add", veth["head"], "type", "veth", "peer", "name", veth["worker"]],
        ]
        for side in ("head", "worker"):
            steps += [
                ["ip", "link", "set", veth[side], "netns", ns[side]],
                ["ip", "-n", ns[side], "addr", "add", f"{ip[side]}/24", "dev", veth[side]],
                ["ip", "-n", ns[side], "link", "set", veth[side], "up"],
                ["ip", "-n", ns[side], "link", "set", "lo", "up"],
            ]
        if shutil.which("ip") is None:
            return False
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{' '.join(step)}: {done.stderr.strip()}")
                self._remove_namespaces()
                return False
        return True

    def _remove_namespaces(self) -> None:
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def env(self, side: str) -> dict[str, str]:
        env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "disabled",
            "PYTHONUNBUFFERED": "1",
        }
        if self.netns:
            # Gloo finds its address from the hostname, which both namespaces share and which
            # resolves to neither: name each host's interface (as on hosts with several NICs).
            env["GLOO_SOCKET_IFNAME"] = self.veth[side]
        return env

    def prefix(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side]] if self.netns else []

    def _start_node(self, side: str) -> None:
        common = [f"--temp-dir={self.temp[side]}", "--num-cpus=1", "--disable-usage-stats"]
        if side == "head":
            args = [
                "--head",
                f"--port={self.ray_port}",
                "--include-dashboard=true",
                f"--dashboard-host={self.ip['head']}",
                f"--dashboard-port={self.dashboard_port}",
            ]
            env = {
                **self.env(side),
                # Notice a lost host in seconds rather than the default ~30 s.
                "RAY_health_check_period_ms": "1000",
                "RAY_health_check_timeout_ms": "1000",
                "RAY_health_check_failure_threshold": "5",
            }
        else:
            args = [f"--address={self.address}"]
            env = self.env(side)
        if self.netns:
            args.append(f"--node-ip-address={self.ip[side]}")
        subprocess.run(
            [*self.prefix(side), str(BIN / "ray"), "start", *args, *common],
            check=True,
            env=env,
            capture_output=True,
            timeout=120,
        )

    def _wait_for_nodes(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            done = self.run(
                "head",
                [
                    str(BIN / "ray"),
                    "list",
                    "nodes",
                    "--format=json",
                    f"--address={self.dashboard_url}",
                ],
                timeout=60,
            )
            if done.returncode == 0:
                alive = [n for n in json.loads(done.stdout) if n.get("state") == "ALIVE"]
                if len(alive) == count:
                    return
            time.sleep(1)
        raise RuntimeError(f"the cluster did not reach {count} live nodes in {timeout_s} s")

    @property
    def address(self) -> str:
        return f"{self.ip['head']}:{self.ray_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.ip['head']}:{self.dashboard_port}"

    # ------------------------------------------------------------------ what tests do

    def run(self, side: str, cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.prefix(side), *cmd],
            env=self.env(side),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, cmd: list[str], log: Path) -> subprocess.Popen:
        """``cmd`` on the head host in the background, stdout and stderr to ``log``."""
        with log.open("w") as out:
            return subprocess.Popen(
                [*self.prefix("head"), *cmd], env=self.env("head"), stdout=out, stderr=out
            )

    def cut(self) -> None:
        """The worker host drops off the network (its processes keep running)."""
        if self.netns:
            subprocess.run(
                ["ip", "-n", self.ns["head"], "link", "set", self.veth["head"], "down"],
                check=True,
            )
        else:
            _kill(self._pids("worker"))
        self.cut_now = True

    def restore(self) -> None:
        """The link is back and the worker host rejoins as a new node."""
        if not self.cut_now:
            return
        if self.netns:
            subprocess.run(
                ["ip", "-n", self.ns["head"], "link", "set", self.veth["head"], "up"],
                check=True,
            )
        # The head declared the old node dead; a dead node never comes back, so restart it.
        _kill(self._pids("worker"))
        shutil.rmtree(self.temp["worker"], ignore_errors=True)
        self._start_node("worker")
        self._wait_for_nodes(2)
        self.cut_now = False

    # ---------------------------------------------------------------------- clean-up

    def _pids(self, side: str) -> list[int]:
        if self.netns:
            done = subprocess.run(
                ["ip", "netns", "pids", self.ns[side]], capture_output=True, text=True
            )
            return [int(p) for p in done.stdout.split()]
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            if str(self.temp[side]) in " ".join(proc.info["cmdline"] or []):
                found.append(proc.pid)
        return found

    def stop(self) -> None:
        _kill(self._pids("worker") + self._pids("head"))
        if self.netns:
            self._remove_namespaces()  # the veth pair goes with them
        for folder in self.temp.values():
            shutil.rmtree(folder, ignore_errors=True)
        # `ray start --head` records itself for `ray.init()`; forget this head, only this one.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip() == self.address:
            current.unlink()


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
    if form == "working-dir":
        train = ["python", "-m", "knet", *train[1:]]
        ship = [f"--working-dir={ROOT}"]
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
    proc = two_hosts.popen(cmd, log)
    at_cut = _wait_for_epoch(tmp_path / "ray" / "elastic", 2, proc, log)
    cut_at = time.time()
    two_hosts.cut()
    rc = proc.wait(timeout=480)
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
    proc = two_hosts.popen(cmd, log)
    _wait_for_epoch(run_dir, 2, proc, log)
    cut_at = time.time()
    two_hosts.cut()
    rc = proc.wait(timeout=480)
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
