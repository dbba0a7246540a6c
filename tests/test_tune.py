"""``knet tune``: the grid, the reports, and real Ray Tune sweeps with MLflow on sqlite."""

from __future__ import annotations

import csv
import json
import math
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from knet.config import ConfigError, load_config
from knet.experiments.ablation import cell_stats, compare, write_reports
from knet.experiments.tune import (
    base_values,
    default_sweep_name,
    grid_axes,
    grid_points,
    trial_config,
    tune,
)
from knet.training import faults
from tests.test_train import make_data, run_config

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ the grid


def test_grid_is_rounds_by_kernels_by_seeds_and_trials_get_the_point():
    cfg = load_config(
        ROOT / "params.yaml",
        [
            "tune.grid=[]",
            "tune.design=product",
            "tune.num_stages=[1,3,5]",
            "tune.num_kernels=[8,16]",
            "tune.seeds=2",
            "train.seed=7",
            "train.epochs=3",  # a single run's schedule: the sweep's overrides replace it
            "optim.lr_steps=[2]",
        ],
    )
    points = grid_points(cfg)
    assert len(points) == 12
    assert {p["seed"] for p in points.values()} == {7, 8}
    assert points[5, 16, 8] == {"model.num_stages": 5, "model.num_kernels": 16, "seed": 8}
    trial = trial_config(cfg, {"num_stages": 5, "num_kernels": 8, "seed": 8}, Path("/sweep"))
    assert (trial.model.num_stages, trial.model.num_kernels, trial.train.seed) == (5, 8, 8)
    assert trial.train.eval_every == 1  # schedulers compare trials at every report
    assert trial.train.epochs == 8 and trial.optim.lr_steps == (6,)  # params.yaml's overrides
    assert trial.train.cpus_per_worker == 1 and trial.data.num_workers == 0
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


def test_a_grid_over_any_keys_sets_them_in_each_trial():
    grid = [
        "model.num_stages=1,3",
        "model.kernel_interaction=true,false",
        "data.min_size=[96],[112,144]",
    ]
    sets = ["tune.seeds=2", f"tune.grid={json.dumps(grid)}", "tune.design=product"]
    sets.append("train.epochs=3")  # a single run's: tune.overrides replace it in the trials
    cfg = load_config(ROOT / "params.yaml", sets)
    axes = grid_axes(cfg)
    assert axes == {
        "model.num_stages": (1, 3),
        "model.kernel_interaction": (True, False),
        "data.min_size": ([96], [112, 144]),
    }
    points = grid_points(cfg)
    assert len(points) == 2 * 2 * 2 * 2
    point = points[3, False, (112, 144), 1]
    assert point == {
        "model.num_stages": 3,
        "model.kernel_interaction": False,
        "data.min_size": [112, 144],
        "seed": 1,
    }
    trial = trial_config(cfg, point, Path("/sweep"))
    assert (trial.model.num_stages, trial.model.kernel_interaction) == (3, False)
    assert trial.data.min_size == (112, 144) and trial.train.seed == 1
    assert trial.model.num_kernels == cfg.model.num_kernels  # not swept: the params' value
    assert trial.train.epochs == 8  # tune.overrides still apply
    # the reference cell is the params' own values (after tune.overrides)
    assert base_values(cfg, axes) == {
        "model.num_stages": 3,
        "model.kernel_interaction": True,
        "data.min_size": list(cfg.data.min_size),
    }


def test_one_at_a_time_varies_each_key_alone_around_the_params_values():
    grid = [
        "model.num_stages=1,2,3,4",
        "model.num_kernels=4,8,16",
        "model.kernel_updater=adaptive,none",
    ]
    sets = [f"tune.grid={json.dumps(grid)}", "tune.design=one_at_a_time", "tune.seeds=2"]
    cfg = load_config(ROOT / "params.yaml", [*sets, "model.num_stages=3", "model.num_kernels=16"])
    points = grid_points(cfg)
    cells = list(dict.fromkeys(key[:-1] for key in points))
    # the reference once, then each key's other values with the rest at the reference
    assert cells == [
        (1, 16, "adaptive"),
        (2, 16, "adaptive"),
        (3, 16, "adaptive"),
        (4, 16, "adaptive"),
        (3, 4, "adaptive"),
        (3, 8, "adaptive"),
        (3, 16, "none"),
    ]
    assert len(points) == 7 * 2  # instead of 4 x 3 x 2 cells
    trial = trial_config(cfg, points[3, 4, "adaptive", 1], Path("/sweep"))
    assert (trial.model.num_stages, trial.model.num_kernels, trial.train.seed) == (3, 4, 1)
    # the reference must be a value of every key, or there is nothing to vary around
    off = load_config(ROOT / "params.yaml", [*sets, "model.num_kernels=32"])
    with pytest.raises(ConfigError, match=r"tune\.grid\[1\]: .*model\.num_kernels.*32"):
        grid_points(off)
    with pytest.raises(ConfigError, match="tune.design"):
        load_config(ROOT / "params.yaml", ["tune.design=latin"])


