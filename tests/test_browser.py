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

from knet.registry import promote
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
        assert (first["champion"], second["decision"]) == (1, "rejected")

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
