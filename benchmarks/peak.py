"""The device's measured dense-matmul peak, the reference for "fraction of peak".

``python -m benchmarks.peak`` prints one JSON line: TFLOP/s of a square matmul, the best of
the timed repetitions after warm-up (a peak: on a shared CPU the median undershoots it), in
bf16 on CUDA (8192^3, as performance.md measured the
H100) and in fp32 on CPU (2048^3, the dtype K-Net runs in there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from benchmarks import timed


def measure(device: torch.device, size: int, repeats: int) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = timed(lambda: a @ b, device, warmup=2, repeats=repeats)
    return {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "size": size,
        "threads": torch.get_num_threads(),
        "tflops_per_s": 2 * size**3 / min(times) / 1e12,
        "median_tflops_per_s": 2 * size**3 / statistics.median(times) / 1e12,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, help="default: 8192 on CUDA, 2048 on CPU")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    size = args.size or (8192 if device.type == "cuda" else 2048)
    print(json.dumps(measure(device, size, args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
