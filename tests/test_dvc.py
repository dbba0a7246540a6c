"""The DVC pipeline (synth, prepare, train, evaluate, ablate), run by real DVC in a temporary
git repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_dvc_repo, venv_env

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=venv_env(), capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


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
        num_stages=[1], num_kernels=[4, 8], scheduler="asha", overrides=["train.epochs=2"]
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    full = run(["dvc", "repro"], repo)
    assert "Running stage 'train'" in full and "Running stage 'evaluate'" in full
    assert "Running stage 'ablate'" in full
    shown = run(["dvc", "metrics", "show"], repo)
    assert "metrics/eval.json" in shown and "metrics/train.json" in shown
    assert (repo / "metrics" / "eval_per_class.csv").exists()
    assert (repo / "outputs" / "train" / "model.pt").exists()
    table = (repo / "reports" / "ablation.csv").read_text().splitlines()
    assert len(table) == 3 and table[0].startswith("trial_id,status,num_stages,num_kernels")
    assert (repo / "reports" / "ablation.png").exists()
    assert "| rounds \\ kernels | 4 | 8 |" in (repo / "reports" / "ablation.md").read_text()
    assert "Running stage" not in run(["dvc", "repro"], repo)
