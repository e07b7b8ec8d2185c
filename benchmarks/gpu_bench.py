"""GPU benchmark of the training step: correctness first, then tokens/s, MFU and peak memory, in one device call.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_bench.py --out $OUT/gpu_bench.md     # < 8 min on an H100/H200
    python benchmarks/gpu_bench.py --smoke                                        # CPU, tiny: every section runs

Sections (the markdown table file and the console carry all of them, in this order):
  0. Environment: GPU, torch / CUDA / triton / liger versions, the flash kernel, FA3, and a measured bf16 matmul
     (8192^3) next to the spec peak that MFU is measured against.
  1. Correctness gate: bf16 vs fp32 on a small Phi-3 shape (packed and padded logits, gradients) for every attention
     backend and fused-kernel setting; a wrong backend or kernel set is not timed (its rows say so), a wrong eager or
     sdpa (the baselines) stops everything, and the exit code is 1 when anything was wrong.
  2. Attention alone: one layer's q/k/v at full size on packed rows, forward+backward per backend, and the per-batch
     preparation (flex: the block-mask build) timed separately.
  3. Training-step grid: full-size model (random init on the meta device), bf16 weights + fused AdamW state, packed
     rows, fused cross-entropy: attention x compile (per layer) x fused kernels, most informative rows first.
  4. transformers' Phi3ForCausalLM vs ours on the same unpacked rows (sdpa, no compile), and our best setting there;
     when that misses 0.7x transformers' peak memory, a memory-lean row of it: the optimizer step in backward plus
     the cheapest activation checkpointing (selective, else every n-th layer) the memory planner predicts to reach it.
  5. LoRA r=16 on every linear layer of the decoder, frozen bf16 base: peak memory and tokens/s.
  6. The Lightning path: ``python -m phi3_lightning fit`` (bf16-true + compile + FSDP2, one device,
     configs/bench/gpu_fit.yaml) vs the bare step of the same setting on the same data.

One failing row prints ``FAILED: reason`` and the run goes on; a row that cannot run here prints ``unavailable: why``.
A global time budget (--budget-s) is spent in priority order: sections 0-2, the first grid rows (--grid-first; the
estimates of sections 4 and 5 are kept free meanwhile), then 4-6, then the first rows that did not fit before, then the
rest of the grid; whatever no longer fits prints ``skipped: time budget``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phi3_lightning import Phi3ForCausalLM, get_preset
from phi3_lightning.memory import ordinal
from phi3_lightning.model import backends as B
from phi3_lightning.model.backends import BACKENDS, backend_available
from phi3_lightning.model.masking import build_context
from phi3_lightning.modules.callbacks import dense_half_peak_tflops

ATTENTION = ("sdpa", "flash_attention_2", "flex")
FUSED = ("none", "compile", "liger")
SECTIONS = {
    0: "Environment",
    1: "Correctness gate",
    2: "Attention alone",
    3: "Training step grid",
    4: "transformers side by side",
    5: "LoRA real-size step",
    6: "Lightning path",
}
FLOPS_NOTE = (
    "MFU = model FLOPs/s / spec peak. Model FLOPs per token = config.flops_per_token(T) = 6N + 12·L·H·d·T (PaLM "
    "convention: N = non-embedding parameters + lm_head, attention at full T x T, no recomputation counted); T = the "
    "token-weighted mean document length for packed rows, the row length for unpacked rows. tokens/s counts every "
    "token of the rows (bare steps) or the real tokens (Lightning's throughput monitor)."
)

# time estimates (s) used to plan the budget before anything has been measured; measured walls replace them
EST = {"eager_row": 20.0, "compile_row": 60.0, "attention": 40.0, "hf": 90.0, "lora": 20.0, "fit": 120.0, "bare": 45.0}


def section_estimate(sec: int) -> float:
    """The time (s) section 4, 5 or 6 needs before it may start on a GPU. Section 6 starts only when both its fit
    and its bare step fit: a fit whose bare step is then skipped (or a fit cut by its timeout) measures nothing."""
    return {4: EST["hf"], 5: EST["lora"], 6: EST["fit"] + EST["bare"]}[sec]


def first_pass_reserve(sections) -> float:
    """Seconds kept free for sections 4 and 5 (cheap, each a goal of its own) while section 2 and the first grid
    rows run. Section 6 (a fit subprocess and a bare step, ~3 min) is not reserved for: the first grid rows come
    before it (they give the MFU and the best setting that sections 4 and 6 use), as the priority order says."""
    return sum(section_estimate(sec) for sec in (4, 5) if sec in sections)


# ----------------------------------------------------------------------------------------------------------- output
class Report:
    """Lines per section: printed at once, written (atomically: temp file + rename) in section order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: dict[int, list[str]] = {k: [] for k in SECTIONS}

    def header(self, sec: int, extra: str = "") -> None:
        self.log(sec, f"\n## {sec}. {SECTIONS[sec]}{extra}\n")

    def log(self, sec: int, line: str = "") -> None:
        print(line, flush=True)
        self.lines[sec].append(line)

    def write(self, title: str) -> None:
        if not self.path:
            return
        path = Path(self.path)
        text = "\n".join([title, *(line for sec in SECTIONS for line in self.lines[sec])]) + "\n"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)


class Budget:
    """Seconds left of the global budget; ``fits(est, reserve)``: whether a step of ``est`` s may start while
    ``reserve`` s stay for what comes later."""

    def __init__(self, total: float) -> None:
        self.total, self.t0 = total, time.time()

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()

    def fits(self, est: float, reserve: float = 0.0) -> bool:
        return self.left() - reserve >= est


