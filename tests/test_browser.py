"""The registry in a real browser: headless Chromium renders the MLflow UI's page of the
registered model (a React app: the versions, aliases and tags exist only after its scripts ran)
and the test reads the rendered DOM and saves a screenshot under ``reports/``.

Needs Debian's ``chromium`` (``.ci/run`` installs it when absent); skipped without it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from knet.experiments.registry import promote
from tests.test_registry import mlflow_server
from tests.test_train import make_data, run_config, untrained_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)"),
]


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium; ``--virtual-time-budget`` lets the page's scripts finish first."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=180)


def visible_text(html: str) -> str:
    text = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


def test_the_registered_model_page_shows_versions_aliases_and_lineage(tmp_path):
    data = make_data(tmp_path / "data")
    with mlflow_server(tmp_path) as uri:
        cfg = run_config(data, tmp_path, f"tracking.uri={uri}", "registry.metric=miou")
        checkpoint = untrained_checkpoint(cfg, tmp_path / "model.pt")
        first = promote(cfg, root=tmp_path, checkpoint=checkpoint, settle_s=0.05)
        second = promote(cfg, root=tmp_path, checkpoint=checkpoint, settle_s=0.05)
        assert (first.champion, second.decision) == (1, "rejected")

        page = f"{uri}/#/models/knet-panoptic"
        dom = chromium("--dump-dom", page)
        assert dom.returncode == 0, dom.stderr[-2000:]
        shot = ROOT / "reports" / "browser-mlflow-model.png"
        shot.parent.mkdir(exist_ok=True)
        taken = chromium(f"--screenshot={shot}", "--window-size=1400,1000", page)
        assert taken.returncode == 0, taken.stderr[-2000:]

    text = visible_text(dom.stdout)
    assert "Registered Models" in text and "knet-panoptic" in text
    for shown in ("Version 1", "Version 2", "champion", "challenger"):
        assert shown in text, shown
    for tag in ("params_hash", "data_hash", "git_commit", "validation_status"):
        assert tag in text, tag  # the lineage and gate tags of each version
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


FLOW = """
import json, sys
from prefect import flow
from prefect.runtime import flow_run
from pipelines.flows import _publish

@flow(name="train-knet")
def summary_only():
    _publish("train-knet-summary", "train-knet",
             {"metrics": {"pq": 66.283, "pq_th": 51.978}, "model": "knet-panoptic", "version": 1})
    return flow_run.id

print(json.dumps({"run": str(summary_only())}))
"""


def test_the_prefect_flow_run_and_its_summary_artifact_render(tmp_path):
    """A real Prefect server on 127.0.0.1 (its UI pointed at its own API); a flow publishes
    knet's summary artifact; Chromium renders the flow-run page and the artifact's page."""
    import json
    import os
    import signal
    import sys
    import time
    import urllib.request

    from tests.conftest import free_port, venv_env

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = venv_env(PREFECT_HOME=str(tmp_path), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env={**env, "PREFECT_UI_API_URL": api}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log.read_text()
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        ran = subprocess.run(
            [sys.executable, "-c", FLOW], cwd=ROOT, env={**env, "PREFECT_API_URL": api},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr[-3000:]
        run_id = json.loads(ran.stdout.strip().splitlines()[-1])["run"]
        request = urllib.request.Request(
            f"{api}/artifacts/filter", data=b"{}", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            (artifact,) = json.loads(response.read())

        page = chromium("--dump-dom", f"http://127.0.0.1:{port}/runs/flow-run/{run_id}")
        assert page.returncode == 0, page.stderr[-2000:]
        summary = chromium(
            "--dump-dom", f"http://127.0.0.1:{port}/artifacts/artifact/{artifact['id']}"
        )
        shot = ROOT / "reports" / "browser-prefect-summary.png"
        chromium(
            f"--screenshot={shot}",
            "--window-size=1400,1000",
            f"http://127.0.0.1:{port}/artifacts/artifact/{artifact['id']}",
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    text = visible_text(page.stdout)
    assert "train-knet" in text and "Completed" in text and "Artifacts" in text
    text = visible_text(summary.stdout)
    assert "train-knet-summary" in text and "train-knet summary" in text
    assert "knet-panoptic" in text and "pq 66.28" in text  # the rendered summary table
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
