"""``knet export``: a checkpoint's model as a ``torch.export`` program (``.pt2``).

The exported program is the model's forward (backbone -> FPN -> fuser -> initial kernels ->
update rounds), the same :class:`knet.model.KNetOutput` as eager; post-processing stays in
Python (:mod:`knet.method.postprocess`). Batch size and image size are dynamic: any batch,
heights and widths that are multiples of 32 (the padding of ``data.size_divisor``) from 64 to 2048.
Load it with ``torch.export.load(path).module()`` after ``import knet.evaluation.export`` (which
registers the output dataclasses with torch's pytree).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import zipfile
from pathlib import Path

import torch

from knet.io import OutputExistsError
from knet.method.checkpoint import load_model
from knet.model.knet import KNetOutput, StageOutput

# Export-time example (batch 2: a batch of 1 would be specialised to 1) and the size range.
EXAMPLE_SHAPE = (2, 3, 128, 160)
STRIDE = 32
MAX_SIDE = 2048


def _register_outputs() -> None:
    for cls in (StageOutput, KNetOutput):
        with contextlib.suppress(ValueError):  # already registered in this process
            torch.export.register_dataclass(cls, serialized_type_name=f"knet.{cls.__name__}")


_register_outputs()


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What :func:`export_checkpoint` wrote and how close the program is to eager."""

    path: str
    example_shape: tuple[int, ...]
    checked_shape: tuple[int, ...]
    max_abs_difference: float  # over every stage's mask and class logits, on checked_shape


def export_checkpoint(checkpoint: str | Path, out: str | Path, seed: int = 0) -> ExportResult:
    """Export the model of ``checkpoint`` to ``out`` (written atomically) and compare the
    program with eager on a random batch of another size than the example's."""
    out = Path(out)
    _check_output(out)
    model, _, _ = load_model(checkpoint)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(*EXAMPLE_SHAPE, generator=gen)
    h = torch.export.Dim("h", min=2, max=MAX_SIDE // STRIDE)
    w = torch.export.Dim("w", min=2, max=MAX_SIDE // STRIDE)
    batch = torch.export.Dim("batch", min=1, max=256)
    with torch.no_grad():
        program = torch.export.export(
            model,
            (example,),
            dynamic_shapes={"images": {0: batch, 2: STRIDE * h, 3: STRIDE * w}},
        )
        checked = torch.randn(1, 3, 96, 128, generator=gen)
        difference = max_difference(model(checked), program.module()(checked))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.export.save(program, tmp)
    os.replace(tmp, out)
    return ExportResult(str(out), EXAMPLE_SHAPE, tuple(checked.shape), difference)


def max_difference(a: KNetOutput, b: KNetOutput) -> float:
    """The largest absolute difference between two outputs' logits, over every stage."""
    worst = 0.0
    for x, y in zip(a.stages, b.stages, strict=True):
        worst = max(worst, (x.mask_logits - y.mask_logits).abs().max().item())
        if x.cls_logits is not None and y.cls_logits is not None:
            worst = max(worst, (x.cls_logits - y.cls_logits).abs().max().item())
    return worst


def _check_output(out: Path) -> None:
    """Write only a new file or over an earlier export (a torch.export archive)."""
    if out.is_dir():
        raise OutputExistsError(f"--out {out} is a folder; give a file name such as model.pt2")
    if out.exists():
        try:
            with zipfile.ZipFile(out) as archive:
                ours = any(n.endswith("/archive_format") for n in archive.namelist())
        except zipfile.BadZipFile:
            ours = False
        if not ours:
            raise OutputExistsError(
                f"--out {out} exists and is not a torch.export archive; refusing to replace it"
            )


__all__ = ["ExportResult", "export_checkpoint", "max_difference"]
