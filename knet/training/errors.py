"""The errors a training run raises before any work, shared by the stage and the Ray plumbing."""

from __future__ import annotations


class TrainSetupError(ValueError):
    """A run that cannot start (bad inputs, unreachable cluster); raised before any work."""


class ServiceUnreachableError(TrainSetupError):
    """A Ray head or tracking server that does not answer (yet): worth retrying."""


__all__ = ["ServiceUnreachableError", "TrainSetupError"]
