"""MLflow model registry: ``knet promote``, loading by alias, ``knet lineage``.

A registered version is an MLflow pyfunc model logged from code
(:mod:`knet.experiments.mlflow_model`) with two files of its own: ``weights.pt``, a plain
state dict read with ``torch.load(weights_only=True)``, and ``knet.json``, the config and
categories it was built with. Nothing pickled is needed to load it, here or through
``mlflow.pyfunc.load_model``.

:func:`promote` registers a trained model as a new version of ``registry.name``, aliases it
``challenger``, evaluates it **and** the current ``champion`` on the same split with the same
code, and moves ``champion`` (the old one becomes ``previous``) only if the challenger beats it
by ``registry.min_improvement`` on ``registry.metric``. It re-reads the champion just before
and just after moving the alias, so two racing promotions end on the better model. Versions
are tagged with their lineage and the decision; nothing is ever deleted.

Like :mod:`knet.tracking` (runs), this module is an MLflow adapter: the only other place
that imports mlflow.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from knet.config import QUALITY_METRICS, Config, config_from_dict
from knet.data.categories import Categories
from knet.io import check_output_file, dumps, write_output_file
from knet.method.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from knet.model import KNet

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "knet.json"
FILES_FORMAT = 1
HEADLINE = {"panoptic": "pq", "instance": "ap", "semantic": "miou"}
# What evaluation reports per task (a panoptic model: PQ, AP of its things and mIoU).
TASK_METRICS = {
    "panoptic": QUALITY_METRICS,
    "instance": ("ap", "ap50", "ap75", "aps", "apm", "apl"),
    "semantic": ("miou", "acc"),
}
LINEAGE_TAGS = ("git_commit", "git_dirty", "data_hash", "params_hash")
# What a serving environment needs besides knet itself (given, so MLflow does not spend
# seconds inferring them).
PIP_REQUIREMENTS = ["torch", "numpy", "scipy", "pycocotools", "pyyaml", "pillow"]
EVAL_BOOKKEEPING = ("images", "seconds", "images_per_s", "forward_s", "postprocess_s")
MAX_RECHECKS = 5  # champion re-reads when promotions race
# The gate's lock on a tracking server: an entry older than this is a promoter that died.
GATE_LEASE_S = 60.0
GATE_TAG = "knet.gate.v"  # + version: one registered-model tag per promoter in the lock
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


class RegistryError(ValueError):
    """A registered model, alias, version or model file that cannot be used; says which."""


# ------------------------------------------------------------------------- model files


def write_model_files(payload: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """A checkpoint's weights and config as the two files of a registered version."""
    folder.mkdir(parents=True, exist_ok=True)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    torch.save(payload["model"], weights)
    meta = {
        "format": FILES_FORMAT,
        "config": payload["config"],
        "categories": payload["categories"],
    }
    config.write_text(dumps(meta, indent=1))
    return weights, config


