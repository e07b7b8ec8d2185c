"""How far greedy decoding on CPU is from its weight-read floor, ours and transformers' side by side.

Each decoded token must read every non-embedding weight once (matrix-vector products); the time of those products
alone is the floor. The script times that floor, our ``generate`` and transformers' ``generate`` on the same saved
random checkpoint, alternating the three over rounds, and prints per-token medians, the share of the floor each
side reaches and the ratio of the two:

    python benchmarks/decode_floor.py                # small-bench (384 wide, 4 layers, 32,064 vocab), fp32
    python benchmarks/decode_floor.py --quick        # tiny preset, a smoke run

transformers is only the comparison here, as in compare_transformers.py.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small-bench")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians over them)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny preset, 8 new tokens, 2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.new_tokens, args.rounds = "tiny", 8, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from phi3_lightning import Phi3ForCausalLM, get_preset

    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        Phi3ForCausalLM(cfg).save_pretrained(d)
        ours = Phi3ForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
        hf = transformers.Phi3ForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32).eval()
    weights = [p.detach() for n, p in ours.named_parameters() if p.dim() == 2 and "embed_tokens" not in n]
    if cfg.tie_word_embeddings:  # the tied lm_head is read for every token too
        weights.append(ours.lm_head.weight.detach())
    inputs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt))
    n = args.new_tokens

    @torch.no_grad()
    def floor() -> None:
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    @torch.no_grad()
    def gen_ours() -> torch.Tensor:
        return ours.generate(prompt, max_new_tokens=n, eos_token_id=[])

    @torch.no_grad()
    def gen_hf() -> torch.Tensor:
        return hf.generate(
            prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )

    same = torch.equal(gen_ours(), gen_hf())
    floor()
    sides = {"floor": floor, "ours": gen_ours, "transformers": gen_hf}
    times: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            t = time.perf_counter()
            sides[name]()
            dt = time.perf_counter() - t
            times[name].append(dt if name == "floor" else dt / n)  # per decoded token (the prefill spread over them)
    med = {k: statistics.median(v) for k, v in times.items()}
    mb = sum(w.numel() * w.element_size() for w in weights) / 1e6
    print(
        f"{args.preset}, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, 1 x ({args.prompt} + {n}) "
        f"tokens, medians of {args.rounds} alternating rounds; same tokens on both sides: {same}"
    )
    print(
        f"weights read per token: {mb:.1f} MB; floor (those matrix-vector products alone): {med['floor'] * 1e3:.2f} ms"
    )
    for k in ("ours", "transformers"):
        print(
            f"{k}: {med[k] * 1e3:.2f} ms per token ({1 / med[k]:.0f} tokens/s), {med['floor'] / med[k]:.0%} of the floor"
        )
    ratio = med["transformers"] / med["ours"]
    print(
        f"ours / transformers speed: {ratio:.2f}x; 1.5x would need {med['transformers'] / 1.5 * 1e3:.2f} ms per token"
    )
    return {"ratio": ratio, "same": float(same), **med}


if __name__ == "__main__":
    main()
