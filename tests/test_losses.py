"""K-Net losses (spec §4.2, §5.2) against values worked out by hand on tiny tensors.

Hand values are written from the formulas with ``math``; the functions under test are never used
to produce their own expected values.
"""

from __future__ import annotations

import math

import pytest
import torch

from knet.config import LossConfig
from knet.method.losses import (
    KNetCriterion,
    _rank_targets,
    dice_loss,
    rank_loss,
    sigmoid_focal_loss,
    upsample2x,
)
from knet.model import KNetOutput, StageOutput
from knet.structures import Targets

LOG2 = math.log(2.0)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def softplus(x: float) -> float:
    return math.log(1.0 + math.exp(x))


def bce(x: float, t: float) -> float:
    """Binary cross-entropy of logit x against target t."""
    return t * softplus(-x) + (1 - t) * softplus(x)


def focal(x: float, t: int, alpha: float = 0.25, gamma: float = 2.0) -> float:
    """Sigmoid focal loss of logit x against a binary target t."""
    p = sig(x)
    if t == 1:
        return alpha * (1 - p) ** gamma * -math.log(p)
    return (1 - alpha) * p**gamma * -math.log(1 - p)


def lse(values: list[float]) -> float:
    return math.log(sum(math.exp(v) for v in values))


def const_maps(values: list[float], size: int = 2) -> torch.Tensor:
    """(1, len(values), size, size) with map k constant at values[k]."""
    return torch.tensor(values, dtype=torch.float32)[None, :, None, None].repeat(1, 1, size, size)


# ------------------------------------------------------------------------------------ elementary


def test_sigmoid_focal_loss_hand_values() -> None:
    logits = torch.tensor([0.0, 0.0, 2.0, 2.0, -1.5])
    targets = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    out = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    assert out.shape == logits.shape
    p2 = 1 / (1 + math.exp(-2.0))
    pm = 1 / (1 + math.exp(1.5))
    expected = [
        0.25 * 0.25 * LOG2,  # p = 1/2, target 1
        0.75 * 0.25 * LOG2,  # p = 1/2, target 0
        0.25 * (1 - p2) ** 2 * math.log(1 + math.exp(-2.0)),
        0.75 * p2**2 * math.log(1 + math.exp(2.0)),
        0.25 * (1 - pm) ** 2 * math.log(1 + math.exp(1.5)),
    ]
    for got, want in zip(out.tolist(), expected, strict=True):
        assert got == pytest.approx(want, rel=1e-5)


def test_sigmoid_focal_loss_alpha_gamma_are_used() -> None:
    out = sigmoid_focal_loss(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), 0.5, 1.0)
    assert out.tolist() == pytest.approx([0.5 * 0.5 * LOG2, 0.5 * 0.5 * LOG2], rel=1e-6)


def test_dice_loss_hand_value_1x4() -> None:
    # sigmoid of these logits: 0.5, 0.75, 0.25, 0.9
    logits = torch.tensor([[0.0, math.log(3.0), -math.log(3.0), math.log(9.0)]])
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.5]])
    sum_pt = 0.5 * 1 + 0.75 * 1 + 0.25 * 0 + 0.9 * 0.5
    sum_p2 = 0.5**2 + 0.75**2 + 0.25**2 + 0.9**2
    sum_t2 = 1 + 1 + 0 + 0.25
    expected = 1 - 2 * sum_pt / (sum_p2 + 1e-3 + sum_t2 + 1e-3)
    assert float(dice_loss(logits, targets)) == pytest.approx(expected, rel=1e-6)


def test_dice_loss_is_mean_over_masks() -> None:
    logits = torch.tensor([[0.0, math.log(3.0), -math.log(3.0), math.log(9.0)], [0.0] * 4])
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.5], [0.0] * 4])
    first = 1 - 2 * 1.7 / (1.685 + 2.25 + 2e-3)
    second = 1 - 0.0 / (4 * 0.25 + 2e-3)  # no overlap: loss 1
    assert float(dice_loss(logits, targets)) == pytest.approx((first + second) / 2, rel=1e-5)