def load_model_files(
    weights: str | Path, config: str | Path, device: str | torch.device = "cpu"
) -> tuple[KNet, Config, Categories]:
    """Rebuild K-Net from ``weights.pt`` + ``knet.json``; anything but a state dict is refused."""
    try:
        state = torch.load(weights, map_location=device, weights_only=True)
    except Exception as err:  # UnpicklingError for pickled objects, others for corrupt files
        raise RegistryError(
            f"{weights} is not a plain state dict of tensors; refused to load it ({err})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise RegistryError(f"{weights} is not a state dict (names -> tensors); refused")
    try:
        meta = json.loads(Path(config).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RegistryError(f"{config} is not a knet model config: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FILES_FORMAT:
        raise RegistryError(f"{config} is not a knet model config (format {FILES_FORMAT})")
    payload = {
        "version": 1,
        "model": state,
        "config": meta["config"],
        "categories": meta["categories"],
    }
    try:
        return model_from_checkpoint(payload, device)
    except (RuntimeError, CheckpointError) as err:  # missing / unexpected keys, wrong shapes
        raise RegistryError(f"{weights} does not fit the model of {config}: {err}") from None


def load_version_dir(folder: str | Path, device: str | torch.device = "cpu"):
    """The model of a downloaded version (its ``artifacts/`` folder holds the two files)."""
    artifacts = Path(folder) / "artifacts"
    return load_model_files(artifacts / WEIGHTS_FILE, artifacts / CONFIG_FILE, device)


# --------------------------------------------------------------------------- model URIs


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, alias, version)."""
    match = _URI.match(uri)
    if not match:
        raise RegistryError(
            f"{uri!r} is not a registered model URI; use models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    return match["name"], match["alias"], match["version"]


def resolve_version(client, uri: str):
    """The ModelVersion that ``uri`` names, with errors that say what exists."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(uri)
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(
            f"{uri}: registered model {name!r} does not exist in {client.tracking_uri} "
            f"(registered: {', '.join(known) or 'none'}); run `knet promote` first"
        ) from None
    if alias is not None:
        aliases = dict(registered.aliases)
        if alias not in aliases:
            shown = ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(
                f"{uri}: registered model {name!r} has no alias {alias!r} (aliases: {shown})"
            )
        return client.get_model_version(name, str(aliases[alias]))
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"{uri}: registered model {name!r} has no version {version}") from None


def load_registered(uri: str, tracking_uri: str, device: str | torch.device = "cpu"):
    """(model, config, categories, ModelVersion) of ``models:/NAME@ALIAS`` or ``.../VERSION``."""
    parse_model_uri(uri)  # a malformed URI before any store is opened
    _check_store_exists(tracking_uri)
    mlflow = _mlflow(tracking_uri)
    client = mlflow.MlflowClient()
    version = resolve_version(client, uri)
    model, cfg, categories = _load_version(mlflow, version)
    return model, cfg, categories, version


def _load_version(mlflow, version, device: str | torch.device = "cpu"):
    with tempfile.TemporaryDirectory(prefix="knet-model-") as folder:
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}", dst_path=folder
        )
        return load_version_dir(folder, device)


# ---------------------------------------------------------------------------- promote


def model_name(cfg: Config, task: str) -> str:
    return cfg.registry.name or f"knet-{task}"


def gate_metric(cfg: Config, task: str) -> str:
    return cfg.registry.metric or HEADLINE[task]


@dataclass(frozen=True)
class Promotion:
    """What ``knet promote`` decided (written as ``registry.output``, JSON of these fields)."""

    model: str  # the registered model's name
    metric: str  # the gate's metric
    min_improvement: float
    decision: str  # promoted | rejected
    reason: str
    challenger: dict[str, Any]  # version, <metric>: score, source
    champion_before: dict[str, Any] | None  # version, <metric>: score; None: there was none
    champion: int | None  # the version that is champion after the gate
    split: str
    evaluated_on: str  # the DVC hash of the data both were evaluated on
    timings: dict[str, float]

    @property
    def version(self) -> int:
        """The challenger's version (the one this promotion registered)."""
        return int(self.challenger["version"])

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model}/{self.version}"


