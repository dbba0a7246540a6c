"""Metrics on hand-computed cases (every expected number is worked out in a comment).

Most panoptic cases are 1 x W images: a segment is a range of pixel columns ``[a, b)``.
Categories (training ids): 0 person, 1 car (things), 2 sky, 3 grass (stuff).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from knet.data.categories import Categories
from knet.method.metrics import (
    GroundTruth,
    MaskAP,
    PanopticQuality,
    SemanticIoU,
    from_state_dict,
    gather,
    semantic_from_panoptic,
    semantic_from_segments,
)
from knet.method.postprocess import InstanceResult, PanopticResult, Segment

PERSON, CAR, SKY, GRASS = 0, 1, 2, 3
CATEGORIES = Categories.from_coco(
    [
        {"id": 1, "name": "person", "isthing": 1},
        {"id": 3, "name": "car", "isthing": 1},
        {"id": 40, "name": "sky", "isthing": 0},
        {"id": 41, "name": "grass", "isthing": 0},
    ]
)
SAMPLE = Path(__file__).parent / "data" / "coco-panoptic-sample"


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode("ascii")}


def ranges_mask(width: int, *ranges: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((1, width), dtype=bool)
    for a, b in ranges:
        mask[0, a:b] = True
    return mask


def make_gt(image_id: int, masks: list[tuple[np.ndarray, int, int]]) -> GroundTruth:
    """GroundTruth from (mask, training id, iscrowd) triples."""
    height, width = masks[0][0].shape if masks else (1, 1)
    segments = [
        {"id": i + 1, "category": c, "iscrowd": crowd, "area": int(m.sum()), "rle": rle(m)}
        for i, (m, c, crowd) in enumerate(masks)
    ]
    return GroundTruth(image_id, height, width, segments)


def gt_1d(image_id: int, width: int, *segments: tuple[int, int, int, int]) -> GroundTruth:
    """1 x width ground truth from (a, b, training id, iscrowd); uncovered pixels are VOID."""
    gt = make_gt(image_id, [(ranges_mask(width, (a, b)), c, crowd) for a, b, c, crowd in segments])
    gt.height, gt.width = 1, width
    return gt


def pred_1d(width: int, *segments: tuple[list[tuple[int, int]], int]) -> PanopticResult:
    """1 x width prediction from (list of [a, b) ranges, training id); the rest is void (0)."""
    segment_map = torch.zeros(1, width, dtype=torch.int32)
    infos = []
    for i, (ranges, label) in enumerate(segments, start=1):
        for a, b in ranges:
            segment_map[0, a:b] = i
        area = int((segment_map == i).sum())
        infos.append(Segment(i, label, CATEGORIES.is_thing[label], 0.9, area))
    return PanopticResult(segment_map, infos)


def pq_of(*pairs: tuple[GroundTruth, PanopticResult]) -> PanopticQuality:
    metric = PanopticQuality(CATEGORIES)
    for gt, pred in pairs:
        metric.update(gt, pred)
    return metric


def counts(result: dict, t: int) -> tuple[int, int, int]:
    row = result["per_class"][t]
    return row["tp"], row["fp"], row["fn"]


# --------------------------------------------------------------------------------------------
# Panoptic quality
# --------------------------------------------------------------------------------------------


def test_pq_perfect_prediction():
    # 10 x 10: person in the top-left 5 x 5, sky elsewhere; predicted exactly.
    person = np.zeros((10, 10), dtype=bool)
    person[:5, :5] = True
    gt = make_gt(1, [(person, PERSON, 0), (~person, SKY, 0)])
    segment_map = torch.where(torch.from_numpy(person), 7, 3).int()  # arbitrary segment ids
    pred = PanopticResult(
        segment_map, [Segment(7, PERSON, True, 0.9, 25), Segment(3, SKY, False, 0.8, 75)]
    )
    r = pq_of((gt, pred)).compute()
    for group, n in (("all", 2), ("things", 1), ("stuff", 1)):
        assert r[group] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": n}
    assert counts(r, PERSON) == (1, 0, 0) and counts(r, SKY) == (1, 0, 0)


def test_pq_single_tp_iou_075():
    # GT person [0, 8) (8 px), the rest VOID; pred person [0, 6): inter 6, union 8 -> IoU 0.75.
    # tp 1: sq = 0.75, rq = 1 / (1 + 0 + 0) = 1, pq = 0.75.
    r = pq_of((gt_1d(1, 20, (0, 8, PERSON, 0)), pred_1d(20, ([(0, 6)], PERSON)))).compute()
    assert r["all"]["sq"] == pytest.approx(0.75)
    assert r["all"]["rq"] == pytest.approx(1.0)
    assert r["all"]["pq"] == pytest.approx(0.75)
    assert r["all"]["n"] == 1 and counts(r, PERSON) == (1, 0, 0)


def test_pq_iou_exactly_half_is_not_a_match():
    # GT person [0, 8); pred person [0, 4): inter 4, union 8 -> IoU 0.5, not > 0.5.
    # -> FN (the GT) + FP (the pred, 0 px on VOID): pq = 0 / (0 + 0.5 + 0.5) = 0.
    r = pq_of((gt_1d(1, 20, (0, 8, PERSON, 0)), pred_1d(20, ([(0, 4)], PERSON)))).compute()
    assert counts(r, PERSON) == (0, 1, 1)
    assert r["all"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}


def miss_and_extra() -> tuple[GroundTruth, PanopticResult]:
    # 1 x 40. GT: person A [0, 10), person B [10, 20), sky [20, 40).
    # Pred: person [0, 10) (TP, IoU 1), person [20, 25) on sky (FP), sky [25, 40)
    # (inter 15, union 20 + 15 - 15 = 20 -> IoU 0.75, TP); person B is predicted void (FN).
    gt = gt_1d(1, 40, (0, 10, PERSON, 0), (10, 20, PERSON, 0), (20, 40, SKY, 0))
    pred = pred_1d(40, ([(0, 10)], PERSON), ([(20, 25)], PERSON), ([(25, 40)], SKY))
    return gt, pred


def test_pq_miss_and_extra_with_group_split():
    r = pq_of(miss_and_extra()).compute()
    # person: tp 1, fp 1, fn 1, iou 1.0 -> pq = 1 / (1 + 0.5 + 0.5) = 0.5, sq 1, rq 0.5.
    assert counts(r, PERSON) == (1, 1, 1)
    assert r["per_class"][PERSON]["pq"] == pytest.approx(0.5)
    assert r["per_class"][PERSON]["sq"] == pytest.approx(1.0)
    assert r["per_class"][PERSON]["rq"] == pytest.approx(0.5)
    # sky: tp 1, iou 0.75 -> pq 0.75, sq 0.75, rq 1.
    assert r["per_class"][SKY]["pq"] == pytest.approx(0.75)
    # car and grass: no GT, no prediction -> not averaged (n = 2, not 4).
    assert r["all"]["n"] == 2
    assert r["all"]["pq"] == pytest.approx((0.5 + 0.75) / 2)  # 0.625
    assert r["all"]["sq"] == pytest.approx((1.0 + 0.75) / 2)  # 0.875
    assert r["all"]["rq"] == pytest.approx((0.5 + 1.0) / 2)  # 0.75
    assert r["things"] == pytest.approx({"pq": 0.5, "sq": 1.0, "rq": 0.5, "n": 1})
    assert r["stuff"] == pytest.approx({"pq": 0.75, "sq": 0.75, "rq": 1.0, "n": 1})
    assert r["per_class"][CAR] == r["per_class"][CAR] | {"pq": 0.0, "tp": 0, "fp": 0, "fn": 0}
    assert r["per_class"][PERSON]["name"] == "person" and r["per_class"][SKY]["isthing"] is False


def test_pq_wrong_category_is_fp_and_fn():
    # GT person [0, 10); pred car [0, 10) -> person FN, car FP; both averaged with pq 0.
    r = pq_of((gt_1d(1, 10, (0, 10, PERSON, 0)), pred_1d(10, ([(0, 10)], CAR)))).compute()
    assert counts(r, PERSON) == (0, 0, 1) and counts(r, CAR) == (0, 1, 0)
    assert r["all"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 2}


def void_case() -> tuple[GroundTruth, PanopticResult]:
    # 1 x 40. GT: person [0, 10), sky [10, 30), VOID [30, 40).
    # Pred: person [0, 10) (TP, IoU 1); sky [10, 26) (inter 16, union 20 -> IoU 0.8, TP);
    # car A = [26, 29) + [30, 32): 2 of 5 px on VOID (0.4 <= 0.5) -> FP;
    # car B = [29, 30) + [32, 40): 8 of 9 px on VOID (> 0.5) -> ignored.
    gt = gt_1d(2, 40, (0, 10, PERSON, 0), (10, 30, SKY, 0))
    pred = pred_1d(
        40,
        ([(0, 10)], PERSON),
        ([(10, 26)], SKY),
        ([(26, 29), (30, 32)], CAR),
        ([(29, 30), (32, 40)], CAR),
    )
    return gt, pred


def test_pq_prediction_on_void():
    r = pq_of(void_case()).compute()
    assert counts(r, PERSON) == (1, 0, 0)
    assert counts(r, SKY) == (1, 0, 0) and r["per_class"][SKY]["sq"] == pytest.approx(0.8)
    assert counts(r, CAR) == (0, 1, 0)  # car A only
    # all: (1 + 0.8 + 0) / 3 = 0.6.
    assert r["all"]["pq"] == pytest.approx(0.6) and r["all"]["n"] == 3


def test_pq_exactly_half_on_void_is_fp():
    # GT person [0, 4), VOID [4, 8); pred car [2, 6): 2 of 4 px on VOID = 0.5, not > 0.5 -> FP.
    r = pq_of((gt_1d(1, 8, (0, 4, PERSON, 0)), pred_1d(8, ([(2, 6)], CAR)))).compute()
    assert counts(r, CAR) == (0, 1, 0) and counts(r, PERSON) == (0, 0, 1)


def test_pq_void_is_excluded_from_union():
    # GT person [0, 10), VOID [10, 20). Pred person [2, 14): 12 px, 4 of them on VOID, inter 8.
    # union = 12 + 10 - 8 - 4 = 10 -> IoU 0.8 (it would be 8 / 14 = 0.571 with the VOID part).
    r = pq_of((gt_1d(1, 20, (0, 10, PERSON, 0)), pred_1d(20, ([(2, 14)], PERSON)))).compute()
    assert counts(r, PERSON) == (1, 0, 0)
    assert r["all"]["sq"] == pytest.approx(0.8) and r["all"]["pq"] == pytest.approx(0.8)


def crowd_case() -> tuple[GroundTruth, PanopticResult]:
    # 1 x 40. GT: person crowd [0, 5) and [5, 10) (two crowd segments), car crowd [10, 20),
    # person [20, 30), sky [30, 40).
    # Pred: person [0, 8) (all on person crowd -> ignored), person [10, 18) (on the car crowd,
    # not its own category -> FP), person [20, 30) (TP, IoU 1), sky [30, 40) (TP, IoU 1).
    gt = gt_1d(
        3,
        40,
        (0, 5, PERSON, 1),
        (5, 10, PERSON, 1),
        (10, 20, CAR, 1),
        (20, 30, PERSON, 0),
        (30, 40, SKY, 0),
    )
    pred = pred_1d(
        40,
        ([(0, 8)], PERSON),
        ([(10, 18)], PERSON),
        ([(20, 30)], PERSON),
        ([(30, 40)], SKY),
    )
    return gt, pred


def test_pq_crowd():
    r = pq_of(crowd_case()).compute()
    # person: tp 1, fp 1, fn 0 (crowd is never FN) -> pq = 1 / (1 + 0.5) = 2/3.
    assert counts(r, PERSON) == (1, 1, 0)
    assert r["per_class"][PERSON]["pq"] == pytest.approx(2 / 3)
    # car: only a crowd GT, no prediction -> nothing, not averaged.
    assert counts(r, CAR) == (0, 0, 0)
    assert r["all"]["n"] == 2 and r["things"]["n"] == 1
    assert r["all"]["pq"] == pytest.approx((2 / 3 + 1) / 2)


def test_pq_crowd_plus_void_ignores_prediction():
    # GT person crowd [0, 3), person [3, 10), VOID [10, 14). Pred person [0, 4) + [10, 12):
    # 3 px crowd + 2 px VOID of 6 -> 5/6 > 0.5 -> ignored. The person GT is missed: FN.
    gt = gt_1d(1, 14, (0, 3, PERSON, 1), (3, 10, PERSON, 0))
    pred = pred_1d(14, ([(0, 4), (10, 12)], PERSON))
    assert counts(pq_of((gt, pred)).compute(), PERSON) == (0, 0, 1)


def test_pq_empty_images():
    # An image without any GT segment is all VOID: no prediction, or one entirely on VOID,
    # changes nothing (except the image count).
    base = pq_of(miss_and_extra()).compute()
    empty = gt_1d(9, 10)
    with_empty = pq_of(
        miss_and_extra(), (empty, pred_1d(10)), (empty, pred_1d(10, ([(0, 6)], CAR)))
    )
    result = with_empty.compute()
    assert result["images"] == 3
    assert {k: v for k, v in result.items() if k != "images"} == {
        k: v for k, v in base.items() if k != "images"
    }
    # An image with no thing (only sky) and a person predicted over the sky: an FP.
    r = pq_of((gt_1d(1, 10, (0, 10, SKY, 0)), pred_1d(10, ([(0, 3)], PERSON), ([(3, 10)], SKY))))
    out = r.compute()
    assert counts(out, PERSON) == (0, 1, 0) and counts(out, SKY) == (1, 0, 0)
    # No image at all: every group is undefined.
    nothing = PanopticQuality(CATEGORIES).compute()
    assert nothing["all"]["n"] == 0 and math.isnan(nothing["all"]["pq"])


def all_pq_images() -> list[tuple[GroundTruth, PanopticResult]]:
    images = [miss_and_extra(), void_case(), crowd_case()]
    images += [(gt_1d(4, 10, (0, 10, SKY, 0)), pred_1d(10, ([(0, 3)], PERSON), ([(3, 10)], SKY)))]
    images += [(gt_1d(5, 20, (0, 8, PERSON, 0)), pred_1d(20, ([(0, 6)], PERSON)))]
    return images


def test_pq_merge_and_state_dict():
    images = all_pq_images()
    whole = pq_of(*images).compute()
    first, second = pq_of(*images[:2]), pq_of(*images[2:])
    state_a = json.loads(json.dumps(first.state_dict()))  # plain JSON-able numbers
    state_b = json.loads(json.dumps(second.state_dict()))
    merged = PanopticQuality.from_state_dict(state_a).merge(
        PanopticQuality.from_state_dict(state_b)
    )
    assert merged.compute() == whole
    assert gather([state_b, state_a]).compute() == whole  # order does not matter
    assert from_state_dict(pq_of(*images).state_dict()).compute() == whole
    assert first.merge(second).compute() == whole


def test_pq_bootstrap_over_images():
    images = all_pq_images()
    metric = pq_of(*images)
    result = metric.compute()
    # the per-image statistics add up to the totals
    per_image = np.stack(metric.per_image)  # (n, 4, K)
    assert per_image.shape == (len(images), 4, len(CATEGORIES))
    assert np.array_equal(per_image[:, 0].sum(0), metric.tp)
    assert np.allclose(per_image[:, 3].sum(0), metric.iou)
    boot = result["bootstrap"]
    for name, group in (("pq", "all"), ("pq_th", "things"), ("pq_st", "stuff")):
        assert boot[f"{name}_low"] <= result[group]["pq"] <= boot[f"{name}_high"]
    assert boot["pq_low"] < boot["pq_high"]  # the images differ, so the resamples do
    # deterministic, and the same whichever order the shards were merged in
    assert metric.bootstrap() == boot
    assert pq_of(*images[::-1]).bootstrap() == boot
    # a brute-force bootstrap with the same draws gives the same interval
    rng = np.random.default_rng(0)
    n = len(images)
    order = np.lexsort(per_image.reshape(n, -1).T[::-1])
    draws = rng.multinomial(n, np.full(n, 1.0 / n), size=1000)
    means = []
    for draw in draws:
        resample = pq_of(*[images[i] for i, c in zip(order, draw, strict=True) for _ in range(c)])
        means.append(resample.compute()["all"]["pq"])
    expected = np.percentile(means, [2.5, 97.5])
    assert (boot["pq_low"], boot["pq_high"]) == pytest.approx(tuple(expected))
    # every image alike: no spread
    same = pq_of(*[images[4]] * 6).compute()
    assert same["bootstrap"]["pq_low"] == pytest.approx(same["all"]["pq"])
    assert same["bootstrap"]["pq_high"] == pytest.approx(same["all"]["pq"])
    assert math.isnan(PanopticQuality(CATEGORIES).bootstrap()["pq_low"])


def test_pq_errors():
    # Overlapping GT segments (instance data): PQ is undefined, the image id is named.
    gt = gt_1d(77, 10, (0, 6, PERSON, 0), (4, 10, CAR, 0))
    with pytest.raises(ValueError, match="image 77"):
        pq_of((gt, pred_1d(10)))
    ok = gt_1d(5, 10, (0, 10, PERSON, 0))
    with pytest.raises(ValueError, match="image 5"):  # size mismatch
        pq_of((ok, pred_1d(12)))
    stray = PanopticResult(torch.ones(1, 10, dtype=torch.int32), [])  # id 1 not in segments
    with pytest.raises(ValueError, match="not in the segments"):
        pq_of((ok, stray))
    with pytest.raises(ValueError, match="state of kind"):
        PanopticQuality.from_state_dict(SemanticIoU(2).state_dict())


# --------------------------------------------------------------------------------------------
# Semantic IoU
# --------------------------------------------------------------------------------------------

SEM_GT = np.array([[0, 0, 1, 1, 255], [2, 2, 2, 255, 0]])
SEM_PRED = np.array([[0, 1, 1, 255, 3], [2, 0, -1, 2, 1]])


def test_semantic_iou_hand_case():
    # Non-ignored pixels (gt -> pred): row 0: 0->0, 0->1, 1->1, 1->void;
    # row 1: 2->2, 2->0, 2->void, 0->1. (gt 255 pixels, incl. the pred 3, are ignored.)
    # Confusion (rows gt 0..3, cols pred 0..3, void):
    #   gt 0: [1, 2, 0, 0, 0]   gt 1: [0, 1, 0, 0, 1]   gt 2: [1, 0, 1, 0, 1]   gt 3: zeros
    # tp = [1, 1, 1, 0]; gt pixels [3, 2, 3, 0]; predicted [2, 3, 1, 0]
    # IoU: 1 / (3 + 2 - 1) = 0.25, 1 / (2 + 3 - 1) = 0.25, 1 / (3 + 1 - 1) = 1/3, class 3: NaN
    # miou = (0.25 + 0.25 + 1/3) / 3 = 0.2778; acc = 3 / 8; recall 1/3, 1/2, 1/3.
    metric = SemanticIoU(4, ["a", "b", "c", "d"])
    metric.update(torch.from_numpy(SEM_GT), torch.from_numpy(SEM_PRED))
    assert metric.confusion.tolist() == [
        [1, 2, 0, 0, 0],
        [0, 1, 0, 0, 1],
        [1, 0, 1, 0, 1],
        [0, 0, 0, 0, 0],
    ]
    r = metric.compute()
    assert r["miou"] == pytest.approx((0.25 + 0.25 + 1 / 3) / 3)
    assert r["acc"] == pytest.approx(3 / 8)
    assert [r["per_class"][t]["iou"] for t in range(3)] == pytest.approx([0.25, 0.25, 1 / 3])
    assert [r["per_class"][t]["acc"] for t in range(3)] == pytest.approx([1 / 3, 1 / 2, 1 / 3])
    assert math.isnan(r["per_class"][3]["iou"]) and r["per_class"][2]["name"] == "c"


def test_semantic_iou_merge():
    whole = SemanticIoU(4)
    whole.update(SEM_GT, SEM_PRED)
    a, b = SemanticIoU(4), SemanticIoU(4)
    a.update(SEM_GT[:1], SEM_PRED[:1])
    b.update(SEM_GT[1:], SEM_PRED[1:])
    state = json.loads(json.dumps(b.state_dict()))
    merged = gather([a.state_dict(), state])
    assert merged.confusion.tolist() == whole.confusion.tolist()
    assert merged.compute()["miou"] == pytest.approx(whole.compute()["miou"])
    empty = SemanticIoU(2).compute()
    assert math.isnan(empty["miou"]) and math.isnan(empty["acc"])


def test_semantic_iou_bootstrap_over_images():
    rng = np.random.default_rng(3)
    images = []
    for _ in range(12):  # 12 small images of 3 classes, predictions right at varying rates
        gt = rng.integers(0, 3, size=(4, 6))
        wrong = rng.random((4, 6)) < rng.uniform(0.05, 0.6)
        images.append((gt, np.where(wrong, rng.integers(0, 3, size=(4, 6)), gt)))

    def miou_of(pairs):
        metric = SemanticIoU(3)
        for gt, pred in pairs:
            metric.update(gt, pred)
        return metric

    metric = miou_of(images)
    result = metric.compute()
    per_image = np.stack(metric.per_image)  # (n, 3, K): tp, GT pixels, predicted pixels
    assert np.array_equal(per_image[:, 0].sum(0), np.diag(metric.confusion[:, :3]))
    assert np.array_equal(per_image[:, 1].sum(0), metric.confusion.sum(1))
    boot = result["bootstrap"]
    assert boot["miou_low"] < result["miou"] < boot["miou_high"]
    assert boot["acc_low"] < result["acc"] < boot["acc_high"]
    # the same whichever order the images (or merged shards) came in
    assert miou_of(images[::-1]).bootstrap() == boot
    halves = gather([miou_of(images[6:]).state_dict(), miou_of(images[:6]).state_dict()])
    assert halves.bootstrap() == boot
    # a brute-force bootstrap with the same draws gives the same interval
    n = len(images)
    order = np.lexsort(per_image.reshape(n, -1).T[::-1])
    draws = np.random.default_rng(0).multinomial(n, np.full(n, 1.0 / n), size=1000)
    means = [
        miou_of([images[i] for i, c in zip(order, d, strict=True) for _ in range(c)]).compute()[
            "miou"
        ]
        for d in draws
    ]
    assert (boot["miou_low"], boot["miou_high"]) == pytest.approx(
        tuple(np.percentile(means, [2.5, 97.5]))
    )
    assert math.isnan(SemanticIoU(2).bootstrap()["miou_low"])


def test_semantic_helpers():
    # GT: person [0, 3), person crowd [3, 5), sky [5, 8), VOID [8, 10).
    gt = gt_1d(1, 10, (0, 3, PERSON, 0), (3, 5, PERSON, 1), (5, 8, SKY, 0))
    assert semantic_from_segments(gt).tolist() == [[0, 0, 0, 0, 0, 2, 2, 2, 255, 255]]
    assert gt.semantic_map().tolist() == semantic_from_segments(gt).tolist()
    pred = PanopticResult(
        torch.tensor([[5, 5, 0, 9, 9, 9, 0, 0, 0, 0]], dtype=torch.int32),
        [Segment(9, SKY, False, 0.5, 3), Segment(5, CAR, True, 0.5, 2)],
    )
    assert semantic_from_panoptic(pred).tolist() == [[1, 1, 255, 2, 2, 2, 255, 255, 255, 255]]


# --------------------------------------------------------------------------------------------
# Mask AP
# --------------------------------------------------------------------------------------------


def box(y0: int, y1: int, x0: int, x1: int, size: int = 20) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def ap_images() -> list[tuple[GroundTruth, list[tuple[np.ndarray, int]]]]:
    """Two 20 x 20 images with sky, their GT, and the GT thing masks (the perfect prediction)."""
    person1, car1 = box(2, 8, 2, 8), box(10, 18, 10, 18)  # 36 px, 64 px
    person2, crowd2 = box(0, 10, 0, 10), box(12, 20, 12, 20)  # 100 px; a person crowd
    gt1 = make_gt(1, [(person1, PERSON, 0), (car1, CAR, 0), (~(person1 | car1), SKY, 0)])
    gt2 = make_gt(2, [(person2, PERSON, 0), (crowd2, PERSON, 1)])
    return [(gt1, [(person1, PERSON), (car1, CAR)]), (gt2, [(person2, PERSON)])]


def instances(items: list[tuple[np.ndarray, int]], score: float = 0.9) -> InstanceResult:
    if not items:
        return InstanceResult(
            torch.zeros(0, 20, 20, dtype=torch.bool),
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0),
        )
    masks = torch.from_numpy(np.stack([m for m, _ in items]))
    labels = torch.tensor([label for _, label in items])
    return InstanceResult(masks, labels, torch.full((len(items),), score))


def ap_of(preds: list[list[tuple[np.ndarray, int]]]) -> MaskAP:
    metric = MaskAP(CATEGORIES)
    for (gt, _), items in zip(ap_images(), preds, strict=True):
        metric.update(gt, instances(items))
    return metric


def test_ap_perfect():
    # Every GT thing predicted exactly: AP 1 at every IoU threshold. All GT areas are < 32^2
    # (36, 64, 100 px): APs = 1, no medium / large GT -> COCOeval's -1 -> NaN.
    r = ap_of([items for _, items in ap_images()]).compute()
    assert (r["ap"], r["ap50"], r["ap75"], r["aps"]) == (1.0, 1.0, 1.0, 1.0)
    assert math.isnan(r["apm"]) and math.isnan(r["apl"])
    assert sorted(r["per_class"]) == [PERSON, CAR]  # things only
    assert r["per_class"][PERSON]["ap"] == pytest.approx(1.0)
    assert r["per_class"][CAR] == {"ap": pytest.approx(1.0), "name": "car"}


def test_ap_crowd_is_ignored():
    # An extra person predicted exactly on the person crowd region, with a higher score than
    # the true positives: COCOeval ignores detections matched to crowd -> AP stays 1.
    images = ap_images()
    metric = MaskAP(CATEGORIES)
    metric.update(images[0][0], instances(images[0][1]))
    crowd = box(12, 20, 12, 20)
    masks = torch.from_numpy(np.stack([images[1][1][0][0], crowd]))
    metric.update(
        images[1][0],
        InstanceResult(masks, torch.tensor([PERSON, PERSON]), torch.tensor([0.5, 0.99])),
    )
    assert metric.compute()["ap"] == 1.0
    # The crowd GT is kept as a crowd annotation.
    crowds = [a for a in metric.coco_ground_truth()["annotations"] if a["iscrowd"]]
    assert len(crowds) == 1 and crowds[0]["category_id"] == 1 and crowds[0]["area"] == 64


def test_ap_worse_predictions():
    # Swapped labels: no detection has the category of a GT it overlaps -> AP 0.
    swapped = [[(m, CAR if c == PERSON else PERSON) for m, c in items] for _, items in ap_images()]
    r = ap_of(swapped).compute()
    assert r["ap"] == 0.0 and r["ap50"] == 0.0
    # Masks shifted one pixel right: IoU 30/42 = 0.714 (person 6x6), 56/72 = 0.778 (car 8x8),
    # 90/110 = 0.818 (person 10x10): all match at 0.5, the first one fails at 0.75.
    shifted = [[(np.roll(m, 1, axis=1), c) for m, c in items] for _, items in ap_images()]
    r = ap_of(shifted).compute()
    assert r["ap50"] == 1.0 and r["ap75"] < 1.0 and r["ap"] < 1.0


def test_ap_no_predictions():
    r = ap_of([[], []]).compute()
    assert {k: r[k] for k in MaskAP.STATS} == dict.fromkeys(MaskAP.STATS, 0.0)
    assert r["per_class"][PERSON]["ap"] == 0.0 and SKY not in r["per_class"]


def test_ap_results_json_and_merge():
    from pycocotools.coco import COCO

    preds = [items for _, items in ap_images()]
    whole = ap_of(preds)
    results = json.loads(json.dumps(whole.coco_results_json()))
    assert len(results) == 3 and {r["category_id"] for r in results} == {1, 3}
    coco = COCO()
    coco.dataset = whole.coco_ground_truth()
    coco.createIndex()
    loaded = coco.loadRes(results)
    assert len(loaded.getAnnIds()) == 3
    # Workers hold different images: merged states give the same AP as one metric.
    (gt1, items1), (gt2, items2) = ap_images()
    a, b = MaskAP(CATEGORIES), MaskAP(CATEGORIES)
    a.update(gt1, instances(items1))
    b.update(gt2, instances(items2))
    merged = gather([json.loads(json.dumps(s)) for s in (a.state_dict(), b.state_dict())])
    assert merged.compute() == whole.compute()
    assert a.coco_results_json() == ap_of([items1, []]).coco_results_json()
    with pytest.raises(ValueError, match="in both"):
        merged.merge(MaskAP.from_state_dict(b.state_dict()))
    with pytest.raises(ValueError, match="twice"):
        a.update(gt1, instances(items1))


# --------------------------------------------------------------------------------------------
# The real COCO panoptic sample
# --------------------------------------------------------------------------------------------


def test_real_sample_gt_as_prediction():
    data = json.loads((SAMPLE / "panoptic.json").read_text())
    categories = Categories.from_coco(data["categories"])
    images = {image["id"]: image for image in data["images"]}
    pq = PanopticQuality(categories)
    miou = SemanticIoU(len(categories), categories.names)
    ap = MaskAP(categories)
    present = set()
    for ann in data["annotations"]:
        image = images[ann["image_id"]]
        png = Image.open(SAMPLE / "panoptic" / ann["file_name"]).convert("RGB")
        rgb = np.asarray(png, dtype=np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
        segments, pred_segments, things = [], [], []
        for info in ann["segments_info"]:
            mask = ids == info["id"]
            t = categories.train_id(info["category_id"])
            segments.append(
                {
                    "id": info["id"],
                    "category": t,
                    "iscrowd": info["iscrowd"],
                    "area": int(mask.sum()),
                    "rle": rle(mask),
                }
            )
            is_thing = categories.is_thing[t]
            pred_segments.append(Segment(info["id"], t, is_thing, 1.0, int(mask.sum())))
            if is_thing:
                things.append((mask, t))
            if not info["iscrowd"]:
                present.add(t)
        gt = GroundTruth(image["id"], image["height"], image["width"], segments)
        pred = PanopticResult(torch.from_numpy(ids.astype(np.int32)), pred_segments)
        pq.update(gt, pred)
        miou.update(gt.semantic_map(), semantic_from_panoptic(pred))
        masks = torch.from_numpy(np.stack([m for m, _ in things]))
        ap.update(
            gt, InstanceResult(masks, torch.tensor([t for _, t in things]), torch.ones(len(things)))
        )
    r = pq.compute()
    assert r["all"]["pq"] == 1.0 and r["all"]["n"] == len(present)
    assert r["things"]["n"] > 0 and r["stuff"]["n"] > 0
    for t in present:
        assert r["per_class"][t]["pq"] == 1.0
    # The crowd segments predicted as such lie fully on crowd: ignored, not FP.
    assert sum(row["fp"] + row["fn"] for row in r["per_class"].values()) == 0
    s = miou.compute()
    assert s["miou"] == 1.0 and s["acc"] == 1.0
    assert ap.compute()["ap"] == 1.0


def naive_pq_counts(gt: GroundTruth, pred: PanopticResult, k: int) -> np.ndarray:
    """Per category [tp, fp, fn, iou_sum] by looping over segment pairs (reference)."""
    out = np.zeros((k, 4))
    gt_masks = [mask_utils.decode(s["rle"]).astype(bool) for s in gt.segments]
    void = ~np.any(gt_masks, axis=0) if gt_masks else np.ones((gt.height, gt.width), bool)
    seg_map = pred.segment_map.numpy()
    matched_gt, matched_pred = set(), set()
    for i, s in enumerate(gt.segments):
        for p in pred.segments:
            pm = seg_map == p.id
            inter = (gt_masks[i] & pm).sum()
            if s["iscrowd"] or s["category"] != p.label or not inter:
                continue
            iou = inter / (pm.sum() + gt_masks[i].sum() - inter - (pm & void).sum())
            if iou > 0.5:
                out[s["category"], 0] += 1
                out[s["category"], 3] += iou
                matched_gt.add(i)
                matched_pred.add(p.id)
    for i, s in enumerate(gt.segments):
        if i not in matched_gt and not s["iscrowd"]:
            out[s["category"], 2] += 1
    for p in pred.segments:
        pm = seg_map == p.id
        if p.id in matched_pred or not pm.any():
            continue
        crowd = [
            m
            for m, s in zip(gt_masks, gt.segments, strict=True)
            if s["iscrowd"] and s["category"] == p.label
        ]
        ignored = (pm & void).sum() + sum((pm & m).sum() for m in crowd)
        if ignored / pm.sum() <= 0.5:
            out[p.label, 1] += 1
    return out


def test_pq_matches_a_naive_loop_on_random_maps():
    rng = np.random.default_rng(0)
    for image_id in range(20):
        # Random blocky GT (ids 0..6, 0 = VOID) and a perturbed copy as the prediction.
        gt_ids = np.kron(rng.integers(0, 7, (4, 4)), np.ones((4, 4), dtype=np.int64))
        pred_ids = gt_ids.copy()
        flip = rng.random(gt_ids.shape) < 0.3
        pred_ids[flip] = rng.integers(0, 9, flip.sum())
        gt_segments = [
            {
                "id": int(v),
                "category": int(rng.integers(0, 4)),
                "iscrowd": int(rng.random() < 0.2),
                "area": int((gt_ids == v).sum()),
                "rle": rle(gt_ids == v),
            }
            for v in np.unique(gt_ids)
            if v
        ]
        gt = GroundTruth(image_id, 16, 16, gt_segments)
        labels = {s["id"]: s["category"] for s in gt_segments}
        pred = PanopticResult(
            torch.from_numpy(pred_ids.astype(np.int32)),
            [
                Segment(int(v), labels.get(int(v), int(rng.integers(0, 4))), True, 1.0, 0)
                for v in np.unique(pred_ids)
                if v
            ],
        )
        metric = pq_of((gt, pred))
        got = np.stack([metric.tp, metric.fp, metric.fn, metric.iou], axis=1)
        assert got == pytest.approx(naive_pq_counts(gt, pred, len(CATEGORIES)))


def test_rle_runs_match_pycocotools():
    # The run-based painting (no mask decoding) against pycocotools' decoder: blocky and noisy
    # masks, long runs (several 5-bit groups, negative deltas), empty and full masks.
    from knet.method.metrics import _paint

    rng = np.random.default_rng(1)
    height, width = 37, 300
    ids = np.kron(rng.integers(0, 6, (3, 10)), np.ones((13, 30), dtype=np.int64))[:height]
    ids[rng.random(ids.shape) < 0.05] = 6
    masks = [ids == v for v in range(7)] + [np.zeros_like(ids, bool)]
    segments = [{"id": i + 1, "rle": rle(m)} for i, m in enumerate(masks)]
    painted = _paint(segments, np.arange(1, 9), height, width, 1)
    expected = sum((i + 1) * m.astype(np.int64) for i, m in enumerate(masks))
    assert painted.tolist() == expected.tolist()
    full = [{"id": 1, "rle": rle(np.ones((height, width), bool))}]
    assert (_paint(full, np.array([5]), height, width, 1) == 5).all()
    uncompressed = [{"id": 1, "rle": {"size": [2, 3], "counts": [1, 2, 3]}}]
    assert _paint(uncompressed, np.array([1]), 2, 3, 1).tolist() == [[0, 1, 0], [1, 0, 0]]
    overlapping = [{"id": 1, "rle": rle(masks[0])}, {"id": 2, "rle": rle(masks[0] | masks[1])}]
    assert _paint(overlapping, np.array([1, 2]), height, width, 1) is None
    # Overlapping segments (instance data): the later segment wins in the semantic map.
    gt = GroundTruth(1, height, width, [{**s, "category": i} for i, s in enumerate(overlapping)])
    assert (semantic_from_segments(gt) == np.where(masks[0] | masks[1], 1, 255)).all()
