"""Check one split of a raw dataset before training and report every problem found.

:func:`validate_split` reads the annotation files of a split (COCO panoptic, COCO instance or
semantic label PNGs, see :class:`knet.config.DataConfig`), opens every image and label file and
returns a :class:`ValidationReport`. It never stops at the first problem: each :class:`Problem`
names the file, the image id and the segment / annotation id and, for JSON content, the JSON path
it concerns, so that a broken dataset can be repaired in one pass.

Levels:

* ``error``: the sample cannot be trained on correctly (missing file, wrong size, mask/metadata
  disagreement, unknown category, a path leaving the dataset root, ...).
* ``warning``: suspicious but usable (e.g. a COCO instance ``area`` that is far from the decoded
  mask area; COCO's own polygon areas are approximate).
* ``info``: harmless facts, e.g. an image that is not RGB and will be converted.

Problem codes are stable and listed in :data:`PROBLEM_CODES`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from PIL import Image, ImageFile
from pycocotools import mask as mask_utils
from tqdm import tqdm

from knet.data import DataError
from knet.data.layout import IMAGE_SUFFIXES, DatasetPaths, UnsafePathError, confined
from knet.data.rle import rle_counts

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

# Polygon coordinates may exceed the image by this many pixels (annotation tools round).
_POLYGON_TOLERANCE = 1.0
# Instance area mismatches below max(_AREA_ABS_TOL px, _AREA_REL_TOL * area) are ignored.
_AREA_ABS_TOL = 2.0
_AREA_REL_TOL = 0.01
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


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_flag(value: Any) -> bool:
    """0 / 1 (JSON true / false are tolerated)."""
    return isinstance(value, int) and value in (0, 1)


class _Rule(NamedTuple):
    """What a JSON value must satisfy, and how messages describe it."""

    check: Callable[[Any], bool]
    desc: str


_INT = _Rule(_is_int, "an int")
_POSITIVE_INT = _Rule(lambda v: _is_int(v) and v > 0, "a positive int")
_STRING = _Rule(lambda v: isinstance(v, str), "a string")
_NAME = _Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string")
_LIST = _Rule(lambda v: isinstance(v, list), "a list")
_AREA = _Rule(lambda v: _is_number(v) and v >= 0, "a non-negative number")
_FLAG = _Rule(_is_flag, "0 or 1")
_SEGMENTATION = _Rule(lambda v: isinstance(v, (list, dict)), "a list of polygons or an RLE object")


def _show(value: Any) -> str:
    """A JSON value as ``kind value`` for messages, shortened."""
    if value is None:
        kind = "null"
    elif isinstance(value, bool):
        kind = "boolean"
    elif isinstance(value, (int, float)):
        kind = "number"
    elif isinstance(value, str):
        kind = "string"
    elif isinstance(value, list):
        kind = "array"
    elif isinstance(value, dict):
        kind = "object"
    else:  # pragma: no cover - json.loads gives nothing else
        kind = type(value).__name__
    text = json.dumps(value, default=repr)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind} {text}"


def _listed(values: Iterable[int]) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:_MAX_LISTED])
    if len(values) > _MAX_LISTED:
        shown += f", ... ({len(values)} in all)"
    return shown


@contextmanager
def _strict_loading() -> Iterator[None]:
    """Make PIL raise on truncated files even if someone enabled LOAD_TRUNCATED_IMAGES."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


@dataclass
class _Image:
    """One image entry of a COCO JSON that has a usable id."""

    index: int
    id: int
    file_name: str | None
    height: int | None
    width: int | None

    @property
    def json_path(self) -> str:
        return f"images[{self.index}]"


@dataclass
class _Segment:
    """A usable segments_info entry: its position, id and stated area."""

    index: int
    id: int
    area: float | None


@dataclass
class _PanopticAnnotation:
    index: int
    image_id: int
    file_name: str | None
    segments: dict[int, _Segment]


def _by_id(images: list[_Image] | None) -> dict[int, _Image] | None:
    return None if images is None else {image.id: image for image in images}


# --------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------


