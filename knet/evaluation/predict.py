"""``knet predict``: overlay pictures and segment JSON for images or folders of images.

Uses the same test transform and post-processing as evaluation. An unreadable image is
reported with its path and skipped; the others are still processed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from knet.config import (
    Config,
    TrackingConfig,
    absolute_paths,
    apply_override,
    config_from_dict,
    load_config,
)
from knet.data.categories import Categories
from knet.data.dataset import Batch, load_rgb
from knet.data.layout import IMAGE_SUFFIXES
from knet.data.transforms import Transform
from knet.io import check_output_dir, dumps, mark_output
from knet.method.checkpoint import load_model
from knet.method.engine import predict_batch
from knet.method.metrics import semantic_from_panoptic
from knet.method.postprocess import PanopticResult
from knet.method.visualize import instance_overlay, panoptic_overlay, semantic_overlay
from knet.model import KNet
from knet.tracking import log_output_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictSummary:
    """What ``knet predict`` wrote (the CLI prints it, the flow reads it)."""

    written: list[str] = field(default_factory=list)  # the overlay PNGs (a .json beside each)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    run_id: str | None = None  # the MLflow run holding the overlays, when tracking is on


# Overlay pictures copied into a prediction's MLflow run (the segment JSONs all go).
PREDICTION_PICTURES = 20


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders become their image files (sorted)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(item)
    return paths


def check_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """The inputs as paths, refusing one that does not exist or a set with no image at all
    (before anything is loaded or written)."""
    items = [Path(item) for item in inputs]
    for item in items:
        if not item.exists():
            raise FileNotFoundError(f"input {item} does not exist")
    if not expand_inputs(items):
        shown = ", ".join(map(str, items)) or "(none given)"
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise ValueError(f"no image files to predict in {shown} (image suffixes: {suffixes})")
    return items


def output_names(paths: list[Path]) -> list[str]:
    """One distinct output name per input: the stem, the file name where stems clash, then
    ``-2``, ``-3``... where whole names clash (same file name in two folders)."""
    stems = Counter(path.stem for path in paths)
    names: list[str] = []
    taken: set[str] = set()
    for path in paths:
        base = path.stem if stems[path.stem] == 1 else path.name
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name)
        names.append(name)
    return names


def predict_checkpoint(  # 12 parameters: the `knet predict` options and the model's origin
    inputs: Iterable[str | Path],
    checkpoint: str | Path | None,
    out: str | Path,
    task: str | None = None,
    params: str | Path | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    device: str = "cpu",
    progress: bool = True,
    loaded: tuple[KNet, Config, Categories] | None = None,
    *,
    source: str | None = None,
    parent_run_id: str | None = None,
    track: bool = True,
) -> PredictSummary:
    """Predict every input image with the checkpoint's model; see :func:`predict_images`.

    ``loaded`` is an already loaded (model, its config, categories), e.g. a registered
    version named ``source`` (its model URI) and trained in run ``parent_run_id``, used
    instead of ``checkpoint``. With ``track`` and the config's tracking on, the overlays and
    segment files also go to an MLflow run ``predict-<source>`` (:func:`log_prediction`),
    a child of the model's training run when that run is in the same store.
    """
    inputs = check_inputs(inputs)
    check_output_dir(out, "predict")  # before loading anything
    if loaded is None:
        info: dict[str, Any] = {}
        loaded = load_model(checkpoint, device, info=info)
        source, parent_run_id = str(checkpoint), info.get("mlflow_run_id")
    model, trained, categories = loaded
    if params is not None:
        cfg = load_config(params, overrides)
    else:  # the checkpoint's own config, with the overrides on top
        data = trained.to_dict()
        for item in overrides:
            apply_override(data, item)
        cfg = config_from_dict(data)
    summary = predict_images(
        inputs,
        model,
        trained.model.task,
        categories,
        cfg,
        out,
        task=task or trained.model.task,
        progress=progress,
    )
    if track and cfg.tracking.enabled and summary.written:
        tracking = absolute_paths(cfg, Path.cwd()).tracking  # the project's store
        run_id = log_prediction(tracking, source or "model", summary, parent_run_id)
        summary = dataclasses.replace(summary, run_id=run_id)
    return summary


def log_prediction(
    tracking: TrackingConfig, source: str, summary: PredictSummary, parent_run_id: str | None
) -> str:
    """A prediction as an MLflow run: the first overlay pictures and every segment JSON as
    artifacts, the counts of images written and failed as metrics. Returns the run id."""
    pictures = [Path(p) for p in summary.written]
    artifacts = [(p, "prediction/overlays") for p in pictures[:PREDICTION_PICTURES]]
    artifacts += [(p.with_suffix(".json"), "prediction/segments") for p in pictures]
    return log_output_run(
        tracking,
        f"predict-{Path(source).stem or 'model'}",
        "prediction",
        source,
        parent_run_id,
        {"images_written": len(summary.written), "images_failed": len(summary.failed)},
        artifacts,
    )


def predict_images(  # 8 parameters: a loaded model with its config, and predict's options
    inputs: Iterable[str | Path],
    model: KNet,
    model_task: str,
    categories: Categories,
    cfg: Config,
    out: str | Path,
    task: str,
    progress: bool = True,
) -> PredictSummary:
    """Write ``<stem>.png`` (overlay with legend) and ``<stem>.json`` (segments) per image.

    ``out`` must be new, empty or an earlier predict output (:func:`check_output_dir`). Inputs
    that share a stem (``a.jpg``, ``a.png``) are written as ``a.jpg.png`` and ``a.png.png``.
    """
    _check_task(model_task, task)
    check_output_dir(out, "predict")
    out = Path(out)
    written: list[str] = []
    failed: list[tuple[str, str]] = []
    made = False  # the folder is made with the first result: a run that writes none leaves none
    model.eval()
    paths = expand_inputs(inputs)
    for path, name in tqdm(
        zip(paths, output_names(paths), strict=True),
        total=len(paths),
        desc="predict",
        unit="img",
        disable=not progress,
    ):
        try:
            image = load_rgb(path)
        except Exception as err:  # PIL raises several types for unreadable files
            reason = f"cannot read image {path}: {err}"
            log.error("%s", reason)
            failed.append((str(path), reason))
            continue
        height, width = image.shape[:2]
        image, scale = fit_pixels(image, cfg.model.postprocess.max_pixels)
        if scale < 1:
            log.warning(
                "%s has %dx%d pixels, over model.postprocess.max_pixels=%d: predicted at %dx%d "
                "(scale %.4f)", path, width, height, cfg.model.postprocess.max_pixels,
                image.shape[1], image.shape[0], scale,
            )  # fmt: skip
        try:
            result = predict_image(model, model_task, categories, cfg, image, task)
            picture, segments = _render(image, result, task, categories)
        except Exception as err:  # e.g. out of memory: one image never stops the others
            reason = f"cannot predict {path} ({width}x{height}): {err}"
            log.error("%s", " ".join(reason.split()))
            failed.append((str(path), reason))
            continue
        if not made:
            check_output_dir(out, "predict")  # something may have appeared there meanwhile
            out.mkdir(parents=True, exist_ok=True)
            mark_output(out, "predict")
            made = True
        picture.save(out / f"{name}.png")
        (out / f"{name}.json").write_text(
            dumps(
                {
                    "image": str(path),
                    "task": task,
                    "height": image.shape[0],
                    "width": image.shape[1],
                    # < 1 when the image was over model.postprocess.max_pixels: the segments
                    # are at height x width, the original's sides times this
                    "scale": scale,
                    "segments": segments,
                },
                indent=1,
            )
        )
        written.append(str(out / f"{name}.png"))
    return PredictSummary(written, failed)


def fit_pixels(image: np.ndarray, max_pixels: int) -> tuple[np.ndarray, float]:
    """``image`` scaled down (area resampling) to at most ``max_pixels`` pixels, and the
    scale of its sides (1.0: unchanged)."""
    height, width = image.shape[:2]
    if height * width <= max_pixels:
        return image, 1.0
    scale = (max_pixels / (height * width)) ** 0.5
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    resized = Image.fromarray(image).resize(size, Image.Resampling.BOX)
    return np.array(resized), size[0] / width  # a writable copy (torch.from_numpy)


def predict_image(
    model: KNet, model_task: str, categories: Categories, cfg: Config, image: np.ndarray, task: str
) -> Any:
    """One (H, W, 3) uint8 RGB image -> the ``task`` result at the image's size.

    The test transform of ``cfg.data`` and the post-processing of ``cfg.model.postprocess``,
    as in evaluation; a panoptic model's semantic view is derived from its panoptic result.
    """
    _check_task(model_task, task)
    device = next(model.parameters()).device
    sample = Transform(cfg.data, train=False)(
        torch.from_numpy(image), torch.zeros(0, *image.shape[:2], dtype=torch.bool), None
    )
    batch = Batch(sample.image[None], [], [sample.image_size], [image.shape[:2]], [0], [0])
    run_task = "panoptic" if task == "semantic" and model_task == "panoptic" else task
    with torch.no_grad():
        _, per_image, _ = predict_batch(
            model,
            batch.to(device),
            (run_task,),
            categories.num_things,
            categories.num_stuff if model_task == "panoptic" else 0,
            cfg.model.postprocess,
            amp=cfg.train.amp,
        )
    return per_image[0][run_task]


def _check_task(model_task: str, task: str) -> None:
    allowed = {
        "panoptic": ("panoptic", "instance", "semantic"),
        "instance": ("instance",),
        "semantic": ("semantic",),
    }[model_task]
    if task not in allowed:
        raise ValueError(
            f"a {model_task} model cannot give {task} results (it gives {', '.join(allowed)})"
        )


def _render(
    image: np.ndarray, result: Any, task: str, categories: Categories
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """The overlay picture and the JSON-ready segments of one result."""
    segments = segments_of(result, task, categories)
    if task == "panoptic":
        return panoptic_overlay(image, result, categories), segments
    if task == "instance":
        return instance_overlay(image, result, categories), segments
    return semantic_overlay(image, semantic_map(result), categories), segments


def semantic_map(result: Any) -> np.ndarray:
    """(H, W) class ids of a semantic result, or of a panoptic result's semantic view."""
    if isinstance(result, PanopticResult):
        return semantic_from_panoptic(result)
    return result.cpu().numpy()


