"""The DVC pipelines (synth, prepare, train, evaluate in dvc.yaml; the ablation sweep in its
own pipelines/ablation/dvc.yaml), run by real DVC in a temporary git repository."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ABLATION_DVC_YAML, make_dvc_repo, venv_env

ROOT = Path(__file__).resolve().parents[1]


# DVC commits experiments to git refs: it needs an identity (CI has no global git config).
GIT_IDENTITY = {
    f"GIT_{who}_{what}": value
    for who in ("AUTHOR", "COMMITTER")
    for what, value in (("NAME", "knet ci"), ("EMAIL", "ci@example.com"))
}


def run(cmd: list[str], cwd: Path, stdout_only: bool = False) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=venv_env(**GIT_IDENTITY), capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout if stdout_only else out.stdout + out.stderr


@pytest.mark.slow
def test_repro_runs_skips_and_reruns_on_param_change(tmp_path):
    repo = make_dvc_repo(tmp_path, image_size=48, train_images=4, val_images=2)
    params = yaml.safe_load((repo / "params.yaml").read_text())

    first = run(["dvc", "repro", "prepare"], repo)
    assert "Running stage 'synth'" in first and "Running stage 'prepare'" in first
    assert (repo / "data" / "prepared" / "manifest.json").exists()
    assert (repo / "dvc.lock").exists()

    second = run(["dvc", "repro", "prepare"], repo)
    assert "Running stage" not in second

    params["data"]["synth"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(["dvc", "repro", "prepare"], repo)
    assert "Running stage 'synth'" in third and "Running stage 'prepare'" in third

    # The whole pipeline: train (Ray Train, MLflow in the repo's sqlite) then evaluate, and
    # the ablation sweep (Ray Tune with ASHA on a 1 x 2 grid).
    params["train"].update(epochs=2, eval_every=2)
    params["tune"].update(
        grid=[],
        design="product",
        seeds=1,
        num_stages=[1],
        num_kernels=[4, 8],
        scheduler="asha",
        overrides=["train.epochs=2"],
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    full = run(["dvc", "repro"], repo)
    assert "Running stage 'train'" in full and "Running stage 'evaluate'" in full
    assert "ablate'" not in full  # the sweep is a pipeline of its own
    assert not (repo / "reports" / "ablation.md").exists()
    sweep = run(["dvc", "repro", ABLATION_DVC_YAML], repo)
    assert f"Running stage '{ABLATION_DVC_YAML}:ablate'" in sweep
    assert "Running stage 'train'" not in sweep
    shown = run(["dvc", "metrics", "show"], repo)
    assert "metrics/eval.json" in shown and "metrics/train.json" in shown
    assert (repo / "metrics" / "eval_per_class.csv").exists()
    assert (repo / "outputs" / "train" / "model.pt").exists()
    table = (repo / "reports" / "ablation.csv").read_text().splitlines()
    assert len(table) == 3 and table[0].startswith("trial_id,status,num_stages,num_kernels")
    assert (repo / "reports" / "ablation.png").exists()
    assert "| rounds \\ kernels | 4 | 8 |" in (repo / "reports" / "ablation.md").read_text()
    assert "Running stage" not in run(["dvc", "repro"], repo)
    assert "Running stage" not in run(["dvc", "repro", ABLATION_DVC_YAML], repo)
    assert (repo / "pipelines" / "ablation" / "dvc.lock").exists()


# Each stage: the module its command runs (its knet imports are the stage's code deps).
STAGE_ENTRY = {
    "synth": "knet.data.synth",
    "prepare": "knet.data.prepare",
    "train": "knet.training",
    "evaluate": "knet.evaluation.evaluate",
    "ablate": "knet.experiments.tune",
}

IMPORTED_FILES = """
import importlib, json, os, sys
importlib.import_module(sys.argv[1])
root = os.getcwd()
print(json.dumps(sorted(
    os.path.relpath(m.__file__, root) for n, m in list(sys.modules.items())
    if n.startswith("knet") and getattr(m, "__file__", None)
)))
"""


def _stages() -> dict:
    """Every stage of the project's two pipelines (dvc.yaml and the ablation's own)."""
    stages = {}
    for name in ("dvc.yaml", ABLATION_DVC_YAML):
        stages.update(yaml.safe_load((ROOT / name).read_text())["stages"])
    return stages


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRY))
def test_stage_deps_are_the_modules_the_stage_runs(stage):
    """An edit of a module a stage does not run (the registry, the CLI, the flows) leaves the
    stage up to date; an edit of one it runs reruns it."""
    import json
    import sys

    deps = _stages()[stage]["deps"]
    code = [d for d in deps if d.startswith(("knet", "pipelines"))]
    out = subprocess.run(
        [sys.executable, "-c", IMPORTED_FILES, STAGE_ENTRY[stage]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    imported = json.loads(out.stdout)

    def covered(path: str) -> bool:
        return any(path == d or path.startswith(d.rstrip("/") + "/") for d in code)

    assert [f for f in imported if not covered(f)] == []  # nothing it runs is left out
    assert [d for d in code if not any(f == d or f.startswith(d + "/") for f in imported)] == []
    for elsewhere in ("knet/experiments/registry.py", "knet/cli.py", "pipelines/flows.py"):
        assert not covered(elsewhere)


def test_metrics_and_plots_are_defined_once_and_cached():
    """`dvc exp show` reads cached metrics of every experiment; a git-ignored `cache: false`
    metric showed `!`. The training history is one plot (the top-level definition)."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name in ("dvc.yaml", ABLATION_DVC_YAML):
        assert "cache: false" not in (ROOT / name).read_text()
    stage_plots = [p for s in _stages().values() for p in s.get("plots", [])]
    named = [next(iter(p)) if isinstance(p, dict) else p for p in stage_plots]
    top = [next(iter(p)) for p in pipeline["plots"]]
    assert not set(named) & set(top)
    assert "metrics/train_history.json" in top


