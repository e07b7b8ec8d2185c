"""Out of GPU memory during fit: append the memory planner's explanation to the error.

:class:`OOMAdvice` is installed by every Phi-3 LightningModule (``configure_callbacks``). When a
``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``) escapes ``fit``/``validate``/..., Lightning calls the
callbacks' ``on_exception`` and then re-raises the same exception object; this callback rewrites its message to
end with :func:`phi3_lightning.memory.explain_oom`'s estimate for the run's settings (model, LoRA or full,
precision, strategy and world size, micro-batch shape, activation checkpointing, optimizer) and the changes that
would fit the GPU, plus the ``python -m phi3_lightning.memory`` command that reproduces the estimate.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ..memory import PRECISIONS, as_checkpoint_every, explain_oom
from ..model import DEFAULT_BACKEND, PRESETS

MARKER = "phi3_lightning memory planner:"
_OOM_TYPES = tuple(
    t
    for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
    if t is not None
)


def is_oom(exception: BaseException) -> bool:
    return bool(_OOM_TYPES) and isinstance(exception, _OOM_TYPES)


def _optimizer_name(trainer: pl.Trainer) -> str:
    opts = getattr(trainer, "optimizers", None) or []
    if not opts:
        return "adamw"
    opt = opts[0]
    if isinstance(opt, torch.optim.SGD):
        return "sgd" if any(g.get("momentum", 0) for g in opt.param_groups) else "sgd-nomomentum"
    return "adamw"  # AdamW / Adam, and the default for anything else with two states


def _strategy(trainer: pl.Trainer) -> tuple[str, int]:
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    world = max(int(getattr(trainer, "world_size", 1) or 1), 1)
    if isinstance(trainer.strategy, (ModelParallelStrategy, FSDPStrategy)):
        return "fsdp2", world  # FSDP1 shards weights, gradients and optimizer state alike
    return ("ddp" if world > 1 else "single"), world


def oom_settings(
    trainer: pl.Trainer, module: Any, batch: dict[str, torch.Tensor] | None = None
) -> dict[str, Any] | None:
    """:func:`~phi3_lightning.memory.estimate_memory` keyword arguments describing this run (None if unknown)."""
    precision = str(trainer.precision)
    precision = {"bf16": "bf16-mixed", "16": "16-mixed", "32": "32-true"}.get(precision, precision)
    if precision not in PRECISIONS:
        return None
    dm = getattr(trainer, "datamodule", None)
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    if isinstance(ids, torch.Tensor) and ids.ndim == 2:
        batch_size, seq_len = int(ids.shape[0]), int(ids.shape[1])
        mask = batch.get("attention_mask")
        masked = batch.get("position_ids") is not None or (isinstance(mask, torch.Tensor) and not bool(mask.all()))
    else:  # before the first batch (e.g. while building the model): the data module's settings
        batch_size, seq_len = getattr(dm, "batch_size", None), getattr(dm, "max_length", None)
        masked = bool(getattr(dm, "pack", False))
    if not isinstance(batch_size, int) or not isinstance(seq_len, int) or batch_size < 1 or seq_len < 1:
        return None
    strategy, world = _strategy(trainer)
    lora = getattr(module, "lora", None)
    return dict(
        method="lora" if lora is not None else "full",
        precision=precision,
        strategy=strategy,
        world_size=world,
        seq_len=min(seq_len, module.config.max_position_embeddings),
        batch_size=batch_size,
        activation_checkpointing=as_checkpoint_every(getattr(module, "activation_checkpointing", False)),
        lora_rank=lora.r if lora is not None else 16,
        optimizer=_optimizer_name(trainer),
        head=module.task,
        attn_implementation=module.attn_implementation,
        masked=masked,
        accumulate_grad_batches=max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1),
    )


def planner_command(source: list[str], settings: dict[str, Any]) -> str:
    """The ``python -m phi3_lightning.memory`` line that prints the same estimate (``source``: ``["--preset",
    name]`` or ``["--config", checkpoint_dir]``)."""
    s = settings
    parts = ["python -m phi3_lightning.memory", *source]
    parts += [
        "--method",
        s["method"],
        "--precision",
        s["precision"],
        "--seq-len",
        str(s["seq_len"]),
        "--batch-size",
        str(s["batch_size"]),
    ]
    if s["strategy"] != "single":
        parts += ["--strategy", s["strategy"], "--devices", str(s["world_size"])]
    if s["activation_checkpointing"]:
        parts.append("--activation-checkpointing")
        if s["activation_checkpointing"] == "selective" or s["activation_checkpointing"] > 1:
            parts.append(str(s["activation_checkpointing"]))
    if s["method"] == "lora" and s["lora_rank"] != 16:
        parts += ["--lora-rank", str(s["lora_rank"])]
    if s["head"] != "causal_lm":
        parts += ["--head", s["head"]]
    if s["optimizer"] != "adamw":
        parts += ["--optimizer", s["optimizer"]]
    if s["attn_implementation"] != DEFAULT_BACKEND:
        parts += ["--attn-implementation", s["attn_implementation"]]
    if s["masked"]:
        parts.append("--masked")
    return " ".join(parts)


def annotate_oom(exception: BaseException, advice: str) -> None:
    """Append ``advice`` to the exception's message in place (it is re-raised as the same object)."""
    first = str(exception.args[0]) if exception.args else ""
    if MARKER in first:
        return
    exception.args = (f"{first}\n\n{MARKER} {advice}", *exception.args[1:])


class OOMAdvice(Callback):
    """On a CUDA out-of-memory error, say what the run needs and what would fit (see the module docstring)."""

    def __init__(self) -> None:
        self._batch: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, dict):
            ids = batch.get("input_ids")
            keep = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
            self._batch = keep if isinstance(ids, torch.Tensor) else None

    def advice(self, trainer: pl.Trainer, pl_module: Any) -> str | None:
        settings = oom_settings(trainer, pl_module, self._batch)
        if settings is None:
            return None
        device = trainer.strategy.root_device
        device_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        # Name the model as the user did (preset or checkpoint directory) when the config is that model's (label
        # facts aside, which only size the small score layer), so the estimate equals the printed command's.
        hparams = getattr(pl_module, "hparams", {})
        model, overrides = hparams.get("model"), hparams.get("config_overrides") or {}
        source = None
        if set(overrides) <= {"num_labels", "id2label", "label2id", "problem_type", "pad_token_id"}:
            if getattr(pl_module, "weights_dir", None) is not None:
                source = ["--config", str(pl_module.weights_dir)]
            elif isinstance(model, str) and model in PRESETS:
                source = ["--preset", model]
        msg = explain_oom(source[1] if source else pl_module.config, device_bytes, **settings)
        if source:
            msg += f". Plan other settings with: {planner_command(source, settings)}"
        return msg

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not is_oom(exception) or getattr(pl_module, "config", None) is None:
            return
        try:
            advice = self.advice(trainer, pl_module)
        except Exception:  # noqa: BLE001 - never hide the original error behind a planner failure
            return
        if advice:
            annotate_oom(exception, advice)
