"""COCO instance: annotations, their polygons and RLEs, against the images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from knet.data.rle import rle_counts
from knet.data.validation.checker import (
    _AREA,
    _INT,
    _SEGMENTATION,
    Checker,
    _by_id,
    _Image,
    _is_int,
    _is_number,
    _show,
)

# Polygon coordinates may exceed the image by this many pixels (annotation tools round).
_POLYGON_TOLERANCE = 1.0
# Instance area mismatches below max(_AREA_ABS_TOL px, _AREA_REL_TOL * area) are ignored.
_AREA_ABS_TOL = 2.0
_AREA_REL_TOL = 0.01


class InstanceChecker(Checker):
    """The checks of a COCO instance split."""

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

    def run(self) -> None:
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
