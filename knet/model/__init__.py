"""K-Net model construction: :func:`build_model` is the one place that maps config to modules."""

from __future__ import annotations

import dataclasses

from knet.config import ConfigError, ModelConfig
from knet.model.backbone import build_backbone
from knet.model.heads import InitialKernelHead, KernelUpdateHead, SemanticKernelHead
from knet.model.knet import KNet, KNetOutput, StageOutput
from knet.model.neck import FPN, SemanticFPNFuser

__all__ = [
    "ABLATION_SWITCHES",
    "KNet",
    "KNetOutput",
    "StageOutput",
    "build_model",
    "num_classes_for_task",
    "variant_parameter_counts",
]

# The component switches of the paper's Table 4 (model config key -> its values, official first).
ABLATION_SWITCHES: dict[str, tuple[object, ...]] = {
    "kernel_updater": ("adaptive", "sum", "none"),
    "kernel_interaction": (True, False),
    "positional_encoding": ("sine", "coordconv", "none"),
}


def num_classes_for_task(task: str, num_thing_classes: int, num_stuff_classes: int) -> int:
    """Classes the model predicts: things for instance, things + stuff otherwise."""
    return num_thing_classes if task == "instance" else num_thing_classes + num_stuff_classes


def build_model(cfg: ModelConfig, num_thing_classes: int, num_stuff_classes: int) -> KNet:
    # 61 lines: the official config's wiring of every module, in one place
    """Build K-Net for ``cfg.task`` with the class split of the dataset's categories.

    Args:
        cfg: the ``model`` section of the config.
        num_thing_classes: categories with ``isthing=1`` (training ids 0..T-1).
        num_stuff_classes: the other categories (training ids T..T+S-1). Instance models
            ignore them; semantic models treat every category as one class and one kernel.
    """
    _check_classes(cfg, num_thing_classes, num_stuff_classes)
    num_classes = num_classes_for_task(cfg.task, num_thing_classes, num_stuff_classes)
    c = cfg.channels
    bb = cfg.backbone
    backbone = build_backbone(
        bb.depth,
        weights=bb.weights,
        base_channels=bb.base_channels,
        frozen_stages=bb.frozen_stages,
        norm_eval=bb.norm_eval,
    )
    fpn = FPN(backbone.out_channels, c)
    fuser = SemanticFPNFuser(
        c, num_groups=cfg.num_groups, positional_encoding=cfg.positional_encoding
    )
    semantic = cfg.task == "semantic"
    if semantic:
        kernel_head = SemanticKernelHead(c, num_classes, cfg.num_groups, cfg.semantic_dropout)
    else:
        kernel_head = InitialKernelHead(
            c,
            cfg.num_kernels,
            num_classes,
            cfg.num_groups,
            cfg.kernel_init_std,
            cfg.hard_mask_threshold,
            cfg.normalize_group_features,
        )
    update_heads = [
        KernelUpdateHead(
            c,
            num_classes=0 if semantic else num_classes,
            num_heads=cfg.num_heads,
            ffn_channels=cfg.ffn_channels,
            soft_assembling=semantic,
            hard_mask_threshold=cfg.hard_mask_threshold,
            normalize_group_features=cfg.normalize_group_features,
            updater=cfg.kernel_updater,
            interaction=cfg.kernel_interaction,
        )
        for _ in range(cfg.num_stages)
    ]
    return KNet(
        backbone,
        fpn,
        fuser,
        kernel_head,
        update_heads,
        num_thing_classes=num_thing_classes,
        num_stuff_classes=0 if cfg.task == "instance" else num_stuff_classes,
        panoptic=cfg.task == "panoptic",
    )


def variant_parameter_counts(
    cfg: ModelConfig, num_thing_classes: int, num_stuff_classes: int
) -> list[tuple[str, int]]:
    """Total parameters of ``cfg`` and of every variant that changes one Table-4 switch of it.

    Returns:
        ``("this config", total)`` first, then ``("model.<key>=<value>", total)`` per variant.
    """

    def total(model_cfg: ModelConfig) -> int:
        model = build_model(model_cfg, num_thing_classes, num_stuff_classes)
        return sum(p.numel() for p in model.parameters())

    rows = [("this config", total(cfg))]
    for key, values in ABLATION_SWITCHES.items():
        for value in values:
            if value != getattr(cfg, key):
                name = f"model.{key}={str(value).lower() if isinstance(value, bool) else value}"
                rows.append((name, total(dataclasses.replace(cfg, **{key: value}))))
    return rows


def _check_classes(cfg: ModelConfig, num_thing_classes: int, num_stuff_classes: int) -> None:
    if num_thing_classes < 0 or num_stuff_classes < 0:
        raise ValueError("class counts must be non-negative")
    if cfg.task in ("instance", "panoptic") and num_thing_classes == 0:
        raise ValueError(f"a {cfg.task} model needs at least one thing category (isthing=1)")
    if num_thing_classes + num_stuff_classes == 0:
        raise ValueError("the dataset has no categories")
    if cfg.channels % cfg.num_groups:
        raise ConfigError(
            f"model.num_groups ({cfg.num_groups}) must divide model.channels ({cfg.channels})"
        )
    if cfg.channels % cfg.num_heads:
        raise ConfigError(
            f"model.num_heads ({cfg.num_heads}) must divide model.channels ({cfg.channels})"
        )
