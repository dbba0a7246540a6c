"""The GPU fast path, checked where it can be on a CPU: host syncs, the device-side skip of a
non-finite step, channels-last and ``train.compile``. The CUDA checks are marked ``gpu``."""

from __future__ import annotations

import pytest
import torch

import knet.method.matcher
from knet.data.dataset import Batch
from knet.method.engine import accelerate, train_step
from knet.method.losses import KNetCriterion
from knet.method.optim import build_optimizer
from knet.model import build_model
from knet.syncs import HostSyncCounter, allowed_sync, strict_syncs
from tests.conftest import NUM_STUFF, NUM_THINGS, synthetic_batch, tiny_config

TASKS = ["panoptic", "instance", "semantic"]


def _setup(task: str, device: str = "cpu", *extra: str):
    cfg = tiny_config(task, *extra)
    model = build_model(cfg.model, NUM_THINGS, NUM_STUFF).to(device).train()
    criterion = KNetCriterion(cfg.loss, task, NUM_THINGS, NUM_STUFF)
    optimizer = build_optimizer(model, cfg.optim)
    images, targets = synthetic_batch(task)
    sizes = [tuple(images.shape[-2:])] * len(targets)
    batch = Batch(images, targets, sizes, sizes, list(range(len(targets))), [0, 1])
    return cfg, model, criterion, optimizer, batch.to(device)


def test_the_counter_sees_every_kind_of_host_sync():
    t = torch.arange(6.0) - 2
    with HostSyncCounter() as syncs:
        bool(t.sum() > 0)
        t[t > 0]
        t.nonzero()
        t.unique()
        t[torch.tensor([0, 1])]  # an integer index needs no sync: not counted
        with allowed_sync():
            t.max().item()  # intended: not counted
    assert dict(syncs.ops) == {"_local_scalar_dense": 1, "index": 1, "nonzero": 1, "_unique2": 1}


@pytest.mark.parametrize("task", TASKS)
def test_a_training_step_syncs_only_in_the_matchers_one_transfer(task, monkeypatch):
    cfg, model, criterion, optimizer, batch = _setup(task)
    transfers = []

    def counted(tensor):
        transfers.append(tuple(tensor.shape))
        return tensor.cpu()

    monkeypatch.setattr(knet.method.matcher, "to_host", counted)
    train_step(model, criterion, batch, optimizer, cfg.optim)  # optimizer state exists
    transfers.clear()
    with HostSyncCounter() as syncs:
        losses = train_step(model, criterion, batch, optimizer, cfg.optim)
    assert syncs.total == 0, dict(syncs.ops)
    assert float(losses["skipped"]) == 0.0
    if task == "semantic":
        assert transfers == []  # no matching
    else:
        # Every round's costs (stage 0 and each update round) in one (R, B, N, G) transfer.
        rounds = 1 + cfg.model.num_stages
        assert len(transfers) == 1 and transfers[0][:3] == (rounds, 2, cfg.model.num_kernels)


def test_a_non_finite_step_is_skipped_on_the_device_without_a_sync():
    cfg, model, criterion, optimizer, batch = _setup("panoptic")
    train_step(model, criterion, batch, optimizer, cfg.optim)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    steps = [float(s["step"]) for s in optimizer.state.values()]

    def poisoned(outputs, targets):
        return {k: v * float("nan") for k, v in criterion(outputs, targets).items()}

    with HostSyncCounter() as syncs:
        losses = train_step(model, poisoned, batch, optimizer, cfg.optim)
    assert syncs.total == 0, dict(syncs.ops)
    assert float(losses["skipped"]) == 1.0
    # Parameters, moments and step counts untouched (BatchNorm statistics move in any forward).
    for key, value in model.named_parameters():
        assert torch.equal(value, before[key]), key
    for state, moment in zip(optimizer.state.values(), moments, strict=True):
        assert torch.equal(state["exp_avg"], moment)
    assert [float(s["step"]) for s in optimizer.state.values()] == steps
    # The next finite step updates again.
    assert float(train_step(model, criterion, batch, optimizer, cfg.optim)["skipped"]) == 0.0
    assert not torch.equal(
        model.state_dict()["kernel_head.init_kernels.weight"],
        before["kernel_head.init_kernels.weight"],
    )


def test_channels_last_is_cuda_only():
    cfg, model, *_ = _setup("panoptic")
    assert accelerate(model, torch.device("cpu"), channels_last=True, compile=False) is False
    assert model.backbone.conv1.weight.is_contiguous()


@pytest.mark.slow
def test_compile_keeps_parameter_names_and_matches_eager():
    cfg, model, _, _, batch = _setup("panoptic")
    eager_keys = list(model.state_dict())
    compiled = build_model(cfg.model, NUM_THINGS, NUM_STUFF).train()
    compiled.load_state_dict(model.state_dict())
    accelerate(compiled, torch.device("cpu"), channels_last=False, compile=True)
    assert list(compiled.state_dict()) == eager_keys  # checkpoints are interchangeable
    with torch.no_grad():
        eager = model.eval()(batch.images).last.mask_logits
        fast = compiled.eval()(batch.images).last.mask_logits
    torch.testing.assert_close(fast, eager, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("task", TASKS)
def test_cuda_training_step_raises_on_no_sync_but_the_matchers(task):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg, model, criterion, optimizer, batch = _setup(task, "cuda")
    channels_last = accelerate(model, torch.device("cuda"), channels_last=True, compile=False)
    assert channels_last and model.backbone.conv1.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    batch.images = batch.images.contiguous(memory_format=torch.channels_last)
    train_step(model, criterion, batch, optimizer, cfg.optim)
    torch.cuda.synchronize()
    with strict_syncs():  # PyTorch raises on any synchronising CUDA call outside to_host
        losses = train_step(model, criterion, batch, optimizer, cfg.optim)
    assert float(losses["skipped"]) == 0.0


@pytest.mark.gpu
def test_the_loader_pins_batches_for_asynchronous_copies():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    *_, batch = _setup("panoptic")
    pinned = batch.pin_memory()
    assert pinned.images.is_pinned() and all(t.masks.is_pinned() for t in pinned.targets)
    assert all(t.labels_host is not None for t in pinned.to("cuda", non_blocking=True).targets)