@pytest.mark.slow
def test_two_experiments_read_back_with_exp_show(tmp_path):
    """`dvc exp run -S` twice, then `dvc exp show --json`, `dvc metrics diff`, `dvc plots diff`."""
    import json

    repo = make_dvc_repo(tmp_path, image_size=48, train_images=4, val_images=2)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    # One in-process epoch (no Ray), validated, so each experiment takes seconds.
    params["train"].update(epochs=1, eval_every=1, num_workers=0)
    params["optim"].update(lr_steps=[])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("mlflow.db\nmlartifacts/\noutputs/\n")
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)

    for name, stages in (("one-round", 1), ("two-rounds", 2)):
        # A plain `dvc exp run` (no target): the project's dvc.yaml, not the ablation sweep.
        cmd = ["dvc", "exp", "run", "-n", name, "-S", f"model.num_stages={stages}"]
        out = run(cmd, repo)
        assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
        assert "ablate'" not in out

    # A queued experiment runs in DVC's temporary workspace (.dvc/tmp/exps/...).
    run(
        ["dvc", "exp", "run", "--queue", "-n", "queued", "-S", "model.num_stages=3"],
        repo,
    )
    run(["dvc", "queue", "start"], repo)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo)
        if "Success" in status or "Failed" in status:
            break
        time.sleep(3)
    assert "Success" in status, status

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, stdout_only=True))
    experiments = {
        rev["name"]: rev["data"]
        for baseline in shown
        for exp in baseline.get("experiments") or []
        for rev in exp["revs"]
    }
    assert {"one-round", "two-rounds", "queued"} <= set(experiments)
    for name, stages in (("one-round", 1), ("two-rounds", 2), ("queued", 3)):
        data = experiments[name]
        assert data["params"]["params.yaml"]["data"]["model"]["num_stages"] == stages
        evaluated = data["metrics"]["metrics/eval.json"]["data"]
        trained = data["metrics"]["metrics/train.json"]["data"]
        assert isinstance(evaluated["pq"], float) and trained

    diff = run(["dvc", "metrics", "diff", "--all", "one-round", "two-rounds"], repo)
    assert "metrics/eval.json" in diff and "pq" in diff
    plots = json.loads(
        run(["dvc", "plots", "diff", "one-round", "two-rounds", "--json"], repo, stdout_only=True)
    )
    assert "metrics/train_history.json" in plots["data"]
    # The MLflow runs of all three, the queued one's too, are in the project's store.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    trained = [r for r in runs if r.data.tags.get("knet.kind") != "evaluation"]
    assert sorted(r.data.params["model.num_stages"] for r in trained) == ["1", "2", "3"]
    evaluations = [r for r in runs if r.data.tags.get("knet.kind") == "evaluation"]
    parents = {r.data.tags.get("mlflow.parentRunId") for r in evaluations}
    assert len(evaluations) == 3 and parents == {r.info.run_id for r in trained}


def test_a_dvc_temporary_workspace_keeps_the_projects_tracking_store(tmp_path):
    from knet.config import absolute_paths, load_config, project_root

    workspace = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    workspace.mkdir(parents=True)
    assert project_root(workspace) == tmp_path / "project"
    assert project_root(tmp_path) == tmp_path
    cfg = absolute_paths(load_config(ROOT / "params.yaml"), workspace)
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'project' / 'mlflow.db'}"
    assert cfg.tracking.artifact_location == str(tmp_path / "project" / "mlartifacts")
    assert cfg.data.prepared == str(workspace / "data" / "prepared")  # the experiment's own


def test_the_committed_lock_records_the_code_and_params_of_its_stages():
    """dvc.lock is committed (the data's record): when it still holds an older version of a
    stage's module or params, a fresh clone's `make pipeline` reruns the stage and leaves the
    checkout dirty, and every MLflow run it logs says git_dirty. Update it with `make
    data-lock` (`dvc repro synth prepare`) when the data stages' code changes; `make lint` runs
    this check."""
    import hashlib

    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stale = []
    for stage, entry in lock.items():
        code = {d["path"] for d in entry.get("deps", []) if d["path"].startswith("knet")}
        wanted = {d for d in stages[stage]["deps"] if d.startswith("knet")}
        stale += [f"{stage}: {path} (not in the lock)" for path in sorted(wanted - code)]
        for dep in entry.get("deps", []):
            path = ROOT / dep["path"]
            if path.is_file() and hashlib.md5(path.read_bytes()).hexdigest() != dep["md5"]:
                stale.append(f"{stage}: {dep['path']}")
        for key, recorded in entry.get("params", {}).get("params.yaml", {}).items():
            value = params
            for part in key.split("."):
                value = value[part]
            if value != recorded:
                stale.append(f"{stage}: params {key}")
    assert not stale, "dvc.lock is stale (run `make data-lock`, commit it): " + ", ".join(stale)
