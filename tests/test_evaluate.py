"""Evaluation, prediction and checkpoints end to end, on a tiny model trained in the test."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from knet.config import load_config
from knet.data.dataset import build_dataset, build_loader
from knet.data.prepare import prepare
from knet.data.synth import generate
from knet.evaluation.evaluate import evaluate_checkpoint
from knet.evaluation.predict import predict_checkpoint
from knet.method.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from knet.method.engine import EpochSettings, train_one_epoch
from knet.method.losses import KNetCriterion
from knet.method.optim import build_optimizer
from knet.model import build_model
from tests.conftest import TINY_OVERRIDES


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic data, prepared, and a tiny panoptic K-Net trained for a few epochs."""
    tmp = tmp_path_factory.mktemp("eval")
    overrides = [
        *TINY_OVERRIDES,
        "model.task=panoptic",
        f"data.raw={tmp / 'raw'}",
        f"data.synth.out={tmp / 'raw'}",
        f"data.prepared={tmp / 'prepared'}",
        "data.synth.image_size=64",
        "data.synth.train_images=8",
        "data.synth.val_images=4",
        "data.min_size=[64]",
        "data.max_size=64",
        "data.test_size=64",
        "data.num_workers=0",
        "train.batch_size=4",
        "optim.lr=0.001",
        "optim.warmup_iters=0",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.artifact_location={tmp / 'mlartifacts'}",
    ]
    cfg = load_config("params.yaml", overrides)
    generate(cfg.data.raw, cfg.data.synth, cfg.data, progress=False)
    prepare(cfg.data, progress=False)
    torch.manual_seed(0)
    dataset = build_dataset(cfg.data, "train", "panoptic", train=True)
    cats = dataset.categories
    model = build_model(cfg.model, cats.num_things, cats.num_stuff)
    criterion = KNetCriterion(cfg.loss, "panoptic", cats.num_things, cats.num_stuff)
    optimizer = build_optimizer(model, cfg.optim)
    loader = build_loader(dataset, batch_size=4, train=True, num_workers=0)
    for _ in range(3):
        settings = EpochSettings(cfg.optim, torch.device("cpu"))
        stats = train_one_epoch(model, criterion, loader, optimizer, None, settings)
    assert np.isfinite(stats["loss"])
    checkpoint = tmp / "model.pt"
    save_checkpoint(checkpoint, model, cfg, cats, epoch=3)
    params = tmp / "params.yaml"
    import yaml

    params.write_text(yaml.safe_dump(cfg.to_dict()))
    return {"tmp": tmp, "cfg": cfg, "checkpoint": checkpoint, "params": params, "model": model}


def _tracked_checkpoint(trained, tmp_path: Path):
    """A finished MLflow training run and the trained checkpoint saved as written by it."""
    from knet.tracking import Tracker

    cfg = trained["cfg"]
    parent = Tracker(cfg.tracking, "training")
    parent.end()
    model, _, categories = load_model(trained["checkpoint"])
    checkpoint = tmp_path / "tracked.pt"
    save_checkpoint(checkpoint, model, cfg, categories, epoch=3, mlflow_run_id=parent.run_id)
    return parent, checkpoint


def test_an_evaluation_is_an_mlflow_run_under_its_training_run(trained, tmp_path):
    """Metrics, the metrics file, the per-class CSV and the pictures reach MLflow, nested
    under the run that trained the checkpoint."""
    import mlflow

    cfg = trained["cfg"]
    parent, checkpoint = _tracked_checkpoint(trained, tmp_path)
    evaluation = evaluate_checkpoint(
        checkpoint,
        trained["params"],
        out=tmp_path / "eval",
        metrics_file=tmp_path / "metrics" / "eval.json",
        kernel_maps=True,
        progress=False,
    )
    metrics = evaluation.metrics
    client = mlflow.MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'",
    )
    assert run.info.run_name == "evaluate-tracked" and run.data.tags["knet.kind"] == "evaluation"
    assert evaluation.run_id == run.info.run_id  # the stage's result names its run
    assert run.data.metrics["miou"] == pytest.approx(metrics["miou"])
    names = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/eval.json", "evaluation/eval_per_class.csv"} <= names
    pictures = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/pictures")}
    assert "evaluation/pictures/kernel_maps.png" in pictures


