"""The prepared-split dataset, its collate function and loaders.

Every task reads the same prepared split: panoptic uses all segments, instance the thing
segments, semantic the semantic map (read for ``semantic_png`` data, painted from the segments
otherwise). Crowd segments never become training targets (they are kept in the prepared data
for evaluation). Letters: B images, G segments, H, W the padded batch size.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from knet.config import DataConfig
from knet.data import DataError
from knet.data.categories import Categories
from knet.data.groundtruth import GroundTruth
from knet.data.transforms import MASK_STRIDE, Transform
from knet.structures import IGNORE_LABEL, Targets

TASK_FORMATS = {
    "panoptic": ("coco_panoptic",),
    "instance": ("coco_panoptic", "coco_instance"),
    "semantic": ("coco_panoptic", "semantic_png"),
}


@dataclass
class Batch:
    """A padded batch, ready for the model and the criterion."""

    images: Tensor  # (B, 3, H, W)
    targets: list[Targets]
    image_sizes: list[tuple[int, int]]  # resized size inside the padding, per image
    output_sizes: list[tuple[int, int]]  # original image size, per image
    image_ids: list[int]
    indices: list[int]  # positions in the dataset (for its ground truth)

    def to(
        self, device: torch.device | str, non_blocking: bool = False, channels_last: bool = False
    ) -> Batch:
        """The batch on ``device``; ``channels_last`` also puts the images in that format."""
        images = self.images.to(device, non_blocking=non_blocking)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return Batch(
            images,
            [t.to(device, non_blocking=non_blocking) for t in self.targets],
            self.image_sizes,
            self.output_sizes,
            self.image_ids,
            self.indices,
        )

    def pin_memory(self) -> Batch:
        """Page-locked tensors: the DataLoader's ``pin_memory=True`` calls this (a dataclass
        without it would be passed through unpinned), so ``to(..., non_blocking=True)`` is
        asynchronous."""
        return dataclasses.replace(
            self, images=self.images.pin_memory(), targets=[t.pin_memory() for t in self.targets]
        )

    def __len__(self) -> int:
        return len(self.image_ids)


class PreparedDataset(Dataset):
    """One split written by ``knet data prepare``, yielding transformed samples for ``task``."""

    def __init__(self, split_dir: str | Path, task: str, transform: Transform) -> None:
        self.split_dir = Path(split_dir)
        index_path = self.split_dir / "index.json"
        try:
            index = json.loads(index_path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{index_path} does not exist; run `knet data prepare` (or `dvc repro prepare`)"
            ) from None
        except (OSError, ValueError) as err:  # a folder, unreadable bytes, not JSON
            raise DataError(
                f"{index_path} is not a readable prepared index ({err}); run `knet data "
                f"prepare` again"
            ) from None
        if not isinstance(index, dict) or any(
            k not in index for k in ("format", "categories", "image_root", "images")
        ):
            raise DataError(
                f"{index_path} is not a prepared index (expected format, categories, image_root "
                f"and images); run `knet data prepare` again"
            )
        self.format = index["format"]
        if self.format not in TASK_FORMATS[task]:
            raise ValueError(
                f"model.task={task} cannot train on data.format={self.format} "
                f"(it needs one of {', '.join(TASK_FORMATS[task])})"
            )
        self.task = task
        self.transform = transform
        self.categories = Categories.from_json(index["categories"])
        self.image_root = (self.split_dir / index["image_root"]).resolve()
        self.images: list[dict[str, Any]] = index["images"]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.images[i]
        image = load_rgb(self.image_root / record["file_name"])  # (H, W, 3) uint8
        segments = [s for s in self.read_segments(i) if not s["iscrowd"]]
        if self.task == "instance":
            segments = [s for s in segments if self.categories.is_thing[s["category"]]]
        masks = decode_masks(segments, record["height"], record["width"])  # (G, H, W) bool
        labels = torch.tensor([s["category"] for s in segments], dtype=torch.int64)
        semantic = self._semantic(record, masks, labels) if self.task == "semantic" else None
        sample = self.transform(torch.from_numpy(image), masks, semantic)
        keep = sample.masks.flatten(1).amax(1) > 0  # segments cropped away entirely
        return {
            "image": sample.image,
            "targets": Targets(
                sample.masks[keep],
                labels[keep],
                sample.semantic,
                is_thing=self._is_thing(labels[keep]),
            ),
            "image_size": sample.image_size,
            "output_size": (record["height"], record["width"]),
            "image_id": record["id"],
            "index": i,
        }

    def ground_truth(self, i: int) -> GroundTruth:
        """Image ``i``'s ground truth at its original size, crowd segments included."""
        record = self.images[i]
        semantic = None
        if "semantic" in record:
            semantic = np.asarray(Image.open(self.split_dir / record["semantic"]))
        return GroundTruth(
            record["id"], record["height"], record["width"], self.read_segments(i), semantic
        )

    def read_segments(self, i: int) -> list[dict[str, Any]]:
        """The prepared segments of image ``i`` (training ids, COCO RLE, iscrowd, area)."""
        with open(self.split_dir / "segments.jsonl", "rb") as f:
            f.seek(self.images[i]["offset"])
            return json.loads(f.readline())

    def _is_thing(self, labels: Tensor) -> Tensor:
        flags = torch.tensor(self.categories.is_thing, dtype=torch.bool)
        return flags[labels] if len(labels) else torch.zeros(0, dtype=torch.bool)

    def _semantic(self, record: dict[str, Any], masks: Tensor, labels: Tensor) -> Tensor:
        if "semantic" in record:
            return torch.from_numpy(
                np.asarray(Image.open(self.split_dir / record["semantic"]), dtype=np.int64)
            )
        semantic = torch.full(masks.shape[-2:], IGNORE_LABEL, dtype=torch.int64)
        for mask, label in zip(masks, labels, strict=True):
            semantic[mask] = label
        return semantic


