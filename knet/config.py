"""One typed configuration tree: ``params.yaml`` -> :func:`load_config` -> frozen dataclasses.

Every section of ``params.yaml`` mirrors one dataclass below. Loading is strict: an unknown key,
a missing section value of the wrong type, or a value outside its range raises
:class:`ConfigError` naming the dotted key (``model.num_stagse is not a known key; did you mean
model.num_stages?``). Overrides use the same dotted keys (``--set model.num_stages=4``); their
values are parsed as YAML, so ``--set data.min_size=[96,128]`` gives a list.

Class counts are deliberately absent: the thing/stuff split and the class names come from the
dataset's categories and are passed to :func:`knet.model.build_model` next to ``cfg.model``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Task = Literal["panoptic", "instance", "semantic"]
DataFormat = Literal["coco_panoptic", "coco_instance", "semantic_png"]


class ConfigError(ValueError):
    """A params file or override that does not fit the config tree; the message names the key."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthConfig:
    """The synthetic panoptic dataset written by ``knet data synth`` (the embedded default)."""

    # Where ``knet data synth`` writes it (point data.raw here to train on it).
    out: str = "data/raw/synth"

    # Square image side in pixels.
    image_size: int = 128
    train_images: int = 300
    val_images: int = 50
    # Thing instances per image, drawn uniformly in [min_instances, max_instances].
    min_instances: int = 2
    max_instances: int = 6
    # Standard deviation of the pixel noise added to every image (0-1 intensity scale).
    noise: float = 0.08
    seed: int = 0
    # Fill colour of a thing: "class" = its category's typical colour with per-instance jitter
    # (appearance is a cue, as in real data); "random" = uniform RGB, so only the shape tells
    # the class (a much harder variant for models trained from scratch).
    thing_colors: Literal["class", "random"] = "class"
    # Probability that a thing (after the first) is drawn touching an earlier thing of the same
    # class, slightly overlapping it: the neighbours a mask must tell apart, which K-Net's
    # kernel-update rounds are for (0 = independent placement; the same images as before).
    touching: float = 0.0

    def __post_init__(self) -> None:
        if self.min_instances > self.max_instances:
            raise ConfigError(
                f"data.synth.min_instances ({self.min_instances}) must not exceed "
                f"data.synth.max_instances ({self.max_instances})"
            )


@dataclass(frozen=True)
class DataConfig:
    """Where the dataset is, its format, and images as the model sees them (spec §4.4 / §5.2).

    Paths inside the raw dataset are templates relative to ``raw`` in which ``{split}`` is
    replaced by ``train_split`` or ``val_split``; the defaults are COCO 2017's layout.
    """

    # coco_panoptic: panoptic JSON + PNGs; coco_instance: instances JSON (polygons or RLE);
    # semantic_png: label PNGs (255 = ignore) + a categories JSON.
    format: DataFormat = "coco_panoptic"
    # Root of the raw dataset (DVC-tracked); the synthetic default lives here.
    raw: str = "data/raw/synth"
    # Output folder of ``knet data prepare``; the loaders read it.
    prepared: str = "data/prepared"
    train_split: str = "train"
    val_split: str = "val"
    images: str = "{split}"
    panoptic_json: str = "annotations/panoptic_{split}.json"
    panoptic_dir: str = "annotations/panoptic_{split}"
    instances_json: str = "annotations/instances_{split}.json"
    semantic_dir: str = "semantic/{split}"
    # semantic_png only: [{"id": pixel value, "name": ..., "isthing": 0|1}, ...]
    categories_json: str = "semantic/categories.json"
    # semantic_png only: label values that mean "unlabelled" (ADE20K also uses 0).
    semantic_ignore: tuple[int, ...] = (255,)
    synth: SynthConfig = field(default_factory=SynthConfig)

    # Shorter-side range for training resizes; one value = fixed size, two = uniform range.
    min_size: tuple[int, ...] = (800,)
    # Longer side never exceeds this after resizing (aspect ratio is kept).
    max_size: int = 1333
    # Shorter side at test time.
    test_size: int = 800
    # Probability of a horizontal flip in training.
    flip_prob: float = 0.5
    # Images are padded (bottom/right) to a multiple of this; 32 keeps every FPN level aligned.
    size_divisor: int = 32
    # Random training crop (height, width) after resizing; empty = no crop (COCO), ADE20K: 512.
    crop_size: tuple[int, ...] = ()
    # DataLoader worker processes per training process.
    num_workers: int = 2

    def __post_init__(self) -> None:
        if len(self.crop_size) not in (0, 2):
            raise ConfigError(
                f"data.crop_size must be [] or [height, width]; got {list(self.crop_size)}"
            )
        if not 1 <= len(self.min_size) <= 2:
            raise ConfigError(
                f"data.min_size must be [size] or [low, high]; got {list(self.min_size)}"
            )


