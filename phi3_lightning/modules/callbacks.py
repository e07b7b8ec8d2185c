"""Callbacks: throughput / MFU / peak memory to the loggers, the jsonl prediction writer, and a learning-rate monitor
that logs once per optimizer step.

The first two are always on in the CLI (``--throughput.*``, ``--predictions.*``); in Python add them to
``Trainer(callbacks=...)``. The shipped configs list :class:`LearningRateMonitor` under ``trainer.callbacks``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.callbacks import LearningRateMonitor as _LightningLearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger

from ..atomic import StagedFile

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s from the vendors' datasheets, by a substring of
# torch.cuda.get_device_name(); the first match wins (so the specific names come first). Lightning's own table has
# no entry that "NVIDIA H200" matches and lists H200 at its sparse figure (2.0e15), which would halve MFU.
DENSE_HALF_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def dense_half_peak_tflops(device_name: str) -> float | None:
    """The dense bf16/fp16 peak (TFLOP/s) of a GPU named ``device_name`` (as torch.cuda.get_device_name says it), or
    None when it is not in :data:`DENSE_HALF_PEAK_TFLOPS`."""
    for key, tflops in DENSE_HALF_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


_PRECISION_DTYPES = {
    "32-true": torch.float32,
    "32": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
    "64-true": torch.float64,
}


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max_memory_allocated; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LearningRateMonitor(_LightningLearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` (same arguments), with one point per optimizer step.

    Lightning's logs at the start of every training batch whose step is due; under gradient accumulation the
    ``accumulate_grad_batches`` micro-batches of an optimizer step share that step, so it wrote the same value at the
    same step once per micro-batch. This one logs at the step's first micro-batch only (the learning rate cannot
    change before the optimizer step, which comes after the last one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._logged_step: int | None = None

    def on_train_start(self, trainer, *args: Any, **kwargs: Any) -> None:
        super().on_train_start(trainer, *args, **kwargs)
        self._logged_step = None

    def on_train_batch_start(self, trainer, *args: Any, **kwargs: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the x Lightning logs the point at
        if step == self._logged_step:
            return
        self._logged_step = step
        super().on_train_batch_start(trainer, *args, **kwargs)


class Phi3ThroughputMonitor(Callback):
    """Logs ``perf/*`` during fit: real-token tokens/s, MFU, TFLOP/s per device, seconds per batch, peak memory.

    Every logger gets them (tokens/s counts real, non-padding tokens only); and, at fit start, a text card
    (TensorBoard) with the attention backend, precision, strategy and model size so runs overlay and stay
    identifiable.

    FLOPs per token come from the model's analytic count (``config.flops_per_token(seq_len)``: 6N plus the attention
    term). A measurement spans whole optimizer steps (under gradient accumulation all their micro-batches) and is
    logged once, at the step index of Lightning's own ``train/*`` and learning-rate points; validation, and what
    follows it until training resumes (the ModelCheckpoint save), is excluded, and the first optimizer step
    (warm-up / compilation) is not counted.

    Args:
        peak_tflops: peak TFLOP/s of one device that MFU is measured against; null: in bf16/fp16 the GPU's dense
            datasheet peak (``DENSE_HALF_PEAK_TFLOPS``: H100/H200 989), else the GPU's from Lightning's table for the
            run's precision, or on CPU ``cpu_tflops_per_core`` x torch threads.
        cpu_tflops_per_core: CPU peak per core in TFLOP/s used when peak_tflops is null; 0.1 is one AVX2 core
            with two FMA units at 3 GHz in fp32 (2 x 8 lanes x 2 flops x 3e9). Set your machine's.
        log_every_n_steps: optimizer steps between two measurements; null: the trainer's log_every_n_steps.
    """

    def __init__(
        self, peak_tflops: float | None = None, cpu_tflops_per_core: float = 0.1, log_every_n_steps: int | None = None
    ) -> None:
        super().__init__()
        self.peak_tflops = peak_tflops
        self.cpu_tflops_per_core = cpu_tflops_per_core
        self.log_every_n_steps = log_every_n_steps
        self._reset_window(None)
        self._t0: float | None = None
        self._paused_at: float | None = None
        self._window_step = 0  # trainer.global_step when the current window started
        self._step_before_batch: int | None = None
        self._peak_flops: float | None = None
        self.last: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    def _reset_window(self, device: torch.device | None) -> None:
        self._tokens = torch.zeros((), dtype=torch.long, device=device) if device is not None else None
        self._seq_sum = 0
        self._batches = 0

    def peak_flops_per_device(self, trainer: pl.Trainer) -> float | None:
        if self.peak_tflops is not None:
            return self.peak_tflops * 1e12
        device = trainer.strategy.root_device
        if device.type == "cpu":
            return self.cpu_tflops_per_core * 1e12 * torch.get_num_threads()
        if device.type == "cuda":
            dtype = _PRECISION_DTYPES.get(str(trainer.precision), torch.float32)
            if dtype in (torch.bfloat16, torch.float16):
                peak = dense_half_peak_tflops(torch.cuda.get_device_name(device))
                if peak is not None:
                    return peak * 1e12
            from lightning.fabric.utilities.throughput import get_available_flops

            return get_available_flops(device, dtype)
        return None

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        self.last = metrics
        if trainer.is_global_zero:
            # the x of Lightning's train/*_step and LearningRateMonitor points of this optimizer step (global_step
            # already counts it here, so it would put these points one step to the right of the others)
            loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
            step = getattr(loop, "_batches_that_stepped", trainer.global_step - 1)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._peak_flops = self.peak_flops_per_device(trainer)
        self._reset_window(trainer.strategy.root_device)
        self._t0 = None
        if not trainer.is_global_zero:
            return
        head = getattr(pl_module, "head", None)
        config = getattr(pl_module, "config", None)
        rows = {
            "attn_implementation": getattr(pl_module, "attn_implementation", "?"),
            "precision": str(trainer.precision),
            "strategy": type(trainer.strategy).__name__,
            "devices": str(trainer.world_size),
            "accelerator": trainer.strategy.root_device.type,
            "parameters": f"{config.num_parameters():,}" if config is not None else "?",
            "activation_checkpointing": str(getattr(pl_module, "activation_checkpointing", False)),
            "torch_compile": str(getattr(pl_module, "torch_compile", None)),
            "fused_kernels": str(getattr(pl_module, "fused_kernels", None)),
            "peak_tflops_per_device": f"{self._peak_flops / 1e12:.3g}" if self._peak_flops else "unknown",
            "head": type(head).__name__ if head is not None else "?",
        }
        text = "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows.items())
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("run", text, global_step=trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self._step_before_batch = trainer.global_step
        if self._paused_at is not None:  # training resumes after validation (and the checkpoint saved after it)
            if self._t0 is not None:
                self._t0 += time.perf_counter() - self._paused_at
            self._paused_at = None
        if not isinstance(batch, dict) or "input_ids" not in batch:
            return
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real = mask.sum() if mask is not None else torch.tensor(ids.numel(), device=ids.device)
        if self._tokens is None or self._tokens.device != real.device:
            self._tokens = torch.zeros((), dtype=torch.long, device=real.device)
        self._tokens += real.long()
        self._seq_sum += ids.shape[1]
        self._batches += 1

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        device = trainer.strategy.root_device
        if trainer.global_step == self._step_before_batch:
            return  # a micro-batch inside an accumulation window: measure whole optimizer steps only
        if self._t0 is None:  # the first step is warm-up (allocation, compilation): start the clock after it
            _sync(device)
            self._t0 = time.perf_counter()
            self._window_step = trainer.global_step
            self._reset_window(device)
            return
        every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        if trainer.global_step - self._window_step < every:
            return
        _sync(device)
        now = time.perf_counter()
        elapsed = max(now - self._t0, 1e-9)
        tokens = trainer.strategy.reduce(self._tokens.float(), reduce_op="sum")
        tokens = float(tokens)
        world = max(trainer.world_size, 1)
        seq_len = self._seq_sum / max(self._batches, 1)
        per_token = pl_module.flops_per_token(int(round(seq_len))) if hasattr(pl_module, "flops_per_token") else None
        tps = tokens / elapsed
        metrics = {
            "perf/tokens_per_sec": tps,
            "perf/tokens_per_sec_per_device": tps / world,
            "perf/seconds_per_batch": elapsed / self._batches,
            "perf/peak_memory_mb": peak_memory_mb(device),
        }
        if per_token is not None:
            achieved = tps * per_token / world
            metrics["perf/tflops_per_device"] = achieved / 1e12
            if self._peak_flops:
                metrics["perf/mfu"] = achieved / self._peak_flops
        self._log(trainer, metrics)
        pl_module.log("tok/s", tps, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        self._t0 = time.perf_counter()
        self._window_step = trainer.global_step
        self._reset_window(device)

    def on_validation_start(self, trainer, pl_module) -> None:
        # the clock stops until the next training batch starts (on_train_batch_start), so that the checkpoints that
        # ModelCheckpoint writes after validation (its on_validation_end runs after this callback's) are left out too
        if trainer.state.fn == "fit" and self._paused_at is None:
            self._paused_at = time.perf_counter()


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict`` results as JSON lines (one example per line, label names included), atomically.

    Args:
        path: the jsonl file; null: ``predictions.jsonl`` in the run's log directory. With several processes each
            writes ``<stem>.rank<N>.jsonl``.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self._file = None
        self._staged: StagedFile | None = None
        self._target: Path | None = None
        self.count = 0

    def _resolve(self, trainer: pl.Trainer) -> Path:
        if self.path:
            path = Path(self.path).expanduser()
        else:
            base = trainer.log_dir or trainer.default_root_dir
            path = Path(base) / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix or '.jsonl'}")
        if path.is_dir():  # else found only at the final rename, after every batch was predicted
            raise ValueError(
                f"predictions path {path} is a directory; give a file (--predictions.path {path / 'predictions.jsonl'})"
            )
        return path

    def on_predict_start(self, trainer, pl_module) -> None:
        self._target = self._resolve(trainer)
        self._staged = StagedFile(self._target)
        self._file = open(self._staged.path, "w", encoding="utf-8")
        self.count = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if self._file is None:
            return
        for row in pl_module.prediction_rows(prediction, trainer.datamodule):
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.count += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._file is None:
            return
        self._file.close()
        self._staged.commit()
        self._file = None
        print(f"wrote {self.count} predictions to {self._target}", file=sys.stderr)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._file is not None:
            self._file.close()
            self._staged.discard()
            self._file = None
