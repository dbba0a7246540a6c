"""Categories, transforms, prepare and the prepared-split loaders, on real formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from knet.config import load_config
from knet.data.categories import Categories
from knet.data.dataset import build_dataset, build_loader, collate
from knet.data.prepare import prepare
from knet.data.synth import generate
from knet.data.transforms import Transform, scaled_size
from knet.data.validate import DatasetValidationError
from knet.io import json_safe
from knet.structures import IGNORE_LABEL

SAMPLE = Path(__file__).parent / "data" / "coco-panoptic-sample"
SYNTH = ["data.synth.image_size=64", "data.synth.train_images=6", "data.synth.val_images=3"]


def sample_config(tmp_path: Path, *extra: str):
    """The real COCO sample as both splits (its layout has no split folders)."""
    root = tmp_path / "coco"
    shutil.copytree(SAMPLE, root)
    return load_config(
        None,
        [
            f"data.raw={root}",
            f"data.prepared={tmp_path / 'prepared'}",
            "data.images=images",
            "data.panoptic_json=panoptic.json",
            "data.panoptic_dir=panoptic",
            "data.min_size=[64]",
            "data.max_size=128",
            "data.test_size=64",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synth")
    cfg = load_config(
        None,
        [
            *SYNTH,
            f"data.raw={tmp / 'raw'}",
            f"data.prepared={tmp / 'prep'}",
            "data.min_size=[64]",
            "data.max_size=64",
            "data.test_size=64",
        ],
    )
    generate(cfg.data.raw, cfg.data.synth, cfg.data, progress=False)
    prepare(cfg.data, progress=False)
    return cfg


def test_categories_follow_the_dataset_split_things_first():
    coco = json.loads((SAMPLE / "panoptic.json").read_text())["categories"]
    cats = Categories.from_coco(coco)
    assert (cats.num_things, cats.num_stuff) == (80, 53)
    assert all(cats.is_thing[:80]) and not any(cats.is_thing[80:])
    assert cats.names[0] == "person" and cats.train_id(1) == 0
    assert cats.ids[80] == min(c["id"] for c in coco if not c["isthing"])
    with pytest.raises(KeyError, match="unknown category id 999"):
        cats.train_id(999)
    assert Categories.from_json(cats.to_json()) == cats
    with pytest.raises(ValueError, match="isthing"):
        Categories.from_coco([{"id": 1, "name": "a"}])


def test_scaled_size_keeps_aspect_and_caps_the_long_side():
    assert scaled_size(480, 640, 800, 1333) == (800, 1067)
    assert scaled_size(400, 1600, 800, 1333) == (333, 1333)


def test_transform_pads_to_the_divisor_and_downsamples_masks_to_stride_4():
    cfg = load_config(None, ["data.min_size=[100]", "data.max_size=1000", "data.flip_prob=0"])
    image = torch.randint(0, 255, (50, 80, 3), dtype=torch.uint8)
    masks = torch.zeros(2, 50, 80, dtype=torch.bool)
    masks[0, :25] = True
    masks[1, 25:, 40:] = True
    semantic = torch.full((50, 80), 3)
    out = Transform(cfg.data, train=True)(image, masks, semantic)
    assert out.image_size == (100, 160)
    assert out.image.shape == (3, 128, 160)
    assert out.masks.shape == (2, 32, 40)
    assert out.semantic.shape == (128, 160)
    assert (out.semantic[100:] == IGNORE_LABEL).all() and (out.semantic[:100] == 3).all()
    assert out.masks[0, :12].min() == 1 and out.masks[0, 13:].max() == 0  # 100 px / 4 = 25
    assert (out.image[:, 100:] == 0).all()  # zero padding after normalisation


def test_flip_and_crop():
    cfg = load_config(
        None,
        ["data.min_size=[50]", "data.max_size=100", "data.flip_prob=1", "data.crop_size=[32,32]"],
    )
    image = torch.zeros(50, 80, 3, dtype=torch.uint8)
    masks = torch.zeros(1, 50, 80, dtype=torch.bool)
    masks[0, :, :10] = True  # left edge
    out = Transform(cfg.data, train=True)(image, masks, None)
    assert out.image_size == (32, 32)
    full = Transform(
        load_config(None, ["data.min_size=[50]", "data.max_size=100", "data.flip_prob=1"]).data,
        train=True,
    )
    flipped = full(image, masks, None)
    # 80 px wide -> the flipped mask covers columns 70-80, i.e. stride-4 columns 18-19 are full
    assert flipped.masks[0, :12, 18:20].min() == 1 and flipped.masks[0, :, :17].max() == 0


def test_prepare_takes_the_real_coco_sample(tmp_path):
    cfg = sample_config(tmp_path)
    manifest = prepare(cfg.data, progress=False)
    split = manifest.splits["train"]
    assert split["images"] == 2 and split["skipped"] == []
    index = json.loads((tmp_path / "prepared" / "train" / "index.json").read_text())
    assert len(index["categories"]) == 133
    # Every prepared segment has its panoptic pixel count as area and a valid RLE.
    pan = json.loads((SAMPLE / "panoptic.json").read_text())
    areas = {
        (a["image_id"], s["id"]): s["area"] for a in pan["annotations"] for s in a["segments_info"]
    }  # segment ids are unique per image only
    lines = (tmp_path / "prepared" / "train" / "segments.jsonl").read_text().splitlines()
    for image, line in zip(index["images"], lines, strict=True):
        for seg in json.loads(line):
            assert seg["area"] == areas[image["id"], seg["id"]] == mask_utils.area(seg["rle"])
    assert len(manifest.content_hash) == 64


def test_loader_yields_padded_batches_from_the_real_sample(tmp_path):
    cfg = sample_config(tmp_path)
    prepare(cfg.data, progress=False)
    dataset = build_dataset(cfg.data, "train", "panoptic", train=True)
    assert (dataset.categories.num_things, dataset.categories.num_stuff) == (80, 53)
    batch = collate([dataset[0], dataset[1]])
    assert batch.images.shape[0] == 2 and batch.images.shape[-2] % 32 == 0
    assert batch.images.shape[-1] % 32 == 0
    for t, size in zip(batch.targets, batch.image_sizes, strict=True):
        assert t.masks.shape[-2:] == (batch.images.shape[-2] // 4, batch.images.shape[-1] // 4)
        assert len(t.labels) == len(t.masks) == len(t.is_thing)
        assert bool((t.is_thing == (t.labels < 80)).all())
        assert min(size) == 64
    assert sorted(batch.output_sizes) == [(360, 640), (427, 640)]


def test_instance_task_keeps_things_and_semantic_task_paints_all(synth_data):
    cfg = synth_data
    inst = build_dataset(cfg.data, "val", "instance", train=False)
    for i in range(len(inst)):
        t = inst[i]["targets"]
        assert bool(t.is_thing.all())
    sem = build_dataset(cfg.data, "val", "semantic", train=False)
    item = sem[0]
    assert item["targets"].semantic.shape == item["image"].shape[-2:]
    values = set(item["targets"].semantic.unique().tolist())
    assert values <= set(range(len(sem.categories))) | {IGNORE_LABEL}


def test_multiworker_loader_is_deterministic_and_covers_the_split(synth_data):
    cfg = synth_data
    dataset = build_dataset(cfg.data, "train", "panoptic", train=True)

    def ids(seed):
        loader = build_loader(dataset, batch_size=2, train=True, num_workers=2, seed=seed)
        return [i for batch in loader for i in batch.image_ids]

    first = ids(0)
    assert len(first) == 6 and len(set(first)) == 6
    assert first == ids(0)


def test_distributed_sampler_splits_the_data(synth_data):
    from torch.utils.data import DistributedSampler

    dataset = build_dataset(synth_data.data, "train", "panoptic", train=True)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = build_loader(dataset, batch_size=1, train=True, num_workers=0, sampler=sampler)
        seen.append([i for b in loader for i in b.image_ids])
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == 6


def test_wrong_task_for_the_format_and_missing_prepare_are_clear(synth_data, tmp_path):
    cfg = load_config(None, ["data.format=coco_instance", f"data.prepared={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="knet data prepare"):
        build_dataset(cfg.data, "train", "panoptic", train=True)
    index = json.loads((Path(synth_data.data.prepared) / "train" / "index.json").read_text())
    index["format"] = "coco_instance"
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match="model.task=panoptic cannot train on data.format=coco_instance"
    ):
        build_dataset(cfg.data, "train", "panoptic", train=True)


def test_strict_prepare_writes_nothing_and_keeps_the_previous_output(tmp_path):
    cfg = sample_config(tmp_path)
    prepare(cfg.data, progress=False)
    prepared = tmp_path / "prepared"
    before = {p: p.read_bytes() for p in prepared.rglob("*") if p.is_file()}
    (tmp_path / "coco" / "images" / "000000142238.jpg").unlink()
    with pytest.raises(DatasetValidationError, match="000000142238"):
        prepare(cfg.data, progress=False)
    after = {p: p.read_bytes() for p in prepared.rglob("*") if p.is_file()}
    assert before == after
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_lenient_prepare_skips_bad_images_and_records_them(tmp_path):
    cfg = sample_config(tmp_path)
    (tmp_path / "coco" / "images" / "000000142238.jpg").unlink()
    manifest = prepare(cfg.data, strict=False, progress=False)
    split = manifest.splits["train"]
    assert split["images"] == 1
    assert any("000000142238" in s for s in split["skipped"])
    saved = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert saved == json_safe(manifest.manifest_json())  # the file holds the result's fields
    assert set(manifest.seconds) == set(manifest.splits) and "seconds" not in saved


def test_preparing_the_same_data_twice_writes_the_same_bytes(tmp_path):
    """No timing or other run-dependent value in the prepared files: DVC hashes them, and a
    rerun that changed bytes would make every later stage (training) rerun."""
    cfg = sample_config(tmp_path)
    first = prepare(cfg.data, progress=False)
    prepared = tmp_path / "prepared"
    before = {p.relative_to(prepared): p.read_bytes() for p in prepared.rglob("*") if p.is_file()}
    shutil.rmtree(prepared)
    second = prepare(cfg.data, progress=False)
    after = {p.relative_to(prepared): p.read_bytes() for p in prepared.rglob("*") if p.is_file()}
    assert Path("manifest.json") in before
    assert before == after
    assert first == second  # timing is not compared


def test_interrupted_prepare_leaves_no_partial_folder(tmp_path, monkeypatch):
    import knet.data.prepare as prep

    cfg = sample_config(tmp_path)
    calls = {"n": 0}
    original = prep._encode

    def failing(mask):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(mask)

    monkeypatch.setattr(prep, "_encode", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg.data, progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "coco"]


def test_semantic_png_dataset_round_trip(tmp_path):
    root = tmp_path / "ade"
    (root / "images" / "training").mkdir(parents=True)
    (root / "annotations" / "training").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(
            root / "images" / "training" / f"{name}.jpg"
        )
        label = np.zeros((40, 60), dtype=np.uint8)  # 0 = unlabelled in ADE20K
        label[10:] = 3
        label[20:] = 7
        Image.fromarray(label).save(root / "annotations" / "training" / f"{name}.png")
    (root / "categories.json").write_text(
        json.dumps([{"id": 3, "name": "wall"}, {"id": 7, "name": "floor"}])
    )
    cfg = load_config(
        None,
        [
            "data.format=semantic_png",
            f"data.raw={root}",
            f"data.prepared={tmp_path / 'p'}",
            "data.train_split=training",
            "data.val_split=training",
            "data.images=images/{split}",
            "data.semantic_dir=annotations/{split}",
            "data.categories_json=categories.json",
            "data.semantic_ignore=[0, 255]",
            "data.min_size=[40]",
            "data.test_size=40",
            "data.max_size=100",
        ],
    )
    prepare(cfg.data, progress=False)
    dataset = build_dataset(cfg.data, "training", "semantic", train=False)
    semantic = dataset[0]["targets"].semantic
    assert semantic[:10, :60].eq(IGNORE_LABEL).all()
    assert semantic[10:20, :60].eq(0).all() and semantic[20:40, :60].eq(1).all()


def test_coco_instance_polygons_rle_and_crowd(tmp_path):
    root = tmp_path / "inst"
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(root / "train" / "1.png")
    box = np.zeros((40, 60), dtype=np.uint8)
    box[20:30, 40:50] = 1
    rle = mask_utils.encode(np.asfortranarray(box))
    rle["counts"] = rle["counts"].decode()
    crowd = np.zeros((40, 60), dtype=np.uint8)
    crowd[:5, :5] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    crowd_rle["counts"] = crowd_rle["counts"].decode()
    data = {
        "images": [{"id": 1, "file_name": "1.png", "height": 40, "width": 60}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 8, "name": "dog"}],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "category_id": 8,
                "iscrowd": 0,
                "area": 100.0,
                "bbox": [0, 0, 10, 10],
                "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]],
            },
            {
                "id": 11,
                "image_id": 1,
                "category_id": 3,
                "iscrowd": 0,
                "area": 100,
                "bbox": [40, 20, 10, 10],
                "segmentation": rle,
            },
            {
                "id": 12,
                "image_id": 1,
                "category_id": 3,
                "iscrowd": 1,
                "area": 25,
                "bbox": [0, 0, 5, 5],
                "segmentation": crowd_rle,
            },
        ],
    }
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))
    cfg = load_config(
        None,
        [
            "data.format=coco_instance",
            f"data.raw={root}",
            f"data.prepared={tmp_path / 'p'}",
            "data.val_split=train",
            "data.min_size=[40]",
            "data.test_size=40",
            "data.max_size=60",
        ],
    )
    manifest = prepare(cfg.data, progress=False)
    assert manifest.splits["train"]["crowd_segments"] == 1
    dataset = build_dataset(cfg.data, "train", "instance", train=False)
    assert dataset.categories.names == ("cat", "dog")  # training ids follow the category ids
    item = dataset[0]
    assert sorted(item["targets"].labels.tolist()) == [0, 1]  # the crowd region is no target
    segments = {s["id"]: s for s in dataset.read_segments(0)}
    assert segments[11]["area"] == 100 and segments[12]["iscrowd"] == 1
    assert abs(segments[10]["area"] - 100) <= 12  # rasterised polygon
    with pytest.raises(ValueError, match="model.task=panoptic cannot train"):
        build_dataset(cfg.data, "train", "panoptic", train=False)


def test_the_data_layer_imports_nothing_above_it():
    """The dataset (with its ground-truth records) imports no model, metric or orchestration
    module: the one import that used to run back up a layer (GroundTruth lived in metrics)."""
    import subprocess
    import sys

    code = (
        "import sys, knet.data.dataset, knet.data.prepare, knet.data.groundtruth; "
        "print(sorted(m for m in sys.modules if m.startswith('knet.') "
        "and not m.startswith(('knet.data', 'knet.config', 'knet.structures', 'knet.io'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