def test_a_prediction_is_an_mlflow_run_under_its_training_run(trained, tmp_path):
    """`knet predict`'s overlays and segment JSONs reach MLflow, nested under the run that
    trained the checkpoint; with tracking off, no run is made."""
    import mlflow

    cfg = trained["cfg"]
    parent, checkpoint = _tracked_checkpoint(trained, tmp_path)
    images = sorted((trained["tmp"] / "raw" / "val").glob("*.png"))[:3]
    summary = predict_checkpoint(images, checkpoint, tmp_path / "pred", progress=False)
    assert summary.run_id and len(summary.written) == 3
    client = mlflow.MlflowClient(cfg.tracking.uri)
    run = client.get_run(summary.run_id)
    assert run.info.run_name == "predict-tracked" and run.data.tags["knet.kind"] == "prediction"
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.metrics == {"images_written": 3.0, "images_failed": 0.0}
    overlays = {a.path for a in client.list_artifacts(summary.run_id, "prediction/overlays")}
    segments = {a.path for a in client.list_artifacts(summary.run_id, "prediction/segments")}
    assert overlays == {f"prediction/overlays/{p.stem}.png" for p in images}
    assert segments == {f"prediction/segments/{p.stem}.json" for p in images}

    untracked = predict_checkpoint(
        images[:1],
        checkpoint,
        tmp_path / "pred2",
        overrides=["tracking.enabled=false"],
        progress=False,
    )
    assert untracked.run_id is None and len(untracked.written) == 1


