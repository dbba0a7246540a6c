"""Learning that stays working: a quality canary on the default data, and reproducibility.

The canary trains the embedded default (``params.yaml``: its model, data, loss and optimiser)
on the default synthetic dataset with a shortened schedule, in-process, and holds the val
split's PQ and PQ_th above floors measured with margin (docs/training.md, "Quality on the synthetic
data"). A change that breaks or destabilises learning (a loss term, an initialisation, the
matching, the schedule) fails here instead of being found by a user.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knet.config import load_config
from knet.data.prepare import prepare
from knet.data.synth import generate
from knet.training import train
from tests.test_train import make_data, run_config

ROOT = Path(__file__).resolve().parents[1]

# Shortened schedule of the default: CANARY_EPOCHS epochs with the LR decay before the last.
CANARY_EPOCHS = 4
# Seed 2 is the seed the official class weight (2.0) collapsed on: at this schedule it gives
# PQ 27.8 / PQ_th 0.5 there (seed 0 would pass at 49.9 / 29.2 and guard nothing).
CANARY_SEED = 2
# Measured 2026-12-02 at this schedule with the default recipe (README, "Quality on the
# synthetic data"): seeds 0, 1, 2 gave val PQ 55.7 / 48.0 / 49.6 and PQ_th 37.9 / 26.3 / 27.9.
# The floors sit 8-10 points under the lowest, so summation-order noise passes, while the
# collapse this canary guards against fails.
CANARY_FLOORS = {"val_pq": 40.0, "val_pq_th": 18.0}


@pytest.fixture(scope="module")
def default_data(tmp_path_factory) -> Path:
    """The default synthetic dataset (1,000 + 50 images at 128 px), prepared."""
    tmp = tmp_path_factory.mktemp("default-data")
    cfg = load_config(
        ROOT / "params.yaml",
        [f"data.synth.out={tmp / 'raw'}", f"data.raw={tmp / 'raw'}", f"data.prepared={tmp / 'p'}"],
    )
    generate(cfg.data.raw, cfg.data.synth, cfg.data, progress=False)
    prepare(cfg.data, progress=False)
    return tmp


def canary_overrides(data: Path, tmp: Path, seed: int, *extra: str) -> list[str]:
    return [
        f"data.raw={data / 'raw'}",
        f"data.prepared={data / 'p'}",
        f"train.seed={seed}",
        f"train.epochs={CANARY_EPOCHS}",
        f"optim.lr_steps=[{CANARY_EPOCHS - 1}]",
        f"train.eval_every={CANARY_EPOCHS}",
        "train.num_workers=0",
        "tracking.enabled=false",
        f"train.storage_path={tmp / 'ray'}",
        f"train.output={tmp / 'model.pt'}",
        f"train.metrics={tmp / 'train.json'}",
        *extra,
    ]


@pytest.mark.slow
def test_quality_canary_the_default_learns_things_and_stuff(default_data, tmp_path):
    """About 95 s on 2 cores: data (5 s), 4 epochs in-process, one validation."""
    seed = CANARY_SEED
    cfg = load_config(ROOT / "params.yaml", canary_overrides(default_data, tmp_path, seed))
    final = train(cfg, root=tmp_path).final
    shown = {k: round(final[k], 1) for k in ("val_pq", "val_pq_th", "val_pq_st", "val_ap")}
    for key, floor in CANARY_FLOORS.items():
        assert final[key] >= floor, f"seed {seed}: {key} {final[key]:.1f} < floor {floor}: {shown}"


@pytest.mark.ray
def test_the_same_seed_gives_the_same_metrics_in_process_and_on_ray_train(tmp_path):
    """Two epochs on tiny data, validated: identical numbers both ways (same torch threads,
    loader, seed), so a number measured in-process is the number `knet train` gives."""
    data = make_data(tmp_path / "data")
    results = []
    for workers in (0, 1):
        out = tmp_path / f"w{workers}"
        cfg = run_config(
            data,
            out,
            f"train.num_workers={workers}",
            "train.cpus_per_worker=2",
            "tracking.enabled=false",
            "train.seed=3",
            "train.epochs=2",
            "optim.lr_steps=[]",
            "train.eval_every=2",
            f"train.metrics={out / 'train.json'}",
        )
        train(cfg, root=out)
        results.append(json.loads((out / "train.json").read_text()))
    plain, ray = results
    for key in ("loss", "val_pq", "val_pq_th", "val_pq_st", "val_ap", "val_miou"):
        assert plain[key] == ray[key], (key, plain[key], ray[key])
