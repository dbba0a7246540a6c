"""Dataset validation: clean datasets pass, and each kind of breakage is reported precisely."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from knet.data.layout import DatasetPaths
from knet.data.validate import (
    PROBLEM_CODES,
    DatasetValidationError,
    Problem,
    ValidationReport,
    validate_split,
)

SAMPLE_CANDIDATES = [
    Path("/work/shared/data/coco-panoptic-sample"),
    Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-panoptic-sample",
]
SAMPLE = next((p for p in SAMPLE_CANDIDATES if p.is_dir()), None)

# Image sizes as (height, width).
SIZE_A = (24, 40)
SIZE_B = (32, 48)
CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 7, "name": "sky", "isthing": 0},
]


# --------------------------------------------------------------------------------------------
# A small, valid dataset in all three formats
# --------------------------------------------------------------------------------------------


def _noise_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _id_png(ids: np.ndarray) -> Image.Image:
    ids = ids.astype(np.uint32)
    rgb = np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: column-major runs, starting with a run of zeros."""
    flat = mask.ravel(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return counts


@dataclass
class Dataset:
    """A tiny dataset under ``root`` with helpers to break it."""

    root: Path

    @property
    def paths(self) -> DatasetPaths:
        return DatasetPaths(
            root=self.root,
            split="val",
            images=self.root / "images",
            panoptic_json=self.root / "panoptic.json",
            panoptic_dir=self.root / "panoptic",
            instances_json=self.root / "instances.json",
            semantic_dir=self.root / "semantic",
            categories_json=self.root / "categories.json",
        )

    def read(self, name: str) -> Any:
        return json.loads((self.root / name).read_text())

    def write(self, name: str, data: Any) -> None:
        (self.root / name).write_text(json.dumps(data))

    def edit(self, name: str, change: Callable[[Any], None]) -> None:
        data = self.read(name)
        change(data)
        self.write(name, data)

    def validate(self, fmt: str) -> ValidationReport:
        return validate_split(self.paths, fmt)


def build_dataset(root: Path) -> Dataset:
    """Two images (PNG + JPEG) with panoptic, instance and semantic annotations."""
    for sub in ("images", "panoptic", "semantic"):
        (root / sub).mkdir(parents=True)
    _noise_image(*SIZE_A, seed=0).save(root / "images" / "a.png")
    _noise_image(*SIZE_B, seed=1).save(root / "images" / "b.jpg", quality=95)
    images = [
        {"id": 1, "file_name": "a.png", "height": SIZE_A[0], "width": SIZE_A[1]},
        {"id": 2, "file_name": "b.jpg", "height": SIZE_B[0], "width": SIZE_B[1]},
    ]

    # Panoptic: ids that use all three channels (300 -> G, 70000 -> B).
    ids_a = np.zeros(SIZE_A, np.uint32)
    ids_a[2:10, 3:12] = 1
    ids_a[12:, :] = 2
    ids_a[2:8, 20:28] = 300
    ids_b = np.zeros(SIZE_B, np.uint32)
    ids_b[:16, :] = 70000
    ids_b[20:30, 2:12] = 5
    _id_png(ids_a).save(root / "panoptic" / "a.png")
    _id_png(ids_b).save(root / "panoptic" / "b.png")

    def segments(ids: np.ndarray, cats: dict[int, int]) -> list[dict[str, Any]]:
        return [
            {"id": sid, "category_id": cat, "area": int((ids == sid).sum()), "iscrowd": 0}
            for sid, cat in cats.items()
        ]

    panoptic = {
        "images": images,
        "annotations": [
            {
                "image_id": 1,
                "file_name": "a.png",
                "segments_info": segments(ids_a, {1: 1, 2: 7, 300: 2}),
            },
            {
                "image_id": 2,
                "file_name": "b.png",
                "segments_info": segments(ids_b, {70000: 7, 5: 1}),
            },
        ],
        "categories": CATEGORIES,
    }
    (root / "panoptic.json").write_text(json.dumps(panoptic))

    # Instances: a polygon, a compressed RLE and an uncompressed (crowd) RLE.
    h, w = SIZE_A
    polygon = [3.0, 2.0, 13.0, 2.0, 13.0, 11.0, 3.0, 11.0]
    poly_area = int(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([polygon], h, w))))
    car = np.zeros(SIZE_A, np.uint8)
    car[2:8, 20:28] = 1
    rle = mask_utils.encode(np.asfortranarray(car))
    crowd = np.zeros(SIZE_B, np.uint8)
    crowd[20:30, 2:12] = 1
    instances = {
        "images": images,
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "category_id": 1,
                "segmentation": [polygon],
                "area": poly_area,
                "bbox": [3, 2, 10, 9],
                "iscrowd": 0,
            },
            {
                "id": 11,
                "image_id": 1,
                "category_id": 2,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                "area": int(car.sum()),
                "bbox": [20, 2, 8, 6],
                "iscrowd": 0,
            },
            {
                "id": 12,
                "image_id": 2,
                "category_id": 1,
                "segmentation": {"size": list(SIZE_B), "counts": _uncompressed_rle(crowd)},
                "area": int(crowd.sum()),
                "bbox": [2, 20, 10, 10],
                "iscrowd": 1,
            },
        ],
        "categories": [{k: v for k, v in c.items() if k != "isthing"} for c in CATEGORIES],
    }
    (root / "instances.json").write_text(json.dumps(instances))

    # Semantic: category ids are pixel values, 255 = ignore.
    label_a = np.full(SIZE_A, 255, np.uint8)
    label_a[2:10, 3:12] = 1
    label_a[12:, :] = 7
    label_a[20:, 30:] = 2
    label_b = np.full(SIZE_B, 7, np.uint8)
    label_b[20:30, 2:12] = 2
    Image.fromarray(label_a, "L").save(root / "semantic" / "a.png")
    Image.fromarray(label_b, "L").save(root / "semantic" / "b.png")
    (root / "categories.json").write_text(json.dumps(CATEGORIES))
    return Dataset(root)


