"""Evaluation metrics: panoptic quality, semantic mIoU and COCO mask AP.

All three are streaming (``update`` one image at a time, nothing per pixel is kept) and
mergeable across data-parallel workers. Each worker evaluates its own images, sends
``metric.state_dict()`` (plain Python numbers, lists and dicts, so it pickles and serialises to
JSON), and the driver rebuilds and merges them once, e.g. with :func:`gather`::

    merged = gather([state_of_worker_0, state_of_worker_1, ...])
    results = merged.compute()

Merging adds the statistics (it is associative and commutative up to the order of the stored
predictions); it never deduplicates, so every image must be evaluated by exactly one worker.
:class:`MaskAP` keeps the ground truth per image and raises ``ValueError`` when two states hold
the same image id.

All results are fractions in [0, 1] (not the 0-100 percentages panopticapi and pycocotools
print); an undefined value is NaN. Class keys in ``per_class`` are training ids.

Ground truth comes as :class:`GroundTruth`: the prepared segments of one image at its original
resolution (``PreparedDataset.read_segments``), with training ids.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from knet.config import Config
from knet.data.categories import Categories
from knet.data.dataset import Batch, PreparedDataset, build_loader
from knet.data.groundtruth import GroundTruth, semantic_from_segments
from knet.data.groundtruth import check_size as _check_size
from knet.data.groundtruth import paint_segments as _paint
from knet.data.groundtruth import to_numpy as _to_numpy
from knet.method.engine import channels_last_on, run_inference
from knet.method.postprocess import InstanceResult, PanopticResult
from knet.model import KNet, KNetOutput
from knet.structures import IGNORE_LABEL


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray, default: int) -> np.ndarray:
    """``values[i]`` where ``query == keys[i]`` (keys unique, >= 0), ``default`` elsewhere."""
    if query.size == 0 or keys.size == 0:
        return np.full(query.shape, default, dtype=np.int64)
    largest = int(max(keys.max(), query.max()))
    if largest < 1 << 20 and query.min() >= 0:
        table = np.full(largest + 1, default, dtype=np.int64)
        table[keys] = values
        return table[query]
    order = np.argsort(keys)
    sorted_keys = keys[order]
    pos = np.searchsorted(sorted_keys, query).clip(max=len(keys) - 1)
    return np.where(sorted_keys[pos] == query, np.asarray(values)[order][pos], default)


def semantic_from_panoptic(result: PanopticResult) -> np.ndarray:
    """(H, W) int64 training ids of a panoptic result, 255 on void (segment id 0)."""
    segment_map = _to_numpy(result.segment_map).astype(np.int64)
    ids = np.array([s.id for s in result.segments], dtype=np.int64)
    labels = np.array([s.label for s in result.segments], dtype=np.int64)
    return _lookup(ids, labels, segment_map, IGNORE_LABEL)


def _check_same_categories(a: Categories, b: Categories) -> None:
    if a.ids != b.ids or a.is_thing != b.is_thing:
        raise ValueError("cannot merge metrics built on different category lists")


# --------------------------------------------------------------------------------------------
# Panoptic quality
# --------------------------------------------------------------------------------------------


class PanopticQuality:
    """Panoptic quality (PQ, SQ, RQ) with exactly the rules of panopticapi's ``pq_compute``.

    Per image: VOID is the GT pixels no GT segment covers; predicted void (segment id 0) is not
    a prediction. A non-crowd GT segment and a predicted segment of the same category match
    when IoU > 0.5, with ``union = pred_area + gt_area - intersection - (pred ∩ VOID)``. Crowd
    GT segments are never matched and never FN. An unmatched prediction is an FP unless more
    than half of it lies on VOID plus the crowd region of its own category (the union of that
    category's crowd segments). Areas are pixel counts (``Segment.area`` is not read);
    predicted segments with no pixel are ignored. Overlapping GT segments raise ValueError.

    Per category: ``pq = iou_sum / (tp + fp/2 + fn/2)``, ``sq = iou_sum / tp``,
    ``rq = tp / (tp + fp/2 + fn/2)`` (0 where undefined, as panopticapi). The ``all`` /
    ``things`` / ``stuff`` averages are over the categories with ``tp + fp + fn > 0`` only
    (``n`` of them); a group with n = 0 gives NaN.
    """

    kind = "panoptic_quality"

    def __init__(self, categories: Categories) -> None:
        self.categories = categories
        k = len(categories)
        self.tp = np.zeros(k, dtype=np.int64)
        self.fp = np.zeros(k, dtype=np.int64)
        self.fn = np.zeros(k, dtype=np.int64)
        self.iou = np.zeros(k, dtype=np.float64)
        self.images = 0
        # Per image (tp, fp, fn, iou sum) x category, for the bootstrap over images.
        self.per_image: list[np.ndarray] = []

    # ---- accumulation ----------------------------------------------------------------------

    def update(self, gt: GroundTruth, pred: PanopticResult) -> None:
        # 73 lines: PQ's matching of one image, step by step as panopticapi's
        """Add one image: its ground truth and the panoptic prediction at the same size."""
        k = len(self.categories)
        pred_map = _to_numpy(pred.segment_map).astype(np.int64)
        if pred_map.shape != (gt.height, gt.width):
            raise ValueError(
                f"image {gt.image_id}: prediction is {tuple(pred_map.shape)}, "
                f"the ground truth is {(gt.height, gt.width)}"
            )
        gt_cat = np.array([int(s["category"]) for s in gt.segments], dtype=np.int64)
        gt_crowd = np.array([bool(s.get("iscrowd", 0)) for s in gt.segments], dtype=bool)
        pred_ids = np.array([int(s.id) for s in pred.segments], dtype=np.int64)
        pred_cat = np.array([int(s.label) for s in pred.segments], dtype=np.int64)
        for name, cats in (("ground-truth", gt_cat), ("predicted", pred_cat)):
            if cats.size and (cats.min() < 0 or cats.max() >= k):
                raise ValueError(f"image {gt.image_id}: {name} category out of range 0..{k - 1}")
        if len(np.unique(pred_ids)) != len(pred_ids) or (pred_ids <= 0).any():
            raise ValueError(f"image {gt.image_id}: predicted segment ids must be unique and > 0")
        num_gt, num_pred = len(gt_cat), len(pred_ids)

        # Every pixel's GT segment (0 = VOID, g + 1) and predicted segment (0 = void, p + 1).
        gt_index = _paint(gt.segments, np.arange(1, num_gt + 1), gt.height, gt.width, gt.image_id)
        if gt_index is None:
            raise ValueError(
                f"image {gt.image_id}: ground-truth segments overlap; panoptic quality needs "
                "non-overlapping segments"
            )
        pred_index = _lookup(pred_ids, np.arange(1, num_pred + 1), pred_map, -1)
        if (pred_index < 0).any():
            unknown = sorted(set(pred_map[pred_index < 0].tolist()) - {0})
            if unknown:
                raise ValueError(
                    f"image {gt.image_id}: segment ids {unknown[:10]} are in the segment map "
                    "but not in the segments list"
                )
            pred_index = pred_index.clip(min=0)
        # Pixel counts of every (GT segment or VOID, predicted segment or void) pair.
        pairs = np.bincount(
            (gt_index * (num_pred + 1) + pred_index).ravel(),
            minlength=(num_gt + 1) * (num_pred + 1),
        ).reshape(num_gt + 1, num_pred + 1)
        pred_area = pairs[:, 1:].sum(axis=0)  # (P,)
        pred_void = pairs[0, 1:]  # (P,) pixels on VOID
        gt_area = pairs[1:].sum(axis=1)  # (G,)
        inter = pairs[1:, 1:]  # (G, P)

        same = gt_cat[:, None] == pred_cat[None, :]
        union = pred_area[None, :] + gt_area[:, None] - inter - pred_void[None, :]
        iou = np.where(inter > 0, inter / np.maximum(union, 1), 0.0)
        # Unique on both sides: IoU > 0.5 cannot hold for two disjoint segments.
        match = same & ~gt_crowd[:, None] & (iou > 0.5)
        gt_matched = match.any(axis=1)
        pred_matched = match.any(axis=0)
        pred_crowd = (inter * (same & gt_crowd[:, None])).sum(axis=0)  # (P,) own-class crowd

        g, _ = np.nonzero(match)
        fn = ~gt_matched & ~gt_crowd
        ignored = (pred_void + pred_crowd) > 0.5 * pred_area
        fp = ~pred_matched & (pred_area > 0) & ~ignored
        image = np.stack(
            [
                np.bincount(gt_cat[g], minlength=k),
                np.bincount(pred_cat[fp], minlength=k),
                np.bincount(gt_cat[fn], minlength=k),
                np.bincount(gt_cat[g], weights=iou[match], minlength=k),
            ]
        ).astype(np.float64)  # (4, K): tp, fp, fn, iou sum
        self.tp += image[0].astype(np.int64)
        self.fp += image[1].astype(np.int64)
        self.fn += image[2].astype(np.int64)
        self.iou += image[3]
        self.per_image.append(image)
        self.images += 1

    # ---- merging ---------------------------------------------------------------------------

    def merge(self, other: PanopticQuality) -> PanopticQuality:
        """Add ``other``'s statistics to this one (in place); returns self."""
        _check_same_categories(self.categories, other.categories)
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou += other.iou
        self.images += other.images
        self.per_image.extend(other.per_image)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "categories": self.categories.to_json(),
            "tp": self.tp.tolist(),
            "fp": self.fp.tolist(),
            "fn": self.fn.tolist(),
            "iou": self.iou.tolist(),
            "images": self.images,
            "per_image": [image.tolist() for image in self.per_image],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PanopticQuality:
        _check_kind(state, cls.kind)
        metric = cls(Categories.from_json(state["categories"]))
        metric.tp = np.asarray(state["tp"], dtype=np.int64)
        metric.fp = np.asarray(state["fp"], dtype=np.int64)
        metric.fn = np.asarray(state["fn"], dtype=np.int64)
        metric.iou = np.asarray(state["iou"], dtype=np.float64)
        metric.images = int(state["images"])
        metric.per_image = [np.asarray(i, dtype=np.float64) for i in state.get("per_image", [])]
        return metric

    def bootstrap(
        self, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
    ) -> dict[str, float]:
        """Percentile bootstrap over images of PQ, PQ_th and PQ_st: each resample draws as many
        images as were seen, with replacement, and recomputes the category averages.

        Returns ``{"pq_low", "pq_high", "pq_th_low", ...}`` (fractions; NaN without images).
        """
        names = ("pq", "pq_th", "pq_st")
        if not self.per_image:
            return {f"{n}_{end}": math.nan for n in names for end in ("low", "high")}
        totals = _resampled_totals(self.per_image, resamples, seed)  # (R, 4, K)
        tp, fp, fn, iou = totals[:, 0], totals[:, 1], totals[:, 2], totals[:, 3]  # (R, K)
        denominator = tp + 0.5 * fp + 0.5 * fn
        pq = np.divide(iou, denominator, out=np.zeros_like(iou), where=denominator > 0)
        seen = (tp + fp + fn) > 0  # (R, K): the categories each resample averages over
        thing = np.asarray(self.categories.is_thing, dtype=bool)  # (K,)
        out = {}
        for name, group in zip(names, (np.ones_like(thing), thing, ~thing), strict=True):
            present = seen & group[None, :]
            with np.errstate(invalid="ignore"):
                means = (pq * present).sum(1) / present.sum(1)  # (R,), NaN if none present
            out.update(_percentile_interval(name, means, confidence))
        return out

    # ---- results ---------------------------------------------------------------------------

    def compute(self) -> dict[str, Any]:
        """``{"all"|"things"|"stuff": {pq, sq, rq, n}, "per_class": {t: {...}}, "images",
        "bootstrap": {pq_low, pq_high, ...}}`` (the 95% interval over images, :meth:`bootstrap`)."""
        per_class = {}
        for t in range(len(self.categories)):
            tp, fp, fn, iou = int(self.tp[t]), int(self.fp[t]), int(self.fn[t]), self.iou[t]
            denominator = tp + 0.5 * fp + 0.5 * fn
            per_class[t] = {
                "pq": float(iou / denominator) if denominator else 0.0,
                "sq": float(iou / tp) if tp else 0.0,
                "rq": float(tp / denominator) if denominator else 0.0,
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "name": self.categories.names[t],
                "isthing": self.categories.is_thing[t],
            }

        def average(isthing: bool | None) -> dict[str, float | int]:
            rows = [
                r
                for r in per_class.values()
                if (isthing is None or r["isthing"] == isthing) and r["tp"] + r["fp"] + r["fn"]
            ]
            if not rows:
                return {"pq": math.nan, "sq": math.nan, "rq": math.nan, "n": 0}
            return {key: sum(r[key] for r in rows) / len(rows) for key in ("pq", "sq", "rq")} | {
                "n": len(rows)
            }

        return {
            "all": average(None),
            "things": average(True),
            "stuff": average(False),
            "per_class": per_class,
            "images": self.images,
            "bootstrap": self.bootstrap(),
        }


# --------------------------------------------------------------------------------------------
# Semantic IoU
# --------------------------------------------------------------------------------------------


def _resampled_totals(per_image: list[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """The per-image statistics (n, F, K) summed over ``resamples`` bootstrap draws of the
    images: (R, F, K). The images are put in a canonical order first, so merged shards give the
    same draws in any order."""
    stats = np.stack(per_image).astype(np.float64)
    stats = stats[np.lexsort(stats.reshape(len(stats), -1).T[::-1])]
    n = len(stats)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)
    return np.einsum("rn,nfk->rfk", counts.astype(np.float64), stats)


def _percentile_interval(name: str, values: np.ndarray, confidence: float) -> dict[str, float]:
    """``{name_low, name_high}``: the percentile interval of the finite ``values``."""
    values = values[np.isfinite(values)]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail]) if values.size else (np.nan, np.nan)
    return {f"{name}_low": float(low), f"{name}_high": float(high)}


