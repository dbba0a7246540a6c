"""``knet data prepare``: raw dataset -> validated, indexed split files the loaders read fast.

Output (``data.prepared``)::

    manifest.json              counts per class, image sizes, content hash, skipped items
    <split>/index.json         categories (training-id order), images, offsets into segments
    <split>/segments.jsonl     one line per image: its segments as COCO RLE with training ids
    <split>/semantic/<id>.png  semantic_png format only: labels as training ids, 255 = ignore

Images stay where they are in the raw dataset (``index.json`` stores the path of the image
folder relative to the split folder), so preparing COCO does not copy 18 GB.

The whole output is written atomically: a failed or interrupted prepare leaves the previous
output untouched and no partial folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from knet.config import DataConfig
from knet.data import DataError
from knet.data.categories import Categories
from knet.data.layout import IMAGE_SUFFIXES, DatasetPaths, confined, dataset_paths
from knet.data.validate import DatasetValidationError, ValidationReport, validate_split
from knet.io import atomic_directory, check_output_dir, dumps

log = logging.getLogger(__name__)

INDEX_VERSION = 1


@dataclass
class SplitSummary:
    """What ``prepare`` wrote for one split (it goes into the manifest)."""

    images: int = 0
    segments: int = 0
    crowd_segments: int = 0
    per_class: Counter = field(default_factory=Counter)
    heights: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    num_categories: int = 0
    # sqrt(area) / shorter image side of every non-crowd thing segment (scale advice).
    thing_sizes: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        sizes = {}
        if self.heights:
            sizes = {
                "min_height": min(self.heights),
                "max_height": max(self.heights),
                "min_width": min(self.widths),
                "max_width": max(self.widths),
                "mean_height": round(float(np.mean(self.heights)), 1),
                "mean_width": round(float(np.mean(self.widths)), 1),
            }
        return {
            "images": self.images,
            "segments": self.segments,
            "crowd_segments": self.crowd_segments,
            "segments_per_class": dict(sorted(self.per_class.items())),
            "image_sizes": sizes,
            "thing_sizes": _quantiles(self.thing_sizes),
            "skipped": self.skipped,
            "notes": self.notes,
        }


@dataclass(frozen=True)
class PreparedData:
    """What ``knet data prepare`` wrote: the manifest (``manifest.json`` holds these fields as
    JSON, through :func:`knet.io.dumps`)."""

    format: str  # data.format
    raw: str  # the raw dataset it was prepared from
    index_version: int
    splits: dict[str, dict[str, Any]]  # split -> images, segments, skipped problems, ...
    content_hash: str  # of every prepared file (what `dvc` and the lineage tags pin)
    # Wall seconds per split. Not written to manifest.json: the same raw data and code must give
    # the same bytes, or DVC sees a new `data/prepared` on every rerun and retrains.
    seconds: dict[str, float] = field(default_factory=dict, compare=False)

    def manifest_json(self) -> dict[str, Any]:
        """The fields ``manifest.json`` holds (everything but the timing)."""
        fields = asdict(self)
        del fields["seconds"]
        return fields


def prepare(
    cfg: DataConfig,
    out: str | Path | None = None,
    strict: bool = True,
    progress: bool = True,
) -> PreparedData:
    """Validate and index the train and val splits of ``cfg.raw`` into ``out`` (``cfg.prepared``).

    Args:
        strict: fail with the full validation report on any error (nothing is written);
            otherwise skip the images with errors and record them in the manifest.

    Returns:
        The :class:`PreparedData` manifest (also written to ``out/manifest.json``).

    Raises:
        DatasetValidationError: strict mode and the dataset has errors.
    """
    out = Path(cfg.prepared if out is None else out)
    check_output_dir(out, "prepared")  # before minutes of validation
    splits = list(dict.fromkeys([cfg.train_split, cfg.val_split]))  # once when they are equal
    reports = {}
    for split in splits:
        report = validate_split(
            dataset_paths(cfg, split),
            cfg.format,
            progress=progress,
            ignore_values=cfg.semantic_ignore,
        )
        if strict and not report.ok:
            raise DatasetValidationError(report)
        reports[split] = report
    prepared: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    with atomic_directory(out, "prepared") as tmp:
        for split in splits:
            summary = prepare_split(
                dataset_paths(cfg, split),
                cfg.format,
                tmp / split,
                reports[split],
                progress=progress,
            )
            prepared[split] = summary.to_json()
            seconds[split] = summary.seconds
            _refuse_empty(summary, split, cfg)
        manifest = PreparedData(
            format=cfg.format,
            raw=str(cfg.raw),
            index_version=INDEX_VERSION,
            splits=prepared,
            content_hash=content_hash(tmp),
            seconds=seconds,
        )
        (tmp / "manifest.json").write_text(dumps(manifest.manifest_json(), indent=2) + "\n")
    return manifest


def _quantiles(values: list[float]) -> dict[str, float]:
    """Count and 10 / 50 / 90 % quantiles (empty dict for no values)."""
    if not values:
        return {}
    q = np.quantile(np.asarray(values), [0.1, 0.5, 0.9])
    return {
        "count": len(values),
        "p10": round(float(q[0]), 4),
        "p50": round(float(q[1]), 4),
        "p90": round(float(q[2]), 4),
    }


MASK_STRIDE = 8  # the update rounds' mask map (spec §3); masks are upsampled x2 from it


def scale_advice(split: dict[str, Any], test_size: int, min_cells: float = 2.5) -> str | None:
    """A warning when the split's typical thing is only a few cells of the stride-8 mask map.

    ``split`` is one split's entry of the manifest; sizes are taken at the test scale (shorter
    side ``data.test_size``). Returns None when the median thing spans ``min_cells`` or more.
    """
    sizes = split.get("thing_sizes") or {}
    if not sizes:
        return None
    cells = {k: sizes[k] * test_size / MASK_STRIDE for k in ("p10", "p50", "p90")}
    if cells["p50"] >= min_cells:
        return None
    needed = math.ceil(min_cells * MASK_STRIDE / sizes["p50"] / 32) * 32
    return (
        f"things are small for K-Net's stride-{MASK_STRIDE} masks: at data.test_size="
        f"{test_size} the median thing is {sizes['p50'] * test_size:.0f} px across, "
        f"{cells['p50']:.1f} mask cells (10 % of them under {cells['p10']:.1f}); thin or small "
        f"objects will be missed. Train and test larger: data.test_size={needed} with "
        f"data.min_size / data.max_size scaled alike (the masks need about {min_cells:g} "
        f"cells across)"
    )


class EmptyDatasetError(DataError, ValueError):
    """Preparation would publish a split with no images or a dataset with no categories."""


def _refuse_empty(summary: SplitSummary, split: str, cfg: DataConfig) -> None:
    """Never publish less than something: an empty split would replace a good dataset."""
    if summary.images == 0:
        raise EmptyDatasetError(
            f"split {split!r} of {cfg.raw} has no usable images ({len(summary.skipped)} "
            f"problems skipped; check data.images={cfg.images!r} and the annotation paths); "
            f"nothing was written"
        )
    if summary.num_categories == 0:
        raise EmptyDatasetError(
            f"split {split!r} of {cfg.raw} lists no categories; nothing was written"
        )


def prepare_split(
    paths: DatasetPaths,
    fmt: str,
    out: Path,
    report: ValidationReport,
    progress: bool = True,
) -> SplitSummary:
    """Write ``index.json`` and ``segments.jsonl`` for one split into ``out`` (a fresh folder)."""
    start = time.perf_counter()
    out.mkdir(parents=True)
    summary = SplitSummary()
    bad = report.bad_image_ids()
    summary.skipped = [str(p) for p in report.errors]
    summary.notes = [str(p) for p in report.problems if p.level == "info"]
    categories, records = _read_split(paths, fmt, bad, out)
    summary.num_categories = len(categories.names)
    images = []
    with open(out / "segments.jsonl", "wb") as segments_file:
        for record, segments in tqdm(
            records, desc=f"prepare {paths.split}", unit="img", disable=not progress
        ):
            record["offset"] = segments_file.tell()
            segments_file.write(dumps(segments, separators=(",", ":")).encode() + b"\n")
            images.append(record)
            summary.images += 1
            summary.heights.append(record["height"])
            summary.widths.append(record["width"])
            for seg in segments:
                summary.segments += 1
                summary.crowd_segments += int(seg["iscrowd"])
                summary.per_class[categories.names[seg["category"]]] += 1
                if categories.is_thing[seg["category"]] and not seg["iscrowd"] and "area" in seg:
                    shorter = min(record["height"], record["width"])
                    summary.thing_sizes.append(math.sqrt(seg["area"]) / shorter)
    index = {
        "version": INDEX_VERSION,
        "split": paths.split,
        "format": fmt,
        "image_root": os.path.relpath(paths.images, out),
        "categories": categories.to_json(),
        "images": images,
    }
    (out / "index.json").write_text(dumps(index, separators=(",", ":")))
    summary.seconds = time.perf_counter() - start
    log.info("prepared %s: %d images, %d segments", paths.split, summary.images, summary.segments)
    return summary


Record = tuple[dict[str, Any], list[dict[str, Any]]]


def _read_split(
    paths: DatasetPaths, fmt: str, bad: set[int], out: Path
) -> tuple[Categories, Iterator[Record]]:
    if fmt == "coco_panoptic":
        return _read_panoptic(paths, bad)
    if fmt == "coco_instance":
        return _read_instance(paths, bad)
    if fmt == "semantic_png":
        return _read_semantic(paths, bad, out)
    raise ValueError(
        f"data.format {fmt!r} is not one of coco_panoptic, coco_instance, semantic_png"
    )


def _image_record(image: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": int(image["id"]),
        "file_name": image["file_name"],
        "height": int(image["height"]),
        "width": int(image["width"]),
    }


def _encode(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _read_panoptic(paths: DatasetPaths, bad: set[int]) -> tuple[Categories, Iterator[Record]]:
    data = json.loads(paths.panoptic_json.read_text())
    categories = Categories.from_coco(data["categories"])
    annotations = {int(a["image_id"]): a for a in data["annotations"]}

    def records() -> Iterator[Record]:
        for image in data["images"]:
            if int(image["id"]) in bad:
                continue
            ann = annotations[int(image["id"])]
            png = confined(paths.panoptic_dir, ann["file_name"], paths.root)
            rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.uint32)
            ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]  # (H, W)
            segments = []
            for seg in ann["segments_info"]:
                mask = ids == int(seg["id"])
                segments.append(
                    {
                        "id": int(seg["id"]),
                        "category": categories.train_id(int(seg["category_id"])),
                        "iscrowd": int(seg.get("iscrowd", 0)),
                        "area": int(mask.sum()),
                        "rle": _encode(mask),
                    }
                )
            yield _image_record(image), segments

    return categories, records()


def _read_instance(paths: DatasetPaths, bad: set[int]) -> tuple[Categories, Iterator[Record]]:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress to stdout
        coco = COCO(str(paths.instances_json))
    categories = Categories.from_coco(coco.loadCats(coco.getCatIds()), default_isthing=True)

    def records() -> Iterator[Record]:
        for image_id in sorted(coco.getImgIds()):
            if image_id in bad:
                continue
            image = coco.loadImgs(image_id)[0]
            segments = []
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
                rle = coco.annToRLE(ann)
                if isinstance(rle["counts"], bytes):
                    rle = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
                segments.append(
                    {
                        "id": int(ann["id"]),
                        "category": categories.train_id(int(ann["category_id"])),
                        "iscrowd": int(ann.get("iscrowd", 0)),
                        "area": int(mask_utils.area(rle)),
                        "rle": rle,
                    }
                )
            yield _image_record(image), segments

    return categories, records()


def _read_semantic(
    paths: DatasetPaths, bad: set[int], out: Path
) -> tuple[Categories, Iterator[Record]]:
    categories = Categories.from_coco(
        json.loads(paths.categories_json.read_text()), default_isthing=False
    )
    lut = np.full(256, 255, dtype=np.uint8)  # pixel value -> training id, 255 = ignore
    for train_id, category_id in enumerate(categories.ids):
        lut[category_id] = train_id
    files = sorted(p for p in paths.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    (out / "semantic").mkdir()

    def records() -> Iterator[Record]:
        for image_id, path in enumerate(files, start=1):
            if image_id in bad:
                continue
            label = np.asarray(Image.open(paths.semantic_dir / f"{path.stem}.png"))
            Image.fromarray(lut[label]).save(out / "semantic" / f"{image_id}.png")
            record = {
                "id": image_id,
                "file_name": path.name,
                "height": label.shape[0],
                "width": label.shape[1],
                "semantic": f"semantic/{image_id}.png",
            }
            yield record, []

    return categories, records()


def content_hash(folder: Path) -> str:
    """SHA-256 over every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name == "manifest.json" and path.parent == folder:
            continue
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


__all__ = ["DatasetValidationError", "content_hash", "prepare", "prepare_split"]
