"""Data pipeline speed: synth, validate and prepare images/s, prepare's peak memory, and the
training loader's images/s with 2 workers.

``python -m benchmarks.data [--images 2000 --size 512]``, on ``params.yaml`` with the sizes
overridden; each stage runs in its own process so its peak resident memory is its own (the
largest of the stage's process and the workers it started). Prints a markdown table and writes
``reports/bench_data.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import run_measurement

STAGE = r"""
import json, resource, sys, time
from knet.config import load_config
stage, params, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cfg = load_config(params, overrides)
start = time.perf_counter()
if stage == "synth":
    from knet.data.synth import generate
    generate(cfg.data.raw, cfg.data.synth, cfg.data, progress=False)
    images = cfg.data.synth.train_images + cfg.data.synth.val_images
elif stage == "validate":
    from knet.data.layout import dataset_paths
    from knet.data.validate import validate_split
    images = 0
    for split in (cfg.data.train_split, cfg.data.val_split):
        report = validate_split(dataset_paths(cfg.data, split), cfg.data.format)
        assert report.ok, report.summary()
        images += report.num_images
elif stage == "prepare":
    from knet.data.prepare import prepare
    manifest = prepare(cfg.data, progress=False)
    images = sum(s["images"] for s in manifest.splits.values())
elif stage == "loader":
    from knet.data.dataset import build_dataset, build_loader
    dataset = build_dataset(cfg.data, cfg.data.train_split, cfg.model.task, train=True)
    loader = build_loader(dataset, batch_size=cfg.train.batch_size, train=True,
                          num_workers=cfg.data.num_workers)
    images = 0
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    for batch in iterator:
        images += len(batch)
seconds = time.perf_counter() - start
# Largest single process: this one or a worker it started (synth's pool, loader workers).
peak = max(resource.getrusage(who).ru_maxrss
           for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
print(json.dumps({"stage": stage, "images": images, "seconds": seconds,
                  "images_per_s": images / seconds, "peak_rss_mib": peak}))
"""


def run_case(name: str, overrides: list[str]) -> list[dict]:
    return [
        run_measurement(["-c", STAGE, stage, "params.yaml", json.dumps(overrides)], name)
        for stage in ("synth", "validate", "prepare", "loader")
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="train images of the big set")
    parser.add_argument("--size", type=int, default=512, help="image side of the big set")
    parser.add_argument("--out", default="reports/bench_data.json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = [
            f"data.raw={tmp}/raw",
            f"data.synth.out={tmp}/raw",
            f"data.prepared={tmp}/prep",
            "data.num_workers=2",
        ]
        rows += run_case("default (300+50 @128)", base)
        big = [
            f"data.raw={tmp}/big",
            f"data.synth.out={tmp}/big",
            f"data.prepared={tmp}/bigp",
            f"data.synth.train_images={args.images}",
            "data.synth.val_images=100",
            f"data.synth.image_size={args.size}",
            f"data.min_size=[{args.size}]",
            f"data.max_size={args.size}",
            "data.num_workers=2",
        ]
        rows += run_case(f"{args.images}+100 @{args.size}", big)
    print(f"cpu cores {os.cpu_count()}, {time.strftime('%Y-%m-%d')}")
    print("| case | stage | images | seconds | images/s | peak RSS MiB (largest process) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['stage']} | {r['images']} | {r['seconds']:.2f} | "
            f"{r['images_per_s']:.1f} | {r['peak_rss_mib']:.0f} |"
        )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
