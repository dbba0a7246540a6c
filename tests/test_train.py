"""Training on real Ray Train and real MLflow (temporary sqlite), all on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knet.config import load_config
from knet.data.prepare import prepare
from knet.data.synth import generate
from knet.method.checkpoint import load_checkpoint
from knet.method.engine import NonFiniteLossError
from knet.training import TrainSetupError, faults, train
from tests.conftest import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]


def make_data(tmp: Path) -> Path:
    """A tiny synthetic dataset (8 + 4 images at 64 px), prepared, under ``tmp``."""
    cfg = load_config(
        ROOT / "params.yaml",
        [
            f"data.synth.out={tmp / 'raw'}",
            f"data.raw={tmp / 'raw'}",
            f"data.prepared={tmp / 'prepared'}",
            "data.synth.image_size=64",
            "data.synth.train_images=8",
            "data.synth.val_images=4",
        ],
    )
    generate(cfg.data.raw, cfg.data.synth, cfg.data, progress=False)
    prepare(cfg.data, progress=False)
    return tmp


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("train-data"))


def run_overrides(data: Path, tmp: Path, *extra: str) -> list[str]:
    """``--set`` items for a tiny run on ``data`` with every output under ``tmp``."""
    return [
        *TINY_OVERRIDES,
        f"data.raw={data / 'raw'}",
        f"data.prepared={data / 'prepared'}",
        "data.min_size=[64]",
        "data.max_size=64",
        "data.test_size=64",
        "data.num_workers=0",
        "train.batch_size=2",
        "optim.lr=0.001",
        "optim.warmup_iters=0",
        f"train.storage_path={tmp / 'ray'}",
        f"train.output={tmp / 'out' / 'model.pt'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.artifact_location={tmp / 'mlartifacts'}",
        *extra,
    ]


def run_config(data: Path, tmp: Path, *extra: str):
    return load_config(ROOT / "params.yaml", run_overrides(data, tmp, *extra))


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if ray.is_initialized():  # an instance another module's flow or stage left running
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_missing_prepared_data_fails_before_any_work(tmp_path):
    cfg = run_config(tmp_path, tmp_path)
    with pytest.raises(TrainSetupError, match="run `dvc repro prepare`"):
        train(cfg, root=tmp_path)


def test_unwritable_tracking_uri_fails_before_any_work(data, tmp_path):
    cfg = run_config(data, tmp_path, "tracking.uri=sqlite:////nonexistent/dir/mlflow.db")
    with pytest.raises(TrainSetupError, match="/nonexistent/dir"):
        train(cfg, root=tmp_path)
    cfg = run_config(data, tmp_path, "tracking.uri=http://127.0.0.1:9")
    with pytest.raises(TrainSetupError, match="not reachable"):
        train(cfg, root=tmp_path)


@pytest.mark.slow
def test_nan_losses_are_skipped_then_stop_with_the_last_good_checkpoint(
    data, tmp_path, monkeypatch
):
    cfg = run_config(
        data,
        tmp_path,
        "train.num_workers=0",
        "train.epochs=3",
        "train.max_bad_steps=2",
        "train.eval_every=10",
        "tracking.enabled=false",
    )
    monkeypatch.setenv(faults.ENV_VAR, json.dumps({"nan_from_epoch": 1}))
    with pytest.raises(NonFiniteLossError, match="train.max_bad_steps=2"):
        train(cfg, root=tmp_path)
    kept = load_checkpoint(tmp_path / "out" / "model.pt")
    assert kept["epoch"] == 1  # the last good one
    assert kept["history"][-1]["bad_steps"] == 0


@pytest.mark.ray
@pytest.mark.slow
def test_num_workers_beyond_the_cluster_is_refused(data, tmp_path, local_ray):
    cfg = run_config(data, tmp_path, "train.num_workers=8", "train.cpus_per_worker=1")
    with pytest.raises(TrainSetupError, match="needs 8 CPUs"):
        train(cfg, root=tmp_path)


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_train_track_and_resume(data, tmp_path, local_ray):
    import mlflow

    cfg = run_config(
        data,
        tmp_path,
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.epochs=2",
        "train.eval_every=2",
        "tracking.system_metrics_interval_s=0.2",  # a run of seconds
    )
    first = train(cfg, root=tmp_path, run_name="resume-test")
    assert first.epochs == 2
    history = json.loads((tmp_path / "metrics" / "train_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["loss"] < history[0]["loss"]
    assert "val_pq" in history[-1] and "val_miou" in history[-1]

    mlflow.set_tracking_uri(cfg.tracking.uri)
    run = mlflow.get_run(first.mlflow_run_id)
    assert run.data.params["model.num_stages"] == "2"
    for tag in ("git_commit", "git_dirty", "data_hash", "params_hash", "sys.torch"):
        assert tag in run.data.tags
    assert run.data.tags["params_hash"] == cfg.digest()
    losses = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2]
    # MLflow's system metrics, sampled during training
    assert "system/cpu_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)]
    assert "checkpoint" in artifacts and "kernel_maps" in artifacts

    # Rerunning the same run with more epochs continues after epoch 2, in the same MLflow run.
    more = run_config(
        data,
        tmp_path,
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.epochs=3",
        "train.eval_every=2",
    )
    second = train(more, root=tmp_path, run_name="resume-test")
    history = json.loads((tmp_path / "metrics" / "train_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert second.mlflow_run_id == first.mlflow_run_id
    assert load_checkpoint(tmp_path / "out" / "model.pt")["epoch"] == 3


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_latest_checkpoint(
    data, tmp_path, local_ray, monkeypatch
):
    cfg = run_config(
        data,
        tmp_path,
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.epochs=3",
        "train.eval_every=10",
        "train.max_failures=2",
        "tracking.enabled=false",
    )
    marker = tmp_path / "killed"
    kill = {"rank": 1, "epoch": 1, "step": 1, "marker": str(marker)}
    monkeypatch.setenv(faults.ENV_VAR, json.dumps({"kill": kill}))
    summary = train(cfg, root=tmp_path, run_name="kill-test")
    assert marker.exists()  # the worker really died once
    history = json.loads((tmp_path / "metrics" / "train_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]  # epoch 1 kept, epoch 2 redone once
    assert summary.epochs == 3


def test_unreachable_address_fails_with_a_message(data, tmp_path):
    cfg = run_config(data, tmp_path, "train.num_workers=1")
    with pytest.raises(TrainSetupError, match="cannot connect to the Ray cluster at '127.0.0.1:1'"):
        train(cfg, root=tmp_path, address="127.0.0.1:1")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "metric"), [("panoptic", "val_pq"), ("instance", "val_ap50"), ("semantic", "val_miou")]
)
def test_every_task_trains_through_the_same_command_and_its_metric_rises(
    data, tmp_path, task, metric
):
    # Validation on the training images: this checks that learning happens, not generalisation.
    cfg = run_config(
        data,
        tmp_path,
        f"model.task={task}",
        "train.num_workers=0",
        "train.epochs=12",
        "train.eval_every=1",
        "data.val_split=train",
        "data.flip_prob=0.0",
        "tracking.enabled=false",
    )
    summary = train(cfg, root=tmp_path)
    history = json.loads((tmp_path / "metrics" / "train_history.json").read_text())
    first, best = history[0][metric], max(h[metric] for h in history)
    assert best > first, f"{metric}: {[h[metric] for h in history]}"
    assert summary.final["epoch"] == 12


def test_elastic_group_and_bounded_placement_reach_ray_train(tmp_path):
    from knet.training import build_trainer

    fixed = run_config(tmp_path, tmp_path, "train.num_workers=2", "train.placement_retries=1")
    trainer = build_trainer({}, fixed, "fixed")
    assert trainer.scaling_config.num_workers == 2
    # Ray retries an unplaceable worker group forever by default; knet bounds it.
    assert trainer.run_config.failure_config.controller_failure_limit == 1
    elastic = run_config(tmp_path, tmp_path, "train.num_workers=4", "train.min_workers=2")
    assert build_trainer({}, elastic, "elastic").scaling_config.num_workers == (2, 4)


@pytest.mark.ray
@pytest.mark.slow
def test_an_elastic_group_is_checked_against_its_minimum(data, tmp_path, local_ray):
    # 2 CPUs here: 3 fixed workers never fit, an elastic 1..3 group may start with what fits.
    items = ("train.num_workers=3", "train.cpus_per_worker=1", "tracking.enabled=false")
    with pytest.raises(TrainSetupError, match=r"train.num_workers=3 .* needs 3 CPUs"):
        train(run_config(data, tmp_path, *items), root=tmp_path)
    summary = train(
        run_config(data, tmp_path, *items, "train.min_workers=1", "train.epochs=1"),
        root=tmp_path,
    )
    assert summary.epochs == 1 and 1 <= len(summary.worker_hosts) <= 2
    assert all(speed and speed > 0 for speed in summary.worker_images_per_s)


def test_a_resumed_schedule_follows_the_new_group_size():
    import torch

    from knet.method.optim import build_scheduler
    from knet.training import resume_schedule

    cfg = load_config(None, ["optim.lr_steps=[3]", "optim.warmup_iters=0"]).optim
    param = torch.nn.Parameter(torch.zeros(1))
    before = torch.optim.SGD([param], lr=1.0)
    two_workers = build_scheduler(before, cfg, iters_per_epoch=4)
    for _ in range(2 * 4):  # two epochs of 4 iterations
        before.step()
        two_workers.step()
    # One worker left: 8 iterations per epoch from here, resumed after epoch 2.
    after = torch.optim.SGD([param], lr=1.0)
    one_worker = build_scheduler(after, cfg, iters_per_epoch=8)
    one_worker.load_state_dict(two_workers.state_dict())
    resume_schedule(one_worker, epoch=2, iters_per_epoch=8)
    lrs = []
    for _ in range(2 * 8):  # epochs 3 and 4
        after.step()
        one_worker.step()
        lrs.append(after.param_groups[0]["lr"])
    # The 10x step at epoch 3 (0-based) lands after exactly one epoch of the new size.
    assert lrs[6] == pytest.approx(1.0) and lrs[7] == pytest.approx(0.1), lrs


def untrained_checkpoint(cfg, path: Path) -> Path:
    """An untrained model of ``cfg`` for its val split's classes, saved as a knet checkpoint
    (seed 0): what tests that need a loadable checkpoint but no learning use."""
    import torch

    from knet.data.dataset import build_dataset
    from knet.method.checkpoint import save_checkpoint
    from knet.model import build_model

    val = build_dataset(cfg.data, "val", "panoptic", train=False)
    torch.manual_seed(0)
    model = build_model(cfg.model, val.categories.num_things, val.categories.num_stuff)
    save_checkpoint(path, model, cfg, val.categories, epoch=0)
    return path


def test_quiet_training_draws_no_progress_bar_and_keeps_the_epoch_lines(data, tmp_path, capfd):
    """`knet train --quiet` (and every `knet tune` trial): no bars, whose lines a sweep's
    trials would stream through Ray's log monitor ten times a second each."""
    from knet.cli import main

    sets = run_overrides(
        data, tmp_path, "train.num_workers=0", "train.epochs=1", "tracking.enabled=false"
    )
    for quiet, bars in (([], True), (["--quiet"], False)):
        assert main(["train", "--params", str(ROOT / "params.yaml"), *quiet, "--set", *sets]) == 0
        out, err = capfd.readouterr()
        assert ("batch/s" in err or "s/batch" in err) is bars, err
        assert "epoch 1/1  loss" in out + err, out + err