def test_rank_loss_counts_ignored_pixels_in_mean() -> None:
    # B=1, N=2 kernels, 1x2 pixels; pixel 0 belongs to kernel 1, pixel 1 is ignored (-1).
    logits = torch.tensor([0.0, 0.0, math.log(3.0), 5.0]).view(1, 2, 1, 2)
    targets = torch.tensor([[[1, -1]]])
    expected = -math.log(3.0 / 4.0) / 2  # softmax(0, log 3)[1] = 3/4, mean over 2 pixels
    assert float(rank_loss(logits, targets)) == pytest.approx(expected, rel=1e-6)


def test_upsample2x_keeps_constants_and_doubles_size() -> None:
    maps = const_maps([-5.0, 0.0, 3.25], size=3)
    up = upsample2x(maps)
    assert up.shape == (1, 3, 6, 6)
    torch.testing.assert_close(up, const_maps([-5.0, 0.0, 3.25], size=6))


# ------------------------------------------------------------------------------------ rank targets


def test_rank_targets_overwrite_uncovered_and_large_indices() -> None:
    shape = torch.Size((2, 300, 1, 4))
    batch_idx = torch.tensor([0, 0, 1, 1])
    kernel_idx = torch.tensor([3, 1, 280, 7])  # the higher index comes first in the list
    pos_targets = torch.tensor(
        [
            [1.0, 0.2, 0.0, 0.0],  # kernel 3 covers pixels 0, 1 of image 0
            [1.0, 1.0, 0.7, 0.0],  # kernel 1 covers pixels 0, 1, 2 of image 0
            [0.0, 0.5, 0.0, 0.0],  # kernel 280 covers pixel 1 of image 1
            [0.0, 1.0, 1.0, 0.0],  # kernel 7 covers pixels 1, 2 of image 1
        ]
    )
    rank = _rank_targets(shape, batch_idx, kernel_idx, pos_targets)
    assert rank.dtype == torch.int64
    assert rank.shape == (2, 1, 4)
    assert rank[0, 0].tolist() == [3, 3, 1, -1]
    assert rank[1, 0].tolist() == [-1, 280, 7, -1]


def test_rank_targets_without_positives_are_all_ignored() -> None:
    empty = torch.zeros(0, dtype=torch.int64)
    rank = _rank_targets(torch.Size((2, 5, 2, 3)), empty, empty, torch.zeros(0, 6))
    assert rank.shape == (2, 2, 3)
    assert torch.all(rank == -1)


# ------------------------------------------------------------------------------------ criterion


def _gt_top_left() -> torch.Tensor:
    """(4, 4) binary mask covering the top-left 2x2 pixels."""
    mask = torch.zeros(4, 4)
    mask[:2, :2] = 1.0
    return mask


def _gt_bottom_half() -> torch.Tensor:
    mask = torch.zeros(4, 4)
    mask[2:] = 1.0
    return mask


def _instance_output() -> KNetOutput:
    # Stage 0 prefers kernel 1 (p = 1/2 vs sigmoid(-5)); stage 1's own masks would prefer
    # kernel 0, so matching stage 1 with its own masks instead of stage 0's gives other numbers.
    stage0 = StageOutput(const_maps([-5.0, 0.0]), None)
    cls = torch.tensor([[[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]]])
    stage1 = StageOutput(const_maps([0.0, -2.0]), cls)
    return KNetOutput([stage0, stage1], semantic_logits=torch.zeros(1, 3, 2, 2))


def _record_matches(criterion: KNetCriterion) -> list:
    """Each round's matches, as the criterion's one ``match_rounds`` call returns them."""
    recorded = []
    match_rounds = criterion.matcher.match_rounds

    def wrapped(*args):
        result = match_rounds(*args)
        recorded.extend(result)
        return result

    criterion.matcher.match_rounds = wrapped
    return recorded


