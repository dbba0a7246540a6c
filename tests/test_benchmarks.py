"""The benchmark harness measures what it says (tiny sizes; speed itself is never asserted)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import inference, maskrcnn, model_step, systems
from benchmarks.__main__ import fast_path_gains, markdown, ratios


def _args() -> argparse.Namespace:
    """benchmarks.inference's arguments for the tiny default at 64x64, batch 2, on the CPU."""
    parser_args = {
        "params": "params.yaml",
        "overrides": [],
        "size": [64, 64],
        "batch": 2,
        "num_things": 5,
        "num_stuff": 3,
        "warmup": 1,
        "repeats": 1,
        "channels_last": False,
        "device": "cpu",
    }
    return argparse.Namespace(**parser_args)


def test_inference_counts_flops_and_times_postprocessing():
    row = inference.measure(_args())
    assert row["input"] == [64, 64] and row["batch"] == 2 and row["dtype"] == "fp32"
    assert row["gflops_per_image"] > 0 and row["forward_tflops_per_s"] > 0
    assert row["postprocess_s_median"] > 0 and row["images_per_s_median"] > 0
    # Twice the pixels, about twice the FLOPs: the count follows the input.
    bigger = _args()
    bigger.size = [64, 128]
    ratio = inference.measure(bigger)["gflops_per_image"] / row["gflops_per_image"]
    assert 1.6 < ratio < 2.4, ratio


def test_the_peer_is_measured_or_reported_unavailable():
    args = argparse.Namespace(
        mode="inference", size=[64, 64], batch=1, warmup=0, repeats=1, device="cpu"
    )
    row = maskrcnn.measure(args)
    try:
        import torchvision.models.detection  # noqa: F401
    except Exception:  # the CPU build here has no torchvision: said, not failed
        assert row["available"] is False and row["reason"].startswith("torchvision:")
    else:
        assert row["available"] is True and row["images_per_s_median"] > 0


def test_ratios_and_table_pair_knet_with_the_peer():
    rows = [
        {"section": "inference", "case": "K-Net R-50 panoptic, 8x8", "batch": 1,
         "images_per_s_median": 3.0, "images_per_s_min": 2.0, "images_per_s_max": 4.0,
         "gflops_per_image": 1.0, "forward_tflops_per_s": 0.05, "peak_mem_mib": 10.0},
        {"section": "inference", "case": "Mask R-CNN R-50-FPN, 8x8", "batch": 1,
         "available": True, "images_per_s_median": 2.0, "images_per_s_min": 1.0,
         "images_per_s_max": 3.0, "peak_mem_mib": 20.0},
        {"section": "training", "case": "K-Net R-50 panoptic, 8x8", "batch": 2,
         "step_s_median": 1.0, "step_s_min": 0.5, "step_s_max": 2.0, "peak_mem_mib": 30.0},
        {"section": "training", "case": "Mask R-CNN R-50-FPN, 8x8", "available": False,
         "reason": "torchvision: missing"},
    ]  # fmt: skip
    found = ratios(rows)
    assert found == [{"section": "inference", "batch": 1, "knet_over_maskrcnn": 1.5}]
    header = {"device": "cpu", "torch": "x", "python": "3.11", "threads": 2,
              "matmul_peak_tflops": 0.1, "peak_dtype": "float32 2048^3"}  # fmt: skip
    table = markdown(header, rows, found)
    assert "| inference | 1 | 1.50x |" in table
    assert "| 50.0 |" in table  # 0.05 of a 0.1 TFLOP/s peak
    assert "2.00 (1.00-4.00)" in table  # a training step of 1 s at batch 2, min-max inverted
    assert "unavailable: torchvision: missing" in table


def test_fast_path_gains_and_the_systems_table():
    base = {"section": "training", "case": "K-Net R-50 panoptic, 8x8", "batch": 2,
            "step_s_median": 2.0, "step_s_min": 2.0, "step_s_max": 2.0, "peak_mem_mib": 1.0,
            "host_syncs_per_step": 0, "matcher_transfers_per_step": 1}  # fmt: skip
    fast = {**base, "section": "fast path", "case": "K-Net R-50 panoptic, 8x8, channels-last",
            "step_s_median": 1.0}  # fmt: skip
    assert fast_path_gains([base, fast]) == [("channels-last", 2.0)]
    systems = {
        "train_images": 8, "val_images": 4, "dvc_repro_prepare_cold_s": 5.0,
        "dvc_repro_noop_s": 0.9, "flow_epochs": 1, "flow_wall_s": 60.0,
        "flow_stage_s": {"prepare": 1.0, "train": 30.0},
        "plain_loop": {"images_per_s": 10.0, "wall_s": 20.0, "epochs": 4},
        "ray_train_1_worker": {"images_per_s": 9.8, "wall_s": 30.0, "epochs": 4,
                               "cpu_s": {"train worker": 50.0, "Ray daemons": 3.0}},
        "ray_over_plain": 0.98,
        "time_to_quality": {"target_pq": 50.0, "seconds_to_target": 150.2, "epoch_at_target": 5,
                            "wall_s": 240.0, "final": {"pq": 66.3, "pq_th": 52.0}},
    }  # fmt: skip
    header = {"device": "cpu", "torch": "x", "python": "3.11", "threads": 2,
              "matmul_peak_tflops": 0.1, "peak_dtype": "float32 2048^3"}  # fmt: skip
    table = markdown(header, [base, fast], [], systems)
    assert "| 0 + 1 cost transfer |" in table
    assert "| channels-last | 2.00x |" in table
    assert (
        "| Ray Train 1 worker / plain loop (steady state: second half of the epochs) | 0.98x |"
        in table
    )
    assert "| Ray run, CPU-s: train worker | 50.0 |" in table
    assert "| `dvc repro prepare`, nothing changed | 0.9 s |" in table
    assert "| flow stage: train | 30.0 s |" in table
    assert "wall s to the first val PQ >= 50 | 150 s (epoch 5) |" in table


def test_the_training_step_benchmark_counts_its_host_syncs():
    args = argparse.Namespace(
        params="params.yaml", overrides=[], size=[64, 64], batch=2, num_things=5, num_stuff=3,
        warmup=1, repeats=1, channels_last=True, compile=False, device="cpu",
    )  # fmt: skip
    row = model_step.measure(args)
    assert row["host_syncs_per_step"] == 0 and row["matcher_transfers_per_step"] == 1
    assert row["channels_last"] is True and row["step_s_median"] > 0


def test_the_systems_benchmark_runs_dvc_in_a_scratch_project(tmp_path):
    project = systems.scratch_project(tmp_path, train_images=4, val_images=2)
    assert (project / ".dvc").is_dir() and (project / "knet").is_dir()
    systems.timed_run(["dvc", "repro", "prepare"], project)
    _, out = systems.timed_run(["dvc", "repro", "prepare"], project)
    assert "didn't change" in out or "up to date" in out
    assert (project / "data" / "prepared").is_dir()
    # Time to quality reads the validation lines of a real `knet train` as they are printed.
    quality = systems.time_to_quality(project, target_pq=0.0, workers=0)
    epochs = [c["epoch"] for c in quality["curve"]]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 2, quality
    assert quality["epoch_at_target"] == 1 and quality["seconds_to_target"] > 0
    assert quality["final"] == quality["curve"][-1]


def test_the_gpu_check_refuses_a_machine_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the script would run the GPU checks")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", str(script), str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert done.returncode != 0 and "no CUDA device visible" in done.stderr
    assert not (tmp_path / "gpu_tests.log").exists()  # stopped before any test or benchmark
