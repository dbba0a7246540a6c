"""Hungarian matching of thing kernels to ground-truth masks (spec §4.1).

Letters: B images, N thing kernels, G ground-truth things (padded to the batch maximum),
K thing classes, P pixels of the stride-4 map.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from knet.syncs import to_host


class HungarianMatcher:
    """One-to-one assignment minimising ``cls * focal + dice * dice + mask * mask`` costs.

    Costs are computed for the whole batch at once on the predictions' device; the (B, N, G)
    cost tensors of every round the caller matches cross to the CPU together, once per batch,
    for ``scipy``'s ``linear_sum_assignment``.
    """

    def __init__(
        self,
        cls_cost: float = 2.0,
        dice_cost: float = 4.0,
        mask_cost: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        eps: float = 1e-3,
    ) -> None:
        self.cls_cost = cls_cost
        self.dice_cost = dice_cost
        self.mask_cost = mask_cost
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.eps = eps

    def __call__(
        self,
        mask_logits: Tensor,
        cls_logits: Tensor | None,
        gt_masks: list[Tensor],
        gt_labels: list[Tensor],
    ) -> list[tuple[Tensor, Tensor]]:
        """Match every image's kernels to its ground truth.

        Args:
            mask_logits: (B, N, h, w) predicted mask logits (the previous round's, detached).
            cls_logits: (B, N, K) class logits over the thing classes, or None to drop the
                class cost (stage 0 and the first update round).
            gt_masks: per image (G_b, h, w) soft masks.
            gt_labels: per image (G_b,) thing training ids in [0, K).

        Returns:
            Per image ``(kernel_indices, gt_indices)``, two int64 CPU tensors of equal length
            min(N, G_b); ``kernel_indices`` ascending.
        """
        return self.match_rounds([(mask_logits, cls_logits)], gt_masks, gt_labels)[0]

    @torch.no_grad()
    def match_rounds(
        self,
        rounds: list[tuple[Tensor, Tensor | None]],
        gt_masks: list[Tensor],
        gt_labels: list[Tensor],
    ) -> list[list[tuple[Tensor, Tensor]]]:
        """:meth:`__call__` for several rounds' predictions against the same ground truth.

        Every round's (B, N, G) costs are stacked and cross to the CPU in one transfer, the
        training step's only host synchronisation (:func:`knet.syncs.to_host`). ``rounds`` is a
        list of ``(mask_logits, cls_logits)``; the result has one list of matches per round.
        """
        costs = [self.cost_matrix(m, c, gt_masks, gt_labels) for m, c in rounds]
        host = to_host(torch.stack(costs)) if costs else torch.zeros(0)  # (R, B, N, G)
        return [self._assign(cost, gt_labels) for cost in host]

    @staticmethod
    def _assign(cost: Tensor, gt_labels: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """``scipy``'s assignment of one round's (B, N, G) CPU costs, per image."""
        matches = []
        for b, labels in enumerate(gt_labels):
            num_gt = len(labels)
            if num_gt == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                matches.append((empty, empty.clone()))
                continue
            rows, cols = linear_sum_assignment(cost[b, :, :num_gt].numpy())
            matches.append((torch.from_numpy(rows).long(), torch.from_numpy(cols).long()))
        return matches

    def cost_matrix(
        self,
        mask_logits: Tensor,
        cls_logits: Tensor | None,
        gt_masks: list[Tensor],
        gt_labels: list[Tensor],
    ) -> Tensor:
        """(B, N, G_max) total cost; columns beyond an image's own G_b are padding."""
        batch, num_kernels = mask_logits.shape[:2]
        num_gt = max((len(t) for t in gt_labels), default=0)
        device = mask_logits.device
        if num_gt == 0:
            return torch.zeros(batch, num_kernels, 0, device=device)
        probs = mask_logits.flatten(2).float().sigmoid()  # (B, N, P)
        targets = probs.new_zeros(batch, num_gt, probs.shape[-1])  # (B, G, P)
        labels = torch.zeros(batch, num_gt, dtype=torch.int64, device=device)
        for b, (masks, lab) in enumerate(zip(gt_masks, gt_labels, strict=True)):
            targets[b, : len(lab)] = masks.flatten(1).to(device, torch.float32)  # (G_b, P)
            labels[b, : len(lab)] = lab.to(device)
        overlap = torch.einsum("bnp,bgp->bng", probs, targets)  # sum p*t, (B, N, G)
        cost = probs.new_zeros(batch, num_kernels, num_gt)
        if self.dice_cost:
            denominator = (
                probs.pow(2).sum(-1)[:, :, None]
                + self.eps
                + targets.pow(2).sum(-1)[:, None, :]
                + self.eps
            )  # (B, N, G)
            cost = cost - self.dice_cost * 2 * overlap / denominator
        if self.mask_cost:
            # Linear "soft pixel accuracy": sum p*t + sum (1-p)(1-t), expanded to reuse overlap.
            num_pixels = probs.shape[-1]
            agreement = (
                2 * overlap + num_pixels - probs.sum(-1)[:, :, None] - targets.sum(-1)[:, None, :]
            )  # (B, N, G)
            cost = cost - self.mask_cost * agreement / num_pixels
        if cls_logits is not None and self.cls_cost:
            cost = cost + self.cls_cost * self._focal_cost(cls_logits, labels)
        return cost

    def _focal_cost(self, cls_logits: Tensor, labels: Tensor) -> Tensor:
        """Focal cost at each ground truth's label: (B, N, K), (B, G) -> (B, N, G)."""
        probs = cls_logits.float().sigmoid()  # (B, N, K)
        eps = 1e-12
        alpha, gamma = self.focal_alpha, self.focal_gamma
        negative = -(1 - probs + eps).log() * (1 - alpha) * probs.pow(gamma)
        positive = -(probs + eps).log() * alpha * (1 - probs).pow(gamma)
        index = labels[:, None, :].expand(-1, probs.shape[1], -1)  # (B, N, G)
        return positive.gather(2, index) - negative.gather(2, index)