def promote(  # 65 lines: register, evaluate, gate, write; each failure handled where it happens
    cfg: Config,
    root: str | Path = ".",
    run_id: str | None = None,
    checkpoint: str | Path | None = None,
    settle_s: float = 0.5,
) -> Promotion:
    """Register, evaluate and gate one model; returns (and writes) the decision.

    Args:
        cfg: the params: the data and split to evaluate on, the tracking URI, ``registry``.
        run_id: an MLflow training run whose ``checkpoint/model.pt`` artifact is the model.
        checkpoint: a checkpoint file instead (default ``train.output``); the version is
            linked to the run that wrote it when the checkpoint names one.
        settle_s: how long to wait after moving ``champion`` before re-reading it.
    """
    from knet.config import absolute_paths
    from knet.tracking import check_tracking_uri

    root = Path(root).resolve()
    cfg = absolute_paths(cfg, root)
    began = time.perf_counter()
    # A missing or foreign checkpoint file is refused before the store is opened (opening a
    # sqlite store creates it).
    loaded = None if run_id else load_checkpoint(Path(checkpoint or cfg.train.output))
    check_output_file(root / cfg.registry.output, "promotion")  # before the registry changes
    if loaded is not None:  # a run's checkpoint is checked once downloaded
        _check_gate_metric(cfg, loaded["config"]["model"]["task"])
    check_tracking_uri(cfg.tracking.uri)
    mlflow = _mlflow(cfg.tracking.uri)
    client = mlflow.MlflowClient()
    timings: dict[str, float] = {}

    payload, source, run_id = _source(mlflow, client, cfg, run_id, checkpoint, loaded)
    task = payload["config"]["model"]["task"]
    name, metric = model_name(cfg, task), gate_metric(cfg, task)
    _check_gate_metric(cfg, task)
    version = _register(mlflow, client, cfg, root, name, payload, source, run_id)
    client.set_registered_model_alias(name, "challenger", version)
    timings["register_s"] = time.perf_counter() - began

    began = time.perf_counter()
    scores = {version: _evaluate(mlflow, client, cfg, name, version)}
    timings["evaluate_challenger_s"] = time.perf_counter() - began
    _check_metric(metric, scores[version])
    champion = _alias(client, name, "champion")
    if champion not in (None, version):  # before the lock, which is then held for seconds
        began = time.perf_counter()
        scores[champion] = _evaluate(mlflow, client, cfg, name, champion)
        timings["evaluate_champion_s"] = time.perf_counter() - began
    with _gate_lock(cfg.tracking.uri, client, name, version):
        decision = _gate(client, cfg, name, version, metric, scores, timings, settle_s, mlflow)

    challenger = scores[version]
    for key, value in challenger.items():
        if key not in EVAL_BOOKKEEPING and isinstance(value, float) and math.isfinite(value):
            client.set_model_version_tag(name, version, f"metric.{key}", str(value))
    client.set_model_version_tag(name, version, "validation_status", decision["status"])
    client.set_model_version_tag(name, version, "validation_reason", decision["reason"])
    record = Promotion(
        model=name,
        metric=metric,
        min_improvement=cfg.registry.min_improvement,
        decision=decision["decision"],
        reason=decision["reason"],
        challenger={"version": int(version), metric: challenger[metric], "source": source},
        champion_before=decision["champion_before"],
        champion=int(decision["champion_after"]) if decision["champion_after"] else None,
        split=cfg.registry.split or cfg.data.val_split,
        evaluated_on=_data_tag(cfg, root),
        timings={k: round(v, 3) for k, v in timings.items()},
    )
    write_output_file(root / cfg.registry.output, dumps(record, indent=2), "promotion")
    return record


def _check_gate_metric(cfg: Config, task: str) -> None:
    """Refuse a ``registry.metric`` the task's evaluation does not report, before the store is
    opened or a version registered (not after minutes of evaluation)."""
    metric = gate_metric(cfg, task)
    if metric not in TASK_METRICS[task]:
        raise RegistryError(
            f"registry.metric={metric} is not a metric of this {task} model "
            f"({', '.join(TASK_METRICS[task])})"
        )


def _source(mlflow, client, cfg: Config, run_id, checkpoint, loaded=None):
    """The checkpoint to register (loaded safely), a description, and its training run id.

    ``loaded`` is the checkpoint file's payload when the caller has read it already."""
    if run_id:
        with tempfile.TemporaryDirectory(prefix="knet-run-") as folder:
            try:
                path = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path="checkpoint/model.pt", dst_path=folder
                )
            except Exception as err:  # MlflowException, or OSError for a missing artifact
                raise RegistryError(
                    f"run {run_id} has no checkpoint/model.pt artifact to register: {err}"
                ) from None
            return load_checkpoint(path), f"runs:/{run_id}/checkpoint/model.pt", run_id
    path = Path(checkpoint or cfg.train.output)
    payload = load_checkpoint(path) if loaded is None else loaded
    linked = payload.get("mlflow_run_id")
    if linked:
        try:
            client.get_run(linked)
        except Exception:  # the run lives in another tracking store
            linked = None
    return payload, str(path), linked