def test_one_at_a_time_reports_one_table_per_key_and_compare_with_the_reference(tmp_path):
    axes = {"model.num_stages": [1, 3, 4], "model.num_kernels": [8, 16]}
    means = {(1, 16): 20.0, (3, 16): 50.0, (4, 16): 51.0, (3, 8): 45.0}
    rows = [
        _row(stages, kernels, seed, value + seed)
        for (stages, kernels), value in means.items()
        for seed in (0, 1, 2)
    ]
    paths = write_reports(
        rows, tmp_path, metric="val_pq", axes=axes, reference=(3, 16), design="one_at_a_time"
    )
    text = paths["md"].read_text()
    assert "| rounds | 1 | 3* | 4 |" in text  # kernels at the reference, 16
    assert "| | 21.0 ± 1.0 | 51.0 ± 1.0 | 52.0 ± 1.0 |" in text
    assert "| kernels | 8 | 16* |" in text
    line = next(t for t in text.splitlines() if t.startswith("| rounds 1, kernels 16 |"))
    assert "-30.0" in line and line.rstrip().endswith("| yes | 0 / 3 | 0.250 |")
    assert "rounds 1, kernels 8" not in text  # no cell off the reference on two keys
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (["model.num_stagse=1,2"], r"tune\.grid\[0\]: model\.num_stagse is not a known key"),
        (["model.num_stages=1,9"], r"tune\.grid\[0\]: model\.num_stages must be between 1 and 6"),
        (
            ["model.kernel_updater=adaptive,gated"],
            r"tune\.grid\[0\]: model\.kernel_updater must be one of",
        ),
        (["model.num_stages=1,1"], r"tune\.grid\[0\]: model\.num_stages lists a value twice"),
        (["train.seed=1,2"], r"tune\.grid\[0\]: seeds are tune\.seeds"),
        (["train.epochs=1,2"], r"tune\.grid\[0\]: train\.epochs is also set by tune\.overrides"),
        (
            ["model.num_stages=1", "model.num_stages=2"],
            r"tune\.grid\[1\]: model\.num_stages is listed twice",
        ),
    ],
)
def test_grid_errors_name_the_item_and_key(grid, message):
    cfg = load_config(ROOT / "params.yaml", [f"tune.grid={json.dumps(grid)}"])
    with pytest.raises(ConfigError, match=message):
        grid_axes(cfg)


def test_a_grid_key_given_on_the_command_line_wins_over_tune_overrides():
    from knet.experiments.tune import command_line_sweep

    grid = ["train.epochs=1,2"]
    cfg, notes = command_line_sweep(load_config(ROOT / "params.yaml"), [], grid)
    assert notes[0] == "--set / --grid win over tune.overrides: not applying train.epochs=8"
    assert grid_axes(cfg) == {"train.epochs": (1, 2)}
    # a command-line grid is a grid: every combination, unless --set tune.design says otherwise
    assert cfg.tune.design == "product" and "tune.design product" in notes[1]
    kept, _ = command_line_sweep(
        load_config(ROOT / "params.yaml", ["tune.design=one_at_a_time"]),
        ["tune.design=one_at_a_time"],
        ["model.num_stages=1,3", "model.num_kernels=8,16"],
    )
    assert kept.tune.design == "one_at_a_time"
    assert len(grid_points(kept)) == 3 * kept.tune.seeds  # 3 cells


def test_rounds_and_kernels_on_the_command_line_replace_the_params_grid_and_say_so():
    from knet.experiments.tune import command_line_sweep

    sets = ["tune.num_stages=[1,2]", "tune.seeds=1"]
    params = load_config(ROOT / "params.yaml", sets)
    assert params.tune.grid  # the params' default sweep is a grid over three keys
    cfg, notes = command_line_sweep(params, sets)
    assert cfg.tune.grid == () and cfg.tune.design == "product"
    assert grid_axes(cfg) == {"model.num_stages": (1, 2), "model.num_kernels": (8, 16)}
    assert notes[0].startswith("tune.num_stages given: sweeping rounds x kernels instead of")
    assert "model.kernel_updater=adaptive,none" in notes[0]
    # nothing to say when the command line leaves the sweep as the params have it
    same, none = command_line_sweep(params, ["tune.seeds=1"])
    assert none == [] and same.tune == params.tune


