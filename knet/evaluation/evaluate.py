"""``knet evaluate``: PQ / mask AP / mIoU of a model on a prepared split, with prediction files.

Writes (paths configurable):

    metrics/eval.json             flat DVC metrics in percent: pq, pq_th, pq_st, sq, rq, ap, ...
    metrics/eval_per_class.csv    one row per class: pq, sq, rq, ap, iou (percent), tp, fp, fn
    outputs/eval/panoptic/*.png   COCO panoptic prediction PNGs (id = R + 256 G + 256^2 B)
    outputs/eval/panoptic.json    their segments_info (dataset category ids, scores)
    outputs/eval/instances_results.json   COCO instance results (RLE), for COCOeval
    outputs/eval/kernel_maps.png, stage_masks_<image>.png   with ``kernel_maps=True``

A panoptic model reports all three metrics (AP from its thing kernels, mIoU from its panoptic
output), an instance model AP, a semantic model mIoU.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from knet.config import Config, absolute_paths, load_config
from knet.data.categories import Categories
from knet.data.dataset import Batch, PreparedDataset, build_dataset
from knet.io import atomic_directory, check_output_dir, check_output_file, dumps, write_output_file
from knet.method.checkpoint import load_model
from knet.method.metrics import accumulate_metrics, as_percent, summarize
from knet.method.postprocess import PanopticResult
from knet.method.visualize import kernel_activation_grid, stage_masks_figure
from knet.model import KNet, KNetOutput
from knet.tracking import log_output_run

log = logging.getLogger(__name__)

KERNEL_GRID = 32  # common size of the kernel activation maps
STAGE_FIGURES = 3  # images with a per-stage mask figure
STAGE_KERNELS = 8  # kernels shown per figure


@dataclass(frozen=True)
class Evaluation:
    """What ``knet evaluate`` measured and wrote (printed as JSON of its metrics)."""

    metrics: dict[str, float]  # flat, in percent: pq, pq_th, ..., ap, miou; NaN: no value
    source: str  # the checkpoint or model URI evaluated
    out: str  # the prediction files' folder
    metrics_file: str | None  # the DVC metrics JSON (and the per-class CSV beside it)
    run_id: str | None  # its MLflow run, when tracking is on


def evaluate_checkpoint(  # 13 parameters: one per `knet evaluate` option (the API mirrors it)
    checkpoint: str | Path | None = None,
    params: str | Path | None = "params.yaml",
    overrides: tuple[str, ...] | list[str] = (),
    *,
    split: str | None = None,
    out: str | Path | None = None,
    metrics_file: str | Path | None = None,
    kernel_maps: bool | None = None,
    write_metrics: bool = True,
    device: str = "cpu",
    progress: bool = True,
    max_images: int | None = None,
    loaded: tuple[KNet, Config, Categories] | None = None,
    source: str | None = None,
) -> Evaluation:
    """Evaluate the model stored in ``checkpoint`` on the data that ``params`` describe.

    The model (architecture, weights, categories) comes from the checkpoint, or from
    ``loaded`` (model, its config, categories: e.g. a registered version, named ``source``);
    the data, the image sizes and the post-processing settings from ``params`` +
    ``overrides``. Arguments left as None take their value from the ``evaluate`` section of
    the params. With tracking on and the metrics file written, the evaluation is also an
    MLflow run (:func:`log_evaluation`), a child of the checkpoint's training run.
    """
    cfg = load_config(params, overrides)
    ev = cfg.evaluate
    check_output_dir(out or ev.out, "eval")  # before minutes of loading and inference
    if write_metrics:
        check_metrics_file(metrics_file or ev.metrics)
    info: dict[str, Any] = {}
    if loaded is None:
        source = str(checkpoint or ev.checkpoint)
        loaded = load_model(source, device=device, info=info)
    model, trained, categories = loaded
    flat = evaluate_model(
        model,
        trained.model.task,
        categories,
        cfg,
        split=split or ev.split or None,
        out=out or ev.out,
        metrics_file=(metrics_file or ev.metrics) if write_metrics else None,
        kernel_maps=ev.kernel_maps if kernel_maps is None else kernel_maps,
        progress=progress,
        max_images=max_images,
    )
    run_id = None
    if write_metrics and cfg.tracking.enabled:
        run_id = log_evaluation(
            cfg,
            source or "model",
            flat,
            Path(out or ev.out),
            Path(metrics_file or ev.metrics),
            info.get("mlflow_run_id"),
        )
    return Evaluation(
        metrics=flat,
        source=source or "model",
        out=str(out or ev.out),
        metrics_file=str(metrics_file or ev.metrics) if write_metrics else None,
        run_id=run_id,
    )


def log_evaluation(
    cfg: Config,
    source: str,
    flat: dict[str, float],
    out: Path,
    metrics_file: Path,
    trained_run_id: str | None,
) -> str:
    """The evaluation as an MLflow run: its metrics, the metrics file and per-class CSV, and
    the pictures of ``out`` (kernel maps, per-stage masks) as artifacts; nested under the
    training run when that run is in the same store. Returns the run id."""
    tracking = absolute_paths(cfg, Path.cwd()).tracking  # the project's store, as training's
    files = [p for p in (metrics_file, per_class_path(metrics_file)) if p.is_file()]
    pictures = sorted(out.glob("*.png"))[:EVALUATION_PICTURES]
    return log_output_run(
        tracking,
        f"evaluate-{Path(source).stem}",
        "evaluation",
        source,
        trained_run_id,
        flat,
        [(p, "evaluation") for p in files] + [(p, "evaluation/pictures") for p in pictures],
    )


# Pictures of the evaluation folder (kernel maps, per-stage masks) copied into its MLflow run.
EVALUATION_PICTURES = 20


def check_metrics_file(path: str | Path) -> None:
    """Refuse a metrics path (or its per-class CSV) knet may not write, before any work: a
    folder, or a file knet did not write (:func:`knet.io.check_output_file`); found only at
    the end, it would fail after the prediction files were replaced."""
    path = Path(path)
    for target in (path, per_class_path(path)):
        check_output_file(target, METRICS_KIND)


METRICS_KIND = "metrics"  # the ledger's kind of the DVC metrics files knet writes


def per_class_path(metrics_file: str | Path) -> Path:
    """The per-class CSV written beside ``metrics_file``."""
    path = Path(metrics_file)
    return path.with_name(path.stem + "_per_class.csv")


def evaluate_model(  # 10 parameters: the options of evaluate_checkpoint for a loaded model
    model: KNet,
    task: str,
    categories: Categories,
    cfg: Config,
    split: str | None = None,
    out: str | Path = "outputs/eval",
    metrics_file: str | Path | None = "metrics/eval.json",
    kernel_maps: bool = False,
    progress: bool = True,
    max_images: int | None = None,
) -> dict[str, float]:
    """Run the model over a prepared split and write metrics and predictions (atomically)."""
    device = next(model.parameters()).device
    dataset = build_dataset(cfg.data, split or cfg.data.val_split, task, train=False)
    _check_categories(categories, dataset)
    if max_images is not None:
        dataset.images = dataset.images[:max_images]
    kernel_view = _KernelView(categories.num_things) if kernel_maps and task != "semantic" else None
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with atomic_directory(out, "eval") as tmp:
        writer = _PanopticWriter(tmp, categories) if task == "panoptic" else None
        metrics = accumulate_metrics(
            model,
            dataset,
            task,
            categories,
            cfg,
            device,
            progress=progress,
            on_panoptic=writer.add if writer else None,
            on_outputs=kernel_view.add if kernel_view else None,
            timings=timings,
        )
        if writer is not None:
            writer.close()
        if "ap" in metrics:
            (tmp / "instances_results.json").write_text(dumps(metrics["ap"].coco_results_json()))
        if kernel_view is not None:
            kernel_view.save(tmp)
    seconds = time.perf_counter() - start
    computed = {name: metric.compute() for name, metric in metrics.items()}
    flat = summarize(computed)
    flat.update(
        images=len(dataset),
        seconds=round(seconds, 3),
        images_per_s=round(len(dataset) / seconds, 2) if seconds else 0.0,
        forward_s=round(timings.get("forward_s", 0.0), 3),
        postprocess_s=round(timings.get("postprocess_s", 0.0), 3),
    )
    if metrics_file is not None:
        check_metrics_file(metrics_file)  # again: something may have appeared meanwhile
        write_output_file(metrics_file, dumps(flat, indent=2), METRICS_KIND)
        _write_per_class(
            per_class_path(metrics_file),
            categories,
            computed,
        )
    return flat


def _check_categories(categories: Categories, dataset: PreparedDataset) -> None:
    theirs = dataset.categories
    if categories.ids != theirs.ids or categories.is_thing != theirs.is_thing:
        raise ValueError(
            f"the model was trained on {len(categories)} categories ({categories.num_things} "
            f"things, {categories.num_stuff} stuff) but {dataset.split_dir} has "
            f"{len(dataset.categories)} ({dataset.categories.num_things} things, "
            f"{dataset.categories.num_stuff} stuff) with different ids"
        )


def _write_per_class(path: Path, categories: Categories, computed: dict[str, Any]) -> None:
    columns = [
        "train_id",
        "category_id",
        "name",
        "isthing",
        "pq",
        "sq",
        "rq",
        "tp",
        "fp",
        "fn",
        "ap",
        "iou",
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for t in range(len(categories)):
        row: dict[str, Any] = {
            "train_id": t,
            "category_id": categories.ids[t],
            "name": categories.names[t],
            "isthing": int(categories.is_thing[t]),
        }
        if "pq" in computed:
            c = computed["pq"]["per_class"][t]
            row.update(
                pq=as_percent(c["pq"]),
                sq=as_percent(c["sq"]),
                rq=as_percent(c["rq"]),
                tp=c["tp"],
                fp=c["fp"],
                fn=c["fn"],
            )
        if "ap" in computed and t in computed["ap"]["per_class"]:
            row["ap"] = as_percent(computed["ap"]["per_class"][t]["ap"])
        if "miou" in computed:
            row["iou"] = as_percent(computed["miou"]["per_class"][t]["iou"])
        writer.writerow(row)
    write_output_file(path, buffer.getvalue(), METRICS_KIND)


class _PanopticWriter:
    """COCO panoptic predictions: one PNG per image and one JSON with every segments_info."""

    def __init__(self, folder: Path, categories: Categories) -> None:
        self.folder = folder
        self.categories = categories
        (folder / "panoptic").mkdir()
        self.annotations: list[dict[str, Any]] = []

    def add(self, image_id: int, result: PanopticResult) -> None:
        ids = result.segment_map.cpu().numpy().astype(np.uint32)  # (H, W)
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        file_name = f"{image_id:012d}.png"
        Image.fromarray(rgb).save(self.folder / "panoptic" / file_name)
        segments = []
        for seg in result.segments:
            ys, xs = np.nonzero(ids == seg.id)
            bbox = [
                int(xs.min()),
                int(ys.min()),
                int(xs.max() - xs.min() + 1),
                int(ys.max() - ys.min() + 1),
            ]
            segments.append(
                {
                    "id": seg.id,
                    "category_id": self.categories.ids[seg.label],
                    "iscrowd": 0,
                    "area": seg.area,
                    "bbox": bbox,
                    "score": round(seg.score, 5),
                }
            )
        self.annotations.append(
            {"image_id": image_id, "file_name": file_name, "segments_info": segments}
        )

    def close(self) -> None:
        data = {"annotations": self.annotations, "categories": self.categories.to_json()}
        (self.folder / "panoptic.json").write_text(dumps(data))


class _KernelView:
    """Mean thing-kernel activation over the split, and per-stage masks of a few images."""

    def __init__(self, num_thing_classes: int) -> None:
        self.num_thing_classes = num_thing_classes
        self.sum: torch.Tensor | None = None
        self.count = 0
        self.figures: list[tuple[int, Image.Image]] = []

    def add(self, batch: Batch, outputs: KNetOutput) -> None:
        num_kernels = outputs.stages[0].mask_logits.shape[1]  # thing kernels
        for b, (height, width) in enumerate(batch.image_sizes):
            h, w = math.ceil(height / 8), math.ceil(width / 8)
            probs = outputs.last.mask_logits[b, :num_kernels, :h, :w].float().sigmoid()
            grid = F.interpolate(
                probs[None], size=(KERNEL_GRID, KERNEL_GRID), mode="bilinear", align_corners=False
            )[0].cpu()  # (N, g, g)
            self.sum = grid if self.sum is None else self.sum + grid
            self.count += 1
            if len(self.figures) < STAGE_FIGURES:
                self.figures.append((batch.image_ids[b], self._stage_figure(outputs, b, h, w)))

    def _stage_figure(self, outputs: KNetOutput, b: int, h: int, w: int) -> Image.Image:
        num_kernels = outputs.stages[0].mask_logits.shape[1]
        scores = outputs.last.cls_logits[b, :num_kernels, : self.num_thing_classes]
        best = scores.float().sigmoid().amax(-1).argsort(descending=True)[:STAGE_KERNELS]
        stage_probs = [
            F.interpolate(
                s.mask_logits[b : b + 1, :num_kernels, :h, :w].float(),
                size=(48, 48),
                mode="bilinear",
                align_corners=False,
            )[0]
            .sigmoid()
            .cpu()
            .numpy()
            for s in outputs.stages
        ]
        return stage_masks_figure(stage_probs, best.tolist())

    def save(self, folder: Path) -> None:
        if self.sum is None:
            return
        kernel_activation_grid((self.sum / self.count).numpy()).save(folder / "kernel_maps.png")
        for image_id, figure in self.figures:
            figure.save(folder / f"stage_masks_{image_id}.png")