class SemanticIoU:
    """Confusion matrix (K x (K + 1)) -> mIoU, pixel accuracy, per-class IoU and recall.

    Rows are GT classes, columns predicted classes; column K counts GT pixels without a
    prediction (panoptic void). GT pixels of value 255 are ignored, whatever is predicted there.
    IoU of class c = TP / (GT pixels of c + pixels predicted c - TP); classes with union 0 are
    NaN and left out of ``miou``.
    """

    kind = "semantic_iou"

    def __init__(self, num_classes: int, names: Sequence[str] | None = None) -> None:
        self.num_classes = int(num_classes)
        self.names = (
            tuple(str(n) for n in names)
            if names is not None
            else tuple(map(str, range(num_classes)))
        )
        if len(self.names) != self.num_classes:
            raise ValueError(f"{len(self.names)} names for {num_classes} classes")
        self.confusion = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)
        # Per image (3, K): true positives, GT pixels, predicted pixels of each class, for the
        # bootstrap over images.
        self.per_image: list[np.ndarray] = []

    def update(self, gt_semantic: np.ndarray | Tensor, pred: np.ndarray | Tensor) -> None:
        """Add one image. ``pred`` values are 0..K-1, or 255 / -1 for no prediction."""
        k = self.num_classes
        gt = _to_numpy(gt_semantic).astype(np.int64).ravel()
        pr = _to_numpy(pred).astype(np.int64).ravel()
        if gt.shape != pr.shape:
            raise ValueError(
                f"semantic prediction {tuple(np.shape(pred))} and ground truth "
                f"{tuple(np.shape(gt_semantic))} differ in size"
            )
        valid = gt != IGNORE_LABEL
        gt, pr = gt[valid], pr[valid]
        if gt.size and (gt.min() < 0 or gt.max() >= k):
            raise ValueError(f"ground-truth class out of range 0..{k - 1} (and 255)")
        pr = np.where((pr == IGNORE_LABEL) | (pr == -1), k, pr)
        if pr.size and (pr.min() < 0 or pr.max() > k):
            raise ValueError(f"predicted class out of range 0..{k - 1} (and 255 / -1)")
        image = np.bincount(gt * (k + 1) + pr, minlength=k * (k + 1)).reshape(k, k + 1)
        self.confusion += image
        self.per_image.append(
            np.stack([np.diag(image[:, :k]), image.sum(axis=1), image[:, :k].sum(axis=0)])
        )

    def merge(self, other: SemanticIoU) -> SemanticIoU:
        """Add ``other``'s confusion matrix (in place); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge semantic metrics with different class counts")
        self.confusion += other.confusion
        self.per_image.extend(other.per_image)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_classes": self.num_classes,
            "names": list(self.names),
            "confusion": self.confusion.tolist(),
            "per_image": [image.tolist() for image in self.per_image],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SemanticIoU:
        _check_kind(state, cls.kind)
        metric = cls(state["num_classes"], state["names"])
        metric.confusion = np.asarray(state["confusion"], dtype=np.int64).reshape(
            metric.num_classes, metric.num_classes + 1
        )
        metric.per_image = [np.asarray(i, dtype=np.int64) for i in state.get("per_image", [])]
        return metric

    def bootstrap(
        self, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
    ) -> dict[str, float]:
        """Percentile bootstrap over images of mIoU and pixel accuracy, as
        :meth:`PanopticQuality.bootstrap`: ``{"miou_low", "miou_high", "acc_low", "acc_high"}``
        (fractions; NaN without images)."""
        ends = ("low", "high")
        if not self.per_image:
            return {f"{n}_{end}": math.nan for n in ("miou", "acc") for end in ends}
        totals = _resampled_totals(self.per_image, resamples, seed)  # (R, 3, K)
        tp, gt, predicted = totals[:, 0], totals[:, 1], totals[:, 2]
        union = gt + predicted - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            miou = np.nanmean(np.where(union > 0, tp / union, np.nan), axis=1)
            acc = tp.sum(axis=1) / gt.sum(axis=1)
        return {
            **_percentile_interval("miou", miou, confidence),
            **_percentile_interval("acc", acc, confidence),
        }

    def compute(self) -> dict[str, Any]:
        """``{"miou", "acc", "bootstrap": {miou_low, ...}, "per_class": {t: {iou, acc, name}}}``;
        NaN where undefined."""
        k = self.num_classes
        cm = self.confusion.astype(np.float64)
        tp = np.diag(cm[:, :k])
        gt_pixels = cm.sum(axis=1)
        predicted = cm[:, :k].sum(axis=0)
        union = gt_pixels + predicted - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            recall = np.where(gt_pixels > 0, tp / gt_pixels, np.nan)
        total = gt_pixels.sum()
        defined = ~np.isnan(iou)
        return {
            "miou": float(iou[defined].mean()) if defined.any() else math.nan,
            "acc": float(tp.sum() / total) if total else math.nan,
            "bootstrap": self.bootstrap(),
            "per_class": {
                t: {"iou": float(iou[t]), "acc": float(recall[t]), "name": self.names[t]}
                for t in range(k)
            },
        }


# --------------------------------------------------------------------------------------------
# COCO mask AP
# --------------------------------------------------------------------------------------------


def _rle_json(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


class MaskAP:
    """COCO mask AP of instance predictions (pycocotools ``COCOeval``, ``iouType="segm"``).

    ``update`` RLE-encodes the predicted masks at once, so only RLEs are held. Only thing
    categories are evaluated; the ground truth of every updated image is kept (images without
    a thing still count), crowd segments as COCO crowd annotations (matches to them are
    ignored). Results use COCO's ids: image ids and dataset category ids.
    """

    kind = "mask_ap"
    STATS = ("ap", "ap50", "ap75", "aps", "apm", "apl")

    def __init__(self, categories: Categories) -> None:
        self.categories = categories
        self.images: dict[int, dict[str, int]] = {}  # image id -> {id, height, width}
        self.annotations: list[dict[str, Any]] = []  # GT, without ids (given in compute)
        self.results: list[dict[str, Any]] = []  # COCO results, no bbox (loadRes computes it)

    def _add_image(self, image: dict[str, int]) -> None:
        if image["id"] in self.images:
            raise ValueError(f"image {image['id']} was evaluated twice")
        self.images[image["id"]] = image

    def update(self, gt: GroundTruth, pred: InstanceResult) -> None:
        """Add one image: its ground truth and the instance prediction at the original size."""
        image_id = int(gt.image_id)
        masks = _to_numpy(pred.masks).astype(bool, copy=False)
        labels = _to_numpy(pred.labels).astype(np.int64).ravel()
        scores = _to_numpy(pred.scores).astype(np.float64).ravel()
        if masks.ndim != 3 or masks.shape[1:] != (gt.height, gt.width):
            raise ValueError(
                f"image {image_id}: masks {tuple(masks.shape)} do not match the image size "
                f"{(gt.height, gt.width)}"
            )
        if not len(masks) == len(labels) == len(scores):
            raise ValueError(f"image {image_id}: masks, labels and scores differ in length")
        for label in labels.tolist():
            if not (0 <= label < len(self.categories) and self.categories.is_thing[label]):
                raise ValueError(f"image {image_id}: predicted label {label} is not a thing")
        for seg in gt.segments:
            _check_size(seg, gt.height, gt.width, image_id)
        self._add_image({"id": image_id, "height": int(gt.height), "width": int(gt.width)})
        for seg in gt.segments:
            t = int(seg["category"])
            if not self.categories.is_thing[t]:
                continue
            self.annotations.append(
                {
                    "image_id": image_id,
                    "category_id": self.categories.ids[t],
                    "segmentation": _rle_json(seg["rle"]),
                    "area": float(seg["area"] if "area" in seg else mask_utils.area(seg["rle"])),
                    "iscrowd": int(bool(seg.get("iscrowd", 0))),
                }
            )
        if len(masks):
            # (k, H, W) -> (H, W, k) in Fortran order, which pycocotools encodes without a copy.
            fortran = np.ascontiguousarray(masks.transpose(0, 2, 1)).view(np.uint8).T
            rles = mask_utils.encode(fortran)
            for rle, label, score in zip(rles, labels.tolist(), scores.tolist(), strict=True):
                self.results.append(
                    {
                        "image_id": image_id,
                        "category_id": self.categories.ids[label],
                        "segmentation": _rle_json(rle),
                        "score": float(score),
                    }
                )

    def merge(self, other: MaskAP) -> MaskAP:
        """Append ``other``'s images and predictions (in place); a shared image id raises."""
        _check_same_categories(self.categories, other.categories)
        shared = self.images.keys() & other.images.keys()
        if shared:
            raise ValueError(f"images {sorted(shared)[:10]} are in both metrics")
        self.images.update(other.images)
        self.annotations.extend(other.annotations)
        self.results.extend(other.results)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "categories": self.categories.to_json(),
            "images": [dict(v) for v in self.images.values()],
            "annotations": [dict(a) for a in self.annotations],
            "results": [dict(r) for r in self.results],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> MaskAP:
        _check_kind(state, cls.kind)
        metric = cls(Categories.from_json(state["categories"]))
        for image in state["images"]:
            metric._add_image({k: int(v) for k, v in image.items()})
        metric.annotations = [dict(a) for a in state["annotations"]]
        metric.results = [dict(r) for r in state["results"]]
        return metric

    def coco_results_json(self) -> list[dict[str, Any]]:
        """The predictions in COCO's instance results format (valid for ``COCO.loadRes``)."""
        return [_copy_ann(r) for r in self.results]

    def coco_ground_truth(self) -> dict[str, Any]:
        """The thing ground truth as a COCO instances dataset (annotation ids from 1)."""
        things = [t for t in range(len(self.categories)) if self.categories.is_thing[t]]
        return {
            "images": [dict(v) for v in sorted(self.images.values(), key=lambda i: i["id"])],
            "annotations": [
                _copy_ann(a) | {"id": i} for i, a in enumerate(self.annotations, start=1)
            ],
            "categories": [
                {"id": self.categories.ids[t], "name": self.categories.names[t]} for t in things
            ],
        }

    def compute(self) -> dict[str, Any]:
        """``{ap, ap50, ap75, aps, apm, apl, per_class: {t: {ap, name}}}``, fractions 0..1.

        NaN where COCOeval reports -1 (undefined); all zeros when there is no prediction.
        """
        things = [t for t in range(len(self.categories)) if self.categories.is_thing[t]]
        if not self.results:
            return {key: 0.0 for key in self.STATS} | {
                "per_class": {t: {"ap": 0.0, "name": self.categories.names[t]} for t in things}
            }
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = self.coco_ground_truth()
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(self.coco_results_json())
            evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = [float(s) if s > -1 else math.nan for s in evaluator.stats[: len(self.STATS)]]
        # precision: (iou thresholds, recall points, categories, area ranges, max dets)
        precision = evaluator.eval["precision"]
        train_id = {self.categories.ids[t]: t for t in things}
        per_class = {}
        for k, category_id in enumerate(evaluator.params.catIds):
            values = precision[:, :, k, 0, -1]  # area "all", 100 detections
            values = values[values > -1]
            t = train_id[category_id]
            per_class[t] = {
                "ap": float(values.mean()) if values.size else math.nan,
                "name": self.categories.names[t],
            }
        return dict(zip(self.STATS, stats, strict=True)) | {
            "per_class": dict(sorted(per_class.items()))
        }