def test_grid_items_must_be_key_equals_values():
    with pytest.raises(ConfigError, match=r"tune\.grid\[0\] must look like dotted\.key=v1,v2"):
        load_config(ROOT / "params.yaml", ['tune.grid=["model.num_stages"]'])


def test_a_trial_refuses_to_run_code_other_than_its_sweeps():
    """A trial imports knet afresh when it starts: after an edit of the checkout mid-sweep it
    would train other code than the trials before it, so it fails instead of mixing."""
    from knet.experiments.tune import source_digest, trial_driver

    payload = {"source": "0" * 12, "config": {}, "sweep_dir": "/nowhere", "faults": []}
    assert source_digest() != payload["source"]
    with pytest.raises(RuntimeError, match="knet's source changed since this sweep started"):
        trial_driver({"cell": {}, "seed": 0}, payload)


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
    axes = {"model.num_stages": [1, 3], "model.num_kernels": [8, 16]}
    cells = cell_stats(rows, axes)
    assert cells[1, 8].mean == pytest.approx(42.0)
    assert cells[1, 8].std == pytest.approx(math.sqrt(8.0))  # sample std of 40, 44
    assert cells[1, 16].values == (45.0,) and cells[1, 16].failed == 1
    assert cells[3, 16].values == () and math.isnan(cells[3, 16].mean)

    paths = write_reports(rows, tmp_path / "reports", metric="val_pq", axes=axes)
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


def test_cells_carry_95_percent_intervals_and_pair_with_the_reference_by_seed(tmp_path):
    from scipy import stats

    reference = [50.0, 52.0, 51.0, 49.0]
    better = [55.0, 56.5, 55.0, 54.0]  # +5.0, +4.5, +4.0, +5.0: small spread, significant
    noisy = [60.0, 40.0, 58.0, 41.0]  # same mean as the reference +0.75, huge spread
    rows = [_row(3, 16, s, v) for s, v in enumerate(reference)]
    rows += [_row(4, 16, s, v) for s, v in enumerate(better)]
    rows += [_row(1, 16, s, v) for s, v in enumerate(noisy)]
    axes = {"model.num_stages": [1, 3, 4], "model.num_kernels": [16]}
    cells = cell_stats(rows, axes)
    ref = cells[3, 16]
    # 95% t interval of the mean: t(0.975, 3) * sd / sqrt(4)
    half = stats.t.ppf(0.975, 3) * stats.tstd(reference) / 2
    assert ref.interval == pytest.approx((50.5 - half, 50.5 + half))
    up = compare(cells[4, 16], ref)
    assert up.pairs == 4 and up.difference == pytest.approx(4.625)
    assert up.p_value == pytest.approx(stats.ttest_rel(better, reference).pvalue)
    assert up.significant and up.low > 0
    flat = compare(cells[1, 16], ref)
    assert not flat.significant and flat.low < 0 < flat.high
    # seeds are paired: a cell missing seed 0 compares over seeds 1-3 only
    partial = cell_stats([r for r in rows if not (r["num_stages"] == 4 and r["seed"] == 0)], axes)
    assert compare(partial[4, 16], partial[3, 16]).pairs == 3

    paths = write_reports(rows, tmp_path, metric="val_pq", axes=axes, reference=(3, 16))
    text = paths["md"].read_text()
    assert "against rounds 3, kernels 16 (paired by seed)" in text
    assert "| rounds 3, kernels 16 (reference) | 4 | 50.5 ± 1.3 |" in text
    line = next(t for t in text.splitlines() if t.startswith("| rounds 4, kernels 16 |"))
    assert "+4.6" in line and line.rstrip().endswith("| yes | 4 / 0 | 0.125 |")
    line = next(t for t in text.splitlines() if t.startswith("| rounds 1, kernels 16 |"))
    noisy_rank = stats.wilcoxon(np.subtract(noisy, reference)).pvalue
    assert line.rstrip().endswith(f"| no | 2 / 2 | {noisy_rank:.3f} |")


