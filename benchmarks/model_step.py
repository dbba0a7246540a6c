"""One training step (forward + full loss with matching + backward + AdamW) of one config.

Run alone: ``python -m benchmarks.model_step --params configs/coco-panoptic-r50.yaml
--size 800 1333 --batch 1``. Prints one JSON line: median / min / max seconds per step over the
timed repetitions after warm-up, the process's peak resident memory (CPU) or peak CUDA memory,
and the step's host synchronisations (ops that would stall the host on CUDA, counted by
:class:`knet.syncs.HostSyncCounter`, and the matcher's cost transfers). Run each config in its
own process (``python -m benchmarks`` does) so peaks are its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys

import torch

import knet.method.matcher
from benchmarks import add_case_args, case_info, padded_input, peak_memory_mib, timed
from knet.config import load_config
from knet.data.dataset import Batch
from knet.method.engine import accelerate, train_step
from knet.method.losses import KNetCriterion
from knet.method.optim import build_optimizer
from knet.model import build_model
from knet.structures import Targets, downsample_masks
from knet.syncs import HostSyncCounter


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
    if args.channels_last:  # directly, so a CPU can measure it too (training: CUDA only)
        model.to(memory_format=torch.channels_last)
    if args.compile:
        accelerate(model, device, channels_last=False, compile=True)
    criterion = KNetCriterion(cfg.loss, task, args.num_things, args.num_stuff)
    optimizer = build_optimizer(model, cfg.optim)
    height, width = padded_input(args.size, cfg.data.size_divisor)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, height, width, generator=gen)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = random_targets(
        args.batch, height, width, 10, min(5, args.num_stuff), args.num_things, task, gen
    )
    size = [(height, width)] * args.batch
    batch = Batch(images, targets, size, size, list(range(args.batch)), list(range(args.batch)))
    batch = batch.to(device)
    amp = cfg.train.amp and device.type == "cuda"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:  # the training loop's own step: forward, loss + matching, AdamW
        train_step(model, criterion, batch, optimizer, cfg.optim, amp)

    times = timed(step, device, args.warmup, args.repeats)
    peak = peak_memory_mib(device)
    syncs, transfers = count_syncs(step)
    return {
        **case_info(args, cfg, device, amp, height, width),
        "compile": args.compile,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "repeats": len(times),
        "peak_mem_mib": round(peak, 1),
        "mem_before_step_mib": round(rss_before, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "host_syncs_per_step": syncs,
        "matcher_transfers_per_step": transfers,
    }


def count_syncs(step) -> tuple[int, int]:
    """Ops of one step that would stall the host on CUDA, and the matcher's cost transfers."""
    transfers = []
    original = knet.method.matcher.to_host

    def counted(tensor):
        transfers.append(1)
        return original(tensor)

    knet.method.matcher.to_host = counted
    try:
        with HostSyncCounter() as syncs:
            step()
    finally:
        knet.method.matcher.to_host = original
    return syncs.total, len(transfers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(parser)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile backbone + neck")
    print(json.dumps(measure(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
