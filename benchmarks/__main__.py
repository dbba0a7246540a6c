"""``python -m benchmarks`` (``make bench``): K-Net against torchvision's Mask R-CNN, one table.

Every case runs in its own process (so its peak memory is its own), with warm-up and timed
repetitions (median, min-max):

- training: one step (forward, the full loss with matching, backward) at batch 2 per device;
- inference: forward + the task's post-processing at batch 1 and 16, FLOPs per image
  (``torch.utils.flop_counter``) and the forward pass's fraction of the measured matmul peak;
- the peer, torchvision's Mask R-CNN R-50-FPN at the same input size and batch, where
  torchvision can be imported (else the table says it is unavailable), and the ratios.

The tiny default runs at 128x128. The R-50 preset runs at 800x1333 on a GPU; on a CPU at
``--size`` (default 384x640, so a 2-core machine finishes in minutes). Results go to
``reports/bench.json`` and a markdown table (``reports/bench.md`` and stdout) whose header names
the device, the versions and the shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import run_measurement

TINY = ["--params", "params.yaml", "--num-things", "5", "--num-stuff", "3"]
R50 = ["--params", "configs/coco-panoptic-r50.yaml"]


def cases(size: list[str], repeats: int) -> list[tuple[str, str, list[str]]]:
    """(section, name, module arguments) of every measurement."""
    tiny = [*TINY, "--size", "128", "128", "--repeats", str(repeats * 3)]
    r50 = [*R50, "--size", *size, "--repeats", str(repeats)]
    shape = "x".join(size)
    peer = ["--size", *size, "--repeats", str(repeats)]
    step, infer = "benchmarks.model_step", "benchmarks.inference"
    knet_tiny, knet_r50 = "K-Net tiny default, 128x128", f"K-Net R-50 panoptic, {shape}"
    peer_name = f"Mask R-CNN R-50-FPN, {shape}"
    return [
        ("training", knet_tiny, [step, *tiny, "--batch", "2"]),
        ("training", knet_r50, [step, *r50, "--batch", "2"]),
        (
            "training",
            peer_name,
            ["benchmarks.maskrcnn", "--mode", "training", *peer, "--batch", "2"],
        ),
        ("inference", knet_tiny, [infer, *tiny, "--batch", "1"]),
        ("inference", knet_tiny, [infer, *tiny, "--batch", "16"]),
        ("inference", knet_r50, [infer, *r50, "--batch", "1"]),
        ("inference", knet_r50, [infer, *r50, "--batch", "16"]),
        (
            "inference",
            peer_name,
            ["benchmarks.maskrcnn", "--mode", "inference", *peer, "--batch", "1"],
        ),
        (
            "inference",
            peer_name,
            ["benchmarks.maskrcnn", "--mode", "inference", *peer, "--batch", "16"],
        ),
    ]


def _speed(row: dict) -> float | None:
    if not row.get("available", True):
        return None
    if "images_per_s_median" in row:
        return row["images_per_s_median"]
    return row["batch"] / row["step_s_median"]  # a training step of benchmarks.model_step


def ratios(rows: list[dict]) -> list[dict]:
    """K-Net R-50 over Mask R-CNN, per section and batch, where both were measured."""
    found = []
    for section in ("training", "inference"):
        for batch in (1, 2, 16):
            knet = [r for r in rows if r["section"] == section and "K-Net R-50" in r["case"]]
            peer = [r for r in rows if r["section"] == section and "Mask R-CNN" in r["case"]]
            knet = [r for r in knet if r.get("batch") == batch]
            peer = [r for r in peer if r.get("batch") == batch]
            if knet and peer and _speed(peer[0]):
                found.append(
                    {
                        "section": section,
                        "batch": batch,
                        "knet_over_maskrcnn": _speed(knet[0]) / _speed(peer[0]),
                    }
                )
    return found


def markdown(header: dict, rows: list[dict], found: list[dict]) -> str:
    peak = header["matmul_peak_tflops"]
    lines = [
        f"device {header['device']}, torch {header['torch']}, {header['threads']} threads, "
        f"Python {header['python']}; measured matmul peak {peak:.2f} TFLOP/s "
        f"({header['peak_dtype']}); median (min-max) of the timed repetitions",
        "",
        "| section | case | batch | dtype | images/s | GFLOPs/img | % of peak | peak MiB |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r.get("available", True):
            lines.append(f"| {r['section']} | {r['case']} | | | unavailable: {r['reason']} | | | |")
            continue
        if "images_per_s_median" in r:
            speed = (
                f"{r['images_per_s_median']:.2f} "
                f"({r['images_per_s_min']:.2f}-{r['images_per_s_max']:.2f})"
            )
        else:  # training step times -> images/s
            speed = (
                f"{r['batch'] / r['step_s_median']:.2f} "
                f"({r['batch'] / r['step_s_max']:.2f}-{r['batch'] / r['step_s_min']:.2f})"
            )
        gflops = f"{r['gflops_per_image']:.1f}" if "gflops_per_image" in r else ""
        share = (
            f"{100 * r['forward_tflops_per_s'] / peak:.1f}" if "forward_tflops_per_s" in r else ""
        )
        dtype = r.get("dtype", "fp32" if r.get("device") == "cpu" else "bf16 autocast")
        lines.append(
            f"| {r['section']} | {r['case']} | {r['batch']} | {dtype} | {speed} | {gflops} "
            f"| {share} | {r['peak_mem_mib']:.0f} |"
        )
    if found:
        lines += ["", "| K-Net R-50 / Mask R-CNN | batch | images/s ratio |", "|---|---:|---:|"]
        lines += [
            f"| {f['section']} | {f['batch']} | {f['knet_over_maskrcnn']:.2f}x |" for f in found
        ]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/bench.json")
    gpu = torch.cuda.is_available()
    parser.add_argument(
        "--size", nargs=2, default=["800", "1333"] if gpu else ["384", "640"], metavar=("H", "W"),
        help="the R-50 and Mask R-CNN input (default: 800x1333 on CUDA, 384x640 on CPU)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=10 if gpu else 3)
    parser.add_argument("--only", choices=["training", "inference"], help="one section")
    args = parser.parse_args(argv)
    peak = run_measurement(["-m", "benchmarks.peak"], "matmul peak")
    rows = []
    for section, name, module_args in cases(args.size, args.repeats):
        if args.only and section != args.only:
            continue
        print(f"{section}: {name} {' '.join(module_args[1:])}", file=sys.stderr, flush=True)
        row = run_measurement(["-m", *module_args], name)
        rows.append({"section": section, **row})
    header = {
        "device": peak["device"] if not gpu else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "matmul_peak_tflops": peak["tflops_per_s"],
        "peak_dtype": f"{peak['dtype']} {peak['size']}^3",
        "r50_input": [int(v) for v in args.size],
    }
    found = ratios(rows)
    text = markdown(header, rows, found)
    _write(Path(args.out), json.dumps({"header": header, "rows": rows, "ratios": found}, indent=2))
    _write(Path(args.out).with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
