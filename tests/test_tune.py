"""``knet tune``: the grid, the reports, and real Ray Tune sweeps with MLflow on sqlite."""

from __future__ import annotations

import csv
import json
import math
import urllib.request
from pathlib import Path

import pytest

from knet.ablation import cell_stats, write_reports
from knet.config import ConfigError, load_config
from knet.tune import default_sweep_name, grid_points, trial_config, tune
from tests.test_train import make_data, run_config

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ the grid


def test_grid_is_rounds_by_kernels_by_seeds_and_trials_get_the_point():
    cfg = load_config(
        ROOT / "params.yaml",
        ["tune.num_stages=[1,3,5]", "tune.num_kernels=[8,16]", "tune.seeds=2", "train.seed=7"],
    )
    points = grid_points(cfg)
    assert len(points) == 12
    assert {p["seed"] for p in points.values()} == {7, 8}
    trial = trial_config(cfg, {"num_stages": 5, "num_kernels": 8, "seed": 8}, Path("/sweep"))
    assert (trial.model.num_stages, trial.model.num_kernels, trial.train.seed) == (5, 8, 8)
    assert trial.train.eval_every == 1  # schedulers compare trials at every report
    assert trial.train.epochs == 5 and trial.optim.lr_steps == (4,)  # params.yaml's overrides
    assert trial.train.cpus_per_worker == 1
    assert trial.train.storage_path == "/sweep/train"
    assert trial.model.channels == cfg.model.channels  # everything else as in the params


def test_grid_and_override_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"tune\.num_stages\[1\] must be between 1 and 6"):
        load_config(ROOT / "params.yaml", ["tune.num_stages=[1,9]"])
    with pytest.raises(ConfigError, match="tune.num_kernels must list at least one value"):
        load_config(ROOT / "params.yaml", ["tune.num_kernels=[]"])
    with pytest.raises(ConfigError, match="tune.num_stages lists a value twice"):
        load_config(ROOT / "params.yaml", ["tune.num_stages=[2,2]"])
    point = {"num_stages": 1, "num_kernels": 8, "seed": 0}
    cfg = load_config(ROOT / "params.yaml", ["tune.overrides=[train.epochs=2, model.num_stagse=4]"])
    with pytest.raises(ConfigError, match=r"tune.overrides.*model.num_stagse is not a known key"):
        trial_config(cfg, point, Path())
    cfg = load_config(ROOT / "params.yaml", ["tune.overrides=[model.num_stages=4]"])
    with pytest.raises(ConfigError, match=r"tune.overrides\[0\] sets model.num_stages"):
        trial_config(cfg, point, Path())


def test_sweep_name_follows_params():
    base = load_config(ROOT / "params.yaml")
    same = load_config(ROOT / "params.yaml")
    other = load_config(ROOT / "params.yaml", ["tune.num_kernels=[8,32]"])
    assert default_sweep_name(base) == default_sweep_name(same)
    assert default_sweep_name(base) != default_sweep_name(other)
    assert default_sweep_name(base).startswith("ablation-panoptic-")


# ----------------------------------------------------------------------- the reports


def _row(stages, kernels, seed, value, status="finished", **extra):
    return {
        "trial_id": f"t{stages}{kernels}{seed}",
        "status": status,
        "num_stages": stages,
        "num_kernels": kernels,
        "seed": seed,
        "epochs": 4,
        "metric": "val_pq",
        "value": value,
        "params": 1_000_000 + 1000 * stages,
        "images_per_s": 20.0 + seed,
        "epochs_s": 100.0,
        "trial_s": 120.0,
        **extra,
    }


def test_reports_hold_mean_and_std_over_seeds_and_one_row_per_trial(tmp_path):
    rows = [
        _row(1, 8, 0, 40.0),
        _row(1, 8, 1, 44.0),
        _row(1, 16, 0, 45.0),
        _row(1, 16, 1, math.nan, status="error", error="RuntimeError: boom"),
        _row(3, 8, 0, 50.0),
        _row(3, 8, 1, 52.0),
        _row(3, 16, 0, math.nan, status="error", error="killed"),
        _row(3, 16, 1, math.nan, status="error", error="killed"),
    ]
    cells = cell_stats(rows, [1, 3], [8, 16])
    assert cells[1, 8].mean == pytest.approx(42.0)
    assert cells[1, 8].std == pytest.approx(math.sqrt(8.0))  # sample std of 40, 44
    assert cells[1, 16].values == (45.0,) and cells[1, 16].failed == 1
    assert cells[3, 16].values == () and math.isnan(cells[3, 16].mean)

    paths = write_reports(
        rows, tmp_path / "reports", metric="val_pq", num_stages=[1, 3], num_kernels=[8, 16]
    )
    with paths["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows)
    assert [r["status"] for r in table].count("error") == 3
    text = paths["md"].read_text()
    assert "| rounds \\ kernels | 8 | 16 |" in text
    assert "| 1 | 42.0 ± 2.8 | 45.0 (1 failed) |" in text
    assert "| 3 | 51.0 ± 1.4 | failed (2) |" in text
    assert "mean ± std over 2 seeds" in text
    assert "RuntimeError: boom" in text  # failed trials are listed with their error
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "reports").glob(".*.tmp"))  # written atomically


# ---------------------------------------------------------------- real Ray Tune


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("tune-data"))


@pytest.fixture(scope="module")
def ray_with_dashboard():
    """``knet tune`` starts a local Ray instance with the dashboard; shut it down after."""
    import ray

    yield
    ray.shutdown()


