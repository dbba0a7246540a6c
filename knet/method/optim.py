"""AdamW with a backbone lr multiplier, linear warm-up and a step schedule (spec §4.4)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from knet.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the backbone group gets ``lr * backbone_lr_mult``.

    ``model`` must offer ``parameter_groups()`` (as :class:`knet.model.KNet` does).
    """
    groups = model.parameter_groups()
    param_groups = [
        {"params": groups["backbone"], "lr": cfg.lr * cfg.backbone_lr_mult, "name": "backbone"},
        {"params": groups["head"], "lr": cfg.lr, "name": "head"},
    ]
    param_groups = [g for g in param_groups if g["params"]]
    # The fused kernel (CUDA and CPU) is one launch for all parameters, and it can skip a step
    # on the device (``found_inf``, see :func:`step_unless_nonfinite`) without a host sync.
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def lr_factor(cfg: OptimConfig, iters_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at a global iteration (mmcv's linear warm-up)."""

    def factor(iteration: int) -> float:
        epoch = iteration // max(iters_per_epoch, 1)
        step = cfg.lr_gamma ** sum(epoch >= s for s in cfg.lr_steps)
        if iteration < cfg.warmup_iters:
            step *= 1 - (1 - iteration / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
        return step

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, iters_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule: call ``scheduler.step()`` after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, iters_per_epoch))


def clip_gradients(model: nn.Module, cfg: OptimConfig) -> torch.Tensor:
    """L2-norm clip of all gradients to ``cfg.clip_grad_norm`` (0: no clipping); returns the
    total norm before clipping, a 0-dim tensor on the gradients' device (no host sync)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if cfg.clip_grad_norm <= 0:
        return torch.nn.utils.get_total_norm([p.grad for p in params])
    return torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``skip`` (a 0-dim float tensor) is non-zero.

    A fused optimizer decides on the device, through the ``found_inf`` protocol that
    ``torch.amp.GradScaler`` uses (the parameters, moments and step count stay untouched), so
    the host never waits; any other optimizer reads ``skip`` on the host (one sync).
    """
    if not optimizer.defaults.get("fused"):
        if not bool(skip):
            optimizer.step()
        return
    optimizer.grad_scale, optimizer.found_inf = None, skip
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
