"""The real-image preset: StarDist's packaged nuclei micrograph as a COCO instance dataset.

``make install`` installs the stardist wheel without its dependencies (only its data files are
read). Where it is missing, the data tests skip with the install command, and the error a user
gets without it is tested either way.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from knet.config import load_config
from knet.data import nuclei
from knet.data.layout import dataset_paths
from knet.data.prepare import prepare
from knet.data.validate import validate_split
from knet.io import OutputExistsError

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "nuclei-instance.yaml"

needs_package = pytest.mark.skipif(
    importlib.util.find_spec(nuclei.PACKAGE) is None,
    reason=f"pip install --no-deps {nuclei.PACKAGE_PIN} (make install does)",
)


def preset(tmp: Path, *extra: str):
    return load_config(
        PRESET, [f"data.raw={tmp / 'raw'}", f"data.prepared={tmp / 'prepared'}", *extra]
    )


@pytest.fixture(scope="module")
def nuclei_data(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("nuclei")
    cfg = preset(tmp)
    summary = nuclei.generate_nuclei(cfg.data.raw, cfg.data)
    assert summary["images"] == {"train": 117, "val": 4}
    return tmp


@needs_package
def test_the_tiles_hold_the_hand_made_masks_and_val_is_held_out(nuclei_data):
    cfg = preset(nuclei_data)
    image, labels = nuclei.load_micrograph()
    assert image.shape == (512, 512, 3) and image.dtype.name == "uint8" and image.max() == 255
    assert len(set(labels.ravel().tolist()) - {0}) == 125
    for split, count in (("train", 117), ("val", 4)):
        coco = json.loads(
            (nuclei_data / "raw" / "annotations" / f"instances_{split}.json").read_text()
        )
        assert len(coco["images"]) == count
        assert [c["name"] for c in coco["categories"]] == ["nucleus"]
        ids = [a["id"] for a in coco["annotations"]]
        assert len(ids) == len(set(ids)) and all(a["area"] > 0 for a in coco["annotations"])
        names = [im["file_name"] for im in coco["images"]]
        rows = {int(name.split("_")[1]) for name in names}
        # Train tiles end at row 384 at the latest; val tiles are the rows 384..511.
        assert (max(rows) + nuclei.TILE <= 384) if split == "train" else rows == {384}
        report = validate_split(dataset_paths(cfg.data, split), cfg.data.format)
        assert report.ok and not report.problems, report.problems[:3]
    # The val split has the 41 visible pieces of the nuclei in the bottom 128 rows.
    assert prepare(cfg.data, progress=False).splits["val"]["segments"] == 41


@needs_package
def test_a_folder_knet_did_not_write_is_refused_and_kept(tmp_path):
    own = tmp_path / "mine"
    own.mkdir()
    (own / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError):
        nuclei.generate_nuclei(own)
    assert (own / "notes.txt").read_text() == "keep me"
    nuclei.generate_nuclei(tmp_path / "again")
    nuclei.generate_nuclei(tmp_path / "again")  # its own output: replaced


def test_without_the_package_the_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(nuclei, "PACKAGE", "knet_no_such_package")
    with pytest.raises(nuclei.PackageDataMissing, match=r"pip install --no-deps stardist==0\.9\.2"):
        nuclei.package_files()


@needs_package
@pytest.mark.slow
def test_knet_learns_the_nuclei_from_scratch(nuclei_data, tmp_path):
    """About 60 s on 2 cores: 8 of the preset's 32 epochs (decay before the last), one val.

    Measured 2026-12-03 at this schedule: AP 14.4, AP50 30.9 (random init gives 0); the floor
    sits far under that and far above what a model that finds no nuclei gets.
    """
    from knet.training import train

    cfg = preset(
        nuclei_data,
        "train.epochs=8",
        "optim.lr_steps=[7]",
        "train.eval_every=8",
        "train.num_workers=0",
        "tracking.enabled=false",
        f"train.output={tmp_path / 'model.pt'}",
        f"train.metrics={tmp_path / 'train.json'}",
        f"train.storage_path={tmp_path / 'ray'}",
    )
    prepare(cfg.data, progress=False)
    final = train(cfg, root=tmp_path).final
    assert final["val_ap50"] >= 10.0, final
