"""Inference post-processing (spec §6): panoptic merge, instance top-k, semantic argmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from knet.config import PostprocessConfig
from knet.method.postprocess import (
    InstanceResult,
    PanopticResult,
    instance_postprocess,
    panoptic_postprocess,
    postprocess,
    resize_to_image,
    semantic_postprocess,
)
from knet.model import KNetOutput, StageOutput

CFG = PostprocessConfig()


def _probs(mask_logits: torch.Tensor, input_size, image_size, output_size) -> torch.Tensor:
    """Stride 8 -> x2 -> sigmoid -> padded input -> crop -> output size, written out here."""
    up = F.interpolate(mask_logits[None], scale_factor=2.0, mode="bilinear", align_corners=False)
    up = F.interpolate(up.sigmoid(), size=input_size, mode="bilinear", align_corners=False)
    up = up[..., : image_size[0], : image_size[1]]
    if tuple(up.shape[-2:]) != tuple(output_size):
        up = F.interpolate(up, size=output_size, mode="bilinear", align_corners=False)
    return up[0]


# ------------------------------------------------------------------------------------ panoptic

N_THING, N_STUFF, T, K = 12, 3, 4, 7
INPUT, IMAGE, OUTPUT = (48, 48), (40, 44), (30, 33)


@pytest.mark.parametrize("seed", range(6))
def test_panoptic_invariants_on_random_logits(seed: int) -> None:
    torch.manual_seed(seed)
    n = N_THING + N_STUFF
    cls_logits = torch.randn(n, K) * 2
    mask_logits = torch.randn(n, 6, 6) * 3 - 3  # sparse masks
    result = panoptic_postprocess(cls_logits, mask_logits, T, N_STUFF, INPUT, IMAGE, OUTPUT, CFG)
    assert isinstance(result, PanopticResult)
    seg_map = result.segment_map
    assert seg_map.shape == OUTPUT
    assert seg_map.dtype == torch.int32
    segments = result.segments
    assert len(segments) > 0

    # ids unique, consecutive from 1; map holds only those ids and 0 (void).
    ids = [s.id for s in segments]
    assert ids == list(range(1, len(segments) + 1))
    assert set(seg_map.unique().tolist()) <= {0, *ids}
    # Scores descending with the ids.
    scores = [s.score for s in segments]
    assert scores == sorted(scores, reverse=True)

    # Independent recomputation of the merge inputs.
    probs = cls_logits.sigmoid()
    k_scores = torch.cat(
        [
            probs[:N_THING, :T].max(1).values,
            probs[N_THING + torch.arange(N_STUFF), T + torch.arange(N_STUFF)],
        ]
    )
    k_labels = torch.cat([probs[:N_THING, :T].argmax(1), T + torch.arange(N_STUFF)])
    masks = _probs(mask_logits, INPUT, IMAGE, OUTPUT)
    owner = (k_scores[:, None, None] * masks).argmax(0)

    kept_kernels = set()
    for seg in segments:
        pixels = seg_map == seg.id
        # One segment per pixel: the segment's area is its pixel count in the map.
        assert seg.area == int(pixels.sum()) > 0
        kernels = owner[pixels].unique().tolist()
        assert len(kernels) == 1, "a segment is the set of pixels owned by one kernel"
        k = kernels[0]
        kept_kernels.add(k)
        assert seg.area == int((owner == k).sum())
        assert seg.label == int(k_labels[k])
        assert seg.score == pytest.approx(float(k_scores[k]), rel=1e-6)
        assert seg.is_thing == (k < N_THING)
        if seg.is_thing:
            assert seg.label < T
            assert seg.score >= CFG.instance_score_threshold
        else:
            assert seg.label >= T
        original_area = int((masks[k] >= CFG.mask_threshold).sum())
        assert original_area > 0
        assert seg.area / original_area >= CFG.overlap_threshold - 1e-6
    # The rejected kernels are exactly those that fail a rule; their pixels are void.
    for k in range(n):
        area = int((owner == k).sum())
        original_area = int((masks[k] >= CFG.mask_threshold).sum())
        keep = (
            (k >= N_THING or float(k_scores[k]) >= CFG.instance_score_threshold)
            and area > 0
            and original_area > 0
            and area / original_area >= CFG.overlap_threshold
        )
        assert (k in kept_kernels) == keep, k
        if not keep:
            assert torch.all(seg_map[owner == k] == 0)


def test_panoptic_random_logits_cover_things_and_stuff() -> None:
    # Across the seeds used above the merge keeps both kinds of segments (the checks above are
    # not vacuous).
    kinds = set()
    for seed in range(6):
        torch.manual_seed(seed)
        n = N_THING + N_STUFF
        cls_logits = torch.randn(n, K) * 2
        mask_logits = torch.randn(n, 6, 6) * 3 - 3  # sparse masks
        result = panoptic_postprocess(
            cls_logits, mask_logits, T, N_STUFF, INPUT, IMAGE, OUTPUT, CFG
        )
        kinds |= {s.is_thing for s in result.segments}
    assert kinds == {True, False}


def _left_right_masks() -> tuple[torch.Tensor, torch.Tensor]:
    left = torch.tensor([[10.0, -10.0], [10.0, -10.0]])  # stride-8 2x2 map
    return left, -left


def test_panoptic_identical_masks_and_low_score_thing() -> None:
    left, right = _left_right_masks()
    mask_logits = torch.stack([left, left, right])  # kernels 0 and 1 identical
    cls_logits = torch.full((3, 3), -8.0)
    cls_logits[0, 2] = 1.0  # kernel 0: class 2, score sigmoid(1) ~ 0.73
    cls_logits[1, 0] = 2.0  # kernel 1: class 0, score sigmoid(2) ~ 0.88 -> wins the left
    cls_logits[2, 1] = -1.0  # kernel 2: class 1, score sigmoid(-1) ~ 0.27 < 0.3 -> dropped
    size = (16, 16)
    result = panoptic_postprocess(cls_logits, mask_logits, 3, 0, size, size, size, CFG)
    assert len(result.segments) == 1
    (seg,) = result.segments
    assert (seg.id, seg.label, seg.is_thing) == (1, 0, True)
    assert seg.score == pytest.approx(1 / (1 + math.exp(-2.0)), rel=1e-6)
    seg_map = result.segment_map
    assert torch.all(seg_map[:, :8] == 1)
    # Kernel 2 owns the right part (its mask, higher weighted probability) but is below the
    # thing score threshold: its pixels stay void instead of going to kernel 1.
    assert torch.all(seg_map[:, 12:] == 0)
    assert seg.area == int((seg_map == 1).sum())

    # Raise kernel 2 above the threshold: it now keeps the right part.
    cls_logits[2, 1] = 1.5
    result = panoptic_postprocess(cls_logits, mask_logits, 3, 0, size, size, size, CFG)
    assert [(s.id, s.label) for s in result.segments] == [(1, 0), (2, 1)]
    assert torch.all(result.segment_map[:, :8] == 1)
    assert torch.all(result.segment_map[:, 8:] == 2)


def test_panoptic_stuff_has_no_score_threshold_and_diagonal_score() -> None:
    left, right = _left_right_masks()
    mask_logits = torch.stack([left, right])  # 1 thing kernel, 1 stuff kernel
    cls_logits = torch.tensor([[2.0, 5.0, 5.0], [5.0, -4.0, -3.0]])  # T=2, one stuff class 2
    size = (16, 16)
    result = panoptic_postprocess(cls_logits, mask_logits, 2, 1, size, size, size, CFG)
    # Thing: max over thing columns only (class 1, logit 5); stuff: its own column (logit -3,
    # score ~0.047, still kept), never its thing columns.
    assert [(s.label, s.is_thing) for s in result.segments] == [(1, True), (2, False)]
    assert result.segments[1].score == pytest.approx(1 / (1 + math.exp(3.0)), rel=1e-6)
    assert torch.all(result.segment_map[:, 10:] == 2)


# ------------------------------------------------------------------------------------ instance


def test_instance_topk_sorted_and_one_kernel_two_classes() -> None:
    torch.manual_seed(0)
    num_kernels, num_classes = 5, 4
    cls_logits = torch.randn(num_kernels, num_classes)
    cls_logits[2, 3] = 6.0
    cls_logits[2, 1] = 5.0  # kernel 2 is the best two (kernel, class) pairs
    mask_logits = torch.randn(num_kernels, 4, 4) * 3
    cfg = PostprocessConfig(max_per_image=7)
    input_size, image_size, output_size = (32, 32), (28, 30), (21, 25)
    res = instance_postprocess(
        cls_logits, mask_logits, num_classes, input_size, image_size, output_size, cfg
    )
    assert isinstance(res, InstanceResult)
    assert len(res.scores) == len(res.labels) == len(res.masks) == 7
    assert res.masks.dtype == torch.bool
    assert res.masks.shape == (7, *output_size)
    assert res.labels.dtype == torch.int64
    assert torch.all(res.scores[:-1] >= res.scores[1:])
    # Expected pairs, by brute force over all (kernel, class).
    pairs = sorted(
        ((float(torch.sigmoid(cls_logits[k, c])), k, c) for k in range(5) for c in range(4)),
        reverse=True,
    )[:7]
    probs = _probs(mask_logits, input_size, image_size, output_size)
    for i, (score, k, c) in enumerate(pairs):
        assert float(res.scores[i]) == pytest.approx(score, rel=1e-6)
        assert int(res.labels[i]) == c
        assert torch.equal(res.masks[i], probs[k] > 0.5)
    assert res.labels[:2].tolist() == [3, 1]
    assert torch.equal(res.masks[0], res.masks[1])


def test_instance_max_per_image_larger_than_pairs() -> None:
    cls_logits = torch.randn(3, 2)
    res = instance_postprocess(
        cls_logits,
        torch.randn(3, 2, 2),
        2,
        (16, 16),
        (16, 16),
        (16, 16),
        PostprocessConfig(max_per_image=100),
    )
    assert len(res.scores) == 6
    assert sorted(res.scores.tolist()) == sorted(cls_logits.sigmoid().flatten().tolist())


# ------------------------------------------------------------------------------------ semantic


def test_semantic_shape_and_dtype() -> None:
    out = semantic_postprocess(torch.randn(5, 4, 6), (32, 48), (30, 41), (45, 61))
    assert out.shape == (45, 61)
    assert out.dtype == torch.int64
    assert int(out.min()) >= 0 and int(out.max()) < 5


@pytest.mark.parametrize("transpose", [False, True])
def test_semantic_argmax_recovers_class_map(transpose: bool) -> None:
    # Bands of one stride-8 cell: after bilinear upsampling each pixel is closest to its own
    # cell's one-hot logits, so the argmax gives back the class map (nearest-upsampled).
    bands = torch.tensor([0, 3, 1, 4, 2, 0])  # 6 cells along one axis
    class_map = bands[None, :].repeat(4, 1)  # (4, 6)
    if transpose:
        class_map = class_map.T.contiguous()  # (6, 4)
    logits = F.one_hot(class_map, 5).permute(2, 0, 1).float() * 10  # (5, h, w)
    size = (class_map.shape[0] * 8, class_map.shape[1] * 8)
    out = semantic_postprocess(logits, size, size, size)
    expected = class_map.repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------------------ resize


def test_resize_to_image_crops_padding() -> None:
    maps = torch.full((2, 32, 40), 100.0)  # padded input resolution
    rows = torch.arange(20, dtype=torch.float32)[:, None].expand(20, 24)
    maps[0, :20, :24] = rows
    maps[1, :20, :24] = 1.0
    out = resize_to_image(maps, (32, 40), (20, 24), (20, 24))
    assert out.shape == (2, 20, 24)
    torch.testing.assert_close(out[0], rows)
    torch.testing.assert_close(out[1], torch.ones(20, 24))
    # Rescaled to another output size: still no value from the padding.
    out = resize_to_image(maps, (32, 40), (20, 24), (10, 17))
    assert out.shape == (2, 10, 17)
    torch.testing.assert_close(out[1], torch.ones(10, 17))
    assert float(out[0].max()) <= 19.0


def test_resize_to_image_from_low_resolution() -> None:
    # A stride-8 map whose padded cells hold 100: the image-only cells are far from them.
    maps = torch.full((1, 4, 4), 100.0)
    maps[0, :2, :2] = 1.0
    out = resize_to_image(maps, (32, 32), (12, 12), (12, 12))
    assert out.shape == (1, 12, 12)
    torch.testing.assert_close(out, torch.ones(1, 12, 12))


# ------------------------------------------------------------------------------------ postprocess


def _panoptic_model_output(batch: int = 2) -> KNetOutput:
    torch.manual_seed(3)
    n_thing, n_stuff, t, k = 3, 2, 2, 4
    cls = torch.randn(batch, n_thing + n_stuff, k)
    cls[:, n_thing:, :t] = 10.0  # stuff kernels would top any thing ranking
    masks = torch.randn(batch, n_thing + n_stuff, 2, 3) * 3
    stage0 = StageOutput(torch.randn(batch, n_thing, 2, 3), None)
    return KNetOutput([stage0, StageOutput(masks, cls)], torch.randn(batch, k, 2, 3))


def test_postprocess_instance_from_panoptic_model_uses_thing_kernels() -> None:
    out = _panoptic_model_output()
    image_sizes = [(16, 24), (12, 20)]
    output_sizes = [(32, 48), (12, 20)]
    results = postprocess(out, "instance", 2, 2, image_sizes, output_sizes, CFG)
    assert len(results) == 2
    for b, res in enumerate(results):
        assert isinstance(res, InstanceResult)
        assert len(res.scores) == 3  # top-k, k = 3 thing kernels (official); stuff kernels unused
        assert float(res.scores.max()) < 1 / (1 + math.exp(-10.0))
        ref = instance_postprocess(
            out.last.cls_logits[b, :3, :2],
            out.last.mask_logits[b, :3],
            2,
            (16, 24),
            image_sizes[b],
            output_sizes[b],
            CFG,
        )
        torch.testing.assert_close(res.scores, ref.scores)
        assert torch.equal(res.labels, ref.labels)
        assert torch.equal(res.masks, ref.masks)
        assert res.masks.shape[-2:] == output_sizes[b]


def test_postprocess_panoptic_per_image() -> None:
    out = _panoptic_model_output()
    results = postprocess(out, "panoptic", 2, 2, [(16, 24)] * 2, [(16, 24)] * 2, CFG)
    assert len(results) == 2
    for res in results:
        assert isinstance(res, PanopticResult)
        assert res.segment_map.shape == (16, 24)


def test_postprocess_rejects_mismatched_tasks() -> None:
    semantic = KNetOutput([StageOutput(torch.randn(1, 5, 2, 2), None)], None)
    with pytest.raises(ValueError):
        postprocess(semantic, "panoptic", 3, 2, [(16, 16)], [(16, 16)], CFG)
    with pytest.raises(ValueError):
        postprocess(semantic, "instance", 3, 2, [(16, 16)], [(16, 16)], CFG)
    (sem,) = postprocess(semantic, "semantic", 3, 2, [(16, 16)], [(20, 20)], CFG)
    assert sem.shape == (20, 20) and sem.dtype == torch.int64
    with pytest.raises(ValueError):
        postprocess(_panoptic_model_output(1), "semantic", 2, 2, [(16, 24)], [(16, 24)], CFG)
    with pytest.raises(ValueError):
        postprocess(_panoptic_model_output(1), "bogus", 2, 2, [(16, 24)], [(16, 24)], CFG)


def _instance_model_output() -> KNetOutput:
    """An instance model's output: 4 thing kernels, 2 thing classes, no stuff kernels."""
    torch.manual_seed(4)
    stage0 = StageOutput(torch.randn(1, 4, 2, 3), None)
    stage1 = StageOutput(torch.randn(1, 4, 2, 3) * 3, torch.randn(1, 4, 2))
    return KNetOutput([stage0, stage1], torch.randn(1, 2, 2, 3))