@pytest.fixture
def ds(tmp_path: Path) -> Dataset:
    return build_dataset(tmp_path / "ds")


# --------------------------------------------------------------------------------------------
# Clean datasets
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(SAMPLE is None, reason="shared COCO panoptic sample not available")
def test_real_coco_panoptic_sample_is_clean(tmp_path: Path) -> None:
    root = tmp_path / "sample"
    shutil.copytree(SAMPLE, root)
    paths = DatasetPaths(
        root=root,
        split="val",
        images=root / "images",
        panoptic_json=root / "panoptic.json",
        panoptic_dir=root / "panoptic",
        instances_json=root / "instances.json",
        semantic_dir=root / "semantic",
        categories_json=root / "categories.json",
    )
    report = validate_split(paths, "coco_panoptic")
    assert report.errors == [], report.summary()
    assert report.num_images == 2
    assert report.ok


@pytest.mark.parametrize("fmt", ["coco_panoptic", "coco_instance", "semantic_png"])
def test_synthetic_dataset_is_clean(ds: Dataset, fmt: str) -> None:
    report = ds.validate(fmt)
    assert report.problems == [], report.summary()
    assert report.num_images == 2
    assert report.ok and report.bad_image_ids() == set()


def test_progress_bar_and_logging(
    ds: Dataset, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="knet.data.validate"):
        report = validate_split(ds.paths, "coco_panoptic", progress=True)
    assert report.ok
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "validated 2 images" in caplog.text


def test_unknown_format_raises(ds: Dataset) -> None:
    with pytest.raises(ValueError, match="unknown dataset format"):
        validate_split(ds.paths, "voc")


# --------------------------------------------------------------------------------------------
# One broken input per case
# --------------------------------------------------------------------------------------------

ANY = object()


@dataclass(frozen=True)
class Expect:
    """The problem a broken dataset must produce."""

    fmt: str
    code: str
    file: str  # the problem's file must end with this
    image_id: Any = ANY
    segment_id: Any = ANY
    level: str = "error"
    json_path: Any = ANY
    message: str = ""  # substring of the message


