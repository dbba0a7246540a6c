"""The model: shapes for every task, gradients, overfitting, and parity with the official counts."""

from __future__ import annotations

import pytest
import torch

from knet.config import load_config
from knet.method.losses import KNetCriterion
from knet.method.optim import build_optimizer
from knet.model import build_model
from tests.conftest import NUM_STUFF, NUM_THINGS, synthetic_batch, tiny_config


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_output_shapes_every_stage(task):
    cfg = tiny_config(task)
    model = build_model(cfg.model, NUM_THINGS, NUM_STUFF)
    images = torch.randn(2, 3, 64, 96)
    out = model(images)
    h, w = 64 // 8, 96 // 8
    n, k = {
        "panoptic": (8 + NUM_STUFF, NUM_THINGS + NUM_STUFF),
        "instance": (8, NUM_THINGS),
        "semantic": (NUM_THINGS + NUM_STUFF, None),
    }[task]
    assert len(out.stages) == 1 + cfg.model.num_stages
    first = out.stages[0]
    assert first.cls_logits is None
    expected_first = n if task == "semantic" else 8  # stage 0: thing kernels only
    assert first.mask_logits.shape == (2, expected_first, h, w)
    for stage in out.stages[1:]:
        assert stage.mask_logits.shape == (2, n, h, w)
        if k is None:
            assert stage.cls_logits is None
        else:
            assert stage.cls_logits.shape == (2, n, k)
    if task == "semantic":
        assert out.semantic_logits is None
    else:
        assert out.semantic_logits.shape == (2, k, h, w)


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_same_output_type_in_train_and_eval(task):
    model = build_model(tiny_config(task).model, NUM_THINGS, NUM_STUFF)
    images = torch.randn(1, 3, 64, 64)
    train_out = model.train()(images)
    with torch.no_grad():
        eval_out = model.eval()(images)
    assert type(train_out) is type(eval_out)
    assert len(train_out.stages) == len(eval_out.stages)
    for a, b in zip(train_out.stages, eval_out.stages, strict=True):
        assert a.mask_logits.shape == b.mask_logits.shape


@pytest.mark.parametrize("num_stages", [1, 4])
@pytest.mark.parametrize("num_kernels", [1, 30])
def test_ablation_axes_are_plain_config_values(num_stages, num_kernels):
    cfg = tiny_config(
        "instance", f"model.num_stages={num_stages}", f"model.num_kernels={num_kernels}"
    )
    model = build_model(cfg.model, NUM_THINGS, NUM_STUFF)
    out = model(torch.randn(1, 3, 64, 64))
    assert len(out.stages) == num_stages + 1
    assert out.last.cls_logits.shape == (1, num_kernels, NUM_THINGS)


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_backward_reaches_every_trainable_parameter(task):
    cfg = tiny_config(task, "model.semantic_dropout=0.0")
    model = build_model(cfg.model, NUM_THINGS, NUM_STUFF).train()
    criterion = KNetCriterion(cfg.loss, task, NUM_THINGS, NUM_STUFF)
    images, targets = synthetic_batch(task)
    losses = criterion(model(images), targets)
    sum(losses.values()).backward()
    missing = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert missing == []
    assert all(torch.isfinite(v) for v in losses.values())


def test_frozen_backbone_parameters_get_no_gradient():
    cfg = tiny_config("instance", "model.backbone.frozen_stages=1")
    model = build_model(cfg.model, NUM_THINGS, NUM_STUFF).train()
    criterion = KNetCriterion(cfg.loss, "instance", NUM_THINGS, NUM_STUFF)
    images, targets = synthetic_batch("instance")
    sum(criterion(model(images), targets).values()).backward()
    assert model.backbone.conv1.weight.grad is None
    assert model.backbone.layer2[0].conv1.weight.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize("task", ["instance", "panoptic"])
