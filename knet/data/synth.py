"""Deterministic synthetic panoptic dataset in the real COCO formats.

:func:`generate` draws small scenes of coloured shapes ("things": circles, squares, triangles,
stars, rings) in front of textured background bands ("stuff": sky, ground, water) and writes
them in exactly the layouts the loaders read for COCO 2017:

* RGB PNG images;
* COCO panoptic: one JSON plus one RGB PNG per image whose pixels encode the segment id as
  ``R + 256 * G + 256**2 * B`` (0 = void);
* COCO instances: one JSON with compressed-RLE masks of the visible thing segments only;
* semantic label PNGs (pixel = category id, 255 = void) plus a shared categories JSON.

Every image is drawn from its own :class:`numpy.random.SeedSequence` (keyed by seed, split and
index), so the output is byte-identical for a given :class:`~knet.config.SynthConfig` and an
image does not depend on any other image's random draws. The dataset is built in a temporary
sibling folder and only swapped in for ``root`` once complete, so a failure never leaves a half
written dataset behind or damages a previous one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm import tqdm

from knet.config import DataConfig, SynthConfig
from knet.data.layout import DatasetPaths, dataset_paths
from knet.io import atomic_directory

logger = logging.getLogger(__name__)

SYNTH_CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "circle", "isthing": 1, "supercategory": "shape", "color": [220, 20, 60]},
    {"id": 2, "name": "square", "isthing": 1, "supercategory": "shape", "color": [0, 130, 200]},
    {"id": 4, "name": "triangle", "isthing": 1, "supercategory": "shape", "color": [255, 180, 0]},
    {"id": 7, "name": "star", "isthing": 1, "supercategory": "shape", "color": [145, 30, 180]},
    {"id": 9, "name": "ring", "isthing": 1, "supercategory": "shape", "color": [60, 180, 75]},
    {
        "id": 20,
        "name": "sky",
        "isthing": 0,
        "supercategory": "background",
        "color": [120, 170, 230],
    },
    {
        "id": 21,
        "name": "ground",
        "isthing": 0,
        "supercategory": "background",
        "color": [130, 105, 65],
    },
    {
        "id": 23,
        "name": "water",
        "isthing": 0,
        "supercategory": "background",
        "color": [45, 95, 160],
    },
]
"""COCO-style categories (non-contiguous ids like COCO's); ``color`` is the typical colour of a
thing (``data.synth.thing_colors: class``) and the colour the visualisations use."""

_BY_NAME = {c["name"]: c for c in SYNTH_CATEGORIES}
_BY_ID = {c["id"]: c for c in SYNTH_CATEGORIES}
_THING_IDS = [c["id"] for c in SYNTH_CATEGORIES if c["isthing"]]
_NAMES = {c["id"]: c["name"] for c in SYNTH_CATEGORIES}
_SKY, _GROUND, _WATER = (_BY_NAME[n]["id"] for n in ("sky", "ground", "water"))
# Typical appearance of each stuff class before per-image jitter (RGB, 0-255).
_STUFF_BASE = {_SKY: (125, 170, 220), _GROUND: (125, 105, 70), _WATER: (50, 100, 150)}

# A thing (after occlusion) or a stuff region with fewer visible pixels than this is dropped.
MIN_VISIBLE_PIXELS = 20
# Extent (circumscribed diameter) of a thing as a fraction of the image side.
_MIN_EXTENT, _MAX_EXTENT = 0.10, 0.40
# Image ids of split k start at k * _ID_STRIDE + 1 (train 1.., val 1_000_001..).
_ID_STRIDE = 1_000_000
_VOID_LABEL = 255
# Attempts at a thing layout that leaves every stuff band visible before accepting any layout.
_LAYOUT_ATTEMPTS = 10
# Datasets with fewer pixels than this (~500 images of 128 x 128) are drawn in this process.
_PARALLEL_PIXELS = 8_000_000
# Images per task sent to a worker process.
_BATCH = 8


@dataclass
class _Shape:
    """One drawn thing: its class, appearance and its (unoccluded) mask inside ``box``."""

    category_id: int
    box: tuple[int, int, int, int]  # y0, y1, x0, x1 (clipped to the image)
    mask: np.ndarray  # (y1 - y0, x1 - x0) bool
    center: tuple[float, float]  # x, y
    radius: float
    color: np.ndarray  # (3,) float32
    gradient: np.ndarray  # (2,) float32, relative brightness change per radius along x, y


@dataclass
class _Segment:
    """One visible segment of a drawn sample."""

    segment_id: int
    category_id: int
    mask: np.ndarray  # (H, W) bool
    area: int
    bbox: list[int]  # [x, y, w, h]


@dataclass
class _Sample:
    """A rendered image with its panoptic id map, semantic map and segments."""

    image: np.ndarray  # (H, W, 3) uint8
    panoptic: np.ndarray  # (H, W) int32 segment ids, 0 = void
    semantic: np.ndarray  # (H, W) uint8 category ids, 255 = void
    segments: list[_Segment]


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _smooth_noise(
    rng: np.random.Generator, size: int, cells: int, rows: tuple[int, int]
) -> np.ndarray:
    """Rows ``rows[0]:rows[1]`` of low-frequency noise in [-1, 1] over a ``size`` square.

    A ``cells`` x ``cells`` random grid, bilinearly upsampled with plain gathers (a matrix
    product would wake up a multi-threaded BLAS for no gain).
    """
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    pos = np.linspace(0.0, cells - 1, size, dtype=np.float32)
    low = np.minimum(np.floor(pos).astype(np.int64), cells - 2)
    frac = pos - low
    r0, r1 = rows
    ylow, yfrac = low[r0:r1], frac[r0:r1, None]
    cols = grid[ylow] * (1.0 - yfrac) + grid[ylow + 1] * yfrac  # (rows, cells)
    return cols[:, low] * (1.0 - frac) + cols[:, low + 1] * frac


def _wavy_line(rng: np.random.Generator, size: int, level: float) -> np.ndarray:
    """Row of a random wavy, slightly tilted boundary for every column, centred near ``level``."""
    x = np.arange(size, dtype=np.float32) / size
    amplitude = rng.uniform(0.02, 0.08) * size
    freq = rng.uniform(0.5, 3.0)
    phase = rng.uniform(0.0, 2.0 * math.pi)
    tilt = rng.uniform(-0.12, 0.12) * size
    cells = 5
    knots = rng.uniform(-1.0, 1.0, size=cells) * 0.03 * size
    wobble = np.interp(x, np.linspace(0.0, 1.0, cells), knots)
    return (
        level * size
        + amplitude * np.sin(2.0 * math.pi * freq * x + phase)
        + tilt * (x - 0.5)
        + wobble
    ).astype(np.float32)


def _stuff_layout(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[int]]:
    """2 or 3 horizontal-ish bands: sky on top, ground and/or water below.

    Returns the band index of every pixel (uint8, 0 = top) and the category id of every band.
    """
    if rng.random() < 0.5:
        order = [_SKY, _GROUND if rng.random() < 0.5 else _WATER]
    else:
        lower = [_GROUND, _WATER] if rng.random() < 0.5 else [_WATER, _GROUND]
        order = [_SKY, *lower]
    bands = len(order)
    min_band = max(3.0, 0.12 * size)
    if bands == 2:
        levels = [rng.uniform(0.3, 0.65)]
    else:
        levels = sorted(rng.uniform(0.22, 0.78, size=2).tolist())
        levels[1] = max(levels[1], levels[0] + 0.2)
    lines = [_wavy_line(rng, size, level) for level in levels]
    # Keep every band at least ``min_band`` rows tall in every column.
    lines[0] = np.clip(lines[0], min_band, size - min_band * (bands - 1))
    for k in range(1, len(lines)):
        lines[k] = np.clip(lines[k], lines[k - 1] + min_band, size - min_band * (bands - 1 - k))
    rows = np.arange(size, dtype=np.float32)[:, None]
    band_index = np.zeros((size, size), dtype=np.uint8)
    for line in lines:
        band_index += rows >= line[None, :]
    return band_index, order


def _stuff_look(
    rng: np.random.Generator, category_id: int, size: int, rows: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Colour of one stuff band (class colour with per-image jitter) and its relative shading.

    The shading (stripes of random direction and frequency plus low-frequency blobs) is given
    for rows ``rows[0]:rows[1]``; a pixel's colour is ``color * (1 + shade)``.
    """
    color = _jittered(rng, _STUFF_BASE[category_id])
    angle = rng.uniform(0.0, math.pi)
    freq = 2.0 * math.pi * rng.uniform(3.0, 14.0) / size
    phase = rng.uniform(0.0, 2.0 * math.pi)
    stripe_amp = np.float32(rng.uniform(0.03, 0.15))
    blob_amp = np.float32(rng.uniform(0.05, 0.22))
    blobs = _smooth_noise(rng, size, int(rng.integers(3, 7)), rows)
    r0, r1 = rows
    along_x = (freq * math.cos(angle) * np.arange(size)).astype(np.float32)
    along_y = (freq * math.sin(angle) * np.arange(r0, r1) + phase).astype(np.float32)
    shade = np.sin(along_y[:, None] + along_x[None, :])
    shade *= stripe_amp
    shade += blob_amp * blobs
    return color, shade


def _polygon(cx: float, cy: float, radii: list[float], rotation: float) -> list[tuple]:
    """Vertices of a polygon whose k-th vertex lies at ``radii[k]`` from the centre."""
    n = len(radii)
    return [
        (
            cx + r * math.cos(rotation + 2.0 * math.pi * k / n),
            cy + r * math.sin(rotation + 2.0 * math.pi * k / n),
        )
        for k, r in enumerate(radii)
    ]


def _shape_mask(
    name: str, size: int, cx: float, cy: float, radius: float, rotation: float, hole: float
) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Rasterise one shape; returns its box ``(y0, y1, x0, x1)`` and the boolean mask inside."""
    x0, y0 = max(0, math.floor(cx - radius) - 1), max(0, math.floor(cy - radius) - 1)
    x1, y1 = min(size, math.ceil(cx + radius) + 2), min(size, math.ceil(cy + radius) + 2)
    canvas = Image.new("1", (max(1, x1 - x0), max(1, y1 - y0)), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = cx - x0, cy - y0  # local coordinates
    if name in ("circle", "ring"):
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
        if name == "ring":
            inner = radius * hole
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, [radius] * 4, rotation), fill=1)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, [radius] * 3, rotation), fill=1)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, [radius, radius * 0.45] * 5, rotation), fill=1)
    else:  # pragma: no cover - SYNTH_CATEGORIES and this function are kept in step
        raise ValueError(f"unknown shape {name!r}")
    mask = np.asarray(canvas, dtype=bool)[: max(0, y1 - y0), : max(0, x1 - x0)]
    return (y0, y1, x0, x1), mask


def _thing_color(rng: np.random.Generator, category_id: int, mode: str) -> np.ndarray:
    """Fill colour of one thing (RGB, 0-255).

    ``class``: the category's typical colour with per-instance jitter (:func:`_jittered`, as
    the stuff bands), so appearance is a cue as in real data. ``random``: uniform over RGB,
    so only the shape tells the class (far slower to learn from scratch; see docs/data.md).
    """
    if mode == "random":
        return rng.uniform(0.0, 255.0, size=3).astype(np.float32)
    return _jittered(rng, _BY_ID[category_id]["color"])


def _jittered(rng: np.random.Generator, base: Sequence[float]) -> np.ndarray:
    """A class's typical RGB colour, brightness x U(0.7, 1.3) plus N(0, 30) per channel."""
    color = np.asarray(base, dtype=np.float64) * rng.uniform(0.7, 1.3)
    color += rng.normal(0.0, 30.0, size=3)
    return np.clip(color, 0.0, 255.0).astype(np.float32)


