"""Pictures: colour overlays with legends and contours, and the kernel-activation views.

Everything returns ``PIL.Image`` objects; callers decide where to write them.
Letters: N kernels, H, W image size, g the common grid of the kernel maps.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from knet.data.categories import Categories
from knet.method.postprocess import InstanceResult, PanopticResult

ALPHA = 0.55
LEGEND_ROW = 14


def distinct_colors(count: int, offset: float = 0.0) -> list[tuple[int, int, int]]:
    """``count`` well-separated RGB colours (golden-ratio hue steps, two saturation levels)."""
    colors = []
    for i in range(count):
        hue = (offset + i * 0.618033988749895) % 1.0
        sat, val = (0.85, 0.95) if i % 2 == 0 else (0.6, 0.8)
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    return colors


def class_colors(categories: Categories) -> list[tuple[int, int, int]]:
    """One colour per class: the dataset's own (COCO ``color``) where given."""
    fallback = distinct_colors(len(categories), offset=0.31)
    return [tuple(c) if c else f for c, f in zip(categories.colors, fallback, strict=True)]


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` (H, W) bool with a 4-neighbour outside it."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _blend(
    image: np.ndarray, layers: list[tuple[np.ndarray, tuple[int, int, int], bool]]
) -> np.ndarray:
    """Paint (mask, colour, contour) layers over ``image`` (H, W, 3) uint8, later on top."""
    out = image.astype(np.float32)
    for mask, color, _ in layers:
        out[mask] = (1 - ALPHA) * out[mask] + ALPHA * np.asarray(color, np.float32)
    for mask, _, contour in layers:
        if contour:
            out[_boundary(mask)] = 255.0
    return out.clip(0, 255).astype(np.uint8)


def _with_legend(
    picture: np.ndarray, entries: Sequence[tuple[str, tuple[int, int, int]]]
) -> Image.Image:
    """Append a legend column (colour swatch + text per entry) to the right of ``picture``."""
    font = ImageFont.load_default()
    width = 12 + max((int(font.getlength(text)) for text, _ in entries), default=0) + 8
    height = max(picture.shape[0], LEGEND_ROW * len(entries) + 8)
    canvas = Image.new("RGB", (picture.shape[1] + width, height), (255, 255, 255))
    canvas.paste(Image.fromarray(picture), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = picture.shape[1] + 4
    for row, (text, color) in enumerate(entries):
        y = 4 + row * LEGEND_ROW
        draw.rectangle([x, y + 2, x + 8, y + 10], fill=color, outline=(0, 0, 0))
        draw.text((x + 12, y), text, fill=(0, 0, 0), font=font)
    return canvas


def panoptic_overlay(
    image: np.ndarray, result: PanopticResult, categories: Categories
) -> Image.Image:
    """Stuff in its class colour, every thing instance in its own colour with a contour."""
    segment_map = result.segment_map.cpu().numpy()
    per_class = class_colors(categories)
    instance_colors = distinct_colors(max(len(result.segments), 1))
    layers, entries, seen = [], [], set()
    for i, seg in enumerate(result.segments):
        mask = segment_map == seg.id
        color = instance_colors[i] if seg.is_thing else per_class[seg.label]
        layers.append((mask, color, seg.is_thing))
        name = categories.names[seg.label]
        if seg.is_thing:
            entries.append((f"{name} {seg.score:.2f}", color))
        elif seg.label not in seen:
            entries.append((name, color))
            seen.add(seg.label)
    return _with_legend(_blend(image, layers), entries)


def instance_overlay(
    image: np.ndarray, result: InstanceResult, categories: Categories, score_threshold: float = 0.3
) -> Image.Image:
    """Instances above ``score_threshold``, best on top, own colours, contours, scores."""
    keep = (result.scores >= score_threshold).nonzero().flatten().tolist()
    keep = sorted(keep, key=lambda k: float(result.scores[k]))  # low scores first, under
    colors = distinct_colors(max(len(keep), 1))
    layers, entries = [], []
    for color, k in zip(colors, keep, strict=False):
        layers.append((result.masks[k].cpu().numpy(), color, True))
        entries.append(
            (f"{categories.names[int(result.labels[k])]} {float(result.scores[k]):.2f}", color)
        )
    return _with_legend(_blend(image, layers), entries[::-1])


def semantic_overlay(
    image: np.ndarray, semantic: np.ndarray, categories: Categories
) -> Image.Image:
    """One colour per class present in ``semantic`` (H, W) training ids (255 = nothing)."""
    colors = class_colors(categories)
    present = [int(c) for c in np.unique(semantic) if c < len(categories)]
    layers = [(semantic == c, colors[c], False) for c in present]
    return _with_legend(_blend(image, layers), [(categories.names[c], colors[c]) for c in present])


def _to_gray(maps: np.ndarray) -> np.ndarray:
    """(N, g, g) in [0, 1] -> uint8."""
    return (np.clip(maps, 0.0, 1.0) * 255).astype(np.uint8)


def tile(
    maps: np.ndarray, columns: int, gap: int = 2, labels: Sequence[str] | None = None
) -> Image.Image:
    """Tile (N, g, g) maps in [0, 1] into one grey picture, ``columns`` per row."""
    count, size = maps.shape[0], maps.shape[-1]
    rows = -(-count // columns)
    label_h = LEGEND_ROW if labels is not None else 0
    cell_h = size + label_h + gap
    canvas = Image.new("L", (columns * (size + gap) + gap, rows * cell_h + gap), 255)
    draw = ImageDraw.Draw(canvas)
    gray = _to_gray(maps)
    for i in range(count):
        x = gap + (i % columns) * (size + gap)
        y = gap + (i // columns) * cell_h
        canvas.paste(Image.fromarray(gray[i]), (x, y + label_h))
        if labels is not None:
            draw.text((x, y), labels[i], fill=0)
    return canvas


def kernel_activation_grid(mean_maps: np.ndarray, columns: int = 10) -> Image.Image:
    """The paper's Figure-4 view: each instance kernel's mean mask activation, one tile each.

    Args:
        mean_maps: (N, g, g) mean sigmoid activation of kernel n over the split.
    """
    labels = [f"k{i}" for i in range(mean_maps.shape[0])]
    return tile(mean_maps / max(float(mean_maps.max()), 1e-6), columns, labels=labels)


def stage_masks_figure(stage_probs: Sequence[np.ndarray], kernels: Sequence[int]) -> Image.Image:
    """Rows = kernels, columns = stage 0, 1, ...: how each kernel's mask sharpens per round.

    Args:
        stage_probs: per stage (N_s, h, w) sigmoid masks of one image at a common size.
        kernels: which kernel indices to show (present in every stage).
    """
    rows = [np.stack([probs[k] for probs in stage_probs]) for k in kernels]  # (S, h, w) each
    maps = np.concatenate(rows)  # (K * S, h, w)
    labels = [f"k{k} s{s}" for k in kernels for s in range(len(stage_probs))]
    return tile(maps, columns=len(stage_probs), labels=labels)
