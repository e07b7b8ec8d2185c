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
    "parse_config",
]


def _bool_flags(argv: list[str], parser) -> list[str]:
    """``--check false`` / ``--memory=true`` (how the other commands take booleans) as ``--no_check`` / ``--memory``:
    the parser itself knows only ``--x`` and ``--no_x``."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(CompareConfig)
    flags = {f"--{f.name}" for f in dataclasses.fields(CompareConfig) if hints[f.name] is bool}
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in flags:
            if not eq and i + 1 < len(argv) and argv[i + 1].lower() in ("true", "false"):
                value, eq, i = argv[i + 1], "=", i + 1
            if eq:
                if value.lower() not in ("true", "false"):
                    parser.error(f"{name}={value!r}: use {name} or --no_{name[2:]} (or {name} true / false)")
                arg = name if value.lower() == "true" else f"--no_{name[2:]}"
        out.append(arg)
        i += 1
    return out


def parse_config(argv: list[str], prog: str = "python -m phi3_lightning compare-attention") -> CompareConfig:
    """The :class:`CompareConfig` of a command line; bad values exit through the parser's error (status 2)."""
    parser = build_parser(prog)
    ns = parser.parse_args(_bool_flags(list(argv), parser))
    try:
        cfg = config_from_namespace(ns)
        cfg.torch_device()  # a device this machine cannot use: a usage error before anything is built
    except ValueError as e:
        parser.error(str(e))
    return cfg


def main(argv: list[str] | None = None, prog: str = "python -m phi3_lightning compare-attention") -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the comparison, print the table; 1 if --check fails."""
    cfg = parse_config(sys.argv[1:] if argv is None else list(argv), prog)
    result = compare_attention(cfg)
    print(result.summary)
    print(f"TensorBoard: tensorboard --logdir {result.log_dir}")
    if not result.passed:
        if cfg.check:
            print(f"check failed: {len(result.failures)} result(s) out of tolerance or failing", file=sys.stderr)
            return 1
        print("(not checked: run with --check to make this an error)")
    return 0
