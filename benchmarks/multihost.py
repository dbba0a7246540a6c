"""Training across two hosts vs one: ``python -m benchmarks.multihost`` (root, iproute2).

Two hosts are two network namespaces joined by a veth pair (``tests/hosts.py``, the multi-host
tests' set-up), a Ray head with 1 CPU in one and a worker node with 1 CPU in the other; the
one-host case is the laptop default, a local instance with 1 worker on both cores. Each case
runs ``knet train`` as a user types it, on the default synthetic data (``dvc repro prepare``
first), tracking off, and reports the wall time (Ray start-up and the final validation
included) and each rank's mean images/s from the command's ``workers:`` line. Results go to
``reports/bench_multihost.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/hosts.py

from tests.hosts import BIN, Hosts  # noqa: E402


def knet_train(prefix: list[str], env: dict[str, str], items: list[str], address: str | None):
    cmd = [*prefix, str(BIN / "knet"), "train", "--params", str(ROOT / "params.yaml")]
    cmd += ["--set", *items] + (["--address", address] if address else [])
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"knet train failed:\n{done.stderr[-3000:]}")
    line = re.search(r"^workers: (.+)$", done.stdout, re.MULTILINE)
    workers = re.findall(r"(\S+) \(([\d.]+) img/s\)", line.group(1) if line else "")
    return {
        "wall_s": round(wall, 1),
        "workers": [{"host": h, "images_per_s": float(v)} for h, v in workers],
        "images_per_s": round(sum(float(v) for _, v in workers), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", default="reports/bench_multihost.json")
    args = parser.parse_args(argv)
    prepared = ROOT / "data" / "prepared"
    if not (prepared / "train" / "index.json").exists():
        raise SystemExit(f"{prepared} is not prepared: run `dvc repro prepare` first")
    rows = []
    with tempfile.TemporaryDirectory(prefix="knet-bench-hosts-") as tmp:
        folder = Path(tmp)
        common = [
            f"train.epochs={args.epochs}",
            "tracking.enabled=false",
            f"data.raw={ROOT / 'data' / 'raw' / 'synth'}",
            f"data.prepared={prepared}",
            f"train.storage_path={folder / 'ray'}",
        ]
        hosts = Hosts(folder)
        try:
            hosts.start()
            two = [*common, "train.num_workers=2", "train.cpus_per_worker=1"]
            two += [f"train.output={folder / 'two.pt'}", "train.run_name=bench-two-hosts"]
            row = knet_train(hosts.prefix("head"), hosts.env("head"), two, hosts.address)
            kind = "network namespaces" if hosts.netns else "127.0.0.1 fallback"
            rows.append({"case": f"two hosts ({kind}), 2 workers x 1 CPU", **row})
        finally:
            hosts.stop()
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        one = [*common, f"train.output={folder / 'one.pt'}", "train.run_name=bench-one-host"]
        rows.append({"case": "one host, 1 worker x 2 CPUs", **knet_train([], env, one, None)})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"epochs": args.epochs, "rows": rows}, indent=2) + "\n")
    print(f"| case ({args.epochs} epoch(s), default data) | wall s | img/s per worker | img/s |")
    print("|---|---:|---:|---:|")
    for row in rows:
        per = ", ".join(f"{w['images_per_s']:.1f}" for w in row["workers"])
        print(f"| {row['case']} | {row['wall_s']} | {per} | {row['images_per_s']:.1f} |")
    print(f"\n{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