class _Checker:
    """Collects problems for one split; one method per kind of check."""

    def __init__(
        self, paths: DatasetPaths, fmt: str, progress: bool, ignore_values: Sequence[int] = (255,)
    ) -> None:
        self.paths = paths
        self.fmt = fmt
        self.progress = progress
        self.ignore_values = set(ignore_values)
        self.problems: list[Problem] = []
        self.num_images = 0

    # ---- recording -------------------------------------------------------------------------

    def add(
        self,
        level: Level,
        code: str,
        message: str,
        *,
        file: Path | str | None = None,
        image_id: int | None = None,
        segment_id: int | None = None,
        json_path: str | None = None,
    ) -> None:
        """Record one problem."""
        self.problems.append(
            Problem(
                level=level,
                code=code,
                message=message,
                file=None if file is None else str(file),
                image_id=image_id,
                segment_id=segment_id,
                json_path=json_path,
            )
        )

    def expect(  # 9 parameters: where a problem is goes into its message
        self,
        obj: dict[str, Any],
        key: str,
        path: str,
        rule: _Rule,
        file: Path,
        *,
        required: bool = True,
        code: str = "json_structure",
        image_id: int | None = None,
        segment_id: int | None = None,
    ) -> tuple[bool, Any]:
        """``(valid, value)`` of ``obj[key]``; records a problem when missing or invalid.

        An absent optional key gives ``(True, None)``.
        """
        where = f"{path}.{key}" if path else key
        if key not in obj:
            if required:
                self.add(
                    "error",
                    code,
                    f"{where} is missing",
                    file=file,
                    image_id=image_id,
                    segment_id=segment_id,
                    json_path=where,
                )
                return False, None
            return True, None
        value = obj[key]
        if not rule.check(value):
            self.add(
                "error",
                code,
                f"{where} must be {rule.desc} (got {_show(value)})",
                file=file,
                image_id=image_id,
                segment_id=segment_id,
                json_path=where,
            )
            return False, None
        return True, value

    def structure_error(
        self, message: str, path: str, file: Path, image_id: int | None = None
    ) -> None:
        """Record a ``json_structure`` error at ``path``."""
        self.add("error", "json_structure", message, file=file, image_id=image_id, json_path=path)

    def objects(
        self, items: list[Any], prefix: str, file: Path, image_id: int | None = None
    ) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """``(index, json_path, entry)`` of each object in a JSON list; records the others."""
        for i, entry in enumerate(items):
            path = f"{prefix}[{i}]"
            if isinstance(entry, dict):
                yield i, path, entry
            else:
                self.structure_error(
                    f"{path} must be an object (got {_show(entry)})", path, file, image_id
                )

    def expect_category(
        self,
        obj: dict[str, Any],
        path: str,
        categories: set[int] | None,
        file: Path,
        image_id: int | None,
        segment_id: int | None,
    ) -> None:
        """Check ``obj.category_id``: an int that is among ``categories``."""
        ok, category_id = self.expect(
            obj, "category_id", path, _INT, file, image_id=image_id, segment_id=segment_id
        )
        if ok:
            self.check_category(
                category_id, categories, file, f"{path}.category_id", image_id, segment_id
            )

    def expect_iscrowd(
        self,
        obj: dict[str, Any],
        path: str,
        file: Path,
        image_id: int | None,
        segment_id: int | None,
    ) -> None:
        """Check the optional ``obj.iscrowd`` flag (``bad_iscrowd`` when not 0 / 1)."""
        self.expect(
            obj,
            "iscrowd",
            path,
            _FLAG,
            file,
            required=False,
            code="bad_iscrowd",
            image_id=image_id,
            segment_id=segment_id,
        )

    def known_image(
        self,
        images: dict[int, _Image] | None,
        image_id: int,
        what: str,
        path: str,
        file: Path,
        segment_id: int | None = None,
    ) -> bool:
        """False, recording ``unknown_image_id``, when ``what`` at ``path`` names an image id
        that is not among ``images`` (None: images unknown, anything goes)."""
        if images is None or image_id in images:
            return True
        self.add(
            "error",
            "unknown_image_id",
            f"{what} is for image id {image_id}, which is not in images",
            file=file,
            image_id=image_id,
            segment_id=segment_id,
            json_path=f"{path}.image_id",
        )
        return False

    def progress_over(self, items: list[Any], what: str) -> Iterable[Any]:
        """``items`` wrapped in a tqdm bar on stderr when progress is on."""
        if not self.progress:
            return items
        return tqdm(items, desc=f"validate {what}", unit="img", file=sys.stderr, leave=False)

    def confine(
        self,
        folder: Path,
        name: str,
        *,
        image_id: int | None = None,
        json_path: str | None = None,
    ) -> Path | None:
        """``confined(folder, name, root)``, recording ``unsafe_path`` instead of raising."""
        try:
            return confined(folder, name, self.paths.root)
        except UnsafePathError as exc:
            self.add(
                "error",
                "unsafe_path",
                str(exc),
                file=folder / name,
                image_id=image_id,
                json_path=json_path,
            )
            return None

    # ---- JSON ------------------------------------------------------------------------------

    def load_json(self, path: Path) -> tuple[bool, Any]:
        """``(loaded, data)``; records json_missing / json_invalid."""
        if not path.is_file():
            self.add("error", "json_missing", f"{path} does not exist or is not a file", file=path)
            return False, None
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.add("error", "json_invalid", f"cannot read {path} as UTF-8: {exc}", file=path)
            return False, None
        try:
            return True, json.loads(text)
        except json.JSONDecodeError as exc:
            self.add(
                "error",
                "json_invalid",
                f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                file=path,
            )
            return False, None
        except RecursionError:
            self.add(
                "error",
                "json_invalid",
                "nested too deeply to read (more levels than any COCO file has)",
                file=path,
            )
            return False, None

    def coco_sections(self, data: Any, file: Path) -> dict[str, list[Any] | None]:
        """The images / annotations / categories lists of a COCO file (None where unusable)."""
        keys = ("images", "annotations", "categories")
        if not isinstance(data, dict):
            self.structure_error(
                "top level must be an object with images, annotations and categories "
                f"(got {_show(data)})",
                "$",
                file,
            )
            return dict.fromkeys(keys)
        out: dict[str, list[Any] | None] = {}
        for key in keys:
            _, out[key] = self.expect(data, key, "", _LIST, file)
        return out

    def load_coco(
        self, file: Path
    ) -> tuple[list[Any] | None, set[int] | None, list[_Image] | None] | None:
        """``(raw annotations, category ids, images)`` of a COCO file, each None where unusable;
        None when the file cannot be loaded."""
        loaded, data = self.load_json(file)
        if not loaded:
            return None
        sections = self.coco_sections(data, file)
        categories = (
            None
            if sections["categories"] is None
            else self.categories(sections["categories"], "categories", file)
        )
        images = None if sections["images"] is None else self.coco_images(sections["images"], file)
        self.num_images = len(images or [])
        return sections["annotations"], categories, images

    # ---- categories ------------------------------------------------------------------------

    def categories(self, entries: list[Any], prefix: str, file: Path) -> set[int]:
        """Category ids of a categories list; records malformed and duplicate entries."""
        first_at: dict[int, int] = {}
        for i, path, cat in self.objects(entries, prefix, file):
            ok, cid = self.expect(cat, "id", path, _INT, file)
            self.expect(cat, "name", path, _STRING, file)
            if self.fmt == "coco_panoptic" and "isthing" not in cat:
                self.add(
                    "error",
                    "missing_isthing",
                    f"{path} (id {cid}) has no isthing flag; panoptic categories need "
                    "isthing 0 (stuff) or 1 (thing)",
                    file=file,
                    json_path=f"{path}.isthing",
                )
            else:
                self.expect(cat, "isthing", path, _FLAG, file, required=False)
            if not ok:
                continue
            if self.fmt == "semantic_png" and not 0 <= cid <= 254:
                self.add(
                    "error",
                    "bad_category_id",
                    f"category id {cid} at {path} is outside 0..254 (255 means ignore)",
                    file=file,
                    json_path=f"{path}.id",
                )
                continue
            if cid in first_at:
                self.add(
                    "error",
                    "duplicate_category_id",
                    f"category id {cid} is defined again at {path} "
                    f"(first at {prefix}[{first_at[cid]}])",
                    file=file,
                    json_path=f"{path}.id",
                )
            else:
                first_at[cid] = i
        return set(first_at)

    def semantic_categories(self) -> set[int] | None:
        """Ids of the semantic categories JSON (None when it is unusable)."""
        file = self.paths.categories_json
        loaded, data = self.load_json(file)
        if not loaded:
            return None
        if not isinstance(data, list):
            self.structure_error(
                f"top level must be a list of {{id, name, isthing?}} (got {_show(data)})", "$", file
            )
            return None
        return self.categories(data, "", file)

    def check_category(
        self,
        category_id: int,
        known: set[int] | None,
        file: Path,
        json_path: str,
        image_id: int | None,
        segment_id: int | None,
    ) -> None:
        """Record ``unknown_category`` when ``category_id`` is not among ``known``."""
        if known is not None and category_id not in known:
            self.add(
                "error",
                "unknown_category",
                f"category id {category_id} is not in categories",
                file=file,
                image_id=image_id,
                segment_id=segment_id,
                json_path=json_path,
            )

    # ---- images ----------------------------------------------------------------------------

    def coco_images(self, images: list[Any], file: Path) -> list[_Image]:
        """Usable image entries (first occurrence of each id); records malformed entries."""
        out: list[_Image] = []
        first_at: dict[int, int] = {}
        for i, path, entry in self.objects(images, "images", file):
            _, image_id = self.expect(entry, "id", path, _INT, file)
            fields: dict[str, Any] = {}
            for key, rule in (
                ("file_name", _NAME),
                ("height", _POSITIVE_INT),
                ("width", _POSITIVE_INT),
            ):
                _, fields[key] = self.expect(entry, key, path, rule, file, image_id=image_id)
            if image_id is None:
                continue
            if image_id in first_at:
                self.add(
                    "error",
                    "duplicate_image_id",
                    f"image id {image_id} is used again at {path} "
                    f"(first at images[{first_at[image_id]}]); the repeat is ignored",
                    file=file,
                    image_id=image_id,
                    json_path=f"{path}.id",
                )
                continue
            first_at[image_id] = i
            out.append(_Image(i, image_id, fields["file_name"], fields["height"], fields["width"]))
        return out

    def check_image_file(  # 69 lines: one image's checks in order, each its own code
        self,
        path: Path,
        image_id: int | None,
        json_size: tuple[int | None, int | None] | None,
        json_path: str | None,
    ) -> tuple[int, int] | None:
        """Open and decode one image; its actual ``(width, height)`` or None if unusable.

        ``json_size`` is the stated ``(height, width)``; mismatches are recorded.
        """
        if not path.is_file():
            self.add(
                "error",
                "missing_image",
                "image file does not exist",
                file=path,
                image_id=image_id,
                json_path=json_path,
            )
            return None
        with _strict_loading():
            try:
                image = Image.open(path)
            except Exception as exc:  # PIL raises many kinds for non-images
                self.add(
                    "error",
                    "unreadable_image",
                    f"not a readable image: {exc}",
                    file=path,
                    image_id=image_id,
                    json_path=json_path,
                )
                return None
            with image:
                mode, size = image.mode, image.size
                try:
                    image.load()
                except Exception as exc:
                    self.add(
                        "error",
                        "truncated_image",
                        f"image cannot be decoded (truncated or corrupt): {exc}",
                        file=path,
                        image_id=image_id,
                        json_path=json_path,
                    )
                    return None
        if mode != "RGB":
            self.add(
                "info",
                "image_mode",
                f"image mode is {mode}; it will be converted to RGB",
                file=path,
                image_id=image_id,
            )
        if json_size is not None:
            height, width = json_size
            if height is not None and width is not None and (width, height) != size:
                self.add(
                    "error",
                    "size_mismatch",
                    f"JSON says {width}x{height} (width x height) but the file is "
                    f"{size[0]}x{size[1]}",
                    file=path,
                    image_id=image_id,
                    json_path=json_path,
                )
        return size

    def check_coco_image(self, image: _Image) -> tuple[int, int] | None:
        """File checks of one COCO image entry; its actual ``(width, height)`` or None."""
        if image.file_name is None:
            return None
        path = self.confine(
            self.paths.images,
            image.file_name,
            image_id=image.id,
            json_path=f"{image.json_path}.file_name",
        )
        if path is None:
            return None
        return self.check_image_file(path, image.id, (image.height, image.width), image.json_path)

    # ---- panoptic --------------------------------------------------------------------------

    def panoptic_annotations(
        self,
        annotations: list[Any],
        images: dict[int, _Image] | None,
        categories: set[int] | None,
        file: Path,
    ) -> dict[int, _PanopticAnnotation]:
        """Usable panoptic annotations by image id; records JSON-level problems."""
        out: dict[int, _PanopticAnnotation] = {}
        for i, path, ann in self.objects(annotations, "annotations", file):
            _, image_id = self.expect(ann, "image_id", path, _INT, file)
            _, file_name = self.expect(ann, "file_name", path, _NAME, file, image_id=image_id)
            _, segments_info = self.expect(
                ann, "segments_info", path, _LIST, file, image_id=image_id
            )
            segments = self.panoptic_segments(segments_info or [], path, image_id, categories, file)
            if image_id is None:
                continue
            if not self.known_image(images, image_id, path, path, file):
                continue
            if image_id in out:
                self.add(
                    "error",
                    "duplicate_annotation",
                    f"image {image_id} has a second panoptic annotation at {path} "
                    f"(first at annotations[{out[image_id].index}]); the second is ignored",
                    file=file,
                    image_id=image_id,
                    json_path=path,
                )
                continue
            out[image_id] = _PanopticAnnotation(i, image_id, file_name, segments)
        return out

    def panoptic_segments(
        self,
        segments_info: list[Any],
        ann_path: str,
        image_id: int | None,
        categories: set[int] | None,
        file: Path,
    ) -> dict[int, _Segment]:
        """Usable segments of one annotation by id; records malformed / duplicate entries."""
        out: dict[int, _Segment] = {}
        prefix = f"{ann_path}.segments_info"
        for j, path, seg in self.objects(segments_info, prefix, file, image_id):
            _, seg_id = self.expect(seg, "id", path, _POSITIVE_INT, file, image_id=image_id)
            self.expect_category(seg, path, categories, file, image_id, seg_id)
            _, area = self.expect(
                seg, "area", path, _AREA, file, image_id=image_id, segment_id=seg_id
            )
            self.expect_iscrowd(seg, path, file, image_id, seg_id)
            if seg_id is None:
                continue
            if seg_id in out:
                self.add(
                    "error",
                    "duplicate_segment_id",
                    f"segment id {seg_id} appears again at {path} "
                    f"(first at {prefix}[{out[seg_id].index}])",
                    file=file,
                    image_id=image_id,
                    segment_id=seg_id,
                    json_path=f"{path}.id",
                )
                continue
            out[seg_id] = _Segment(j, seg_id, area)
        return out

    def check_panoptic_png(  # 101 lines: decoded once, compared with segments_info in one pass
        self, ann: _PanopticAnnotation, image_size: tuple[int, int] | None
    ) -> None:
        """Decode one panoptic PNG once and compare it with its segments_info."""
        if ann.file_name is None:
            return
        json_path = f"annotations[{ann.index}]"
        image_id = ann.image_id
        path = self.confine(
            self.paths.panoptic_dir,
            ann.file_name,
            image_id=image_id,
            json_path=f"{json_path}.file_name",
        )
        if path is None:
            return
        if not path.is_file():
            self.add(
                "error",
                "missing_png",
                "panoptic PNG does not exist",
                file=path,
                image_id=image_id,
                json_path=f"{json_path}.file_name",
            )
            return
        with _strict_loading():
            try:
                with Image.open(path) as png:
                    png.load()
                    mode = png.mode
                    pixels = np.asarray(png) if mode in ("RGB", "RGBA") else None
            except Exception as exc:
                self.add(
                    "error",
                    "unreadable_png",
                    f"panoptic PNG cannot be read: {exc}",
                    file=path,
                    image_id=image_id,
                )
                return
        if pixels is None:
            self.add(
                "error",
                "png_mode",
                f"panoptic PNG has mode {mode}; it must be RGB (id = R + 256*G + 256^2*B)",
                file=path,
                image_id=image_id,
            )
            return
        height, width = pixels.shape[:2]
        if image_size is not None and image_size != (width, height):
            self.add(
                "error",
                "png_size_mismatch",
                f"panoptic PNG is {width}x{height} but the image is "
                f"{image_size[0]}x{image_size[1]} (width x height)",
                file=path,
                image_id=image_id,
            )
        rgb = pixels[..., :3].astype(np.uint32)
        ids = rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)
        values, counts = np.unique(ids, return_counts=True)
        pixel_count = dict(zip(values.tolist(), counts.tolist(), strict=True))
        pixel_count.pop(0, None)
        unlabeled = sorted(set(pixel_count) - set(ann.segments))
        if unlabeled:
            self.add(
                "error",
                "unlabeled_png_id",
                f"PNG segment id(s) {_listed(unlabeled)} have no segments_info entry "
                f"({sum(pixel_count[v] for v in unlabeled)} pixels)",
                file=path,
                image_id=image_id,
                segment_id=unlabeled[0],
                json_path=f"{json_path}.segments_info",
            )
        for seg in ann.segments.values():
            found = pixel_count.get(seg.id, 0)
            seg_path = f"{json_path}.segments_info[{seg.index}]"
            if found == 0:
                self.add(
                    "error",
                    "empty_segment",
                    f"segment {seg.id} has no pixels in the PNG",
                    file=path,
                    image_id=image_id,
                    segment_id=seg.id,
                    json_path=seg_path,
                )
            elif seg.area is not None and seg.area != found:
                self.add(
                    "error",
                    "area_mismatch",
                    f"segments_info area is {seg.area} but the PNG has {found} pixels "
                    f"with id {seg.id}",
                    file=path,
                    image_id=image_id,
                    segment_id=seg.id,
                    json_path=f"{seg_path}.area",
                )

    def run_panoptic(self) -> None:
        """All checks of a COCO panoptic split."""
        file = self.paths.panoptic_json
        coco = self.load_coco(file)
        if coco is None:
            return
        raw_annotations, categories, images = coco
        annotations = (
            None
            if raw_annotations is None
            else self.panoptic_annotations(raw_annotations, _by_id(images), categories, file)
        )
        for image in self.progress_over(images or [], "panoptic"):
            size = self.check_coco_image(image)
            if annotations is None:
                continue
            ann = annotations.get(image.id)
            if ann is None:
                self.add(
                    "error",
                    "missing_annotation",
                    f"image {image.id} has no entry in annotations",
                    file=file,
                    image_id=image.id,
                    json_path=image.json_path,
                )
                continue
            if size is None and image.height is not None and image.width is not None:
                size = (image.width, image.height)
            self.check_panoptic_png(ann, size)

    # ---- instance --------------------------------------------------------------------------

    def instance_annotations(
        self,
        annotations: list[Any],
        images: dict[int, _Image] | None,
        categories: set[int] | None,
        file: Path,
    ) -> dict[int, list[tuple[int, dict[str, Any]]]]:
        """Instance annotations with usable geometry by image id; records JSON problems."""
        out: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        first_at: dict[int, int] = {}
        for i, path, ann in self.objects(annotations, "annotations", file):
            _, ann_id = self.expect(ann, "id", path, _INT, file)
            _, image_id = self.expect(ann, "image_id", path, _INT, file, segment_id=ann_id)
            where = {"image_id": image_id, "segment_id": ann_id}
            self.expect_category(ann, path, categories, file, image_id, ann_id)
            ok_seg, _ = self.expect(ann, "segmentation", path, _SEGMENTATION, file, **where)
            ok_area, _ = self.expect(ann, "area", path, _AREA, file, **where)
            self.expect_iscrowd(ann, path, file, image_id, ann_id)
            if ann_id is not None:
                if ann_id in first_at:
                    self.add(
                        "error",
                        "duplicate_annotation_id",
                        f"annotation id {ann_id} is used again at {path} "
                        f"(first at annotations[{first_at[ann_id]}])",
                        file=file,
                        json_path=f"{path}.id",
                        **where,
                    )
                else:
                    first_at[ann_id] = i
            if image_id is None:
                continue
            if not self.known_image(images, image_id, f"annotation {ann_id}", path, file, ann_id):
                continue
            if ok_seg and ok_area:
                out.setdefault(image_id, []).append((i, ann))
        return out

    def check_instance_geometry(
        self, index: int, ann: dict[str, Any], height: int, width: int, file: Path
    ) -> None:
        """Polygon / RLE checks of one instance annotation against an image of that size."""
        ann_id = ann.get("id") if _is_int(ann.get("id")) else None
        image_id = ann["image_id"]
        path = f"annotations[{index}].segmentation"
        where: dict[str, Any] = {
            "file": file,
            "image_id": image_id,
            "segment_id": ann_id,
        }
        seg = ann["segmentation"]
        if isinstance(seg, list):
            area = self.polygon_area(seg, path, height, width, where)
        else:
            area = self.rle_area(seg, path, height, width, where)
        if area is None:
            return
        stated = float(ann["area"])
        if stated == 0 or area == 0:
            what = "the decoded mask is empty" if area == 0 else "its stated area is 0"
            self.add(
                "error",
                "zero_area",
                f"annotation {ann_id} has zero area: {what} (stated {stated:g}, mask {area})",
                json_path=path if area == 0 else f"annotations[{index}].area",
                **where,
            )
            return
        if abs(stated - area) > max(_AREA_ABS_TOL, _AREA_REL_TOL * max(stated, area)):
            self.add(
                "warning",
                "area_mismatch",
                f"annotation {ann_id} states area {stated:g} but its mask has {area} pixels",
                json_path=f"annotations[{index}].area",
                **where,
            )

    def polygon_area(
        self, polygons: list[Any], path: str, height: int, width: int, where: dict[str, Any]
    ) -> int | None:
        """Mask area of a polygon list, or None when a polygon is malformed."""
        ann_id = where["segment_id"]
        if not polygons:
            return 0
        usable: list[list[float]] = []
        for k, poly in enumerate(polygons):
            poly_path = f"{path}[{k}]"
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                self.add(
                    "error",
                    "bad_polygon",
                    f"polygon {k} of annotation {ann_id} must be a list of numbers "
                    f"(got {_show(poly)})",
                    json_path=poly_path,
                    **where,
                )
                continue
            if len(poly) < 6 or len(poly) % 2:
                self.add(
                    "error",
                    "bad_polygon",
                    f"polygon {k} of annotation {ann_id} has {len(poly)} coordinates; "
                    "a polygon needs an even number, at least 6",
                    json_path=poly_path,
                    **where,
                )
                continue
            xs, ys = poly[0::2], poly[1::2]
            tol = _POLYGON_TOLERANCE
            if min(xs) < -tol or max(xs) > width + tol or min(ys) < -tol or max(ys) > height + tol:
                self.add(
                    "error",
                    "polygon_outside_image",
                    f"polygon {k} of annotation {ann_id} spans x {min(xs):g}..{max(xs):g}, "
                    f"y {min(ys):g}..{max(ys):g}, outside the {width}x{height} image",
                    json_path=poly_path,
                    **where,
                )
            usable.append([float(v) for v in poly])
        if len(usable) != len(polygons):
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(usable, height, width))
        return int(mask_utils.area(rle))

    def rle_area(
        self, rle: dict[str, Any], path: str, height: int, width: int, where: dict[str, Any]
    ) -> int | None:
        """Mask area of an RLE (compressed or not), or None when it is malformed."""
        ann_id = where["segment_id"]
        size = rle.get("size")
        if size != [height, width]:
            self.add(
                "error",
                "rle_size_mismatch",
                f"RLE of annotation {ann_id} has size {_show(size)}; "
                f"its image needs [{height}, {width}] (height, width)",
                json_path=f"{path}.size",
                **where,
            )
            return None
        raw = rle.get("counts")
        try:
            if isinstance(raw, str):
                counts = rle_counts(raw, strict=True).tolist()
            elif isinstance(raw, list) and all(_is_int(v) for v in raw):
                counts = raw
            else:
                raise ValueError(
                    f"counts must be a compressed string or a list of ints (got {_show(raw)})"
                )
            if any(c < 0 for c in counts):
                raise ValueError("counts contain negative run lengths")
            if sum(counts) != height * width:
                raise ValueError(
                    f"runs cover {sum(counts)} pixels but the image has {height * width}"
                )
        except ValueError as exc:
            self.add(
                "error",
                "bad_rle",
                f"RLE counts of annotation {ann_id} cannot be decoded: {exc}",
                json_path=f"{path}.counts",
                **where,
            )
            return None
        return int(sum(counts[1::2]))

    def run_instance(self) -> None:
        """All checks of a COCO instance split."""
        file = self.paths.instances_json
        coco = self.load_coco(file)
        if coco is None:
            return
        raw_annotations, categories, images = coco
        annotations = (
            {}
            if raw_annotations is None
            else self.instance_annotations(raw_annotations, _by_id(images), categories, file)
        )
        for image in self.progress_over(images or [], "instances"):
            size = self.check_coco_image(image)
            anns = annotations.get(image.id, [])
            if image.height is not None and image.width is not None:
                height, width = image.height, image.width
            elif size is not None:
                width, height = size
            else:
                continue
            for index, ann in anns:
                self.check_instance_geometry(index, ann, height, width, file)

    # ---- semantic --------------------------------------------------------------------------

    def run_semantic(self) -> None:
        """All checks of a semantic_png split."""
        categories = self.semantic_categories()
        folder = self.paths.images
        if not folder.is_dir():
            self.add("error", "missing_image_dir", "image folder does not exist", file=folder)
            return
        names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self.num_images = len(names)
        stems = set()
        # Semantic datasets have no ids: image i (1-based) of the sorted listing has id i, as
        # in `knet data prepare`.
        for image_id, name in enumerate(self.progress_over(names, "semantic"), start=1):
            stem = Path(name).stem
            stems.add(stem)
            path = self.confine(folder, name)
            if path is None:
                continue
            size = self.check_image_file(path, image_id, None, None)
            self.check_label(stem, size, categories, image_id)
        label_dir = self.paths.semantic_dir
        if label_dir.is_dir():
            for label in sorted(label_dir.glob("*.png")):
                if label.stem not in stems:
                    self.add(
                        "warning",
                        "unused_label",
                        f"label PNG has no image named {label.stem}.* in {folder}",
                        file=label,
                    )

    def check_label(  # 67 lines: each label check with its own problem code, in order
        self,
        stem: str,
        image_size: tuple[int, int] | None,
        categories: set[int] | None,
        image_id: int,
    ) -> None:
        """Label PNG checks for the image with this stem."""
        path = self.confine(self.paths.semantic_dir, f"{stem}.png")
        if path is None:
            return
        if not path.is_file():
            self.add(
                "error",
                "missing_label",
                f"no label PNG for image {stem!r}",
                file=path,
                image_id=image_id,
            )
            return
        with _strict_loading():
            try:
                with Image.open(path) as label:
                    label.load()
                    mode = label.mode
                    pixels = np.asarray(label) if mode in ("L", "P") else None
                    size = label.size
            except Exception as exc:
                self.add(
                    "error",
                    "unreadable_label",
                    f"label PNG cannot be read: {exc}",
                    file=path,
                    image_id=image_id,
                )
                return
        if pixels is None:
            self.add(
                "error",
                "label_mode",
                f"label PNG has mode {mode}; it must be single-channel 8-bit (L or P)",
                file=path,
                image_id=image_id,
            )
            return
        if image_size is not None and size != image_size:
            self.add(
                "error",
                "label_size_mismatch",
                f"label PNG is {size[0]}x{size[1]} but the image is "
                f"{image_size[0]}x{image_size[1]} (width x height)",
                file=path,
                image_id=image_id,
            )
        if categories is None:
            return
        present = np.flatnonzero(np.bincount(pixels.ravel(), minlength=256)).tolist()
        unknown = [v for v in present if v not in self.ignore_values and v not in categories]
        if unknown:
            self.add(
                "error",
                "unknown_label_value",
                f"label values {_listed(unknown)} are neither category ids nor ignored values "
                f"{sorted(self.ignore_values)}",
                file=path,
                image_id=image_id,
            )