def test_instance_criterion_hand_values() -> None:
    criterion = KNetCriterion(LossConfig(), "instance", num_thing_classes=3, num_stuff_classes=0)
    recorded = _record_matches(criterion)
    targets = [Targets(_gt_top_left()[None], torch.tensor([1]))]
    losses = criterion(_instance_output(), targets)
    assert set(losses) == {"s0.mask", "s0.dice", "s0.seg", "s1.cls", "s1.mask", "s1.dice"}
    # Matched kernel: 1 for stage 0 and for stage 1 (which matches stage 0's masks).
    assert len(recorded) == 2
    for ((rows, cols),) in recorded:
        assert rows.tolist() == [1] and cols.tolist() == [0]

    # s1.cls: focal over all 2 x 3 entries, kernel 1 positive at class 1, / num_pos = 1, x 2.
    cls = [[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]]
    focal_sum = sum(focal(cls[k][c], int(k == 1 and c == 1)) for k in range(2) for c in range(3))
    assert float(losses["s1.cls"]) == pytest.approx(2.0 * focal_sum, rel=1e-5)
    # s1.mask: BCE of the constant logit -2 over the 16 pixels (4 foreground).
    assert float(losses["s1.mask"]) == pytest.approx(
        (4 * bce(-2.0, 1) + 12 * bce(-2.0, 0)) / 16, rel=1e-5
    )
    p = sig(-2.0)
    dice = 1 - 2 * (4 * p) / (16 * p * p + 1e-3 + 4 + 1e-3)
    assert float(losses["s1.dice"]) == pytest.approx(4.0 * dice, rel=1e-5)
    # Stage 0: kernel 1 has p = 1/2 everywhere.
    assert float(losses["s0.mask"]) == pytest.approx(LOG2, rel=1e-5)
    assert float(losses["s0.dice"]) == pytest.approx(4.0 * (1 - 4.0 / 8.002), rel=1e-5)
    # s0.seg: zero logits, 16 pixels x 3 classes, 4 foreground pixels (class 1).
    seg = (4 * 0.25 * 0.25 * LOG2 + 44 * 0.75 * 0.25 * LOG2) / 4
    assert float(losses["s0.seg"]) == pytest.approx(seg, rel=1e-5)


def test_criterion_weights_scale_terms() -> None:
    base = KNetCriterion(LossConfig(), "instance", 3, 0)
    cfg = LossConfig(cls_weight=1.0, mask_weight=3.0, dice_weight=1.0, seg_weight=0.5)
    scaled = KNetCriterion(cfg, "instance", 3, 0)
    targets = [Targets(_gt_top_left()[None], torch.tensor([1]))]
    a = base(_instance_output(), targets)
    b = scaled(_instance_output(), targets)
    assert float(b["s1.cls"]) == pytest.approx(float(a["s1.cls"]) / 2, rel=1e-6)
    assert float(b["s1.mask"]) == pytest.approx(float(a["s1.mask"]) * 3, rel=1e-6)
    assert float(b["s1.dice"]) == pytest.approx(float(a["s1.dice"]) / 4, rel=1e-6)
    assert float(b["s0.seg"]) == pytest.approx(float(a["s0.seg"]) / 2, rel=1e-6)


def _leaf_output(batch: int, num_things: int, num_stuff: int, num_classes: int):
    torch.manual_seed(0)
    n = num_things + num_stuff
    m0 = torch.randn(batch, num_things, 2, 2, requires_grad=True)
    m1 = torch.randn(batch, n, 2, 2, requires_grad=True)
    c1 = torch.randn(batch, n, num_classes, requires_grad=True)
    sem = torch.randn(batch, num_classes, 2, 2, requires_grad=True)
    out = KNetOutput([StageOutput(m0, None), StageOutput(m1, c1)], semantic_logits=sem)
    return out, [m0, m1, c1, sem]


@pytest.mark.parametrize("task", ["instance", "panoptic"])
def test_no_ground_truth_gives_finite_losses_that_backpropagate(task: str) -> None:
    num_stuff = 2 if task == "panoptic" else 0
    out, leaves = _leaf_output(2, num_things=3, num_stuff=num_stuff, num_classes=2 + num_stuff)
    criterion = KNetCriterion(LossConfig(), task, num_thing_classes=2, num_stuff_classes=2)
    empty = Targets(torch.zeros(0, 4, 4), torch.zeros(0, dtype=torch.int64))
    losses = criterion(out, [empty, empty])
    assert {"s1.cls", "s1.mask", "s1.dice", "s0.mask", "s0.dice", "s0.seg"} <= set(losses)
    if task == "panoptic":
        assert {"s0.rank", "s1.rank"} <= set(losses)
    for name, value in losses.items():
        assert value.dim() == 0, name
        assert torch.isfinite(value), name
    total = sum(losses.values())
    total.backward()
    for leaf in leaves:
        assert leaf.grad is not None
        assert torch.all(torch.isfinite(leaf.grad))
    # All kernels are negatives: the class loss is the plain negative focal sum, / max(0, 1).
    assert leaves[2].grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ panoptic

