"""K-Net losses with deep supervision on every round (spec §4.1-§4.3, §5.2).

Letters: B images, N kernels (thing kernels, then stuff kernels for panoptic), K classes,
M positive kernels in the batch, h, w the stride-4 size, P = h * w, H, W the label size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from knet.config import LossConfig
from knet.method.matcher import HungarianMatcher
from knet.model import KNetOutput
from knet.structures import IGNORE_LABEL, Targets
from knet.syncs import to_device


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """Element-wise sigmoid focal loss (same shape as ``logits``), no reduction."""
    probs = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probs * targets + (1 - probs) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t).pow(gamma) * ce


def dice_loss(mask_logits: Tensor, targets: Tensor, eps: float = 1e-3) -> Tensor:
    """Mean over masks of ``1 - 2 sum(pt) / (sum p^2 + eps + sum t^2 + eps)``; (M, P) inputs."""
    probs = mask_logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.pow(2).sum(-1) + eps + targets.pow(2).sum(-1) + eps
    return (1 - numerator / denominator).mean()


def rank_loss(mask_logits: Tensor, rank_targets: Tensor) -> Tensor:
    """Per-pixel softmax cross-entropy across kernels.

    Args:
        mask_logits: (B, N, h, w). rank_targets: (B, h, w) kernel index, or -1 where no
            positive kernel covers the pixel (255 would be a valid kernel index).

    Ignored pixels add zero but still count in the mean (the official mmdet averaging).
    """
    loss = F.cross_entropy(mask_logits.float(), rank_targets, ignore_index=-1, reduction="sum")
    return loss / rank_targets.numel()


def upsample2x(mask_logits: Tensor) -> Tensor:
    """Stride 8 -> stride 4, bilinear (spec §3.1 step 8). (B, N, h, w) -> (B, N, 2h, 2w)."""
    return F.interpolate(mask_logits, scale_factor=2.0, mode="bilinear", align_corners=False)


def global_mean(value: Tensor) -> Tensor:
    """Average a scalar over data-parallel workers (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


class KNetCriterion:
    """Matches kernels to ground truth and sums the weighted losses of every round.

    Call it with a :class:`KNetOutput` and one :class:`Targets` per image; it returns a dict of
    named, already-weighted loss terms (``s0.dice``, ``s1.cls``, ...). Their sum is the loss.
    """

    def __init__(
        self, cfg: LossConfig, task: str, num_thing_classes: int, num_stuff_classes: int
    ) -> None:
        self.cfg = cfg
        self.task = task
        self.num_thing_classes = num_thing_classes
        self.num_stuff_classes = num_stuff_classes if task == "panoptic" else 0
        self.matcher = HungarianMatcher(
            cls_cost=cfg.match_cls_cost,
            dice_cost=cfg.match_dice_cost,
            mask_cost=cfg.match_mask_cost,
            focal_alpha=cfg.focal_alpha,
            focal_gamma=cfg.focal_gamma,
        )

    def __call__(self, outputs: KNetOutput, targets: list[Targets]) -> dict[str, Tensor]:
        device = outputs.stages[0].mask_logits.device
        # Labels on the host (the loader's CPU copy) plan every index without a device read.
        host_labels = [t.host_labels().numpy() for t in targets]
        targets = [t.to(device) for t in targets]  # no-op when the loader already moved them
        self._check_targets(outputs, targets, host_labels)
        if self.task == "semantic":
            return self.semantic_losses(outputs, targets)
        return self.kernel_losses(outputs, targets, host_labels)

    def _check_targets(
        self, outputs: KNetOutput, targets: list[Targets], host_labels: list[np.ndarray]
    ) -> None:
        """Fail with the image index instead of an opaque indexing error deep in a loss."""
        batch = outputs.stages[0].mask_logits.shape[0]
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
        if self.task == "semantic":
            return
        num_classes = self.num_thing_classes + self.num_stuff_classes
        size = tuple(2 * v for v in outputs.stages[0].mask_logits.shape[-2:])
        for b, (t, labels) in enumerate(zip(targets, host_labels, strict=True)):
            bad = labels[(labels < 0) | (labels >= num_classes)]
            if len(bad):
                raise ValueError(
                    f"image {b} of the batch has label {int(bad[0])} outside the "
                    f"{num_classes} {self.task} training ids [0, {num_classes})"
                )
            if len(t.labels) != len(t.masks) or tuple(t.masks.shape[-2:]) != size:
                raise ValueError(
                    f"image {b} of the batch has masks {tuple(t.masks.shape)} for "
                    f"{len(t.labels)} labels; expected (G, {size[0]}, {size[1]}) at stride 4"
                )

    # ---------------------------------------------------------------- instance / panoptic

    def kernel_losses(
        self, outputs: KNetOutput, targets: list[Targets], host_labels: list[np.ndarray]
    ) -> dict[str, Tensor]:
        """Stage-0 losses, then per update round focal + BCE + dice (+ rank for panoptic).

        Round ``s`` is matched with round ``s - 1``'s predictions (stage 0 with its own), all
        known after the forward pass, so every round is matched at once: one host transfer.
        """
        device = outputs.stages[0].mask_logits.device
        num_thing_kernels = outputs.stages[0].mask_logits.shape[1]
        layout = self.layout(host_labels, num_thing_kernels, device)
        pairs = list(zip(targets, layout.things, strict=True))
        thing_masks = [t.masks.index_select(0, i) for t, i in pairs]
        thing_labels = [t.labels.index_select(0, i) for t, i in pairs]
        stuff = self._stuff_targets(targets, layout)
        # torch.full, not torch.tensor: a Python number copied to the GPU would sync.
        num_pos = torch.full((), float(layout.num_pos), device=device)
        avg_factor = global_mean(num_pos).clamp(min=1.0)

        masks = [upsample2x(stage.mask_logits) for stage in outputs.stages]  # (B, N[+S], h, w)
        rounds = [(masks[0].detach(), None)]
        for s in range(1, len(outputs.stages)):
            prev_cls = outputs.stages[s - 1].cls_logits
            if prev_cls is not None:
                prev_cls = prev_cls[:, :num_thing_kernels, : self.num_thing_classes].detach()
            rounds.append((masks[s - 1][:, :num_thing_kernels].detach(), prev_cls))
        matches = _matches_to(device, self.matcher.match_rounds(rounds, thing_masks, thing_labels))

        losses: dict[str, Tensor] = {}
        self._stage0_losses(
            losses, masks[0], outputs.semantic_logits, matches[0], targets, layout, thing_masks
        )
        for s, stage in enumerate(outputs.stages[1:], start=1):
            self._stage_losses(
                losses,
                f"s{s}",
                masks[s],
                stage.cls_logits,
                matches[s],
                thing_masks,
                thing_labels,
                stuff,
                avg_factor,
            )
        return losses

    def layout(
        self, host_labels: list[np.ndarray], num_thing_kernels: int, device: torch.device
    ) -> _Layout:
        """Plan the batch's thing / stuff indexing on the host; one asynchronous copy moves it."""
        t = self.num_thing_classes
        parts: list[np.ndarray] = []
        num_pos = 0
        present_batch, present_slot = [], []
        for b, labels in enumerate(host_labels):
            things = np.flatnonzero(labels < t)
            stuff = np.flatnonzero(labels >= t) if self.num_stuff_classes else things[:0]
            slots = labels[stuff] - t
            present = np.unique(slots)
            parts += [things, stuff, slots]
            present_batch.append(np.full(len(present), b))
            present_slot.append(present)
            num_pos += min(num_thing_kernels, len(things)) + len(present)
        parts += [np.concatenate(present_batch), np.concatenate(present_slot)]
        pieces = to_device(parts, device)
        return _Layout(
            things=list(pieces[0:-2:3]),
            stuff=list(pieces[1:-2:3]),
            slots=list(pieces[2:-2:3]),
            present_batch=pieces[-2],
            present_slot=pieces[-1],
            num_pos=num_pos,
        )

    def _stuff_targets(
        self, targets: list[Targets], layout: _Layout
    ) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """Stuff kernel j <-> stuff class T + j (fixed).

        Returns maps (B, S, h, w), present (B, S), and the image and slot (M_s,) of every
        present stuff slot (row-major, as ``present.nonzero()`` would give without a sync).
        """
        if not self.num_stuff_classes:
            return None
        first = targets[0].masks
        size = first.shape[-2:]
        maps = first.new_zeros((len(targets), self.num_stuff_classes, *size), dtype=torch.float32)
        for b, t in enumerate(targets):
            # amax merges two segments of one stuff class (custom data) into one map.
            stuff_masks = t.masks.index_select(0, layout.stuff[b]).flatten(1).float()  # (S_b, P)
            index = layout.slots[b][:, None].expand_as(stuff_masks)
            maps[b].view(self.num_stuff_classes, -1).scatter_reduce_(0, index, stuff_masks, "amax")
        present = torch.zeros(
            len(targets), self.num_stuff_classes, dtype=torch.bool, device=first.device
        )
        present[layout.present_batch, layout.present_slot] = True
        return maps, present, layout.present_batch, layout.present_slot

    def _stage0_losses(
        self,
        losses: dict[str, Tensor],
        masks: Tensor,
        semantic_logits: Tensor | None,
        matches: list[tuple[Tensor, Tensor]],
        targets: list[Targets],
        layout: _Layout,
        thing_masks: list[Tensor],
    ) -> None:
        cfg = self.cfg
        batch_idx, kernel_idx, pos_targets = _gather_matched(matches, thing_masks)
        pred = masks[batch_idx, kernel_idx].flatten(1)  # (M, P)
        losses["s0.mask"] = cfg.mask_weight * _bce_or_zero(pred, pos_targets, masks)
        losses["s0.dice"] = cfg.dice_weight * _dice_or_zero(pred, pos_targets, masks)
        if semantic_logits is not None and cfg.seg_weight:
            labels = self._dense_labels(semantic_logits, targets, layout, matches)
            losses["s0.seg"] = cfg.seg_weight * self._dense_focal(semantic_logits, labels)
        if self.task == "panoptic" and cfg.rank_weight:
            rank = _rank_targets(masks.shape, batch_idx, kernel_idx, pos_targets)
            losses["s0.rank"] = cfg.rank_weight * rank_loss(masks, rank)

    def _stage_losses(  # 9 parameters: one round's outputs and targets, as official
        self,
        losses: dict[str, Tensor],
        name: str,
        masks: Tensor,
        cls_logits: Tensor,
        matches: list[tuple[Tensor, Tensor]],
        thing_masks: list[Tensor],
        thing_labels: list[Tensor],
        stuff: tuple[Tensor, Tensor, Tensor, Tensor] | None,
        avg_factor: Tensor,
    ) -> None:
        cfg = self.cfg
        batch, num_kernels = cls_logits.shape[:2]
        num_things = num_kernels - self.num_stuff_classes
        t = self.num_thing_classes
        # Class targets and weights: thing kernels see only thing columns, stuff kernel j only
        # its own column T + j.
        cls_targets = torch.zeros_like(cls_logits, dtype=torch.float32)  # (B, N + S, K)
        cls_weights = torch.zeros_like(cls_targets)
        cls_weights[:, :num_things, :t] = 1.0
        batch_idx, kernel_idx, target_list = [], [], []
        for b, (rows, cols) in enumerate(matches):
            cls_targets[b, rows, thing_labels[b][cols]] = 1.0
            batch_idx.append(torch.full_like(rows, b))
            kernel_idx.append(rows)
            target_list.append(thing_masks[b][cols].flatten(1).float())
        if stuff is not None:
            maps, present, b_idx, s_idx = stuff
            stuff_range = torch.arange(self.num_stuff_classes, device=masks.device)
            cls_weights[:, num_things + stuff_range, t + stuff_range] = 1.0
            cls_targets[:, num_things + stuff_range, t + stuff_range] = present.float()
            batch_idx.append(b_idx)
            kernel_idx.append(num_things + s_idx)
            target_list.append(maps[b_idx, s_idx].flatten(1))
        batch_idx = torch.cat(batch_idx)
        kernel_idx = torch.cat(kernel_idx)
        pos_targets = torch.cat(target_list)  # (M, P)
        focal = sigmoid_focal_loss(
            cls_logits.float(), cls_targets, cfg.focal_alpha, cfg.focal_gamma
        )
        losses[f"{name}.cls"] = cfg.cls_weight * (focal * cls_weights).sum() / avg_factor
        pred = masks[batch_idx, kernel_idx].flatten(1)  # (M, P)
        losses[f"{name}.mask"] = cfg.mask_weight * _bce_or_zero(pred, pos_targets, masks)
        losses[f"{name}.dice"] = cfg.dice_weight * _dice_or_zero(pred, pos_targets, masks)
        if self.task == "panoptic" and cfg.rank_weight:
            rank = _rank_targets(masks.shape, batch_idx, kernel_idx, pos_targets)
            losses[f"{name}.rank"] = cfg.rank_weight * rank_loss(masks, rank)

    def _dense_labels(
        self,
        semantic_logits: Tensor,
        targets: list[Targets],
        layout: _Layout,
        matches: list[tuple[Tensor, Tensor]],
    ) -> Tensor:
        """Per-pixel stage-0 labels (B, h, w): stuff first, then the matched things over it.

        As the official ``_get_target_single``: any pixel a (soft) mask touches (> 0) is
        painted, later segments over earlier ones; unmatched things stay background (K).
        """
        num_classes = semantic_logits.shape[1]
        labels = []
        for b, (t, (_, cols)) in enumerate(zip(targets, matches, strict=True)):
            order = torch.cat([layout.stuff[b], layout.things[b][cols]])  # paint order, (G',)
            if not len(order):
                labels.append(
                    torch.full(
                        t.masks.shape[-2:], num_classes, device=t.masks.device, dtype=torch.int64
                    )
                )
                continue
            masks = t.masks.index_select(0, order)  # (G', h, w)
            classes = t.labels.index_select(0, order)  # (G',)
            rank = torch.arange(len(order), device=masks.device)[:, None, None]
            last = torch.where(masks > 0, rank, -1).amax(0)  # (h, w)
            painted = classes[last.clamp(min=0)]
            labels.append(torch.where(last >= 0, painted, num_classes))
        return torch.stack(labels)  # (B, h, w)

    def _dense_focal(self, semantic_logits: Tensor, labels: Tensor) -> Tensor:
        """Stage-0 sigmoid focal of the dense classifier, normalised by foreground pixels.

        Args: semantic_logits (B, K, h/2, w/2); labels (B, h, w) with K = background.
        """
        logits = upsample2x(semantic_logits).float()  # (B, K, h, w)
        num_classes = logits.shape[1]
        classes = torch.arange(num_classes, device=labels.device)[None, :, None, None]
        one_hot = (labels[:, None] == classes).float()  # (B, K, h, w); background K: all zero
        num_foreground = (labels < num_classes).sum().clamp(min=1)
        focal = sigmoid_focal_loss(logits, one_hot, self.cfg.focal_alpha, self.cfg.focal_gamma)
        return focal.sum() / num_foreground

    # ---------------------------------------------------------------- semantic

    def semantic_losses(self, outputs: KNetOutput, targets: list[Targets]) -> dict[str, Tensor]:
        """Cross-entropy (ignore 255) of every round's class logits at the label size."""
        if any(t.semantic is None for t in targets):
            raise ValueError("semantic losses need Targets.semantic for every image")
        labels = torch.stack([t.semantic for t in targets])  # (B, H, W)
        losses = {}
        for s, stage in enumerate(outputs.stages):
            logits = F.interpolate(
                stage.mask_logits.float(),
                size=labels.shape[-2:],
                mode="bilinear",
                align_corners=False,
            )  # (B, K, H, W)
            ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL, reduction="sum")
            # mmseg 0.x averaging: ignored pixels count in the mean.
            losses[f"s{s}.ce"] = self.cfg.semantic_weight * ce / labels.numel()
        return losses


