"""Semantic label PNGs: one single-channel label per image, values category ids or ignore."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from knet.data.layout import IMAGE_SUFFIXES
from knet.data.validation.checker import Checker, _listed, _show


class SemanticChecker(Checker):
    """The checks of a semantic_png split."""

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

    # ---- semantic --------------------------------------------------------------------------

    def run(self) -> None:
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
        read = self.read_png(
            path,
            ("L", "P"),
            "label PNG",
            ("unreadable_label", "label_mode"),
            image_id,
            "single-channel 8-bit (L or P)",
        )
        if read is None:
            return
        pixels, size = read
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
