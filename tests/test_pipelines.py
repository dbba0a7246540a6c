"""The Prefect flows, run for real: ``prefect_test_harness`` and a real Prefect server."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_OVERRIDES, free_port, make_dvc_repo, venv_env

ROOT = Path(__file__).resolve().parents[1]
# Tiny model and images for the flows (the data side lives in the repo's params.yaml).
FLOW_OVERRIDES = [
    *TINY_OVERRIDES,
    "data.min_size=[64]",
    "data.max_size=64",
    "data.test_size=64",
    "data.num_workers=0",
    "train.batch_size=2",
    "train.cpus_per_worker=1",
    "optim.warmup_iters=0",
]


def make_repo(tmp: Path) -> Path:
    """A DVC repository with the project's pipeline and a tiny synthetic dataset's params."""
    return make_dvc_repo(tmp, image_size=64, train_images=8, val_images=4)


@pytest.fixture(scope="module")
def harness():
    import ray
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
    ray.shutdown()  # the flows' training started a local Ray instance in this process


@pytest.mark.ray
@pytest.mark.slow
def test_train_knet_flow_end_to_end(harness, tmp_path, monkeypatch):
    import mlflow
    from prefect.client.orchestration import get_client

    from pipelines.flows import train_knet

    repo = make_repo(tmp_path)
    monkeypatch.setenv("KNET_FLOW_ROOTS", str(repo))
    summary = train_knet(root=str(repo), overrides=FLOW_OVERRIDES, epochs=1, predict_images=2)
    assert summary["decision"] == "promoted" and summary["version"] == 1
    assert set(summary["stage_s"]) >= {"prepare", "train", "evaluate", "registry", "predict"}
    assert len(list(Path(summary["pictures"]).glob("*.png"))) == 2
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {"synth", "prepare"} <= set(lock["stages"])  # DVC recorded the prep stage
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    version = mlflow.MlflowClient().get_model_version_by_alias("knet-panoptic", "champion")
    assert str(version.version) == "1" and version.tags["data_hash"] == summary["data_hash"]
    # the summary links the MLflow UI's pages of the training run and of the version
    experiment = mlflow.get_run(summary["mlflow_run_id"]).info.experiment_id
    run_page = f"#/experiments/{experiment}/runs/{summary['mlflow_run_id']}"
    assert summary["mlflow_run_page"].startswith(f"http://127.0.0.1:5000/{run_page} (mlflow ui")
    assert "#/models/knet-panoptic/versions/1" in summary["model_version_page"]

    async def read_artifact():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    import asyncio

    artifacts = {a.key: a for a in asyncio.run(read_artifact())}
    assert "train-knet-summary" in artifacts
    assert "| decision | promoted |" in artifacts["train-knet-summary"].data

    # Again: the data comes from the cache (the prep task does not run DVC), and the rerun
    # resumes the finished training run, so a second version of the same model is gated.
    again = train_knet(root=str(repo), overrides=FLOW_OVERRIDES, epochs=1, predict_images=2)
    assert again["version"] == 2 and again["decision"] == "rejected"
    assert again["stage_s"]["prepare"] < summary["stage_s"]["prepare"]


@pytest.mark.ray
@pytest.mark.slow
def test_ablate_knet_flow_sweeps_rounds_by_kernels_and_registers_the_best(
    harness, tmp_path, monkeypatch
):
    """The ablation flow end to end: its num_stages / num_kernels shorthands replace the params'
    default grid (and say so), the sweep runs on Ray Tune, the best trial is registered."""
    import mlflow

    from pipelines.flows import ablate_knet

    repo = make_repo(tmp_path)
    monkeypatch.setenv("KNET_FLOW_ROOTS", str(repo))
    summary = ablate_knet(
        root=str(repo),
        overrides=[*FLOW_OVERRIDES, "tune.overrides=[train.epochs=1]"],
        num_stages=[1],
        num_kernels=[4, 8],
        seeds=1,
    )
    assert summary["failed_trials"] == 0
    table = Path(summary["reports"]["md"]).read_text()
    assert (
        "| rounds \\ kernels | 4 | 8 |" in table
    )  # the product, not the params' one-at-a-time grid
    assert summary["best"]["num_stages"] == 1 and summary["best"]["num_kernels"] in (4, 8)
    assert summary["version"] == 1 and summary["decision"] == "promoted"
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    children = mlflow.search_runs(
        experiment_names=["knet"],
        filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'",
    )
    assert len(children) == 2


def test_a_bad_params_key_fails_fast_without_retries(harness, tmp_path, monkeypatch):
    from pipelines.flows import train_knet

    monkeypatch.setenv("KNET_FLOW_ROOTS", str(tmp_path))
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    state = train_knet(
        root=str(tmp_path),
        params="params.yaml",  # the project's own (a file outside it is refused)
        overrides=["model.num_stagse=4"],
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(Exception, match="did you mean model.num_stages"):
        state.result()


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_a_service_that_comes_up_late_is_retried(harness, tmp_path):
    """The tracking server answers only after the first attempt: the task retries, then passes."""
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client

    from knet.config import load_config
    from pipelines import tasks

    port = free_port()
    cfg = load_config(ROOT / "params.yaml", [f"tracking.uri=http://127.0.0.1:{port}"])
    servers = []

    def serve_later():
        time.sleep(1.0)  # the first attempt finds nothing listening
        servers.append(http.server.ThreadingHTTPServer(("127.0.0.1", port), _Health))
        servers[0].serve_forever()

    @flow
    def probe():
        return tasks.check_services(cfg, str(tmp_path), None, return_state=True)

    threading.Thread(target=serve_later, daemon=True).start()
    try:
        state = probe()
    finally:
        while not servers:
            time.sleep(0.1)
        servers[0].shutdown()
    assert state.is_completed()

    async def run_count():
        async with get_client() as client:
            run = await client.read_task_run(state.state_details.task_run_id)
            return run.run_count

    assert asyncio.run(run_count()) == 2  # failed once (unreachable), retried, passed


@pytest.mark.ray
@pytest.mark.slow
def test_deployments_on_a_real_server_run_through_a_process_worker(tmp_path):
    """``prefect deploy --all`` creates train-knet/train-knet and ablate-knet/ablate-knet on a
    real server on 127.0.0.1; a process worker runs the first to completion."""
    import re
    import signal
    import urllib.request

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **venv_env(),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "KNET_ROOT": str(ROOT),
        "KNET_RAY_ADDRESS": "",
        "KNET_TRACKING_URI": "",
    }

    def prefect(*args, timeout=300):
        done = subprocess.run(
            ["prefect", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    server = subprocess.Popen(
        ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{api}/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        prefect("work-pool", "create", "knet-process", "--type", "process")
        prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(ROOT / "prefect.yaml"))
        listed = prefect("deployment", "ls")
        assert "train-knet/train-knet" in listed and "ablate-knet/ablate-knet" in listed

        repo = make_repo(tmp_path)
        env["KNET_FLOW_ROOTS"] = str(repo)  # the worker's allow list (pipelines/guard.py)
        started = prefect(
            "deployment",
            "run",
            "train-knet/train-knet",
            "--param",
            f"root={repo}",
            "--param",
            "epochs=1",
            "--param",
            "predict_images=1",
            "--params",
            json.dumps({"overrides": FLOW_OVERRIDES}),
        )
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
        prefect("worker", "start", "--pool", "knet-process", "--run-once", timeout=900)
        state = prefect("flow-run", "inspect", run_id)
        assert "COMPLETED" in state, state
        assert (repo / "outputs" / "predict").is_dir() and (repo / "dvc.lock").exists()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_the_command_line_refuses_a_bad_key_in_one_line_before_any_flow(capsys):
    from pipelines.__main__ import main

    code = main(["train-knet", "--set", "model.num_stage=4"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "model.num_stage is not a known key; did you mean model.num_stages?" in err
    assert main(["train-knet", "--epochs", "0"]) == 2
    assert "train.epochs must be between 1 and" in capsys.readouterr().err
