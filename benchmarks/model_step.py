"""One training step (forward + full loss with matching + backward) of one config, measured.

Run alone: ``python -m benchmarks.model_step --params configs/coco-panoptic-r50.yaml
--size 800 1333 --batch 1``. Prints one JSON line: median / min / max seconds per step over the
timed repetitions after warm-up, and the process's peak resident memory (CPU) or peak CUDA
memory. Run each config in its own process (``python -m benchmarks`` does) so peaks are its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys

import torch

from benchmarks import add_case_args, peak_memory_mib, timed
from knet.config import load_config
from knet.losses import KNetCriterion
from knet.model import build_model
from knet.structures import Targets, downsample_masks


def random_targets(
    batch: int,
    height: int,
    width: int,
    things: int,
    stuff: int,
    num_thing_classes: int,
    task: str,
    gen: torch.Generator,
) -> list[Targets]:
    """Rectangles as thing masks and horizontal bands as stuff, at the padded input size."""
    targets = []
    for _ in range(batch):
        masks, labels = [], []
        for _ in range(things):
            h = int(torch.randint(height // 8, height // 3, (1,), generator=gen))
            w = int(torch.randint(width // 8, width // 3, (1,), generator=gen))
            y = int(torch.randint(0, height - h, (1,), generator=gen))
            x = int(torch.randint(0, width - w, (1,), generator=gen))
            mask = torch.zeros(height, width, dtype=torch.bool)
            mask[y : y + h, x : x + w] = True
            masks.append(mask)
            labels.append(int(torch.randint(0, num_thing_classes, (1,), generator=gen)))
        if task == "panoptic":
            band = height // max(stuff, 1)
            for s in range(stuff):
                mask = torch.zeros(height, width, dtype=torch.bool)
                mask[s * band : (s + 1) * band] = True
                masks.append(mask)
                labels.append(num_thing_classes + s)
        semantic = torch.randint(0, num_thing_classes, (height, width))
        targets.append(
            Targets(
                downsample_masks(torch.stack(masks), (height, width)),
                torch.tensor(labels),
                semantic,
            )
        )
    return targets


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    cfg = load_config(args.params, args.overrides)
    device = torch.device(args.device)
    task = cfg.model.task
    model = build_model(cfg.model, args.num_things, args.num_stuff).to(device).train()
    criterion = KNetCriterion(cfg.loss, task, args.num_things, args.num_stuff)
    divisor = cfg.data.size_divisor
    height = -(-args.size[0] // divisor) * divisor
    width = -(-args.size[1] // divisor) * divisor
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, height, width, generator=gen).to(device)
    targets = [
        t.to(device)
        for t in random_targets(
            args.batch, height, width, 10, min(5, args.num_stuff), args.num_things, task, gen
        )
    ]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        losses = criterion(model(images), targets)
        sum(losses.values()).backward()

    times = timed(step, device, args.warmup, args.repeats)
    peak = peak_memory_mib(device)
    return {
        "params": args.params,
        "task": task,
        "depth": cfg.model.backbone.depth,
        "input": [height, width],
        "batch": args.batch,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "repeats": len(times),
        "peak_mem_mib": round(peak, 1),
        "mem_before_step_mib": round(rss_before, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(parser)
    print(json.dumps(measure(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
