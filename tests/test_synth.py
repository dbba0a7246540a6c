"""Synthetic dataset generator: real COCO formats, consistency, determinism and atomic output."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage

from knet.config import ConfigError, DataConfig, SynthConfig, load_config
from knet.data import synth
from knet.data.layout import dataset_paths

CFG = SynthConfig(image_size=64, train_images=6, val_images=3, seed=0)
DATA = DataConfig()
SPLITS = (DATA.train_split, DATA.val_split)

# pycocotools' decode trips a NumPy 2 deprecation inside the library itself.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _panoptic_ids(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [
        int(xs.min()),
        int(ys.min()),
        int(xs.max() - xs.min() + 1),
        int(ys.max() - ys.min() + 1),
    ]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "raw"
    summary = synth.generate(root, CFG, progress=False)
    return root, summary


def _load(root: Path, split: str) -> tuple:
    paths = dataset_paths(DATA, split, root)
    panoptic = json.loads(paths.panoptic_json.read_text())
    instances = json.loads(paths.instances_json.read_text())
    return paths, panoptic, instances


def _segments(root: Path):
    """Yield (paths, image entry, panoptic annotation, id map) for every image of both splits."""
    for split in SPLITS:
        paths, panoptic, _ = _load(root, split)
        images = {im["id"]: im for im in panoptic["images"]}
        for ann in panoptic["annotations"]:
            ids = _panoptic_ids(paths.panoptic_dir / ann["file_name"])
            yield paths, images[ann["image_id"]], ann, ids


# --------------------------------------------------------------------------------------------


def test_summary_and_layout(dataset):
    root, summary = dataset
    assert summary["images"] == {DATA.train_split: 6, DATA.val_split: 3}
    assert set(summary["segments"]) == set(SPLITS)
    assert summary["seconds"] > 0 and summary["images_per_second"] > 0
    all_ids = []
    for split, count in zip(SPLITS, (CFG.train_images, CFG.val_images), strict=True):
        paths, panoptic, instances = _load(root, split)
        assert set(panoptic) >= {"info", "licenses", "images", "annotations", "categories"}
        assert len(panoptic["images"]) == len(panoptic["annotations"]) == count
        assert instances["images"] == panoptic["images"]
        assert (
            sum(len(a["segments_info"]) for a in panoptic["annotations"])
            == (summary["segments"][split])
        )
        for image in panoptic["images"]:
            assert image["file_name"] == f"{image['id']:012d}.png"
            assert (image["height"], image["width"]) == (64, 64)
            assert (paths.images / image["file_name"]).is_file()
            assert (paths.semantic_dir / image["file_name"]).is_file()
            all_ids.append(image["id"])
    assert len(set(all_ids)) == len(all_ids)  # unique across splits
    # No stray temporary or backup folders next to the dataset.
    assert [p.name for p in root.parent.iterdir()] == [root.name]


def test_categories(dataset):
    root, _ = dataset
    _, panoptic, instances = _load(root, DATA.train_split)
    cats = panoptic["categories"]
    assert cats == synth.SYNTH_CATEGORIES
    ids = [c["id"] for c in cats]
    assert len(set(ids)) == len(ids)
    assert ids != list(range(1, len(ids) + 1))  # non-contiguous, like COCO
    assert {c["isthing"] for c in cats} == {0, 1}
    colors = [tuple(c["color"]) for c in cats]
    assert len(set(colors)) == len(colors)
    assert instances["categories"] == [c for c in cats if c["isthing"]]
    listing = json.loads(dataset_paths(DATA, DATA.val_split, root).categories_json.read_text())
    assert listing == [{"id": c["id"], "name": c["name"], "isthing": c["isthing"]} for c in cats]


def test_images_are_rgb_of_the_configured_size(dataset):
    root, _ = dataset
    for paths, image, _ann, _ids in _segments(root):
        with Image.open(paths.images / image["file_name"]) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
        with Image.open(paths.semantic_dir / image["file_name"]) as im:
            assert im.mode == "L" and im.size == (64, 64)


def test_panoptic_segments_match_png(dataset):
    root, _ = dataset
    thing_ids = {c["id"] for c in synth.SYNTH_CATEGORIES if c["isthing"]}
    stuff_ids = {c["id"] for c in synth.SYNTH_CATEGORIES if not c["isthing"]}
    max_things = 0
    for _paths, _image, ann, ids in _segments(root):
        infos = ann["segments_info"]
        seg_ids = [s["id"] for s in infos]
        assert len(set(seg_ids)) == len(seg_ids) and 0 not in seg_ids
        assert set(np.unique(ids)) - {0} == set(seg_ids)
        for s in infos:
            mask = ids == s["id"]
            assert s["area"] == int(mask.sum())
            assert s["bbox"] == _bbox(mask)
            assert s["iscrowd"] == 0
        things = [s for s in infos if s["category_id"] in thing_ids]
        stuff = [s for s in infos if s["category_id"] in stuff_ids]
        assert len(things) + len(stuff) == len(infos)
        assert len(things) <= CFG.max_instances
        assert 2 <= len(stuff) <= 3
        max_things = max(max_things, len(things))
    assert max_things >= 2


def test_semantic_agrees_with_panoptic(dataset):
    root, _ = dataset
    for paths, image, ann, ids in _segments(root):
        semantic = np.asarray(Image.open(paths.semantic_dir / image["file_name"]))
        expected = np.full(ids.shape, 255, dtype=np.uint8)
        for s in ann["segments_info"]:
            expected[ids == s["id"]] = s["category_id"]
        np.testing.assert_array_equal(semantic, expected)
        np.testing.assert_array_equal(semantic == 255, ids == 0)


def test_instances_load_with_pycocotools(dataset):
    root, _ = dataset
    thing_ids = {c["id"] for c in synth.SYNTH_CATEGORIES if c["isthing"]}
    for split in SPLITS:
        coco = COCO(str(dataset_paths(DATA, split, root).instances_json))
        anns = coco.loadAnns(coco.getAnnIds())
        assert anns
        assert len({a["id"] for a in anns}) == len(anns)
        for a in anns:
            assert a["category_id"] in thing_ids and a["iscrowd"] == 0
            rle = a["segmentation"]
            assert isinstance(rle["counts"], str) and rle["size"] == [64, 64]
            assert int(mask_utils.area(rle)) == a["area"]
            assert [int(v) for v in mask_utils.toBbox(rle)] == a["bbox"]
            assert coco.annToMask(a).sum() == a["area"]


def test_instance_masks_are_the_panoptic_things(dataset):
    root, _ = dataset
    thing_ids = {c["id"] for c in synth.SYNTH_CATEGORIES if c["isthing"]}
    by_image = defaultdict(list)
    for split in SPLITS:
        for a in _load(root, split)[2]["annotations"]:
            by_image[a["image_id"]].append(a)
    for _paths, image, ann, ids in _segments(root):
        things = [s for s in ann["segments_info"] if s["category_id"] in thing_ids]
        instances = by_image[image["id"]]
        assert len(instances) == len(things)
        unmatched = list(instances)
        for s in things:
            mask = ids == s["id"]
            hits = [
                a
                for a in unmatched
                if a["category_id"] == s["category_id"]
                and np.array_equal(mask_utils.decode(a["segmentation"]).astype(bool), mask)
            ]
            assert len(hits) == 1
            unmatched.remove(hits[0])


def _thing_colours(root: Path) -> dict[int, list[np.ndarray]]:
    """Category id -> the mean colour of each of its thing segments (train and val)."""
    thing_ids = {c["id"] for c in synth.SYNTH_CATEGORIES if c["isthing"]}
    colours = defaultdict(list)
    for paths, image, ann, ids in _segments(root):
        pixels = np.asarray(Image.open(paths.images / image["file_name"]), dtype=np.float64)
        for s in ann["segments_info"]:
            if s["category_id"] in thing_ids:
                colours[s["category_id"]].append(pixels[ids == s["id"]].mean(axis=0))
    return colours


def test_thing_colour_is_a_cue_with_jitter_by_default(dataset):
    root, _ = dataset
    typical = {c["id"]: np.asarray(c["color"], float) for c in synth.SYNTH_CATEGORIES}
    thing_ids = sorted(c["id"] for c in synth.SYNTH_CATEGORIES if c["isthing"])
    hits = total = 0
    spreads = []
    for cat, means in _thing_colours(root).items():
        for mean in means:
            nearest = min(thing_ids, key=lambda t: np.linalg.norm(mean - typical[t]))
            hits += nearest == cat
            total += 1
        spreads.append(np.ptp(np.stack(means), axis=0).max() if len(means) > 1 else 0.0)
    assert total >= 10
    assert hits / total > 0.6  # the typical colour usually tells the class ...
    assert max(spreads) > 30  # ... but instances of one class still vary in colour


def test_random_thing_colours_leave_only_the_shape(tmp_path):
    cfg = dataclasses.replace(CFG, thing_colors="random")
    synth.generate(tmp_path / "raw", cfg, progress=False)
    spreads = [np.ptp(np.stack(c), axis=0).max() for c in _thing_colours(tmp_path / "raw").values()]
    assert max(spreads) > 60  # the same shape class appears in clearly different colours


def _touching_same_class_pairs(root: Path) -> tuple[int, int]:
    """(pairs of same-class thing segments that share an edge, things) over the train split."""
    paths, panoptic, _ = _load(root, DATA.train_split)
    thing = {c["id"] for c in panoptic["categories"] if c["isthing"]}
    pairs = things = 0
    for ann in panoptic["annotations"]:
        ids = _panoptic_ids(paths.panoptic_dir / ann["file_name"])
        segs = [s for s in ann["segments_info"] if s["category_id"] in thing]
        things += len(segs)
        for i, a in enumerate(segs):
            grown = ndimage.binary_dilation(ids == a["id"])  # 4-neighbours, no wrap-around
            for b in segs[i + 1 :]:
                pairs += b["category_id"] == a["category_id"] and bool(
                    (grown & (ids == b["id"])).any()
                )
    return pairs, things


def test_touching_draws_same_class_neighbours(tmp_path):
    cfg = dataclasses.replace(CFG, train_images=12, val_images=1)
    synth.generate(tmp_path / "apart", cfg, progress=False)
    synth.generate(tmp_path / "touch", dataclasses.replace(cfg, touching=1.0), progress=False)
    apart, things = _touching_same_class_pairs(tmp_path / "apart")
    touch, _ = _touching_same_class_pairs(tmp_path / "touch")
    assert touch >= max(3 * apart, things // 3)  # most things sit against one of their class
    with pytest.raises(ConfigError, match="data.synth.touching"):
        load_config(None, ["data.synth.touching=1.5"])


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, dataset):
    root, _ = dataset
    again = tmp_path / "again"
    synth.generate(again, CFG, progress=False)
    first, second = _files(root), _files(again)
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)
    other = tmp_path / "other"
    synth.generate(other, dataclasses.replace(CFG, seed=1), progress=False)
    third = _files(other)
    assert third.keys() == first.keys()
    assert any(third[k] != first[k] for k in first if k.endswith(".png"))


def test_worker_processes_write_the_same_files(tmp_path, dataset):
    root, _ = dataset
    parallel = tmp_path / "parallel"
    summary = synth.generate(parallel, CFG, progress=False, workers=2)
    assert summary["workers"] == 2
    assert _files(parallel) == _files(root)


def test_custom_split_names_and_layout(tmp_path):
    data = DataConfig(train_split="tr", val_split="va", images="img/{split}")
    cfg = SynthConfig(image_size=48, train_images=2, val_images=1, seed=3)
    synth.generate(tmp_path / "d", cfg, data, progress=False)
    for split, count in (("tr", 2), ("va", 1)):
        paths = dataset_paths(data, split, tmp_path / "d")
        assert len(list(paths.images.glob("*.png"))) == count
        assert len(json.loads(paths.panoptic_json.read_text())["images"]) == count


def test_failure_midway_keeps_the_previous_dataset(tmp_path, monkeypatch):
    root = tmp_path / "raw"
    synth.generate(root, CFG, progress=False, workers=1)  # knet's own, so it may be replaced
    (root / "marker.txt").write_text("old")
    before = sorted(p.name for p in root.iterdir())
    calls = {"n": 0}
    write = synth._write_sample

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full (simulated)")
        return write(*args, **kwargs)

    monkeypatch.setattr(synth, "_write_sample", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        synth.generate(root, CFG, progress=False, workers=1)
    assert calls["n"] == 3
    assert (root / "marker.txt").read_text() == "old"
    assert sorted(p.name for p in root.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no temp folder left

    monkeypatch.setattr(synth, "_write_sample", write)
    synth.generate(root, CFG, progress=False, workers=1)
    assert not (root / "marker.txt").exists()
    assert dataset_paths(DATA, DATA.train_split, root).panoptic_json.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no backup left either


def test_a_folder_knet_did_not_write_is_never_replaced(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    (root / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="files knet did not write"):
        synth.generate(root, CFG, progress=False, workers=1)
    assert [p.name for p in root.iterdir()] == ["mine.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_equal_split_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="differ"):
        synth.generate(tmp_path / "x", CFG, DataConfig(val_split="train"), progress=False)
    assert not (tmp_path / "x").exists()


def test_leftovers_of_killed_runs_are_removed(tmp_path):
    dead = tmp_path / ".raw.tmp-999999999"  # no such process
    dead.mkdir()
    (dead / "half.png").write_bytes(b"x")
    synth.generate(tmp_path / "raw", CFG, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