T, S = 2, 2  # thing classes 0..1, stuff classes 2..3
STAGE1_MASKS = [
    0.5,
    -1.0,
    1.5,
    -0.5,
]  # 2 thing kernels, then stuff kernels 2 (class 2), 3 (class 3)
STAGE1_CLS = [
    [1.0, -0.5, 0.3, -2.0],
    [-1.5, 0.25, 2.0, 0.7],
    [0.4, -0.6, -0.2, 1.1],
    [-0.3, 0.9, 0.8, 0.6],
]


def _panoptic_output(cls: list[list[float]] | None = None, masks: list[float] | None = None):
    stage0 = StageOutput(const_maps([0.0, -5.0]), None)  # kernel 0 matches the thing
    stage1 = StageOutput(const_maps(masks or STAGE1_MASKS), torch.tensor([cls or STAGE1_CLS]))
    return KNetOutput([stage0, stage1], semantic_logits=torch.zeros(1, T + S, 2, 2))


def _panoptic_targets() -> list[Targets]:
    # One thing (class 0, top-left) and stuff class 2 (bottom half); stuff class 3 absent.
    masks = torch.stack([_gt_top_left(), _gt_bottom_half()])
    return [Targets(masks, torch.tensor([0, 2]))]


def _panoptic_losses(**kwargs) -> dict[str, torch.Tensor]:
    criterion = KNetCriterion(LossConfig(), "panoptic", num_thing_classes=T, num_stuff_classes=S)
    return criterion(_panoptic_output(**kwargs), _panoptic_targets())


def test_panoptic_hand_values() -> None:
    losses = _panoptic_losses()
    assert set(losses) == {
        "s0.mask", "s0.dice", "s0.seg", "s0.rank", "s1.cls", "s1.mask", "s1.dice", "s1.rank"
    }  # fmt: skip
    c = STAGE1_CLS
    # Thing kernels on thing columns only (kernel 0 positive at class 0); stuff kernel 2 on
    # column 2 (present), stuff kernel 3 on column 3 (absent -> negative). num_pos = 1 + 1.
    focal_sum = sum(focal(c[k][j], int(k == 0 and j == 0)) for k in range(2) for j in range(T))
    focal_sum += focal(c[2][2], 1) + focal(c[3][3], 0)
    assert float(losses["s1.cls"]) == pytest.approx(2.0 * focal_sum / 2, rel=1e-5)
    # Mask BCE over the 2 positive masks (kernel 0 vs thing, kernel 2 vs stuff), 32 pixels.
    x0, x2 = STAGE1_MASKS[0], STAGE1_MASKS[2]
    bce_sum = 4 * bce(x0, 1) + 12 * bce(x0, 0) + 8 * bce(x2, 1) + 8 * bce(x2, 0)
    assert float(losses["s1.mask"]) == pytest.approx(bce_sum / 32, rel=1e-5)
    p0, p2 = sig(x0), sig(x2)
    d0 = 1 - 2 * 4 * p0 / (16 * p0 * p0 + 1e-3 + 4 + 1e-3)
    d2 = 1 - 2 * 8 * p2 / (16 * p2 * p2 + 1e-3 + 8 + 1e-3)
    assert float(losses["s1.dice"]) == pytest.approx(4.0 * (d0 + d2) / 2, rel=1e-5)
    # Rank: top-left 2x2 -> kernel 0, bottom half -> kernel 2 (stuff), top-right ignored but
    # counted: 16 pixels in the mean.
    z = lse(STAGE1_MASKS)
    rank = (4 * (z - x0) + 8 * (z - x2)) / 16
    assert float(losses["s1.rank"]) == pytest.approx(0.1 * rank, rel=1e-5)
    # Stage 0 rank over the 2 thing kernels only (logits 0 and -5); only the thing is a target.
    rank0 = 4 * (lse([0.0, -5.0]) - 0.0) / 16
    assert float(losses["s0.rank"]) == pytest.approx(0.1 * rank0, rel=1e-5)
    # Stage 0 seg: 4 classes, 12 foreground pixels (4 thing class 0, 8 stuff class 2).
    seg = (12 * 0.25 * 0.25 * LOG2 + 52 * 0.75 * 0.25 * LOG2) / 12
    assert float(losses["s0.seg"]) == pytest.approx(seg, rel=1e-5)


