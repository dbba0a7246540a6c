"""Training: ``knet train`` on Ray Train (V2) or in this process, and what ``knet tune`` shares.

The rooms, each a module (imports run downwards only):

- :mod:`~knet.training.stage`: the stage ``knet train`` runs (checks, train, publish);
- :mod:`~knet.training.cluster`: the Ray plumbing (connect, placement, the ``TorchTrainer``);
- :mod:`~knet.training.loop`: the loop of every worker, one loop for Ray and in-process runs;
- :mod:`~knet.training.context`: where that loop runs (this process, a Ray Train worker);
- :mod:`~knet.training.run_tracking`: what a training run logs to MLflow at its start and end;
- :mod:`~knet.training.faults`: fault injection for tests, an environment hook;
- :mod:`~knet.training.errors`: the errors raised before any work.

A batch goes ``train`` -> ``fit_on_ray`` (or the loop in this process) ->
``train_loop_per_worker`` -> :func:`knet.method.engine.train_one_epoch` -> ``train_step``.
"""

from knet.training.cluster import build_trainer, check_placement, check_reachable, connect
from knet.training.context import CHECKPOINT_FILE
from knet.training.errors import ServiceUnreachableError, TrainSetupError
from knet.training.loop import resume_schedule, train_loop_per_worker
from knet.training.stage import TrainResult, check_inputs, default_run_name, publish, train

__all__ = [
    "CHECKPOINT_FILE",
    "ServiceUnreachableError",
    "TrainResult",
    "TrainSetupError",
    "build_trainer",
    "check_inputs",
    "check_placement",
    "check_reachable",
    "connect",
    "default_run_name",
    "publish",
    "resume_schedule",
    "train",
    "train_loop_per_worker",
]