def _copy_ann(ann: dict[str, Any]) -> dict[str, Any]:
    """A copy pycocotools may mutate without touching the stored state."""
    out = dict(ann)
    out["segmentation"] = dict(ann["segmentation"])
    return out


# --------------------------------------------------------------------------------------------
# Gathering
# --------------------------------------------------------------------------------------------

Metric = PanopticQuality | SemanticIoU | MaskAP
_KINDS: dict[str, type] = {
    PanopticQuality.kind: PanopticQuality,
    SemanticIoU.kind: SemanticIoU,
    MaskAP.kind: MaskAP,
}


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"state of kind {state.get('kind')!r} given where {kind!r} was expected")


def from_state_dict(state: dict[str, Any]) -> Metric:
    """Rebuild any metric from its ``state_dict()`` (dispatching on ``state["kind"]``)."""
    try:
        cls = _KINDS[state["kind"]]
    except KeyError:
        raise ValueError(f"unknown metric state kind {state.get('kind')!r}") from None
    return cls.from_state_dict(state)


def gather(states: Iterable[dict[str, Any]]) -> Metric:
    """Merge the ``state_dict()`` of every worker (each evaluated different images) into one."""
    merged = None
    for state in states:
        metric = from_state_dict(state)
        merged = metric if merged is None else merged.merge(metric)
    if merged is None:
        raise ValueError("gather() needs at least one state")
    return merged


