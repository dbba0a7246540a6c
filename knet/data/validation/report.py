"""A validation's problems and report: levels, stable problem codes, where each problem is."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from knet.data import DataError

log = logging.getLogger(__name__)

Level = Literal["error", "warning", "info"]

FORMATS = ("coco_panoptic", "coco_instance", "semantic_png")


#: Every code a :class:`Problem` can carry, with what it means.
PROBLEM_CODES: dict[str, str] = {
    # JSON files
    "json_missing": "an annotation / categories JSON file does not exist",
    "json_invalid": "a JSON file cannot be read or parsed (line and column given)",
    "json_structure": "JSON content does not have the expected structure or types",
    # categories
    "duplicate_category_id": "two categories share an id",
    "missing_isthing": "a panoptic category has no isthing flag",
    "bad_category_id": "a semantic category id outside 0..254",
    "unknown_category": "an annotation / segment uses a category id that is not defined",
    # images
    "duplicate_image_id": "two images share an id",
    "unsafe_path": "a file name leaves the dataset root (absolute, '..', or symlink out)",
    "missing_image": "an image file does not exist",
    "unreadable_image": "an image file is not a readable image",
    "truncated_image": "an image file opens but cannot be decoded (truncated or corrupt)",
    "size_mismatch": "JSON height/width differ from the image file's size",
    "image_mode": "the image is not RGB and will be converted to RGB (info)",
    "missing_image_dir": "the image folder does not exist",
    # panoptic
    "unknown_image_id": "an annotation refers to an image id that is not in images",
    "duplicate_annotation": "an image has more than one panoptic annotation",
    "missing_annotation": "an image has no panoptic annotation",
    "missing_png": "a panoptic PNG does not exist",
    "unreadable_png": "a panoptic PNG cannot be opened or decoded",
    "png_mode": "a panoptic PNG is not RGB, so segment ids cannot be decoded",
    "png_size_mismatch": "a panoptic PNG's size differs from its image's size",
    "unlabeled_png_id": "nonzero ids in a panoptic PNG without a segments_info entry",
    "empty_segment": "a segments_info entry has no pixels in the PNG",
    "area_mismatch": "a stated area differs from the pixel count (panoptic error, instance "
    "warning)",
    "duplicate_segment_id": "two segments_info entries of one image share an id",
    "bad_iscrowd": "iscrowd is not 0 or 1",
    # instance
    "duplicate_annotation_id": "two instance annotations share an id",
    "zero_area": "an instance annotation has area 0 or an empty mask",
    "bad_polygon": "a polygon is not a list of an even number (>= 6) of coordinates",
    "polygon_outside_image": "polygon coordinates lie outside the image",
    "rle_size_mismatch": "an RLE's size is not [height, width] of its image",
    "bad_rle": "RLE counts cannot be decoded or do not cover the image exactly",
    # semantic
    "missing_label": "an image has no label PNG with the same stem",
    "unreadable_label": "a label PNG cannot be opened or decoded",
    "label_mode": "a label PNG is not single-channel 8-bit (L or P)",
    "label_size_mismatch": "a label PNG's size differs from its image's size",
    "unknown_label_value": "label values that are neither a category id nor 255 (ignore)",
    "unused_label": "a label PNG without a matching image",
}

# At most this many values are spelled out in one message.
_MAX_LISTED = 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or worth knowing) about a dataset, located as precisely as possible."""

    level: Level
    code: str
    message: str
    file: str | None = None
    image_id: int | None = None
    segment_id: int | None = None
    json_path: str | None = None

    def __str__(self) -> str:
        """One line: ``error [area_mismatch] file=... image 42 segment 7 at ...: message``."""
        parts = [f"{self.level} [{self.code}]"]
        if self.file is not None:
            parts.append(f"file={self.file}")
        if self.image_id is not None:
            parts.append(f"image {self.image_id}")
        if self.segment_id is not None:
            parts.append(f"segment {self.segment_id}")
        if self.json_path is not None:
            parts.append(f"at {self.json_path}")
        return " ".join(parts) + f": {self.message}"


@dataclass
class ValidationReport:
    """All problems of one split, how many images were looked at and how long it took."""

    problems: list[Problem]
    num_images: int
    seconds: float

    @property
    def errors(self) -> list[Problem]:
        """Problems of level ``error``."""
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        """Problems of level ``warning``."""
        return [p for p in self.problems if p.level == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings and info are allowed)."""
        return not self.errors

    def bad_image_ids(self) -> set[int]:
        """Ids of the images concerned by at least one error."""
        return {p.image_id for p in self.errors if p.image_id is not None}

    def codes(self, level: Level | None = None) -> set[str]:
        """The distinct codes present, optionally of one level only."""
        return {p.code for p in self.problems if level is None or p.level == level}

    def summary(self) -> str:
        """Counts by level and code, then every problem on its own line."""
        by_level = Counter(p.level for p in self.problems)
        lines = [
            f"dataset validation: {self.num_images} images, {by_level['error']} errors, "
            f"{by_level['warning']} warnings, {by_level['info']} info "
            f"({self.seconds:.2f} s)"
        ]
        for level in ("error", "warning", "info"):
            counts = Counter(p.code for p in self.problems if p.level == level)
            if counts:
                listed = ", ".join(f"{code} x{n}" for code, n in sorted(counts.items()))
                lines.append(f"  {level}: {listed}")
        lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)

    def raise_for_errors(self) -> None:
        """Raise :class:`DatasetValidationError` when the report holds any error."""
        if not self.ok:
            raise DatasetValidationError(self)


class DatasetValidationError(DataError, ValueError):
    """A dataset with errors; ``.report`` holds the full :class:`ValidationReport`."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.summary())
        self.report = report
