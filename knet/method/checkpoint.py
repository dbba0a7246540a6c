"""Checkpoints that carry their own config and class list, so a model rebuilds from the file.

A checkpoint is a plain dict saved with ``torch.save`` and read with ``weights_only=True``:
tensors, numbers, strings, lists and dicts only; no pickled Python objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from knet.config import Config, config_from_dict
from knet.data.categories import Categories
from knet.io import OutputExistsError
from knet.model import KNet, build_model

CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("version", "model", "config", "categories")


class CheckpointError(ValueError):
    """A file that is not a knet checkpoint (or not one this version can read)."""


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    cfg: Config,
    categories: Categories,
    **state: Any,
) -> None:
    """Write weights + config + categories (+ optimizer, scheduler, epoch, ...) atomically.

    ``model`` may be wrapped in DistributedDataParallel; the plain module's weights are saved.
    Extra keyword arguments are stored as they are (state dicts, numbers, strings).
    """
    model = getattr(model, "module", model)
    payload = {
        "version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "config": cfg.to_dict(),
        "categories": categories.to_json(),
        **state,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_checkpoint_output(path: str | Path) -> None:
    """Refuse to write a checkpoint over anything but a knet checkpoint (or nothing).

    Raises:
        OutputExistsError: ``path`` is a folder, a link, or a file that is not a checkpoint.
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputExistsError(f"checkpoint output {path} exists and is not a file")
    if not path.exists():
        return
    try:
        load_checkpoint(path)
    except CheckpointError:
        raise OutputExistsError(
            f"checkpoint output {path} already exists and is not a knet checkpoint; knet only "
            f"replaces its own checkpoints: set train.output to a new file or remove it yourself"
        ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict, loaded with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for foreign or corrupt files
        detail = str(err) if len(str(err)) > 8 else f"{type(err).__name__} {str(err)!r}"
        raise CheckpointError(
            f"{path} is not a readable checkpoint (not a file torch.save wrote): {detail}"
        ) from None
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED_KEYS):
        raise CheckpointError(
            f"{path} is not a knet checkpoint (expected keys {', '.join(REQUIRED_KEYS)})"
        )
    version = payload["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(
            f"{path}: checkpoint version must be a positive integer; got {version!r}"
        )
    if not isinstance(payload["config"], dict) or not isinstance(payload["model"], dict):
        raise CheckpointError(
            f"{path} is not a knet checkpoint (config and model must be mappings)"
        )
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {version}; this knet reads up to {CHECKPOINT_VERSION}"
        )
    return payload


def model_from_checkpoint(
    payload: dict[str, Any], device: str | torch.device = "cpu"
) -> tuple[KNet, Config, Categories]:
    """Rebuild the model from a loaded checkpoint (its own config and categories)."""
    cfg = config_from_dict(payload["config"])
    categories = Categories.from_json(payload["categories"])
    # The weights in the file supersede any ImageNet initialisation the config names.
    backbone = dataclasses.replace(cfg.model.backbone, weights=None)
    model_cfg = dataclasses.replace(cfg.model, backbone=backbone)
    model = build_model(model_cfg, categories.num_things, categories.num_stuff)
    _check_weights_fit(model, payload["model"], cfg)
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), cfg, categories


def _check_weights_fit(model: KNet, weights: dict[str, Any], cfg: Config) -> None:
    """One line instead of torch's list of every mismatched name (hundreds of lines)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [
        k
        for k in expected
        if k in weights and tuple(getattr(weights[k], "shape", ())) != tuple(expected[k].shape)
    ]
    if missing or unexpected or reshaped:
        first = (reshaped or missing or unexpected)[0]
        raise CheckpointError(
            f"the weights do not fit the model its config describes ({cfg.model.task}, "
            f"{cfg.model.num_kernels} kernels, {cfg.model.num_stages} rounds): "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} of another "
            f"shape (first: {first})"
        )


def load_model(
    path: str | Path, device: str | torch.device = "cpu", info: dict[str, Any] | None = None
) -> tuple[KNet, Config, Categories]:
    """:func:`load_checkpoint` then :func:`model_from_checkpoint`; every error names ``path``.

    A checkpoint whose stored config or categories do not load (an unknown key, a category
    without its flag, weights of another model) is refused as a :class:`CheckpointError`.
    ``info``, when given, receives the checkpoint's ``epoch`` and ``mlflow_run_id``.
    """
    payload = load_checkpoint(path)
    if info is not None:
        info.update({k: payload.get(k) for k in ("epoch", "mlflow_run_id")})
    try:
        return model_from_checkpoint(payload, device)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        text = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, KeyError | TypeError | AttributeError):
            text = f"{type(err).__name__}: {text}"
        raise CheckpointError(f"{path} does not hold a usable knet model: {text}") from None