def _register(mlflow, client, cfg, root, name, payload, source, run_id) -> str:
    # 8 parameters: MLflow's module and client, the version's source and lineage
    """Log the pyfunc model (into the training run when known) as a new version of ``name``."""
    from knet.tracking import experiment_id, lineage_tags

    trained = config_from_dict(payload["config"])
    if run_id:
        run_tags = client.get_run(run_id).data.tags
        tags = {k: run_tags[k] for k in LINEAGE_TAGS if k in run_tags}
        context = mlflow.start_run(run_id=run_id)
    else:  # a checkpoint without a run: its lineage as of now
        tags = lineage_tags(trained, root, trained.digest())
        context = mlflow.start_run(
            experiment_id=experiment_id(cfg.tracking),
            run_name=f"register-{Path(source).stem}",
            tags={**tags, "knet.source": source},
        )
    signature, example = model_signature()
    with tempfile.TemporaryDirectory(prefix="knet-register-") as folder, context:
        weights, config = write_model_files(payload, Path(folder))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={"weights": str(weights), "config": str(config)},
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=name,
            await_registration_for=60,
            signature=signature,
            input_example=example,
        )
    version = str(info.registered_model_version)
    for key, value in {**tags, "knet.source": source, "knet.task": trained.model.task}.items():
        client.set_model_version_tag(name, version, key, str(value))
    return version