def test_a_collapse_on_one_seed_is_one_rank_in_the_signed_rank_test():
    """One round loses to three on every one of 6 seeds, once by a collapse: the t interval is
    wide (not significant), the signed-rank test counts six losses (p = 2 / 2^6)."""
    from scipy import stats

    three = [52.5, 49.9, 52.0, 46.8, 45.3, 46.8]
    one = [15.4, 48.8, 48.1, 43.7, 42.4, 44.8]
    rows = [_row(3, 16, s, v) for s, v in enumerate(three)]
    rows += [_row(1, 16, s, v) for s, v in enumerate(one)]
    cells = cell_stats(rows, {"model.num_stages": [1, 3], "model.num_kernels": [16]})
    diff = compare(cells[1, 16], cells[3, 16])
    assert (diff.better, diff.worse) == (0, 6)
    assert not diff.significant and diff.p_value > 0.1
    assert diff.rank_p_value == pytest.approx(2 / 2**6)
    assert diff.rank_p_value == pytest.approx(stats.wilcoxon(np.subtract(one, three)).pvalue)


def test_a_one_seed_sweep_shows_the_bootstrap_interval_over_images(tmp_path):
    rows = [
        _row(1, 8, 0, 40.0, value_low=35.5, value_high=44.25),
        _row(3, 8, 0, 50.0, value_low=46.0, value_high=53.0),
    ]
    axes = {"model.num_stages": [1, 3], "model.num_kernels": [8]}
    cells = cell_stats(rows, axes)
    assert cells[1, 8].bootstrap == (35.5, 44.25) and math.isnan(cells[1, 8].half_width)
    paths = write_reports(rows, tmp_path, metric="val_pq", axes=axes, reference=(3, 8))
    text = paths["md"].read_text()
    assert "| rounds 3, kernels 8 (reference) | 1 | 50.0 ± 0.0 | [46.0, 53.0] b |" in text
    line = next(t for t in text.splitlines() if t.startswith("| rounds 1, kernels 8 |"))
    assert "[35.5, 44.2] b" in line and "-10.0" in line
    assert line.rstrip().endswith("(1 seed) | 0 / 1 | — |")
    with paths["csv"].open() as handle:
        assert [r["value_low"] for r in csv.DictReader(handle)] == ["35.5", "46.0"]