@dataclass(frozen=True)
class BackboneConfig:
    """ResNet backbone with torchvision parameter names (spec §2.1)."""

    # ResNet depth: 18, 34, 50 or 101.
    depth: int = 50
    # Width of the first stage; 64 is torchvision's ResNet, smaller gives a tiny CPU model.
    base_channels: int = 64
    # Local path to a torchvision ImageNet state dict; None = random initialisation.
    weights: str | None = None
    # mmdet semantics: -1 freezes nothing, 0 the stem, 1 the stem and stage 1 (official).
    frozen_stages: int = 1
    # Keep BatchNorm statistics frozen (eval mode) during training.
    norm_eval: bool = True


@dataclass(frozen=True)
class PostprocessConfig:
    """Inference settings (spec §6)."""

    # Instance results kept per image: top-k over (kernel, class) pairs. None (the official
    # test_cfg, max_per_img = num_proposals) keeps as many as there are thing kernels, so a
    # kernel-count sweep does not also sweep this cut.
    max_per_image: int | None = None
    # Probability threshold that binarises a mask.
    mask_threshold: float = 0.5
    # Panoptic merge: thing kernels scoring below this are dropped.
    instance_score_threshold: float = 0.3
    # Panoptic merge: a kernel keeps its pixels only if it owns this fraction of its own mask.
    overlap_threshold: float = 0.6
    # `knet predict`: an image of more pixels is predicted at the largest size under this
    # (its JSON says the scale), so memory stays bounded (instance masks are k x H x W).
    max_pixels: int = 4096 * 4096


