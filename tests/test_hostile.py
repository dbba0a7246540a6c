"""Hostile input, case by case: everything a user (or a broken disk) can hand ``knet``.

Params files, ``--set`` overrides, raw COCO panoptic / instance data (JSON and PNGs), images
for ``knet predict``, checkpoints, command-line paths and flags, and registered-model URIs.
Every case runs the real command line in-process (``knet.cli.main``) and asserts three things:

1. the exit code: 2 for a usage / config / input error (argparse's, and the error boundary's
   ConfigError / ValueError / FileNotFoundError / KeyError), 1 for anything else that stopped
   the command (a dataset refused by validation, images that could not be predicted, ...);
2. the message: one line of stderr names the offending item (file path, dotted config key,
   image id, segment id or model URI), and there is no Python traceback anywhere;
3. nothing else changed: the trees involved (the shared tiny project and the case's own
   folder) are snapshotted, path by path and byte by byte, before and after the call; an
   output that is refused is neither created nor modified.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from knet.cli import main
from knet.io import MARKER
from knet.method.checkpoint import load_checkpoint
from knet.training import faults
from tests.test_no_data_loss import snapshot
from tests.test_train import make_data, run_config, untrained_checkpoint

MODEL_NAME = "knet-panoptic"


# --------------------------------------------------------------------------------------------
# The shared tiny project (module scope) and the three assertions
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    """Raw + prepared synthetic data, a params file for it, an untrained checkpoint and a
    sqlite MLflow store holding one registered model (version 1, alias ``champion``)."""
    tmp = tmp_path_factory.mktemp("hostile")
    make_data(tmp)
    cfg = run_config(
        tmp,
        tmp,
        "tracking.enabled=false",
        f"data.synth.out={tmp / 'synth'}",
        "data.synth.image_size=32",
        "data.synth.train_images=1",
        "data.synth.val_images=1",
    )
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    untrained_checkpoint(cfg, tmp / "model.pt")

    store = tmp / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(MODEL_NAME)
    version = client.create_model_version(MODEL_NAME, source=str(store / "nowhere"))
    client.set_registered_model_alias(MODEL_NAME, "champion", version.version)
    return {
        "tmp": tmp,
        "params": params,
        "checkpoint": tmp / "model.pt",
        "raw": tmp / "raw",
        "prepared": tmp / "prepared",
        "store": uri,
        "images": sorted((tmp / "raw" / "val").glob("*.png")),
    }


@pytest.fixture
def case(world, tmp_path, monkeypatch):
    """The case's own folder, made the working directory (relative defaults land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def knet(capsys, argv: list[str]) -> tuple[int, str, str]:
    """``knet ARGV`` in-process: (exit code, stderr, stdout); argparse's exits count too."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, err, out


def refused(
    capsys,
    roots: list[Path],
    argv: list[Any],
    code: int,
    needles: list[str],
    stream: str = "err",
) -> str:
    """Run ``argv``; assert the exit code, one line holding every needle, no traceback, and
    byte-identical ``roots``. Returns stderr."""
    before = {str(root): snapshot(root) for root in roots}
    got, err, out = knet(capsys, argv)
    assert got == code, (got, err, out)
    assert "Traceback" not in err and "Traceback" not in out, err
    text = err if stream == "err" else out
    lines = [line for line in text.splitlines() if all(n in line for n in needles)]
    assert lines, f"no single line of std{stream} names {needles}:\n{text}"
    if stream == "err" and any(line.startswith("knet: error:") for line in err.splitlines()):
        errors = [line for line in err.splitlines() if line.startswith("knet: error:")]
        assert len(errors) == 1, err  # the boundary's message is exactly one line
    after = {str(root): snapshot(root) for root in roots}
    for root in roots:
        assert after[str(root)] == before[str(root)], f"{root} changed"
    return err


# --------------------------------------------------------------------------------------------
# Params files
# --------------------------------------------------------------------------------------------


def _deep_yaml() -> bytes:
    return ("a: " + "[" * 50_000 + "]" * 50_000 + "\n").encode()


# (id, file content (None: no file, "dir": a folder, "dangling": a broken link), the command,
#  needles besides the file's path)
PARAMS_FILES = [
    ("missing", None, "config", ["does not exist"]),
    ("directory", "dir", "synth", ["is a directory"]),
    ("empty", b"", "prepare", ["is empty"]),
    ("only-a-comment", b"# train: later\n", "validate", ["is empty"]),
    ("whitespace-only", b"\n\n   \n", "evaluate", ["is empty"]),
    ("a-yaml-list", b"- model\n- data\n", "train", ["must hold a mapping", "got list"]),
    ("a-yaml-string", b"hello\n", "tune", ["must hold a mapping", "got str"]),
    ("a-yaml-number", b"42\n", "promote", ["must hold a mapping", "got int"]),
    ("unclosed-bracket", b"model: [unclosed\n", "summary", ["is not valid YAML"]),
    ("tab-indent", b"model:\n\tnum_stages: 2\n", "config", ["is not valid YAML"]),
    ("binary-garbage", b"\x00\xff\xfe\x89PNG\r\n\x1a\n\x80\x81", "synth", ["is not UTF-8 text"]),
    ("latin-1-text", "model:\n  task: panoptique \xe9\n".encode("latin-1"), "config", ["UTF-8"]),
    ("nested-too-deeply", _deep_yaml(), "prepare", ["nested too deeply"]),
    (
        "duplicate-section",
        b"model:\n  num_stages: 2\ntrain:\n  epochs: 1\nmodel:\n  num_kernels: 4\n",
        "train",
        ["key 'model' appears twice", "is not valid YAML"],
    ),
    (
        "duplicate-nested-key",
        b"optim:\n  lr: 0.1\n  lr: 0.001\n",
        "config",
        ["key 'lr' appears twice"],
    ),
    (
        "python-tag",
        b"model: !!python/object/apply:os.system ['touch pwned']\n",
        "synth",
        ["is not valid YAML", "python/object/apply:os.system"],
    ),
    ("unknown-section", b"modle:\n  num_stages: 2\n", "prepare", ["did you mean model"]),
    ("section-is-a-scalar", b"model: 3\n", "config", ["model must be a mapping"]),
    ("section-is-a-list", b"train: [1, 2]\n", "evaluate", ["train must be a mapping"]),
    ("integer-key", b"model:\n  1: 2\n", "config", ["model.1 is not a known key"]),
    ("dangling-link", "dangling", "validate", ["does not exist"]),
]

COMMANDS: dict[str, Callable[[dict, Path], list[Any]]] = {
    "config": lambda w, t: ["config", "show"],
    "summary": lambda w, t: ["model", "summary", "--num-things", "2", "--num-stuff", "1"],
    "synth": lambda w, t: ["data", "synth", "--quiet", "--out", t / "new-raw"],
    "prepare": lambda w, t: ["data", "prepare", "--quiet", "--out", t / "new-prepared"],
    "validate": lambda w, t: ["data", "validate", "--quiet"],
    "evaluate": lambda w, t: [
        "evaluate",
        "--quiet",
        "--checkpoint",
        w["checkpoint"],
        "--out",
        t / "eval",
        "--metrics",
        t / "eval.json",
    ],  # fmt: skip
    "train": lambda w, t: ["train"],
    "tune": lambda w, t: ["tune"],
    "promote": lambda w, t: ["promote", "--checkpoint", w["checkpoint"]],
}


@pytest.mark.parametrize(
    ("content", "command", "needles"),
    [pytest.param(c, cmd, n, id=i) for i, c, cmd, n in PARAMS_FILES],
)
def test_params_file(capsys, world, case, content, command, needles):
    path = case / "bad-params.yaml"
    if content == "dir":
        path.mkdir()
    elif content == "dangling":
        path.symlink_to(case / "gone.yaml")
    elif content is not None:
        path.write_bytes(content)
    argv = [*COMMANDS[command](world, case), "--params", path]
    refused(capsys, [case, world["tmp"]], argv, 2, [str(path), *needles])
    assert not (case / "pwned").exists()


# --------------------------------------------------------------------------------------------
# --set overrides: unknown keys, types, ranges, syntax
# --------------------------------------------------------------------------------------------

# (override, needles); every one is refused with exit 2 before anything runs.
OVERRIDES = [
    # unknown keys, with and without a suggestion
    ("model.num_kernals=8", ["model.num_kernals is not a known key", "model.num_kernels?"]),
    ("trian.epochs=1", ["trian is not a known key", "did you mean train?"]),
    ("optim.lr_step=[1]", ["optim.lr_step is not a known key", "optim.lr_steps?"]),
    ("data.synth.imag_size=32", ["data.synth.imag_size", "data.synth.image_size?"]),
    ("tracking.enable=false", ["tracking.enable is not", "tracking.enabled?"]),
    ("model.postprocess.mask_treshold=0.4", ["mask_treshold", "mask_threshold?"]),
    ("model.backbone.weight=x.pth", ["model.backbone.weight is not", "backbone.weights?"]),
    ("registry.minimum_improvement=1", ["registry.minimum_improvement is not a known key"]),
    ("zzz_unrelated=1", ["zzz_unrelated is not a known key"]),
    ("train.epochs.value=3", ["override train.epochs.value", "train.epochs is not a section"]),
    # wrong types
    ("train.epochs=two", ["train.epochs must be int, got str"]),
    ("train.batch_size=2.0", ["train.batch_size must be int, got float"]),
    ("train.epochs=true", ["train.epochs must be int, got bool"]),
    ("train.epochs=", ["train.epochs must be int, got NoneType"]),
    ("optim.lr=[0.1]", ["optim.lr must be float, got list"]),
    ("optim.lr=yes", ["optim.lr must be float, got bool"]),
    ("optim.lr={a: 1}", ["optim.lr must be float, got dict"]),
    ("optim.lr=fast", ["optim.lr must be float, got str"]),
    ("train.amp=1", ["train.amp must be bool, got int"]),
    ("train.amp=maybe", ["train.amp must be bool, got str"]),
    ("model.task=Panoptic", ["model.task must be one of panoptic, instance, semantic"]),
    ("data.format=coco", ["data.format must be one of coco_panoptic"]),
    ("model.backbone.weights=5", ["model.backbone.weights must be str, got int"]),
    ("data.raw=null", ["data.raw must be str, got NoneType"]),
    ("data.raw=[a, b]", ["data.raw must be str, got list"]),
    ("model=3", ["model must be a mapping, got int"]),
    ("model.backbone=[18]", ["model.backbone must be a mapping, got list"]),
    ("optim.lr_steps=[a]", ["optim.lr_steps[0] must be int"]),
    ("tune.overrides=[1]", ["tune.overrides[0] must be str, got int"]),
    # shapes of lists
    ("data.min_size=[]", ["data.min_size must be [size] or [low, high]"]),
    ("data.min_size=[64, 96, 128]", ["data.min_size must be [size] or [low, high]"]),
    ("data.crop_size=[64]", ["data.crop_size must be [] or [height, width]"]),
    ("tune.num_stages=[2, 2]", ["tune.num_stages lists a value twice"]),
    ("tune.num_kernels=[]", ["tune.num_kernels must list at least one value"]),
    # out of range / not finite
    ("optim.lr=-0.1", ["optim.lr must be between 0.0 and 10.0"]),
    ("optim.weight_decay=-1", ["optim.weight_decay must be between 0.0 and 10.0"]),
    ("loss.mask_weight=.nan", ["loss.mask_weight must be a finite number"]),
    ("loss.rank_weight=-.inf", ["loss.rank_weight must be a finite number"]),
    ("optim.lr=1e999", ["optim.lr must be a finite number"]),
    ("loss.focal_alpha=2", ["loss.focal_alpha must be between 0.0 and 1.0"]),
    ("model.num_stages=0", ["model.num_stages must be between 1 and 6"]),
    ("model.num_heads=0", ["model.num_heads must be between 1 and 64"]),
    ("train.epochs=0", ["train.epochs must be between 1 and 100000"]),
    ("train.epochs=-3", ["train.epochs must be between 1 and 100000"]),
    ("train.epochs=99999999999", ["train.epochs must be between 1 and 100000"]),
    ("train.batch_size=0", ["train.batch_size must be between 1"]),
    ("train.cpus_per_worker=0", ["train.cpus_per_worker must be between 0.01"]),
    ("train.placement_timeout_s=0", ["train.placement_timeout_s must be between 1"]),
    ("train.seed=2147483648", ["train.seed must be between 0 and 2147483647"]),
    ("data.synth.image_size=0", ["data.synth.image_size must be between 32 and 4096"]),
    ("data.synth.seed=-1", ["data.synth.seed must be between 0 and 4294967295"]),
    ("data.max_size=0", ["data.max_size must be between 16"]),
    ("data.size_divisor=0", ["data.size_divisor must be between 1 and 1024"]),
    ("data.test_size=-64", ["data.test_size must be between 16"]),
    ("data.flip_prob=-0.1", ["data.flip_prob must be between 0.0 and 1.0"]),
    ("data.semantic_ignore=[70000]", ["data.semantic_ignore[0] must be between 0 and 65535"]),
    ("model.postprocess.mask_threshold=1.5", ["model.postprocess.mask_threshold must be"]),
    ("model.backbone.depth=51", ["model.backbone.depth must be one of 18, 34, 50, 101"]),
    ("model.backbone.frozen_stages=5", ["model.backbone.frozen_stages must be between -1"]),
    ("registry.min_improvement=-1", ["registry.min_improvement must be between 0.0"]),
    ("registry.metric=images", ["registry.metric must be a quality metric", "'images'"]),
    ("registry.metric=PQ", ["registry.metric must be a quality metric", "'PQ'"]),
    ("tune.storage_path=gs://bucket/tune", ["tune.storage_path must be", "gs://bucket/tune"]),
    # cross-field rules
    ("train.min_workers=5", ["train.min_workers (5) must not exceed train.num_workers"]),
    ("data.synth.min_instances=9", ["data.synth.min_instances (9) must not exceed"]),
    # syntax
    ("train.epochs", ["override 'train.epochs' must look like dotted.key=value"]),
    ("=3", ["override '=3' must look like dotted.key=value"]),
    (" =3", ["override ' =3' must look like dotted.key=value"]),
    (".epochs=3", ["override '.epochs=3'", "has an empty part"]),
    ("train..epochs=3", ["override 'train..epochs=3'", "has an empty part"]),
    ("train.=3", ["override 'train.=3'", "has an empty part"]),
    ("train.epochs=[1,", ["override train.epochs: value '[1,' is not valid YAML"]),
    ("optim={lr: 1, lr: 2}", ["override optim", "key 'lr' appears twice"]),
]


@pytest.mark.parametrize(("override", "needles"), OVERRIDES, ids=[o for o, _ in OVERRIDES])
def test_set_override(capsys, world, case, override, needles):
    # A command that would write (data synth) so a silent accept would show in the snapshot.
    argv = ["data", "synth", "--quiet", "--params", world["params"], "--out", case / "new"]
    refused(capsys, [case, world["tmp"]], [*argv, "--set", override], 2, needles)


def test_set_without_a_value_is_a_usage_error(capsys, world, case):
    argv = ["config", "show", "--params", world["params"], "--set"]
    refused(capsys, [case, world["tmp"]], argv, 2, ["--set", "expected at least one argument"])


# --------------------------------------------------------------------------------------------
# Raw data: COCO panoptic / instance JSON and PNGs
# --------------------------------------------------------------------------------------------

ANN = "annotations/panoptic_train.json"
INST = "annotations/instances_train.json"
PNG_DIR = "annotations/panoptic_train"


def _edit(root: Path, name: str, change: Callable[[Any], Any]) -> None:
    """Change the JSON file ``root/name`` in place (``change`` edits the loaded data)."""
    path = root / name
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _ann(data: dict, image_id: int = 1) -> dict:
    return next(a for a in data["annotations"] if a["image_id"] == image_id)


def _png(root: Path, image_id: int = 1) -> Path:
    data = json.loads((root / ANN).read_text())
    return root / PNG_DIR / _ann(data, image_id)["file_name"]


def _segment(root: Path, image_id: int = 1) -> int:
    return _ann(json.loads((root / ANN).read_text()), image_id)["segments_info"][0]["id"]


def b_json_missing(root):
    (root / ANN).unlink()
    return ["json_missing", str(root / ANN)]


def b_not_json(root):
    (root / ANN).write_text("{'images': [")
    return ["json_invalid", str(root / ANN)]


def b_json_empty(root):
    (root / ANN).write_text("")
    return ["json_invalid", str(root / ANN)]


def b_json_not_utf8(root):
    (root / ANN).write_bytes(b'{"images": "\xff\xfe"}')
    return ["json_invalid", "UTF-8", str(root / ANN)]


def b_json_list(root):
    (root / ANN).write_text("[1, 2, 3]")
    return ["json_structure", str(root / ANN)]


def b_json_number(root):
    (root / ANN).write_text("7")
    return ["json_structure", str(root / ANN)]


def b_json_nested(root):
    (root / ANN).write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    return ["nested too deeply", str(root / ANN)]


def b_no_images_key(root):
    _edit(root, ANN, lambda d: d.pop("images"))
    return ["json_structure", "at images: images is missing"]


def b_annotations_a_dict(root):
    _edit(root, ANN, lambda d: d.update(annotations={"1": {}}))
    return ["json_structure", "annotations"]


def b_duplicate_image_id(root):
    _edit(root, ANN, lambda d: d["images"][1].update(id=d["images"][0]["id"]))
    return ["duplicate_image_id", "image 1"]


def b_image_id_a_string(root):
    _edit(root, ANN, lambda d: d["images"][2].update(id="3"))
    return ["json_structure", "images[2].id"]


def b_negative_height(root):
    _edit(root, ANN, lambda d: d["images"][0].update(height=-64))
    return ["json_structure", "images[0].height"]


def b_segment_not_in_png(root):
    _edit(root, ANN, lambda d: _ann(d)["segments_info"].append({"id": 4242, "category_id": 1}))
    return ["empty_segment", "image 1", "segment 4242"]


def b_duplicate_segment_id(root):
    def change(d):
        info = _ann(d, 2)["segments_info"]
        info.append(dict(info[0]))

    _edit(root, ANN, change)
    return ["duplicate_segment_id", "image 2", f"segment {_segment(root, 2)}"]


def b_unknown_category(root):
    _edit(root, ANN, lambda d: _ann(d, 3)["segments_info"][0].update(category_id=999))
    return ["unknown_category", "image 3", f"segment {_segment(root, 3)}"]


def b_bad_iscrowd(root):
    _edit(root, ANN, lambda d: _ann(d, 4)["segments_info"][0].update(iscrowd=2))
    return ["bad_iscrowd", "image 4", f"segment {_segment(root, 4)}"]


def b_area_mismatch(root):
    _edit(root, ANN, lambda d: _ann(d, 5)["segments_info"][0].update(area=1))
    return ["area_mismatch", "image 5", f"segment {_segment(root, 5)}"]


def b_duplicate_category(root):
    _edit(root, ANN, lambda d: d["categories"].append(dict(d["categories"][0])))
    return ["duplicate_category_id", "categories[8]"]


def b_category_without_isthing(root):
    _edit(root, ANN, lambda d: d["categories"][0].pop("isthing"))
    return ["missing_isthing", "categories[0]"]


def b_annotation_for_unknown_image(root):
    _edit(root, ANN, lambda d: d["annotations"][0].update(image_id=777))
    return ["unknown_image_id", "777"]


def b_image_without_annotation(root):
    _edit(root, ANN, lambda d: d["annotations"].pop(1))
    return ["missing_annotation", "image 2"]


def b_dotdot_file_name(root):
    _edit(root, ANN, lambda d: d["images"][0].update(file_name="../../params.yaml"))
    return ["unsafe_path", "image 1", "'../../params.yaml'"]


def b_absolute_file_name(root):
    _edit(root, ANN, lambda d: d["images"][0].update(file_name="/etc/hostname"))
    return ["unsafe_path", "image 1", "'/etc/hostname'"]


def b_png_dotdot(root):
    _edit(root, ANN, lambda d: _ann(d, 2).update(file_name="../../../outside.png"))
    return ["unsafe_path", "image 2", "'../../../outside.png'"]


def b_png_symlink_out(root):
    png = _png(root, 3)
    png.unlink()
    png.symlink_to(root.parent / "model.pt")
    return ["unsafe_path", "image 3", png.name]


def b_png_missing(root):
    png = _png(root, 2)
    png.unlink()
    return ["missing_png", str(png), "image 2"]


def b_png_wrong_size(root):
    png = _png(root, 1)
    Image.open(png).convert("RGB").resize((32, 48)).save(png)
    return ["png_size_mismatch", "image 1"]


def b_png_not_an_image(root):
    png = _png(root, 4)
    png.write_text("this is not a png")
    return ["unreadable_png", str(png), "image 4"]


def b_png_grayscale(root):
    png = _png(root, 6)
    Image.open(png).convert("L").save(png)
    return ["png_mode", "image 6"]


def b_png_extra_ids(root):
    png = _png(root, 7)
    rgb = np.asarray(Image.open(png).convert("RGB")).copy()
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(png)
    return ["unlabeled_png_id", "image 7"]


def b_image_missing(root):
    (root / "train" / "000000000002.png").unlink()
    return ["missing_image", "000000000002.png", "image 2"]


def b_image_zero_bytes(root):
    (root / "train" / "000000000003.png").write_bytes(b"")
    return ["unreadable_image", "000000000003.png", "image 3"]


def b_image_truncated(root):
    path = root / "train" / "000000000004.png"
    path.write_bytes(path.read_bytes()[:200])
    return ["000000000004.png", "image 4"]


def b_image_wrong_size(root):
    _edit(root, ANN, lambda d: d["images"][4].update(width=65))
    return ["size_mismatch", "image 5"]


def b_images_folder_missing(root):
    shutil.rmtree(root / "train")
    return ["missing_image", str(root / "train" / "000000000001.png"), "image 1"]


# coco_instance format (the same raw folder, read through its instances JSON)
def b_inst_bad_polygon(root):
    _edit(root, INST, lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3]]))
    ann = json.loads((root / INST).read_text())["annotations"][0]
    return ["bad_polygon", f"segment {ann['id']}"]


def b_inst_rle_size(root):
    def change(d):
        seg = d["annotations"][1]["segmentation"]
        seg["size"] = [seg["size"][0] + 1, seg["size"][1]]

    _edit(root, INST, change)
    ann = json.loads((root / INST).read_text())["annotations"][1]
    return ["rle_size_mismatch", f"segment {ann['id']}"]


def b_inst_duplicate_id(root):
    _edit(root, INST, lambda d: d["annotations"][2].update(id=d["annotations"][3]["id"]))
    ann = json.loads((root / INST).read_text())["annotations"][2]
    return ["duplicate_annotation_id", f"segment {ann['id']}"]


def b_inst_unknown_category(root):
    _edit(root, INST, lambda d: d["annotations"][0].update(category_id=555))
    return ["unknown_category", "555"]


def b_inst_missing(root):
    (root / INST).unlink()
    return ["json_missing", str(root / INST)]


RAW_CASES = [
    b_json_missing, b_not_json, b_json_empty, b_json_not_utf8, b_json_list, b_json_number,
    b_json_nested, b_no_images_key, b_annotations_a_dict, b_duplicate_image_id,
    b_image_id_a_string, b_negative_height, b_segment_not_in_png, b_duplicate_segment_id,
    b_unknown_category, b_bad_iscrowd, b_area_mismatch, b_duplicate_category,
    b_category_without_isthing, b_annotation_for_unknown_image, b_image_without_annotation,
    b_dotdot_file_name, b_absolute_file_name, b_png_dotdot, b_png_symlink_out, b_png_missing,
    b_png_wrong_size, b_png_not_an_image, b_png_grayscale, b_png_extra_ids, b_image_missing,
    b_image_zero_bytes, b_image_truncated, b_image_wrong_size, b_images_folder_missing,
    b_inst_bad_polygon, b_inst_rle_size, b_inst_duplicate_id, b_inst_unknown_category,
    b_inst_missing,
]  # fmt: skip


@pytest.fixture
def raw_copy(world, case) -> Path:
    """A private copy of the raw dataset, to break."""
    root = case / "raw"
    shutil.copytree(world["raw"], root, symlinks=True)
    return root


@pytest.mark.parametrize("breaker", RAW_CASES, ids=[f.__name__[2:] for f in RAW_CASES])
def test_broken_raw_data_is_refused_by_prepare(capsys, world, case, raw_copy, breaker):
    needles = breaker(raw_copy)
    fmt = "coco_instance" if breaker.__name__.startswith("b_inst_") else "coco_panoptic"
    out = case / "prepared"
    argv = [
        "data", "prepare", "--quiet", "--params", world["params"], "--out", out,
        "--set", f"data.raw={raw_copy}", f"data.format={fmt}",
    ]  # fmt: skip
    err = refused(capsys, [case, world["tmp"]], argv, 1, needles)
    assert err.startswith(f"knet: prepare refused {raw_copy} (nothing was written"), err
    assert not out.exists()


@pytest.mark.parametrize(
    "breaker", [b_png_missing, b_dotdot_file_name, b_duplicate_segment_id], ids=lambda f: f.__name__
)
def test_broken_raw_data_is_reported_by_validate(capsys, world, case, raw_copy, breaker):
    needles = breaker(raw_copy)
    argv = ["data", "validate", "--quiet", "--params", world["params"], "--root", raw_copy]
    refused(capsys, [case, world["tmp"]], argv, 1, needles, stream="out")


def test_data_raw_that_does_not_exist(capsys, world, case):
    raw = case / "no-such-raw"
    argv = ["data", "prepare", "--quiet", "--params", world["params"], "--out", case / "p"]
    argv += ["--set", f"data.raw={raw}"]
    refused(capsys, [case, world["tmp"]], argv, 1, ["json_missing", str(raw / ANN)])


def test_images_template_escaping_the_root(capsys, world, case, raw_copy):
    argv = ["data", "prepare", "--quiet", "--params", world["params"], "--out", case / "p"]
    argv += ["--set", f"data.raw={raw_copy}", "data.images=../x"]
    refused(capsys, [case, world["tmp"]], argv, 1, ["unsafe_path", "resolves outside", "image 1"])


def test_lenient_prepare_with_every_image_broken_publishes_nothing(capsys, world, case, raw_copy):
    shutil.rmtree(raw_copy / "train")
    (raw_copy / "train").mkdir()
    argv = ["data", "prepare", "--quiet", "--lenient", "--params", world["params"]]
    argv += ["--out", case / "p", "--set", f"data.raw={raw_copy}"]
    refused(capsys, [case, world["tmp"]], argv, 1, ["split 'train'", "has no usable images"])


def test_lenient_prepare_with_the_annotation_json_a_folder(capsys, world, case, raw_copy):
    """--lenient skips bad items, not a missing annotation file: one line naming it."""
    (raw_copy / ANN).unlink()
    (raw_copy / ANN).mkdir()
    argv = ["data", "prepare", "--quiet", "--lenient", "--params", world["params"]]
    argv += ["--out", case / "p", "--set", f"data.raw={raw_copy}"]
    refused(capsys, [case, world["tmp"]], argv, 1, [str(raw_copy / ANN)])


# --------------------------------------------------------------------------------------------
# Outputs that are not knet's: refused and left byte-identical
# --------------------------------------------------------------------------------------------


def _foreign(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\chapter{mine}\n")
    return folder


def _marked(folder: Path, kind: str) -> Path:
    folder.mkdir(parents=True)
    (folder / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
    (folder / "result.json").write_text("{}")
    return folder


def _file(path: Path) -> Path:
    path.write_text("precious\n")
    return path


def _link(path: Path) -> Path:
    target = _foreign(path.parent / "link-target")
    path.symlink_to(target)
    return path


# (id, make the output in the case folder -> path, argv given (world, path), needles)
OUTPUTS = [
    (
        "prepare-out-foreign",
        lambda t: _foreign(t / "mine"),
        lambda w, p: ["data", "prepare", "--out", p],
        ["already exists and holds files knet did not write"],
    ),
    (
        "prepare-data.prepared-foreign",
        lambda t: _foreign(t / "mine"),
        lambda w, p: ["data", "prepare", "--set", f"data.prepared={p}"],
        ["already exists and holds files knet did not write"],
    ),
    (
        "prepare-out-a-file",
        lambda t: _file(t / "notes.txt"),
        lambda w, p: ["data", "prepare", "--out", p],
        ["is an existing file"],
    ),
    (
        "prepare-out-a-link",
        lambda t: _link(t / "ln"),
        lambda w, p: ["data", "prepare", "--out", p],
        ["is a symbolic link"],
    ),
    (
        "prepare-out-synth-output",
        lambda t: _marked(t / "synth", "synth"),
        lambda w, p: ["data", "prepare", "--out", p],
        ["holds knet's synth output"],
    ),
    (
        "prepare-out-junk-marker",
        lambda t: _file(_foreign(t / "m") / MARKER).parent,
        lambda w, p: ["data", "prepare", "--out", p],
        ["files knet did not write"],
    ),
    (
        "synth-out-foreign",
        lambda t: _foreign(t / "mine"),
        lambda w, p: ["data", "synth", "--out", p],
        ["already exists and holds files knet did not write"],
    ),
    (
        "synth-out-a-file",
        lambda t: _file(t / "notes.txt"),
        lambda w, p: ["data", "synth", "--out", p],
        ["is an existing file"],
    ),
    (
        "synth-out-prepared-output",
        lambda t: _marked(t / "prep", "prepared"),
        lambda w, p: ["data", "synth", "--set", f"data.synth.out={p}"],
        ["holds knet's prepared output"],
    ),
    (
        "evaluate-out-foreign",
        lambda t: _foreign(t / "mine"),
        lambda w, p: ["evaluate", "--checkpoint", w["checkpoint"], "--out", p],
        ["already exists and holds files knet did not write"],
    ),
    (
        "evaluate-out-a-file",
        lambda t: _file(t / "notes.txt"),
        lambda w, p: ["evaluate", "--checkpoint", w["checkpoint"], "--out", p],
        ["is an existing file"],
    ),
    (
        "evaluate-out-predict-output",
        lambda t: _marked(t / "pred", "predict"),
        lambda w, p: ["evaluate", "--checkpoint", w["checkpoint"], "--set", f"evaluate.out={p}"],
        ["holds knet's predict output"],
    ),
    (
        "evaluate-metrics-a-folder",
        lambda t: _foreign(t / "metrics.json"),
        lambda w, p: ["evaluate", "--checkpoint", w["checkpoint"], "--metrics", p],
        ["output", "is a folder; give a file path"],
    ),
    (
        "evaluate-metrics-a-users-file",
        lambda t: _file(t / "mine.json"),
        lambda w, p: ["evaluate", "--checkpoint", w["checkpoint"], "--metrics", p],
        ["already exists and knet did not write it as metrics output"],
    ),
    (
        "train-output-a-foreign-file",
        lambda t: _file(t / "notes.md"),
        lambda w, p: ["train", "--set", f"train.output={p}"],
        ["checkpoint output", "is not a knet checkpoint"],
    ),
    (
        "train-output-a-folder",
        lambda t: _foreign(t / "models"),
        lambda w, p: ["train", "--set", f"train.output={p}"],
        ["checkpoint output", "exists and is not a file"],
    ),
]


@pytest.mark.parametrize(
    ("make", "args", "needles"), [pytest.param(m, a, n, id=i) for i, m, a, n in OUTPUTS]
)
def test_an_output_knet_did_not_write_is_refused(capsys, world, case, make, args, needles):
    path = make(case)
    argv = [*args(world, path), "--params", world["params"]]
    if argv[0] == "evaluate" and "--out" not in argv and "evaluate.out=" not in str(argv):
        argv += ["--out", case / "eval"]
    if argv[0] == "evaluate" and "--metrics" not in argv:
        argv += ["--metrics", case / "eval.json"]
    if argv[0] == "data" and argv[1] == "synth" and "--out" not in argv:
        argv += ["--quiet"]
    refused(capsys, [case, world["tmp"]], argv, 2, [str(path), *needles])


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        pytest.param(lambda t: _file(t / "notes.txt"), ["is an existing file"], id="a-file"),
        pytest.param(lambda t: _foreign(t / "photos"), ["files knet did not write"], id="foreign"),
        pytest.param(lambda t: _link(t / "ln"), ["is a symbolic link"], id="a-link"),
        pytest.param(lambda t: _marked(t / "ev", "eval"), ["knet's eval output"], id="eval-out"),
    ],
)
def test_predict_out_knet_did_not_write_is_refused(capsys, world, case, make, needles):
    path = make(case)
    argv = ["predict", world["images"][0], "--checkpoint", world["checkpoint"], "--out", path]
    refused(capsys, [case, world["tmp"]], [*argv, "--quiet"], 2, [str(path), *needles])


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


class _Payload:
    """Stands for any pickled object a tampered checkpoint could carry."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def _tweak(world: dict, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        payload = torch.load(world["checkpoint"], weights_only=True)
        change(payload)
        torch.save(payload, path)

    return write


