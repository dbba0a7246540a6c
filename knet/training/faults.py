"""Fault injection for tests: an environment hook that is off in every normal run.

A test sets :data:`ENV_VAR` (``KNET_FAULTS``) to a JSON object before it starts a run; the
driver (``knet train``, ``knet tune``, a flow) reads it once and hands it to its workers inside
the loop config, so it reaches Ray Train workers on any node. Without the variable nothing is
injected and the loop's calls below are no-ops. The faults:

- ``{"kill": {"rank": 1, "epoch": 1, "step": 2, "marker": "/tmp/x"}}``: the worker of that rank
  exits (``os._exit``, a crash, not an exception) at that step, once (the marker file records
  it), so Ray Train must restart the worker group from the last checkpoint;
- ``{"nan_from_epoch": 1}``: every loss term is NaN from that epoch on;
- ``{"fail": {"epoch": 0, "while": "/path"}}``: the epoch raises while the path exists.

``knet tune`` takes ``{"trials": [{"match": {"num_stages": 1}, "faults": {...}}, ...]}``: the
faults of the first entry whose ``match`` (grid keys, ``num_stages``, ``num_kernels``, ``seed``)
fits a trial.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_VAR = "KNET_FAULTS"


def from_environment() -> dict[str, Any]:
    """The faults a test asked for in :data:`ENV_VAR` ({} when unset)."""
    text = os.environ.get(ENV_VAR, "").strip()
    if not text:
        return {}
    faults = json.loads(text)
    if not isinstance(faults, dict):
        raise ValueError(f"{ENV_VAR} must hold a JSON object, got {text[:80]!r}")
    return faults


def for_trial(trials: list[Mapping[str, Any]], point: Mapping[str, Any]) -> dict[str, Any]:
    """The faults of the first ``trials`` entry whose ``match`` fits the grid ``point``."""
    for entry in trials:
        if all(point.get(k) == v for k, v in entry["match"].items()):
            return dict(entry["faults"])
    return {}


@dataclass(frozen=True)
class Faults:
    """The faults of one run, from its loop config (all off by default)."""

    kill: Mapping[str, Any] | None = None
    nan_from_epoch: int | None = None
    fail: Mapping[str, Any] | None = None

    @classmethod
    def from_config(cls, faults: Mapping[str, Any] | None) -> Faults:
        return cls(**(faults or {}))

    def before_epoch(self, epoch: int) -> None:
        """Raise at the start of ``epoch`` while the ``fail`` path exists."""
        fail = self.fail
        if fail and fail["epoch"] == epoch and Path(fail["while"]).exists():
            raise RuntimeError(f"test hook: failing at epoch {epoch} while {fail['while']} exists")

    def on_step(self, rank: int, epoch: int) -> Callable[[int], None] | None:
        """The per-step callback that kills this worker once, or None."""
        kill = self.kill
        if not kill or kill["rank"] != rank or kill["epoch"] != epoch:
            return None
        marker = Path(kill["marker"])

        def crash(step: int) -> None:
            if step == kill["step"] and not marker.exists():
                marker.write_text(f"killed rank {rank} at epoch {epoch} step {step}\n")
                os._exit(1)  # a crash, not an exception: the worker group must restart

        return crash

    def criterion(self, criterion: Callable, epoch: int) -> Callable:
        """``criterion``, or from ``nan_from_epoch`` on one whose every loss term is NaN."""
        if self.nan_from_epoch is None or epoch < self.nan_from_epoch:
            return criterion
        return lambda outputs, targets: {
            k: v * float("nan") for k, v in criterion(outputs, targets).items()
        }


__all__ = ["ENV_VAR", "Faults", "for_trial", "from_environment"]
