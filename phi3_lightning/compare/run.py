"""The comparison itself: one model, one set of weights, the same batches for every backend."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model import Phi3Config, Phi3ForCausalLM, resolve_model
from ..model import backends as B
from . import bench
from .config import TOLERANCES, CompareConfig
from .report import Row, chart, setting_name, table, write_tensorboard

MIB = 2.0**20


@dataclass
class CompareResult:
    """What :func:`compare_attention` measured and where it logged it."""

    rows: list[Row]
    unavailable: dict[str, str]  # backend -> reason
    notes: list[str]  # footnotes printed under the table
    table: str  # the Markdown table alone
    summary: str  # table + notes: what is printed and logged as TensorBoard text
    log_dir: Path  # the run's TensorBoard directory
    dtype: torch.dtype
    device: torch.device
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every measured backend agrees with the fp64 reference within tolerance and nothing failed."""
        return not self.failures


# ----------------------------------------------------------------------------- model
def _model_config(cfg: CompareConfig) -> Phi3Config:
    return resolve_model(cfg.checkpoint or cfg.preset, cfg.overrides)[0]


def _build_model(cfg: CompareConfig, mcfg: Phi3Config, dtype: torch.dtype, device: torch.device) -> Phi3ForCausalLM:
    if cfg.checkpoint:
        model = Phi3ForCausalLM.from_pretrained(
            cfg.checkpoint, attn_implementation="eager", dtype=dtype, device=device, **cfg.overrides
        )
    else:
        torch.manual_seed(cfg.seed)
        model = Phi3ForCausalLM(mcfg, attn_implementation="eager").to(device=device, dtype=dtype)
    return model.eval()  # dropout off: every backend sees the same function


def _backend_label(name: str, flex_compiled: bool, device: torch.device | None = None) -> tuple[str, str | None]:
    """Name shown in the table, and a footnote saying what actually ran."""
    if name == "flash_attention_2" and B.flash_kernels_substituted():
        return "flash_attention_2*", (
            "* flash_attention_2 ran with substituted pure-torch kernels "
            "(set_flash_kernels): its glue is tested, its times are not flash-attn's or torch's varlen_attn's"
        )
    if name == "flash_attention_2":
        return name, f"flash_attention_2 ran {B.flash_kernel(device)}"
    if name == "flex":
        mode = "torch.compile(flex_attention)" if flex_compiled else "eager flex_attention (unfused math path)"
        return "flex", f"flex ran as {mode}"
    return name, None


