"""``python -m benchmarks`` (``make bench``): K-Net against torchvision's Mask R-CNN, one table.

Every case runs in its own process (so its peak memory is its own), with warm-up and timed
repetitions (median, min-max):

- training: one step (forward, the full loss with matching, backward, AdamW) at batch 2 per
  device, with its host synchronisations (ops that would stall the host on CUDA, and the
  matcher's cost transfers);
- fast path: the R-50 step again with channels-last, and with ``torch.compile`` of backbone +
  neck (on CUDA, or ``--compile-cases``), each as a gain over the plain step;
- inference: forward + the task's post-processing at batch 1 and 16, FLOPs per image
  (``torch.utils.flop_counter``) and the forward pass's fraction of the measured matmul peak;
- the peer, torchvision's Mask R-CNN R-50-FPN at the same input size and batch, where
  torchvision can be imported (else the table says it is unavailable), and the ratios;
- systems (``benchmarks.systems``, in a scratch copy of the project): the plain engine loop vs
  Ray Train with 1 worker, ``dvc repro`` when nothing changed, and the train-knet flow's
  (``make pipeline``) stage breakdown.

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


def cases(
    size: list[str], repeats: int, compile_cases: bool = False
) -> list[tuple[str, str, list[str]]]:
    """(section, name, module arguments) of every measurement.

    The ``fast path`` section repeats the R-50 training step with one optimisation each
    (channels-last; ``torch.compile`` of backbone + neck where ``compile_cases``), for the
    gain over the plain ``training`` row.
    """
    tiny = [*TINY, "--size", "128", "128", "--repeats", str(repeats * 3)]
    r50 = [*R50, "--size", *size, "--repeats", str(repeats)]
    shape = "x".join(size)
    step, infer = "benchmarks.model_step", "benchmarks.inference"
    knet_tiny, knet_r50 = "K-Net tiny default, 128x128", f"K-Net R-50 panoptic, {shape}"
    peer_name = f"Mask R-CNN R-50-FPN, {shape}"

    def peer(mode: str, batch: int) -> tuple[str, str, list[str]]:
        args = ["--mode", mode, "--size", *size, "--repeats", str(repeats), "--batch", str(batch)]
        return (mode, peer_name, ["benchmarks.maskrcnn", *args])

    return [
        ("training", knet_tiny, [step, *tiny, "--batch", "2"]),
        ("training", knet_r50, [step, *r50, "--batch", "2"]),
        peer("training", 2),
        (
            "fast path",
            f"{knet_r50}, channels-last",
            [step, *r50, "--batch", "2", "--channels-last"],
        ),
        *(
            [("fast path", f"{knet_r50}, compiled", [step, *r50, "--batch", "2", "--compile"])]
            if compile_cases
            else []
        ),
        ("inference", knet_tiny, [infer, *tiny, "--batch", "1"]),
        ("inference", knet_tiny, [infer, *tiny, "--batch", "16"]),
        ("inference", knet_r50, [infer, *r50, "--batch", "1"]),
        ("inference", knet_r50, [infer, *r50, "--batch", "16"]),
        peer("inference", 1),
        peer("inference", 16),
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


def fast_path_gains(rows: list[dict]) -> list[tuple[str, float]]:
    """Each ``fast path`` row's training images/s over the plain K-Net R-50 training row."""
    base = [r for r in rows if r["section"] == "training" and "K-Net R-50" in r["case"]]
    if not base:
        return []
    return [
        (r["case"].rsplit(", ", 1)[-1], _speed(r) / _speed(base[0]))
        for r in rows
        if r["section"] == "fast path"
    ]


