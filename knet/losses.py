"""K-Net losses with deep supervision on every round (spec §4.1-§4.3, §5.2).

Letters: B images, N kernels (thing kernels, then stuff kernels for panoptic), K classes,
M positive kernels in the batch, h, w the stride-4 size, P = h * w, H, W the label size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from knet.config import LossConfig
from knet.matcher import HungarianMatcher
from knet.model import KNetOutput
from knet.structures import IGNORE_LABEL, Targets


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
        targets = [t.to(device) for t in targets]  # no-op when the loader already moved them
        self._check_targets(outputs, targets)
        if self.task == "semantic":
            return self.semantic_losses(outputs, targets)
        return self.kernel_losses(outputs, targets)

    def _check_targets(self, outputs: KNetOutput, targets: list[Targets]) -> None:
        """Fail with the image index instead of an opaque indexing error deep in a loss."""
        batch = outputs.stages[0].mask_logits.shape[0]
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
        if self.task == "semantic":
            return
        num_classes = self.num_thing_classes + self.num_stuff_classes
        size = tuple(2 * v for v in outputs.stages[0].mask_logits.shape[-2:])
        labels = torch.cat([t.labels for t in targets])
        if len(labels) and not bool(((labels >= 0) & (labels < num_classes)).all()):  # one sync
            for b, t in enumerate(targets):
                bad = t.labels[(t.labels < 0) | (t.labels >= num_classes)]
                if len(bad):
                    raise ValueError(
                        f"image {b} of the batch has label {int(bad[0])} outside the "
                        f"{num_classes} {self.task} training ids [0, {num_classes})"
                    )
        for b, t in enumerate(targets):
            if len(t.labels) != len(t.masks) or tuple(t.masks.shape[-2:]) != size:
                raise ValueError(
                    f"image {b} of the batch has masks {tuple(t.masks.shape)} for "
                    f"{len(t.labels)} labels; expected (G, {size[0]}, {size[1]}) at stride 4"
                )

    # ---------------------------------------------------------------- instance / panoptic

    def kernel_losses(self, outputs: KNetOutput, targets: list[Targets]) -> dict[str, Tensor]:
        """Stage-0 losses, then per update round focal + BCE + dice (+ rank for panoptic)."""
        things = [t.labels < self.num_thing_classes for t in targets]
        thing_masks = [t.masks[keep] for t, keep in zip(targets, things, strict=True)]
        thing_labels = [t.labels[keep] for t, keep in zip(targets, things, strict=True)]
        stuff = self._stuff_targets(targets, things)
        num_thing_kernels = outputs.stages[0].mask_logits.shape[1]
        num_pos = sum(min(num_thing_kernels, len(lab)) for lab in thing_labels)
        num_pos += int(stuff[1].sum()) if stuff is not None else 0
        device = outputs.stages[0].mask_logits.device
        avg_factor = global_mean(torch.tensor(float(num_pos), device=device)).clamp(min=1.0)

        losses: dict[str, Tensor] = {}
        masks0 = upsample2x(outputs.stages[0].mask_logits)  # (B, N, h, w)
        matches = self.matcher(masks0.detach(), None, thing_masks, thing_labels)
        self._stage0_losses(losses, masks0, outputs.semantic_logits, matches, targets, things)
        prev_masks, prev_cls = masks0.detach(), None
        for s, stage in enumerate(outputs.stages[1:], start=1):
            masks = upsample2x(stage.mask_logits)  # (B, N + S, h, w)
            prev_thing_cls = None
            if prev_cls is not None:
                prev_thing_cls = prev_cls[:, :num_thing_kernels, : self.num_thing_classes]
            matches = self.matcher(
                prev_masks[:, :num_thing_kernels], prev_thing_cls, thing_masks, thing_labels
            )
            self._stage_losses(
                losses,
                f"s{s}",
                masks,
                stage.cls_logits,
                matches,
                thing_masks,
                thing_labels,
                stuff,
                avg_factor,
            )
            prev_masks, prev_cls = masks.detach(), stage.cls_logits.detach()
        return losses

    def _stuff_targets(
        self, targets: list[Targets], things: list[Tensor]
    ) -> tuple[Tensor, Tensor] | None:
        """Stuff kernel j <-> stuff class T + j (fixed): maps (B, S, h, w), present (B, S)."""
        if not self.num_stuff_classes:
            return None
        first = targets[0].masks
        size = first.shape[-2:]
        maps = first.new_zeros((len(targets), self.num_stuff_classes, *size), dtype=torch.float32)
        present = torch.zeros(
            len(targets), self.num_stuff_classes, dtype=torch.bool, device=first.device
        )
        for b, (t, keep) in enumerate(zip(targets, things, strict=True)):
            slots = t.labels[~keep] - self.num_thing_classes  # (S_b,)
            # amax merges two segments of one stuff class (custom data) into one map.
            stuff_masks = t.masks[~keep].flatten(1).float()  # (S_b, P)
            index = slots[:, None].expand_as(stuff_masks)
            maps[b].view(self.num_stuff_classes, -1).scatter_reduce_(0, index, stuff_masks, "amax")
            present[b, slots] = True
        return maps, present

    def _stage0_losses(
        self,
        losses: dict[str, Tensor],
        masks: Tensor,
        semantic_logits: Tensor | None,
        matches: list[tuple[Tensor, Tensor]],
        targets: list[Targets],
        things: list[Tensor],
    ) -> None:
        cfg = self.cfg
        batch_idx, kernel_idx, pos_targets = _gather_matched(matches, targets, things, masks)
        pred = masks[batch_idx, kernel_idx].flatten(1)  # (M, P)
        losses["s0.mask"] = cfg.mask_weight * _bce_or_zero(pred, pos_targets, masks)
        losses["s0.dice"] = cfg.dice_weight * _dice_or_zero(pred, pos_targets, masks)
        if semantic_logits is not None and cfg.seg_weight:
            labels = self._dense_labels(semantic_logits, targets, things, matches)
            losses["s0.seg"] = cfg.seg_weight * self._dense_focal(semantic_logits, labels)
        if self.task == "panoptic" and cfg.rank_weight:
            rank = _rank_targets(masks.shape, batch_idx, kernel_idx, pos_targets)
            losses["s0.rank"] = cfg.rank_weight * rank_loss(masks, rank)

    def _stage_losses(
        self,
        losses: dict[str, Tensor],
        name: str,
        masks: Tensor,
        cls_logits: Tensor,
        matches: list[tuple[Tensor, Tensor]],
        thing_masks: list[Tensor],
        thing_labels: list[Tensor],
        stuff: tuple[Tensor, Tensor] | None,
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
            rows = rows.to(masks.device)
            cols = cols.to(masks.device)
            cls_targets[b, rows, thing_labels[b][cols]] = 1.0
            batch_idx.append(torch.full_like(rows, b))
            kernel_idx.append(rows)
            target_list.append(thing_masks[b][cols].flatten(1).float())
        if stuff is not None:
            maps, present = stuff
            stuff_range = torch.arange(self.num_stuff_classes, device=masks.device)
            cls_weights[:, num_things + stuff_range, t + stuff_range] = 1.0
            cls_targets[:, num_things + stuff_range, t + stuff_range] = present.float()
            b_idx, s_idx = present.nonzero(as_tuple=True)
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
        things: list[Tensor],
        matches: list[tuple[Tensor, Tensor]],
    ) -> Tensor:
        """Per-pixel stage-0 labels (B, h, w): stuff first, then the matched things over it.

        As the official ``_get_target_single``: any pixel a (soft) mask touches (> 0) is
        painted, later segments over earlier ones; unmatched things stay background (K).
        """
        num_classes = semantic_logits.shape[1]
        labels = []
        for t, keep, (_, cols) in zip(targets, things, matches, strict=True):
            cols = cols.to(t.labels.device)
            masks = torch.cat([t.masks[~keep], t.masks[keep][cols]])  # (G', h, w) paint order
            classes = torch.cat([t.labels[~keep], t.labels[keep][cols]])  # (G',)
            order = torch.arange(len(classes), device=masks.device)[:, None, None]
            last = torch.where(masks > 0, order, -1).amax(0) if len(classes) else None  # (h, w)
            if last is None:
                labels.append(
                    torch.full(
                        t.masks.shape[-2:], num_classes, device=t.masks.device, dtype=torch.int64
                    )
                )
                continue
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
    matches: list[tuple[Tensor, Tensor]],
    targets: list[Targets],
    things: list[Tensor],
    like: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch index (M,), kernel index (M,) and target masks (M, P) of matched thing kernels."""
    batch_idx, kernel_idx, masks = [], [], []
    for b, (rows, cols) in enumerate(matches):
        rows = rows.to(like.device)
        batch_idx.append(torch.full_like(rows, b))
        kernel_idx.append(rows)
        masks.append(targets[b].masks[things[b]][cols.to(like.device)].flatten(1).float())
    return torch.cat(batch_idx), torch.cat(kernel_idx), torch.cat(masks)


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