def sweep_config(data: Path, tmp: Path, *extra: str):
    return run_config(
        data,
        tmp,
        "train.cpus_per_worker=0.5",
        "tune.num_stages=[1,2]",
        "tune.num_kernels=[4,8]",
        "tune.overrides=[train.epochs=1]",
        f"tune.storage_path={tmp / 'tune'}",
        f"tune.report_dir={tmp / 'reports'}",
        *extra,
    )


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_survives_a_killed_and_a_failing_trial_then_restores(
    data, tmp_path, ray_with_dashboard
):
    import mlflow

    failing = tmp_path / "fail-while-this-exists"
    failing.touch()
    hooks = {
        "trials": [
            {  # a worker process dies once: Ray Train restarts the group (train.max_failures)
                "match": {"num_stages": 1, "num_kernels": 4},
                "hooks": {
                    "kill": {"rank": 0, "epoch": 0, "step": 1, "marker": str(tmp_path / "k")}
                },
            },
            {  # raises every time: the trial errors, the others carry on
                "match": {"num_stages": 2, "num_kernels": 8},
                "hooks": {"fail": {"epoch": 0, "while": str(failing)}},
            },
        ]
    }
    cfg = sweep_config(data, tmp_path, "train.max_failures=1", "tune.max_failures=0")
    first = tune(cfg, root=tmp_path, test_hooks=hooks)

    assert (tmp_path / "k").exists()  # the kill happened
    rows = {(r["num_stages"], r["num_kernels"]): r for r in first["rows"]}
    assert len(first["rows"]) == 4 and first["failed"] == 1 and not first["restored"]
    assert rows[2, 8]["status"] == "error" and "failing at epoch 0" in rows[2, 8]["error"]
    for key in ((1, 4), (1, 8), (2, 4)):
        assert rows[key]["status"] == "finished" and rows[key]["epochs"] == 1
        assert Path(rows[key]["checkpoint"]).is_file()
        assert math.isfinite(rows[key]["value"]) and rows[key]["params"] > 0
    assert rows[1, 4]["epochs_s"] < rows[1, 4]["trial_s"]
    with open(first["reports"]["csv"]) as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert "failed (1)" in Path(first["reports"]["md"]).read_text()

    # Every trial wrote TensorBoard events; the dashboard answered during the sweep.
    sweep = Path(first["path"])
    assert len(list(sweep.glob("*/events.out.tfevents.*"))) == 4
    from ray._private.worker import get_dashboard_url

    with urllib.request.urlopen(f"http://{get_dashboard_url()}/api/version", timeout=10) as r:
        assert r.status == 200

    # MLflow: one parent run for the sweep, one child run per trial with the grid params.
    mlflow.set_tracking_uri(cfg.tracking.uri)
    parent = mlflow.get_run(first["parent_run_id"])
    assert parent.info.status == "FAILED"  # a trial failed
    assert parent.data.metrics["trials_failed"] == 1
    artifacts = {
        a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "ablation")
    }
    assert artifacts == {"ablation/ablation.csv", "ablation/ablation.md", "ablation/ablation.png"}
    children = mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        output_format="list",
    )
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 3
    assert {(c.data.params["num_stages"], c.data.params["num_kernels"]) for c in finished} == {
        ("1", "4"),
        ("1", "8"),
        ("2", "4"),
    }
    history = mlflow.MlflowClient().get_metric_history(finished[0].info.run_id, "val_pq")
    assert [m.step for m in history] == [1]

    # Rerun the same sweep: restored; only the failed trial runs again.
    records = sweep / "knet_trials"
    before = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert len(before) == 3
    failing.unlink()
    second = tune(cfg, root=tmp_path, test_hooks=hooks)
    assert second["restored"] and second["failed"] == 0 and second["name"] == first["name"]
    after = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert len(after) == 4
    assert all(after[name] == stamp for name, stamp in before.items())  # not rerun
    assert mlflow.get_run(second["parent_run_id"]).info.status == "FINISHED"
    assert second["parent_run_id"] == first["parent_run_id"]
    children = mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
        "and attributes.status = 'FINISHED'",
        output_format="list",
    )
    assert len(children) == 4
    assert second["best"]["checkpoint"] and Path(second["best"]["checkpoint"]).is_file()


def test_a_reused_sweep_name_with_other_params_is_refused(data, tmp_path):
    from knet.train import TrainSetupError
    from knet.tune import _sweep_state, source_digest, sweep_digest

    cfg = sweep_config(data, tmp_path, "tune.name=mine", "tracking.enabled=false")
    sweep_dir = tmp_path / "tune" / "mine"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "knet_sweep.json").write_text(json.dumps({"digest": "0" * 12}))
    assert source_digest()
    with pytest.raises(TrainSetupError, match="tune.name=mine: the sweep in .* other params"):
        _sweep_state(sweep_dir, "mine", sweep_digest(cfg), cfg, tmp_path)


def test_an_explicit_set_wins_over_tune_overrides(tmp_path):
    """`knet tune --set train.epochs=1`: the sweep's own train.epochs=5 must not undo it."""
    from knet.config import load_config
    from knet.tune import explicit_overrides_win

    overrides = ["train.epochs=1", "optim.lr_steps=[]"]
    cfg = load_config(ROOT / "params.yaml", overrides)
    assert any(o.startswith("train.epochs=") for o in cfg.tune.overrides)
    cfg, dropped = explicit_overrides_win(cfg, overrides)
    assert dropped == ["train.epochs=5", "optim.lr_steps=[4]"]
    assert cfg.tune.overrides == ("train.cpus_per_worker=1",)
    trial = trial_config(cfg, {"num_stages": 1, "num_kernels": 8, "seed": 0}, tmp_path)
    assert (trial.train.epochs, trial.optim.lr_steps, trial.train.cpus_per_worker) == (1, (), 1.0)
    # Without an explicit key nothing is dropped.
    same, none = explicit_overrides_win(load_config(ROOT / "params.yaml"), [])
    assert none == [] and len(same.tune.overrides) == 3