def validate_split(
    paths: DatasetPaths,
    fmt: str,
    progress: bool = False,
    ignore_values: Sequence[int] = (255,),
) -> ValidationReport:
    """Check one split of a raw dataset and report every problem found.

    Args:
        paths: where the split's files are (:func:`knet.data.layout.dataset_paths`); every file
            name read from the data is confined to ``paths.root``.
        fmt: ``coco_panoptic``, ``coco_instance`` or ``semantic_png``.
        progress: show a tqdm progress bar over the images on stderr.
        ignore_values: semantic_png label values meaning "unlabelled" (``data.semantic_ignore``).

    Returns:
        The report; ``report.ok`` is False when any error was found. Use
        :meth:`ValidationReport.raise_for_errors` to turn errors into an exception.

    Raises:
        ValueError: for an unknown ``fmt`` (dataset problems are reported, never raised).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")
    start = time.perf_counter()
    checker = _Checker(paths, fmt, progress, ignore_values)
    log.info("validating %s split %r (%s) under %s", fmt, paths.split, paths.images, paths.root)
    if fmt == "coco_panoptic":
        checker.run_panoptic()
    elif fmt == "coco_instance":
        checker.run_instance()
    else:
        checker.run_semantic()
    report = ValidationReport(
        problems=checker.problems,
        num_images=checker.num_images,
        seconds=time.perf_counter() - start,
    )
    counts = Counter(p.level for p in report.problems)
    log.log(
        logging.WARNING if counts["error"] else logging.INFO,
        "validated %d images in %.2f s: %d errors, %d warnings, %d info",
        report.num_images,
        report.seconds,
        counts["error"],
        counts["warning"],
        counts["info"],
    )
    for problem in report.problems:
        log.debug("%s", problem)
    return report
