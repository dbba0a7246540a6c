"""HungarianMatcher (spec §4.1): batched costs, edge cases, and the cost formula by hand."""

from __future__ import annotations

import math

import pytest
import torch

from knet.method.matcher import HungarianMatcher


def _random_case(
    num_gt: list[int], num_kernels: int = 6, num_classes: int = 5, size: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    batch = len(num_gt)
    mask_logits = torch.randn(batch, num_kernels, size, size, generator=gen) * 3
    cls_logits = torch.randn(batch, num_kernels, num_classes, generator=gen) * 2
    gt_masks = [torch.rand(g, size, size, generator=gen) for g in num_gt]
    gt_labels = [torch.randint(0, num_classes, (g,), generator=gen) for g in num_gt]
    return mask_logits, cls_logits, gt_masks, gt_labels


def _pairs(rows: torch.Tensor, cols: torch.Tensor) -> set[tuple[int, int]]:
    return set(zip(rows.tolist(), cols.tolist(), strict=True))


# ------------------------------------------------------------------------------------ batching


@pytest.mark.parametrize("with_cls", [True, False])
def test_batched_equals_per_image(with_cls: bool) -> None:
    torch.manual_seed(0)
    num_gt = [3, 0, 5]
    mask_logits, cls_logits, gt_masks, gt_labels = _random_case(num_gt, seed=1)
    if not with_cls:
        cls_logits = None
    matcher = HungarianMatcher()
    batched = matcher(mask_logits, cls_logits, gt_masks, gt_labels)
    assert len(batched) == 3
    for b in range(3):
        single = matcher(
            mask_logits[b : b + 1],
            None if cls_logits is None else cls_logits[b : b + 1],
            [gt_masks[b]],
            [gt_labels[b]],
        )
        assert len(single) == 1
        rows, cols = batched[b]
        rows1, cols1 = single[0]
        assert torch.equal(rows, rows1)
        assert torch.equal(cols, cols1)
        assert len(rows) == min(6, num_gt[b])


def test_batched_cost_matrix_equals_per_image_columns() -> None:
    mask_logits, cls_logits, gt_masks, gt_labels = _random_case([2, 0, 4], seed=2)
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(mask_logits, cls_logits, gt_masks, gt_labels)
    assert cost.shape == (3, 6, 4)
    for b, g in enumerate([2, 0, 4]):
        single = matcher.cost_matrix(
            mask_logits[b : b + 1], cls_logits[b : b + 1], [gt_masks[b]], [gt_labels[b]]
        )
        assert single.shape == (1, 6, g)
        torch.testing.assert_close(cost[b, :, :g], single[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ empty


def test_image_without_targets_returns_empty_int64() -> None:
    mask_logits, cls_logits, _, _ = _random_case([0], seed=3)
    matcher = HungarianMatcher()
    ((rows, cols),) = matcher(
        mask_logits, cls_logits, [torch.zeros(0, 8, 8)], [torch.zeros(0, dtype=torch.int64)]
    )
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    assert rows.shape == (0,) and cols.shape == (0,)


@pytest.mark.parametrize("with_cls", [True, False])
def test_batch_where_no_image_has_targets(with_cls: bool) -> None:
    mask_logits, cls_logits, _, _ = _random_case([0, 0], seed=4)
    matcher = HungarianMatcher()
    masks = [torch.zeros(0, 8, 8), torch.zeros(0, 8, 8)]
    labels = [torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)]
    cost = matcher.cost_matrix(mask_logits, cls_logits if with_cls else None, masks, labels)
    assert cost.shape == (2, 6, 0)
    matches = matcher(mask_logits, cls_logits if with_cls else None, masks, labels)
    assert len(matches) == 2
    for rows, cols in matches:
        assert rows.dtype == torch.int64 and cols.dtype == torch.int64
        assert rows.numel() == 0 and cols.numel() == 0


# ------------------------------------------------------------------------------------ permutation


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permuting_targets_permutes_assignment(seed: int) -> None:
    mask_logits, cls_logits, gt_masks, gt_labels = _random_case([4], seed=10 + seed)
    matcher = HungarianMatcher()
    ((rows, cols),) = matcher(mask_logits, cls_logits, gt_masks, gt_labels)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
    ((rows_p, cols_p),) = matcher(
        mask_logits, cls_logits, [gt_masks[0][perm]], [gt_labels[0][perm]]
    )
    # Permuted gt i is original gt perm[i]: mapping back gives the same kernel -> mask pairs.
    assert torch.equal(rows_p, rows)
    assert _pairs(rows_p, perm[cols_p]) == _pairs(rows, cols)
    # Equivalently the gt index of each kernel follows the inverse permutation.
    inverse = torch.argsort(perm)
    assert torch.equal(cols_p, inverse[cols])


# ------------------------------------------------------------------------------------ cost formula


def _reference_cost(
    mask_logits: torch.Tensor,
    cls_logits: torch.Tensor | None,
    gt_masks: torch.Tensor,
    gt_labels: torch.Tensor,
) -> list[list[float]]:
    """Spec §4.1, one image, explicit loops in float64 Python arithmetic."""

    def sigmoid(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x))

    n_kernels = mask_logits.shape[0]
    n_gt = gt_masks.shape[0]
    preds = [[sigmoid(v) for v in m.flatten().tolist()] for m in mask_logits]
    gts = [m.flatten().tolist() for m in gt_masks]
    hw = len(preds[0])
    alpha, gamma, focal_eps, dice_eps = 0.25, 2.0, 1e-12, 1e-3
    cost = [[0.0] * n_gt for _ in range(n_kernels)]
    for n in range(n_kernels):
        for g in range(n_gt):
            p, t = preds[n], gts[g]
            sum_pt = sum(pi * ti for pi, ti in zip(p, t, strict=True))
            sum_p2 = sum(pi * pi for pi in p)
            sum_t2 = sum(ti * ti for ti in t)
            dice = -2 * sum_pt / (sum_p2 + dice_eps + sum_t2 + dice_eps)
            agree = sum(pi * ti + (1 - pi) * (1 - ti) for pi, ti in zip(p, t, strict=True))
            mask = -agree / hw
            total = 4.0 * dice + 1.0 * mask
            if cls_logits is not None:
                q = sigmoid(float(cls_logits[n, int(gt_labels[g])]))
                focal = -alpha * (1 - q) ** gamma * math.log(q + focal_eps) + (
                    1 - alpha
                ) * q**gamma * math.log(1 - q + focal_eps)
                total += 2.0 * focal
            cost[n][g] = total
    return cost


@pytest.mark.parametrize("with_cls", [True, False])
def test_cost_matrix_matches_hand_reference(with_cls: bool) -> None:
    torch.manual_seed(5)
    n_kernels, n_gt, n_classes = 3, 2, 4
    mask_logits = torch.randn(1, n_kernels, 3, 3, dtype=torch.float64) * 2
    cls_logits = torch.randn(1, n_kernels, n_classes, dtype=torch.float64) * 2
    gt_masks = torch.rand(n_gt, 3, 3, dtype=torch.float64)
    gt_masks[0, 0] = 1.0  # some exactly binary pixels too
    gt_masks[1, :, 2] = 0.0
    gt_labels = torch.tensor([3, 1])
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(
        mask_logits, cls_logits if with_cls else None, [gt_masks], [gt_labels]
    )
    expected = _reference_cost(
        mask_logits[0], cls_logits[0] if with_cls else None, gt_masks, gt_labels
    )
    assert cost.shape == (1, n_kernels, n_gt)
    for n in range(n_kernels):
        for g in range(n_gt):
            assert float(cost[0, n, g]) == pytest.approx(expected[n][g], rel=1e-5, abs=1e-6)


def test_cls_none_drops_only_the_class_term() -> None:
    mask_logits, cls_logits, gt_masks, gt_labels = _random_case([3], seed=6)
    matcher = HungarianMatcher()
    with_cls = matcher.cost_matrix(mask_logits, cls_logits, gt_masks, gt_labels)
    without = matcher.cost_matrix(mask_logits, None, gt_masks, gt_labels)
    masks_only = HungarianMatcher(cls_cost=0.0).cost_matrix(
        mask_logits, cls_logits, gt_masks, gt_labels
    )
    torch.testing.assert_close(without, masks_only)
    assert not torch.allclose(with_cls, without)


def test_cost_weights_are_2_4_1() -> None:
    mask_logits, cls_logits, gt_masks, gt_labels = _random_case([3], seed=7)
    only = {
        "cls": HungarianMatcher(cls_cost=1.0, dice_cost=0.0, mask_cost=0.0),
        "dice": HungarianMatcher(cls_cost=0.0, dice_cost=1.0, mask_cost=0.0),
        "mask": HungarianMatcher(cls_cost=0.0, dice_cost=0.0, mask_cost=1.0),
    }
    parts = {
        k: m.cost_matrix(mask_logits, cls_logits, gt_masks, gt_labels) for k, m in only.items()
    }
    total = HungarianMatcher().cost_matrix(mask_logits, cls_logits, gt_masks, gt_labels)
    torch.testing.assert_close(total, 2 * parts["cls"] + 4 * parts["dice"] + parts["mask"])


# ------------------------------------------------------------------------------------ assignment


def test_more_gt_than_kernels_matches_every_kernel_once() -> None:
    mask_logits, cls_logits, gt_masks, gt_labels = _random_case([9], num_kernels=4, seed=8)
    ((rows, cols),) = HungarianMatcher()(mask_logits, cls_logits, gt_masks, gt_labels)
    assert len(rows) == len(cols) == 4
    assert rows.tolist() == [0, 1, 2, 3]
    assert len(set(cols.tolist())) == 4
    assert all(0 <= c < 9 for c in cols.tolist())


@pytest.mark.parametrize("with_cls", [True, False])
def test_clear_cut_case_is_matched_exactly(with_cls: bool) -> None:
    gen = torch.Generator().manual_seed(9)
    num_gt, num_kernels, num_classes, size = 5, 7, 6, 8
    gt_masks = (torch.rand(num_gt, size, size, generator=gen) > 0.5).float()
    gt_labels = torch.randint(0, num_classes, (num_gt,), generator=gen)
    perm = torch.randperm(num_gt, generator=gen)  # kernel k predicts gt perm[k]
    mask_logits = torch.full((1, num_kernels, size, size), -10.0)
    cls_logits = torch.full((1, num_kernels, num_classes), -10.0)
    for k in range(num_gt):
        mask_logits[0, k] = gt_masks[perm[k]] * 20 - 10
        cls_logits[0, k, gt_labels[perm[k]]] = 10.0
    ((rows, cols),) = HungarianMatcher()(
        mask_logits, cls_logits if with_cls else None, [gt_masks], [gt_labels]
    )
    assert rows.tolist() == list(range(num_gt))
    assert cols.tolist() == perm.tolist()


def test_deterministic_and_rows_ascending() -> None:
    mask_logits, cls_logits, gt_masks, gt_labels = _random_case([4, 2, 6], seed=11)
    matcher = HungarianMatcher()
    first = matcher(mask_logits, cls_logits, gt_masks, gt_labels)
    second = matcher(mask_logits.clone(), cls_logits.clone(), gt_masks, gt_labels)
    for (r1, c1), (r2, c2) in zip(first, second, strict=True):
        assert torch.equal(r1, r2) and torch.equal(c1, c2)
        assert r1.dtype == torch.int64 and c1.dtype == torch.int64
        assert r1.device.type == "cpu" and c1.device.type == "cpu"
        assert torch.all(r1[1:] > r1[:-1])
        assert len(set(c1.tolist())) == len(c1)