def _drop_weight(payload: dict) -> None:
    payload["model"].pop(next(iter(payload["model"])))


def _unknown_config_key(payload: dict) -> None:
    payload["config"]["model"]["bogus"] = 1


# (id, writes the bad checkpoint at the path given (world -> writer), exit code, needles)
CHECKPOINTS = [
    ("missing", lambda w: None, 2, ["does not exist"]),
    ("a-directory", lambda w: Path.mkdir, 2, ["is a directory"]),
    ("a-text-file", lambda w: lambda p: p.write_text("hello"), 2, ["not a readable checkpoint"]),
    ("zero-bytes", lambda w: lambda p: p.write_bytes(b""), 2, ["is empty (0 bytes)"]),
    (
        "a-zip-but-not-torch",
        lambda w: (
            lambda p: (
                shutil.make_archive(str(p.with_suffix("")), "zip", w["tmp"] / "raw")
                and os.replace(str(p.with_suffix(".zip")), p)
            )
        ),
        2,
        ["not a readable checkpoint"],
    ),
    ("a-tensor", lambda w: lambda p: torch.save(torch.zeros(3), p), 2, ["not a knet checkpoint"]),
    (
        "a-foreign-state-dict",
        lambda w: lambda p: torch.save({"state_dict": {"w": torch.zeros(1)}}, p),
        2,
        ["not a knet checkpoint (expected keys"],
    ),
    (
        "a-pickled-object",
        lambda w: lambda p: torch.save({"version": 1, "x": _Payload()}, p),
        2,
        ["not a readable checkpoint", "Weights only load failed"],
    ),
    (
        "version-99",
        lambda w: _tweak(w, lambda c: c.update(version=99)),
        2,
        ["checkpoint version 99; this knet reads up to 1"],
    ),
    (
        "version-0",
        lambda w: _tweak(w, lambda c: c.update(version=0)),
        2,
        ["checkpoint version must be a positive integer; got 0"],
    ),
    (
        "version-true",
        lambda w: _tweak(w, lambda c: c.update(version=True)),
        2,
        ["checkpoint version must be a positive integer; got True"],
    ),
    (
        "config-not-a-mapping",
        lambda w: _tweak(w, lambda c: c.update(config=[1, 2])),
        2,
        ["config and model must be mappings"],
    ),
    (
        "config-unknown-key",
        lambda w: _tweak(w, _unknown_config_key),
        2,
        ["does not hold a usable knet model", "model.bogus is not a known key"],
    ),
    (
        "categories-a-string",
        lambda w: _tweak(w, lambda c: c.update(categories="nope")),
        2,
        ["does not hold a usable knet model"],
    ),
    (
        "categories-without-isthing",
        lambda w: _tweak(w, lambda c: c.update(categories=[{"id": 1, "name": "a"}])),
        2,
        ["does not hold a usable knet model", "has no isthing flag"],
    ),
    (
        "a-weight-missing",
        lambda w: _tweak(w, _drop_weight),
        2,
        ["weights do not fit the model", "1 missing"],
    ),
]


