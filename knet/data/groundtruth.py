"""The ground truth of one image as the metrics read it, and painting it from its RLEs.

A data-layer type: the dataset builds :class:`GroundTruth` records (``PreparedDataset
.ground_truth``) and :mod:`knet.method.metrics` scores predictions against them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from torch import Tensor

from knet.data.rle import rle_counts
from knet.structures import IGNORE_LABEL


@dataclass
class GroundTruth:
    """The ground truth of one image at its original resolution.

    ``segments`` are the prepared segments (``PreparedDataset.read_segments``): dicts with
    ``id``, ``category`` (training id), ``iscrowd``, ``area`` and ``rle`` (COCO compressed RLE
    of size (height, width), counts as str or bytes).
    """

    image_id: int
    height: int
    width: int
    segments: list[dict]
    semantic: np.ndarray | None = None  # (H, W) training ids, 255 = ignore (semantic_png data)

    def semantic_map(self) -> np.ndarray:
        """``semantic`` when given, else painted from the segments (``semantic_from_segments``)."""
        if self.semantic is not None:
            return to_numpy(self.semantic)
        return semantic_from_segments(self)


def to_numpy(x: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def check_size(seg: dict[str, Any], height: int, width: int, image_id: int) -> None:
    size = [int(v) for v in seg["rle"]["size"]]
    if size != [height, width]:
        raise ValueError(
            f"image {image_id}: segment {seg.get('id')} has an RLE of size {size}, "
            f"the image is {height}x{width}"
        )


def paint_segments(
    segments: Sequence[dict], values: np.ndarray, height: int, width: int, image_id: int
) -> np.ndarray | None:
    """(H, W) int64 map with ``values[g]`` on the pixels of ``segments[g]``, 0 elsewhere.

    Works on the RLE runs (no mask is decoded). Returns None when segments overlap.
    """
    starts, lengths, owners = [], [], []
    for g, seg in enumerate(segments):
        check_size(seg, height, width, image_id)
        counts = rle_counts(seg["rle"]["counts"])
        if counts.sum() != height * width:
            raise ValueError(f"image {image_id}: segment {seg.get('id')} has a corrupt RLE")
        run_starts = np.cumsum(counts) - counts
        ones = slice(1, None, 2)
        keep = counts[ones] > 0
        starts.append(run_starts[ones][keep])
        lengths.append(counts[ones][keep])
        owners.append(np.full(int(keep.sum()), g))
    flat = np.zeros(height * width + 1, dtype=np.int64)
    if starts:
        start, length, owner = (np.concatenate(a) for a in (starts, lengths, owners))
        order = np.argsort(start, kind="stable")
        start, length, owner = start[order], length[order], owner[order]
        if np.any(start[1:] < (start + length)[:-1]):
            return None
        value = np.asarray(values, dtype=np.int64)[owner]
        np.add.at(flat, start, value)
        np.add.at(flat, start + length, -value)
    return np.cumsum(flat[:-1]).reshape(width, height).T  # column-major runs


def decode_segments(segments: Sequence[dict], height: int, width: int, image_id: int) -> np.ndarray:
    """RLEs -> (H, W, G) uint8 (Fortran order), checking each RLE's size."""
    for seg in segments:
        check_size(seg, height, width, image_id)
    if not segments:
        return np.zeros((height, width, 0), dtype=np.uint8)
    return mask_utils.decode([seg["rle"] for seg in segments])


def semantic_from_segments(gt: GroundTruth) -> np.ndarray:
    """(H, W) int64 training ids painted from ``gt.segments``, 255 where no segment is.

    Crowd segments keep their class. Where segments overlap (instance data) the later one wins.
    """
    labels = np.array([int(s["category"]) + 1 for s in gt.segments], dtype=np.int64)
    painted = paint_segments(gt.segments, labels, gt.height, gt.width, gt.image_id)
    if painted is not None:
        return np.where(painted > 0, painted - 1, IGNORE_LABEL)
    semantic = np.full((gt.height, gt.width), IGNORE_LABEL, dtype=np.int64)
    masks = decode_segments(gt.segments, gt.height, gt.width, gt.image_id)
    for g, seg in enumerate(gt.segments):
        semantic[masks[..., g].astype(bool)] = int(seg["category"])
    return semantic


__all__ = [
    "GroundTruth",
    "check_size",
    "decode_segments",
    "paint_segments",
    "semantic_from_segments",
    "to_numpy",
]
