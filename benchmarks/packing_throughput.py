"""Real-token training throughput: packed rows vs padded batches, on the embedded corpora.

For each corpus the same documents are fed twice to the same tiny causal LM (fp32, SDPA, fused AdamW):
padded batches (dynamic padding to the longest example, length-grouping off — what a plain DataLoader gives) and
packed rows (``position_ids`` restarting per document). Real tokens/s counts only ``attention_mask == 1`` slots;
the medians over timed steps are reported. Usage:

    python benchmarks/packing_throughput.py                # ~2 minutes on 2 cores
    python benchmarks/packing_throughput.py --steps 3      # quicker

Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from phi3_lightning import Phi3ForCausalLM, get_preset  # noqa: E402
from phi3_lightning.data.collate import PaddingCollator  # noqa: E402
from phi3_lightning.data.embedded import load_embedded  # noqa: E402
from phi3_lightning.data.packing import pack_documents  # noqa: E402
from phi3_lightning.data.tokenizer import ByteTokenizer  # noqa: E402


def corpus_documents(kind: str, tok: ByteTokenizer, limit: int) -> list[list[int]]:
    """Token lists of one embedded corpus, used as plain LM documents."""
    records = load_embedded(kind, progress=False)
    docs = []
    for r in records:
        if "text" in r:
            text = r["text"]
        elif "words" in r:
            text = " ".join(r["words"])
        else:
            continue
        ids = tok.encode(text) + [tok.eos_token_id]
        if len(ids) > 1:
            docs.append(ids)
        if len(docs) >= limit:
            break
    return docs


def padded_batches(docs, max_len, rows_per_batch, pad_id):
    coll = PaddingCollator(pad_token_id=pad_id, max_length=max_len)
    docs = [d[:max_len] for d in docs]
    out = []
    for i in range(0, len(docs) - rows_per_batch + 1, rows_per_batch):
        out.append(coll([{"input_ids": d, "labels": d} for d in docs[i : i + rows_per_batch]]))
    return out


def packed_batches(docs, max_len, rows_per_batch, pad_id):
    packed = pack_documents(docs, row_length=max_len, pad_token_id=pad_id, split_long=True)
    return [{k: getattr(packed, k)[i : i + rows_per_batch] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
            for i in range(0, len(packed) - rows_per_batch + 1, rows_per_batch)]


def measure(model, opt, batches, steps, warmup):
    times, real = [], []
    for i, b in enumerate(batches[: warmup + steps]):
        t0 = time.perf_counter()
        loss = model(b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                     labels=b["labels"], return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            real.append(int(b["attention_mask"].sum()))
    per_step = [r / t for r, t in zip(real, times)]
    slots = sum(b["input_ids"].numel() for b in batches[warmup : warmup + steps])
    return statistics.median(per_step), sum(real) / slots


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--rows", type=int, default=4, help="rows per batch (padded examples or packed rows)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--corpora", default="lm,code_cls,token_types")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    tok = ByteTokenizer()
    cfg = get_preset("tiny", max_position_embeddings=max(1024, args.max_len))
    print(f"tiny causal LM ({cfg.num_parameters() / 1e6:.1f}M params), fp32 SDPA, {args.rows} rows x "
          f"{args.max_len} tokens per step, medians of {args.steps} steps, torch {torch.__version__}, "
          f"{os.cpu_count()} cores\n")
    print("| corpus | padded: real-token fraction | padded real tok/s | packed: real-token fraction | "
          "packed real tok/s | packed / padded |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in args.corpora.split(","):
        docs = corpus_documents(kind, tok, limit=4000)
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(docs), generator=g).tolist()
        docs = [docs[i] for i in order]
        results = []
        for make in (padded_batches, packed_batches):
            model = Phi3ForCausalLM(cfg)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
            batches = make(docs, args.max_len, args.rows, tok.pad_token_id)
            results.append(measure(model, opt, batches, args.steps, args.warmup))
        (pad_tps, pad_eff), (pack_tps, pack_eff) = results
        print(f"| {kind} | {pad_eff:.1%} | {pad_tps:,.0f} | {pack_eff:.1%} | {pack_tps:,.0f} | "
              f"{pack_tps / pad_tps:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
