"""Nothing is deleted or replaced that knet did not create (issue 18, the data-loss cases).

Each case runs the real ``knet`` command in a project-like folder and compares the whole tree,
byte for byte, before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from knet.data.categories import Categories
from knet.evaluation.predict import output_names
from knet.io import (
    MARKER,
    OutputExistsError,
    atomic_directory,
    check_output_dir,
    output_kind,
)
from knet.method.checkpoint import save_checkpoint
from knet.model import build_model
from tests.conftest import ROOT, tiny_config

SMALL = {"image_size": 48, "train_images": 3, "val_images": 2}


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones and .git included): kind and content hash."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                tree[rel] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                tree[rel] = "dir"
            else:
                tree[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


def knet(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("knet", path=str(Path(sys.executable).parent))
    assert exe, "the knet console script is not installed next to this python"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's project: params, code, a .git folder, a raw dataset and a trained model."""
    root = tmp_path / "project"
    root.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["synth"].update(SMALL)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "notes.md").write_text("my notes\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    other = root / "data" / "raw" / "mine"
    other.mkdir(parents=True)
    (other / "labels.csv").write_text("a,b\n1,2\n")
    return root


def _refused(out: subprocess.CompletedProcess, what: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "already exists" in out.stderr or "is an existing file" in out.stderr, out.stderr
    assert what in out.stderr
    assert "Traceback" not in out.stderr


def test_synth_into_the_project_root_is_refused_and_touches_nothing(project):
    before = snapshot(project)
    _refused(knet(project, "data", "synth", "--quiet", "--out", "."), f"output {project} ")
    assert snapshot(project) == before


def test_prepare_into_a_folder_of_other_data_is_refused(project):
    assert knet(project, "data", "synth", "--quiet").returncode == 0
    before = snapshot(project)
    _refused(knet(project, "data", "prepare", "--quiet", "--out", "data"), "output data")
    assert snapshot(project) == before


def test_prepare_replaces_its_own_output_and_lenient_never_publishes_an_empty_one(project):
    assert knet(project, "data", "synth", "--quiet").returncode == 0
    out = knet(project, "data", "prepare", "--quiet")
    assert out.returncode == 0, out.stderr
    assert output_kind(project / "data" / "prepared") == "prepared"
    out = knet(project, "data", "prepare", "--quiet")  # its own output: replaced
    assert out.returncode == 0, out.stderr
    before = snapshot(project)
    # A wrong image template: every image is an error, --lenient would skip them all.
    out = knet(project, "data", "prepare", "--quiet", "--lenient", "--set", "data.images=nope")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "no usable images" in out.stderr and "data.images='nope'" in out.stderr
    assert "Traceback" not in out.stderr
    assert snapshot(project) == before


def _tiny_checkpoint(path: Path) -> None:
    cfg = tiny_config("panoptic")
    categories = Categories.from_coco(
        [
            {"id": 1, "name": "a", "isthing": 1},
            {"id": 2, "name": "b", "isthing": 0},
        ]
    )
    model = build_model(cfg.model, categories.num_things, categories.num_stuff)
    save_checkpoint(path, model, cfg, categories)


def test_evaluate_into_a_folder_holding_the_model_is_refused(project):
    model = project / "outputs" / "train" / "model.pt"
    model.parent.mkdir(parents=True)
    _tiny_checkpoint(model)
    before = snapshot(project)
    out = knet(project, "evaluate", "--quiet", "--out", "outputs")
    _refused(out, "output outputs")
    assert snapshot(project) == before


def test_predict_refuses_a_folder_of_user_files_and_never_collides_names(project):
    model = project / "model.pt"
    _tiny_checkpoint(model)
    photos = project / "photos"
    photos.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photos / "a.png")
    Image.fromarray(pixels).save(photos / "a.jpg")
    before = snapshot(project)
    # Writing the overlays into the photos folder would overwrite a.png.
    out = knet(project, "predict", "photos", "--checkpoint", "model.pt", "--out", "photos")
    _refused(out, "output photos")
    assert snapshot(project) == before

    out = knet(project, "predict", "photos", "--quiet", "--checkpoint", "model.pt")
    assert out.returncode == 0, out.stderr
    written = sorted(p.name for p in (project / "outputs" / "predict").iterdir())
    assert written == [MARKER, "a.jpg.json", "a.jpg.png", "a.png.json", "a.png.png"]
    assert "wrote 2 " in out.stdout
    segments = json.loads((project / "outputs" / "predict" / "a.jpg.json").read_text())
    assert segments["image"].endswith("a.jpg")
    # Its own output may be written again.
    out = knet(project, "predict", "photos/a.png", "--quiet", "--checkpoint", "model.pt")
    assert out.returncode == 0, out.stderr


def test_output_names_are_distinct():
    paths = [Path("x/a.jpg"), Path("x/a.png"), Path("y/a.jpg"), Path("y/b.png")]
    assert output_names(paths) == ["a.jpg", "a.png", "a.jpg-2", "b"]


def test_check_output_dir_rules(tmp_path):
    check_output_dir(tmp_path / "new", "eval")  # new
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "eval")  # empty
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is an existing file"):
        check_output_dir(tmp_path / "file", "eval")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(OutputExistsError, match="symbolic link"):
        check_output_dir(tmp_path / "link", "eval")
    with atomic_directory(tmp_path / "made", "synth") as tmp:
        (tmp / "x.txt").write_text("1")
    assert output_kind(tmp_path / "made") == "synth"
    check_output_dir(tmp_path / "made", "synth")
    with pytest.raises(OutputExistsError, match="knet's synth output"):
        check_output_dir(tmp_path / "made", "eval")
    (tmp_path / "made" / MARKER).write_text("not json")
    with pytest.raises(OutputExistsError, match="files knet did not write"):
        check_output_dir(tmp_path / "made", "synth")


