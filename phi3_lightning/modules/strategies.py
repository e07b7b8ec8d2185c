"""Strategy and checkpoint-IO presets for Phi-3.

* :class:`AtomicCheckpointIO`: every ``.ckpt`` file is written to a temporary name in its directory, fsynced and
  renamed into place, so a crash never leaves a truncated checkpoint (the CLI installs it on every strategy
  that uses a CheckpointIO).
* :class:`FSDP2Strategy`: Lightning's ``ModelParallelStrategy`` set up for pure FSDP2 data parallelism
  (tensor_parallel_size=1, data_parallel_size = every process), with distributed checkpoints written to a
  temporary directory and renamed into place. The LightningModule shards itself in ``configure_model``.
* :class:`Phi3FSDPStrategy`: Lightning's FSDP1 ``FSDPStrategy`` (CUDA only) wrapping each decoder layer.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy as _LightningFSDPStrategy
from lightning.pytorch.strategies import ModelParallelStrategy

from ..atomic import (  # noqa: F401 - re-exported: older imports and tests/modules/test_io.py
    atomic_torch_save,
    clean_stale_staging,
    clean_stale_staging_files,
    default_permissions,
    fsync_tree,
    recover_interrupted,
    replace_dir,
    staging_path,
)
from .safe_load import load_checkpoint_file, safe_lightning_distributed_load


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a staging file ``.<name>.<pid>.<host>.<random>.tmp`` beside the target, fsync, then
    ``os.replace`` (atomic on POSIX); staging files of killed writers in the directory, whatever checkpoint they
    were writing, are removed by the next save (:func:`phi3_lightning.atomic.clean_stale_staging_files`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        clean_stale_staging_files(Path(path).parent)  # a killed writer's, under any checkpoint name
        atomic_torch_save(Path(path), checkpoint)

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Only ``torch.load(weights_only=True)``, whatever the caller asks (see :mod:`.safe_load`)."""
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint_file(path, map_location=map_location if map_location is not None else "cpu")


def use_safe_checkpoint_io(trainer: Any) -> None:
    """Give ``trainer``'s strategy :class:`AtomicCheckpointIO` (atomic saves, loads only with ``weights_only=True``)
    unless another checkpoint IO was configured on purpose. The CLI calls this when it builds the Trainer and every
    Phi-3 LightningModule in its ``setup`` hook, which Lightning runs before it reads a ``ckpt_path``: a plain
    ``pl.Trainer`` of the Python API resumes through the same loader as the command line."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and type(getattr(strategy, "_checkpoint_io", None)) in (type(None), TorchCheckpointIO):
        strategy.checkpoint_io = AtomicCheckpointIO()


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard`` per decoder layer + root, applied by the Phi-3 LightningModule) on any accelerator
    (CUDA with NCCL, CPU with gloo).

    Args:
        data_parallel_size: processes that shard the model; "auto" = all of them (world size / tensor_parallel_size).
        tensor_parallel_size: must stay 1 (the Phi-3 modules implement FSDP2, not tensor parallelism).
        save_distributed_checkpoint: each rank writes its shard into a checkpoint directory (true) or rank 0 gathers
            one full ``.ckpt`` file (false; simpler to export, needs the whole model in rank 0's host memory).
        process_group_backend: "nccl", "gloo" ...; null picks the device's default.
        timeout: collective-operation timeout.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size={tensor_parallel_size}: the Phi-3 modules implement FSDP2 data parallelism "
                "only; set tensor_parallel_size: 1"
            )
        super().__init__(
            data_parallel_size, tensor_parallel_size, save_distributed_checkpoint, process_group_backend, timeout
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes // self._tensor_parallel_size
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        # rank 0 names the staging directory (its pid in the name) and every rank writes its shard into it
        tmp = None
        if self.global_rank == 0:
            recover_interrupted(path)
            clean_stale_staging(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = staging_path(path)
            tmp.mkdir()
        tmp = Path(self.broadcast(str(tmp) if tmp is not None else None))
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            self.barrier()
            if self.global_rank == 0:
                fsync_tree(tmp)
                replace_dir(tmp, path)
        except BaseException:
            if self.global_rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loader with ``weights_only=True`` and a safe reader for distributed checkpoints."""
        path = Path(checkpoint_path)
        if path.is_file():
            load_checkpoint_file(path, mmap=True)  # refuse an unsafe or unreadable file before Lightning reads it
        with safe_lightning_distributed_load("lightning.fabric.strategies.model_parallel"):
            return super().load_checkpoint(checkpoint_path, weights_only=True)


class Phi3FSDPStrategy(_LightningFSDPStrategy):
    """Lightning's FSDP1 (CUDA only) with every ``Phi3DecoderLayer`` its own FSDP unit and original parameters
    kept (so weight decay still tells matrices from vectors). On CPU use :class:`FSDP2Strategy` instead.

    Args:
        sharding_strategy: FULL_SHARD, SHARD_GRAD_OP, NO_SHARD or HYBRID_SHARD.
        state_dict_type: "full" (one .ckpt gathered on rank 0) or "sharded" (a directory of shards).
        cpu_offload: keep parameters and gradients on the CPU between uses.
        kwargs: any other ``lightning.pytorch.strategies.FSDPStrategy`` argument.
    """

    def __init__(
        self,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",
        cpu_offload: bool = False,
        **kwargs: Any,
    ) -> None:
        from ..model.layer import Phi3DecoderLayer

        kwargs.setdefault("auto_wrap_policy", {Phi3DecoderLayer})
        kwargs.setdefault("use_orig_params", True)
        super().__init__(
            sharding_strategy=sharding_strategy, state_dict_type=state_dict_type, cpu_offload=cpu_offload, **kwargs
        )

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's FSDP1 reads a full checkpoint with its own (unrestricted) lazy unpickler: check the file with
        the safe unpickler first, which refuses any global it would not allow."""
        path = Path(checkpoint_path)
        if path.is_file():
            load_checkpoint_file(path, mmap=True)
        with safe_lightning_distributed_load("lightning.pytorch.strategies.fsdp"):
            return super().load_checkpoint(checkpoint_path, weights_only=True)
