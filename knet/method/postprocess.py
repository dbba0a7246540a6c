"""From the last round's logits to segmentations (spec §6). Pure functions on tensors.

Letters: N kernels (thing kernels, then stuff kernels for panoptic), T thing classes,
K classes, h, w the stride-8 size, H, W the output (original image) size.
Sizes: ``input_size`` is the padded network input (Hp, Wp), ``image_size`` the resized image
inside it before padding, ``output_size`` the original image size the results are given at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from knet.config import PostprocessConfig
from knet.model import KNetOutput

Size = tuple[int, int]


@dataclass
class InstanceResult:
    masks: Tensor  # (k, H, W) bool
    labels: Tensor  # (k,) int64 thing training ids
    scores: Tensor  # (k,) float, class score only (no mask rescoring, as in the official code)


@dataclass
class Segment:
    id: int  # value of this segment in PanopticResult.segment_map, from 1
    label: int  # training id
    is_thing: bool
    score: float
    area: int


@dataclass
class PanopticResult:
    segment_map: Tensor  # (H, W) int32 segment ids, 0 = void (no segment)
    segments: list[Segment]


def resize_to_image(maps: Tensor, input_size: Size, image_size: Size, output_size: Size) -> Tensor:
    """(N, h, w) -> (N, H, W): bilinear to the padded input, crop the padding, bilinear again."""
    maps = F.interpolate(maps[None].float(), size=input_size, mode="bilinear", align_corners=False)
    maps = maps[..., : image_size[0], : image_size[1]]
    if tuple(maps.shape[-2:]) != tuple(output_size):
        maps = F.interpolate(maps, size=output_size, mode="bilinear", align_corners=False)
    return maps[0]


def _mask_probs(
    mask_logits: Tensor, input_size: Size, image_size: Size, output_size: Size
) -> Tensor:
    """Stride-8 logits -> x2 (stride 4, as in training) -> sigmoid -> original size. (N, H, W)."""
    up = F.interpolate(
        mask_logits[None].float(), scale_factor=2.0, mode="bilinear", align_corners=False
    )[0]  # (N, 2h, 2w)
    return resize_to_image(up.sigmoid(), input_size, image_size, output_size)


# Full-size float maps the post-processing holds at once, per image. Kernels are resized in
# chunks that fit this budget and reduced as they come (a running argmax), so the results are
# exactly those of one pass over all kernels (spec §6) while the peak memory no longer grows
# with kernels x pixels: an 8000x8000 image used to need one 4.9 GB tensor.
CHUNK_BYTES = 256 * 2**20


def _chunks(count: int, output_size: Size) -> list[slice]:
    """Consecutive slices of ``count`` kernels whose (c, H, W) float32 maps fit CHUNK_BYTES."""
    per = max(1, CHUNK_BYTES // (4 * max(1, output_size[0] * output_size[1])))
    return [slice(start, min(count, start + per)) for start in range(0, count, per)]


def _running_argmax(
    maps: Callable[[slice], Tensor], count: int, output_size: Size
) -> tuple[Tensor, Tensor]:
    """(value, index) of the maximum over ``count`` maps made chunk by chunk by ``maps``.

    Ties go to the lowest index, as one ``argmax`` over all of them would.
    """
    best = index = None
    for part in _chunks(count, output_size):
        chunk = maps(part)  # (c, H, W)
        local = chunk.argmax(dim=0)
        value = chunk.gather(0, local[None])[0]
        local += part.start
        if best is None:
            best, index = value, local
        else:
            better = value > best
            best = torch.where(better, value, best)
            index = torch.where(better, local, index)
    assert best is not None and index is not None, "no maps to reduce"
    return best, index


def instance_postprocess(
    cls_logits: Tensor,
    mask_logits: Tensor,
    num_thing_classes: int,
    input_size: Size,
    image_size: Size,
    output_size: Size,
    cfg: PostprocessConfig,
) -> InstanceResult:
    """Top-k over (kernel, class) pairs, class score only, masks binarised, no NMS (spec §6.1).

    k is ``cfg.max_per_image``, or the number of thing kernels N when that is unset.

    Args:
        cls_logits: (N, K) of the thing kernels. mask_logits: (N, h, w).
    """
    scores = cls_logits[:, :num_thing_classes].float().sigmoid()  # (N, T)
    limit = cfg.max_per_image or len(scores)  # unset: one result per thing kernel (official)
    k = min(limit, scores.numel())
    top_scores, flat = scores.flatten().topk(k)  # (k,)
    kernels = flat // num_thing_classes
    labels = flat % num_thing_classes
    logits = mask_logits[kernels]
    masks = [
        _mask_probs(logits[part], input_size, image_size, output_size) > cfg.mask_threshold
        for part in _chunks(len(logits), output_size)
    ]
    if masks:
        binary = torch.cat(masks)  # (k, H, W) bool
    else:
        binary = torch.zeros(0, *output_size, dtype=torch.bool, device=mask_logits.device)
    return InstanceResult(binary, labels, top_scores)


def panoptic_postprocess(  # 8 parameters: the official merge's logits, class split and sizes
    cls_logits: Tensor,
    mask_logits: Tensor,
    num_thing_classes: int,
    num_stuff_classes: int,
    input_size: Size,
    image_size: Size,
    output_size: Size,
    cfg: PostprocessConfig,
) -> PanopticResult:
    """Score-weighted argmax merge with the overlap filter (spec §6.2), without a Python loop.

    Args:
        cls_logits: (N, K), thing kernels then the S stuff kernels. mask_logits: (N, h, w).
    """
    num_kernels = cls_logits.shape[0]
    num_things = num_kernels - num_stuff_classes
    probs = cls_logits.float().sigmoid()  # (N, K)
    scores, labels = probs[:num_things, :num_thing_classes].max(dim=1)  # (N_thing,)
    if num_stuff_classes:
        stuff = torch.arange(num_stuff_classes, device=probs.device)
        scores = torch.cat([scores, probs[num_things + stuff, num_thing_classes + stuff]])
        labels = torch.cat([labels, num_thing_classes + stuff])
    original_area = torch.zeros(num_kernels, dtype=torch.int64, device=probs.device)

    def weighted(part: slice) -> Tensor:  # score x mask probability of kernels ``part``
        masks = _mask_probs(mask_logits[part], input_size, image_size, output_size)  # (c, H, W)
        original_area[part] = (masks >= cfg.mask_threshold).flatten(1).sum(1)
        return scores[part, None, None] * masks

    _, owner = _running_argmax(weighted, num_kernels, output_size)  # (H, W) kernel index
    area = torch.bincount(owner.flatten(), minlength=num_kernels)  # (N,)
    is_thing = torch.arange(num_kernels, device=probs.device) < num_things
    # Every pixel has one owner, so the official sequential visit (descending score) keeps
    # exactly these kernels; the order only decides the segment ids.
    keep = ~is_thing | (scores >= cfg.instance_score_threshold)
    keep &= (area > 0) & (original_area > 0)
    keep &= area >= cfg.overlap_threshold * original_area
    order = torch.argsort(scores, descending=True, stable=True)
    kept = order[keep[order]]  # kernel indices, best first
    segment_of_kernel = torch.zeros(num_kernels, dtype=torch.int32, device=probs.device)
    segment_of_kernel[kept] = torch.arange(1, len(kept) + 1, dtype=torch.int32, device=probs.device)
    segment_map = segment_of_kernel[owner]  # (H, W)
    segments = [
        Segment(
            id=i + 1,
            label=int(labels[k]),
            is_thing=bool(is_thing[k]),
            score=float(scores[k]),
            area=int(area[k]),
        )
        for i, k in enumerate(kept.tolist())
    ]
    return PanopticResult(segment_map, segments)


def semantic_postprocess(
    mask_logits: Tensor, input_size: Size, image_size: Size, output_size: Size
) -> Tensor:
    """Argmax over the class logits (K, h, w) at the original size -> (H, W) int64 class ids."""
    return _running_argmax(
        lambda part: resize_to_image(mask_logits[part], input_size, image_size, output_size),
        mask_logits.shape[0],
        output_size,
    )[1]


def postprocess(
    outputs: KNetOutput,
    task: str,
    num_thing_classes: int,
    num_stuff_classes: int,
    image_sizes: list[Size],
    output_sizes: list[Size],
    cfg: PostprocessConfig,
) -> list[InstanceResult] | list[PanopticResult] | list[Tensor]:
    """Results for every image of a batch from the model's last round.

    ``task`` may differ from the model's own: a panoptic model also gives instance results
    from its thing kernels. Semantic models only give semantic results. The class counts are
    the dataset's; the split of kernels into thing and stuff kernels is read from ``outputs``.
    """
    if task not in ("panoptic", "instance", "semantic"):
        raise ValueError(f"unknown task {task!r}; expected panoptic, instance or semantic")
    last = outputs.last
    input_size = (last.mask_logits.shape[-2] * 8, last.mask_logits.shape[-1] * 8)
    semantic_model = last.cls_logits is None
    if (task == "semantic") != semantic_model:
        model = "a semantic" if semantic_model else "an instance or panoptic"
        raise ValueError(f"{task} results cannot come from {model} model's outputs")
    num_thing_kernels = outputs.stages[0].mask_logits.shape[1]
    num_stuff_kernels = last.mask_logits.shape[1] - num_thing_kernels
    if task == "panoptic" and num_stuff_kernels != num_stuff_classes:
        raise ValueError(
            f"panoptic results need a panoptic model with {num_stuff_classes} stuff kernels; "
            f"these outputs have {num_stuff_kernels}"
        )
    results = []
    for b, (image_size, output_size) in enumerate(zip(image_sizes, output_sizes, strict=True)):
        cls_logits, mask_logits = last.cls_logits, last.mask_logits[b]
        if task == "semantic":
            result = semantic_postprocess(mask_logits, input_size, image_size, output_size)
        elif task == "panoptic":
            result = panoptic_postprocess(
                cls_logits[b],
                mask_logits,
                num_thing_classes,
                num_stuff_classes,
                input_size,
                image_size,
                output_size,
                cfg,
            )
        else:
            things = slice(0, num_thing_kernels)
            result = instance_postprocess(
                cls_logits[b, things],
                mask_logits[things],
                num_thing_classes,
                input_size,
                image_size,
                output_size,
                cfg,
            )
        results.append(result)
    return results
