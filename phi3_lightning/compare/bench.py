"""Batches and measurements: timing, peak memory, and errors against the fp64 eager reference."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..conventions import IGNORE_INDEX


# ----------------------------------------------------------------------------- batches
def padded_batch(batch_size: int, seq_len: int, vocab: int, pad_id: int, gen: torch.Generator) -> dict:
    """Right-padded rows: row i holds ``seq_len - i * seq_len / (2 * batch_size)`` real tokens (row 0 is full).

    position_ids are ``arange(T)`` (one document per row); labels are -100 on padding.
    """
    b, t = batch_size, seq_len
    input_ids = torch.randint(0, vocab, (b, t), generator=gen)
    mask = torch.zeros(b, t, dtype=torch.long)
    for i in range(b):
        n = max(2, t - (i * t) // (2 * b))
        mask[i, :n] = 1
    input_ids = input_ids.masked_fill(mask == 0, pad_id)
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    position_ids = torch.arange(t)[None].expand(b, t).clone()
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}


def packed_batch(batch_size: int, seq_len: int, vocab: int, pad_id: int, gen: torch.Generator) -> dict:
    """Rows of several documents (lengths drawn in [T/8, T/2]); position_ids restart at 0 at every document.

    Row 0 is filled exactly; the other rows end with a padding tail of T/16 tokens (its own pseudo-document with
    ``attention_mask`` 0), so the packed setting exercises documents and padding in one mask. Labels are -100 at
    every document start and on padding: no target crosses a document boundary.
    """
    b, t = batch_size, seq_len
    input_ids = torch.randint(0, vocab, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.long)
    position_ids = torch.zeros(b, t, dtype=torch.long)
    lo, hi = max(2, t // 8), max(3, t // 2)
    for i in range(b):
        real = t if i == 0 else t - max(1, t // 16)
        pos = 0
        while pos < real:
            n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
            n = min(n, real - pos)
            position_ids[i, pos : pos + n] = torch.arange(n)
            pos += n
        position_ids[i, real:] = torch.arange(t - real)
        mask[i, real:] = 0
    input_ids = input_ids.masked_fill(mask == 0, pad_id)
    labels = input_ids.masked_fill((mask == 0) | (position_ids == 0), IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}


def make_batch(kind: str, batch_size: int, seq_len: int, vocab: int, pad_id: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + seq_len * 7 + (0 if kind == "padded" else 1))
    build = padded_batch if kind == "padded" else packed_batch
    return build(batch_size, seq_len, vocab, pad_id, gen)


# ----------------------------------------------------------------------------- steps
def forward_logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(
            batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits


def train_step(model, batch: dict) -> torch.Tensor:
    """Forward with labels (mean next-token loss over counted tokens) and backward; returns the loss."""
    model.zero_grad(set_to_none=True)
    out = model(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        labels=batch["labels"],
    )
    out.loss.backward()
    return out.loss.detach()


def grad_vector(model) -> torch.Tensor:
    """All parameter gradients as one float64 vector (a missing gradient counts as zeros)."""
    parts = []
    for p in model.parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        parts.append(g.detach().reshape(-1).to(torch.float64))
    return torch.cat(parts)


def logits_errors(logits: torch.Tensor, ref: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """Max abs error on real tokens and the same divided by max |ref| (a scale-free relative error)."""
    diff = (logits[real].to(torch.float64) - ref[real]).abs().max().item()
    scale = ref[real].abs().max().item()
    return {"logits_max_abs_err": diff, "logits_rel_err": diff / scale if scale > 0 else diff}


def grad_errors(g: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Max abs error and L2 relative error of the full parameter-gradient vector."""
    d = g - ref
    norm = ref.norm().item()
    rel = d.norm().item() / norm if norm > 0 else d.norm().item()
    return {"grad_max_abs_err": d.abs().max().item(), "grad_rel_err": rel}


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an already sorted, non-empty list."""
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class Timing:
    """Timed calls of one function, in seconds: the median and its spread (quartiles, extremes)."""

    samples: list[float]
    budget_spent: bool = False  # stopped by the time budget, not because the spread was small enough

    @property
    def n(self) -> int:
        return len(self.samples)

    def _q(self, q: float) -> float:
        return quantile(sorted(self.samples), q)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def q1(self) -> float:
        return self._q(0.25)

    @property
    def q3(self) -> float:
        return self._q(0.75)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def rel_spread(self) -> float:
        """Interquartile range over the median: 0.1 means the middle half of the calls lie within 10% of it."""
        m = self.median
        return (self.q3 - self.q1) / m if m > 0 else float("inf")


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int,
    min_repeats: int,
    max_spread: float,
    time_budget_s: float,
    max_repeats: int = 10_000,
) -> dict[str, Timing]:
    """Time several functions in one loop, one call of each per round (a, b, a, b, ...), device synchronised.

    Interleaving makes a change of machine load hit every function alike, so their medians stay comparable (a
    forward+backward cannot come out faster than its forward because the machine got quieter between the two).
    After ``warmup`` untimed rounds, rounds are repeated until, after at least ``min_repeats`` of them, the relative
    interquartile range of every function is <= ``max_spread``, or ``time_budget_s`` seconds of timing are spent
    (then ``Timing.budget_spent`` is set), or ``max_repeats`` rounds ran.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    started = time.perf_counter()
    rounds = 0
    spent = False
    while True:
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[k].append(time.perf_counter() - t0)
        rounds += 1
        if rounds < min_repeats:
            continue
        if all(Timing(v).rel_spread <= max_spread for v in samples.values()) or rounds >= max_repeats:
            break
        if time.perf_counter() - started >= time_budget_s:
            spent = True
            break
    return {k: Timing(v, budget_spent=spent) for k, v in samples.items()}


# ----------------------------------------------------------------------------- memory
MEMORY_NOTE = {
    "cuda": "peak memory = torch.cuda.max_memory_allocated during one call minus what was allocated before it "
    "(activations, temporaries, and for forward+backward the parameter gradients; weights excluded)",
    "cpu": "peak memory = highest running total of CPU-allocator bytes allocated minus freed during one call, read "
    "from torch.profiler(profile_memory=True) events (activations, temporaries, gradients; weights excluded; "
    "memory that libraries allocate outside PyTorch's allocator, e.g. oneDNN scratch, is not seen)",
}


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by one call of ``fn`` above what was allocated when it started (see MEMORY_NOTE)."""
    if device.type == "cuda":
        gc.collect()  # cyclic garbage would otherwise sit in the baseline (on CPU only deltas count: no need)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    if device.type != "cpu":
        raise NotImplementedError(f"no peak-memory measure for device type {device.type!r}")
    return _cpu_peak_bytes(fn)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas: list[tuple[int, int]] = []
    try:  # every allocation and free, in time order, with its signed size
        for e in prof.profiler.kineto_results.events():
            if e.name() == "[memory]":
                deltas.append((e.start_ns(), e.nbytes()))
    except AttributeError:  # pragma: no cover - older/newer profiler internals: fall back to the chrome trace
        deltas = _deltas_from_trace(prof)
    deltas.sort(key=lambda x: x[0])
    cur = peak = 0
    for _, nbytes in deltas:
        cur += nbytes
        peak = max(peak, cur)
    return int(peak)


def _deltas_from_trace(prof) -> list[tuple[int, int]]:  # pragma: no cover - only where kineto_results is missing
    import json
    import os
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            data = json.load(f)
    finally:
        os.unlink(path)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [(e["ts"], int(e["args"]["Bytes"])) for e in events if e.get("name") == "[memory]"]