def test_stuff_kernel_is_supervised_only_on_its_own_column() -> None:
    reference = float(_panoptic_losses()["s1.cls"])
    for kernel, own in ((2, 2), (3, 3)):
        for column in range(T + S):
            cls = [row[:] for row in STAGE1_CLS]
            cls[kernel][column] += 3.0
            changed = float(_panoptic_losses(cls=cls)["s1.cls"])
            if column == own:
                assert changed != pytest.approx(reference, rel=1e-4), (kernel, column)
            else:
                assert changed == pytest.approx(reference, rel=1e-6), (kernel, column)


def test_thing_kernels_ignore_stuff_columns() -> None:
    reference = float(_panoptic_losses()["s1.cls"])
    for kernel in (0, 1):
        for column in range(T + S):
            cls = [row[:] for row in STAGE1_CLS]
            cls[kernel][column] -= 2.5
            changed = float(_panoptic_losses(cls=cls)["s1.cls"])
            if column < T:
                assert changed != pytest.approx(reference, rel=1e-4), (kernel, column)
            else:
                assert changed == pytest.approx(reference, rel=1e-6), (kernel, column)


def test_absent_stuff_class_has_no_mask_loss() -> None:
    reference = _panoptic_losses()
    masks = STAGE1_MASKS[:]
    masks[3] = 4.0  # absent stuff class 3
    changed = _panoptic_losses(masks=masks)
    for name in ("s1.mask", "s1.dice"):
        assert float(changed[name]) == pytest.approx(float(reference[name]), rel=1e-6)
    masks = STAGE1_MASKS[:]
    masks[2] = 4.0  # present stuff class 2
    changed = _panoptic_losses(masks=masks)
    for name in ("s1.mask", "s1.dice"):
        assert float(changed[name]) != pytest.approx(float(reference[name]), rel=1e-4)


# ------------------------------------------------------------------------------------ num_pos


def test_num_pos_uses_min_kernels_gt_and_present_stuff() -> None:
    # 2 images, 2 thing kernels, 3 thing classes; image 0 has 3 GT (min(2, 3) = 2), image 1
    # has 1 GT: num_pos = 3 (not 4). All GT share class 0 and all logits are 0, so the focal sum
    # does not depend on which kernel got which GT: 3 positives, 9 negatives.
    torch.manual_seed(0)
    masks0 = (torch.rand(3, 4, 4) > 0.5).float()
    masks1 = _gt_top_left()[None]
    targets = [
        Targets(masks0, torch.tensor([0, 0, 0])),
        Targets(masks1, torch.tensor([0])),
    ]
    out = KNetOutput(
        [
            StageOutput(torch.randn(2, 2, 2, 2), None),
            StageOutput(torch.randn(2, 2, 2, 2), torch.zeros(2, 2, 3)),
        ],
        semantic_logits=torch.zeros(2, 3, 2, 2),
    )
    criterion = KNetCriterion(LossConfig(), "instance", 3, 0)
    losses = criterion(out, targets)
    focal_sum = 3 * 0.25 * 0.25 * LOG2 + 9 * 0.75 * 0.25 * LOG2
    assert float(losses["s1.cls"]) == pytest.approx(2.0 * focal_sum / 3, rel=1e-5)


def test_num_pos_at_least_one() -> None:
    empty = Targets(torch.zeros(0, 4, 4), torch.zeros(0, dtype=torch.int64))
    out = KNetOutput(
        [
            StageOutput(torch.zeros(1, 2, 2, 2), None),
            StageOutput(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 3)),
        ],
        semantic_logits=torch.zeros(1, 3, 2, 2),
    )
    losses = KNetCriterion(LossConfig(), "instance", 3, 0)(out, [empty])
    assert float(losses["s1.cls"]) == pytest.approx(2.0 * 6 * 0.75 * 0.25 * LOG2, rel=1e-5)
    assert float(losses["s1.mask"]) == 0.0
    assert float(losses["s1.dice"]) == 0.0


