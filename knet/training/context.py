"""Where the training loop runs: this process, or a Ray Train worker.

The loop (:mod:`knet.training.loop`) is written once against :class:`LocalContext`'s methods;
:class:`RayContext` gives the same methods for a Ray Train worker (rank, DDP, Ray's
checkpoints and reports). Rank 0 writes each checkpoint to a private scratch folder first; in
this process the stage publishes the last one, on Ray the report hands it to Ray's storage.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from knet.config import Config
from knet.method.checkpoint import load_checkpoint, save_checkpoint

CHECKPOINT_FILE = "model.pt"


class LocalContext:
    """The in-process loop (``train.num_workers: 0``): one process, rank 0, no DDP."""

    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.last_checkpoint: str | None = None
        # Rank 0's scratch copy of each checkpoint; created by the first report, so the other
        # ranks (and a run that fails early) leave no folder behind.
        self.local_dir = Path(tempfile.gettempdir()) / f"knet-ckpt-{uuid.uuid4().hex[:12]}"

    def setup(self, cfg: Config) -> torch.device:
        """The device to train on (CUDA when asked for and present)."""
        use_cuda = cfg.train.use_gpu and torch.cuda.is_available()
        return torch.device("cuda" if use_cuda else "cpu")

    def node_id(self) -> str:
        return "local"

    def host(self) -> str:
        """The address of this worker's node (what ``ray status`` and the dashboard show)."""
        return socket.gethostname()

    def prepare_loader(self, loader):
        return loader

    def prepare_model(self, model):
        return model

    def set_epoch(self, loader, epoch: int) -> None:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def restore(self, model, optimizer, scheduler) -> dict[str, Any]:
        """Load the latest checkpoint of this run, if any; returns its bookkeeping. The
        in-process loop starts fresh (a rerun through Ray resumes)."""
        return {}

    def report(self, metrics: dict[str, Any], model, cfg: Config, cats, **state: Any) -> None:
        """Rank 0 writes the epoch's checkpoint to the scratch folder."""
        self._save(model, cfg, cats, state)

    def close(self) -> None:
        """The run is over: the stage publishes the last checkpoint, then removes the folder."""

    def _save(self, model, cfg: Config, cats, state: dict[str, Any]) -> Path:
        folder = self.local_dir / f"epoch-{state['epoch']}"
        if self.rank == 0:
            self.local_dir.mkdir(mode=0o700, exist_ok=True)  # private, as mkdtemp made it
            folder.mkdir(exist_ok=True)
            save_checkpoint(folder / CHECKPOINT_FILE, model, cfg, cats, **state)
            self.last_checkpoint = str(folder / CHECKPOINT_FILE)
        return folder


class RayContext(LocalContext):
    """A Ray Train worker: its rank in the group, DDP, and Ray's checkpoints and reports."""

    def __init__(self) -> None:
        import ray.train

        super().__init__()
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def setup(self, cfg: Config) -> torch.device:
        import ray.train.torch

        device = ray.train.torch.get_device()
        if device.type == "cpu":
            # Ray sets OMP_NUM_THREADS from the worker's CPUs; say it to torch explicitly too,
            # so a 2-CPU worker computes on 2 threads whatever the process inherited.
            torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
        return device

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def host(self) -> str:
        import ray.util

        return ray.util.get_node_ip_address()

    def prepare_loader(self, loader):
        import ray.train.torch

        return ray.train.torch.prepare_data_loader(loader, move_to_device=False)

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def restore(self, model, optimizer, scheduler) -> dict[str, Any]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return {}
        with checkpoint.as_directory() as folder:
            payload = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if self.rank == 0:
            print(f"resuming after epoch {payload['epoch']}", flush=True)
        return {
            k: payload.get(k)
            for k in ("epoch", "history", "bad_steps", "mlflow_run_id")
            if payload.get(k) is not None
        }

    def report(self, metrics: dict[str, Any], model, cfg: Config, cats, **state: Any) -> None:
        """Rank 0 writes the checkpoint; every rank reports (it is a barrier in Ray)."""
        import ray.train

        folder = self._save(model, cfg, cats, state)
        checkpoint = ray.train.Checkpoint.from_directory(folder) if self.rank == 0 else None
        clean = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        ray.train.report(clean, checkpoint=checkpoint)
        if self.rank == 0:
            # Ray copied it to storage; keep only the newest local copy.
            for old in self.local_dir.glob("epoch-*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        """Ray holds the checkpoints in storage: drop the local copies."""
        shutil.rmtree(self.local_dir, ignore_errors=True)


__all__ = ["CHECKPOINT_FILE", "LocalContext", "RayContext"]
