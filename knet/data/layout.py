"""Where a raw dataset's files are, and paths that cannot escape the dataset root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from knet.config import DataConfig

# File suffixes read as images (a semantic_png image folder, knet predict's input folders).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


class UnsafePathError(ValueError):
    """A file name that points outside the dataset root (``..``, absolute, or a symlink out)."""


@dataclass(frozen=True)
class DatasetPaths:
    """Resolved locations of one split of a raw dataset (see :class:`knet.config.DataConfig`)."""

    root: Path
    split: str
    images: Path
    panoptic_json: Path
    panoptic_dir: Path
    instances_json: Path
    semantic_dir: Path
    categories_json: Path


def dataset_paths(cfg: DataConfig, split: str, root: str | Path | None = None) -> DatasetPaths:
    """Fill the ``{split}`` templates of ``cfg`` under ``root`` (default ``cfg.raw``)."""
    base = Path(cfg.raw if root is None else root)

    def fill(template: str) -> Path:
        return base / template.format(split=split)

    return DatasetPaths(
        root=base,
        split=split,
        images=fill(cfg.images),
        panoptic_json=fill(cfg.panoptic_json),
        panoptic_dir=fill(cfg.panoptic_dir),
        instances_json=fill(cfg.instances_json),
        semantic_dir=fill(cfg.semantic_dir),
        categories_json=fill(cfg.categories_json),
    )


def confined(folder: Path, file_name: str, root: Path) -> Path:
    """``folder / file_name``, refusing names that leave ``root``.

    Rejects absolute names, ``..`` components and symlinks whose target lies outside ``root``.

    Raises:
        UnsafePathError: naming the offending file name.
    """
    if not isinstance(file_name, str) or not file_name:
        raise UnsafePathError(f"file name {file_name!r} is empty or not a string")
    name = Path(file_name)
    if name.is_absolute() or ".." in name.parts:
        raise UnsafePathError(f"file name {file_name!r} escapes the dataset root {root}")
    path = folder / name
    resolved_root = root.resolve()
    try:
        path.resolve().relative_to(resolved_root)
    except ValueError:
        raise UnsafePathError(
            f"file name {file_name!r} resolves outside the dataset root {root} "
            f"(to {path.resolve()})"
        ) from None
    return path