@dataclass(frozen=True)
class ModelConfig:
    """The K-Net model (spec §2-§3, §10)."""

    task: Task = "panoptic"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # Channels of the FPN levels, the fused stride-8 map, kernels and attention (C).
    channels: int = 256
    # Groups of every GroupNorm in the semantic FPN fuser.
    num_groups: int = 32
    # Learned instance ("thing") kernels N; semantic models use one kernel per class instead.
    num_kernels: int = 100
    # Kernel update rounds (separate weights per round).
    num_stages: int = 3
    # Attention heads in kernel interaction.
    num_heads: int = 8
    # Hidden width of the kernel-interaction FFN.
    ffn_channels: int = 2048
    # Standard deviation of the initial thing kernels.
    kernel_init_std: float = 1.0
    # Sigmoid threshold of the hard masks that assemble group features.
    hard_mask_threshold: float = 0.5
    # Official code sums group features over the mask; True divides by the mask area instead
    # (bounded magnitudes, friendlier to low precision). Off by default for faithfulness.
    normalize_group_features: bool = False
    # Dropout before the semantic classifier (semantic task only; mmseg decode heads use 0.1).
    semantic_dropout: float = 0.1
    # Ablation switches of the paper's Table 4; the defaults are the official model.
    # How a round updates its kernels from the group features: the gated update (adaptive),
    # their plain sum (kernel + group feature), or not at all (none: kernels pass unchanged).
    kernel_updater: Literal["adaptive", "sum", "none"] = "adaptive"
    # Kernel interaction (MHSA + FFN over an image's kernels) in every round.
    kernel_interaction: bool = True
    # Position information given to P5 in the fuser: sine added (official), CoordConv (two
    # coordinate channels concatenated) or none.
    positional_encoding: Literal["sine", "coordconv", "none"] = "sine"
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and matcher costs (spec §4.1-§4.2, §5.2)."""

    cls_weight: float = 2.0
    mask_weight: float = 1.0
    dice_weight: float = 4.0
    rank_weight: float = 0.1
    # Stage-0 semantic focal loss (instance / panoptic).
    seg_weight: float = 1.0
    # Semantic task: cross-entropy weight of every stage.
    semantic_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    match_cls_cost: float = 2.0
    match_dice_cost: float = 4.0
    match_mask_cost: float = 1.0


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a step schedule and linear warm-up (spec §4.4)."""

    lr: float = 1.0e-4
    weight_decay: float = 0.05
    # Learning-rate multiplier of the backbone parameters.
    backbone_lr_mult: float = 0.25
    # Gradient L2-norm clip; 0 disables clipping.
    clip_grad_norm: float = 1.0
    warmup_iters: int = 1000
    warmup_ratio: float = 0.001
    # Epochs after which the learning rate is multiplied by ``lr_gamma``.
    lr_steps: tuple[int, ...] = (8, 11)
    lr_gamma: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """Training loop settings (plain loop and Ray Train alike)."""

    epochs: int = 12
    # Images per worker.
    batch_size: int = 2
    seed: int = 0
    # bf16 autocast on CUDA; ignored on CPU.
    amp: bool = True
    # Channels-last memory format for the model and its input images on CUDA (tensor-core
    # convolutions without layout transposes); ignored on CPU.
    channels_last: bool = True
    # torch.compile the backbone, FPN and fuser (the fixed-shape part; the kernel heads and the
    # criterion stay eager). Module.compile keeps the parameter names, so checkpoints are the
    # same either way. Costs a compile on the first steps (about a minute).
    compile: bool = False
    # Ray Train workers (data-parallel processes); 0 runs the loop in the driver process.
    num_workers: int = 1
    # Elastic training: with 1 <= min_workers < num_workers, a run that loses a host restarts
    # from its latest checkpoint on the workers that still fit (at least min_workers) and
    # grows back when resources return; 0 = a fixed group of num_workers. The batch size is
    # per worker, so the global batch shrinks with the group.
    min_workers: int = 0
    use_gpu: bool = False
    # CPUs reserved per worker: its torch threads on CPU (data-loader processes share them).
    cpus_per_worker: float = 1.0
    # Shared storage for Ray Train run folders and checkpoints (local path, NFS or s3://).
    storage_path: str = "outputs/ray"
    # Run name; empty = derived from the params digest, so rerunning the same params resumes.
    run_name: str = ""
    # Validate (PQ / AP / mIoU) every this many epochs, and after the last one.
    eval_every: int = 4
    # Restarts of a failed worker group from the latest checkpoint.
    max_failures: int = 2
    # Steps with a NaN/inf loss that are skipped before the run stops with an error.
    max_bad_steps: int = 10
    # Seconds to wait for the cluster to place the workers before failing with a message.
    placement_timeout_s: float = 120.0
    # Further placement attempts (each waiting placement_timeout_s), counted over the whole run,
    # before it fails, e.g. a fixed group after a host is lost; -1 waits forever (an
    # autoscaling cluster that brings GPU nodes on demand, which can take minutes).
    placement_retries: int = 2
    # The final checkpoint (the DVC stage's output, and evaluate.checkpoint's default).
    output: str = "outputs/train/model.pt"
    # The last epoch's numbers (DVC metrics); the per-epoch history goes beside it as
    # <stem>_history.json (DVC plots).
    metrics: str = "metrics/train.json"

    def __post_init__(self) -> None:
        if self.min_workers and self.min_workers > self.num_workers:
            raise ConfigError(
                f"train.min_workers ({self.min_workers}) must not exceed "
                f"train.num_workers ({self.num_workers}); 0 means a fixed group"
            )