def test_num_pos_counts_present_stuff_only() -> None:
    # Only stuff class 3 present (no thing): num_pos = 1; all logits 0 -> 1 positive entry
    # (kernel 3, column 3) and the negatives: 2 thing kernels x 2 thing columns + kernel 2 col 2.
    targets = [Targets(_gt_bottom_half()[None], torch.tensor([3]))]
    out = KNetOutput(
        [
            StageOutput(torch.zeros(1, 2, 2, 2), None),
            StageOutput(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, T + S)),
        ],
        semantic_logits=torch.zeros(1, T + S, 2, 2),
    )
    losses = KNetCriterion(LossConfig(), "panoptic", T, S)(out, targets)
    focal_sum = 1 * 0.25 * 0.25 * LOG2 + 5 * 0.75 * 0.25 * LOG2
    assert float(losses["s1.cls"]) == pytest.approx(2.0 * focal_sum / 1, rel=1e-5)


# ------------------------------------------------------------------------------------ semantic


def test_semantic_cross_entropy_hand_values() -> None:
    # Stage 0: per-pixel logits at the label size; stage 1: constant per class at half size
    # (bilinear resize keeps constants). Labels 4x4 with two ignored pixels.
    stage0 = torch.zeros(1, 3, 4, 4)
    stage0[0, :, 0, 0] = torch.tensor([2.0, -1.0, 0.5])
    stage0[0, :, 1, 2] = torch.tensor([-0.5, 1.5, 0.0])
    labels = torch.full((4, 4), 1, dtype=torch.int64)
    labels[0, 0] = 0
    labels[1, 2] = 2
    labels[3, 3] = 255
    labels[2, 0] = 255
    stage1 = const_maps([0.3, -0.7, 1.2])
    out = KNetOutput([StageOutput(stage0, None), StageOutput(stage1, None)], None)
    criterion = KNetCriterion(LossConfig(), "semantic", 3, 0)
    losses = criterion(out, [Targets(torch.zeros(0, 1, 1), torch.zeros(0), semantic=labels)])
    assert set(losses) == {"s0.ce", "s1.ce"}
    # Stage 0: pixel (0,0) class 0, pixel (1,2) class 2, 12 other valid zero-logit pixels of
    # class 1 (-log 1/3 each), 2 ignored pixels still counted in the mean (16).
    ce0 = (lse([2.0, -1.0, 0.5]) - 2.0) + (lse([-0.5, 1.5, 0.0]) - 0.0) + 12 * math.log(3.0)
    assert float(losses["s0.ce"]) == pytest.approx(ce0 / 16, rel=1e-5)
    z = lse([0.3, -0.7, 1.2])
    ce1 = (z - 0.3) + (z - 1.2) + 12 * (z + 0.7)
    assert float(losses["s1.ce"]) == pytest.approx(ce1 / 16, rel=1e-5)


def test_semantic_without_labels_raises() -> None:
    out = KNetOutput([StageOutput(torch.zeros(1, 3, 2, 2), None)], None)
    criterion = KNetCriterion(LossConfig(), "semantic", 3, 0)
    with pytest.raises(ValueError):
        criterion(out, [Targets(torch.zeros(0, 1, 1), torch.zeros(0))])


# ------------------------------------------------------------------------------------ stage loop


def test_each_round_is_matched_with_the_previous_rounds_predictions() -> None:
    # Panoptic, two update rounds: round 1 uses stage-0 masks without classes; round 2 uses
    # round 1's thing kernels (masks upsampled, class logits on the thing columns), detached.
    torch.manual_seed(1)
    m0 = torch.randn(1, 2, 2, 2, requires_grad=True)
    m1 = torch.randn(1, 4, 2, 2, requires_grad=True)
    c1 = torch.randn(1, 4, T + S, requires_grad=True)
    m2 = torch.randn(1, 4, 2, 2, requires_grad=True)
    c2 = torch.randn(1, 4, T + S, requires_grad=True)
    out = KNetOutput(
        [StageOutput(m0, None), StageOutput(m1, c1), StageOutput(m2, c2)],
        semantic_logits=torch.zeros(1, T + S, 2, 2),
    )
    criterion = KNetCriterion(LossConfig(), "panoptic", T, S)
    calls, batches = [], []
    match_rounds = criterion.matcher.match_rounds

    def spy(rounds, gt_masks, gt_labels):
        batches.append(len(rounds))
        calls.extend((m, c, gt_masks, gt_labels) for m, c in rounds)
        return match_rounds(rounds, gt_masks, gt_labels)

    criterion.matcher.match_rounds = spy
    losses = criterion(out, _panoptic_targets())
    assert {"s2.cls", "s2.mask", "s2.dice", "s2.rank"} <= set(losses)
    assert batches == [3]  # one call (one host transfer) for stage 0, round 1 and round 2
    torch.testing.assert_close(calls[0][0], upsample2x(m0).detach())
    assert calls[0][1] is None
    torch.testing.assert_close(calls[1][0], upsample2x(m0).detach())
    assert calls[1][1] is None
    torch.testing.assert_close(calls[2][0], upsample2x(m1)[:, :2].detach())
    torch.testing.assert_close(calls[2][1], c1[:, :2, :T].detach())
    for mask_logits, cls_logits, gt_masks, gt_labels in calls:
        assert not mask_logits.requires_grad
        assert cls_logits is None or not cls_logits.requires_grad
        # Only the thing ground truth is matched.
        assert gt_labels[0].tolist() == [0]
        torch.testing.assert_close(gt_masks[0], _gt_top_left()[None])


