"""What a run prints: a progress bar that counts steps when training by steps, and a model summary with the analytic
FLOPs per token instead of Lightning's measured column (which is 0 unless a module sets ``example_input_array``).

The CLI puts these in place of Lightning's default progress bar and model summary (not of ones a config names); in
Python pass them to ``Trainer(callbacks=[...])``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.model_summary import summarize
from lightning.pytorch.utilities.rank_zero import rank_zero_info


def _steps_run(trainer: pl.Trainer) -> bool:
    """Training is bounded by ``max_steps`` (``max_epochs`` left at -1 / None)."""
    return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


def _description(trainer: pl.Trainer) -> str:
    if _steps_run(trainer):  # Lightning's "Epoch 0/-2" (max_epochs - 1) means nothing here
        return f"Step {trainer.global_step}/{trainer.max_steps}"
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        return f"Epoch {trainer.current_epoch}/{trainer.max_epochs - 1}"
    return f"Epoch {trainer.current_epoch}"


def _without_v_num(items: dict[str, Any]) -> dict[str, Any]:
    """The logger's version ("v_num") is in the run's directory name, printed at the start and the end of the run."""
    items.pop("v_num", None)
    return items


class Phi3RichProgressBar(RichProgressBar):
    """Rich progress bar: ``Step 120/600`` when training by steps (``Epoch e/E-1`` otherwise), no ``v_num``."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = _description(self.trainer)
        width = len(self.validation_description)
        return f"{text:{width}}" if width > len(text) else text

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None and _steps_run(trainer):
            self.progress.update(self.train_progress_bar_id, description=self._get_train_description(0))

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        return _without_v_num(super().get_metrics(trainer, pl_module))


class Phi3TQDMProgressBar(TQDMProgressBar):
    """TQDM progress bar (when rich is not installed): the same description and no ``v_num``."""

    def on_train_epoch_start(self, trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(_description(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if _steps_run(trainer) and self.train_progress_bar is not None:
            self.train_progress_bar.set_description(_description(trainer), refresh=False)

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        return _without_v_num(super().get_metrics(trainer, pl_module))


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g}"


class Phi3ModelSummary(ModelSummary):
    """The module's top-level children with parameter counts, then the totals and, for Phi-3 modules, the training
    FLOPs per token from the config's analytic count (6N + attention at the data's row length), the figure MFU is
    computed from. Lightning's FLOPs column is left out: it is measured only with an ``example_input_array``, so it
    says 0 here."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._max_depth or not trainer.is_global_zero:
            return
        s = summarize(pl_module, max_depth=self._max_depth)
        cols = [
            ("Name", s.layer_names),
            ("Type", s.layer_types),
            ("Params", [_human(n) for n in s.param_nums]),
            ("Mode", ["train" if m else "eval" for m in s.training_modes]),
        ]
        widths = [max([len(name), *(len(str(v)) for v in values)]) for name, values in cols]
        lines = [" | ".join(f"{name:<{w}}" for (name, _), w in zip(cols, widths))]
        lines.append("-" * len(lines[0]))
        for row in zip(*(values for _, values in cols)):
            lines.append(" | ".join(f"{v!s:<{w}}" for v, w in zip(row, widths)))
        lines.append("-" * len(lines[0]))
        trainable, total = s.trainable_parameters, s.total_parameters
        lines.append(f"{_human(trainable):<10} trainable params")
        lines.append(f"{_human(total - trainable):<10} non-trainable params")
        lines.append(f"{_human(total):<10} total params ({s.model_size:,.1f} MB)")
        flops = getattr(pl_module, "flops_per_token", None)
        seq_len = getattr(trainer.datamodule, "max_length", None) if trainer.datamodule is not None else None
        if callable(flops) and isinstance(seq_len, int) and seq_len > 0:
            try:
                per_token = float(flops(seq_len))
            except Exception:  # a module without a config yet: no figure rather than a wrong one
                per_token = None
            if per_token:
                lines.append(
                    f"{_human(per_token) + 'FLOP':<10} training FLOPs per token (6N + attention at "
                    f"{seq_len} tokens per row, analytic; MFU in TensorBoard's perf/ uses it)"
                )
        rank_zero_info("\n".join(lines))
