"""The MLflow model registry on a real temporary sqlite store (and a real ``mlflow server``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from knet.data.dataset import build_dataset, load_rgb
from knet.evaluation.predict import predict_image, segments_of
from knet.experiments.registry import (
    RegistryError,
    lineage,
    load_model_files,
    load_registered,
    promote,
)
from knet.method.checkpoint import load_model, save_checkpoint
from knet.model import build_model
from knet.training import train
from tests.conftest import free_port, venv_env
from tests.test_train import make_data, run_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny data and three checkpoints of rising quality on its val split."""
    tmp = tmp_path_factory.mktemp("registry")
    data = make_data(tmp)
    cfg = run_config(data, tmp, "train.num_workers=0", "tracking.enabled=false")
    val = build_dataset(cfg.data, "val", "panoptic", train=False)
    torch.manual_seed(0)
    untrained = build_model(cfg.model, val.categories.num_things, val.categories.num_stuff)
    save_checkpoint(tmp / "untrained.pt", untrained, cfg, val.categories, epoch=0)
    paths = {"untrained": tmp / "untrained.pt"}
    for name, epochs in (("short", 10), ("long", 40)):
        run = run_config(
            data,
            tmp,
            "train.num_workers=0",
            "tracking.enabled=false",
            "data.train_split=val",  # fit the split the gate evaluates on: a clear ranking
            f"train.epochs={epochs}",
            "optim.lr_steps=[]",  # full LR throughout: 40 epochs are 80 steps here
            f"train.eval_every={epochs}",
            f"train.output={tmp / f'{name}.pt'}",
            f"train.metrics={tmp / 'metrics' / f'{name}.json'}",
        )
        train(run, root=tmp)
        paths[name] = tmp / f"{name}.pt"
    return data, paths


def store_config(data: Path, tmp: Path, *extra: str):
    return run_config(
        data,
        tmp,
        "registry.metric=miou",
        "registry.min_improvement=1.0",
        f"registry.output={tmp / 'promotion.json'}",
        *extra,
    )


def test_first_champion_worse_rejected_better_promoted(models, tmp_path):
    import mlflow

    data, paths = models
    cfg = store_config(data, tmp_path)
    first = promote(cfg, root=tmp_path, checkpoint=paths["short"], settle_s=0.05)
    assert first.decision == "promoted" and first.champion == 1
    assert "first valid model" in first.reason
    assert json.loads((tmp_path / "promotion.json").read_text())["champion"] == 1

    worse = promote(cfg, root=tmp_path, checkpoint=paths["untrained"], settle_s=0.05)
    assert worse.decision == "rejected" and worse.champion == 1
    assert worse.challenger["miou"] < worse.champion_before["miou"]

    better = promote(cfg, root=tmp_path, checkpoint=paths["long"], settle_s=0.05)
    assert better.decision == "promoted" and better.champion == 3, better
    assert better.challenger["miou"] >= better.champion_before["miou"] + 1.0

    client = mlflow.MlflowClient(cfg.tracking.uri)
    aliases = dict(client.get_registered_model("knet-panoptic").aliases)
    assert {k: str(v) for k, v in aliases.items()} == {
        "champion": "3",
        "previous": "1",
        "challenger": "3",
    }
    rejected = client.get_model_version("knet-panoptic", "2").tags
    assert rejected["validation_status"] == "rejected"
    assert "does not beat champion v1" in rejected["validation_reason"]
    promoted = client.get_model_version("knet-panoptic", "3").tags
    assert promoted["validation_status"] == "passed" and promoted["promoted_from"] == "1"
    for tag in ("git_commit", "git_dirty", "data_hash", "params_hash", "metric.miou"):
        assert tag in promoted
    assert len(client.search_model_versions("name='knet-panoptic'")) == 3  # nothing deleted

    info = lineage("models:/knet-panoptic@champion", cfg.tracking.uri)
    assert info.version == 3 and info.run_id and info.data_hash == promoted["data_hash"]
    assert info.reproduce[0] == f"git checkout {promoted['git_commit']}"