def test_overfits_one_batch(task):
    torch.manual_seed(0)
    cfg = tiny_config(task, "optim.lr=0.001", "optim.warmup_iters=0", "optim.weight_decay=0.0")
    model = build_model(cfg.model, NUM_THINGS, NUM_STUFF).train()
    criterion = KNetCriterion(cfg.loss, task, NUM_THINGS, NUM_STUFF)
    optimizer = build_optimizer(model, cfg.optim)
    images, targets = synthetic_batch(task, seed=1)
    history = []
    for _ in range(80):
        loss = sum(criterion(model(images), targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] * 5 <= history[0], f"loss {history[0]:.3f} -> {history[-1]:.3f}"


# Parity with the official architecture (spec §3.2), COCO panoptic R-50 preset, C = 256.
PER_STAGE = {
    "feat_transform": 65_792,
    "updator": 463_104,
    "attention": 263_680,  # MHSA + its LayerNorm
    "ffn": 1_051_392,  # FFN + its LayerNorm
    "mask_branch": 131_840,
}


@pytest.mark.parametrize(
    ("task", "things", "stuff", "cls_branch"),
    [("instance", 80, 53, 86_608), ("panoptic", 80, 53, 100_229)],
)
def test_parameter_counts_match_the_official_model(task, things, stuff, cls_branch):
    cfg = load_config(f"configs/coco-{task}-r50.yaml")
    model = build_model(cfg.model, things, stuff)
    head = model.update_heads[0]
    parts = {
        "feat_transform": count(head.feat_transform),
        "updator": count(head.updator),
        "attention": count(head.attention) + count(head.attention_norm),
        "ffn": count(head.ffn) + count(head.ffn_norm),
        "mask_branch": count(head.mask_fc) + count(head.mask_kernels),
    }
    assert parts == PER_STAGE
    assert count(head.cls_fc) + count(head.cls_logits) == cls_branch
    assert count(head) == sum(PER_STAGE.values()) + cls_branch
    assert len(model.update_heads) == 3
    assert all(count(h) == count(head) for h in model.update_heads)
    assert count(model.fuser) == 4_264_448
    kernel_head = model.kernel_head
    assert count(kernel_head.loc_conv) + count(kernel_head.sem_conv) == 132_096
    assert count(kernel_head.init_kernels) == 25_600
    num_classes = 80 if task == "instance" else 133
    assert count(kernel_head.conv_seg) == {80: 20_560, 133: 34_181}[num_classes]
    assert count(model.backbone) == 23_508_032


def test_semantic_model_has_one_kernel_per_class_and_no_class_branch():
    cfg = load_config(
        "configs/ade20k-semantic-r50.yaml", ["model.backbone.depth=18", "model.num_stages=1"]
    )
    model = build_model(cfg.model, 0, 150)
    assert model.update_heads[0].cls_logits is None
    out = model(torch.randn(1, 3, 64, 64))
    assert out.last.mask_logits.shape == (1, 150, 8, 8)


def test_class_split_errors_are_clear():
    cfg = tiny_config("panoptic")
    with pytest.raises(ValueError, match="thing category"):
        build_model(cfg.model, 0, 5)
    bad = tiny_config("panoptic", "model.num_groups=5")
    with pytest.raises(ValueError, match="model.num_groups"):
        build_model(bad.model, 2, 2)


def test_layer_zero_imports_no_orchestration():
    import subprocess
    import sys

    code = (
        "import sys, knet.model, knet.method.losses, knet.method.matcher, knet.method.postprocess\n"
        "import knet.config\n"
        "bad = [m for m in ('ray', 'mlflow', 'prefect', 'dvc') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_bf16_autocast_on_cuda_gives_finite_losses_and_fp32_group_features(task):
    from knet.model.heads import assemble_group_features

    cfg = tiny_config(task)
    model = build_model(cfg.model, NUM_THINGS, NUM_STUFF).cuda().train()
    criterion = KNetCriterion(cfg.loss, task, NUM_THINGS, NUM_STUFF)
    images, targets = synthetic_batch(task)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images.cuda())
        losses = criterion(out, [t.to("cuda") for t in targets])
        group = assemble_group_features(
            out.last.mask_logits, torch.randn(2, 32, 8, 8).cuda(), soft=task == "semantic"
        )
    assert group.dtype == torch.float32
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


def test_torchvision_checkpoint_loads_through_the_config(tmp_path):
    from knet.model.backbone import ResNet

    reference = ResNet(18)
    state = reference.state_dict()
    state["fc.weight"] = torch.zeros(1000, 512)  # torchvision checkpoints carry the classifier
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    cfg = tiny_config(
        "instance", "model.backbone.base_channels=64", f"model.backbone.weights={path}"
    )
    model = build_model(cfg.model, NUM_THINGS, NUM_STUFF)
    assert torch.equal(model.backbone.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    missing = tiny_config(
        "instance",
        "model.backbone.base_channels=64",
        f"model.backbone.weights={tmp_path / 'nope.pth'}",
    )
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model(missing.model, NUM_THINGS, NUM_STUFF)
