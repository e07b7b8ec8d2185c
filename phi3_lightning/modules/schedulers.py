"""Learning-rate schedules: linear warmup, then cosine or linear decay to a floor.

Used from YAML through LightningCLI's scheduler injection::

    model:
      init_args:
        lr_scheduler:
          class_path: phi3_lightning.modules.WarmupDecayLR
          init_args: {warmup_steps: 50, decay: cosine, min_lr_ratio: 0.1}

``total_steps`` may be left out: the LightningModule fills it in from ``trainer.estimated_stepping_batches``
(max_steps, or epochs x batches / accumulation) before the first step.
"""

from __future__ import annotations

import math
import warnings

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

DECAYS = ("cosine", "linear", "constant")


class WarmupDecayLR(LambdaLR):
    """Linear warmup from ``warmup_start_ratio * lr`` to ``lr``, then ``decay`` down to ``min_lr_ratio * lr``.

    Stepped once per optimizer step (the module registers it with ``interval: step``).

    Args:
        optimizer: the wrapped optimizer (LightningCLI passes it).
        warmup_steps: optimizer steps of linear warmup.
        total_steps: optimizer steps of the whole run (warmup included); None = the trainer's estimate (a run
            continued with ``--ckpt_path`` keeps the total of the run it continues: steps past it, after a higher
            max_steps, run at ``min_lr_ratio``, and a warning says so).
        decay: shape after warmup: ``cosine``, ``linear`` or ``constant``.
        min_lr_ratio: final learning rate as a fraction of the peak.
        warmup_start_ratio: learning rate at step 0 as a fraction of the peak, in [0, 1].
        last_epoch: index of the last optimizer step taken (torch's scheduler argument); -1 starts a new schedule.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        decay: str = "cosine",
        min_lr_ratio: float = 0.1,
        warmup_start_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if decay not in DECAYS:
            raise ValueError(f"decay={decay!r}; use one of {', '.join(DECAYS)}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1]")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be a positive number of optimizer steps (or null)")
        if not 0.0 <= warmup_start_ratio <= 1.0:  # NaN too
            raise ValueError(
                f"warmup_start_ratio={warmup_start_ratio} must be in [0, 1] (the learning rate at step 0 as a fraction "
                "of the peak; a negative one would step against the gradient)"
            )
        if total_steps is not None and warmup_steps > total_steps:
            raise ValueError(
                f"warmup_steps={warmup_steps} exceeds total_steps={total_steps}: the peak learning rate would never be "
                "reached; lower warmup_steps"
            )
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.decay = decay
        self.min_lr_ratio = min_lr_ratio
        self.warmup_start_ratio = warmup_start_ratio
        self.total_from_trainer = False  # total_steps filled in by set_total_steps (saved with the state)
        self._run_total: int | None = None  # this run's trainer estimate (never saved)
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """Fill in the run length when it was not given (called by the LightningModule)."""
        self._run_total = max(int(total_steps), 1)
        if self.total_steps is None:
            self.total_steps = self._run_total
            self.total_from_trainer = True

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas", "_run_total")}

    def load_state_dict(self, state_dict: dict) -> None:
        """The schedule of the run being continued (total_steps included), so that a resumed run equals an
        uninterrupted one. A run continued past that schedule's end is told that its extra steps run at the floor."""
        self.__dict__.update({k: v for k, v in state_dict.items() if k not in ("lr_lambdas", "_run_total")})
        run_total, total = self.__dict__.get("_run_total"), self.total_steps
        if self.decay == "constant" or not self.__dict__.get("total_from_trainer") or not run_total or not total:
            return
        floor_from = max(total, self.warmup_steps)  # a warmup runs its course whatever the total
        if run_total > floor_from:
            warnings.warn(
                f"the learning-rate schedule of the run being continued ends at optimizer step {floor_from} (its "
                f"total_steps, set from that run's length); steps {floor_from} to {run_total} of this run use "
                f"min_lr_ratio={self.min_lr_ratio} x the peak. "
                "The schedule is part of the resumed state; start a new run (from the exported weights) for a new "
                "schedule",
                stacklevel=2,
            )

    def factor(self, step: int) -> float:
        """Multiplier of the peak learning rate at optimizer step ``step``."""
        if step < self.warmup_steps:
            return self.warmup_start_ratio + (1.0 - self.warmup_start_ratio) * step / self.warmup_steps
        if self.decay == "constant" or self.total_steps is None:
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape
