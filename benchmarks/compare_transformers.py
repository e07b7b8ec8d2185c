"""phi3_lightning vs transformers' Phi3ForCausalLM, side by side, same weights, same machine, one run.

Measures (medians over timed repeats, after warm-up):
  * training step (forward + backward + AdamW step), batch B x T tokens: tokens/s and peak memory;
  * greedy generation, batch 1, P-token prompt, N new tokens: new tokens/s.

Each side runs in its own fresh subprocess (so peak RSS is its own), loading the same safetensors checkpoint.
Peak memory on CPU = peak RSS during the timed steps minus RSS after imports (libraries excluded); on CUDA =
torch.cuda.max_memory_allocated. Usage:

    python benchmarks/compare_transformers.py                 # the issue's CPU setting (fp32, SDPA, no compile)
    python benchmarks/compare_transformers.py --compile       # also our model under torch.compile
    python benchmarks/compare_transformers.py --quick         # tiny smoke run (seconds)
    python benchmarks/compare_transformers.py --hf-fused-adamw  # transformers' side with fused AdamW too

The training step uses fused AdamW on our side and torch's default (for-each) AdamW on transformers' side, unless
``--hf-fused-adamw`` gives both the fused one: the optimizer step alone differs several-fold on CPU, so the default
ratio includes that choice, not only the model code.

Not a test: it prints a table and a final ratio line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.impl == "hf":
        import transformers

        base = _rss_mb()
        model = transformers.Phi3ForCausalLM.from_pretrained(args.ckpt, attn_implementation=args.attn, dtype=dtype)
    else:
        from phi3_lightning import Phi3ForCausalLM

        base = _rss_mb()
        model = Phi3ForCausalLM.from_pretrained(args.ckpt, attn_implementation=args.attn, dtype=dtype)
    model.to(device)
    vocab = model.config.vocab_size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result: dict = {"impl": args.impl}

    if args.task == "train":
        model.train()
        if args.impl == "ours" and args.checkpointing:
            model.gradient_checkpointing_enable()
        if args.impl == "ours" and args.compile:
            for layer in model.model.layers:
                layer.compile()
        # Ours: fused AdamW (one kernel over all tensors); transformers' side: the stock default unless
        # --hf-fused-adamw (then the same fused optimizer on both sides).
        opt = (
            torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            if args.impl == "ours" or args.hf_fused_adamw
            else torch.optim.AdamW(model.parameters(), lr=1e-4)
        )
        x = torch.randint(0, vocab, (args.batch, args.seq), device=device)

        def step():
            if args.impl == "ours":
                loss = model(x, labels=x, return_logits=False).loss
            else:
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        for _ in range(args.warmup):
            step()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        result.update(step_s=med, tokens_per_s=args.batch * args.seq / med, times=times)
        result["optimizer"] = "fused AdamW" if opt.defaults.get("fused") else "default (for-each) AdamW"
        if device.type == "cuda":
            result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            result["peak_mb"] = _peak_rss_mb() - base
    else:
        model.eval()
        prompt = torch.randint(0, vocab, (1, args.prompt), device=device)

        def gen():
            with torch.no_grad():
                if args.impl == "ours":
                    return model.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[])
                return model.generate(
                    prompt,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )

        for _ in range(args.warmup):
            out = gen()
        sync()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = gen()
            sync()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        result.update(
            gen_s=med, tokens_per_s=args.new_tokens / med, tokens=out[0, -args.new_tokens :].tolist(), times=times
        )
    return result


def run_side(impl: str, task: str, ckpt: str, args, compile_: bool = False, checkpointing: bool = False) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--impl",
        impl,
        "--task",
        task,
        "--ckpt",
        ckpt,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--prompt",
        str(args.prompt),
        "--new-tokens",
        str(args.new_tokens),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--attn",
        args.attn,
    ]
    if args.hf_fused_adamw:
        cmd.append("--hf-fused-adamw")
    if compile_:
        cmd.append("--compile")
    if checkpointing:
        cmd.append("--checkpointing")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset", default="small-bench", help="architecture (default: the issue's 384-wide, 4-layer Phi-3)"
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per side per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per side (medians pool all repeats)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--compile", action="store_true", help="also time our model with per-layer torch.compile")
    p.add_argument(
        "--checkpointing",
        action="store_true",
        help="also time our model with activation checkpointing (its cost in speed, its saving in memory)",
    )
    p.add_argument(
        "--hf-fused-adamw",
        action="store_true",
        help="train transformers' side with fused AdamW too (default: ours fused, transformers' torch's default)",
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--tasks", default="train,generate")
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--task", default="train", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.quick:
        args.preset, args.batch, args.seq, args.new_tokens, args.warmup, args.repeats = "tiny", 2, 64, 8, 1, 2
        args.rounds = 1

    import torch

    from phi3_lightning import Phi3ForCausalLM, get_preset

    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    with tempfile.TemporaryDirectory() as d:
        Phi3ForCausalLM(cfg).save_pretrained(d)
        import platform

        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"device {args.device}, {args.dtype}, attn={args.attn}, threads={args.threads}"
        )
        print(
            f"model: {args.preset} ({cfg.num_parameters() / 1e6:.1f}M params), medians of {args.rounds} alternating "
            f"rounds x {args.repeats} repeats per side, {args.warmup} warm-up per round"
        )
        rows, ratios = [], {}

        def both(task: str) -> tuple[dict, dict]:
            """Alternate the two sides over rounds (hf, ours, ours, hf, ...) so drift on a shared machine hits
            both; pool every timed repeat of a side and take the median."""
            runs: dict[str, list[dict]] = {"hf": [], "ours": []}
            for r in range(args.rounds):
                for impl in ("hf", "ours") if r % 2 == 0 else ("ours", "hf"):
                    runs[impl].append(run_side(impl, task, d, args))
            pooled = {}
            for impl, rs in runs.items():
                times = [x for res in rs for x in res["times"]]
                med = statistics.median(times)
                pooled[impl] = dict(
                    rs[0],
                    times=times,
                    peak_mb=statistics.median(res.get("peak_mb", 0.0) for res in rs),
                    tokens_per_s=(args.batch * args.seq if task == "train" else args.new_tokens) / med,
                )
            return pooled["hf"], pooled["ours"]

        if "train" in args.tasks:
            hf, ours = both("train")
            rows.append(("train step tokens/s", hf["tokens_per_s"], ours["tokens_per_s"]))
            rows.append(("train peak memory MB", hf["peak_mb"], ours["peak_mb"]))
            ratios["train_speed"] = ours["tokens_per_s"] / hf["tokens_per_s"]
            ratios["train_memory"] = ours["peak_mb"] / hf["peak_mb"]
            print(f"train step optimizer: transformers {hf['optimizer']}, phi3_lightning {ours['optimizer']}")
            if args.compile:
                comp = run_side("ours", "train", d, args, compile_=True)
                rows.append(("train tokens/s, ours compiled", hf["tokens_per_s"], comp["tokens_per_s"]))
                ratios["train_speed_compiled"] = comp["tokens_per_s"] / hf["tokens_per_s"]
            if args.checkpointing:
                ck = run_side("ours", "train", d, args, checkpointing=True)
                rows.append(("train tokens/s, ours + activation checkpointing", hf["tokens_per_s"], ck["tokens_per_s"]))
                rows.append(("train peak memory MB, ours + activation checkpointing", hf["peak_mb"], ck["peak_mb"]))
                ratios["train_speed_checkpointing"] = ck["tokens_per_s"] / hf["tokens_per_s"]
                ratios["train_memory_checkpointing"] = ck["peak_mb"] / hf["peak_mb"]
        if "generate" in args.tasks:
            hf, ours = both("generate")
            rows.append(("greedy generate new tokens/s", hf["tokens_per_s"], ours["tokens_per_s"]))
            ratios["generate_speed"] = ours["tokens_per_s"] / hf["tokens_per_s"]
            ratios["generate_same_tokens"] = float(hf["tokens"] == ours["tokens"])
        print(
            f"\n| measure (batch {args.batch}x{args.seq}; gen 1x{args.prompt}+{args.new_tokens}) "
            f"| transformers | phi3_lightning | ratio |"
        )
        print("|---|---:|---:|---:|")
        for name, a, b in rows:
            print(f"| {name} | {a:,.1f} | {b:,.1f} | {b / a:.2f}x |")
        print("\nRATIOS " + " ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