@dataclass(frozen=True)
class TuneConfig:
    """``knet tune``: the ablation grid of paper Table 4c/4d and how the Ray Tune sweep runs."""

    # Kernel-update rounds to try (model.num_stages); the grid is rounds x kernels x seeds.
    num_stages: tuple[int, ...] = (1, 2, 3)
    # Instance (thing) kernel counts to try (model.num_kernels).
    num_kernels: tuple[int, ...] = (8, 16)
    # A grid over any config keys instead of rounds x kernels: "dotted.key=v1,v2,..." items
    # (values as YAML), e.g. ["model.num_stages=1,2,3", "model.kernel_interaction=true,false"];
    # the trials are their product x seeds. Empty = rounds x kernels from the two lists above.
    grid: tuple[str, ...] = ()
    # Which cells of the grid run: "product", every combination of the values; or
    # "one_at_a_time", the params' own values (the reference cell, which every key must list)
    # and each key varied alone around them, as the paper's Tables 4a-4d each vary one
    # component of the default model (5 + 3 + 2 cells instead of 5 x 3 x 2).
    design: Literal["product", "one_at_a_time"] = "product"
    # Repeats of every cell, with seeds train.seed, train.seed + 1, ...; the table shows
    # mean +- std over them.
    seeds: int = 1
    # The table's and the schedulers' metric (a reported key such as val_pq, val_ap, val_miou);
    # empty = the task's headline: val_pq (panoptic), val_ap (instance), val_miou (semantic).
    metric: str = ""
    mode: Literal["max", "min"] = "max"
    # fifo: every trial runs all epochs (a complete table); asha: early stopping for
    # exploratory sweeps (the table then mixes epochs; the csv says how many each trial ran).
    scheduler: Literal["fifo", "asha"] = "fifo"
    # ASHA: the first rung after this many epochs; keep the best 1/reduction_factor per rung.
    grace_period: int = 1
    reduction_factor: int = 2
    # Trials at once; 0 = as many as the cluster's CPUs and GPUs can place.
    max_concurrent_trials: int = 0
    # Retries of a failed trial by Tune, on top of train.max_failures worker-group restarts.
    max_failures: int = 1
    # dotted.key=value overrides applied to every trial (a sweep's shorter schedule); the grid
    # keys (model.num_stages, model.num_kernels, train.seed) are set by the sweep itself.
    overrides: tuple[str, ...] = ()
    # Ray Tune experiment folders: a local or shared POSIX path (an NFS/EFS mount on a
    # cluster). Not s3://: knet keeps the sweep's records beside Tune's with file I/O.
    storage_path: str = "outputs/tune"
    # Sweep name; empty = derived from the params and knet's source, so rerunning the same
    # sweep restores it (finished trials are not rerun) and any change starts a new one.
    name: str = ""
    # ablation.csv, ablation.md and ablation.png are written here.
    report_dir: str = "reports"

    def __post_init__(self) -> None:
        if "://" in self.storage_path:
            raise ConfigError(
                f"tune.storage_path must be a local or shared file system path (an NFS or EFS "
                f"mount on a cluster), not {self.storage_path!r}: knet tune keeps its sweep "
                f"records there with file I/O (train.storage_path may be s3://)"
            )
        for key in ("num_stages", "num_kernels"):
            values = getattr(self, key)
            if not values:
                raise ConfigError(f"tune.{key} must list at least one value")
            if len(set(values)) != len(values):
                raise ConfigError(f"tune.{key} lists a value twice: {list(values)}")
        for i, item in enumerate(self.grid):
            key, sep, raw = item.partition("=")
            if not sep or not key.strip() or not raw.strip():
                raise ConfigError(
                    f"tune.grid[{i}] must look like dotted.key=v1,v2,...; got {item!r}"
                )