@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize(
    ("write", "code", "needles"), [pytest.param(w, c, n, id=i) for i, w, c, n in CHECKPOINTS]
)
def test_bad_checkpoint(capsys, world, case, command, write, code, needles):
    path = case / "bad.pt"
    writer = write(world)
    if writer is not None:
        writer(path)
    if command == "evaluate":
        argv = ["evaluate", "--quiet", "--params", world["params"], "--checkpoint", path]
        argv += ["--out", case / "eval", "--metrics", case / "eval.json"]
    else:
        argv = ["predict", world["images"][0], "--quiet", "--checkpoint", path]
        argv += ["--out", case / "pred"]
    refused(capsys, [case, world["tmp"]], argv, code, [str(path), *needles])


@pytest.mark.parametrize("task", ["instance", "semantic"])
def test_a_checkpoint_of_another_task_is_refused_for_results_it_cannot_give(
    capsys, world, case, task
):
    """An instance or semantic model asked for panoptic results: one line naming the model's
    task and what it gives, nothing written."""
    import dataclasses

    from knet.config import load_config
    from tests.test_train import untrained_checkpoint

    cfg = load_config(world["params"])
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, task=task))
    path = untrained_checkpoint(other, case / f"{task}.pt")
    argv = ["predict", world["images"][0], "--quiet", "--checkpoint", path, "--task", "panoptic"]
    refused(capsys, [case, world["tmp"]], [*argv, "--out", case / "pred"], 2,
            [f"a {task} model cannot give panoptic results"])  # fmt: skip