def model_signature():
    """The pyfunc's signature and input example: a batch of RGB images, (N, H, W, 3) uint8
    (``mlflow models serve`` takes ``{"inputs": [image, ...]}``), and the string parameter
    ``task`` (panoptic, instance or semantic results; default the model's own)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        params=ParamSchema([ParamSpec("task", "string", "")]),
    )
    example = np.full((1, 32, 32, 3), 127, dtype=np.uint8)  # one small grey image
    return signature, example


def _evaluate(mlflow, client, cfg: Config, name: str, version: str) -> dict[str, float]:
    """Metrics of a registered version (its own files) on the promotion split, with this code."""
    from knet.evaluation.evaluate import evaluate_model

    model, trained, categories = _load_version(mlflow, client.get_model_version(name, version))
    with tempfile.TemporaryDirectory(prefix="knet-promote-eval-") as folder:
        return evaluate_model(
            model,
            trained.model.task,
            categories,
            cfg,
            split=cfg.registry.split or None,
            out=Path(folder) / "eval",
            metrics_file=None,
            kernel_maps=False,
            progress=False,
        )


def _check_metric(metric: str, metrics: dict[str, float]) -> None:
    if metric not in metrics:
        shown = ", ".join(k for k, v in metrics.items() if isinstance(v, float))
        raise RegistryError(f"registry.metric={metric} is not a metric of this task ({shown})")


@contextlib.contextmanager
def _gate_lock(tracking_uri: str, client, name: str, version: str) -> Iterator[None]:
    """Serialise the gates of promotions of ``name`` that share a store: held while a
    promotion compares itself with the champion and moves the aliases, so racing ``knet
    promote`` processes decide one after the other, each against the champion the previous
    one left (the champion itself is evaluated before, outside the lock).

    A local store (sqlite or a folder): an exclusive ``flock`` on a file beside it. A tracking
    server offers no lock and no compare-and-set of an alias, so there the lock is Lamport's
    bakery algorithm over registered-model tags (:func:`_bakery`), which needs nothing more
    than each promoter writing its own tag and reading the others'.
    """
    store = _sqlite_path(tracking_uri)
    if store is None and "://" not in tracking_uri:
        store = Path(tracking_uri)  # a folder store
    if store is None:
        with _bakery(client, name, version):
            yield
        return
    lock = store.with_name(f".{store.name}.knet-promote.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _bakery(client, name: str, version: str, lease_s: float = GATE_LEASE_S) -> Iterator[None]:
    """Mutual exclusion of promoters through a tracking server (Lamport's bakery algorithm).

    Each promoter owns the tag ``knet.gate.v<version>`` of the registered model: ``choosing``
    while it takes a ticket, then ``<ticket>`` = 1 + the largest ticket it sees. It enters when
    no other promoter is choosing and every other ticket is larger, ties broken by version,
    and deletes its tag on leaving. The tags carry the time they were written; a thread
    rewrites ours every ``lease_s / 4`` while we wait and hold, so an entry older than
    ``lease_s`` is a promoter that died (``kill -9``) and is ignored.
    """
    key, me = f"{GATE_TAG}{version}", int(version)
    state = {"value": "choosing"}
    stop, writing = threading.Event(), threading.Lock()

    def write(value: str | None = None) -> None:
        with writing:  # the heartbeat never writes back an older state over a newer one
            state["value"] = value or state["value"]
            client.set_registered_model_tag(name, key, f"{state['value']}@{time.time():.3f}")

    def others() -> dict[int, str]:
        now, found = time.time(), {}
        for tag, value in client.get_registered_model(name).tags.items():
            held, _, stamp = value.partition("@")
            if not tag.startswith(GATE_TAG) or tag == key:
                continue
            try:
                if now - float(stamp) <= lease_s:
                    found[int(tag[len(GATE_TAG) :])] = held
            except ValueError:  # not a tag of ours: nobody holds it
                continue
        return found

    def heartbeat() -> None:
        while not stop.wait(lease_s / 4):
            write()

    write()
    beat = threading.Thread(target=heartbeat, name="knet-gate-lease", daemon=True)
    beat.start()
    try:
        taken = [int(v) for v in others().values() if v != "choosing"]
        ticket = 1 + max(taken, default=0)
        write(str(ticket))
        while True:
            seen = others()
            if all(v != "choosing" and (int(v), o) > (ticket, me) for o, v in seen.items()):
                break
            time.sleep(0.2)
        yield
    finally:
        stop.set()
        beat.join()
        client.delete_registered_model_tag(name, key)


def _gate(client, cfg, name, version, metric, scores, timings, settle_s, mlflow) -> dict:
    # 9 parameters: the gate's inputs and the client that rechecks the alias
    """Move ``champion`` to ``version`` if it beats the champion; recheck around the move."""
    score = scores[version][metric]
    before, reason = None, ""
    for _ in range(MAX_RECHECKS):
        champion = _alias(client, name, "champion")
        if champion == version:
            return _decided("promoted", "passed", reason, before, version)
        if not math.isfinite(score):
            return _decided("rejected", "rejected", f"{metric} is NaN", before, champion)
        if champion is None:
            reason = "no champion yet: the first valid model becomes champion"
        else:
            if champion not in scores:
                began = time.perf_counter()
                scores[champion] = _evaluate(mlflow, client, cfg, name, champion)
                timings["evaluate_champion_s"] = time.perf_counter() - began
                if _alias(client, name, "champion") != champion:
                    continue  # it moved while we evaluated it (minutes): decide anew
            best = scores[champion][metric]
            before = before or {"version": int(champion), metric: best}
            if not math.isfinite(best):  # a NaN champion must not block every finite model
                reason = f"{metric} {score:.2f} replaces champion v{champion} ({metric} is NaN)"
            elif not score - best >= cfg.registry.min_improvement:
                reason = (
                    f"{metric} {score:.2f} does not beat champion v{champion} ({best:.2f}) by "
                    f"registry.min_improvement={cfg.registry.min_improvement}"
                )
                return _decided("rejected", "rejected", reason, before, champion)
            else:
                reason = f"{metric} {score:.2f} beats champion v{champion} ({best:.2f})"
            client.set_registered_model_alias(name, "previous", champion)
            client.set_model_version_tag(name, version, "promoted_from", champion)
        client.set_registered_model_alias(name, "champion", version)
        time.sleep(settle_s)  # a racing promotion may move it meanwhile: re-read and recheck
    raise RegistryError(f"champion of {name} kept moving; gave up after {MAX_RECHECKS} checks")


def _decided(decision, status, reason, before, after) -> dict[str, Any]:
    return {
        "decision": decision,
        "status": status,
        "reason": reason,
        "champion_before": before,
        "champion_after": after,
    }


def _alias(client, name: str, alias: str) -> str | None:
    """The version an alias points to, or None (a missing alias is not an error here)."""
    aliases = dict(client.get_registered_model(name).aliases)
    return str(aliases[alias]) if alias in aliases else None


def _data_tag(cfg: Config, root: Path) -> str:
    from knet.tracking import data_hash

    return data_hash(cfg, root)


def _sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI, else None."""
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix) :]) if tracking_uri.startswith(prefix) else None