def _cut(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _set_image(key: str, index: int, value: Any) -> Callable[[Any], None]:
    def change(data: Any) -> None:
        data["images"][index][key] = value

    return change


def _pan_seg(ds: Dataset, ann: int, seg: int, **fields: Any) -> None:
    def change(data: Any) -> None:
        data["annotations"][ann]["segments_info"][seg].update(fields)

    ds.edit("panoptic.json", change)


def _inst(ds: Dataset, ann: int, **fields: Any) -> None:
    def change(data: Any) -> None:
        data["annotations"][ann].update(fields)

    ds.edit("instances.json", change)


def _symlink_out(ds: Dataset) -> None:
    outside = ds.root.parent / "outside.png"
    _noise_image(*SIZE_A, seed=3).save(outside)
    (ds.root / "images" / "link.png").symlink_to(outside)
    ds.edit("panoptic.json", _set_image("file_name", 0, "link.png"))


def _dotdot(ds: Dataset) -> None:
    _noise_image(*SIZE_A, seed=3).save(ds.root.parent / "outside.png")
    ds.edit("panoptic.json", _set_image("file_name", 0, "../../outside.png"))


def _absolute(ds: Dataset) -> None:
    name = str((ds.root / "images" / "a.png").resolve())
    ds.edit("panoptic.json", _set_image("file_name", 0, name))


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not an image at all" * 10)


def _semantic_label(ds: Dataset, name: str, change: Callable[[np.ndarray], Image.Image]) -> None:
    path = ds.root / "semantic" / name
    with Image.open(path) as label:
        array = np.array(label)
    change(array).save(path)


def _unknown_label_value(array: np.ndarray) -> Image.Image:
    array[5, 5] = 42
    array[6, 6] = 99
    return Image.fromarray(array, "L")


CASES = [
    pytest.param(
        lambda ds: (ds.root / "images" / "a.png").unlink(),
        Expect("coco_panoptic", "missing_image", "images/a.png", 1, None),
        id="missing_image",
    ),
    pytest.param(
        lambda ds: _cut(ds.root / "images" / "a.png", 0.5),
        Expect("coco_panoptic", "truncated_image", "images/a.png", 1, None),
        id="truncated_png_image",
    ),
    pytest.param(
        lambda ds: _cut(ds.root / "images" / "b.jpg", 0.6),
        Expect("coco_instance", "truncated_image", "images/b.jpg", 2, None),
        id="truncated_jpeg_image",
    ),
    pytest.param(
        lambda ds: _garbage(ds.root / "images" / "b.jpg"),
        Expect("coco_panoptic", "unreadable_image", "images/b.jpg", 2, None),
        id="unreadable_image_garbage",
    ),
    pytest.param(
        lambda ds: ds.edit("panoptic.json", _set_image("height", 0, 25)),
        Expect("coco_panoptic", "size_mismatch", "images/a.png", 1, None, message="40x25"),
        id="json_size_differs_from_file",
    ),
    pytest.param(
        lambda ds: ds.edit("panoptic.json", lambda d: d["annotations"][0]["segments_info"].pop(2)),
        Expect("coco_panoptic", "unlabeled_png_id", "panoptic/a.png", 1, 300, message="300"),
        id="png_id_without_segments_info",
    ),
    pytest.param(
        lambda ds: ds.edit(
            "panoptic.json",
            lambda d: d["annotations"][1]["segments_info"].append(
                {"id": 77, "category_id": 1, "area": 0, "iscrowd": 0}
            ),
        ),
        Expect("coco_panoptic", "empty_segment", "panoptic/b.png", 2, 77),
        id="segment_without_pixels",
    ),
    pytest.param(
        lambda ds: _pan_seg(ds, 0, 0, area=999),
        Expect(
            "coco_panoptic",
            "area_mismatch",
            "panoptic/a.png",
            1,
            1,
            json_path="annotations[0].segments_info[0].area",
        ),
        id="panoptic_area_mismatch",
    ),
    pytest.param(
        lambda ds: _pan_seg(ds, 0, 1, category_id=99),
        Expect(
            "coco_panoptic",
            "unknown_category",
            "panoptic.json",
            1,
            2,
            json_path="annotations[0].segments_info[1].category_id",
        ),
        id="panoptic_unknown_category",
    ),
    pytest.param(
        lambda ds: _inst(ds, 1, category_id=99),
        Expect(
            "coco_instance",
            "unknown_category",
            "instances.json",
            1,
            11,
            json_path="annotations[1].category_id",
        ),
        id="instance_unknown_category",
    ),
    pytest.param(
        lambda ds: ds.edit("panoptic.json", lambda d: d["images"].append(dict(d["images"][0]))),
        Expect(
            "coco_panoptic",
            "duplicate_image_id",
            "panoptic.json",
            1,
            None,
            json_path="images[2].id",
        ),
        id="duplicate_image_id",
    ),
    pytest.param(
        lambda ds: _inst(ds, 2, id=11),
        Expect("coco_instance", "duplicate_annotation_id", "instances.json", 2, 11),
        id="duplicate_annotation_id",
    ),
    pytest.param(
        lambda ds: ds.edit(
            "panoptic.json",
            lambda d: d["annotations"][0]["segments_info"].append(
                {"id": 1, "category_id": 2, "area": 5, "iscrowd": 0}
            ),
        ),
        Expect(
            "coco_panoptic",
            "duplicate_segment_id",
            "panoptic.json",
            1,
            1,
            json_path="annotations[0].segments_info[3].id",
        ),
        id="duplicate_segment_id",
    ),
    pytest.param(
        lambda ds: _inst(ds, 0, segmentation=[[3.0, 2.0, 45.0, 2.0, 45.0, 11.0, 3.0, 11.0]]),
        Expect("coco_instance", "polygon_outside_image", "instances.json", 1, 10),
        id="polygon_outside_image",
    ),
    pytest.param(
        lambda ds: _inst(ds, 0, segmentation=[[5.0, 5.0, 5.0, 5.0, 5.0, 5.0]], area=0),
        Expect("coco_instance", "zero_area", "instances.json", 1, 10),
        id="zero_area_annotation",
    ),
    pytest.param(
        lambda ds: _inst(ds, 0, segmentation=[[3.0, 2.0, 13.0, 2.0, 13.0]]),
        Expect(
            "coco_instance",
            "bad_polygon",
            "instances.json",
            1,
            10,
            json_path="annotations[0].segmentation[0]",
        ),
        id="polygon_odd_coordinates",
    ),
    pytest.param(
        lambda ds: _inst(ds, 1, segmentation={"size": [40, 24], "counts": "PP0"}),
        Expect("coco_instance", "rle_size_mismatch", "instances.json", 1, 11),
        id="rle_wrong_size",
    ),
    pytest.param(
        lambda ds: _inst(ds, 1, segmentation={"size": [24, 40], "counts": "!!not rle"}),
        Expect("coco_instance", "bad_rle", "instances.json", 1, 11),
        id="rle_undecodable",
    ),
    pytest.param(
        lambda ds: _inst(ds, 2, segmentation={"size": [32, 48], "counts": [10, 5, 3]}),
        Expect("coco_instance", "bad_rle", "instances.json", 2, 12, message="cover 18 pixels"),
        id="rle_counts_do_not_cover_image",
    ),
    pytest.param(
        lambda ds: _inst(ds, 1, area=200),
        Expect("coco_instance", "area_mismatch", "instances.json", 1, 11, level="warning"),
        id="instance_area_mismatch_warning",
    ),
    pytest.param(
        lambda ds: _inst(ds, 0, iscrowd=2),
        Expect("coco_instance", "bad_iscrowd", "instances.json", 1, 10),
        id="bad_iscrowd",
    ),
    pytest.param(
        lambda ds: _inst(ds, 2, image_id=999),
        Expect("coco_instance", "unknown_image_id", "instances.json", 999, 12),
        id="instance_unknown_image_id",
    ),
    pytest.param(
        _dotdot,
        Expect(
            "coco_panoptic",
            "unsafe_path",
            "outside.png",
            1,
            None,
            json_path="images[0].file_name",
        ),
        id="file_name_with_dotdot",
    ),
    pytest.param(
        _absolute,
        Expect("coco_panoptic", "unsafe_path", "images/a.png", 1, None, message="escapes"),
        id="absolute_file_name",
    ),
    pytest.param(
        _symlink_out,
        Expect("coco_panoptic", "unsafe_path", "images/link.png", 1, None, message="resolves"),
        id="symlink_outside_root",
    ),
    pytest.param(
        lambda ds: (ds.root / "panoptic.json").write_text('{"images": [\n  {"id": 1,,}\n'),
        Expect("coco_panoptic", "json_invalid", "panoptic.json", None, message="line 2 column"),
        id="broken_json_syntax",
    ),
    pytest.param(
        lambda ds: (ds.root / "instances.json").unlink(),
        Expect("coco_instance", "json_missing", "instances.json"),
        id="missing_json",
    ),
    pytest.param(
        lambda ds: ds.edit("panoptic.json", lambda d: d.update(images={"a.png": 1})),
        Expect("coco_panoptic", "json_structure", "panoptic.json", json_path="images"),
        id="non_coco_images_is_dict",
    ),
    pytest.param(
        lambda ds: ds.write("instances.json", [1, 2, 3]),
        Expect("coco_instance", "json_structure", "instances.json", json_path="$"),
        id="non_coco_top_level_list",
    ),
    pytest.param(
        lambda ds: ds.edit("instances.json", _set_image("height", 1, "32")),
        Expect(
            "coco_instance",
            "json_structure",
            "instances.json",
            2,
            json_path="images[1].height",
            message="must be a positive int",
        ),
        id="image_height_not_int",
    ),
    pytest.param(
        lambda ds: ds.edit("panoptic.json", lambda d: d["categories"][2].pop("isthing")),
        Expect(
            "coco_panoptic",
            "missing_isthing",
            "panoptic.json",
            json_path="categories[2].isthing",
        ),
        id="panoptic_category_without_isthing",
    ),
    pytest.param(
        lambda ds: ds.edit(
            "instances.json", lambda d: d["categories"].append({"id": 2, "name": "bus"})
        ),
        Expect(
            "coco_instance", "duplicate_category_id", "instances.json", json_path="categories[3].id"
        ),
        id="duplicate_category_id",
    ),
    pytest.param(
        lambda ds: (ds.root / "panoptic" / "b.png").unlink(),
        Expect("coco_panoptic", "missing_png", "panoptic/b.png", 2),
        id="missing_panoptic_png",
    ),
    pytest.param(
        lambda ds: _garbage(ds.root / "panoptic" / "b.png"),
        Expect("coco_panoptic", "unreadable_png", "panoptic/b.png", 2),
        id="unreadable_panoptic_png",
    ),
    pytest.param(
        lambda ds: Image.new("L", SIZE_A[::-1]).save(ds.root / "panoptic" / "a.png"),
        Expect("coco_panoptic", "png_mode", "panoptic/a.png", 1),
        id="panoptic_png_not_rgb",
    ),
    pytest.param(
        lambda ds: _id_png(np.full((10, 10), 5)).save(ds.root / "panoptic" / "b.png"),
        Expect("coco_panoptic", "png_size_mismatch", "panoptic/b.png", 2, message="10x10"),
        id="panoptic_png_size_mismatch",
    ),
    pytest.param(
        lambda ds: ds.edit(
            "panoptic.json", lambda d: d["annotations"].append(dict(d["annotations"][1]))
        ),
        Expect("coco_panoptic", "duplicate_annotation", "panoptic.json", 2),
        id="panoptic_duplicate_annotation",
    ),
    pytest.param(
        lambda ds: ds.edit("panoptic.json", lambda d: d["annotations"].pop(1)),
        Expect("coco_panoptic", "missing_annotation", "panoptic.json", 2),
        id="panoptic_image_without_annotation",
    ),
    pytest.param(
        lambda ds: ds.edit("panoptic.json", lambda d: d["annotations"][0].update(image_id=5)),
        Expect("coco_panoptic", "unknown_image_id", "panoptic.json", 5),
        id="panoptic_unknown_image_id",
    ),
    pytest.param(
        lambda ds: _semantic_label(ds, "a.png", _unknown_label_value),
        Expect("semantic_png", "unknown_label_value", "semantic/a.png", message="42, 99"),
        id="semantic_label_value_not_a_category",
    ),
    pytest.param(
        lambda ds: (ds.root / "semantic" / "b.png").unlink(),
        Expect("semantic_png", "missing_label", "semantic/b.png"),
        id="missing_semantic_label",
    ),
    pytest.param(
        lambda ds: _semantic_label(ds, "b.png", lambda a: Image.fromarray(np.stack([a] * 3, -1))),
        Expect("semantic_png", "label_mode", "semantic/b.png"),
        id="semantic_label_rgb",
    ),
    pytest.param(
        lambda ds: _semantic_label(ds, "b.png", lambda a: Image.fromarray(a[:10])),
        Expect("semantic_png", "label_size_mismatch", "semantic/b.png"),
        id="semantic_label_size_mismatch",
    ),
    pytest.param(
        lambda ds: ds.edit("categories.json", lambda d: d.append({"id": 300, "name": "x"})),
        Expect("semantic_png", "bad_category_id", "categories.json", json_path="[3].id"),
        id="semantic_category_id_out_of_range",
    ),
    pytest.param(
        lambda ds: ds.write("categories.json", {"sky": 7}),
        Expect("semantic_png", "json_structure", "categories.json", json_path="$"),
        id="semantic_categories_not_a_list",
    ),
    pytest.param(
        lambda ds: _garbage(ds.root / "images" / "a.png"),
        Expect("semantic_png", "unreadable_image", "images/a.png", 1),
        id="semantic_unreadable_image",
    ),
]


def _find(report: ValidationReport, expect: Expect) -> Problem:
    """The problem matching ``expect``; fails with the whole report otherwise."""
    for problem in report.problems:
        checks = [
            problem.code == expect.code,
            problem.level == expect.level,
            problem.file is not None and problem.file.endswith(expect.file),
            expect.image_id is ANY or problem.image_id == expect.image_id,
            expect.segment_id is ANY or problem.segment_id == expect.segment_id,
            expect.json_path is ANY or problem.json_path == expect.json_path,
            expect.message in problem.message,
        ]
        if all(checks):
            return problem
    raise AssertionError(f"no problem matching {expect}\n{report.summary()}")


@pytest.mark.parametrize(("breaker", "expect"), CASES)
def test_broken_input_is_reported(
    ds: Dataset, breaker: Callable[[Dataset], Any], expect: Expect
) -> None:
    breaker(ds)
    report = ds.validate(expect.fmt)
    problem = _find(report, expect)
    assert problem.code in PROBLEM_CODES
    assert report.ok is (expect.level != "error")
    if expect.level == "error" and problem.image_id is not None:
        assert problem.image_id in report.bad_image_ids()
    line = str(problem)
    assert line.startswith(f"{expect.level} [{expect.code}] file=")
    assert "\n" not in line


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda a: Image.fromarray(a[..., 0], "L"), id="grayscale"),
        pytest.param(
            lambda a: Image.fromarray(np.dstack([a, np.full(a.shape[:2], 200, np.uint8)])),
            id="rgba",
        ),
        pytest.param(lambda a: Image.fromarray(a[..., 0].astype(np.uint16) * 257), id="16bit"),
        pytest.param(lambda a: Image.fromarray(a).convert("P"), id="palette"),
    ],
)
@pytest.mark.parametrize("fmt", ["coco_panoptic", "semantic_png"])
def test_non_rgb_image_is_info_not_error(
    ds: Dataset, fmt: str, convert: Callable[[np.ndarray], Image.Image]
) -> None:
    path = ds.root / "images" / "a.png"
    with Image.open(path) as image:
        array = np.array(image)
    convert(array).save(path)
    report = ds.validate(fmt)
    assert report.ok, report.summary()
    image_id = 1  # semantic datasets number the sorted image files from 1
    problem = _find(report, Expect(fmt, "image_mode", "images/a.png", image_id, level="info"))
    assert "converted to RGB" in problem.message