def test_reports_of_a_grid_over_other_keys(tmp_path):
    rows = []
    for i, (stages, interaction) in enumerate([(1, True), (1, False), (3, True), (3, False)]):
        for seed in (0, 1):
            row = _row(stages, 16, seed, 40.0 + 5 * i + seed)
            row["model.kernel_interaction"] = interaction
            row["model.kernel_updater"] = "adaptive"
            rows.append(row)
    axes = {
        "model.num_stages": [1, 3],
        "model.kernel_interaction": [True, False],
        "model.kernel_updater": ["adaptive"],
    }
    paths = write_reports(
        rows, tmp_path, metric="val_pq", axes=axes, reference=(3, True, "adaptive")
    )
    with paths["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert table[0]["model.kernel_interaction"] in ("True", "False")
    text = paths["md"].read_text()
    assert (
        "# K-Net ablation: kernel-update rounds x model.kernel_interaction x model.kernel_updater"
        in text
    )
    # three axes: one row per cell
    assert "| rounds | model.kernel_interaction | model.kernel_updater | value |" in text
    assert "| 3 | false | adaptive | 55.5 ± 0.7 |" in text
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
        "tune.grid=[]",
        "tune.design=product",
        "tune.seeds=1",
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
    data, tmp_path, ray_with_dashboard, monkeypatch
):
    import mlflow

    failing = tmp_path / "fail-while-this-exists"
    failing.touch()
    hooks = {
        "trials": [
            {  # a worker process dies once: Ray Train restarts the group (train.max_failures)
                "match": {"num_stages": 1, "num_kernels": 4},
                "faults": {
                    "kill": {"rank": 0, "epoch": 0, "step": 1, "marker": str(tmp_path / "k")}
                },
            },
            {  # raises every time: the trial errors, the others carry on
                "match": {"num_stages": 2, "num_kernels": 8},
                "faults": {"fail": {"epoch": 0, "while": str(failing)}},
            },
        ]
    }
    cfg = sweep_config(data, tmp_path, "train.max_failures=1", "tune.max_failures=0")
    monkeypatch.setenv(faults.ENV_VAR, json.dumps(hooks))
    first = tune(cfg, root=tmp_path)

    assert (tmp_path / "k").exists()  # the kill happened
    rows = {(r["num_stages"], r["num_kernels"]): r for r in first.rows}
    assert len(first.rows) == 4 and first.failed == 1 and not first.restored
    assert rows[2, 8]["status"] == "error" and "failing at epoch 0" in rows[2, 8]["error"]
    for key in ((1, 4), (1, 8), (2, 4)):
        assert rows[key]["status"] == "finished" and rows[key]["epochs"] == 1
        assert Path(rows[key]["checkpoint"]).is_file()
        assert math.isfinite(rows[key]["value"]) and rows[key]["params"] > 0
    assert rows[1, 4]["epochs_s"] < rows[1, 4]["trial_s"]
    with open(first.reports["csv"]) as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert "failed (1)" in Path(first.reports["md"]).read_text()

    # Every trial wrote TensorBoard events; the dashboard answered during the sweep.
    sweep = Path(first.path)
    assert len(list(sweep.glob("*/events.out.tfevents.*"))) == 4
    from ray._private.worker import get_dashboard_url

    with urllib.request.urlopen(f"http://{get_dashboard_url()}/api/version", timeout=10) as r:
        assert r.status == 200
    # Its Train tab lists every trial's Train run and their workers (Ray Train's state actor).
    url = f"http://{get_dashboard_url()}/api/train/v2/runs/v1"
    with urllib.request.urlopen(url, timeout=30) as r:
        runs = json.loads(r.read())["train_runs"]
    names = {run["name"] for run in runs}
    assert {f"trial-{row['trial_id']}" for row in first.rows} <= names
    assert all(run["attempts"] and run["attempts"][0]["workers"] for run in runs)

    # MLflow: one parent run for the sweep, one child run per trial with the grid params.
    mlflow.set_tracking_uri(cfg.tracking.uri)
    parent = mlflow.get_run(first.parent_run_id)
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
    second = tune(cfg, root=tmp_path)
    assert second.restored and second.failed == 0 and second.name == first.name
    after = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert len(after) == 4
    assert all(after[name] == stamp for name, stamp in before.items())  # not rerun
    assert mlflow.get_run(second.parent_run_id).info.status == "FINISHED"
    assert second.parent_run_id == first.parent_run_id
    children = mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
        "and attributes.status = 'FINISHED'",
        output_format="list",
    )
    assert len(children) == 4
    assert second.best["checkpoint"] and Path(second.best["checkpoint"]).is_file()


def test_a_reused_sweep_name_with_other_params_is_refused(data, tmp_path):
    from knet.experiments.tune import _sweep_state, source_digest, sweep_digest
    from knet.training import TrainSetupError

    cfg = sweep_config(data, tmp_path, "tune.name=mine", "tracking.enabled=false")
    sweep_dir = tmp_path / "tune" / "mine"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "knet_sweep.json").write_text(json.dumps({"digest": "0" * 12}))
    assert source_digest()
    with pytest.raises(TrainSetupError, match="tune.name=mine: the sweep in .* other params"):
        _sweep_state(sweep_dir, "mine", sweep_digest(cfg), cfg, tmp_path)


def test_an_explicit_set_wins_over_tune_overrides(tmp_path):
    """`knet tune --set train.epochs=1`: the sweep's own train.epochs=8 must not undo it."""
    from knet.config import load_config
    from knet.experiments.tune import explicit_overrides_win

    overrides = ["train.epochs=1", "optim.lr_steps=[]"]
    cfg = load_config(ROOT / "params.yaml", overrides)
    assert any(o.startswith("train.epochs=") for o in cfg.tune.overrides)
    cfg, dropped = explicit_overrides_win(cfg, overrides)
    assert dropped == ["train.epochs=8", "optim.lr_steps=[6]"]
    assert cfg.tune.overrides == ("train.cpus_per_worker=1", "data.num_workers=0")
    trial = trial_config(cfg, {"model.num_stages": 1, "model.num_kernels": 8, "seed": 0}, tmp_path)
    assert (trial.train.epochs, trial.optim.lr_steps, trial.train.cpus_per_worker) == (1, (), 1.0)
    # Without an explicit key nothing is dropped.
    params = load_config(ROOT / "params.yaml")
    same, none = explicit_overrides_win(params, [])
    assert none == [] and same.tune.overrides == params.tune.overrides
    assert len(same.tune.overrides) == 4


# --------------------------------------------------------------- pooling finished sweeps