def test_postprocess_instance_model_with_dataset_class_counts() -> None:
    # Callers pass the dataset's class split (as to build_model and KNetCriterion); an instance
    # model has no stuff kernels, so all 4 kernels are thing kernels whatever the stuff count.
    out = _instance_model_output()
    (res,) = postprocess(out, "instance", 2, 3, [(16, 24)], [(16, 24)], CFG)
    assert len(res.scores) == 4  # top-k, k = the 4 thing kernels
    torch.testing.assert_close(
        res.scores, out.last.cls_logits[0].sigmoid().flatten().sort(descending=True).values[:4]
    )


def test_postprocess_panoptic_from_instance_model_raises() -> None:
    with pytest.raises(ValueError):
        postprocess(_instance_model_output(), "panoptic", 2, 3, [(16, 24)], [(16, 24)], CFG)


# ------------------------------------------------------------------------------ bounded memory


@pytest.mark.parametrize("seed", range(3))
def test_chunked_postprocess_equals_one_pass(monkeypatch, seed: int) -> None:
    """Kernels resized a few at a time (a running argmax) give exactly the one-pass results."""
    import knet.method.postprocess as pp

    gen = torch.Generator().manual_seed(seed)
    cls = torch.randn(N_THING + N_STUFF, T + N_STUFF, generator=gen)
    masks = torch.randn(N_THING + N_STUFF, INPUT[0] // 8, INPUT[1] // 8, generator=gen) * 3
    # Exact ties between kernels (identical masks and scores) must go to the lower index.
    masks[5], cls[5] = masks[4], cls[4]
    sem_logits = torch.randn(K, INPUT[0] // 8, INPUT[1] // 8, generator=gen)
    cfg = PostprocessConfig(instance_score_threshold=0.0, overlap_threshold=0.2)

    def run():
        pan = panoptic_postprocess(cls, masks, T, N_STUFF, INPUT, IMAGE, OUTPUT, cfg)
        ins = instance_postprocess(cls[:N_THING, :T], masks[:N_THING], T, INPUT, IMAGE, OUTPUT, cfg)
        sem = semantic_postprocess(sem_logits, INPUT, IMAGE, OUTPUT)
        return pan, ins, sem

    one_pass = run()
    # One kernel per chunk: the smallest budget.
    monkeypatch.setattr(pp, "CHUNK_BYTES", 4 * OUTPUT[0] * OUTPUT[1])
    assert len(pp._chunks(N_THING + N_STUFF, OUTPUT)) == N_THING + N_STUFF
    chunked = run()
    assert torch.equal(one_pass[0].segment_map, chunked[0].segment_map)
    assert one_pass[0].segments == chunked[0].segments and one_pass[0].segments
    assert torch.equal(one_pass[1].masks, chunked[1].masks)
    assert torch.equal(one_pass[1].scores, chunked[1].scores)
    assert torch.equal(one_pass[2], chunked[2])


def test_a_large_image_is_post_processed_in_chunks() -> None:
    """The float maps held at once stay within the budget: 16 kernels of an 8000x8000 image
    one at a time (256 MB each; all at once was 4 GB), of 4000x4000 four at a time."""
    from knet.method.postprocess import CHUNK_BYTES, _chunks

    assert [p.stop - p.start for p in _chunks(16, (8000, 8000))] == [1] * 16
    assert [p.stop - p.start for p in _chunks(16, (4000, 4000))] == [4] * 4
    assert all(
        4 * 4000 * 4000 * (p.stop - p.start) <= CHUNK_BYTES for p in _chunks(16, (4000, 4000))
    )
    assert _chunks(16, (128, 128)) == [slice(0, 16)]