def test_all_problems_are_reported_not_just_the_first(ds: Dataset) -> None:
    (ds.root / "images" / "a.png").unlink()
    _garbage(ds.root / "images" / "b.jpg")
    _pan_seg(ds, 0, 0, area=1)
    _pan_seg(ds, 0, 1, category_id=99)
    _pan_seg(ds, 1, 1, iscrowd=3)
    ds.edit("panoptic.json", lambda d: d["annotations"][1]["segments_info"].pop(0))
    ds.edit("panoptic.json", lambda d: d["categories"].append(dict(d["categories"][0])))
    report = ds.validate("coco_panoptic")
    assert {p.code for p in report.errors} == {
        "missing_image",
        "unreadable_image",
        "area_mismatch",
        "unknown_category",
        "bad_iscrowd",
        "unlabeled_png_id",
        "duplicate_category_id",
    }, report.summary()
    assert report.bad_image_ids() == {1, 2}
    with pytest.raises(DatasetValidationError) as raised:
        report.raise_for_errors()
    assert raised.value.report is report
    message = str(raised.value)
    assert "7 errors" in message
    assert "area_mismatch x1" in message
    assert all(str(p) in message for p in report.problems)


def test_problem_line_format() -> None:
    problem = Problem(
        "error",
        "area_mismatch",
        "area is 5 but the PNG has 7 pixels",
        file="panoptic/a.png",
        image_id=42,
        segment_id=7,
        json_path="annotations[0].segments_info[0].area",
    )
    assert str(problem) == (
        "error [area_mismatch] file=panoptic/a.png image 42 segment 7 "
        "at annotations[0].segments_info[0].area: area is 5 but the PNG has 7 pixels"
    )
    assert str(Problem("info", "image_mode", "mode L")) == "info [image_mode]: mode L"