# The metrics of knet evaluate a promotion may gate on (higher is better for each).
QUALITY_METRICS = (
    "pq", "pq_th", "pq_st", "sq", "rq", "ap", "ap50", "ap75", "aps", "apm", "apl", "miou", "acc",
)  # fmt: skip


@dataclass(frozen=True)
class RegistryConfig:
    """``knet promote``: the registered model and the gate a challenger must pass."""

    # Registered model name; empty = knet-<task> (knet-panoptic, knet-instance, knet-semantic).
    name: str = ""
    # The gate metric, a key of knet evaluate's metrics (pq, ap, miou, ...); empty = the task's
    # headline: pq (panoptic), ap (instance), miou (semantic).
    metric: str = ""
    # The challenger becomes champion only if it beats the champion by at least this many
    # metric points (the metrics are percentages).
    min_improvement: float = 0.1
    # The split both models are evaluated on; empty = data.val_split.
    split: str = ""
    # The decision and both scores (DVC-style metrics file).
    output: str = "metrics/promotion.json"

    def __post_init__(self) -> None:
        if self.metric and self.metric not in QUALITY_METRICS:
            raise ConfigError(
                f"registry.metric must be a quality metric ({', '.join(QUALITY_METRICS)}) or "
                f"empty for the task's headline; got {self.metric!r}"
            )


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking (``knet/tracking.py`` is the only module that imports mlflow)."""

    # sqlite file (relative paths from the project root) or an http(s):// tracking server.
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "knet"
    # Artifact root for new experiments with a sqlite URI (ignored for servers).
    artifact_location: str = "mlartifacts"
    # False turns tracking off (runs still train and checkpoint).
    enabled: bool = True
    # MLflow system metrics (CPU, memory, disk, network; GPU with pynvml) in training runs,
    # sampled every this many seconds; 0 = off.
    system_metrics_interval_s: float = 10.0


@dataclass(frozen=True)
class EvaluateConfig:
    """Defaults of ``knet evaluate`` (and the DVC stage ``evaluate``)."""

    # The checkpoint evaluated when none is given on the command line.
    checkpoint: str = "outputs/train/model.pt"
    # Prepared split; empty = data.val_split.
    split: str = ""
    # COCO-format prediction files (and kernel pictures).
    out: str = "outputs/eval"
    # DVC metrics JSON; the per-class CSV is written beside it.
    metrics: str = "metrics/eval.json"
    # Also write the mean kernel activations and per-stage masks (paper Fig. 4).
    kernel_maps: bool = True


@dataclass(frozen=True)
class Config:
    """The whole tree, one attribute per ``params.yaml`` section."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) that :func:`config_from_dict` reads back."""
        return _to_plain(dataclasses.asdict(self))

    def digest(self) -> str:
        """Short stable hash of the resolved config (for lineage tags and run names)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# ------------------------------------------------------------------ path resolution

# Where DVC runs queued and --temp experiments: <project>/.dvc/tmp/exps/<workspace>.
DVC_TEMP_WORKSPACES = (".dvc", "tmp", "exps")


def project_root(root: Path) -> Path:
    """``root``, or the project a DVC temporary experiment workspace ``root`` belongs to."""
    parts = Path(root).resolve().parts
    for i in range(len(parts) - len(DVC_TEMP_WORKSPACES)):
        if parts[i + 1 : i + 1 + len(DVC_TEMP_WORKSPACES)] == DVC_TEMP_WORKSPACES:
            return Path(*parts[: i + 1])
    return Path(root)


def resolve_uri(uri: str, root: Path) -> str:
    """Make a relative ``sqlite:///file.db`` absolute under ``root`` (workers' cwd differs)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((root / uri[len(prefix) :]).resolve())
    return uri


