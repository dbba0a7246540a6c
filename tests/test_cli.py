"""The ``knet`` console script as users call it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def knet(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("knet", path=str(Path(sys.executable).parent))
    assert exe, "the knet console script is not installed next to this python"
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)


def test_help_lists_the_commands():
    out = knet("--help")
    assert out.returncode == 0
    for command in ("config", "model", "data", "train", "tune", "evaluate", "predict"):
        assert command in out.stdout
    tune = knet("tune", "--help")
    assert tune.returncode == 0 and "--address" in tune.stdout and "--set" in tune.stdout


def test_config_show_prints_the_resolved_config_with_overrides():
    out = knet("config", "show", "--set", "model.num_stages=4")
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["model"]["num_stages"] == 4
    assert shown["model"]["num_kernels"] == 16  # from params.yaml


def test_one_set_takes_several_overrides_and_set_repeats():
    out = knet(
        "config",
        "show",
        "--set",
        "model.num_stages=2",
        "train.epochs=5",
        "--set",
        "model.num_kernels=8",
    )
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert (shown["model"]["num_stages"], shown["train"]["epochs"]) == (2, 5)
    assert shown["model"]["num_kernels"] == 8


def test_config_errors_name_the_key_and_exit_2():
    out = knet("config", "show", "--set", "model.num_stagse=4")
    assert out.returncode == 2
    assert "model.num_stagse is not a known key; did you mean model.num_stages?" in out.stderr
    assert "Traceback" not in out.stderr


def test_model_summary_reports_the_official_component_counts():
    out = knet("model", "summary", "--params", "configs/coco-panoptic-r50.yaml")
    assert out.returncode == 0, out.stderr
    counts = {}
    for line in out.stdout.splitlines()[1:]:
        name, value = line.split()
        counts[name] = int(value.replace(",", ""))
    assert counts["fuser"] == 4_264_448
    assert counts["update_head.0"] == 2_076_037  # 2,062,416 - 86,608 + 100,229 (133 classes)
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("total", "trainable"))


def test_data_synth_validate_prepare_from_the_command_line(tmp_path):
    small = [
        "--set",
        "data.synth.image_size=48",
        "--set",
        "data.synth.train_images=3",
        "--set",
        "data.synth.val_images=2",
        "--set",
        f"data.synth.out={tmp_path / 'raw'}",
        "--set",
        f"data.raw={tmp_path / 'raw'}",
        "--set",
        f"data.prepared={tmp_path / 'prepared'}",
    ]
    out = knet("data", "synth", "--quiet", *small)
    assert out.returncode == 0, out.stderr
    out = knet("data", "validate", "--quiet", *small)
    assert out.returncode == 0, out.stderr
    assert "0 errors" in out.stdout
    out = knet("data", "prepare", "--quiet", *small)
    assert out.returncode == 0, out.stderr
    assert "train: 3 images" in out.stdout
    assert (tmp_path / "prepared" / "manifest.json").exists()

    # Break one image: validate and prepare name it; strict prepare keeps the old output.
    before = (tmp_path / "prepared" / "manifest.json").read_bytes()
    broken = tmp_path / "raw" / "train" / "000000000002.png"
    broken.write_bytes(b"not a png")
    out = knet("data", "validate", "--quiet", *small)
    assert out.returncode == 1
    assert "unreadable_image" in out.stdout and "000000000002.png" in out.stdout
    assert "image 2" in out.stdout
    out = knet("data", "prepare", "--quiet", *small)
    assert out.returncode == 1
    assert "nothing was written" in out.stderr and "000000000002.png" in out.stderr
    assert (tmp_path / "prepared" / "manifest.json").read_bytes() == before
    out = knet("data", "prepare", "--quiet", "--lenient", *small)
    assert out.returncode == 0, out.stderr
    assert "train: 2 images, " in out.stdout and "1 problems skipped" in out.stdout


LEAF_COMMANDS = [
    ("config", "show"),
    ("model", "summary"),
    ("data", "synth"),
    ("data", "nuclei"),
    ("data", "validate"),
    ("data", "prepare"),
    ("evaluate",),
    ("train",),
    ("tune",),
    ("promote",),
    ("lineage",),
    ("predict",),
    ("export",),
]


def test_every_command_help_has_a_paragraph_and_an_example(capsys):
    import pytest

    from knet.cli import COMMAND_HELP, main

    assert set(COMMAND_HELP) == set(LEAF_COMMANDS)
    for path in LEAF_COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        description, example = COMMAND_HELP[path]
        assert description.split()[0] in out and len(description) > 60, path
        assert f"example:\n  {example}" in out, path
        assert example.startswith(f"knet {' '.join(path)}"), path


def test_version():
    out = knet("--version")
    assert out.returncode == 0 and out.stdout.strip() == "knet 0.1.0"


def test_predict_takes_set_like_every_command(tmp_path):
    """`knet predict --set a=1 b=2 IMAGE` (several items after one --set, then the input)."""
    from PIL import Image

    from knet.cli import main
    from tests.test_train import make_data, run_config, untrained_checkpoint

    data = make_data(tmp_path / "data")
    checkpoint = untrained_checkpoint(run_config(data, tmp_path), tmp_path / "model.pt")
    image = tmp_path / "photo.png"
    Image.new("RGB", (48, 40), (90, 120, 200)).save(image)
    argv = ["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]
    argv += ["--quiet", "--set", "model.postprocess.mask_threshold=0.4", "data.test_size=64"]
    assert main([*argv, str(image)]) == 0
    assert (tmp_path / "out" / "photo.json").is_file()
    assert main(["predict", "--checkpoint", str(checkpoint), "--set", "data.test_size=64"]) == 2


def test_the_readme_and_docs_state_the_hostile_suites_real_size():
    """The README's count of hostile inputs is the number pytest collects, not a stale one."""
    import re

    root = Path(__file__).resolve().parents[1]
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_hostile.py"],
        cwd=root,
        capture_output=True,
        text=True,
    ).stdout
    count = int(re.search(r"(\d+) tests? collected", collected).group(1))
    readme = (root / "README.md").read_text()
    data = (root / "docs" / "data.md").read_text()
    assert f"`tests/test_hostile.py`: {count} hostile inputs" in readme
    assert f"**{count} hostile-input cases**" in data


