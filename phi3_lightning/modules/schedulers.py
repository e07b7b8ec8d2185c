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

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

DECAYS = ("cosine", "linear", "constant")


class WarmupDecayLR(LambdaLR):
    """Linear warmup from ``warmup_start_ratio * lr`` to ``lr``, then ``decay`` down to ``min_lr_ratio * lr``.

    Stepped once per optimizer step (the module registers it with ``interval: step``).

    Args:
        optimizer: the wrapped optimizer (LightningCLI passes it).
        warmup_steps: optimizer steps of linear warmup.
        total_steps: optimizer steps of the whole run (warmup included); None = the trainer's estimate.
        decay: shape after warmup: ``cosine``, ``linear`` or ``constant``.
        min_lr_ratio: final learning rate as a fraction of the peak.
        warmup_start_ratio: learning rate at step 0 as a fraction of the peak.
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
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.decay = decay
        self.min_lr_ratio = min_lr_ratio
        self.warmup_start_ratio = warmup_start_ratio
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """Fill in the run length when it was not given (called by the LightningModule)."""
        if self.total_steps is None:
            self.total_steps = max(int(total_steps), 1)

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "lr_lambdas"})

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