def load_rgb(path: Path) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB; grayscale, RGBA, palette and 16-bit are converted."""
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(img, dtype=np.float64)
            img = Image.fromarray((array / max(array.max(), 1) * 255).astype(np.uint8))
        return np.array(img.convert("RGB"))  # writable copy for torch.from_numpy


def decode_masks(segments: list[dict[str, Any]], height: int, width: int) -> Tensor:
    """COCO RLEs -> (G, H, W) bool."""
    if not segments:
        return torch.zeros(0, height, width, dtype=torch.bool)
    rles = [s["rle"] for s in segments]
    masks = mask_utils.decode(rles)  # (H, W, G) uint8, Fortran order
    return torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1))).bool()


def collate(samples: list[dict[str, Any]]) -> Batch:
    """Pad images (zeros), stride-4 masks (zeros) and semantic maps (255) to the batch size."""
    height = max(s["image"].shape[-2] for s in samples)
    width = max(s["image"].shape[-1] for s in samples)
    images = samples[0]["image"].new_zeros(len(samples), 3, height, width)
    targets = []
    for b, s in enumerate(samples):
        h, w = s["image"].shape[-2:]
        images[b, :, :h, :w] = s["image"]
        t = s["targets"]
        masks = t.masks.new_zeros(len(t.masks), height // MASK_STRIDE, width // MASK_STRIDE)
        masks[:, : t.masks.shape[-2], : t.masks.shape[-1]] = t.masks
        semantic = None
        if t.semantic is not None:
            semantic = t.semantic.new_full((height, width), IGNORE_LABEL)
            semantic[:h, :w] = t.semantic
        targets.append(Targets(masks, t.labels, semantic, t.is_thing))
    return Batch(
        images,
        targets,
        [s["image_size"] for s in samples],
        [s["output_size"] for s in samples],
        [s["image_id"] for s in samples],
        [s["index"] for s in samples],
    )


def build_dataset(cfg: DataConfig, split: str, task: str, train: bool) -> PreparedDataset:
    """The prepared ``split`` under ``cfg.prepared`` with training or test transforms."""
    return PreparedDataset(Path(cfg.prepared) / split, task, Transform(cfg, train=train))


def build_loader(
    dataset: PreparedDataset,
    batch_size: int,
    train: bool,
    num_workers: int = 2,
    sampler: Sampler | Iterable[int] | None = None,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader with :func:`collate`; shuffles in training unless a sampler is given."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=train,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=generator,
    )
