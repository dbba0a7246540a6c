"""The ``knet`` console script as users call it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def knet(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("knet", path=str(Path(sys.executable).parent))
    assert exe, "the knet console script is not installed next to this python"
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)


def test_help_lists_the_commands():
    out = knet("--help")
    assert out.returncode == 0
    assert "config" in out.stdout and "model" in out.stdout


def test_config_show_prints_the_resolved_config_with_overrides():
    out = knet("config", "show", "--set", "model.num_stages=4")
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["model"]["num_stages"] == 4
    assert shown["model"]["num_kernels"] == 16  # from params.yaml


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
