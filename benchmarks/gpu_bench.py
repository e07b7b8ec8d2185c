"""GPU training-step benchmark: correctness first, then tokens/s, MFU and peak memory per backend x compile.

Fits one device call of under 8 minutes on an H100/H200 (a time budget stops new configurations early):

    PYTHONUNBUFFERED=1 python benchmarks/gpu_bench.py --out $OUT/gpu_bench.md

1. Correctness: on a small Phi-3 shape, bf16 logits of every backend vs the fp32 SDPA logits (padded and packed
   batches) within bf16 tolerance; the run stops if a backend is wrong.
2. Speed: full-size Phi-3-mini-4k (random init, built on the meta device), bf16 weights and AdamW state
   ("bf16-true"), packed 4096-token rows (documents of random length, position_ids restarting per document),
   fused cross-entropy, fused AdamW. Median of timed steps after warm-up (CUDA events).
   MFU = achieved FLOP/s / peak, FLOPs per token = 6N + 12·L·H·d·(mean document length) — the attention term
   counts only the work a packed row really does. Peak defaults to 989 TFLOP/s (H100/H200 SXM dense bf16).
3. transformers' Phi3ForCausalLM side by side on the same shape (SDPA, unpacked rows, its own loss), if installed.

On a machine without CUDA it runs the correctness part on CPU with a tiny model and exits (a syntax/fallback check).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from phi3_lightning import Phi3ForCausalLM, get_preset  # noqa: E402
from phi3_lightning.model.backends import backend_available  # noqa: E402


def packed_row(seq: int, vocab: int, device, gen: torch.Generator, min_doc=256, max_doc=2048):
    lengths = []
    while sum(lengths) < seq:
        lengths.append(min(int(torch.randint(min_doc, max_doc + 1, (1,), generator=gen)), seq - sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])
    ids = torch.randint(0, vocab, (seq,), generator=gen)
    labels = ids.clone()
    labels[pos == 0] = -100  # no target crosses a document boundary
    return ids.to(device), pos.to(device), labels.to(device), lengths


def correctness(device, dtype, log) -> bool:
    cfg = get_preset("small-bench", num_hidden_layers=2, sliding_window=200)
    torch.manual_seed(0)
    ref_model = Phi3ForCausalLM(cfg, attn_implementation="sdpa").to(device).eval()
    gen = torch.Generator().manual_seed(0)
    ids, pos, _, _ = packed_row(512, cfg.vocab_size, device, gen, 64, 300)
    x_pad = torch.randint(0, cfg.vocab_size, (2, 384), device=device)
    mask = torch.ones_like(x_pad)
    mask[1, :100] = 0
    with torch.no_grad():
        ref_packed = ref_model(ids[None], position_ids=pos[None]).logits.float()
        ref_pad = ref_model(x_pad, attention_mask=mask).logits.float()
    ok_all = True
    log("| backend | packed rel. err (bf16 vs fp32) | padded rel. err | ok |")
    log("|---|---:|---:|---|")
    for backend in ("eager", "sdpa", "flex", "flash_attention_2"):
        ok, why = backend_available(backend)
        if not ok:
            log(f"| {backend} | unavailable: {why} | | |")
            continue
        m = Phi3ForCausalLM(cfg, attn_implementation=backend).to(device)
        m.load_state_dict(ref_model.state_dict())
        m = m.to(dtype).eval()
        with torch.no_grad():
            a = m(ids[None], position_ids=pos[None]).logits.float()
            b = m(x_pad, attention_mask=mask).logits.float()
        e1 = ((a - ref_packed).abs().max() / ref_packed.abs().max()).item()
        real = mask.bool()
        e2 = ((b[real] - ref_pad[real]).abs().max() / ref_pad[real].abs().max()).item()
        tol = 5e-2 if dtype != torch.float32 else 1e-4
        ok = e1 < tol and e2 < tol
        ok_all &= ok
        log(f"| {backend} | {e1:.2e} | {e2:.2e} | {'yes' if ok else 'NO'} |")
        del m
    return ok_all


def build_full(preset, backend, device, dtype):
    cfg = get_preset(preset)
    with torch.device("meta"):
        model = Phi3ForCausalLM(cfg, attn_implementation=backend, device=torch.device("meta"))
    model.to_empty(device=device)
    model.reset_parameters()
    return model.to(dtype)


def time_steps(step, warmup, steps):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def timed_training(args, model, loss_fn, flops_per_token, label: str, log_row) -> None:
    """Time ``loss_fn().backward() + fused AdamW`` steps of ``model``; log tokens/s, MFU, peak memory; free it."""
    state = {"opt": torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)}
    model.train()

    def step():
        loss_fn().backward()
        state["opt"].step()
        state["opt"].zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    sec = time_steps(step, args.warmup, args.steps)
    tok_s = args.batch * args.seq / sec
    mfu = tok_s * flops_per_token / (args.peak_tflops * 1e12)
    log_row(
        f"| {label} | {tok_s:,.0f} | {mfu * 100:.1f}% | {torch.cuda.max_memory_allocated() / 2**30:.1f} | "
        f"{sec * 1000:.0f} ms | {time.time() - t0:.0f}s |"
    )
    state.clear()  # drop the optimizer (and its state) before the next setting is measured
    gc.collect()
    torch.cuda.empty_cache()


def bench_ours(args, backend, compiled, device, dtype, log_row):
    model = build_full(args.preset, backend, device, dtype)
    cfg = model.config
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
    if compiled:
        for layer in model.model.layers:
            layer.compile()
    gen = torch.Generator().manual_seed(1)
    rows = [packed_row(args.seq, cfg.vocab_size, device, gen) for _ in range(args.batch)]
    ids, pos, labels = (torch.stack([r[i] for r in rows]) for i in range(3))
    lengths = [n for r in rows for n in r[3]]
    mean_doc = sum(n * n for n in lengths) / sum(lengths)  # token-weighted mean context length
    timed_training(
        args,
        model,
        lambda: model(ids, position_ids=pos, labels=labels, return_logits=False).loss,
        cfg.flops_per_token(int(mean_doc)),
        f"ours | {backend} | {'yes' if compiled else 'no'} | packed",
        log_row,
    )


def bench_hf(args, device, dtype, log_row):
    """transformers vs ours on the very same unpacked rows (SDPA, no compile), for a like-for-like ratio."""
    try:
        import transformers
    except ImportError:
        log_row("| transformers | - | - | - | not installed | | | | |")
        return
    cfg = get_preset(args.preset)
    d = cfg.to_dict()
    d.pop("architectures")
    with torch.device(device):
        hf = transformers.Phi3ForCausalLM._from_config(
            transformers.Phi3Config(**d), attn_implementation="sdpa", dtype=dtype
        )
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    flops = cfg.flops_per_token(args.seq)
    timed_training(
        args, hf, lambda: hf(input_ids=x, labels=x).loss, flops, "transformers | sdpa | no | unpacked", log_row
    )
    hf = None  # free transformers' model before ours is built
    ours = build_full(args.preset, "sdpa", device, dtype)
    timed_training(
        args, ours, lambda: ours(x, labels=x, return_logits=False).loss, flops, "ours | sdpa | no | unpacked", log_row
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="phi-3-mini-4k")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--backends", default="sdpa,flex,flash_attention_2")
    p.add_argument("--compile", default="off,on", help="comma list of off/on")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new configuration after this")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    lines: list[str] = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    t_start = time.time()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name() if cuda else "CPU"
    log(f"# GPU benchmark: {name}, torch {torch.__version__}")
    log(f"\n## Correctness ({'bf16' if cuda else 'fp32'} vs fp32 SDPA)\n")
    if not correctness(device, dtype, log):
        log("\nCORRECTNESS FAILED: not timing")
        return 1
    if not cuda:
        log("\nno CUDA device: correctness checked on CPU; timing skipped")
        return 0
    log(
        f"\n## Training step: {args.preset}, bf16 weights + AdamW state, batch {args.batch} x {args.seq}, "
        f"peak {args.peak_tflops:.0f} TFLOP/s\n"
    )
    log("| impl | attention | compile | rows | tokens/s | MFU | peak GiB | step | wall |")
    log("|---|---|---|---|---:|---:|---:|---:|---:|")
    for compiled in [c == "on" for c in args.compile.split(",")]:
        for backend in args.backends.split(","):
            ok, why = backend_available(backend)
            if not ok:
                log(f"| ours | {backend} | {'yes' if compiled else 'no'} | packed | unavailable: {why} | | | | |")
                continue
            if time.time() - t_start > args.budget_s:
                log(f"| ours | {backend} | {'yes' if compiled else 'no'} | packed | skipped: time budget | | | | |")
                continue
            try:
                bench_ours(args, backend, compiled, device, dtype, log)
            except Exception as e:  # report and go on: one backend failing must not hide the others
                log(
                    f"| ours | {backend} | {'yes' if compiled else 'no'} | packed | FAILED: {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:120]} | | | | |"
                )
            gc.collect()  # the model died with bench_ours' frame: give its memory back before the next one
            torch.cuda.empty_cache()
    if not args.no_hf and time.time() - t_start < args.budget_s:
        try:
            bench_hf(args, device, dtype, log)
        except Exception as e:
            log(f"| transformers | sdpa | no | unpacked | FAILED: {type(e).__name__}: {str(e)[:120]} | | | | |")
    log(f"\ntotal wall time {time.time() - t_start:.0f}s")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