@contextlib.contextmanager
def _sliding_window(model: Phi3ForCausalLM, window: int | None):
    """Temporarily set the model's sliding window (read by the backbone at every forward)."""
    cfg = model.model.config
    old = cfg.sliding_window
    cfg.sliding_window = window
    try:
        yield
    finally:
        cfg.sliding_window = old


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ start/stop lines on fd 2 (Python exceptions still propagate)."""
    try:
        fd = os.dup(2)
    except OSError:  # pragma: no cover
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def _peak_mib(fn, device: torch.device) -> float:
    if device.type == "cpu":
        with _quiet_stderr():
            return bench.peak_memory_bytes(fn, device) / MIB
    return bench.peak_memory_bytes(fn, device) / MIB


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# ----------------------------------------------------------------------------- one backend, one batch
def _measure(model, batch: dict, row: Row, ref_logits, ref_grads, cfg: CompareConfig, device, tol) -> None:
    real = batch["attention_mask"].bool()
    forward = lambda: bench.forward_logits(model, batch)  # noqa: E731
    train_step = lambda: bench.train_step(model, batch)  # noqa: E731
    timed = {}  # measure -> function: what runs here is timed below, both in one interleaved loop

    # forward: error against the reference, memory
    try:
        logits = forward()
        row.values.update(bench.logits_errors(logits, ref_logits, real))
        del logits
        timed["fwd_ms"] = forward
        if cfg.memory:
            row.values["fwd_peak_mib"] = _peak_mib(forward, device)
    except NotImplementedError as e:
        row.not_measured["forward"] = _reason(e)
    except Exception as e:  # noqa: BLE001 - reported, and a failure for --check
        row.not_measured["forward"] = _reason(e)
        row.failures.append(f"{row.backend} {row.batch} T={row.seq_len} forward raised {_reason(e)}")

    # forward+backward of the loss: gradient error, memory
    try:
        train_step()
        row.values.update(bench.grad_errors(bench.grad_vector(model), ref_grads))
        model.zero_grad(set_to_none=True)
        timed["fwd_bwd_ms"] = train_step
        if cfg.memory:
            row.values["fwd_bwd_peak_mib"] = _peak_mib(train_step, device)
    except NotImplementedError as e:
        row.not_measured["forward+backward"] = _reason(e)
    except Exception as e:  # noqa: BLE001
        row.not_measured["forward+backward"] = _reason(e)
        row.failures.append(f"{row.backend} {row.batch} T={row.seq_len} forward+backward raised {_reason(e)}")
    finally:
        model.zero_grad(set_to_none=True)

    # time: forward and forward+backward alternately, until their spread is small or the budget is spent
    if timed:
        try:
            timings = bench.time_interleaved(timed, device, cfg.warmup, cfg.repeats, cfg.max_spread, cfg.time_budget_s)
        except Exception as e:  # noqa: BLE001 - it ran once above: a failure now is unexpected
            row.not_measured["timing"] = _reason(e)
            row.failures.append(f"{row.backend} {row.batch} T={row.seq_len} timing raised {_reason(e)}")
            timings = {}
        finally:
            model.zero_grad(set_to_none=True)
        for measure, t in timings.items():
            row.timings[measure] = t
            row.values[measure] = t.median * 1e3
            row.values[measure.replace("_ms", "_tokens_per_s")] = row.tokens / t.median
            if t.rel_spread > cfg.max_spread:
                row.noisy.append(f"{measure} IQR {t.rel_spread:.0%} of median")
        if len(timings) == 2 and timings["fwd_bwd_ms"].median < timings["fwd_ms"].median:
            row.noisy.append("fwd+bwd timed faster than fwd")

    for measure, limit in (("logits_rel_err", tol["logits"]), ("grad_rel_err", tol["grads"])):
        v = row.values.get(measure)
        if v is not None and not (v <= limit):  # NaN fails too
            row.failures.append(f"{row.backend} {row.batch} T={row.seq_len}: {measure}={v:.2e} > tolerance {limit:g}")


def _run_all(
    cfg: CompareConfig,
    mcfg: Phi3Config,
    available: list[str],
    windows: list[int | None],
    dtype: torch.dtype,
    device: torch.device,
    tol: dict[str, float],
) -> list[Row]:
    """Every (window, batch kind, seq_len): the fp64 eager reference once, then each backend on the same batch."""
    model = _build_model(cfg, mcfg, dtype, device)
    ref_model = copy.deepcopy(model).to(torch.float64)  # the same weights, upcast exactly
    ref_model.set_attn_implementation("eager")
    pad_id = mcfg.pad_token_id if mcfg.pad_token_id is not None and mcfg.pad_token_id < mcfg.vocab_size else 0
    rows: list[Row] = []
    with warnings.catch_warnings():
        # eager flex warns once that it is unfused; the table's footnote says how flex ran
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        for window in windows:
            with _sliding_window(model, window), _sliding_window(ref_model, window):
                for kind in cfg.batch_kinds:
                    for seq_len in cfg.seq_lens:
                        if "flex" in available and B.flex_compiled(device):
                            # each (shape, mask) compiles flex anew; clear dynamo's cache so a long comparison
                            # never reaches its recompile limit (past it, flex would silently run unfused)
                            torch._dynamo.reset()
                        batch = bench.make_batch(kind, cfg.batch_size, seq_len, mcfg.vocab_size, pad_id, cfg.seed)
                        batch = {k: v.to(device) for k, v in batch.items()}
                        ref_logits = bench.forward_logits(ref_model, batch)
                        bench.train_step(ref_model, batch)
                        ref_grads = bench.grad_vector(ref_model)
                        ref_model.zero_grad(set_to_none=True)
                        tokens = int(batch["attention_mask"].sum())
                        for name in available:
                            model.set_attn_implementation(name)
                            row = Row(setting_name(kind, window), seq_len, name, tokens)
                            _measure(model, batch, row, ref_logits, ref_grads, cfg, device, tol)
                            rows.append(row)
                        del ref_logits, ref_grads
    return rows


# ----------------------------------------------------------------------------- entry point
def _holds_events(d: Path) -> bool:
    return d.is_dir() and any(d.rglob("events.out.tfevents.*"))


def _run_dir(cfg: CompareConfig, model_name: str, device: torch.device, dtype_name: str) -> Path:
    """``<log_dir>/<run_name>``, checked before the run: a named run that already holds a comparison is refused (its
    event files would be appended to: two points at every step); an automatic name that collides gets ``-2``, ..."""
    root = Path(cfg.log_dir)
    if cfg.run_name:
        d = root / cfg.run_name
        if _holds_events(d):
            raise ValueError(
                f"run_name={cfg.run_name!r} already holds a comparison ({d}); TensorBoard would show both runs' "
                "points at the same steps: choose another --run_name, leave it out (a timestamped name), or remove "
                "that directory"
            )
        return d
    base = f"{model_name}-{device.type}-{dtype_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    d, n = root / base, 1
    while _holds_events(d):
        n += 1
        d = root / f"{base}-{n}"
    return d


def compare_attention(config: CompareConfig | None = None, **overrides) -> CompareResult:
    """Run every requested backend on the same model, weights and batches; log to TensorBoard; return the results.

    ``compare_attention(seq_lens=[128], backends=["eager", "sdpa"])`` is ``compare_attention(CompareConfig(...))``.
    """
    cfg = dataclasses.replace(config, **overrides) if config is not None else CompareConfig(**overrides)
    device, dtype = cfg.torch_device(), cfg.torch_dtype()
    dtype_name = str(dtype).replace("torch.", "")
    mcfg = _model_config(cfg)
    too_long = [t for t in cfg.seq_lens if t > mcfg.max_position_embeddings]
    if too_long:
        raise ValueError(
            f"seq_lens {too_long} exceed max_position_embeddings={mcfg.max_position_embeddings}; "
            "shorten them or raise it via overrides"
        )
    windows = cfg.sliding_windows if cfg.sliding_windows else [mcfg.sliding_window]
    model_name = Path(cfg.checkpoint).name if cfg.checkpoint else cfg.preset
    log_dir = _run_dir(cfg, model_name, device, dtype_name)
    tol = TOLERANCES[dtype]

    available, unavailable, labels, notes = [], {}, {}, []
    for name in cfg.backends:
        ok, why = B.backend_available(name, device, dtype)
        if not ok:
            unavailable[name] = why
            continue
        available.append(name)
        flex_compiled = cfg.flex_compile if cfg.flex_compile is not None else B.flex_compiled(device)
        labels[name], note = _backend_label(name, flex_compiled, device)
        if note:
            notes.append(note)

    if not available:
        raise ValueError(
            "none of the requested backends can run here: "
            + "; ".join(f"{name}: {why}" for name, why in unavailable.items())
            + "; add one that can (eager and sdpa run everywhere) or use a device where these run"
        )

    old_flex, old_threads = B.flex_compile_setting(), torch.get_num_threads()
    started = time.perf_counter()
    try:
        if cfg.flex_compile is not None:
            B.set_flex_compile(cfg.flex_compile)
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        threads = torch.get_num_threads()
        rows = _run_all(cfg, mcfg, available, windows, dtype, device, tol)
    finally:
        B.set_flex_compile(old_flex)
        torch.set_num_threads(old_threads)
    elapsed = time.perf_counter() - started

    # ------------------------------------------------------------------ report
    failures = [f for r in rows for f in r.failures]
    head = (
        f"model {model_name} ({mcfg.num_hidden_layers} layers, hidden {mcfg.hidden_size}, heads "
        f"{mcfg.num_attention_heads}/{mcfg.num_key_value_heads} x {mcfg.head_size}, vocab {mcfg.vocab_size}), "
        f"batch {cfg.batch_size}, {dtype_name} on {device}"
        + (f" ({threads} thread{'s' if threads > 1 else ''})" if device.type == "cpu" else "")
        + f", torch {torch.__version__}"
    )
    tbl = table(rows, labels)
    lines = [head, "", tbl, ""]
    lines.append(
        f"times: median (q1-q3) of n calls, forward and forward+backward timed alternately after "
        f"{cfg.warmup} warm-up round(s); at least {cfg.repeats} rounds, more until IQR/median <= "
        f"{cfg.max_spread:g} or {cfg.time_budget_s:g} s per row; tok/s counts real (non-padding) tokens. "
        "Batches: padded = right-padded rows; packed = documents with restarting position_ids (+ a padding "
        "tail on rows after the first); _wN = sliding window N."
    )
    noisy = [r for r in rows if r.noisy]
    if noisy:
        lines.append(
            f"noisy: {len(noisy)} of {len(rows)} rows have a timing spread too large to rank backends "
            f"(IQR/median > {cfg.max_spread:g} within {cfg.time_budget_s:g} s, or fwd+bwd timed faster than "
            "fwd); rerun on a quieter machine, with --num_threads, or a larger --time_budget_s. "
            "--check does not look at timings."
        )
        lines += [f"  - {r.backend} {r.batch} T={r.seq_len}: {'; '.join(r.noisy)}" for r in noisy]
    lines.append(
        f"errors vs fp64 eager on the same weights: logits err = max|d| / max|ref| over real tokens, grad err "
        f"= ||d||_2 / ||ref||_2 over all parameter gradients; {dtype_name} tolerance: logits <= "
        f"{tol['logits']:g}, grads <= {tol['grads']:g}. The reference's softmax runs in float32 (as transformers' "
        "eager attention does): errors near 1e-7 are its own rounding."
    )
    if cfg.memory:
        lines.append(bench.MEMORY_NOTE["cuda" if device.type == "cuda" else "cpu"] + ".")
    lines += notes
    skipped = {}
    for r in rows:
        for what, why in r.not_measured.items():
            skipped.setdefault((r.backend, what, why), []).append(f"{r.batch}/T{r.seq_len}")
    for (backend, what, why), where in skipped.items():
        scope = "all batches" if len(where) == len([r for r in rows if r.backend == backend]) else ", ".join(where)
        lines.append(f"not measured: {backend} {what} ({scope}): {why}")
    for name, why in unavailable.items():
        lines.append(f"unavailable: {name}: {why}")
    if failures:
        lines.append(f"FAILED ({len(failures)}):")
        lines += [f"  - {f}" for f in failures]
    else:
        lines.append("every measured backend agrees with the fp64 reference within tolerance.")
    lines.append(f"({elapsed:.1f} s)")
    summary = "\n".join(lines)

    image = chart(rows, title=head)
    config_text = "```\n" + "\n".join(f"{k}: {v}" for k, v in dataclasses.asdict(cfg).items()) + "\n```"
    # TensorBoard renders Markdown: keep the table as a table and every note as its own paragraph.
    tb_text = "\n\n".join([head, tbl] + [line for line in lines[4:] if line])
    write_tensorboard(str(log_dir), rows, tb_text, image, config_text, max_spread=cfg.max_spread)
    return CompareResult(
        rows=rows,
        unavailable=unavailable,
        notes=lines[4:],
        table=tbl,
        summary=summary,
        log_dir=log_dir,
        dtype=dtype,
        device=device,
        failures=failures,
    )
