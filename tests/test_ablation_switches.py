"""The Table-4 component switches: each changes exactly the part it names, and nothing else.

The official model is the default of every switch (the parity tests in test_model.py hold it);
here each variant is compared with it parameter by parameter and, where the switch removes an
operation, output by output with the same weights.
"""

from __future__ import annotations

import pytest
import torch

from knet.cli import main
from knet.config import ConfigError, PostprocessConfig
from knet.method.losses import KNetCriterion
from knet.method.postprocess import instance_postprocess
from knet.model import ABLATION_SWITCHES, build_model, variant_parameter_counts
from knet.model.heads import KernelUpdateHead, assemble_group_features
from knet.model.neck import SemanticFPNFuser, coord_features, sine_positional_encoding
from tests.conftest import NUM_STUFF, NUM_THINGS, synthetic_batch, tiny_config

C = 32


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def _diff(a: dict, b: dict) -> tuple[set[str], set[str], set[str]]:
    """Keys only in a, only in b, and in both with different shapes."""
    both = a.keys() & b.keys()
    return set(a) - set(b), set(b) - set(a), {k for k in both if a[k] != b[k]}


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
@pytest.mark.parametrize(
    ("override", "removed", "reshaped"),
    [
        ("model.kernel_updater=sum", ".updator.", None),
        ("model.kernel_updater=none", ".updator.", None),
        ("model.kernel_interaction=false", (".attention.", ".attention_norm.", ".ffn"), None),
        ("model.positional_encoding=coordconv", None, "fuser.towers.3.0.conv.weight"),
        ("model.positional_encoding=none", None, None),
    ],
)
def test_each_switch_changes_only_the_parameters_it_names(task, override, removed, reshaped):
    official = _shapes(build_model(tiny_config(task).model, NUM_THINGS, NUM_STUFF))
    variant = _shapes(build_model(tiny_config(task, override).model, NUM_THINGS, NUM_STUFF))
    only_official, only_variant, different = _diff(official, variant)
    assert only_variant == set()
    if removed is None:
        assert only_official == set()
    else:
        assert only_official and all(k.startswith("update_heads.") for k in only_official)
        assert all(
            any(part in k for part in (removed if isinstance(removed, tuple) else (removed,)))
            for k in only_official
        )
        # every update round loses the same part
        rounds = {k.split(".")[1] for k in only_official}
        assert rounds == {str(i) for i in range(tiny_config(task).model.num_stages)}
    if reshaped is None:
        assert different == set()
    else:
        assert different == {reshaped}
        out_c, in_c, kh, kw = official[reshaped]
        assert variant[reshaped] == (out_c, in_c + 2, kh, kw)


def _head(updater: str, interaction: bool) -> KernelUpdateHead:
    torch.manual_seed(0)
    return KernelUpdateHead(
        C,
        num_classes=3,
        num_heads=4,
        ffn_channels=64,
        soft_assembling=False,
        hard_mask_threshold=0.5,
        normalize_group_features=False,
        updater=updater,
        interaction=interaction,
    ).eval()


def _round_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, C, 8, 8, generator=gen)
    kernels = torch.randn(2, 5, C, generator=gen)
    masks = torch.randn(2, 5, 8, 8, generator=gen)
    return features, kernels, masks


def test_no_update_passes_the_kernels_through_and_ignores_the_masks():
    head = _head("none", interaction=False)
    features, kernels, masks = _round_inputs()
    with torch.no_grad():
        out, mask_logits, _ = head(features, kernels, masks)
        again, _, _ = head(features, kernels, -masks)  # other masks: other group features
    torch.testing.assert_close(out, kernels, rtol=0, atol=0)
    torch.testing.assert_close(again, kernels, rtol=0, atol=0)
    assert mask_logits.shape == (2, 5, 8, 8)


def test_sum_update_adds_the_group_feature_to_the_kernel():
    head = _head("sum", interaction=False)
    features, kernels, masks = _round_inputs()
    with torch.no_grad():
        out, _, _ = head(features, kernels, masks)
        group = assemble_group_features(masks, head.feat_transform(features), soft=False)
    torch.testing.assert_close(out, kernels + group)


def test_adaptive_update_is_the_gated_updater_and_interaction_off_is_the_identity():
    head = _head("adaptive", interaction=False)
    features, kernels, masks = _round_inputs()
    with torch.no_grad():
        out, _, _ = head(features, kernels, masks)
        group = assemble_group_features(masks, head.feat_transform(features), soft=False)
        expected = head.updator(group, kernels)
    torch.testing.assert_close(out, expected)
    assert head.interact_kernels(kernels) is kernels


def test_interaction_on_and_off_differ_only_by_the_interaction_block():
    on, off = _head("adaptive", interaction=True), _head("adaptive", interaction=False)
    off.load_state_dict({k: v for k, v in on.state_dict().items() if k in off.state_dict()})
    features, kernels, masks = _round_inputs()
    with torch.no_grad():
        updated_off, masks_off, cls_off = off(features, kernels, masks)
        updated_on, masks_on, cls_on = on(features, kernels, masks)
        torch.testing.assert_close(updated_on, on.interact_kernels(updated_off))
        assert not torch.allclose(updated_on, updated_off)
        torch.testing.assert_close(masks_on.shape, masks_off.shape)