# ------------------------------------------------------- a model's metrics over a split


# What each model task answers (a panoptic model's thing kernels are also instance results).
TASKS_OF_MODEL = {
    "panoptic": ("panoptic", "instance"),
    "instance": ("instance",),
    "semantic": ("semantic",),
}


def accumulate_metrics(  # 11 parameters: one pass serves validation, evaluate and benchmarks
    model: KNet,
    dataset: PreparedDataset,
    task: str,
    categories: Categories,
    cfg: Config,
    device: torch.device,
    indices: list[int] | None = None,
    progress: bool = False,
    on_panoptic: Callable[[int, PanopticResult], None] | None = None,
    on_outputs: Callable[[Batch, KNetOutput], None] | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Run the model over ``dataset`` (or the ``indices`` shard of it) and fill the metrics.

    Data-parallel workers each pass their own disjoint shard and gather the metrics' state
    dicts afterwards (:func:`gather`), so no image is counted twice. ``on_panoptic(image_id,
    result)`` sees every panoptic result (knet evaluate's prediction files), ``on_outputs(batch,
    outputs)`` every batch's raw outputs (its kernel maps).
    """
    loader = build_loader(
        dataset,
        cfg.train.batch_size,
        train=False,
        num_workers=cfg.data.num_workers,
        sampler=indices,
        pin_memory=device.type == "cuda",
    )
    tasks = TASKS_OF_MODEL[task]
    metrics = _metrics_for(tasks, categories)
    predictions = run_inference(
        model,
        loader,
        tasks,
        categories.num_things,
        categories.num_stuff if task == "panoptic" else 0,
        cfg.model.postprocess,
        device,
        amp=cfg.train.amp,
        progress=progress,
        on_outputs=on_outputs,
        timings=timings,
        channels_last=channels_last_on(device, cfg.train.channels_last),
    )
    for pred in predictions:
        gt = dataset.ground_truth(pred.index)
        for name, result in pred.results.items():
            if name == "panoptic":
                metrics["pq"].update(gt, result)
                metrics["miou"].update(gt.semantic_map(), semantic_from_panoptic(result))
                if on_panoptic is not None:
                    on_panoptic(pred.image_id, result)
            elif name == "instance":
                metrics["ap"].update(gt, result)
            else:
                metrics["miou"].update(gt.semantic_map(), result.cpu().numpy())
    return metrics


def _metrics_for(tasks: tuple[str, ...], categories: Categories) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if "panoptic" in tasks:
        metrics["pq"] = PanopticQuality(categories)
    if "instance" in tasks:
        metrics["ap"] = MaskAP(categories)
    if "panoptic" in tasks or "semantic" in tasks:
        metrics["miou"] = SemanticIoU(len(categories), categories.names)
    return metrics


def as_percent(value: float) -> float:
    """A fraction as the paper's percent, rounded; NaN stays NaN."""
    return round(100.0 * value, 3) if not math.isnan(value) else value


def summarize(computed: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The headline numbers, in percent like the paper's tables."""
    flat: dict[str, float] = {}
    if "pq" in computed:
        pq = computed["pq"]
        flat.update(
            pq=as_percent(pq["all"]["pq"]),
            pq_th=as_percent(pq["things"]["pq"]),
            pq_st=as_percent(pq["stuff"]["pq"]),
            sq=as_percent(pq["all"]["sq"]),
            rq=as_percent(pq["all"]["rq"]),
        )
        # The 95% bootstrap interval over the evaluated images (one model, one seed).
        flat.update({k: as_percent(v) for k, v in pq.get("bootstrap", {}).items()})
    if "ap" in computed:
        flat.update({k: as_percent(computed["ap"][k]) for k in MaskAP.STATS})
    if "miou" in computed:
        flat.update(
            miou=as_percent(computed["miou"]["miou"]), acc=as_percent(computed["miou"]["acc"])
        )
        flat.update({k: as_percent(v) for k, v in computed["miou"].get("bootstrap", {}).items()})
    return flat


__all__ = [
    "TASKS_OF_MODEL",
    "GroundTruth",
    "MaskAP",
    "Metric",
    "PanopticQuality",
    "SemanticIoU",
    "accumulate_metrics",
    "as_percent",
    "from_state_dict",
    "gather",
    "semantic_from_panoptic",
    "semantic_from_segments",
    "summarize",
]