def test_every_stage_returns_a_frozen_dataclass_that_serializes_as_json():
    """prepare, train, evaluate, tune, promote, lineage and predict return typed, frozen
    results (the CLI, the flows and the tests read attributes, not string keys); the one
    serializer, knet.io.dumps, writes any of them as strict JSON."""
    import dataclasses
    import json
    import typing

    from knet.data.prepare import prepare
    from knet.evaluation.evaluate import evaluate_checkpoint
    from knet.evaluation.predict import predict_checkpoint
    from knet.experiments.registry import Promotion, lineage, promote
    from knet.experiments.tune import tune
    from knet.io import dumps
    from knet.training import train

    stages = [prepare, train, evaluate_checkpoint, tune, promote, lineage, predict_checkpoint]
    for stage in stages:
        result = typing.get_type_hints(stage)["return"]
        assert dataclasses.is_dataclass(result), stage.__name__
        assert result.__dataclass_params__.frozen, stage.__name__

    record = Promotion(
        model="knet-panoptic", metric="pq", min_improvement=0.1, decision="promoted",
        reason="first", challenger={"version": 2, "pq": float("nan"), "source": Path("a.pt")},
        champion_before=None, champion=2, split="val", evaluated_on="abc", timings={},
    )  # fmt: skip
    assert record.version == 2 and record.model_uri == "models:/knet-panoptic/2"
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.champion = 3
    data = json.loads(dumps(record))
    assert data["challenger"] == {"version": 2, "pq": None, "source": "a.pt"}
    assert list(data) == [f.name for f in dataclasses.fields(Promotion)]