def systems_markdown(sys_row: dict) -> list[str]:
    """The costs around the model (``benchmarks.systems``) as a two-column table."""
    plain, ray = sys_row["plain_loop"], sys_row["ray_train_1_worker"]
    data = f"{sys_row['train_images']} + {sys_row['val_images']} synthetic images"
    lines = [
        "",
        f"| around the model ({data}) | value |",
        "|---|---:|",
        f"| plain engine loop, train images/s (wall s, {plain['epochs']} epochs) "
        f"| {plain['images_per_s']:.1f} ({plain['wall_s']:.0f} s) |",
        f"| Ray Train 1 worker, train images/s (wall s) "
        f"| {ray['images_per_s']:.1f} ({ray['wall_s']:.0f} s) |",
        f"| Ray Train 1 worker / plain loop (steady state: second half of the epochs) "
        f"| {sys_row['ray_over_plain']:.2f}x |",
        *(
            f"| Ray run, CPU-s: {role} | {seconds} |"
            for role, seconds in sorted(ray.get("cpu_s", {}).items(), key=lambda kv: -kv[1])
        ),
        f"| plain run, CPU-s in all | {plain.get('cpu_s_total', '-')} |",
        f"| `dvc repro prepare`, cold (synth + prepare) "
        f"| {sys_row['dvc_repro_prepare_cold_s']} s |",
        f"| `dvc repro prepare`, nothing changed | {sys_row['dvc_repro_noop_s']} s |",
        f"| train-knet flow ({sys_row['flow_epochs']} epochs), wall | {sys_row['flow_wall_s']} s |",
    ]
    lines += [f"| flow stage: {k} | {v} s |" for k, v in sys_row["flow_stage_s"].items()]
    quality = sys_row.get("time_to_quality")
    if quality:
        target, final = quality["target_pq"], quality["final"]
        reached = (
            f"{quality['seconds_to_target']:.0f} s (epoch {quality['epoch_at_target']})"
            if quality["seconds_to_target"] is not None
            else "not reached"
        )
        lines += [
            f"| `knet train` (default data, Ray 1 worker, validation every epoch): "
            f"wall s to the first val PQ >= {target:g} | {reached} |",
            f"| the same run: final val PQ / PQ_th, wall s | {final['pq']} / {final['pq_th']}, "
            f"{quality['wall_s']:.0f} s |",
        ]
    return lines


def markdown(header: dict, rows: list[dict], found: list[dict], sys_row: dict | None = None) -> str:
    peak = header["matmul_peak_tflops"]
    lines = [
        f"device {header['device']}, torch {header['torch']}, {header['threads']} threads, "
        f"Python {header['python']}; measured matmul peak {peak:.2f} TFLOP/s "
        f"({header['peak_dtype']}); median (min-max) of the timed repetitions",
        "",
        "| section | case | batch | dtype | images/s | GFLOPs/img | % of peak | peak MiB "
        "| host syncs / step |",
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if not r.get("available", True):
            lines.append(
                f"| {r['section']} | {r['case']} | | | unavailable: {r['reason']} | | | | |"
            )
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
        syncs = ""
        if "host_syncs_per_step" in r:
            syncs = f"{r['host_syncs_per_step']} + {r['matcher_transfers_per_step']} cost transfer"
        lines.append(
            f"| {r['section']} | {r['case']} | {r['batch']} | {dtype} | {speed} | {gflops} "
            f"| {share} | {r['peak_mem_mib']:.0f} | {syncs} |"
        )
    gains = fast_path_gains(rows)
    if gains:
        lines += ["", "| optimisation (R-50 training step) | images/s over the plain row |"]
        lines += ["|---|---:|"] + [f"| {name} | {gain:.2f}x |" for name, gain in gains]
    if found:
        lines += ["", "| K-Net R-50 / Mask R-CNN | batch | images/s ratio |", "|---|---:|---:|"]
        lines += [
            f"| {f['section']} | {f['batch']} | {f['knet_over_maskrcnn']:.2f}x |" for f in found
        ]
    if sys_row:
        lines += systems_markdown(sys_row)
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
    parser.add_argument(
        "--only", choices=["training", "inference", "fast path", "systems"], help="one section"
    )
    parser.add_argument(
        "--compile-cases", action=argparse.BooleanOptionalAction, default=gpu,
        help="measure train.compile too (default on CUDA; a CPU compile of R-50 takes minutes)",
    )  # fmt: skip
    parser.add_argument("--skip-systems", action="store_true", help="no plain/Ray/DVC/flow rows")
    parser.add_argument(
        "--systems-python", default=sys.executable,
        help="the interpreter of the systems rows, which need the whole stack (Ray, DVC, "
        "Prefect, MLflow): e.g. the project's .venv when this one only has torch + torchvision",
    )  # fmt: skip
    args = parser.parse_args(argv)
    peak = run_measurement(["-m", "benchmarks.peak"], "matmul peak")
    rows = []
    for section, name, module_args in cases(args.size, args.repeats, args.compile_cases):
        if (
            args.only
            and section != args.only
            and not (args.only == "fast path" and section == "training" and "K-Net R-50" in name)
        ):
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
    sys_row = None
    if not args.skip_systems and args.only in (None, "systems"):
        print("systems: plain vs Ray Train, dvc repro, the flow", file=sys.stderr, flush=True)
        sys_row = run_measurement(["-m", "benchmarks.systems"], "systems", args.systems_python)
    found = ratios(rows)
    text = markdown(header, rows, found, sys_row)
    report = {"header": header, "rows": rows, "ratios": found, "systems": sys_row}
    _write(Path(args.out), json.dumps(report, indent=2))
    _write(Path(args.out).with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