def test_evaluate_checkpoint_default_from_params_missing(capsys, world, case):
    missing = case / "outputs" / "train" / "model.pt"
    argv = ["evaluate", "--quiet", "--params", world["params"], "--out", case / "e"]
    argv += ["--metrics", case / "m.json", "--set", f"evaluate.checkpoint={missing}"]
    refused(capsys, [case, world["tmp"]], argv, 2, [f"checkpoint {missing} does not exist"])


def test_promote_a_missing_checkpoint(capsys, world, case):
    missing = case / "nope.pt"
    argv = ["promote", "--params", world["params"], "--checkpoint", missing]
    argv += ["--set", f"tracking.uri=sqlite:///{case / 'mlflow.db'}"]
    refused(capsys, [case, world["tmp"]], argv, 2, [f"checkpoint {missing} does not exist"])


# --------------------------------------------------------------------------------------------
# Images for predict
# --------------------------------------------------------------------------------------------


def _bomb_png(path: Path) -> None:
    """A valid PNG header claiming 30000 x 30000 pixels (PIL's decompression-bomb guard)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = (30000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
    path.write_bytes(data + chunk(b"IEND", b""))


def _truncated_png(world: dict, case: Path) -> Path:
    path = case / "cut.png"
    path.write_bytes(world["images"][0].read_bytes()[:120])
    return path


# (id, make the input (world, case folder) -> path, exit code, needles besides the path)
PREDICT_INPUTS = [
    ("not-an-image", lambda w, t: _file(t / "x.png"), 1, ["cannot read image"]),
    ("zero-bytes", lambda w, t: (t / "z.jpg").touch() or t / "z.jpg", 1, ["cannot read image"]),
    (
        "truncated-png",
        _truncated_png,
        1,
        ["cannot read image"],
    ),
    (
        "decompression-bomb",
        lambda w, t: _bomb_png(t / "bomb.png") or t / "bomb.png",
        1,
        ["cannot read image", "exceeds limit"],
    ),
    ("missing-path", lambda w, t: t / "missing.png", 2, ["does not exist"]),
    ("empty-folder", lambda w, t: (t / "in").mkdir() or t / "in", 2, ["no image files"]),
    (
        "folder-without-images",
        lambda w, t: _file(_foreign(t / "in") / "readme.md").parent,
        2,
        ["no image files"],
    ),
    (
        "dangling-link",
        lambda w, t: (t / "ln.png").symlink_to(t / "x") or t / "ln.png",
        2,
        ["does not exist"],
    ),
]


@pytest.mark.parametrize(
    ("make", "code", "needles"), [pytest.param(m, c, n, id=i) for i, m, c, n in PREDICT_INPUTS]
)
def test_predict_input(capsys, world, case, make, code, needles):
    path = make(world, case)
    out = case / "pred"
    argv = ["predict", path, "--quiet", "--checkpoint", world["checkpoint"], "--out", out]
    refused(capsys, [case, world["tmp"]], argv, code, [str(path), *needles])
    assert not out.exists()  # a run that writes no result leaves no output folder


# --------------------------------------------------------------------------------------------
# Command-line paths and flags
# --------------------------------------------------------------------------------------------


def _eval(world: dict, case: Path) -> list[Any]:
    return [
        "evaluate", "--quiet", "--params", world["params"], "--checkpoint", world["checkpoint"],
        "--out", case / "eval", "--metrics", case / "eval.json",
    ]  # fmt: skip


def _predict(world: dict, case: Path) -> list[Any]:
    return ["predict", world["images"][0], "--quiet", "--out", case / "pred"]


# (id, argv (world, case), exit code, needles)
FLAGS = [
    ("no-command", lambda w, t: [], 2, ["the following arguments are required: COMMAND"]),
    ("unknown-command", lambda w, t: ["trian"], 2, ["invalid choice: 'trian'"]),
    ("unknown-action", lambda w, t: ["data", "frobnicate"], 2, ["invalid choice: 'frobnicate'"]),
    ("unknown-flag", lambda w, t: ["config", "show", "--bogus"], 2, ["unrecognized", "--bogus"]),
    (
        "predict-device-banana",
        lambda w, t: [*_predict(w, t), "--checkpoint", w["checkpoint"], "--device", "banana"],
        2,
        ["'banana' is not a device"],
    ),
    (
        "predict-device-meta",
        lambda w, t: [*_predict(w, t), "--checkpoint", w["checkpoint"], "--device", "meta"],
        2,
        ["'meta': knet runs on cpu or cuda"],
    ),
    (
        "predict-device-cuda-99",
        lambda w, t: [*_predict(w, t), "--checkpoint", w["checkpoint"], "--device", "cuda:99"],
        2,
        ["argument --device: 'cuda:99'"],
    ),
    ("evaluate-device-empty", lambda w, t: [*_eval(w, t), "--device", ""], 2, ["'' is not a"]),
    (
        "evaluate-max-images-negative",
        lambda w, t: [*_eval(w, t), "--max-images", "-1"],
        2,
        ["--max-images", "must be at least 1; got -1"],
    ),
    (
        "evaluate-max-images-fraction",
        lambda w, t: [*_eval(w, t), "--max-images", "1.5"],
        2,
        ["--max-images", "'1.5' is not an integer"],
    ),
    (
        "evaluate-kernel-maps-with-a-value",
        lambda w, t: [*_eval(w, t), "--kernel-maps=yes"],
        2,
        ["--kernel-maps", "ignored explicit argument 'yes'"],
    ),
    (
        "predict-task-depth",
        lambda w, t: [*_predict(w, t), "--checkpoint", w["checkpoint"], "--task", "depth"],
        2,
        ["--task", "invalid choice: 'depth'"],
    ),
    (
        "predict-no-model",
        lambda w, t: _predict(w, t),
        2,
        ["one of the arguments --checkpoint --model is required"],
    ),
    (
        "predict-checkpoint-and-model",
        lambda w, t: [*_predict(w, t), "--checkpoint", "a.pt", "--model", "models:/x@y"],
        2,
        ["not allowed with argument"],
    ),
    (
        "promote-run-id-and-checkpoint",
        lambda w, t: ["promote", "--run-id", "abc", "--checkpoint", "a.pt"],
        2,
        ["--checkpoint", "not allowed with argument --run-id"],
    ),
    (
        "validate-strict-and-lenient",
        lambda w, t: ["data", "validate", "--strict", "--lenient"],
        2,
        ["--lenient", "not allowed with argument --strict"],
    ),
    (
        "summary-num-things-text",
        lambda w, t: ["model", "summary", "--num-things", "many"],
        2,
        ["--num-things", "invalid int value: 'many'"],
    ),
    (
        "evaluate-split-missing",
        lambda w, t: [*_eval(w, t), "--split", "nosuch"],
        2,
        ["prepared/nosuch/index.json does not exist"],
    ),
    (
        "evaluate-prepared-missing",
        lambda w, t: [*_eval(w, t), "--set", f"data.prepared={t / 'nope'}"],
        2,
        ["nope/val/index.json does not exist"],
    ),
    (
        "evaluate-index-not-json",
        lambda w, t: [*_eval(w, t), "--set", f"data.prepared={_index(t, '{nope')}"],
        1,  # the data is at fault, not the command
        ["prep/val/index.json is not a readable prepared index"],
    ),
    (
        "evaluate-index-a-list",
        lambda w, t: [*_eval(w, t), "--set", f"data.prepared={_index(t, '[]')}"],
        1,  # the data is at fault, not the command
        ["prep/val/index.json is not a prepared index"],
    ),
    (
        "evaluate-index-a-folder",
        lambda w, t: [*_eval(w, t), "--set", f"data.prepared={_index(t, None)}"],
        1,  # the data is at fault, not the command
        ["prep/val/index.json is not a readable prepared index"],
    ),
]


def _index(case: Path, text: str | None) -> Path:
    """A prepared folder whose val index.json holds ``text`` (None: is a folder)."""
    split = case / "prep" / "val"
    split.mkdir(parents=True, exist_ok=True)
    if text is None:
        (split / "index.json").mkdir(exist_ok=True)
    else:
        (split / "index.json").write_text(text)
    return case / "prep"


@pytest.mark.parametrize(
    ("args", "code", "needles"), [pytest.param(a, c, n, id=i) for i, a, c, n in FLAGS]
)
def test_flag(capsys, world, case, args, code, needles):
    argv = args(world, case)
    refused(capsys, [case, world["tmp"]], argv, code, needles)
    assert not (case / "eval").exists() and not (case / "pred").exists()


# --------------------------------------------------------------------------------------------
# Registered-model URIs (a temporary sqlite store; never the project's mlflow.db)
# --------------------------------------------------------------------------------------------

# (id, URI, exit code, needles besides the URI)
URIS = [
    ("no-such-model", "models:/nope/1", ["registered model 'nope' does not exist"]),
    ("no-such-alias", f"models:/{MODEL_NAME}@nope", ["has no alias 'nope'", "champion -> v1"]),
    ("no-such-version", f"models:/{MODEL_NAME}/7", ["has no version 7"]),
    ("runs-uri", "runs:/bad", ["is not a registered model URI"]),
    ("empty-name", "models:/", ["is not a registered model URI"]),
    ("too-many-parts", "models:/a/b/c", ["is not a registered model URI"]),
    ("empty-alias", f"models:/{MODEL_NAME}@", ["is not a registered model URI"]),
    ("version-not-a-number", f"models:/{MODEL_NAME}/latest", ["is not a registered model URI"]),
    ("plain-alias", "champion", ["is not a registered model URI"]),
    ("a-file-path", "outputs/train/model.pt", ["is not a registered model URI"]),
]


@pytest.mark.parametrize("command", ["predict", "evaluate", "lineage"])
@pytest.mark.parametrize(("uri", "needles"), [pytest.param(u, n, id=i) for i, u, n in URIS])
def test_model_uri(capsys, world, case, command, uri, needles):
    if command == "predict":
        argv = [*_predict(world, case), "--model", uri, "--tracking-uri", world["store"]]
    elif command == "evaluate":
        argv = _eval(world, case)
        argv[argv.index("--checkpoint") : argv.index("--checkpoint") + 2] = ["--model", uri]
        argv += ["--tracking-uri", world["store"]]
    else:
        argv = ["lineage", uri, "--tracking-uri", world["store"]]
    refused(capsys, [case, world["tmp"]], argv, 2, [repr(uri)[1:-1], *needles])


@pytest.mark.parametrize("command", ["predict", "lineage"])
def test_a_tracking_store_that_does_not_exist_is_not_created(capsys, world, case, command):
    db = case / "no" / "such" / "mlflow.db"
    uri = f"sqlite:///{db}"
    if command == "predict":
        argv = [*_predict(world, case), "--model", f"models:/{MODEL_NAME}@champion"]
        argv += ["--tracking-uri", uri]
    else:
        argv = ["lineage", f"models:/{MODEL_NAME}@champion", "--tracking-uri", uri]
    refused(capsys, [case, world["tmp"]], argv, 2, [str(db), "does not exist"])
    assert not (case / "no").exists()


def test_a_tracking_uri_of_an_unknown_scheme(capsys, world, case):
    argv = ["lineage", f"models:/{MODEL_NAME}@champion", "--tracking-uri", "banana://x"]
    refused(capsys, [case, world["tmp"]], argv, 1, ["'banana://x'", "unsupported URI"])


# --------------------------------------------------------------------------------------------
# A run that goes wrong while it trains
# --------------------------------------------------------------------------------------------


def test_a_nan_loss_ends_knet_train_with_one_line_and_keeps_the_last_good_checkpoint(
    capsys, world, case, monkeypatch
):
    """Losses that turn NaN (injected through the documented test hook, as a diverging run
    would) stop ``knet train`` after train.max_bad_steps with one line, exit 1, no traceback;
    the last good epoch's checkpoint is published."""
    monkeypatch.setenv(faults.ENV_VAR, json.dumps({"nan_from_epoch": 1}))
    out = case / "out" / "model.pt"
    argv = ["train", "--params", world["params"], "--set", "train.num_workers=0"]
    argv += ["train.epochs=3", "train.max_bad_steps=1", "train.eval_every=10"]
    argv += [f"train.output={out}", f"train.metrics={case / 'metrics' / 'train.json'}"]
    before = snapshot(world["tmp"])
    code, err, stdout = knet(capsys, argv)
    assert code == 1, (err, stdout)
    assert "Traceback" not in err + stdout
    errors = [line for line in err.splitlines() if line.startswith("knet: error:")]
    assert len(errors) == 1 and "NaN/inf loss" in errors[0], err
    assert "train.max_bad_steps=1" in errors[0]
    assert load_checkpoint(out)["epoch"] == 1  # the last good one, where DVC expects it
    assert snapshot(world["tmp"]) == before  # the shared project is untouched
