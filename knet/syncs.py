"""Host synchronisation in the training step: where it is allowed, and how it is counted.

A CUDA step runs ahead of the Python that launches it until something needs a value on the
host: ``.item()`` / ``bool(t)``, a device-to-host copy, or an op whose output size depends on
the data (``nonzero``, boolean indexing, ``unique``). Each such point stalls the launch queue
until the GPU drains. The K-Net training step has exactly one by design: the Hungarian
matcher's cost matrices, every round's at once, cross to the CPU for ``scipy`` in one
:func:`to_host` call per batch.

:class:`HostSyncCounter` counts the ops that would synchronise on CUDA, on any device, so a
CPU test can hold the step to that budget; on a GPU, :func:`strict_syncs` makes PyTorch itself
raise on any other synchronisation (``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose result the host must wait for: a scalar read, or an output size that depends on
# the values. (Boolean-mask indexing is ``index`` / ``index_put`` with a bool index.)
_VALUE_READS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.allclose.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.bincount.default,
    aten.repeat_interleave.Tensor,
}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}

_ALLOWED = {"depth": 0}


def to_host(tensor: Tensor) -> Tensor:
    """The training step's one allowed device-to-host copy (the matcher's cost matrices)."""
    with allowed_sync():
        return tensor.cpu()


def to_device(arrays: list[np.ndarray], device: torch.device) -> tuple[Tensor, ...]:
    """Host-planned integer arrays to ``device`` without a sync, as int64 tensors in order.

    They travel concatenated in one pinned, asynchronous copy and come back as views.
    """
    flat = torch.from_numpy(np.concatenate([a.astype(np.int64) for a in arrays]))
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    return flat.to(device).split([len(a) for a in arrays])


@contextlib.contextmanager
def allowed_sync() -> Iterator[None]:
    """A block whose synchronisation is intended: not counted, and allowed under
    :func:`strict_syncs`."""
    mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0
    _ALLOWED["depth"] += 1
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        _ALLOWED["depth"] -= 1
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


@contextlib.contextmanager
def strict_syncs() -> Iterator[None]:
    """On CUDA, raise on any synchronisation outside :func:`allowed_sync` (PyTorch's own
    detector, which sees the CUDA calls themselves)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class HostSyncCounter(TorchDispatchMode):
    """Counts, by op name, the ops of a block that would stall the host on CUDA.

    ``with HostSyncCounter() as syncs: step()`` then ``syncs.total`` / ``syncs.ops``. It sees
    scalar reads, data-dependent output sizes and copies from a CUDA tensor to the CPU; it runs
    on any device (the ops are the same on a CPU), so CPU tests can check a step's budget.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _ALLOWED["depth"] and self._syncs(func, args, kwargs):
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _syncs(func, args, kwargs) -> bool:
        if func in _VALUE_READS:
            return True
        if func in _INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            return any(
                isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
            )
        if func in (aten._to_copy.default, aten.copy_.default):
            source = args[1] if func is aten.copy_.default else args[0]
            target = args[0] if func is aten.copy_.default else None
            to_cpu = (
                target.device.type == "cpu"
                if target is not None
                else torch.device(kwargs.get("device") or source.device).type == "cpu"
            )
            return source.device.type == "cuda" and to_cpu and not kwargs.get("non_blocking")
        return False