def _gather_matched(
    matches: list[tuple[Tensor, Tensor]], thing_masks: list[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch index (M,), kernel index (M,) and target masks (M, P) of matched thing kernels."""
    batch_idx, kernel_idx, masks = [], [], []
    for b, (rows, cols) in enumerate(matches):
        batch_idx.append(torch.full_like(rows, b))
        kernel_idx.append(rows)
        masks.append(thing_masks[b][cols].flatten(1).float())
    return torch.cat(batch_idx), torch.cat(kernel_idx), torch.cat(masks)


def _matches_to(
    device: torch.device, rounds: list[list[tuple[Tensor, Tensor]]]
) -> list[list[tuple[Tensor, Tensor]]]:
    """Every round's CPU matches to ``device`` in one asynchronous copy (same structure)."""
    flat = [index.numpy() for matches in rounds for pair in matches for index in pair]
    if not flat:
        return rounds
    pieces = iter(to_device(flat, device))
    return [[(next(pieces), next(pieces)) for _ in matches] for matches in rounds]


@dataclass
class _Layout:
    """Where a batch's things and stuff are among each image's segments, on the device."""

    things: list[Tensor]  # per image (G_b,) positions of its thing segments
    stuff: list[Tensor]  # per image (S_b,) positions of its stuff segments
    slots: list[Tensor]  # per image (S_b,) the stuff kernel of each stuff segment
    present_batch: Tensor  # (M_s,) image of every present stuff slot
    present_slot: Tensor  # (M_s,) and the slot
    num_pos: int  # matched thing kernels + present stuff kernels in the batch


def _rank_targets(
    shape: torch.Size, batch_idx: Tensor, kernel_idx: Tensor, pos_targets: Tensor
) -> Tensor:
    """Per pixel the highest-index positive kernel whose target covers it (> 0), else -1.

    Args: shape (B, N, h, w); batch_idx, kernel_idx (M,); pos_targets (M, P).
    Returns: (B, h, w) int64.
    """
    batch, _, height, width = shape
    rank = torch.full((batch, height * width), -1, dtype=torch.int64, device=pos_targets.device)
    if len(kernel_idx):
        covered = torch.where(pos_targets > 0, kernel_idx[:, None], -1)  # (M, P)
        index = batch_idx[:, None].expand_as(covered)  # (M, P)
        rank.scatter_reduce_(0, index, covered, reduce="amax", include_self=True)
    return rank.view(batch, height, width)


def _bce_or_zero(pred: Tensor, targets: Tensor, like: Tensor) -> Tensor:
    if pred.numel() == 0:
        return like.sum() * 0.0  # keeps the graph connected when a batch has no positives
    return F.binary_cross_entropy_with_logits(pred.float(), targets)


def _dice_or_zero(pred: Tensor, targets: Tensor, like: Tensor) -> Tensor:
    if pred.numel() == 0:
        return like.sum() * 0.0
    return dice_loss(pred.float(), targets)