def test_checkpoint_round_trip_rebuilds_the_model_from_the_file(trained):
    model, cfg, categories = load_model(trained["checkpoint"])
    assert cfg == trained["cfg"]
    assert categories.num_things == 5 and categories.num_stuff == 3
    for (name, a), b in zip(
        model.state_dict().items(), trained["model"].state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert load_checkpoint(trained["checkpoint"])["epoch"] == 3


def test_bad_checkpoints_are_refused_with_the_file_name(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a knet checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_evaluate_writes_metrics_per_class_csv_and_valid_prediction_files(trained, tmp_path):
    out, metrics_file = tmp_path / "eval", tmp_path / "metrics" / "eval.json"
    metrics = evaluate_checkpoint(
        trained["checkpoint"],
        trained["params"],
        out=out,
        metrics_file=metrics_file,
        kernel_maps=True,
        progress=False,
    ).metrics
    for key in ("pq", "pq_th", "pq_st", "sq", "rq", "ap", "ap50", "ap75", "miou", "acc"):
        assert key in metrics
        assert np.isnan(metrics[key]) or 0.0 <= metrics[key] <= 100.0
    assert metrics["images"] == 4
    # Valid JSON: a metric without a value (NaN) is written as null.
    written = json.loads(metrics_file.read_text())
    assert written == {k: None if v != v else v for k, v in metrics.items()}
    rows = list(csv.DictReader((metrics_file.parent / "eval_per_class.csv").open()))
    assert [r["name"] for r in rows] == [
        "circle",
        "square",
        "triangle",
        "star",
        "ring",
        "sky",
        "ground",
        "water",
    ]
    # Panoptic PNG ids match the JSON, areas included.
    panoptic = json.loads((out / "panoptic.json").read_text())
    assert len(panoptic["annotations"]) == 4
    for ann in panoptic["annotations"]:
        rgb = np.asarray(Image.open(out / "panoptic" / ann["file_name"]), dtype=np.uint32)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        assert ids.shape == (64, 64)
        values, counts = np.unique(ids[ids > 0], return_counts=True)
        info = {s["id"]: s["area"] for s in ann["segments_info"]}
        assert dict(zip(values.tolist(), counts.tolist(), strict=True)) == info
    # pycocotools loads the instance results against the raw ground truth.
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(trained["tmp"] / "raw" / "annotations" / "instances_val.json"))
        results = json.loads((out / "instances_results.json").read_text())
        if results:
            gt.loadRes(results)
    for name in ("kernel_maps.png", *[p.name for p in out.glob("stage_masks_*.png")]):
        Image.open(out / name).load()
    assert len(list(out.glob("stage_masks_*.png"))) == 3


def test_evaluate_refuses_a_dataset_with_other_categories(trained, tmp_path):
    cfg = trained["cfg"]
    index_path = Path(cfg.data.prepared) / "val" / "index.json"
    other = tmp_path / "prepared"
    (other / "val").mkdir(parents=True)
    index = json.loads(index_path.read_text())
    index["categories"] = index["categories"][:-1]
    (other / "val" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="trained on 8 categories"):
        evaluate_checkpoint(
            trained["checkpoint"],
            trained["params"],
            [f"data.prepared={other}"],
            out=tmp_path / "o",
            write_metrics=False,
            progress=False,
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_predict_writes_overlays_and_json_and_reports_unreadable_images(trained, tmp_path, task):
    images = sorted((trained["tmp"] / "raw" / "val").glob("*.png"))[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "pred"
    summary = predict_checkpoint(
        [*images, bad], trained["checkpoint"], out, task=task, progress=False
    )
    assert len(summary.written) == 2
    assert len(summary.failed) == 1 and "broken.jpg" in summary.failed[0][1]
    for image in images:
        picture = Image.open(out / f"{image.stem}.png")
        assert picture.size[0] > 64 and picture.size[1] >= 64  # image + legend column
        data = json.loads((out / f"{image.stem}.json").read_text())
        assert data["task"] == task and (data["height"], data["width"]) == (64, 64)
        for seg in data["segments"]:
            assert seg["category"] in {
                "circle",
                "square",
                "triangle",
                "star",
                "ring",
                "sky",
                "ground",
                "water",
            }


def test_an_image_over_max_pixels_is_predicted_at_a_bounded_size(trained, tmp_path):
    """model.postprocess.max_pixels bounds predict's memory: a larger image is predicted at
    the largest size under it, and its JSON says the scale."""
    from knet.evaluation.predict import fit_pixels

    small = np.asarray(Image.open(sorted((trained["tmp"] / "raw" / "val").glob("*.png"))[0]))
    big = tmp_path / "big.png"
    Image.fromarray(small).resize((128, 96)).save(big)
    summary = predict_checkpoint(
        [big], trained["checkpoint"], tmp_path / "pred",
        overrides=["model.postprocess.max_pixels=4096", "tracking.enabled=false"],
        progress=False,
    )  # fmt: skip
    assert summary.failed == [] and len(summary.written) == 1
    data = json.loads((tmp_path / "pred" / "big.json").read_text())
    assert (data["width"], data["height"]) == (73, 55) and data["width"] * data["height"] <= 4096
    assert data["scale"] == pytest.approx(73 / 128)
    assert fit_pixels(small, 4096)[1] == 1.0 and fit_pixels(small, 4096)[0] is small


def test_cli_evaluate_and_predict(trained, tmp_path):
    exe = Path(sys.executable).parent / "knet"
    out = subprocess.run(
        [
            str(exe),
            "evaluate",
            "--checkpoint",
            str(trained["checkpoint"]),
            "--params",
            str(trained["params"]),
            "--out",
            str(tmp_path / "e"),
            "--metrics",
            str(tmp_path / "m.json"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert '"pq"' in out.stdout
    folder = trained["tmp"] / "raw" / "val"
    (tmp_path / "in").mkdir()
    for image in sorted(folder.glob("*.png"))[:2]:
        (tmp_path / "in" / image.name).write_bytes(image.read_bytes())
    (tmp_path / "in" / "zz.png").write_bytes(b"garbage")
    out = subprocess.run(
        [
            str(exe),
            "predict",
            str(tmp_path / "in"),
            "--checkpoint",
            str(trained["checkpoint"]),
            "--out",
            str(tmp_path / "p"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert "wrote 2 overlay PNGs" in out.stdout and "1 failed" in out.stdout
    assert "zz.png" in out.stderr
