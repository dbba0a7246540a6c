"""COCO panoptic: the annotation JSON's segments_info against the panoptic PNGs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knet.data.validation.checker import (
    _AREA,
    _INT,
    _LIST,
    _NAME,
    _POSITIVE_INT,
    Checker,
    _by_id,
    _Image,
    _listed,
)


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


class PanopticChecker(Checker):
    """The checks of a COCO panoptic split."""

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
        read = self.read_png(
            path,
            ("RGB", "RGBA"),
            "panoptic PNG",
            ("unreadable_png", "png_mode"),
            image_id,
            "RGB (id = R + 256*G + 256^2*B)",
        )
        if read is None:
            return
        pixels, _ = read
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

    def run(self) -> None:
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
