"""K-Net against torchvision's Mask R-CNN on real micrographs, at the same training wall-clock.

The data is the nuclei preset (``knet data nuclei``: StarDist's packaged micrograph with hand
made masks, 117 train / 4 held-out val tiles). Both models start from random weights:

1. ``knet train --params configs/nuclei-instance.yaml`` (in-process, tracking off) is timed
   from process start to exit, its own validations included; that wall time is the budget.
   ``knet evaluate`` then writes its COCO instance results for the val tiles.
2. Mask R-CNN (``maskrcnn_resnet50_fpn`` or ``--backbone resnet18``, all layers trainable,
   BatchNorm, as torchvision builds it without weights) trains on the same tiles at the same
   scales (shorter side 224-288, flips; tested at 256) with SGD for the same number of wall
   seconds, counting only its training steps; then it predicts the val tiles.
3. Both result files are scored by the same pycocotools ``COCOeval`` (``segm``) against the raw
   ``instances_val.json``.

Needs torchvision, which the stack's CPU torch build lacks: run it with a torch + torchvision
interpreter and point ``--knet-python`` at the stack's (see ``benchmarks/README``)::

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        numpy pillow pycocotools
    /tmp/tv/bin/python -m benchmarks.real_images --knet-python .venv/bin/python

Prints a table and one JSON line; ``--out`` also writes it (default ``reports/real_images.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PARAMS = "configs/nuclei-instance.yaml"
RAW = Path("data/raw/nuclei")


def run_knet(python: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Train and evaluate K-Net with the preset; returns wall seconds and the results file."""
    common = ["--params", PARAMS, "--set", "tracking.enabled=false", *args.knet_set]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    checkpoint = out / "knet" / "model.pt"
    train = [
        python,
        "-m",
        "knet",
        "train",
        *common,
        "train.num_workers=0",
        f"train.seed={args.seed}",
        f"train.output={checkpoint}",
        f"train.metrics={out / 'knet' / 'train.json'}",
    ]
    start = time.perf_counter()
    subprocess.run(train, check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    evaluate = [
        python,
        "-m",
        "knet",
        "evaluate",
        *common,
        f"evaluate.checkpoint={checkpoint}",
        f"evaluate.out={out / 'knet' / 'eval'}",
        f"evaluate.metrics={out / 'knet' / 'eval.json'}",
        "evaluate.kernel_maps=false",
    ]
    subprocess.run(evaluate, check=True, env=env, stdout=subprocess.DEVNULL)
    results = json.loads((out / "knet" / "eval" / "instances_results.json").read_text())
    return {"seconds": seconds, "results": results}


def _coco(path: Path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _samples(coco) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Each image as float CHW in 0..1 with its boxes (xyxy), labels and masks."""
    import torch
    from PIL import Image

    samples = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        image = np.array(Image.open(RAW / "train" / info["file_name"]).convert("RGB"))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        masks = (
            np.stack([coco.annToMask(a) for a in anns]) if anns else np.zeros((0, *image.shape[:2]))
        )
        boxes = [
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
            for a in anns
        ]
        samples.append(
            (
                torch.from_numpy(image).permute(2, 0, 1).float() / 255.0,
                {
                    "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.ones(len(anns), dtype=torch.int64),
                    "masks": torch.from_numpy(masks.astype(np.uint8)),
                },
            )
        )
    return samples


def _flip(image, target):
    target = dict(target)
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"], target["masks"] = boxes, target["masks"].flip(-1)
    return image.flip(-1), target


def run_maskrcnn(args: argparse.Namespace, budget: float) -> dict[str, Any]:
    """Train Mask R-CNN from scratch for ``budget`` seconds of steps; COCO results on val."""
    import torch
    from PIL import Image
    from pycocotools import mask as mask_utils
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.mask_rcnn import MaskRCNN

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    sizes = dict(min_size=(224, 256, 288), max_size=288, box_detections_per_img=100)
    if args.backbone == "resnet50":
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, **sizes)
    else:
        backbone = resnet_fpn_backbone(
            backbone_name=args.backbone,
            weights=None,
            trainable_layers=5,
            norm_layer=torch.nn.BatchNorm2d,
        )
        model = MaskRCNN(backbone, num_classes=2, **sizes)
    train = _samples(_coco(RAW / "annotations" / "instances_train.json"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    steps, spent, losses = 0, 0.0, []
    while spent < budget:
        start = time.perf_counter()
        batch = [train[i] for i in rng.sample(range(len(train)), args.batch)]
        batch = [_flip(*s) if rng.random() < 0.5 else s for s in batch]
        warm = min(1.0, (steps + 1) / args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * (0.001 + 0.999 * warm)
        loss_dict = model([s[0] for s in batch], [s[1] for s in batch])
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        if math.isfinite(float(loss.detach())):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
        losses.append(float(loss.detach()))
        steps += 1
        spent += time.perf_counter() - start
    model.eval()
    model.transform.min_size = (256,)
    val = _coco(RAW / "annotations" / "instances_val.json")
    results = []
    with torch.no_grad():
        for image_id in sorted(val.getImgIds()):
            info = val.loadImgs(image_id)[0]
            image = np.array(Image.open(RAW / "val" / info["file_name"]).convert("RGB"))
            tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
            pred = model([tensor])[0]
            for mask, score in zip(pred["masks"][:, 0] > 0.5, pred["scores"], strict=True):
                rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": 1,
                        "score": float(score),
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    }
                )
    return {
        "seconds": spent,
        "steps": steps,
        "images_seen": steps * args.batch,
        "loss_last_50": float(np.mean(losses[-50:])),
        "results": results,
    }


def mask_ap(results: list[dict[str, Any]]) -> dict[str, float]:
    """COCO segm AP / AP50 / AP75 (percent) of results against the raw val annotations."""
    from pycocotools.cocoeval import COCOeval

    gt = _coco(RAW / "annotations" / "instances_val.json")
    if not results:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {
        k: round(100 * float(evaluator.stats[i]), 1)
        for k, i in (("ap", 0), ("ap50", 1), ("ap75", 2))
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--knet-python", default=sys.executable)
    parser.add_argument("--knet-set", nargs="*", default=[], help="extra KEY=VALUE for knet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="resnet50", choices=["resnet50", "resnet18"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--budget", type=float, default=0.0, help="Mask R-CNN seconds (0: K-Net's)")
    parser.add_argument("--skip-knet", action="store_true", help="only Mask R-CNN (needs --budget)")
    parser.add_argument("--work", default="outputs/bench-real")
    parser.add_argument("--out", default="reports/real_images.json")
    args = parser.parse_args(argv)
    if not (RAW / "annotations" / "instances_val.json").is_file():
        parser.error(f"{RAW} is missing: run `knet data nuclei` first")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"seed": args.seed, "threads": __import__("torch").get_num_threads()}
    budget = args.budget
    if not args.skip_knet:
        knet = run_knet(args.knet_python, args, work)
        row["knet"] = {"seconds": round(knet["seconds"], 1), **mask_ap(knet["results"])}
        budget = budget or knet["seconds"]
    if budget <= 0:
        parser.error("--skip-knet needs --budget SECONDS")
    mrcnn = run_maskrcnn(args, budget)
    row["maskrcnn"] = {
        "backbone": args.backbone,
        "seconds": round(mrcnn["seconds"], 1),
        "steps": mrcnn["steps"],
        "images_seen": mrcnn["images_seen"],
        "loss_last_50": round(mrcnn["loss_last_50"], 3),
        **mask_ap(mrcnn["results"]),
    }
    print("| model | train s | AP | AP50 | AP75 |")
    print("|---|---|---|---|---|")
    for name in ("knet", "maskrcnn"):
        if name in row:
            r = row[name]
            label = (
                "K-Net"
                if name == "knet"
                else f"Mask R-CNN {args.backbone}-FPN ({r['steps']} steps)"
            )
            print(f"| {label} | {r['seconds']} | {r['ap']} | {r['ap50']} | {r['ap75']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
