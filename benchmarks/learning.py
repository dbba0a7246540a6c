"""Why things are (not) learned: a training study with probes, in-process, on the default data.

``python -m benchmarks.learning --seeds 0 1 --epochs 3 [--set key=value ...] [--every 50]``

Trains the config of ``params.yaml`` (+ ``--set``) with the plain engine loop (the code path
``knet train`` runs on every worker) and, every ``--every`` steps, probes the model in eval mode
on a fixed set of training images (no augmentation). Per update round ``s``:

* ``th_score``: mean class score (sigmoid, at the true class) of the thing kernels matched to the
  ground truth by round ``s``'s own predictions (Hungarian, the training costs);
  ``th_pass``: the share of those above ``model.postprocess.instance_score_threshold`` (0.3),
  i.e. the matched objects the panoptic merge keeps at all;
* ``th_acc``: the share of matched kernels whose arg-max thing class is the true class;
* ``th_iou``: mean mask IoU (0.5) of matched kernels at stride 4;
* ``un_score``: mean max thing score of the unmatched thing kernels;
* ``st_score``: mean score of the stuff kernels whose class is present.

and for stage 0: ``m0_area`` the mean share of pixels above 0.5 per thing kernel, ``m0_dead``
the share of thing kernels with no such pixel (their group feature is zero). ``grad_*`` are the
gradient norms of the last step reaching the backbone, the kernel head and the update heads.
After every epoch the val split is evaluated (PQ, PQ_th, PQ_st, AP). Each probe is one line of
``reports/learning-<tag>.jsonl``; a table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from knet.config import load_config
from knet.data.dataset import build_dataset, build_loader, collate
from knet.method.engine import EpochSettings, train_one_epoch
from knet.method.losses import KNetCriterion
from knet.method.matcher import HungarianMatcher
from knet.method.metrics import accumulate_metrics, summarize
from knet.method.optim import build_optimizer, build_scheduler
from knet.model import build_model

PROBE_IMAGES = 32


@torch.no_grad()
def probe(model, batch, criterion, threshold: float) -> dict[str, float]:
    """The probe numbers (see the module docstring) on one fixed batch."""
    was_training = model.training
    model.eval()
    outputs = model(batch.images)
    model.train(was_training)
    num_things = outputs.stages[0].mask_logits.shape[1]
    t = criterion.num_thing_classes
    out: dict[str, float] = {}
    m0 = outputs.stages[0].mask_logits.sigmoid() > 0.5  # (B, N, h, w)
    area = m0.flatten(2).float().mean(-1)  # (B, N)
    out["m0_area"] = float(area.mean())
    out["m0_dead"] = float((area == 0).float().mean())
    matcher = HungarianMatcher(
        criterion.cfg.match_cls_cost, criterion.cfg.match_dice_cost, criterion.cfg.match_mask_cost
    )
    gt_masks, gt_labels = [], []
    for target in batch.targets:
        things = target.labels < t
        gt_masks.append(target.masks[things])
        gt_labels.append(target.labels[things])
    for s, stage in enumerate(outputs.stages[1:], start=1):
        up = torch.nn.functional.interpolate(stage.mask_logits, scale_factor=2.0, mode="bilinear")
        cls = stage.cls_logits[:, :num_things, :t]
        matches = matcher(up[:, :num_things], cls, gt_masks, gt_labels)
        scores, correct, ious, unmatched = [], [], [], []
        for b, (rows, cols) in enumerate(matches):
            probs = cls[b].sigmoid()  # (N, T)
            labels = gt_labels[b][cols]
            scores += probs[rows, labels].tolist()
            correct += (probs[rows].argmax(1) == labels).float().tolist()
            pred = up[b, rows] > 0
            gt = gt_masks[b][cols] > 0.5
            inter = (pred & gt).flatten(1).sum(1).float()
            union = (pred | gt).flatten(1).sum(1).float().clamp(min=1)
            ious += (inter / union).tolist()
            mask = torch.ones(num_things, dtype=torch.bool)
            mask[rows] = False
            unmatched += probs[mask].max(1).values.tolist()
        out[f"s{s}.th_score"] = _mean(scores)
        out[f"s{s}.th_pass"] = _mean([float(x >= threshold) for x in scores])
        out[f"s{s}.th_acc"] = _mean(correct)
        out[f"s{s}.th_iou"] = _mean(ious)
        out[f"s{s}.un_score"] = _mean(unmatched)
        if stage.cls_logits.shape[1] > num_things:
            stuff_scores = []
            for b, target in enumerate(batch.targets):
                for label in target.labels[target.labels >= t].unique().tolist():
                    k = num_things + label - t
                    stuff_scores.append(float(stage.cls_logits[b, k, label].sigmoid()))
            out[f"s{s}.st_score"] = _mean(stuff_scores)
    return out


def _mean(values: list[float]) -> float:
    return float(statistics.fmean(values)) if values else float("nan")


def grad_norms(model) -> dict[str, float]:
    parts = {"backbone": model.backbone, "kernel_head": model.kernel_head}
    parts["update_heads"] = model.update_heads
    norms = {}
    for name, module in parts.items():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        norms[f"grad_{name}"] = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    return norms


def study(seed: int, epochs: int, overrides: list[str], every: int, log: Path) -> list[dict]:
    cfg = load_config("params.yaml", [*overrides, f"train.seed={seed}", f"train.epochs={epochs}"])
    torch.manual_seed(cfg.train.seed)
    train_set = build_dataset(cfg.data, cfg.data.train_split, cfg.model.task, train=True)
    val_set = build_dataset(cfg.data, cfg.data.val_split, cfg.model.task, train=False)
    plain = build_dataset(cfg.data, cfg.data.train_split, cfg.model.task, train=False)
    cats = train_set.categories
    model = build_model(cfg.model, cats.num_things, cats.num_stuff)
    optimizer = build_optimizer(model, cfg.optim)
    loader = build_loader(
        train_set, cfg.train.batch_size, train=True, num_workers=cfg.data.num_workers, seed=seed
    )
    scheduler = build_scheduler(optimizer, cfg.optim, len(loader))
    criterion = KNetCriterion(cfg.loss, cfg.model.task, cats.num_things, cats.num_stuff)
    fixed = collate([plain[i] for i in range(PROBE_IMAGES)])
    threshold = cfg.model.postprocess.instance_score_threshold
    rows: list[dict] = []
    start = time.perf_counter()

    def record(step: int, epoch: int, extra: dict | None = None) -> None:
        row = {"seed": seed, "epoch": epoch, "step": step, "seconds": time.perf_counter() - start}
        row.update(probe(model, fixed, criterion, threshold))
        row.update(grad_norms(model))
        row.update(extra or {})
        rows.append(row)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")

    for epoch in range(epochs):
        base = epoch * len(loader)

        def on_step(step: int, base: int = base, epoch: int = epoch) -> None:
            if step and step % every == 0:
                record(base + step, epoch)

        settings = EpochSettings(cfg.optim, torch.device("cpu"), amp=False, on_step=on_step)
        train_one_epoch(model, criterion, loader, optimizer, scheduler, settings)
        metrics = accumulate_metrics(model, val_set, cfg.model.task, cats, cfg, torch.device("cpu"))
        val = summarize({name: m.compute() for name, m in metrics.items()})
        record((epoch + 1) * len(loader), epoch + 1, {f"val_{k}": v for k, v in val.items()})
        print(
            f"seed {seed} epoch {epoch + 1}: PQ {val.get('pq', float('nan')):.1f} "
            f"PQ_th {val.get('pq_th', float('nan')):.1f} PQ_st {val.get('pq_st', float('nan')):.1f}"
            f" AP {val.get('ap', float('nan')):.1f}  {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    return rows


COLUMNS = [
    "step",
    "m0_area",
    "m0_dead",
    "s1.th_score",
    "s1.th_iou",
    "s3.th_score",
    "s3.th_pass",
    "s3.th_acc",
    "s3.th_iou",
    "s3.un_score",
    "s3.st_score",
    "grad_backbone",
    "grad_kernel_head",
    "grad_update_heads",
    "val_pq",
    "val_pq_th",
]


def table(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = ["| seed | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--set", dest="overrides", nargs="*", default=[])
    parser.add_argument("--tag", default="study")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    log = Path("reports") / f"learning-{args.tag}.jsonl"
    log.parent.mkdir(exist_ok=True)
    log.unlink(missing_ok=True)
    rows = []
    for seed in args.seeds:
        rows += study(seed, args.epochs, args.overrides, args.every, log)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