def _sweep_csv(folder: Path, seeds: range, value) -> Path:
    """An ablation.csv as `knet tune --grid model.num_stages=1,3` writes it, for ``seeds``."""
    axes = {"model.num_stages": [1, 3]}
    rows = [_row(s, 16, seed, value(s, seed)) for s in (1, 3) for seed in seeds]
    return write_reports(rows, folder, metric="val_pq", axes=axes)["csv"]


def test_read_rows_gives_back_the_rows_written():
    from knet.experiments.ablation import read_rows, render_csv

    rows = [_row(1, 8, 0, 40.5, **{"optim.lr_steps": [3]}), _row(3, 8, 1, math.nan, "error")]
    axes = {"model.num_stages": [1, 3], "optim.lr_steps": [[3]]}
    path = Path(__import__("tempfile").mkdtemp()) / "ablation.csv"
    path.write_text(render_csv(rows, axes))
    back = read_rows(path)
    assert back[0]["value"] == 40.5 and back[0]["seed"] == 0 and back[0]["optim.lr_steps"] == [3]
    assert back[1]["status"] == "error" and back[1]["value"] is None
    assert back[0]["trial_id"] == "t180" and back[0]["num_stages"] == 1


def test_tune_pool_joins_sweeps_of_other_seeds_into_one_paired_report(tmp_path, monkeypatch):
    """Seeds 0-2 and 3-7 of the same grid, pooled: 8 seeds per cell, paired, no training."""
    from knet.cli import main
    from knet.experiments.ablation import read_rows

    monkeypatch.chdir(tmp_path)
    first = _sweep_csv(tmp_path / "a", range(3), lambda s, seed: 40.0 + 3 * s + seed)
    second = _sweep_csv(tmp_path / "b", range(3, 8), lambda s, seed: 40.0 + 3 * s + seed % 3)
    grid = ["--grid", "model.num_stages=1,3"]
    params = ["--params", str(ROOT / "params.yaml"), "--set", "tune.report_dir=pooled"]
    assert main(["tune", *params, *grid, "--pool", str(first), str(second)]) == 0
    table = list(csv.DictReader((tmp_path / "pooled" / "ablation.csv").open()))
    assert sorted({int(r["seed"]) for r in table}) == list(range(8)) and len(table) == 16
    text = (tmp_path / "pooled" / "ablation.md").read_text()
    assert "mean ± std over 8 seeds" in text and "(6 trials)" in text and "(10 trials)" in text
    assert "seeds 0, 1, 2, 3, 4, 5, 6, 7" in text
    stats = cell_stats(
        read_rows(tmp_path / "pooled" / "ablation.csv"), {"model.num_stages": [1, 3]}
    )
    assert stats[(3,)].mean - stats[(1,)].mean == pytest.approx(6.0)  # paired: +6 every seed


def test_tune_pool_refuses_what_would_count_twice_or_lose_a_file(tmp_path, monkeypatch, capsys):
    from knet.cli import main

    monkeypatch.chdir(tmp_path)
    first = _sweep_csv(tmp_path / "a", range(3), lambda s, seed: 40.0)
    again = _sweep_csv(tmp_path / "b", range(2, 4), lambda s, seed: 41.0)  # seed 2 twice
    params = ["--params", str(ROOT / "params.yaml"), "--grid", "model.num_stages=1,3"]
    out = ["--set", "tune.report_dir=pooled"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    assert main(["tune", *params, *out, "--pool", str(first), str(again)]) == 2
    assert "has seed 2 of a cell that" in capsys.readouterr().err
    # Another grid than the sweeps ran: a trial outside its cells.
    other = ["--params", str(ROOT / "params.yaml"), "--grid", "model.num_stages=2,3", *out]
    assert main(["tune", *other, "--pool", str(first)]) == 2
    assert "is not a cell of the grid model.num_stages" in capsys.readouterr().err
    # Pooling into the folder of an input would replace that input.
    into = ["--set", f"tune.report_dir={tmp_path / 'a'}"]
    assert main(["tune", *params, *into, "--pool", str(first)]) == 2
    assert "the pooled report would replace it" in capsys.readouterr().err
    assert main(["tune", *params, *out, "--pool", "missing.csv"]) == 2
    assert "missing.csv: no such file" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert main(["tune", *params, *out, "--pool", "bad.csv"]) == 2
    assert "not an ablation.csv of knet tune" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert {p: b for p, b in after.items() if p.name != "bad.csv"} == before
    assert not (tmp_path / "pooled").exists()
