"""Time of one training step (forward + backward) with no / full / selective activation checkpointing, on CPU.

```
python benchmarks/checkpointing_cpu.py --preset small-bench --batch-size 2 --seq-len 512 --rounds 5
```

The three settings run alternately (round-robin, after one warm-up step each) on the same model and batch; the
table gives the median step time of each and its ratio to no checkpointing. A CPU number: elementwise work weighs
more here next to the matmuls than on a GPU, so it says which way the costs go, not the GPU's ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from phi3_lightning.model import get_preset
from phi3_lightning.model.heads import Phi3ForCausalLM

SETTINGS = ("none", "full", "selective")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small-bench")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--attn-implementation", default="sdpa")
    args = ap.parse_args()
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--rounds", args.rounds)):
        if value < 1:
            ap.error(f"{flag} {value}: use a positive integer")
    torch.manual_seed(0)
    model = Phi3ForCausalLM(get_preset(args.preset), attn_implementation=args.attn_implementation).train()
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len))

    def step(setting: str) -> float:
        if setting == "none":
            model.gradient_checkpointing_disable()
        else:
            model.gradient_checkpointing_enable(selective=setting == "selective")
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(ids, labels=ids, return_logits=False).loss.backward()
        return time.perf_counter() - t0

    for s in SETTINGS:  # warm-up
        step(s)
    times: dict[str, list[float]] = {s: [] for s in SETTINGS}
    load0 = os.getloadavg()[0]
    for _ in range(args.rounds):
        for s in SETTINGS:
            times[s].append(step(s))
    load1 = os.getloadavg()[0]
    base = statistics.median(times["none"])
    print(
        f"{args.preset}, {args.batch_size} x {args.seq_len} tokens, {args.attn_implementation}, fp32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, load average {load0:.2f} -> {load1:.2f}, "
        f"median of {args.rounds} alternating steps"
    )
    print(f"{'checkpointing':<14}{'step s':>10}{'vs none':>10}")
    for s in SETTINGS:
        m = statistics.median(times[s])
        print(f"{s:<14}{m:>10.3f}{m / base:>10.3f}")


if __name__ == "__main__":
    main()
