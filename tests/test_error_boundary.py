"""One error boundary: what a user can get wrong ends as one line naming the item, exit 2 for
usage / config / input and 1 for anything else, and a traceback only with ``--debug``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from knet.cli import main
from tests.test_train import make_data, run_config, untrained_checkpoint


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    """Tiny prepared data, a params file for it and an untrained checkpoint."""
    tmp = tmp_path_factory.mktemp("boundary")
    data = make_data(tmp)
    cfg = run_config(data, tmp, "tracking.enabled=false")
    params = tmp / "params.yaml"
    import yaml

    params.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    untrained_checkpoint(cfg, tmp / "model.pt")
    return {"tmp": tmp, "params": params, "checkpoint": tmp / "model.pt"}


def run(capsys, *argv: str) -> tuple[int, str]:
    """``knet ARGV`` in-process: (exit code, stderr + stdout); argparse's exits count too."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out, err
    return code, err + out


def evaluate_args(project, tmp_path, checkpoint) -> list[str]:
    return [
        "evaluate", "--params", str(project["params"]), "--checkpoint", str(checkpoint),
        "--out", str(tmp_path / "eval"), "--metrics", str(tmp_path / "eval.json"), "--quiet",
    ]  # fmt: skip


def test_a_params_directory_and_an_empty_params_file(capsys, tmp_path):
    code, err = run(capsys, "config", "show", "--params", str(tmp_path))
    assert code == 2 and f"params file {tmp_path} is a directory" in err
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    code, err = run(capsys, "config", "show", "--params", str(empty))
    assert code == 2 and "empty.yaml is empty" in err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--device", "banana", "'banana' is not a device"),
        ("--device", "meta", "'meta': knet runs on cpu or cuda"),
        ("--max-images", "0", "--max-images: must be at least 1; got 0"),
        ("--max-images", "ten", "'ten' is not an integer"),
    ],
)
def test_bad_evaluate_flags_are_usage_errors(capsys, project, tmp_path, flag, value, message):
    args = evaluate_args(project, tmp_path, project["checkpoint"])
    code, err = run(capsys, *args, flag, value)
    assert code == 2 and message in err, err
    assert not (tmp_path / "eval").exists() and not (tmp_path / "eval.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_cuda_on_a_machine_without_one(capsys, project, tmp_path, command):
    args = evaluate_args(project, tmp_path, project["checkpoint"])
    if command == "predict":
        args = ["predict", str(tmp_path), "--checkpoint", str(project["checkpoint"])]
    code, err = run(capsys, *args, "--device", "cuda")
    assert code == 2 and "'cuda': this machine has no CUDA device" in err


def test_a_checkpoint_with_a_string_version(capsys, project, tmp_path):
    payload = torch.load(project["checkpoint"], weights_only=True)
    payload["version"] = "1"
    bad = tmp_path / "string-version.pt"
    torch.save(payload, bad)
    code, err = run(capsys, *evaluate_args(project, tmp_path, bad))
    assert code == 2 and f"{bad}: checkpoint version must be a positive integer; got '1'" in err


def test_a_checkpoint_whose_weights_do_not_fit_its_config(capsys, project, tmp_path):
    payload = torch.load(project["checkpoint"], weights_only=True)
    payload["config"]["model"]["num_kernels"] = 12  # trained with 8
    bad = tmp_path / "other-kernels.pt"
    torch.save(payload, bad)
    code, err = run(capsys, *evaluate_args(project, tmp_path, bad))
    assert code == 2 and "weights do not fit the model its config describes" in err, err
    assert "12 kernels" in err and len(err.strip().splitlines()) == 1, err


def test_a_json_nested_beyond_reason_is_a_validation_problem(capsys, project, tmp_path):
    raw = tmp_path / "raw"
    (raw / "annotations").mkdir(parents=True)
    deep = raw / "annotations" / "panoptic_val.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    code, err = run(
        capsys, "data", "validate", "--params", str(project["params"]),
        "--set", f"data.raw={raw}",
    )  # fmt: skip
    assert code == 1, err
    assert "nested too deeply" in err and "panoptic_val.json" in err, err


def test_debug_shows_the_traceback(capsys, tmp_path):
    with pytest.raises(Exception, match="is a directory"):
        main(["--debug", "config", "show", "--params", str(tmp_path)])
