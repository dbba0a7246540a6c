"""What the checks of every format share: recording problems with where they are, JSON files
and their structure, categories, COCO images and their files, paths confined to the root."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jsonschema import Draft202012Validator, validators
from PIL import Image, ImageFile
from tqdm import tqdm

from knet.data.layout import DatasetPaths, UnsafePathError, confined
from knet.data.validation.report import _MAX_LISTED, Level, Problem

# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# JSON Schema's integer and number, as COCO means them: no booleans, no 1.0, no NaN / inf.
_STRICT_TYPES = Draft202012Validator.TYPE_CHECKER.redefine_many(
    {"integer": lambda _, v: _is_int(v), "number": lambda _, v: _is_number(v)}
)
_SchemaValidator = validators.extend(Draft202012Validator, type_checker=_STRICT_TYPES)


class _Rule:
    """What a JSON value must satisfy, as a JSON Schema that ``jsonschema`` checks, and how
    messages describe it (``<json path> must be <desc> (got <value>)``: the same words for
    every format, so each problem names its file, image, segment and JSON path)."""

    def __init__(self, schema: dict[str, Any], desc: str) -> None:
        _SchemaValidator.check_schema(schema)
        self.schema = schema
        self.desc = desc
        self._validator = _SchemaValidator(schema)

    def check(self, value: Any) -> bool:
        return self._validator.is_valid(value)


_INT = _Rule({"type": "integer"}, "an int")
_POSITIVE_INT = _Rule({"type": "integer", "minimum": 1}, "a positive int")
_STRING = _Rule({"type": "string"}, "a string")
_NAME = _Rule({"type": "string", "minLength": 1}, "a non-empty string")
_LIST = _Rule({"type": "array"}, "a list")
_AREA = _Rule({"type": "number", "minimum": 0}, "a non-negative number")
# 0 / 1 (JSON true / false are tolerated, as Python reads them as 1 / 0)
_FLAG = _Rule({"anyOf": [{"type": "boolean"}, {"type": "integer", "enum": [0, 1]}]}, "0 or 1")
_SEGMENTATION = _Rule({"type": ["array", "object"]}, "a list of polygons or an RLE object")


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


def _by_id(images: list[_Image] | None) -> dict[int, _Image] | None:
    return None if images is None else {image.id: image for image in images}


# --------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------


class Checker:
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

    def run(self) -> None:
        """Check the whole split (each format's subclass)."""
        raise NotImplementedError

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
            if not required:
                return True, None
            message = f"{where} is missing"
        elif rule.check(obj[key]):
            return True, obj[key]
        else:
            message = f"{where} must be {rule.desc} (got {_show(obj[key])})"
        self.add(
            "error",
            code,
            message,
            file=file,
            image_id=image_id,
            segment_id=segment_id,
            json_path=where,
        )
        return False, None

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

    def read_png(  # 7 parameters: the file, the modes it needs, and where a problem is
        self,
        path: Path,
        modes: tuple[str, ...],
        what: str,
        codes: tuple[str, str],
        image_id: int | None,
        need: str,
    ) -> tuple[np.ndarray, tuple[int, int]] | None:
        """``(pixels, (width, height))`` of a PNG decoded in full, or None after recording
        ``codes[0]`` (it cannot be read) or ``codes[1]`` (its mode is not one of ``modes``)."""
        with _strict_loading():
            try:
                with Image.open(path) as png:
                    png.load()
                    mode, size = png.mode, png.size
                    pixels = np.asarray(png) if mode in modes else None
            except Exception as exc:
                message = f"{what} cannot be read: {exc}"
                self.add("error", codes[0], message, file=path, image_id=image_id)
                return None
        if pixels is None:
            message = f"{what} has mode {mode}; it must be {need}"
            self.add("error", codes[1], message, file=path, image_id=image_id)
            return None
        return pixels, size

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
