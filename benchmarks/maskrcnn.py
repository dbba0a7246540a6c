"""The peer: torchvision's Mask R-CNN R-50-FPN, measured like ``benchmarks.inference`` and
``benchmarks.model_step`` (random initialisation, the same input size and batch).

``python -m benchmarks.maskrcnn --mode inference --size 800 1333 --batch 1`` prints one JSON
line. Inference uses the settings of the performance targets (``box_score_thresh=0``, 100
detections per image, masks pasted at full resolution: torchvision's own post-processing);
training is one step of the full loss at batch 2 with 10 boxes and masks per image. Where
torchvision cannot be imported (the CPU machine's torch build has none), it prints
``{"available": false, "reason": ...}`` and exits 0, so the table says so instead of failing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from benchmarks import add_case_args, peak_memory_mib, timed


def _targets(batch: int, height: int, width: int, device: torch.device, gen: torch.Generator):
    targets = []
    for _ in range(batch):
        boxes, masks = [], torch.zeros(10, height, width, dtype=torch.uint8)
        for i in range(10):
            h = int(torch.randint(height // 8, height // 3, (1,), generator=gen))
            w = int(torch.randint(width // 8, width // 3, (1,), generator=gen))
            y = int(torch.randint(0, height - h, (1,), generator=gen))
            x = int(torch.randint(0, width - w, (1,), generator=gen))
            boxes.append([x, y, x + w, y + h])
            masks[i, y : y + h, x : x + w] = 1
        labels = torch.randint(1, 91, (10,), generator=gen)
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
                "labels": labels.to(device),
                "masks": masks.to(device),
            }
        )
    return targets


def measure(args: argparse.Namespace) -> dict:
    try:
        from torchvision.models.detection import maskrcnn_resnet50_fpn
    except Exception as err:  # ImportError, or torchvision built for another torch
        return {"available": False, "reason": f"torchvision: {type(err).__name__}: {err}"}
    torch.manual_seed(0)
    device = torch.device(args.device)
    height, width = args.size
    # min/max size = the input size, so torchvision resizes nothing and the shapes match knet's.
    model = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        box_score_thresh=0.0,
        box_detections_per_img=100,
        min_size=min(height, width),
        max_size=max(height, width),
    ).to(device)
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, height, width, generator=gen).to(device) for _ in range(args.batch)]
    amp = device.type == "cuda"
    if args.mode == "inference":
        model.eval()
    else:
        model.train()
        targets = _targets(args.batch, height, width, device, gen)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if args.mode == "inference":
                with torch.no_grad():
                    model(images)
                return
            losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    times = timed(step, device, args.warmup, args.repeats)
    peak = peak_memory_mib(device)
    return {
        "available": True,
        "model": "torchvision maskrcnn_resnet50_fpn",
        "mode": args.mode,
        "input": [height, width],
        "batch": args.batch,
        "device": str(device),
        "dtype": "bf16 autocast" if amp else "fp32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "images_per_s_median": args.batch / statistics.median(times),
        "images_per_s_min": args.batch / max(times),
        "images_per_s_max": args.batch / min(times),
        "repeats": len(times),
        "peak_mem_mib": round(peak, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["inference", "training"], default="inference")
    add_case_args(parser, size=(800, 1333), knet=False)
    print(json.dumps(measure(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
