"""``python -m benchmarks``: the model-step benchmark for the tiny default and the R-50 preset.

Each case runs in its own process (so peak memory is its own), results go to
``reports/bench_model_step.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks import run_measurement

CASES = [
    # name, module arguments
    (
        "tiny default, 128x128, batch 1",
        [
            "--params",
            "params.yaml",
            "--size",
            "128",
            "128",
            "--num-things",
            "5",
            "--num-stuff",
            "3",
            "--repeats",
            "10",
        ],
    ),
    (
        "R-50 panoptic, 800x1333, batch 1",
        ["--params", "configs/coco-panoptic-r50.yaml", "--size", "800", "1333", "--repeats", "3"],
    ),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/bench_model_step.json")
    parser.add_argument(
        "--quick", action="store_true", help="R-50 at 384x640 instead of 800x1333 (for slow CPUs)"
    )
    args = parser.parse_args(argv)
    rows = []
    for name, case_args in CASES:
        if args.quick and "800" in case_args:
            case_args = list(case_args)
            i = case_args.index("--size")
            case_args[i + 1 : i + 3] = ["384", "640"]
            name = name.replace("800x1333", "384x640")
        rows.append(run_measurement(["-m", "benchmarks.model_step", *case_args], name))
    print(f"device {rows[0]['device']}, torch {rows[0]['torch']}, {rows[0]['threads']} threads")
    print("| case | params | step s (median, min-max) | peak memory MiB |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['parameters']:,} | {r['step_s_median']:.3f} "
            f"({r['step_s_min']:.3f}-{r['step_s_max']:.3f}) | {r['peak_mem_mib']:.0f} |"
        )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(rows, f, indent=2)
    os.replace(f.name, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