def _draw_things(
    rng: np.random.Generator, size: int, count: int, thing_colors: str, touching: float = 0.0
) -> tuple[np.ndarray, list[_Shape]]:
    """Draw ``count`` random shapes in order; returns the owner map (0 = none) and the shapes.

    ``owner[y, x] = k`` means shape ``k - 1`` is the frontmost one there (later shapes occlude
    earlier ones). With probability ``touching`` a shape after the first takes the class of a
    random earlier one and is placed against it (centres 0.75-0.95 of the summed radii apart).
    """
    owner = np.zeros((size, size), dtype=np.int16)
    shapes: list[_Shape] = []
    for k in range(1, count + 1):
        category_id = int(rng.choice(_THING_IDS))
        radius = 0.5 * size * rng.uniform(_MIN_EXTENT, _MAX_EXTENT)
        cx, cy = (float(v) for v in rng.uniform(0.05 * size, 0.95 * size, size=2))
        # No random number is drawn for this at touching = 0: the default data stay the same.
        if touching > 0.0 and shapes and rng.random() < touching:
            neighbour = shapes[int(rng.integers(len(shapes)))]
            category_id = neighbour.category_id
            angle = rng.uniform(0.0, 2.0 * math.pi)
            distance = (neighbour.radius + radius) * rng.uniform(0.75, 0.95)
            cx = float(np.clip(neighbour.center[0] + distance * math.cos(angle), 0, size - 1))
            cy = float(np.clip(neighbour.center[1] + distance * math.sin(angle), 0, size - 1))
        rotation = rng.uniform(0.0, 2.0 * math.pi)
        hole = rng.uniform(0.4, 0.65)
        box, mask = _shape_mask(_NAMES[category_id], size, cx, cy, radius, rotation, hole)
        y0, y1, x0, x1 = box
        owner[y0:y1, x0:x1][mask] = k
        color = _thing_color(rng, category_id, thing_colors)
        gradient = rng.uniform(-0.25, 0.25, size=2).astype(np.float32)
        shapes.append(_Shape(category_id, box, mask, (cx, cy), radius, color, gradient))
    return owner, shapes


