"""What ``compare-attention`` runs: one dataclass, every field with the help text the CLI prints.

The same fields come from a YAML file (``--config configs/compare_attention.yaml``), from flags
(``--seq_lens '[128, 256]'``) or from Python (``CompareConfig(seq_lens=[128])``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model.backends import BACKENDS, check_backend

BATCH_KINDS = ("padded", "packed")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# Largest relative error against the fp64 eager reference that still counts as "agrees", per compute dtype.
# logits: max |x - ref| over real tokens / max |ref|; grads: ||g - g_ref||_2 / ||g_ref||_2 over all parameters.
# Seen: float32 ~1e-6 on CPU and CUDA; bfloat16 5e-3..9e-3 on an H200 (tiny and small-bench, T <= 1024). A wrong
# mask (one document seeing another, a padded key seen) moves the logits by O(10%) and more, far above these.
# The reference is eager attention in float64 but, like transformers' eager, its softmax runs in float32 (and RoPE's
# cos/sin, shared by every backend, too): a float64 backend differs from it by ~1e-7 (sdpa, tiny, T=32: logits
# 1.3e-7, grads 8.9e-8), which is the reference's own rounding, so float64 gets float32-sized tolerances.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"logits": 1e-6, "grads": 1e-5},
    torch.float32: {"logits": 1e-4, "grads": 1e-3},
    torch.float16: {"logits": 1e-2, "grads": 2e-2},
    torch.bfloat16: {"logits": 5e-2, "grads": 1e-1},
}


@dataclass
class CompareConfig:
    """Settings of one attention-backend comparison (same model, weights and batches for every backend).

    The docstring under each field is its ``--help`` text (read by :func:`phi3_lightning.options.field_help`).
    """

    preset: str = "tiny"
    """Named architecture from phi3_lightning.model.PRESETS, randomly initialised from `seed` (ignored when `checkpoint`
    is set)."""
    checkpoint: str | None = None
    """Hugging Face-style checkpoint directory (config.json + safetensors) to load instead of a preset."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Phi3Config fields to replace, e.g. {num_hidden_layers: 2}."""
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    """Attention backends to compare; unavailable ones are listed with the reason."""
    seq_lens: list[int] = field(default_factory=lambda: [128, 256, 512])
    """Row lengths (tokens) to run; each is one step of every TensorBoard series."""
    batch_size: int = 2
    """Rows per batch."""
    batch_kinds: list[str] = field(default_factory=lambda: list(BATCH_KINDS))
    """Batch layouts: 'padded' (right-padded rows of decreasing length) and/or 'packed' (rows of several documents,
    position_ids restarting at each)."""
    sliding_windows: list[int | None] | None = None
    """Sliding windows to run, each on the same weights (null = full causal attention); default: the model's own
    sliding_window only."""
    dtype: str | None = None
    """Compute dtype of the compared backends: float32, bfloat16, float16 or float64 (default: float32 on CPU, bfloat16
    on CUDA). The reference is always float64 eager."""
    device: str | None = None
    """Device to run on, e.g. cpu, cuda, cuda:1 (default: cuda when available)."""
    num_threads: int | None = None
    """CPU threads torch uses (torch.set_num_threads) during the run; default: torch's own setting."""
    warmup: int = 2
    """Untimed calls before timing each backend and shape."""
    repeats: int = 5
    """Fewest timed calls of each of forward and forward+backward (timed alternately, one of each per round); the median
    is reported with its interquartile range (IQR)."""
    max_spread: float = 0.1
    """Keep timing (more rounds than `repeats`) until IQR / median of both forward and forward+backward is at most this,
    or `time_budget_s` is spent; a row whose spread stays above it is flagged 'noisy' (too noisy to rank backends)."""
    time_budget_s: float = 5.0
    """Seconds of timing allowed per backend and batch while the spread is above `max_spread` (0: exactly `repeats`
    rounds)."""
    memory: bool = True
    """Measure peak memory of a forward and of a forward+backward (CUDA: max_memory_allocated; CPU: CPU-allocator bytes
    recorded by torch.profiler)."""
    flex_compile: bool | None = None
    """Run torch.compile(flex_attention) (default null: on CUDA only; on CPU each new shape costs ~10 s of
    compilation)."""
    log_dir: str = "logs/compare_attention"
    """TensorBoard root; each run writes to <log_dir>/<run_name>."""
    run_name: str | None = None
    """Sub-directory of this run (default: <model>-<device>-<dtype>-<timestamp>)."""
    seed: int = 0
    """Seed of the random weights (presets) and of the batches."""
    check: bool = False
    """Exit with status 1 when a backend disagrees with the fp64 reference beyond its dtype's tolerance (or fails
    unexpectedly)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in self.backends:
            check_backend(name, runnable=False)  # unknown: an error; unavailable here: listed with its reason
        if not self.backends:
            raise ValueError("backends is empty; name at least one of " + ", ".join(BACKENDS))
        bad_kinds = [k for k in self.batch_kinds if k not in BATCH_KINDS]
        if bad_kinds or not self.batch_kinds:
            raise ValueError(f"batch_kinds={self.batch_kinds!r}; use a non-empty subset of {list(BATCH_KINDS)}")
        if not self.seq_lens or any(not isinstance(t, int) or t < 4 for t in self.seq_lens):
            raise ValueError(f"seq_lens={self.seq_lens!r} must be a non-empty list of integers >= 4")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads={self.num_threads} must be >= 1 or null")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"warmup={self.warmup} must be >= 0 and repeats={self.repeats} >= 1")
        if not self.max_spread > 0:
            raise ValueError(f"max_spread={self.max_spread} must be > 0 (e.g. 0.1: IQR within 10% of the median)")
        if not self.time_budget_s >= 0:
            raise ValueError(f"time_budget_s={self.time_budget_s} must be >= 0 seconds")
        for name in ("backends", "seq_lens", "batch_kinds", "sliding_windows"):
            values = getattr(self, name) or []
            repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
            if repeated:
                raise ValueError(
                    f"{name}={values!r} repeats {', '.join(map(str, repeated))}; name each value once (a repeat "
                    "would run again and log a second point at the same TensorBoard step)"
                )
        for w in self.sliding_windows or []:
            if w is not None and (not isinstance(w, int) or w < 1):
                raise ValueError(f"sliding_windows holds {w!r}; use positive integers or null")

    # ------------------------------------------------------------------ resolved values
    def torch_device(self) -> torch.device:
        """The device to run on, checked against this machine (a ValueError naming ``--device`` otherwise)."""
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        from ..options import usable_device

        return usable_device(self.device, "cpu, cuda or cuda:N (or null)", default="null")

    def torch_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return DTYPES[self.dtype]
        return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32


def build_parser(prog: str = "python -m phi3_lightning compare-attention"):
    """A jsonargparse parser with ``--config`` and one flag per :class:`CompareConfig` field."""
    from jsonargparse import ActionConfigFile, ActionYesNo

    from ..options import field_help, strict_jsonargparse_parser  # strict: no option prefixes, "did you mean"

    parser = strict_jsonargparse_parser(
        prog=prog,
        description="Run every attention backend on the same model, weights and batches (padded and packed, several "
        "sequence lengths); log time, tokens/s, peak memory and the error against an fp64 eager reference to "
        "TensorBoard, and print the summary table.",
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the fields below.")
    hints = typing.get_type_hints(CompareConfig)
    helps = field_help(CompareConfig)  # the docstring under each field
    for f in dataclasses.fields(CompareConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if hints[f.name] is bool:  # --check / --no_check (and `check: true` in YAML)
            parser.add_argument(f"--{f.name}", action=ActionYesNo, default=default, help=helps[f.name])
        else:
            parser.add_argument(f"--{f.name}", type=hints[f.name], default=default, help=helps[f.name])
    return parser


def config_from_namespace(ns) -> CompareConfig:
    d = ns.as_dict() if hasattr(ns, "as_dict") else dict(vars(ns))
    names = {f.name for f in dataclasses.fields(CompareConfig)}
    return CompareConfig(**{k: v for k, v in d.items() if k in names})