def test_tiny_model_output_trains() -> None:
    from knet.config import BackboneConfig, ModelConfig
    from knet.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        task="panoptic",
        backbone=BackboneConfig(depth=18, base_channels=8, frozen_stages=0),
        channels=16,
        num_groups=4,
        num_kernels=4,
        num_stages=2,
        num_heads=2,
        ffn_channels=32,
    )
    model = build_model(cfg, num_thing_classes=T, num_stuff_classes=S)
    out = model(torch.randn(1, 3, 64, 64))
    masks = torch.zeros(2, 16, 16)
    masks[0, :8, :8] = 1.0
    masks[1, 8:] = 1.0
    losses = KNetCriterion(LossConfig(), "panoptic", T, S)(
        out, [Targets(masks, torch.tensor([1, 3]))]
    )
    assert {f"s{i}.{k}" for i in (1, 2) for k in ("cls", "mask", "dice", "rank")} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(g is None or torch.all(torch.isfinite(g)) for g in grads)


def test_stage0_seg_paints_only_matched_things() -> None:
    # Spec §4.2 loss_rpn_seg: "instance: thing labels painted from matched GT". One thing kernel
    # and two GT things: the kernel (positive in the top-left cell) matches GT 0 (class 0,
    # top-left); GT 1 (class 1, bottom-right) is unmatched and stays background.
    gt1 = torch.zeros(4, 4)
    gt1[2:, 2:] = 1.0
    targets = [Targets(torch.stack([_gt_top_left(), gt1]), torch.tensor([0, 1]))]
    m0 = torch.full((1, 1, 2, 2), -5.0)
    m0[0, 0, 0, 0] = 5.0
    out = KNetOutput(
        [StageOutput(m0, None), StageOutput(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2))],
        semantic_logits=torch.zeros(1, 2, 2, 2),
    )
    criterion = KNetCriterion(LossConfig(), "instance", 2, 0)
    recorded = _record_matches(criterion)
    losses = criterion(out, targets)
    assert recorded[0][0][1].tolist() == [0]
    # 16 pixels x 2 classes: 4 positives (GT 0 at class 0), 28 negatives, 4 foreground pixels.
    seg = (4 * 0.25 * 0.25 * LOG2 + 28 * 0.75 * 0.25 * LOG2) / 4
    assert float(losses["s0.seg"]) == pytest.approx(seg, rel=1e-5)


def test_two_segments_of_one_stuff_class_merge_into_one_stuff_map():

    criterion = KNetCriterion(LossConfig(), "panoptic", num_thing_classes=1, num_stuff_classes=2)
    masks = torch.zeros(3, 4, 4)
    masks[0, :2] = 1.0  # stuff class 1 (training id 1), top half
    masks[1, 2:] = 1.0  # stuff class 1 again, bottom half
    masks[2, :, :1] = 1.0  # stuff class 2
    targets = [Targets(masks, torch.tensor([1, 1, 2]))]
    layout = criterion.layout([t.labels.numpy() for t in targets], 4, torch.device("cpu"))
    maps, present, batch_idx, slots = criterion._stuff_targets(targets, layout)
    assert batch_idx.tolist() == [0, 0] and slots.tolist() == [0, 1]
    assert present.tolist() == [[True, True]]
    assert maps[0, 0].eq(1).all()  # the union covers the whole image
    assert maps[0, 1].sum() == 4
