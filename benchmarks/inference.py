"""Inference of one config, measured: forward + post-processing, images/s, memory and FLOPs.

Run alone: ``python -m benchmarks.inference --params configs/coco-panoptic-r50.yaml --size 800
1333 --batch 16``. Prints one JSON line: images/s (median, min, max over the timed repetitions
after warm-up; post-processing of the config's task included), the forward/post-processing
split, peak memory (CUDA allocator, or the process's peak RSS on CPU), model FLOPs per image
counted with ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass, and the achieved
FLOP/s of the forward pass. Run each case in its own process (``python -m benchmarks`` does) so
the peak is its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import add_case_args, case_info, padded_input, peak_memory_mib
from knet.config import load_config
from knet.data.dataset import Batch
from knet.method.engine import autocast, predict_batch
from knet.model import build_model


def count_flops(model: torch.nn.Module, images: torch.Tensor, amp: bool) -> int:
    """FLOPs of one forward pass over ``images`` (matmuls and convolutions, as PyTorch counts)."""
    with torch.no_grad(), autocast(images.device, amp), FlopCounterMode(display=False) as counter:
        model(images)
    return int(counter.get_total_flops())


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    cfg = load_config(args.params, args.overrides)
    device = torch.device(args.device)
    model = build_model(cfg.model, args.num_things, args.num_stuff).to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    height, width = padded_input(args.size, cfg.data.size_divisor)
    images = torch.randn(args.batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    images = images.to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    size = [(height, width)] * args.batch
    batch = Batch(images, [], size, size, list(range(args.batch)), list(range(args.batch)))
    amp = cfg.train.amp and device.type == "cuda"  # bf16 autocast on CUDA only, as in training
    flops = count_flops(model, images, amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for i in range(args.warmup + args.repeats):
        _, _, seconds = predict_batch(
            model,
            batch,
            [cfg.model.task],
            args.num_things,
            args.num_stuff,
            cfg.model.postprocess,
            amp,
        )
        if i >= args.warmup:
            runs.append(seconds)
    totals = [r["forward_s"] + r["postprocess_s"] for r in runs]
    forward = statistics.median(r["forward_s"] for r in runs)
    peak = peak_memory_mib(device)
    return {
        **case_info(args, cfg, device, amp, height, width),
        "images_per_s_median": args.batch / statistics.median(totals),
        "images_per_s_min": args.batch / max(totals),
        "images_per_s_max": args.batch / min(totals),
        "forward_s_median": forward,
        "postprocess_s_median": statistics.median(r["postprocess_s"] for r in runs),
        "repeats": len(runs),
        "gflops_per_image": flops / args.batch / 1e9,
        "forward_tflops_per_s": flops / forward / 1e12,
        "peak_mem_mib": round(peak, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(parser)
    parser.add_argument("--channels-last", action="store_true")
    print(json.dumps(measure(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