def _pyramid(channels: int = C) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(1, channels, 64 // s, 96 // s, generator=gen) for s in (4, 8, 16, 32)]


def test_no_positional_encoding_is_sine_without_the_added_encoding():
    torch.manual_seed(0)
    sine = SemanticFPNFuser(C, num_groups=8, positional_encoding="sine").eval()
    none = SemanticFPNFuser(C, num_groups=8, positional_encoding="none").eval()
    none.load_state_dict(sine.state_dict())
    feats = _pyramid()
    p5 = feats[3]
    with_pos = [*feats[:3], p5 + sine_positional_encoding(1, *p5.shape[-2:], C // 2)]
    with torch.no_grad():
        for a, b in zip(sine(feats), none(with_pos), strict=True):
            torch.testing.assert_close(a, b)
        assert not torch.allclose(sine(feats)[0], none(feats)[0])


def test_coordconv_concatenates_two_coordinate_channels_to_p5():
    torch.manual_seed(0)
    none = SemanticFPNFuser(C, num_groups=8, positional_encoding="none").eval()
    coord = SemanticFPNFuser(C, num_groups=8, positional_encoding="coordconv").eval()
    state = none.state_dict()
    weight = state["towers.3.0.conv.weight"]  # (C, C, 3, 3)
    # the coordinate channels' weights at zero: CoordConv is then exactly no encoding
    state["towers.3.0.conv.weight"] = torch.cat((weight, torch.zeros(C, 2, 3, 3)), dim=1)
    coord.load_state_dict(state)
    feats = _pyramid()
    with torch.no_grad():
        for a, b in zip(none(feats), coord(feats), strict=True):
            torch.testing.assert_close(a, b)
    grid = coord_features(feats[3])  # (1, 2, 2, 3): x then y, each from -1 to 1
    assert grid.shape == (1, 2, 2, 3)
    torch.testing.assert_close(grid[0, 0, 0], torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(grid[0, 1, :, 0], torch.tensor([-1.0, 1.0]))


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
@pytest.mark.parametrize(
    "override",
    [
        "model.kernel_updater=sum",
        "model.kernel_updater=none",
        "model.kernel_interaction=false",
        "model.positional_encoding=coordconv",
        "model.positional_encoding=none",
    ],
)
def test_every_variant_trains(task, override):
    cfg = tiny_config(task, override, "model.semantic_dropout=0.0")
    model = build_model(cfg.model, NUM_THINGS, NUM_STUFF).train()
    criterion = KNetCriterion(cfg.loss, task, NUM_THINGS, NUM_STUFF)
    images, targets = synthetic_batch(task)
    losses = criterion(model(images), targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_switch_values_are_checked_with_their_key():
    with pytest.raises(
        ConfigError, match=r"model\.kernel_updater must be one of adaptive, sum, none"
    ):
        tiny_config("panoptic", "model.kernel_updater=gated")
    with pytest.raises(ConfigError, match=r"model\.positional_encoding must be one of"):
        tiny_config("panoptic", "model.positional_encoding=learned")
    with pytest.raises(ConfigError, match=r"model\.kernel_interaction must be bool"):
        tiny_config("panoptic", "model.kernel_interaction=sometimes")


def test_variant_parameter_counts_list_every_other_value():
    cfg = tiny_config("panoptic").model
    rows = dict(variant_parameter_counts(cfg, NUM_THINGS, NUM_STUFF))
    others = sum(len(values) - 1 for values in ABLATION_SWITCHES.values())
    assert len(rows) == 1 + others
    base = rows["this config"]
    assert rows["model.kernel_updater=none"] == rows["model.kernel_updater=sum"] < base
    assert rows["model.kernel_interaction=false"] < base
    assert rows["model.positional_encoding=coordconv"] == base + 2 * C * 9
    assert rows["model.positional_encoding=none"] == base


def test_model_summary_prints_the_switches_and_the_variants(capsys):
    assert main(["model", "summary", "--variants", "--num-things", "4", "--num-stuff", "2"]) == 0
    out = capsys.readouterr().out
    assert "kernel updater adaptive, kernel interaction on, positional encoding sine" in out
    assert "model.kernel_interaction=false" in out
    assert "model.positional_encoding=coordconv" in out


def test_instance_top_k_follows_the_kernel_count_unless_set():
    gen = torch.Generator().manual_seed(0)
    n, t = 6, 3
    cls_logits, mask_logits = torch.randn(n, t, generator=gen), torch.randn(n, 4, 4, generator=gen)
    sizes = dict(input_size=(32, 32), image_size=(32, 32), output_size=(32, 32))
    default = instance_postprocess(cls_logits, mask_logits, t, cfg=PostprocessConfig(), **sizes)
    assert len(default.scores) == n  # official: max_per_img = num_proposals
    scores = cls_logits.sigmoid().flatten().sort(descending=True).values[:n]
    torch.testing.assert_close(default.scores, scores)
    explicit = instance_postprocess(
        cls_logits, mask_logits, t, cfg=PostprocessConfig(max_per_image=10), **sizes
    )
    assert len(explicit.scores) == 10