def test_a_failure_inside_atomic_directory_leaves_the_old_output(tmp_path):
    with atomic_directory(tmp_path / "out", "eval") as tmp:
        (tmp / "keep.txt").write_text("old")
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out", "eval") as tmp:
        (tmp / "keep.txt").write_text("new")
        raise RuntimeError("boom")
    assert snapshot(tmp_path) == before


def test_train_never_writes_its_checkpoint_over_a_file_that_is_not_one(project):
    before = snapshot(project)
    out = knet(project, "train", "--set", "train.output=notes.md", "tracking.enabled=false")
    assert out.returncode == 2, (out.stdout, out.stderr)
    expected = f"checkpoint output {project / 'notes.md'} already exists and is not a knet"
    assert expected in out.stderr
    assert "Traceback" not in out.stderr
    assert snapshot(project) == before


def test_json_outputs_are_valid_json_with_null_for_nan(tmp_path):
    from knet.io import write_json_atomic

    path = tmp_path / "m.json"
    write_json_atomic(path, {"ap": float("nan"), "pq": 1.5, "h": [float("inf"), {"x": 2.0}]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"ap": None, "pq": 1.5, "h": [None, {"x": 2.0}]}


def test_single_file_outputs_replace_only_what_knet_wrote(tmp_path):
    """The rule of shared folders (metrics/, reports/): a file knet wrote as that kind is
    replaced; a file of the user's, a folder or a link is refused; nothing is touched."""
    from knet.io import LEDGER, check_output_file, write_output_file

    folder = tmp_path / "metrics"
    write_output_file(folder / "eval.json", "{}", "metrics")
    write_output_file(folder / "eval.json", '{"pq": 1}', "metrics")  # its own: replaced
    assert (folder / "eval.json").read_text() == '{"pq": 1}'
    assert json.loads((folder / LEDGER).read_text()) == {"eval.json": "metrics"}
    (folder / "mine.json").write_text("my numbers\n")
    (folder / "dir.json").mkdir()
    (folder / "link.json").symlink_to(folder / "mine.json")
    before = snapshot(tmp_path)
    for name, needle in (
        ("mine.json", "already exists and knet did not write it as metrics output"),
        ("dir.json", "is a folder"),
        ("link.json", "is a symbolic link"),
    ):
        with pytest.raises(OutputExistsError, match=needle):
            write_output_file(folder / name, "{}", "metrics")
    with pytest.raises(OutputExistsError, match="did not write it as promotion output"):
        check_output_file(folder / "eval.json", "promotion")  # knet's, but another kind
    assert snapshot(tmp_path) == before


@pytest.fixture
def prepared(project: Path) -> Path:
    for command in (["data", "synth", "--quiet"], ["data", "prepare", "--quiet"]):
        out = knet(project, *command)
        assert out.returncode == 0, out.stderr
    return project


def test_commands_never_write_a_metrics_or_report_file_over_the_users(prepared):
    """train.metrics, evaluate --metrics (and its per-class CSV), registry.output and the
    ablation reports: a file of the user's at that path is refused before any work."""
    project = prepared
    model = project / "outputs" / "train" / "model.pt"
    model.parent.mkdir(parents=True)
    _tiny_checkpoint(model)
    (project / "metrics").mkdir()
    (project / "metrics" / "mine.json").write_text('{"my": "numbers"}\n')
    (project / "metrics" / "other_per_class.csv").write_text("mine\n")
    (project / "reports").mkdir()
    (project / "reports" / "ablation.md").write_text("# my own ablation notes\n")
    before = snapshot(project)
    cases = [
        (["train", "--set", "train.metrics=metrics/mine.json", "tracking.enabled=false"],
         "metrics/mine.json"),
        (["evaluate", "--quiet", "--metrics", "metrics/mine.json"], "metrics/mine.json"),
        (["evaluate", "--quiet", "--metrics", "metrics/other.json"],
         "metrics/other_per_class.csv"),  # other.json's per-class CSV is the user's file
        (["promote", "--set", "registry.output=metrics/mine.json"], "metrics/mine.json"),
        (["tune", "--set", "tracking.enabled=false"], "reports/ablation.md"),
    ]  # fmt: skip
    for args, what in cases:
        out = knet(project, *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "already exists and knet did not write it" in out.stderr, (args, out.stderr)
        assert what in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
        assert snapshot(project) == before, args


def test_lenient_prepare_of_a_dataset_without_categories_publishes_nothing(prepared):
    """`--lenient` skips bad items but never publishes a dataset without categories over a
    good one."""
    ann = prepared / "data" / "raw" / "synth" / "annotations" / "panoptic_train.json"
    data = json.loads(ann.read_text())
    data["categories"] = []
    ann.write_text(json.dumps(data))
    before = snapshot(prepared)
    out = knet(prepared, "data", "prepare", "--quiet", "--lenient")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "knet: prepare refused" in out.stderr and "nothing was written" in out.stderr
    assert "Traceback" not in out.stderr
    assert snapshot(prepared) == before
