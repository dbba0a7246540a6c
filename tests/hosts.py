"""Two hosts on one machine for the multi-host tests and benchmark: a Ray head and a Ray worker
node in two network namespaces joined by a veth pair, each with its own address.

Where network namespaces are refused (no root, no iproute2), :class:`Hosts` falls back to two
`ray start` nodes on 127.0.0.1 and says so; "cutting the link" then kills the worker node.
Every process is stopped by PID (the namespaces' own PIDs, or those of the nodes' temp
folders), never with `ray stop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil

from tests.conftest import free_port

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
        # A veth pair not yet moved into a namespace is still in this one.
        subprocess.run(["ip", "link", "del", self.veth["head"]], capture_output=True)
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
        # Until none is left: a daemon may have started another process meanwhile. (`ray start`
        # records the head in its own --temp-dir, which goes below.)
        for _ in range(5):
            pids = self._pids("worker") + self._pids("head")
            if not pids:
                break
            _kill(pids)
        if self.netns:
            self._remove_namespaces()  # the veth pair goes with them
        for folder in self.temp.values():
            shutil.rmtree(folder, ignore_errors=True)
