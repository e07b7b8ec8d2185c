"""Overhead of the NonFiniteGuard on CPU: the causal_lm config, N training steps with and without the guard,
interleaved runs, CPU time of the training steps (process_time: robust on a shared machine) and wall time.

    python benchmarks/guard_overhead.py --steps 50 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from lightning.pytorch.callbacks import Callback


class _Clock(Callback):
    def __init__(self, skip: int = 5) -> None:
        self.skip, self.cpu, self.wall = skip, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._c, self._w = time.process_time(), time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.skip:
            self.cpu += time.process_time() - self._c
            self.wall += time.perf_counter() - self._w


def run(steps: int, guard: bool, max_length: int) -> tuple[float, float]:
    from phi3_lightning.cli import _cli_class
    from phi3_lightning.modules import base
    from phi3_lightning.modules.oom import OOMAdvice

    original = base.Phi3LightningModule.configure_callbacks
    if not guard:
        base.Phi3LightningModule.configure_callbacks = lambda self: [OOMAdvice()]
    try:
        cli = _cli_class()(
            args=[
                "--config",
                "configs/causal_lm.yaml",
                "--trainer.max_steps",
                str(steps),
                "--trainer.limit_val_batches",
                "0",
                "--trainer.logger",
                "false",
                "--trainer.enable_checkpointing",
                "false",
                "--trainer.callbacks",
                "[]",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.enable_model_summary",
                "false",
                "--data.init_args.max_length",
                str(max_length),
                "--data.init_args.progress",
                "false",
            ],
            run=False,
            save_config_callback=None,
        )
        clock = _Clock()
        cli.trainer.callbacks.append(clock)
        cli.trainer.fit(cli.model, cli.datamodule)
        names = [type(c).__name__ for c in cli.trainer.callbacks]
        assert ("NonFiniteGuard" in names) == guard, names
        n = steps - clock.skip
        return clock.cpu / n * 1e3, clock.wall / n * 1e3
    finally:
        base.Phi3LightningModule.configure_callbacks = original


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max_length", type=int, default=256)
    a = p.parse_args()
    torch.set_num_threads(1)
    res = {True: [], False: []}
    for _ in range(a.repeats):
        for guard in (False, True):
            res[guard].append(run(a.steps, guard, a.max_length))
    print(
        f"causal_lm config, max_length {a.max_length}, {a.steps} steps (first 5 not timed), 1 thread, "
        f"median of {a.repeats}"
    )
    print("| guard | CPU ms/step | wall ms/step |\n|---|---|---|")
    for guard in (False, True):
        cpu = statistics.median(r[0] for r in res[guard])
        wall = statistics.median(r[1] for r in res[guard])
        print(f"| {'on' if guard else 'off'} | {cpu:.2f} | {wall:.2f} |")


if __name__ == "__main__":
    main()