def test_warnings_and_info_keep_the_report_ok(ds: Dataset) -> None:
    _inst(ds, 1, area=200)
    report = ds.validate("coco_instance")
    assert report.ok and report.errors == []
    assert [p.code for p in report.problems] == ["area_mismatch"]
    report.raise_for_errors()  # no error -> no exception


def test_the_json_rules_are_json_schemas_with_cocos_strict_types():
    """The validator's field rules are JSON Schemas checked by jsonschema, with integer and
    number as COCO means them (no booleans, no 1.0 for an id, no NaN / inf)."""
    from knet.data.validation.checker import (
        _AREA,
        _FLAG,
        _INT,
        _NAME,
        _POSITIVE_INT,
        _SEGMENTATION,
    )

    cases = [
        (_FLAG, [0, 1, True, False], [2, 1.0, "1", None]),
        (_INT, [0, -3, 5], [True, 1.0, "1", None]),
        (_POSITIVE_INT, [1, 7], [0, -1, 1.5, True]),
        (_NAME, ["a"], ["", None, 3]),
        (_AREA, [0, 1.5, 3], [-1, float("nan"), float("inf"), True, "1"]),
        (_SEGMENTATION, [[], {}], ["x", 1, None]),
    ]
    for rule, good, bad in cases:
        assert "type" in str(rule.schema) or "enum" in str(rule.schema)
        assert [v for v in good if not rule.check(v)] == [], rule.desc
        assert [v for v in bad if rule.check(v)] == [], rule.desc