def absolute_paths(cfg: Config, root: Path) -> Config:
    """Every relative path in ``cfg`` made absolute (Ray workers run in other folders).

    The tracking store (a relative sqlite file, the artifact folder) is the project's even
    when ``root`` is a DVC experiment's temporary workspace (``dvc exp run --temp`` / queued
    runs): MLflow runs land beside the user's other runs, not in a folder DVC deletes.
    """

    def absolute(path: str, base: Path = root) -> str:
        return path if "://" in path or os.path.isabs(path) else str(base / path)

    project = project_root(root)

    data = dataclasses.replace(
        cfg.data, raw=absolute(cfg.data.raw), prepared=absolute(cfg.data.prepared)
    )
    train_cfg = dataclasses.replace(
        cfg.train,
        storage_path=absolute(cfg.train.storage_path),
        output=absolute(cfg.train.output),
        metrics=absolute(cfg.train.metrics),
    )
    tracking = dataclasses.replace(
        cfg.tracking,
        uri=resolve_uri(cfg.tracking.uri, project),
        artifact_location=absolute(cfg.tracking.artifact_location, project),
    )
    tune = dataclasses.replace(
        cfg.tune,
        storage_path=absolute(cfg.tune.storage_path),
        report_dir=absolute(cfg.tune.report_dir),
    )
    return dataclasses.replace(cfg, data=data, train=train_cfg, tune=tune, tracking=tracking)


