"""Speed and memory measurements (``make bench`` / ``python -m benchmarks``); not tests."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def run_measurement(args: list[str], case: str, python: str | None = None) -> dict[str, Any]:
    """Run ``python ARGS`` in a fresh process (its own peak memory); parse its last JSON line."""
    out = subprocess.run(
        [python or sys.executable, *args], check=True, capture_output=True, text=True
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["case"] = case
    return row


def peak_memory_mib(device) -> float:
    """The CUDA allocator's peak on a GPU; the process's peak resident memory on a CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_case_args(parser, size: tuple[int, int] = (128, 128), knet: bool = True) -> None:
    """The arguments every measurement takes (and, with ``knet``, those of a K-Net config)."""
    import torch

    if knet:
        parser.add_argument("--params", default="params.yaml")
        parser.add_argument("--set", dest="overrides", action="append", default=[])
        parser.add_argument("--num-things", type=int, default=80)
        parser.add_argument("--num-stuff", type=int, default=53)
    parser.add_argument("--size", type=int, nargs=2, default=list(size), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def timed(step, device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``step()`` after ``warmup`` untimed ones
    (synchronised on CUDA, so the time is the device's)."""
    import time

    import torch

    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def padded_input(size: list[int], divisor: int) -> tuple[int, int]:
    """``size`` rounded up to multiples of ``divisor`` (the padded batch the loader makes)."""
    return tuple(-(-v // divisor) * divisor for v in size)


def case_info(args, cfg, device, amp: bool, height: int, width: int) -> dict[str, Any]:
    """The fields that say what a K-Net measurement ran: config, task, input, dtype, versions."""
    import torch

    return {
        "params": args.params,
        "task": cfg.model.task,
        "depth": cfg.model.backbone.depth,
        "input": [height, width],
        "batch": args.batch,
        "device": str(device),
        "dtype": "bf16 autocast" if amp else "fp32",
        "channels_last": args.channels_last,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