def _check_store_exists(tracking_uri: str) -> None:
    """Reading a model from a sqlite store that does not exist would create an empty one (and
    its folders) as a side effect; refuse it instead, naming the file."""
    path = _sqlite_path(tracking_uri)
    if path is not None and str(path) != ":memory:" and not path.is_file():
        raise RegistryError(
            f"tracking URI {tracking_uri}: {path} does not exist, so no model is registered "
            f"there; give the store `knet promote` used (--tracking-uri or tracking.uri)"
        )


def _mlflow(tracking_uri: str):
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # per-file bars
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return mlflow


# ---------------------------------------------------------------------------- lineage


@dataclass(frozen=True)
class Lineage:
    """``knet lineage``: a registered version back to its run, params, data and commit."""

    uri: str
    model: str
    version: int
    aliases: list[str]
    run_id: str | None
    run_name: str | None
    params_hash: str | None
    params: dict[str, str]  # the key params of the training run
    data_hash: str | None  # the DVC hash of the data it was trained on
    git_commit: str | None
    git_dirty: str | None
    validation: str  # the gate's status and reason
    metrics: dict[str, float]  # the gate's evaluation (version tags metric.*)
    run_metrics: dict[str, float]  # the training run's last metrics
    reproduce: list[str]  # the commands that rebuild it


def lineage(uri: str, tracking_uri: str) -> Lineage:
    """Version -> run -> params -> data hash -> git commit -> metrics, and how to reproduce."""
    parse_model_uri(uri)
    _check_store_exists(tracking_uri)
    mlflow = _mlflow(tracking_uri)
    client = mlflow.MlflowClient()
    version = resolve_version(client, uri)
    tags = dict(version.tags)
    run = client.get_run(version.run_id) if version.run_id else None
    params = run.data.params if run else {}
    commit = tags.get("git_commit", "unknown")
    reproduce = [
        f"git checkout {commit}",
        "dvc checkout  # the data of that commit's dvc.lock",
        f"knet config show [--params FILE]  # must print digest {tags.get('params_hash')}",
        "dvc repro train  # or: knet train [--params FILE]",
    ]
    if tags.get("git_dirty") == "true":
        reproduce.insert(1, "# the tree was dirty when it was trained: uncommitted changes")
    return Lineage(
        uri=uri,
        model=version.name,
        version=int(version.version),
        aliases=list(version.aliases),
        run_id=version.run_id,
        run_name=run.info.run_name if run else None,
        params_hash=tags.get("params_hash"),
        params={
            k: params[k]
            for k in ("model.task", "model.num_stages", "model.num_kernels", "train.epochs")
            if k in params
        },
        data_hash=tags.get("data_hash"),
        git_commit=commit,
        git_dirty=tags.get("git_dirty"),
        validation=f"{tags.get('validation_status')}: {tags.get('validation_reason')}",
        metrics={k[7:]: float(v) for k, v in tags.items() if k.startswith("metric.")},
        run_metrics=dict(run.data.metrics) if run else {},
        reproduce=reproduce,
    )


__all__ = [
    "Lineage",
    "Promotion",
    "RegistryError",
    "lineage",
    "load_model_files",
    "load_registered",
    "parse_model_uri",
    "promote",
    "resolve_version",
]