def segments_of(result: Any, task: str, categories: Categories) -> list[dict[str, Any]]:
    """JSON-ready segments: panoptic (id, class, score, area), instance (+ RLE), semantic."""
    if task == "panoptic":
        segments = [
            {
                "id": s.id,
                "category_id": categories.ids[s.label],
                "category": categories.names[s.label],
                "isthing": s.is_thing,
                "score": round(s.score, 4),
                "area": s.area,
            }
            for s in result.segments
        ]
        return segments
    if task == "instance":
        segments = []
        for k in range(len(result.scores)):
            mask = np.asfortranarray(result.masks[k].cpu().numpy().astype(np.uint8))
            rle = mask_utils.encode(mask)
            label = int(result.labels[k])
            segments.append(
                {
                    "category_id": categories.ids[label],
                    "category": categories.names[label],
                    "score": round(float(result.scores[k]), 4),
                    "area": int(mask_utils.area(rle)),
                    "segmentation": {
                        "size": [int(v) for v in rle["size"]],
                        "counts": rle["counts"].decode("ascii"),
                    },
                }
            )
        return segments
    classes, counts = np.unique(semantic_map(result), return_counts=True)
    return [
        {
            "category_id": categories.ids[int(c)],
            "category": categories.names[int(c)],
            "area": int(n),
        }
        for c, n in zip(classes, counts, strict=True)
        if c < len(categories)
    ]