# Value ranges checked after type conversion: dotted key -> (low, high), inclusive.
_RANGES: dict[str, tuple[float, float]] = {
    "model.num_kernels": (1, 300),
    "model.num_stages": (1, 6),
    "model.num_heads": (1, 64),
    "model.channels": (8, 4096),
    "model.hard_mask_threshold": (0.0, 1.0),
    "model.semantic_dropout": (0.0, 1.0),
    "model.backbone.frozen_stages": (-1, 4),
    "model.postprocess.max_per_image": (1, 10000),
    "model.postprocess.mask_threshold": (0.0, 1.0),
    "model.postprocess.instance_score_threshold": (0.0, 1.0),
    "model.postprocess.overlap_threshold": (0.0, 1.0),
    "model.postprocess.max_pixels": (4096, 2**31 - 1),
    "data.flip_prob": (0.0, 1.0),
    "data.synth.seed": (0, 2**32 - 1),
    "data.synth.image_size": (32, 4096),
    "data.synth.train_images": (1, 1_000_000),
    "data.synth.val_images": (1, 1_000_000),
    "data.synth.min_instances": (0, 50),
    "data.synth.max_instances": (0, 50),
    "data.synth.noise": (0.0, 1.0),
    "data.synth.touching": (0.0, 1.0),
    "data.size_divisor": (1, 1024),
    "data.crop_size": (1, 100_000),
    "data.num_workers": (0, 256),
    "train.epochs": (1, 100000),
    "train.batch_size": (1, 4096),
    "train.num_workers": (0, 4096),
    "train.min_workers": (0, 4096),
    "train.placement_retries": (-1, 1000),
    "train.cpus_per_worker": (0.01, 1024),
    "train.eval_every": (1, 100000),
    "train.max_failures": (-1, 1000),
    "train.max_bad_steps": (0, 1_000_000),
    "train.placement_timeout_s": (1, 86400),
    "optim.lr": (0.0, 10.0),
    "tracking.system_metrics_interval_s": (0.0, 3600.0),
    "tune.num_stages": (1, 6),
    "tune.num_kernels": (1, 300),
    "tune.seeds": (1, 1000),
    "tune.grace_period": (1, 100000),
    "tune.reduction_factor": (2, 100),
    "tune.max_concurrent_trials": (0, 100000),
    "tune.max_failures": (-1, 1000),
    # A challenger must beat the champion by at least this much: never a negative margin.
    "registry.min_improvement": (0.0, 100.0),
    "optim.warmup_ratio": (0.0, 1.0),
    "optim.weight_decay": (0.0, 10.0),
    "optim.backbone_lr_mult": (0.0, 100.0),
    "optim.clip_grad_norm": (0.0, 1e6),  # 0: no clipping
    "optim.warmup_iters": (0, 10_000_000),
    "optim.lr_steps": (0, 100000),
    "optim.lr_gamma": (0.0, 1.0),
    "loss.cls_weight": (0.0, 1000.0),
    "loss.mask_weight": (0.0, 1000.0),
    "loss.dice_weight": (0.0, 1000.0),
    "loss.rank_weight": (0.0, 1000.0),
    "loss.seg_weight": (0.0, 1000.0),
    "loss.semantic_weight": (0.0, 1000.0),
    "loss.focal_alpha": (0.0, 1.0),
    "loss.focal_gamma": (0.0, 10.0),
    "loss.match_cls_cost": (0.0, 1000.0),
    "loss.match_dice_cost": (0.0, 1000.0),
    "loss.match_mask_cost": (0.0, 1000.0),
    "model.backbone.base_channels": (8, 1024),
    "model.num_groups": (1, 4096),
    "model.ffn_channels": (1, 65536),
    "model.kernel_init_std": (1e-6, 100.0),
    "data.min_size": (16, 100_000),
    "data.max_size": (16, 100_000),
    "data.test_size": (16, 100_000),
    "data.semantic_ignore": (0, 65535),
    "train.seed": (0, 2**31 - 1),
}
_CHOICES: dict[str, tuple[int, ...]] = {"model.backbone.depth": (18, 34, 50, 101)}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last
    silently, so a second ``model:`` section would drop the first unannounced)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read ``params.yaml`` (or defaults when ``path`` is None) and apply ``key=value`` overrides.

    Raises:
        ConfigError: unknown key, wrong type or out-of-range value; the message names the key
            and, for a file, the file.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"params file {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"params file {path} is a directory") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"params file {path} is not UTF-8 text ({err.reason})") from None
        try:
            data = yaml.load(text, Loader=_StrictLoader)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        except RecursionError:
            raise ConfigError(f"{path} is nested too deeply to be a params file") from None
        if data is None:
            # An empty file would otherwise run the built-in COCO R-50 defaults unannounced.
            raise ConfigError(f"{path} is empty; a params file holds the sections of params.yaml")
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` (value parsed as YAML) inside nested ``data`` in place."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like dotted.key=value")
    if any(not part.strip() for part in key.split(".")):
        raise ConfigError(f"override {item!r}: key {key!r} has an empty part (dotted.key=value)")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"override {key}: value is nested too deeply") from None
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from nested plain data, strictly (see :func:`load_config`)."""
    return _build(Config, data, prefix="")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}{key}"
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else ""
            raise ConfigError(f"{dotted} is not a known key{hint}")
    values = {}
    for name in fields:
        if name in data:
            values[name] = _convert(hints[name], data[name], f"{prefix}{name}")
    return cls(**values)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{key}.")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(hint)
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(items))
    return _check_range(key, _convert_scalar(hint, value, key))


def _convert_scalar(hint: type, value: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it means.
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key} must be a finite number; got {value!r}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - guards against a new field type nobody taught the loader
        raise TypeError(f"config field {key} has unsupported type {hint}")
    raise ConfigError(f"{key} must be {hint.__name__}, got {type(value).__name__} {value!r}")


def _check_range(key: str, value: Any) -> Any:
    base = key.split("[")[0]
    if base in _RANGES:
        low, high = _RANGES[base]
        if not low <= value <= high:
            raise ConfigError(f"{key} must be between {low} and {high}; got {value!r}")
    if base in _CHOICES and value not in _CHOICES[base]:
        raise ConfigError(
            f"{key} must be one of {', '.join(map(str, _CHOICES[base]))}; got {value}"
        )
    return value


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value