def test_registered_model_loads_by_alias_in_a_fresh_process(models, tmp_path):
    data, paths = models
    cfg = store_config(data, tmp_path)
    record = promote(cfg, root=tmp_path, checkpoint=paths["long"], settle_s=0.05)

    # knet evaluate --model: the registered files give the score the gate saw.
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    evaluated = subprocess.run(
        [
            "knet",
            "evaluate",
            "--params",
            str(params),
            "--model",
            "models:/knet-panoptic@champion",
            "--metrics",
            str(tmp_path / "eval.json"),
            "--out",
            str(tmp_path / "eval"),
            "--quiet",
        ],
        cwd=tmp_path,
        env=venv_env(),
        capture_output=True,
        text=True,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["miou"] == pytest.approx(record.challenger["miou"])
    image_path = sorted((data / "raw" / "val").glob("*.png"))[0]
    out = tmp_path / "pyfunc"
    code = f"""
import json, sys
import mlflow, numpy as np
from knet.data.dataset import load_rgb
mlflow.set_tracking_uri({cfg.tracking.uri!r})
model = mlflow.pyfunc.load_model("models:/knet-panoptic@champion")
assert model.metadata.signature.inputs.inputs[0].shape == (-1, -1, -1, 3)
result = model.predict(load_rgb({str(image_path)!r})[None])[0]  # a batch of one image
np.save({str(out) + ".npy"!r}, result["segment_map"])
json.dump(result["segments"], open({str(out) + ".json"!r}, "w"))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=venv_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]

    model, trained, categories = load_model(paths["long"])
    expected = predict_image(
        model, "panoptic", categories, trained, load_rgb(image_path), "panoptic"
    )
    np.testing.assert_array_equal(np.load(f"{out}.npy"), expected.segment_map.numpy())
    assert json.loads(Path(f"{out}.json").read_text()) == segments_of(
        expected, "panoptic", categories
    )

    # The same version through knet's own loader (no pyfunc machinery).
    loaded, _, _, version = load_registered("models:/knet-panoptic/1", cfg.tracking.uri)
    assert version.version in (1, "1")
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_the_served_champion_answers_a_scoring_request(models, tmp_path):
    """`mlflow models serve -m models:/knet-panoptic@champion` on 127.0.0.1: an image in, the
    segments of knet's own prediction out; the version carries its signature and example."""
    import mlflow

    data, paths = models
    cfg = store_config(data, tmp_path)
    promote(cfg, root=tmp_path, checkpoint=paths["long"], settle_s=0.05)
    client = mlflow.MlflowClient(cfg.tracking.uri)
    version = client.get_model_version_by_alias("knet-panoptic", "champion")
    info = mlflow.models.get_model_info(version.source)
    assert info.signature is not None and info.saved_input_example_info is not None
    assert info.signature.params.to_dict()[0]["name"] == "task"

    port = free_port()
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", "models:/knet-panoptic@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=venv_env(MLFLOW_TRACKING_URI=cfg.tracking.uri), cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, "mlflow models serve exited"
                time.sleep(0.5)
        image_path = sorted((data / "raw" / "val").glob("*.png"))[0]
        image = load_rgb(image_path)
        body = json.dumps({"inputs": [image.tolist()]}).encode()
        request = urllib.request.Request(
            f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            (served,) = json.loads(response.read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    model, trained, categories = load_model(paths["long"])
    expected = predict_image(model, "panoptic", categories, trained, image, "panoptic")
    assert served["task"] == "panoptic" and served["segments"]
    assert served["segments"] == segments_of(expected, "panoptic", categories)
    np.testing.assert_array_equal(np.array(served["segment_map"]), expected.segment_map.numpy())


def test_missing_model_alias_or_version_is_a_clear_error(models, tmp_path):
    data, paths = models
    cfg = store_config(data, tmp_path)
    with pytest.raises(RegistryError, match="does not exist, so no model is registered there"):
        load_registered("models:/knet-panoptic@champion", cfg.tracking.uri)
    promote(cfg, root=tmp_path, checkpoint=paths["short"], settle_s=0.05)
    with pytest.raises(RegistryError, match="registered model 'other' does not exist"):
        load_registered("models:/other@champion", cfg.tracking.uri)
    with pytest.raises(RegistryError, match=r"has no alias 'staging' \(aliases: .*champion -> v1"):
        load_registered("models:/knet-panoptic@staging", cfg.tracking.uri)
    with pytest.raises(RegistryError, match="has no version 7"):
        load_registered("models:/knet-panoptic/7", cfg.tracking.uri)
    with pytest.raises(RegistryError, match="not a registered model URI"):
        load_registered("runs:/abc/model", cfg.tracking.uri)
    with pytest.raises(RegistryError, match="no checkpoint/model.pt artifact"):
        promote(cfg, root=tmp_path, run_id="0" * 32)


def test_a_gate_metric_the_models_task_lacks_is_refused_before_the_registry_changes(tmp_path):
    """registry.metric=pq for an instance model: refused before a version is registered (and
    before the sqlite store is created), not after minutes of evaluation."""
    from knet.config import load_config
    from knet.data.categories import Categories
    from tests.conftest import tiny_config

    checkpoint = tmp_path / "instance.pt"
    categories = Categories.from_coco([{"id": 1, "name": "cell", "isthing": 1}])
    model = build_model(tiny_config("instance").model, 1, 0)
    save_checkpoint(checkpoint, model, tiny_config("instance"), categories)
    store = tmp_path / "mlflow.db"
    cfg = load_config(
        ROOT / "params.yaml", [f"tracking.uri=sqlite:///{store}", "registry.metric=pq"]
    )
    with pytest.raises(
        RegistryError, match=r"registry.metric=pq is not a metric of this instance model \(ap, "
    ):
        promote(cfg, root=tmp_path, checkpoint=checkpoint)
    assert not store.exists() and not (tmp_path / "metrics").exists()


class Payload:
    """Stands for any pickled object a tampered file could carry."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_tampered_weights_are_refused(models, tmp_path):
    data, paths = models
    cfg = store_config(data, tmp_path)
    promote(cfg, root=tmp_path, checkpoint=paths["short"], settle_s=0.05)
    import mlflow

    folder = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri="models:/knet-panoptic/1", dst_path=str(tmp_path / "v1")
        )
    )
    weights, config = folder / "artifacts" / "weights.pt", folder / "artifacts" / "knet.json"
    load_model_files(weights, config)  # intact: loads
    torch.save({"conv.weight": Payload()}, weights)
    with pytest.raises(RegistryError, match="not a plain state dict of tensors; refused"):
        load_model_files(weights, config)
    torch.save([torch.zeros(1)], weights)
    with pytest.raises(RegistryError, match="is not a state dict"):
        load_model_files(weights, config)
    torch.save({"nonsense": torch.zeros(1)}, weights)
    with pytest.raises(RegistryError, match="does not fit the model"):
        load_model_files(weights, config)


def race(cfg, tmp: Path, paths: dict[str, Path], order: list[tuple[str, float]]) -> dict:
    """``knet promote`` processes started in ``order`` ((checkpoint, seconds after the previous
    start)); returns each one's promotion record."""
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    procs = {}
    for name, delay in order:
        time.sleep(delay)
        procs[name] = subprocess.Popen(
            ["knet", "promote", "--params", str(params), "--checkpoint", str(paths[name]),
             "--set", f"registry.output={tmp / f'{name}.json'}"],
            cwd=tmp, env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    outputs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), outputs
    return {name: json.loads((tmp / f"{name}.json").read_text()) for name in procs}


def check_race(cfg, paths: dict[str, Path], records: dict) -> None:
    """The best model is champion, ``previous`` is a model that was champion before it, the
    worst was rejected, and every version is still there with its validation status."""
    import mlflow

    client = mlflow.MlflowClient(cfg.tracking.uri, cfg.tracking.uri)
    champion = client.get_model_version_by_alias("knet-panoptic", "champion")
    assert champion.tags["knet.source"] == str(paths["long"]), records
    assert champion.tags["validation_status"] == "passed"
    previous = client.get_model_version_by_alias("knet-panoptic", "previous")
    assert previous.version != champion.version
    assert champion.tags["promoted_from"] == str(previous.version)
    # `previous` is the champion the best model replaced, as that promotion read it.
    assert int(previous.version) == records["long"]["champion_before"]["version"], records
    assert previous.tags["validation_status"] in ("passed", "rejected"), previous.tags
    assert records["long"]["decision"] == "promoted", records
    assert records["untrained"]["decision"] == "rejected", records
    versions = client.search_model_versions("name='knet-panoptic'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]  # none lost
    assert all(v.tags.get("validation_status") in ("passed", "rejected") for v in versions)


# Interleavings of three real processes: all at once, the best first, the best last.
ORDERS = {
    "together": [("short", 0.0), ("untrained", 0.0), ("long", 0.0)],
    "best-first": [("long", 0.0), ("untrained", 1.0), ("short", 1.0)],
    "best-last": [("short", 0.0), ("untrained", 1.0), ("long", 2.0)],
}


@pytest.mark.slow
@pytest.mark.parametrize("order", ORDERS)
def test_racing_promotions_end_with_the_best_model(models, tmp_path, order):
    data, paths = models
    cfg = store_config(data, tmp_path)
    # An existing store and champion (a fresh sqlite file would race on its own migrations).
    promote(cfg, root=tmp_path, checkpoint=paths["untrained"], settle_s=0.05)
    check_race(cfg, paths, race(cfg, tmp_path, paths, ORDERS[order]))


@contextlib.contextmanager
def mlflow_server(tmp: Path) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, proxied artifacts); its URI."""
    port = free_port()
    env = {**venv_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        ["mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
         "--artifacts-destination", str(tmp / "server-artifacts"),
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the server and its workers
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_promote_load_and_lineage_through_an_mlflow_server(models, tmp_path):
    data, paths = models
    with mlflow_server(tmp_path) as uri:
        cfg = store_config(data, tmp_path, f"tracking.uri={uri}")
        first = promote(cfg, root=tmp_path, checkpoint=paths["short"], settle_s=0.05)
        second = promote(cfg, root=tmp_path, checkpoint=paths["long"], settle_s=0.05)
        assert first.champion == 1 and second.champion == 2
        model, _, _, version = load_registered("models:/knet-panoptic@champion", uri)
        assert str(version.version) == "2"
        shown = subprocess.run(
            ["knet", "lineage", "models:/knet-panoptic@champion", "--tracking-uri", uri],
            cwd=tmp_path,
            env=venv_env(),
            capture_output=True,
            text=True,
        )
        assert shown.returncode == 0, shown.stderr
        assert "version 2" in shown.stdout and "git checkout" in shown.stdout
        predicted = subprocess.run(
            [
                "knet",
                "predict",
                str(data / "raw" / "val"),
                "--model",
                "models:/knet-panoptic@champion",
                "--tracking-uri",
                uri,
                "--out",
                str(tmp_path / "predict"),
                "--quiet",
            ],
            cwd=tmp_path,
            env=venv_env(),
            capture_output=True,
            text=True,
        )
        assert predicted.returncode == 0, predicted.stderr
        assert len(list((tmp_path / "predict").glob("*.json"))) == 4


@pytest.mark.slow
@pytest.mark.parametrize("order", ORDERS)
def test_racing_promotions_through_an_mlflow_server(models, tmp_path, order):
    """A server has no file lock: the gates queue through the bakery of registered-model
    tags, and leave none of those tags behind."""
    import mlflow

    data, paths = models
    with mlflow_server(tmp_path) as uri:
        cfg = store_config(data, tmp_path, f"tracking.uri={uri}")
        promote(cfg, root=tmp_path, checkpoint=paths["untrained"], settle_s=0.05)
        check_race(cfg, paths, race(cfg, tmp_path, paths, ORDERS[order]))
        tags = mlflow.MlflowClient(uri, uri).get_registered_model("knet-panoptic").tags
        assert not [key for key in tags if key.startswith("knet.gate.")], tags


def test_the_server_gate_waits_for_a_live_promoter_and_ignores_a_dead_one(tmp_path):
    """The bakery lock (used through a tracking server) on a real registry: a live lower
    ticket holds the gate until its tag goes; an entry past its lease (a promoter killed
    while it held the gate) does not block, and the gate's own tag goes when it leaves."""
    import threading

    import mlflow

    from knet.experiments.registry import GATE_LEASE_S, _bakery

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("knet-panoptic")
    client.set_registered_model_tag("knet-panoptic", "knet.gate.v1", f"1@{time.time()}")
    entered = threading.Event()

    def promoter() -> None:
        with _bakery(client, "knet-panoptic", "2"):
            entered.set()

    waiting = threading.Thread(target=promoter)
    waiting.start()
    assert not entered.wait(1.5)  # version 1 holds ticket 1: version 2 waits
    client.delete_registered_model_tag("knet-panoptic", "knet.gate.v1")
    assert entered.wait(10)
    waiting.join()

    dead = time.time() - GATE_LEASE_S - 1
    client.set_registered_model_tag("knet-panoptic", "knet.gate.v3", f"1@{dead}")
    with _bakery(client, "knet-panoptic", "4"):
        tags = client.get_registered_model("knet-panoptic").tags
        assert tags["knet.gate.v4"].startswith("1@")  # the dead ticket 1 is not counted
    tags = client.get_registered_model("knet-panoptic").tags
    assert "knet.gate.v4" not in tags and "knet.gate.v2" not in tags


def test_a_nan_champion_is_replaced_by_any_finite_challenger(tmp_path):
    """The gate itself on a real sqlite registry: a champion whose score is NaN (a diverged
    model promoted by an older knet) must not block every later model."""
    import mlflow

    from knet.config import load_config
    from knet.experiments.registry import _gate

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # not an earlier test's
    client.create_registered_model("knet-panoptic")
    for _ in range(2):
        client.create_model_version("knet-panoptic", source=str(tmp_path), run_id=None)
    client.set_registered_model_alias("knet-panoptic", "champion", "1")
    cfg = load_config(ROOT / "params.yaml", [f"tracking.uri={uri}"])
    scores = {"1": {"pq": float("nan")}, "2": {"pq": 5.0}}
    decision = _gate(client, cfg, "knet-panoptic", "2", "pq", scores, {}, 0.0, mlflow)
    assert decision["decision"] == "promoted", decision
    assert "is NaN" in decision["reason"]
    aliases = {k: str(v) for k, v in client.get_registered_model("knet-panoptic").aliases.items()}
    assert aliases == {"champion": "2", "previous": "1"}