def short(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    attn: str
    compiled: bool
    fused: str

    @property
    def label(self) -> str:
        return f"{self.attn} | {'on' if self.compiled else 'off'} | {self.fused}"


def grid_order(attns=ATTENTION, compiles=(False, True), fused=FUSED) -> list[Setting]:
    """Every setting, most informative first: the baselines, then what should be fastest, then the rest."""
    first = [
        Setting("sdpa", False, "none"),  # the default: the baseline of everything
        Setting("sdpa", True, "none"),  # what compile alone buys
        Setting("flash_attention_2", True, "none"),  # the expected best attention
        Setting("flash_attention_2", True, "liger"),  # ... with the fused layers
        Setting("flex", True, "none"),
        Setting("flash_attention_2", False, "none"),
        Setting("sdpa", True, "liger"),
        Setting("flash_attention_2", True, "compile"),
        Setting("sdpa", False, "liger"),
        Setting("flash_attention_2", False, "liger"),
        Setting("sdpa", False, "compile"),
        Setting("flash_attention_2", False, "compile"),
        Setting("flex", False, "none"),
    ]
    every = [Setting(a, c, f) for c in (False, True) for a in ATTENTION for f in FUSED]
    order = first + [s for s in every if s not in first]
    return [s for s in order if s.attn in attns and s.compiled in compiles and s.fused in fused]


def fused_status(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether fused kernels ``name`` can run on ``device`` (the fused-kernel module may not be in this checkout)."""
    if name == "none":
        return True, ""
    try:
        from phi3_lightning.model.fused import fused_available
    except ImportError as e:
        return False, f"phi3_lightning.model.fused is not in this checkout ({e})"
    try:
        return fused_available(name, device)
    except Exception as e:
        return False, short(e)


def apply_fused(model, name: str) -> None:
    if name == "none":
        return
    setter = getattr(model, "set_fused_kernels", None)
    if setter is None:
        raise RuntimeError("Phi3ForCausalLM has no set_fused_kernels() in this checkout")
    setter(name)


# What the correctness gate (section 1) found wrong, as {("attention" | "fused", name): why}; settings that use a wrong
# backend or kernel set are not timed (rows say so), the others are. A wrong eager or sdpa (the baselines) stops all.
GATE_FAILED: dict[tuple[str, str], str] = {}
GATE_FATAL = (("attention", "eager"), ("attention", "sdpa"))


def gate_failure(attn: str, fused: str = "none") -> str | None:
    """Why the correctness gate excludes this attention backend / fused-kernel set, or None."""
    why = GATE_FAILED.get(("attention", attn)) or (GATE_FAILED.get(("fused", fused)) if fused != "none" else None)
    return f"failed the correctness gate ({why})" if why else None


def setting_unavailable(s: Setting, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``s`` cannot be timed here, or None."""
    failed = gate_failure(s.attn, s.fused)
    if failed:
        return failed
    ok, why = backend_available(s.attn, device, dtype)
    if not ok:
        return why
    if s.attn == "flex" and device.type != "cuda":
        return f"flex_attention has no backward on {device.type} in torch {torch.__version__}"
    if s.compiled and device.type != "cuda":
        return "compiled rows are timed on CUDA only (CPU inductor builds take minutes)"
    if s.fused != "none" and device.type != "cuda":
        return f"fused kernels {s.fused!r} are timed on CUDA only"
    ok, why = fused_status(s.fused, device)
    return None if ok else why


# ----------------------------------------------------------------------------------------------------------- data
def packed_row(seq: int, vocab: int, device, gen: torch.Generator, min_doc=256, max_doc=2048):
    """(ids, position_ids, labels, doc lengths) of one packed row of random documents."""
    lengths: list[int] = []
    while sum(lengths) < seq:
        lengths.append(min(int(torch.randint(min_doc, max_doc + 1, (1,), generator=gen)), seq - sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])
    ids = torch.randint(0, vocab, (seq,), generator=gen)
    labels = ids.clone()
    labels[pos == 0] = -100  # no target crosses a document boundary
    return ids.to(device), pos.to(device), labels.to(device), lengths


def packed_batches(args, vocab: int, device, n: int, seed: int = 1) -> tuple[list[dict], float]:
    """``n`` distinct packed batches (rotated through the timed steps: every layout a training run would see is new)
    and the token-weighted mean document length over them."""
    gen = torch.Generator().manual_seed(seed)
    batches, lengths = [], []
    for _ in range(n):
        rows = [packed_row(args.seq, vocab, device, gen, args.min_doc, args.max_doc) for _ in range(args.batch)]
        ids, pos, labels = (torch.stack([r[i] for r in rows]) for i in range(3))
        batches.append({"input_ids": ids, "position_ids": pos, "labels": labels})
        lengths += [n_ for r in rows for n_ in r[3]]
    return batches, sum(n_ * n_ for n_ in lengths) / sum(lengths)


# ----------------------------------------------------------------------------------------------------------- timing
def timed(fn, warmup: int, reps: int, cuda: bool) -> tuple[float, float]:
    """(median seconds of ``fn`` over ``reps`` calls, seconds of the warm-up calls): CUDA events on a GPU."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times), first


def peak_gib(cuda: bool) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "-"


def dynamo_counts() -> str:
    from torch._dynamo.utils import counters

    graphs = counters["stats"].get("unique_graphs", 0)
    breaks = sum(counters["graph_break"].values())
    return f"{graphs} graphs, {breaks} breaks"


def reset_dynamo() -> None:
    try:
        import torch._dynamo
        from torch._dynamo.utils import counters

        torch._dynamo.reset()  # drop the compiled code (and what it holds) of the previous model
        counters.clear()
    except Exception:  # pragma: no cover - depends on the torch build
        pass


def train_steps(
    args, model, batches, loss_fn, cuda: bool, tokens_per_step: float | None = None, in_backward: bool = False
) -> dict:
    """Time ``loss.backward() + AdamW.step()`` (fused on CUDA) over the rotating ``batches``; the model and the
    optimizer state stay alive only inside this call. Raises on a non-finite loss. ``in_backward``: the package's
    InBackwardOptimizer steps each parameter inside backward (``optimizer_in_backward``), same AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]

    def adamw(groups):
        return torch.optim.AdamW(groups, lr=1e-5, fused=True) if cuda else torch.optim.AdamW(groups, lr=1e-5)

    if in_backward:
        from phi3_lightning.modules.in_backward import InBackwardOptimizer

        opt = InBackwardOptimizer(adamw, params)
    else:
        opt = adamw(params)
    model.train()
    state = {"i": 0, "losses": []}

    def step():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1

        def closure():
            loss = loss_fn(b)
            loss.backward()
            return loss

        if in_backward:
            loss = opt.step(closure)  # the updates happen inside its backward
        else:
            loss = closure()
            opt.step()
        opt.zero_grad(set_to_none=True)
        state["losses"].append(loss.detach())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warmup = max(args.warmup, len(batches))  # every layout once before timing (a compiled layer may recompile)
    sec, first = timed(step, warmup, args.steps, cuda)
    losses = torch.stack(state["losses"]).float()
    if not bool(torch.isfinite(losses).all()):
        raise FloatingPointError(f"non-finite loss in the timed steps: {losses.tolist()}")
    if tokens_per_step is None:
        tokens_per_step = batches[0]["input_ids"].numel()
    out = {"sec": sec, "first": first, "tok_s": tokens_per_step / sec, "peak": peak_gib(cuda)}
    return out


# ---------------------------------------------------------------------------------------------------------- models
def causal_loss(model):
    """The training loss of a batch dict through the fused linear + cross-entropy (no (B, T, V) logits)."""
    return lambda b: model(**b, return_logits=False).loss


def build_model(
    cfg, attn: str, device, dtype, fused: str = "none", compiled: bool = False, checkpointing: int | str = 0
):
    """Random-init model as a large run builds it: on the meta device, materialised in place on ``device``.
    ``checkpointing``: activation checkpointing of every n-th decoder layer, ``"selective"`` (every layer keeps its
    matmul / attention outputs), or 0 (none)."""
    with torch.device("meta"):
        model = Phi3ForCausalLM(cfg, attn_implementation=attn, device=torch.device("meta"))
    model.to_empty(device=device)
    model.reset_parameters()
    model = model.to(dtype)
    apply_fused(model, fused)
    if checkpointing == "selective":
        model.gradient_checkpointing_enable(selective=True)
    elif checkpointing:
        model.gradient_checkpointing_enable(checkpointing)
    if compiled and checkpointing == "selective":
        model.model.compile_selective_layers()  # the checkpointed layer call compiled, as torch_compile: layers does
    elif compiled:
        for layer in model.model.layers:
            layer.compile()
    return model


# ------------------------------------------------------------------------------------------------------ section 0
def spec_peak(name: str) -> float | None:
    """The dense bf16 datasheet peak of the GPU named ``name`` (the table the Lightning throughput monitor uses)."""
    return dense_half_peak_tflops(name)


def version_of(module: str, dist: str | None = None) -> str:
    try:
        return importlib.metadata.version(dist or module)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as e:
        return f"not importable ({type(e).__name__})"


def fa3_status() -> str:
    impls = getattr(torch.nn.attention, "list_flash_attention_impls", None)
    if impls is None:
        return f"unavailable: torch {torch.__version__} has no flash-attention impl registry"
    listed = impls()
    if "FA3" not in listed:
        return f"unavailable: not among torch's registered impls {listed}"
    if importlib.util.find_spec("flash_attn_interface") is None:
        return (
            "unavailable: torch lists FA3 but its kernels (module flash_attn_interface, FA3's hopper build) are absent"
        )
    return "available (flash_attn_interface importable; activated in section 2 only)"


def environment(args, rep: Report, device, cuda: bool) -> float:
    """Log the environment; return the peak (TFLOP/s) that MFU is measured against."""
    rep.header(0)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    rep.log(0, "| item | value |")
    rep.log(0, "|---|---|")
    rep.log(
        0,
        f"| device | {name}"
        + (f" ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB) |" if cuda else " |"),
    )
    rep.log(0, f"| torch | {torch.__version__} |")
    rep.log(0, f"| CUDA | {torch.version.cuda or 'none'} |")
    rep.log(0, f"| triton | {version_of('triton')} |")
    rep.log(0, f"| liger-kernel | {version_of('liger_kernel', 'liger-kernel')} |")
    rep.log(0, f"| transformers | {version_of('transformers')} |")
    kernel_fn = getattr(B, "flash_kernel", None)
    if kernel_fn is None:
        kernel = "unavailable: phi3_lightning.model.backends.flash_kernel is not in this checkout"
    else:
        try:
            kernel = kernel_fn(device) or f"none ({backend_available('flash_attention_2', device)[1]})"
        except Exception as e:
            kernel = f"FAILED: {short(e)}"
    rep.log(0, f"| flash kernel (flash_attention_2) | {kernel} |")
    rep.log(0, f"| FA3 | {fa3_status()} |")
    # measured matmul rate: random data (zeros run faster), a few products after warm-up
    n = args.matmul_n
    mdtype = torch.bfloat16 if cuda else torch.float32
    measured = None
    try:
        a, b = (torch.randn(n, n, device=device, dtype=mdtype) for _ in range(2))
        sec, _ = timed(lambda: a @ b, 2, args.matmul_reps, cuda)
        measured = 2 * n**3 / sec / 1e12
        rep.log(
            0, f"| measured matmul {n}^3 {str(mdtype)[6:]} | {measured:.3g} TFLOP/s (median of {args.matmul_reps}) |"
        )
    except Exception as e:
        rep.log(0, f"| measured matmul {n}^3 | FAILED: {short(e)} |")
    if args.peak_tflops:
        peak, src = args.peak_tflops, "--peak-tflops"
    elif spec_peak(name) is not None:
        peak, src = spec_peak(name), f"spec dense bf16 of {name}"
    elif measured:
        peak, src = measured, "measured matmul (no spec peak known for this device; pass --peak-tflops)"
    else:
        peak, src = 1.0, "placeholder 1 TFLOP/s (nothing known or measured)"
    rep.log(0, f"| MFU peak | {peak:.3g} TFLOP/s ({src}) |")
    rep.log(0, "")
    rep.log(0, FLOPS_NOTE)
    return peak


# ------------------------------------------------------------------------------------------------------ section 1
def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def correctness(args, rep: Report, device, cuda: bool) -> bool:
    rep.header(1, f" ({'bf16' if cuda else 'fp32'} vs fp32 sdpa; max-abs relative error; grads: norm relative error)")
    dtype = torch.bfloat16 if cuda else torch.float32
    tol = 5e-2 if cuda else 1e-3
    if args.smoke:
        cfg = get_preset("tiny", sliding_window=40)
        seq, lo, hi = 160, 16, 60
    else:
        cfg = get_preset("small-bench", num_hidden_layers=2, sliding_window=200)
        seq, lo, hi = 512, 64, 300
    torch.manual_seed(0)
    ref = Phi3ForCausalLM(cfg, attn_implementation="sdpa").to(device)
    gen = torch.Generator().manual_seed(0)
    ids, pos, labels, _ = packed_row(seq, cfg.vocab_size, device, gen, lo, hi)
    x_pad = torch.randint(0, cfg.vocab_size, (2, seq * 3 // 4), generator=gen).to(device)
    mask = torch.ones_like(x_pad)
    mask[1, : seq // 5] = 0
    out = ref(ids[None], position_ids=pos[None], labels=labels[None])
    out.loss.backward()
    ref_packed = out.logits.detach().float()
    ref_grads = {n: p.grad.float() for n, p in ref.named_parameters() if p.grad is not None}
    with torch.no_grad():
        ref_pad = ref(x_pad, attention_mask=mask).logits.float()
    real = mask.bool()
    rep.log(1, "| attention | fused kernels | packed logits | padded logits | grads | ok |")
    rep.log(1, "|---|---|---:|---:|---:|---|")
    rows = [(a, "none") for a in ("eager", "sdpa", "flex", "flash_attention_2")]
    rows += [("sdpa", f) for f in FUSED if f != "none"]
    all_ok = True
    GATE_FAILED.clear()

    def record(why: str) -> None:
        GATE_FAILED[("fused", fused) if fused != "none" else ("attention", attn)] = why

    for attn, fused in rows:
        ok, why = backend_available(attn, device, dtype)
        if ok and fused != "none":
            ok, why = fused_status(fused, device)
            if ok and fused == "compile" and not cuda:
                ok, why = False, "compiled kernels are checked on CUDA only (CPU inductor builds take minutes)"
        if not ok:
            rep.log(1, f"| {attn} | {fused} | unavailable: {why} | | | |")
            continue
        try:
            m = Phi3ForCausalLM(cfg, attn_implementation=attn).to(device)
            m.load_state_dict(ref.state_dict())
            m = m.to(dtype)
            apply_fused(m, fused)
            try:
                o = m(ids[None], position_ids=pos[None], labels=labels[None])
                o.loss.backward()
                grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None and n in ref_grads}
                if not grads:
                    raise RuntimeError("no parameter gradient to compare (names differ from the reference?)")
                num = sum(float((g.float() - ref_grads[n]).pow(2).sum()) for n, g in grads.items())
                den = sum(float(ref_grads[n].pow(2).sum()) for n in grads)
                e_grad, grad_txt = (num / den) ** 0.5, None
            except B.FlexUnsupportedError:  # flex without a backward here (CPU): logits only
                with torch.no_grad():
                    o = m(ids[None], position_ids=pos[None], labels=labels[None])
                e_grad, grad_txt = 0.0, f"n/a (no flex backward on {device.type})"
            e_packed = rel_err(o.logits.detach(), ref_packed)
            with torch.no_grad():
                e_pad = rel_err(m(x_pad, attention_mask=mask).logits[real], ref_pad[real])
            good = e_packed < tol and e_pad < tol and e_grad < 2 * tol  # grads: norm error, whole model
            all_ok &= good
            if not good:
                record(f"errors {e_packed:.1e} / {e_pad:.1e} / {e_grad:.1e} vs tolerance {tol:g}")
            grad_cell = grad_txt or f"{e_grad:.2e}"
            rep.log(1, f"| {attn} | {fused} | {e_packed:.2e} | {e_pad:.2e} | {grad_cell} | {'yes' if good else 'NO'} |")
            del m, o
        except Exception as e:
            all_ok = False
            record(short(e))
            rep.log(1, f"| {attn} | {fused} | FAILED: {short(e)} | | | NO |")
        reset_dynamo()
        free_memory()
    rep.log(
        1,
        f"\ntolerance {tol:g} (grads {2 * tol:g}); "
        + ("all settings agree with fp32" if all_ok else "CORRECTNESS FAILED"),
    )
    return all_ok


# ------------------------------------------------------------------------------------------------------ section 2
def time_attention(args, backend, positions, context, cfg, device, dtype, cuda: bool) -> tuple[float, float, float]:
    """(prepare s per batch, fwd+bwd s per layer, s of the first calls) of one attention backend at full size; the
    preparation runs on a fresh context per batch (as the backbone does), the layer on prepared ones in rotation."""
    h, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    q = torch.randn(args.batch, h, args.seq, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(args.batch, hkv, args.seq, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(args.batch, hkv, args.seq, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(args.batch, args.seq, h, d, device=device, dtype=dtype)
    state = {"i": 0}

    def prepare():
        ctx = context(positions[state["i"] % len(positions)])
        state["i"] += 1
        backend.prepare(ctx, dtype)
        return ctx

    prep_sec, prep_first = timed(prepare, 1, args.attn_reps, cuda)
    ctxs = [prepare() for _ in positions]

    def fwd_bwd():
        ctx = ctxs[state["i"] % len(ctxs)]
        state["i"] += 1
        out = backend.attend(q, k, v, ctx, d**-0.5, 0.0)  # (B, T, H, D)
        out.backward(g)

    sec, first = timed(fwd_bwd, max(2, len(ctxs)), args.attn_reps, cuda)
    return prep_sec, sec, prep_first + first


def attention_alone(args, rep: Report, device, cuda: bool, budget: Budget, reserve: float) -> None:
    cfg = get_preset(args.preset)
    h, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    dtype = torch.bfloat16 if cuda else torch.float32
    rep.header(2, f" (one layer of {args.preset}: {h} x {d} heads, kv {hkv}, {args.batch} x {args.seq} packed tokens)")
    gen = torch.Generator().manual_seed(2)
    layouts = []
    for _ in range(args.n_batches):
        rows = [
            packed_row(args.seq, cfg.vocab_size, device, gen, args.min_doc, args.max_doc) for _ in range(args.batch)
        ]
        layouts.append((torch.stack([r[1] for r in rows]), [n for r in rows for n in r[3]]))
    sum_sq = statistics.mean(sum(n * n for n in lens) for _, lens in layouts)
    flops = 3.5 * 2 * h * d * sum_sq  # causal: fwd 2 matmuls over sum(L^2)/2 pairs; bwd 2.5x fwd (flash convention)

    def context(pos):
        return build_context(
            batch_size=args.batch,
            q_len=args.seq,
            attention_mask=None,
            position_ids=pos,
            past_len=0,
            sliding_window=cfg.sliding_window,
            derive_documents=True,
            device=device,
        )

    rep.log(
        2,
        "| attention | kernel | prepare ms / batch | fwd+bwd ms / layer | TFLOP/s (causal) | step est. ms | first calls s |",
    )
    rep.log(2, "|---|---|---:|---:|---:|---:|---:|")
    rows = [
        ("sdpa", "by document (length groups)"),
        ("flash_attention_2", None),
        ("flex", "compiled" if cuda else "eager"),
    ]
    if hasattr(B, "use_torch_flash_impl"):
        rows.append(("flash_attention_2", "FA3"))
    for name, kernel in rows:
        if not budget.fits(10.0, reserve):
            rep.log(2, f"| {name} | {kernel or ''} | skipped: time budget | | | | |")
            continue
        ok, why = backend_available(name, device, dtype)
        if ok and gate_failure(name):
            ok, why = False, gate_failure(name)
        if ok and name == "flex" and not cuda:
            ok, why = False, f"flex_attention has no backward on {device.type}"
        if not ok:
            rep.log(2, f"| {name} | {kernel or ''} | unavailable: {why} | | | | |")
            continue
        activated = False
        try:
            if kernel == "FA3":
                try:
                    B.use_torch_flash_impl("FA3")
                except (ValueError, RuntimeError) as e:
                    rep.log(2, f"| {name} | FA3 | unavailable: {short(e)} | | | | |")
                    continue
                activated = True
            elif name == "flash_attention_2":
                fn = getattr(B, "flash_kernel", None)
                kernel = (fn(device) if fn else None) or "flash-attn"
            prep_sec, sec, first = time_attention(
                args, BACKENDS[name], [c for c, _ in layouts], context, cfg, device, dtype, cuda
            )
            step = prep_sec + cfg.num_hidden_layers * sec
            rep.log(
                2,
                f"| {name} | {kernel} | {prep_sec * 1e3:.2f} | {sec * 1e3:.2f} | {flops / sec / 1e12:.0f} | "
                f"{step * 1e3:.1f} | {first:.1f} |",
            )
        except Exception as e:
            rep.log(2, f"| {name} | {kernel or ''} | FAILED: {short(e)} | | | | |")
        finally:
            if activated:
                B.use_torch_flash_impl(None)  # back to torch's built-in FlashAttention-2
        free_memory()
    rep.log(
        2,
        f"\nprepare: the per-batch work before the layers (sdpa: document groups; flash: cu_seqlens; flex: the block "
        f"mask, built by a compiled kernel on CUDA); step est. = prepare + {cfg.num_hidden_layers} layers x fwd+bwd; "
        f"first calls: warm-up incl. compilation. TFLOP/s counts causal attention FLOPs (3.5 x 2·H·d·ΣL²) over "
        f"3 rotating layouts (token-weighted mean document {statistics.mean(sum(n * n for n in ls) / sum(ls) for _, ls in layouts):.0f}).",
    )


# ------------------------------------------------------------------------------------------------------ section 3
def grid_row(args, s: Setting, rep: Report, device, cuda: bool, peak: float, results: dict) -> None:
    cfg = get_preset(args.preset)
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.time()
    reset_dynamo()
    try:
        model = build_model(cfg, s.attn, device, dtype, s.fused, s.compiled)
        batches, mean_doc = packed_batches(args, cfg.vocab_size, device, args.n_batches)
        r = train_steps(args, model, batches, causal_loss(model), cuda)
        mfu = r["tok_s"] * cfg.flops_per_token(int(mean_doc)) / (peak * 1e12)
        graphs = dynamo_counts() if s.compiled else "-"
        wall = time.time() - t0
        results[s] = {**r, "mfu": mfu, "wall": wall}
        rep.log(
            3,
            f"| {s.label} | {r['tok_s']:,.0f} | {mfu * 100:.1f}% | {r['peak']} | {r['sec'] * 1e3:.0f} | "
            f"{r['first']:.0f} | {graphs} | {wall:.0f} |",
        )
    except Exception as e:
        results[s] = {"failed": short(e), "wall": time.time() - t0}
        rep.log(3, f"| {s.label} | FAILED: {short(e)} | | | | | | {time.time() - t0:.0f} |")
    finally:
        model = batches = None  # noqa: F841 - free the model and its optimizer before the next setting
        reset_dynamo()
        free_memory()


def row_estimate(s: Setting, results: dict) -> float:
    # rows that ran to the end (an unavailable or skipped row has no wall time; a failed one stopped early)
    walls = [r["wall"] for k, r in results.items() if k.compiled == s.compiled and "tok_s" in r]
    return max(walls) if walls else EST["compile_row" if s.compiled else "eager_row"]


def best_setting(results: dict, compiled: bool | None = None) -> Setting | None:
    done = [
        (r["tok_s"], s) for s, r in results.items() if "tok_s" in r and (compiled is None or s.compiled == compiled)
    ]
    return max(done, key=lambda x: x[0])[1] if done else None


def run_grid(
    args, settings, rep, device, cuda, peak, results, budget: Budget, reserve: float, defer: bool = False
) -> None:
    """Time ``settings`` in order while each fits the budget (``reserve`` s kept free). With ``defer`` a row that
    does not fit is only marked ``deferred`` (no table line): main() tries it again after sections 4-6."""
    dtype = torch.bfloat16 if cuda else torch.float32
    for s in settings:
        why = setting_unavailable(s, device, dtype)
        if why:
            results[s] = {"unavailable": why}
            rep.log(3, f"| {s.label} | unavailable: {why} | | | | | | |")
            continue
        if not budget.fits(row_estimate(s, results), reserve):
            if defer:
                results[s] = {"deferred": True}
                continue
            results[s] = {"skipped": True}
            rep.log(3, f"| {s.label} | skipped: time budget ({budget.left():.0f} s left) | | | | | | |")
            continue
        grid_row(args, s, rep, device, cuda, peak, results)


# ------------------------------------------------------------------------------------------------------ section 4
def hf_side_by_side(args, rep: Report, device, cuda: bool, peak: float, results: dict) -> None:
    cfg = get_preset(args.preset)
    dtype = torch.bfloat16 if cuda else torch.float32
    rep.log(
        4,
        f"the same {args.batch} x {args.seq} unpacked rows for every row (labels = inputs), {str(dtype)[6:]} weights "
        f"and AdamW state{' (fused)' if cuda else ''}\n",
    )
    rep.log(4, "| model | attention | compile | fused | tokens/s | MFU | peak GiB | step ms |")
    rep.log(4, "|---|---|---|---|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    batches = [{"input_ids": x, "labels": x}]
    flops = cfg.flops_per_token(args.seq)
    got = {}

    def row(label, build, loss_fn, in_backward=False):
        reset_dynamo()
        try:
            model = build()
            r = train_steps(args, model, batches, lambda b: loss_fn(model, b), cuda, in_backward=in_backward)
            got[label] = r
            mfu = r["tok_s"] * flops / (peak * 1e12)
            rep.log(4, f"| {label} | {r['tok_s']:,.0f} | {mfu * 100:.1f}% | {r['peak']} | {r['sec'] * 1e3:.0f} |")
        except Exception as e:
            rep.log(4, f"| {label} | FAILED: {short(e)} | | | |")
        finally:
            model = None  # noqa: F841
            reset_dynamo()
            free_memory()

    try:
        import transformers
    except ImportError as e:
        transformers = None
        rep.log(4, f"| transformers | sdpa | off | none | unavailable: {e} | | | |")
    if transformers is not None:
        d = cfg.to_dict()
        d.pop("architectures", None)

        def build_hf():
            with torch.device(device):
                return transformers.Phi3ForCausalLM._from_config(
                    transformers.Phi3Config(**d), attn_implementation="sdpa", dtype=dtype
                )

        row(
            "transformers | sdpa | off | none",
            build_hf,
            lambda m, b: m(input_ids=b["input_ids"], labels=b["labels"]).loss,
        )
    ours = lambda m, b: m(b["input_ids"], labels=b["labels"], return_logits=False).loss  # noqa: E731
    base = Setting("sdpa", False, "none")
    row(f"ours | {base.label}", lambda: build_model(cfg, "sdpa", device, dtype), ours)
    best = best_setting(results)
    fastest = f"ours | {base.label}"
    if best is not None and best != base:
        fastest = f"ours (best grid setting) | {best.label}"
        row(fastest, lambda: build_model(cfg, best.attn, device, dtype, best.fused, best.compiled), ours)
    hf = got.get("transformers | sdpa | off | none")
    lean = best if best is not None else base
    every, why = lean_checkpointing(args, cfg, lean, hf, got.get(fastest), cuda)
    if every:
        row(
            f"ours (memory-lean: optimizer in backward + checkpointing {every_layer(every)}) | {lean.label}",
            lambda: build_model(cfg, lean.attn, device, dtype, lean.fused, lean.compiled, checkpointing=every),
            ours,
            in_backward=True,
        )
    if why:
        rep.log(4, f"\nmemory-lean row: {why}")
    if hf:
        rep.log(4, "")
        for label, r in got.items():
            if label.startswith("ours"):
                speed = r["tok_s"] / hf["tok_s"]
                if cuda:
                    mem = float(r["peak"]) / float(hf["peak"])
                    mem_txt = f"{mem:.2f}x its peak memory"
                    met = "met" if speed >= 1.5 and mem <= 0.7 else "not met"
                else:
                    mem_txt, met = "its peak memory (not measured on CPU)", "n/a on CPU"
                rep.log(
                    4,
                    f"- {label}: {speed:.2f}x transformers' tokens/s at {mem_txt} (goal >= 1.5x at <= 0.7x: {met})",
                )


def every_layer(n: int | str) -> str:
    if n == "selective":
        return "selective (matmul / attention outputs kept)"
    return "every layer" if n == 1 else f"every {ordinal(n)} layer"


def lean_checkpointing(args, cfg, s: Setting, hf: dict | None, fastest: dict | None, cuda: bool):
    """(choice, why): the memory-lean row of section 4 -- the optimizer step in backward plus the cheapest activation
    checkpointing the planner predicts to reach <= 0.7x transformers' measured peak: ``"selective"`` (no matmul
    recomputed) first, then whole layers, every n-th for n = 8, 4, 2, 1 -- or (None, why) when no such row is needed
    or it cannot be judged. Selective: the planner's own bytes (what its policy keeps does not depend on compile).
    Every n-th: what the fastest row measured beyond weights + AdamW state (its activations and working memory)
    scaled by the planner's ratio for n."""
    if not cuda:
        return "selective", "CPU smoke: selective, to run the path (peak memory is not measured on CPU)"
    if not hf or not fastest or hf.get("peak") in (None, "-") or fastest.get("peak") in (None, "-"):
        return None, "not run: transformers' or our fastest row has no measured peak"
    target = 0.7 * float(hf["peak"])
    measured = float(fastest["peak"])
    if measured <= target:
        return None, f"not needed: the fastest row's {measured:.1f} GiB is within 0.7x transformers' ({target:.1f} GiB)"
    from phi3_lightning.memory import estimate_memory

    kw = dict(method="full", precision="bf16-true", seq_len=args.seq, batch_size=args.batch, attn_implementation="sdpa")
    base = estimate_memory(cfg, optimizer_in_backward=True, **kw)
    fixed = (base.weights + base.optimizer) / 2**30
    working = max(measured - fixed, 0.0)  # measured activations + working memory (+ gradients, if they were the peak)
    for n in ("selective", 8, 4, 2, 1):
        e = estimate_memory(cfg, activation_checkpointing=n, optimizer_in_backward=True, **kw)
        if n == "selective":
            predicted = fixed + (e.activations + e.other + e.gradients + e.step_temporaries) / 2**30
        else:
            ratio = (e.activations + e.other) / (base.activations + base.other)
            predicted = fixed + working * ratio + (e.gradients + e.step_temporaries) / 2**30
        if predicted <= 0.97 * target or n == 1:
            return n, (
                f"checkpointing {every_layer(n)}, predicted {predicted:.1f} GiB against 0.7x transformers' "
                f"peak = {target:.1f} GiB (the fastest row measured {measured:.1f} GiB)"
            )
    return None, ""  # unreachable: n == 1 always returns


# ------------------------------------------------------------------------------------------------------ section 5
def lora_rows(args, rep: Report, device, cuda: bool, results: dict, budget: Budget) -> None:
    from phi3_lightning.model.lora import apply_lora

    cfg = get_preset(args.preset)
    dtype = torch.bfloat16 if cuda else torch.float32
    rep.log(
        5,
        f"r=16, alpha=32 on qkv/o/gate_up/down of every layer; base (lm_head and embeddings too) frozen in "
        f"{str(dtype)[6:]}; packed {args.batch} x {args.seq} rows, fused AdamW on the adapters\n",
    )
    rep.log(5, "| attention | compile | fused | trainable params | lm_head frozen | tokens/s | peak GiB | step ms |")
    rep.log(5, "|---|---|---|---:|---|---:|---:|---:|")
    settings = [Setting("sdpa", False, "none")]
    best = best_setting(results)
    if best is not None and best not in settings and not best.compiled:  # a compiled row would cost a compile here
        settings.append(best)
    for s in settings:
        if s is not settings[0] and not budget.fits(row_estimate(s, results)):
            rep.log(5, f"| {s.label} | skipped: time budget | | | | |")
            continue
        reset_dynamo()
        try:
            model = build_model(cfg, s.attn, device, dtype, s.fused, False)
            apply_lora(model, r=16, alpha=32.0)
            if s.compiled:
                for layer in model.model.layers:
                    layer.compile()
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            frozen_head = not model.lm_head.weight.requires_grad
            batches, _ = packed_batches(args, cfg.vocab_size, device, args.n_batches)
            r = train_steps(args, model, batches, causal_loss(model), cuda)
            rep.log(
                5,
                f"| {s.label} | {trainable:,} | {'yes' if frozen_head else 'NO'} | {r['tok_s']:,.0f} | {r['peak']} | "
                f"{r['sec'] * 1e3:.0f} |",
            )
        except Exception as e:
            rep.log(5, f"| {s.label} | FAILED: {short(e)} | | | | |")
        finally:
            model = batches = None  # noqa: F841
            reset_dynamo()
            free_memory()


# ------------------------------------------------------------------------------------------------------ section 6
FIT_CONFIGS = (
    "configs/causal_lm.yaml",
    "configs/strategies/bf16_true.yaml",
    "configs/strategies/compile.yaml",
    "configs/strategies/fsdp2.yaml",
    "configs/bench/gpu_fit.yaml",
)


def fit_command(args, s: Setting, logs: str, cuda: bool) -> list[str]:
    cmd = [sys.executable, "-m", "phi3_lightning", "fit"]
    for c in FIT_CONFIGS:
        cmd += ["--config", str(ROOT / c)]
    cmd += [
        "--model.init_args.model", args.preset,
        "--model.init_args.attn_implementation", s.attn,
        "--data.init_args.max_length", str(args.seq),
        "--data.init_args.batch_size", str(args.batch),
        "--trainer.max_steps", str(args.fit_steps),
        "--trainer.logger.init_args.save_dir", logs,
    ]  # fmt: skip
    if s.fused != "none":
        cmd += ["--model.init_args.fused_kernels", s.fused]
    if not s.compiled:
        cmd += ["--model.init_args.torch_compile", "null"]
    if cuda:
        cmd += ["--trainer.accelerator", "gpu"]
    else:  # --smoke: a tiny fit on CPU
        cmd += ["--trainer.accelerator", "cpu", "--data.init_args.max_files", "8"]
        cmd += ["--model.init_args.optimizer.init_args.fused", "false"]
    return cmd


def fit_data_module(args, cuda: bool):
    """The data module the fit builds: causal_lm.yaml's data, the overlay's, then the command line's overrides."""
    import yaml

    from phi3_lightning.data import CausalLMDataModule

    init: dict = {}
    for c in FIT_CONFIGS:
        init.update((yaml.safe_load((ROOT / c).read_text()) or {}).get("data", {}).get("init_args", {}) or {})
    init.update(max_length=args.seq, batch_size=args.batch, progress=False)
    if not cuda:
        init["max_files"] = 8
    dm = CausalLMDataModule(**init)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def read_perf(logs: str) -> dict[str, list[float]]:
    """The throughput monitor's perf/* series from the fit's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[float]] = {}
    for ev in sorted(Path(logs).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(ev.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith("perf/"):
                series[tag] = [e.value for e in acc.Scalars(tag)]
        break
    return series


def lightning_path(args, rep: Report, device, cuda: bool, peak: float, results: dict, budget: Budget) -> None:
    if args.fit_setting == "best":
        s = best_setting(results, compiled=True) if cuda else None
        s = Setting(s.attn, True, s.fused) if s else Setting("sdpa", cuda, "none")
    else:
        attn, fused = args.fit_setting.split(",")
        s = Setting(attn, cuda, fused)
    rep.log(
        6,
        f"`python -m phi3_lightning fit` with {', '.join(FIT_CONFIGS)}: {args.preset}, bf16-true, FSDP2 on 1 device, "
        f"torch_compile {'layers' if s.compiled else 'null (CPU smoke)'}, attention {s.attn}, fused kernels {s.fused}, "
        f"{args.batch} x {args.seq} packed rows of the embedded corpus, {args.fit_steps} steps; the run report's last "
        f"throughput measurement (5 batches after the warm-up batch) vs the bare step of the same setting on the "
        f"first batches of the same data module (no FSDP2, no Lightning).\n",
    )
    rep.log(6, "| path | attention | compile | fused | real tokens/s | peak GiB | wall s |")
    rep.log(6, "|---|---|---|---|---:|---:|---:|")
    why = setting_unavailable(Setting(s.attn, False, s.fused), device, torch.bfloat16 if cuda else torch.float32)
    if why:
        rep.log(6, f"| fit | {s.label} | unavailable: {why} | | |")
        return
    fit_tps = None
    logs = tempfile.mkdtemp(prefix="gpu_bench_fit_")
    t0 = time.time()
    timeout = max(30.0, min(budget.left() - (EST["bare"] if cuda else 0), args.fit_timeout))
    try:
        env = dict(
            os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        )
        proc = subprocess.run(
            fit_command(args, s, logs, cuda), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        if args.log_dir:
            Path(args.log_dir, "gpu_fit.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        m = re.search(r"throughput: ([\d,]+) real tokens/s", proc.stdout + proc.stderr)
        if proc.returncode != 0 or m is None:
            tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
            why = f"exit code {proc.returncode}" + ("" if m else ", no throughput line")
            rep.log(6, f"| fit | {s.label} | FAILED: {why}: {tail[0][:160]} | | {time.time() - t0:.0f} |")
        else:
            fit_tps = float(m.group(1).replace(",", ""))
            fit_peak = "-"
            try:
                perf = read_perf(logs)
                if cuda and perf.get("perf/peak_memory_mb"):
                    fit_peak = f"{perf['perf/peak_memory_mb'][-1] / 1024:.1f}"
                if perf.get("perf/tokens_per_sec"):
                    series = ", ".join(f"{v:,.0f}" for v in perf["perf/tokens_per_sec"])
                    rep.log(6, f"<!-- fit perf/tokens_per_sec series: {series} -->")
            except Exception as e:
                rep.log(6, f"<!-- TensorBoard read-back failed: {short(e)} -->")
            rep.log(6, f"| fit (Lightning) | {s.label} | {fit_tps:,.0f} | {fit_peak} | {time.time() - t0:.0f} |")
    except subprocess.TimeoutExpired:
        rep.log(6, f"| fit | {s.label} | FAILED: timed out after {timeout:.0f} s | | {time.time() - t0:.0f} |")
    except Exception as e:
        rep.log(6, f"| fit | {s.label} | FAILED: {short(e)} | | {time.time() - t0:.0f} |")
    finally:
        import shutil

        shutil.rmtree(logs, ignore_errors=True)
    # the bare step of the same setting on the same data
    if not budget.fits(EST["bare"] if cuda else 0.0):
        rep.log(6, f"| bare step | {s.label} | skipped: time budget | | |")
        return
    t0 = time.time()
    cfg = get_preset(args.preset)
    dtype = torch.bfloat16
    reset_dynamo()
    try:
        dm = fit_data_module(args, cuda)
        batches = []
        for b in dm.train_dataloader():
            batches.append(
                {k: b[k].to(device) for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in b}
            )
            if len(batches) >= args.n_batches:
                break
        real = statistics.mean(
            float(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches
        )
        model = build_model(cfg, s.attn, device, dtype, s.fused, s.compiled)
        r = train_steps(args, model, batches, causal_loss(model), cuda, tokens_per_step=real)
        rep.log(6, f"| bare step | {s.label} | {r['tok_s']:,.0f} | {r['peak']} | {time.time() - t0:.0f} |")
        if fit_tps:
            ratio = fit_tps / r["tok_s"]
            verdict = ("met" if ratio >= 0.95 else "not met") if cuda else "n/a on CPU"
            rep.log(6, f"\nLightning / bare tokens/s: {ratio:.3f} (goal >= 0.95, within 5%: {verdict})")
    except Exception as e:
        rep.log(6, f"| bare step | {s.label} | FAILED: {short(e)} | | {time.time() - t0:.0f} |")
    finally:
        model = batches = None  # noqa: F841
        reset_dynamo()
        free_memory()


# ------------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, 1 warm-up + 1 step: every section runs")
    p.add_argument("--preset", default=None, help="model preset (default phi-3-mini-4k; --smoke: tiny)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 4096; --smoke: 128)")
    p.add_argument("--batch", type=int, default=1, help="rows per step")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (at least one per distinct batch)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (the median is reported)")
    p.add_argument(
        "--n-batches",
        type=int,
        default=None,
        help="distinct packed batches rotated through the steps (default 1: a compiled layer recompiles for each new "
        "document layout, which costs a compile per layout; section 6's fit sees a new layout every batch)",
    )
    p.add_argument("--min-doc", type=int, default=None, help="shortest random document (default 256)")
    p.add_argument("--max-doc", type=int, default=None, help="longest random document (default 2048)")
    p.add_argument("--attention", default=",".join(ATTENTION), help="grid: attention backends")
    p.add_argument("--compile", default="off,on", help="grid: per-layer torch.compile off / on")
    p.add_argument("--fused", default=",".join(FUSED), help="grid: fused kernels none / compile / liger")
    p.add_argument("--grid-first", type=int, default=4, help="grid rows run before sections 4-6 (the rest after)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak that MFU is measured against")
    p.add_argument("--budget-s", type=float, default=450.0, help="global time budget; nothing new starts past it")
    p.add_argument("--fit-setting", default="best", help="section 6: 'best' (best compiled grid row) or ATTN,FUSED")
    p.add_argument("--fit-steps", type=int, default=16, help="section 6: optimizer steps of the fit")
    p.add_argument("--fit-timeout", type=float, default=300.0, help="section 6: the fit subprocess' time limit")
    p.add_argument("--sections", default="0,1,2,3,4,5,6", help="sections to run (0 and 1 always run)")
    p.add_argument("--out", default="", help="markdown file for the tables (rewritten after every section)")
    p.add_argument("--log-dir", default="", help="folder for the fit subprocess' log (gpu_fit.log)")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = {
        "preset": "tiny" if smoke else "phi-3-mini-4k",
        "seq": 128 if smoke else 4096,
        "warmup": 1 if smoke else 2,
        "steps": 1 if smoke else 5,
        "n_batches": 1,
        "min_doc": 16 if smoke else 256,
        "max_doc": 64 if smoke else 2048,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.matmul_n, args.matmul_reps = (8192, 10) if torch.cuda.is_available() and not smoke else (256, 3)
    args.attn_reps = 2 if smoke else 10
    if smoke:
        args.fit_steps = min(args.fit_steps, 6)  # one throughput measurement (batches 1-5)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    sections = {int(x) for x in args.sections.split(",") if x.strip()}
    rep = Report(args.out)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    title = (
        f"# gpu_bench: {name}, torch {torch.__version__}, {args.preset}, {args.batch} x {args.seq}\n\n"
        f"command: `python benchmarks/gpu_bench.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
    )
    print(title, flush=True)
    peak = environment(args, rep, device, cuda)
    rep.write(title)
    gate_ok = correctness(args, rep, device, cuda)
    if any(k in GATE_FAILED for k in GATE_FATAL):
        rep.log(1, "\nCORRECTNESS FAILED for a baseline backend (eager / sdpa): nothing is timed")
        rep.write(title)
        return 1
    if not gate_ok:
        wrong = ", ".join(f"{kind} {name}" for kind, name in GATE_FAILED)
        rep.log(1, f"\nCORRECTNESS FAILED for {wrong}: the settings using them are not timed; the others are")
    rep.write(title)
    if not cuda and not args.smoke:
        rep.log(1, "\nno CUDA device: correctness checked on CPU; timing skipped (--smoke runs every section tiny)")
        rep.write(title)
        return 0
    attns = tuple(a for a in args.attention.split(",") if a)
    compiles = tuple(c == "on" for c in args.compile.split(",") if c)
    fused = tuple(f for f in args.fused.split(",") if f)
    settings = grid_order(attns, compiles, fused) if 3 in sections else []
    results: dict = {}
    later = first_pass_reserve(sections)
    if 2 in sections:
        if budget.fits(EST["attention"] * 0.5, later):
            attention_alone(args, rep, device, cuda, budget, later)
        else:
            rep.header(2)
            rep.log(2, "skipped: time budget")
        rep.write(title)
    if settings:
        wd = "bf16 weights + fused AdamW state" if cuda else "fp32 weights + AdamW state (CPU smoke)"
        rep.header(3, f" ({args.preset}, {wd}, {args.batch} x {args.seq} packed rows, fused CE)")
        rep.log(
            3, "| attention | compile | fused | tokens/s | MFU | peak GiB | step ms | warm-up s | dynamo | wall s |"
        )
        rep.log(3, "|---|---|---|---:|---:|---:|---:|---:|---|---:|")
        runnable = [
            s for s in settings if not setting_unavailable(s, device, torch.bfloat16 if cuda else torch.float32)
        ]
        first = set(runnable[: args.grid_first])
        run_grid(
            args,
            [s for s in settings if s in first or s not in runnable],
            rep,
            device,
            cuda,
            peak,
            results,
            budget,
            later,
            defer=True,
        )
        rep.write(title)
    for sec, fn in ((4, hf_side_by_side), (5, lora_rows), (6, lightning_path)):
        if sec not in sections:
            continue
        rep.header(sec)
        est = section_estimate(sec) if cuda else 0.0
        if not budget.fits(est):
            rep.log(sec, f"skipped: time budget ({budget.left():.0f} s left)")
            continue
        try:
            if fn is hf_side_by_side:
                fn(args, rep, device, cuda, peak, results)
            elif fn is lora_rows:
                fn(args, rep, device, cuda, results, budget)
            else:
                fn(args, rep, device, cuda, peak, results, budget)
        except Exception as e:
            rep.log(sec, f"FAILED: {short(e)}")
        rep.write(title)
    if settings:
        # the first rows that did not fit before sections 4-6 (in their priority order), then the rest
        rest = [s for s in settings if s not in results or "deferred" in results[s]]
        if rest:
            rep.log(3, "| *rows below ran after sections 4-6* | | | | | | | | | |")
            run_grid(args, rest, rep, device, cuda, peak, results, budget, 0.0)
        best = best_setting(results)
        if best is not None:
            r = results[best]
            goal = "met" if r["mfu"] >= 0.5 else "not met"
            rep.log(
                3, f"\nbest: {best.label}: {r['tok_s']:,.0f} tokens/s, MFU {r['mfu'] * 100:.1f}% (goal >= 50%: {goal})"
            )
        skipped = [s.label for s in settings if results.get(s, {}).get("skipped")]
        if skipped:
            rep.log(3, f"skipped for the time budget: {len(skipped)} rows")
    rep.log(6, f"\ntotal wall time {budget.elapsed():.0f} s (budget {args.budget_s:.0f} s)")
    rep.write(title)
    return 0 if gate_ok else 1


if __name__ == "__main__":
    sys.exit(main())