def _bbox(mask: np.ndarray, y0: int = 0, x0: int = 0) -> list[int]:
    """Tight ``[x, y, w, h]`` box of a non-empty mask whose top-left pixel is at ``(y0, x0)``."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return [int(xs[0]) + x0, int(ys[0]) + y0, int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]


def _segment_ids(rng: np.random.Generator, count: int) -> list[int]:
    """``count`` distinct random non-zero 24-bit segment ids (COCO's ids look like this too)."""
    ids: list[int] = []
    while len(ids) < count:
        value = int(rng.integers(1, 1 << 24))
        if value not in ids:
            ids.append(value)
    return ids


def _row_span(mask: np.ndarray) -> tuple[int, int]:
    """First and one-past-last row holding a pixel of ``mask`` ((0, 0) when empty)."""
    rows = np.flatnonzero(mask.any(axis=1))
    return (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)


def _render_sample(seed_seq: np.random.SeedSequence, cfg: SynthConfig) -> _Sample:
    # 64 lines: one picture's drawing steps, in the order they draw the seed's random numbers
    """Draw one image with its labels from its own seed sequence."""
    rng = np.random.default_rng(seed_seq)
    size = cfg.image_size
    bands, stuff_ids = _stuff_layout(rng, size)
    count = int(rng.integers(cfg.min_instances, cfg.max_instances + 1))

    # Redraw the things (a few times at most) if they would hide a whole stuff band.
    for _attempt in range(_LAYOUT_ATTEMPTS):
        owner, shapes = _draw_things(rng, size, count, cfg.thing_colors, cfg.touching)
        background = owner == 0
        stuff_masks = [(bands == b) & background for b in range(len(stuff_ids))]
        if min(int(np.count_nonzero(m)) for m in stuff_masks) >= MIN_VISIBLE_PIXELS:
            break

    # Pixels: stuff textures, then the things (later ones occlude), then Gaussian noise.
    colors = np.empty((len(stuff_ids), 3), dtype=np.float32)
    shade = np.empty((size, size), dtype=np.float32)
    for b, s in enumerate(stuff_ids):
        region = bands == b
        r0, r1 = _row_span(region)
        colors[b], band_shade = _stuff_look(rng, s, size, (r0, r1))
        np.copyto(shade[r0:r1], band_shade, where=region[r0:r1])
    shade += 1.0
    image = np.take(colors, bands, axis=0)
    image *= shade[:, :, None]
    thing_masks: list[tuple[_Shape, np.ndarray]] = []
    for k, shape in enumerate(shapes, start=1):
        y0, y1, x0, x1 = shape.box
        visible = owner[y0:y1, x0:x1] == k
        thing_masks.append((shape, visible))
        cx, cy = shape.center
        gx, gy = shape.gradient / np.float32(shape.radius)
        xs = np.arange(x0, x1, dtype=np.float32) - np.float32(cx)
        ys = np.arange(y0, y1, dtype=np.float32) - np.float32(cy)
        light = 1.0 + gy * ys[:, None] + gx * xs[None, :]  # a soft linear lighting gradient
        np.copyto(image[y0:y1, x0:x1], light[:, :, None] * shape.color, where=visible[..., None])
    if cfg.noise > 0:
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(cfg.noise * 255.0)
    np.rint(image, out=image)
    np.clip(image, 0, 255, out=image)
    pixels = image.astype(np.uint8)

    # Labels: stuff where no thing is, the visible part of every thing; tiny leftovers are void.
    kept: list[tuple[int, np.ndarray, tuple[int, int]]] = []
    for s, mask in zip(stuff_ids, stuff_masks, strict=True):
        if np.count_nonzero(mask) >= MIN_VISIBLE_PIXELS:
            kept.append((s, mask, (0, 0)))
    for shape, visible in thing_masks:
        if np.count_nonzero(visible) >= MIN_VISIBLE_PIXELS:
            kept.append((shape.category_id, visible, (shape.box[0], shape.box[2])))
    ids = _segment_ids(rng, len(kept))
    panoptic = np.zeros((size, size), dtype=np.int32)
    semantic = np.full((size, size), _VOID_LABEL, dtype=np.uint8)
    segments = []
    for segment_id, (category_id, mask, (y0, x0)) in zip(ids, kept, strict=True):
        y1, x1 = y0 + mask.shape[0], x0 + mask.shape[1]
        panoptic[y0:y1, x0:x1][mask] = segment_id
        semantic[y0:y1, x0:x1][mask] = category_id
        full = np.zeros((size, size), dtype=bool)
        full[y0:y1, x0:x1] = mask
        area = int(np.count_nonzero(mask))
        segments.append(_Segment(segment_id, category_id, full, area, _bbox(mask, y0, x0)))
    return _Sample(pixels, panoptic, semantic, segments)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _ids_to_rgb(panoptic: np.ndarray) -> np.ndarray:
    """Segment id map -> COCO panoptic RGB (id = R + 256 G + 256^2 B)."""
    rgb = np.empty(panoptic.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = panoptic % 256
    rgb[..., 1] = (panoptic // 256) % 256
    rgb[..., 2] = (panoptic // 65536) % 256
    return rgb


def _save_png(array: np.ndarray, path: Path, strategy: int) -> None:
    """Write a uint8 (H, W) "L" or (H, W, 3) "RGB" array as a PNG without metadata.

    ``strategy`` is the zlib strategy: Huffman-only suits the noisy photos (as small as the
    default and twice as fast), run-length suits the flat label maps.
    """
    Image.fromarray(np.ascontiguousarray(array)).save(
        path, format="PNG", compress_level=6, compress_type=strategy
    )


def _write_sample(paths: DatasetPaths, image_id: int, sample: _Sample) -> None:
    """Write the image, panoptic PNG and semantic PNG of one sample."""
    name = f"{image_id:012d}.png"
    _save_png(sample.image, paths.images / name, zlib.Z_HUFFMAN_ONLY)
    _save_png(_ids_to_rgb(sample.panoptic), paths.panoptic_dir / name, zlib.Z_RLE)
    _save_png(sample.semantic, paths.semantic_dir / name, zlib.Z_RLE)


def _write_json(obj: Any, path: Path) -> None:
    """Deterministic JSON dump."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"))


def _info(cfg: SynthConfig, split: str) -> dict[str, Any]:
    """COCO ``info`` block (no timestamps, so files stay reproducible)."""
    return {
        "description": f"knet synthetic shapes dataset, split {split}",
        "version": "1.0",
        "contributor": "knet.data.synth",
        # What the pixels depend on (not where they were written).
        "synth_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"},
    }


def _categories_listing() -> list[dict[str, Any]]:
    """The semantic categories JSON: id, name, isthing for things and stuff."""
    return [{"id": c["id"], "name": c["name"], "isthing": c["isthing"]} for c in SYNTH_CATEGORIES]


def _check_inside(paths: DatasetPaths, root: Path) -> None:
    """Refuse layout templates that would place files outside the dataset folder."""
    for field in ("images", "panoptic_json", "panoptic_dir", "instances_json", "semantic_dir"):
        path = Path(os.path.normpath(getattr(paths, field)))
        if not path.is_relative_to(root):
            raise ValueError(f"data layout puts {field} at {path}, outside the dataset {root}")
    cats = Path(os.path.normpath(paths.categories_json))
    if not cats.is_relative_to(root):
        raise ValueError(f"data layout puts categories_json at {cats}, outside {root}")


def _image_id(split_index: int, index: int) -> int:
    """Image id of image ``index`` of split ``split_index`` (unique across splits)."""
    return split_index * _ID_STRIDE + index + 1


def _make_records(
    paths: DatasetPaths, cfg: SynthConfig, split_index: int, start: int, stop: int
) -> list[dict[str, Any]]:
    """Render and write images ``start..stop-1`` of a split; returns their annotation records.

    Each record holds the COCO ``image`` entry, the panoptic annotation and the instance
    annotations (without ids, which the caller numbers in order). Runs in worker processes too.
    """
    records = []
    size = cfg.image_size
    for index in range(start, stop):
        image_id = _image_id(split_index, index)
        seed_seq = np.random.SeedSequence(cfg.seed, spawn_key=(split_index, index))
        sample = _render_sample(seed_seq, cfg)
        _write_sample(paths, image_id, sample)
        name = f"{image_id:012d}.png"
        segments_info, instances = [], []
        for seg in sample.segments:
            segments_info.append(
                {
                    "id": seg.segment_id,
                    "category_id": seg.category_id,
                    "iscrowd": 0,
                    "area": seg.area,
                    "bbox": seg.bbox,
                }
            )
            if seg.category_id in _THING_IDS:
                rle = mask_utils.encode(np.asfortranarray(seg.mask, dtype=np.uint8))
                instances.append(
                    {
                        "image_id": image_id,
                        "category_id": seg.category_id,
                        "iscrowd": 0,
                        "area": seg.area,
                        "bbox": [float(v) for v in seg.bbox],
                        "segmentation": {
                            "size": [int(v) for v in rle["size"]],
                            "counts": rle["counts"].decode("ascii"),
                        },
                    }
                )
        records.append(
            {
                "image": {"id": image_id, "file_name": name, "height": size, "width": size},
                "panoptic": {
                    "image_id": image_id,
                    "file_name": name,
                    "segments_info": segments_info,
                },
                "instances": instances,
            }
        )
    return records


def _run_batches(
    pool: Executor | None, calls: Iterator[tuple[Any, ...]], window: int
) -> Iterator[list[dict[str, Any]]]:
    """Results of ``_make_records(*args)`` for every ``args`` of ``calls``, in order.

    Without a pool the calls run here, one after the other; with one, at most ``window`` calls
    are in flight, and pending ones are cancelled when the consumer stops or fails.
    """
    if pool is None:
        for args in calls:
            yield _make_records(*args)
        return
    pending: deque[Future] = deque()
    try:
        for args in calls:
            pending.append(pool.submit(_make_records, *args))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _generate_split(  # 9 parameters: generate()'s state for one split, passed once
    tmp_root: Path,
    cfg: SynthConfig,
    data_cfg: DataConfig,
    split: str,
    split_index: int,
    count: int,
    pool: Executor | None,
    workers: int,
    bar: tqdm,
) -> tuple[int, int]:
    """Write one split under ``tmp_root``; returns its numbers of segments and instances."""
    paths = dataset_paths(data_cfg, split, tmp_root)
    _check_inside(paths, tmp_root)
    for folder in (paths.images, paths.panoptic_dir, paths.semantic_dir):
        folder.mkdir(parents=True, exist_ok=True)
    batch = 1 if pool is None else _BATCH
    calls = (
        (paths, cfg, split_index, start, min(count, start + batch))
        for start in range(0, count, batch)
    )
    images, panoptic_anns, instance_anns = [], [], []
    num_segments = 0
    for records in _run_batches(pool, calls, window=2 * workers):
        for record in records:
            images.append(record["image"])
            panoptic_anns.append(record["panoptic"])
            num_segments += len(record["panoptic"]["segments_info"])
            for ann in record["instances"]:
                instance_anns.append({"id": len(instance_anns) + 1, **ann})
        bar.update(len(records))

    info = _info(cfg, split)
    _write_json(
        {
            "info": info,
            "licenses": [],
            "images": images,
            "annotations": panoptic_anns,
            "categories": SYNTH_CATEGORIES,
        },
        paths.panoptic_json,
    )
    _write_json(
        {
            "info": info,
            "licenses": [],
            "images": images,
            "annotations": instance_anns,
            "categories": [c for c in SYNTH_CATEGORIES if c["isthing"]],
        },
        paths.instances_json,
    )
    _write_json(_categories_listing(), paths.categories_json)
    return num_segments, len(instance_anns)


def _auto_workers(cfg: SynthConfig) -> int:
    """One process for small datasets (or inside a daemon process), else one per CPU (max 8)."""
    pixels = (cfg.train_images + cfg.val_images) * cfg.image_size**2
    if pixels < _PARALLEL_PIXELS or multiprocessing.current_process().daemon:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def generate(  # 83 lines: one atomic write (temporary folder, pool, rename) around every step
    root: str | Path,
    cfg: SynthConfig,
    data_cfg: DataConfig | None = None,
    progress: bool = True,
    *,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write the synthetic train and val splits to ``root`` atomically.

    Args:
        root: dataset folder; replaced as a whole once the new dataset is complete.
        cfg: sizes, instance counts, noise and seed (same config -> byte-identical files).
        data_cfg: split names and file layout templates; defaults to ``DataConfig()``.
        progress: show a tqdm progress bar on stderr.
        workers: processes drawing images (1 = all in this process); None picks 1 for small
            datasets and one per CPU (at most 8) otherwise. The files do not depend on it.
            Workers are started with ``spawn``, so a script calling this with several
            workers needs the usual ``if __name__ == "__main__":`` guard.

    Returns:
        Summary: ``root``, ``images`` and ``segments`` (dicts keyed by split name),
        ``instances`` (thing annotations per split), ``workers``, ``seconds`` and
        ``images_per_second``.

    Raises:
        ValueError: the train and val split names are equal or the layout escapes ``root``.
    """
    data_cfg = DataConfig() if data_cfg is None else data_cfg
    splits = [(data_cfg.train_split, cfg.train_images), (data_cfg.val_split, cfg.val_images)]
    if splits[0][0] == splits[1][0]:
        raise ValueError(f"train and val splits must differ, both are {splits[0][0]!r}")
    root = Path(os.path.abspath(root))
    if not root.name:
        raise ValueError(f"cannot generate into the file system root {root}")
    start = time.perf_counter()
    total = sum(n for _, n in splits)
    workers = _auto_workers(cfg) if workers is None else max(1, int(workers))
    summary: dict[str, Any] = {
        "root": str(root),
        "images": {},
        "segments": {},
        "instances": {},
        "workers": workers,
    }
    logger.info(
        "generating %d synthetic images (%dpx) into %s with %d process(es)",
        total,
        cfg.image_size,
        root,
        workers,
    )
    with atomic_directory(root, "synth") as tmp_root:
        pool: ProcessPoolExecutor | None = None
        if workers > 1:
            context = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
        try:
            with tqdm(
                total=total, desc="synth", unit="img", file=sys.stderr, disable=not progress
            ) as bar:
                for split_index, (split, count) in enumerate(splits):
                    segments, instances = _generate_split(
                        tmp_root, cfg, data_cfg, split, split_index, count, pool, workers, bar
                    )
                    summary["images"][split] = count
                    summary["segments"][split] = segments
                    summary["instances"][split] = instances
        finally:
            # Workers stop before the temporary folder is kept or removed.
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - start
    summary["seconds"] = seconds
    summary["images_per_second"] = total / seconds if seconds > 0 else float("inf")
    logger.info(
        "wrote %d images (%s) in %.1f s (%.1f images/s)",
        total,
        ", ".join(f"{s}: {n}" for s, n in summary["images"].items()),
        seconds,
        summary["images_per_second"],
    )
    return summary
