"""Attention backends side by side.

``python -m phi3_lightning compare-attention --config configs/compare_attention.yaml [--check]``

For one model (a preset with seeded random weights, or a checkpoint), the same weights and the same batches (padded
and packed, several sequence lengths, optionally several sliding windows), every available backend is run and
measured: forward and forward+backward time (timed alternately; the median with its interquartile range, repeated
until the spread is small or a time budget is spent, rows still too noisy to rank flagged "noisy"), tokens/s, peak
memory, and the error of logits and parameter gradients against an fp64 eager reference on the same weights. Results
go to TensorBoard (one run per backend, ``<run>/<backend>``, with one scalar series per measure, step = sequence
length; a custom-scalars layout with one chart per measure and batch kind whose lines are the backends; a summary
table as text; a chart as an image) and the same table is printed. Backends that cannot run here are listed with the
reason. ``--check`` makes the exit status 1 when a backend disagrees with the reference beyond its dtype's tolerance
(timing noise never changes it).
"""

from __future__ import annotations

import sys

from .config import TOLERANCES, CompareConfig, build_parser, config_from_namespace
from .report import MEASURES, Row
from .run import CompareResult, compare_attention

__all__ = [
    "CompareConfig",
    "CompareResult",
    "MEASURES",
    "Row",
    "TOLERANCES",
    "build_parser",
    "compare_attention",
    "main",
]


def main(argv: list[str] | None = None, prog: str = "python -m phi3_lightning compare-attention") -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the comparison, print the table; 1 if --check fails."""
    parser = build_parser(prog)
    ns = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        cfg = config_from_namespace(ns)
        cfg.torch_device()  # a device this machine cannot use: a usage error before anything is built
    except ValueError as e:
        parser.error(str(e))
    result = compare_attention(cfg)
    print(result.summary)
    print(f"TensorBoard: tensorboard --logdir {result.log_dir}")
    if not result.passed:
        if cfg.check:
            print(f"check failed: {len(result.failures)} result(s) out of tolerance or failing", file=sys.stderr)
            return 1
        print("(not checked: run with --check to make this an error)")
    return 0
