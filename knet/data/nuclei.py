"""A real-image preset: fluorescence nuclei with human-made instance masks, from a package.

The StarDist wheel (``pip install --no-deps stardist==0.9.2``; ``make install`` does it) ships
one 512x512 fluorescence micrograph of cell nuclei, ``stardist/data/images/img2d.tif``, and its
hand-annotated instance labels, ``mask2d.tif`` (125 nuclei; an image of the 2018 Data Science
Bowl's stage-1 training set, BBBC038, CC0). :func:`generate_nuclei` cuts it into a COCO
*instance* dataset that ``knet data prepare --params configs/nuclei-instance.yaml`` reads like
any COCO folder:

* val: the bottom 128 rows as four 128x128 tiles (held out: no training tile overlaps them);
* train: 128x128 tiles with a 32-pixel stride over the top 384 rows (9 x 13 = 117 tiles; the
  overlap is the augmentation a single image allows).

Nuclei cut by a tile border keep the visible part as their mask, as COCO crops do; the few that
cross the row-384 boundary appear partly in both splits. Only the package's files are read (the
package is never imported, so its own dependencies are not needed) and nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from knet.config import DataConfig
from knet.data.layout import dataset_paths
from knet.io import atomic_directory, dumps

PACKAGE = "stardist"
PACKAGE_PIN = "stardist==0.9.2"
IMAGE_FILE = "data/images/img2d.tif"
MASK_FILE = "data/images/mask2d.tif"
CATEGORIES = [{"id": 1, "name": "nucleus", "supercategory": "cell", "isthing": 1}]
TILE = 128
TRAIN_STRIDE = 32
VAL_ROWS = 128


class PackageDataMissing(FileNotFoundError):
    """The package that ships the images is not installed."""


def package_files() -> tuple[Path, Path]:
    """The image and label files inside the installed StarDist package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        image, mask = Path(location) / IMAGE_FILE, Path(location) / MASK_FILE
        if image.is_file() and mask.is_file():
            return image, mask
    raise PackageDataMissing(
        f"the nuclei preset reads {IMAGE_FILE} and {MASK_FILE} from the {PACKAGE} package, "
        f"which is not installed here: pip install --no-deps {PACKAGE_PIN} (make install does)"
    )


def load_micrograph() -> tuple[np.ndarray, np.ndarray]:
    """The 8-bit RGB micrograph (grey in all channels) and its uint16 instance-label map."""
    image_path, mask_path = package_files()
    image = np.asarray(Image.open(image_path))
    labels = np.asarray(Image.open(mask_path)).astype(np.int64)
    if image.shape != labels.shape or image.ndim != 2:
        raise ValueError(f"{image_path} {image.shape} and {mask_path} {labels.shape} differ")
    # The stored values already lie in 0..255 (uint16 container); stretch to the full range.
    scaled = image.astype(np.float64) * (255.0 / max(1, int(image.max())))
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2), labels


def _tiles(height: int, width: int) -> dict[str, list[tuple[int, int]]]:
    """Top-left corners of the train and val tiles (val: the bottom VAL_ROWS rows)."""
    split_row = height - VAL_ROWS
    train = [
        (y, x)
        for y in range(0, split_row - TILE + 1, TRAIN_STRIDE)
        for x in range(0, width - TILE + 1, TRAIN_STRIDE)
    ]
    val = [(split_row, x) for x in range(0, width - TILE + 1, TILE)]
    return {"train": train, "val": val}


def _annotations(labels: np.ndarray, image_id: int, next_id: int) -> list[dict[str, Any]]:
    """COCO instance annotations (compressed RLE) of the label ids visible in one tile."""
    annotations = []
    for label in np.unique(labels):
        if label == 0:
            continue
        mask = np.asfortranarray(labels == label, dtype=np.uint8)
        rle = mask_utils.encode(mask)
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        annotations.append(
            {
                "id": next_id + len(annotations),
                "image_id": image_id,
                "category_id": 1,
                "iscrowd": 0,
                "area": int(mask.sum()),
                "bbox": [x, y, w, h],
                "segmentation": {
                    "size": [int(v) for v in rle["size"]],
                    "counts": rle["counts"].decode("ascii"),
                },
            }
        )
    return annotations


def generate_nuclei(root: str | Path, data_cfg: DataConfig | None = None) -> dict[str, Any]:
    """Write the nuclei dataset (COCO instance layout of ``data_cfg``) to ``root`` atomically.

    Returns a summary: ``root``, ``images`` and ``instances`` per split, and the ``source`` file.
    ``root`` must be new, empty or an earlier output of this command (``.knet-output``).
    """
    data_cfg = DataConfig() if data_cfg is None else data_cfg
    image, labels = load_micrograph()
    splits = {data_cfg.train_split: "train", data_cfg.val_split: "val"}
    if len(splits) != 2:
        raise ValueError(f"train and val splits must differ, both are {data_cfg.train_split!r}")
    corners = _tiles(*labels.shape)
    summary: dict[str, Any] = {
        "root": str(root),
        "source": f"{PACKAGE}/{IMAGE_FILE}",
        "images": {},
        "instances": {},
    }
    with atomic_directory(root, "nuclei") as tmp:
        for split_index, (split, part) in enumerate(splits.items()):
            paths = dataset_paths(data_cfg, split, tmp)
            paths.images.mkdir(parents=True, exist_ok=True)
            paths.instances_json.parent.mkdir(parents=True, exist_ok=True)
            images, annotations = [], []
            for index, (y, x) in enumerate(corners[part]):
                image_id = (split_index + 1) * 1000 + index
                name = f"nuclei_{y:03d}_{x:03d}.png"
                Image.fromarray(image[y : y + TILE, x : x + TILE]).save(paths.images / name)
                images.append({"id": image_id, "file_name": name, "height": TILE, "width": TILE})
                tile_labels = labels[y : y + TILE, x : x + TILE]
                annotations += _annotations(tile_labels, image_id, len(annotations) + 1)
            coco = {
                "info": {"description": f"StarDist's nuclei micrograph, {part} tiles"},
                "images": images,
                "annotations": annotations,
                "categories": [
                    {k: c[k] for k in ("id", "name", "supercategory")} for c in CATEGORIES
                ],
            }
            paths.instances_json.write_text(dumps(coco, separators=(",", ":")))
            summary["images"][split] = len(images)
            summary["instances"][split] = len(annotations)
    return summary
