"""Real-token training throughput: packed rows vs padded batches, on the embedded corpora.

For each corpus the same documents (split into pieces of at most ``--max-len`` tokens, as the packer does) are
fed to the same tiny causal LM (fp32, SDPA, fused AdamW), ``--rows`` rows per step, three ways:
  * padded to ``--max-len`` (``padding="max_length"``: fixed-shape batches),
  * padded to the longest example of each batch (dynamic padding, length-grouping off: a plain DataLoader),
  * packed rows (``position_ids`` restarting per document, attention per document).
Real tokens/s = real tokens of all documents / total time of all their steps (after one warm-up step), so every
column processes exactly the same tokens. Usage:

    python benchmarks/packing_throughput.py                # ~2 minutes on 2 cores
    python benchmarks/packing_throughput.py --steps 3      # quicker

Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from phi3_lightning import Phi3ForCausalLM, get_preset  # noqa: E402
from phi3_lightning.data.collate import PaddingCollator  # noqa: E402
from phi3_lightning.data.embedded import load_embedded  # noqa: E402
from phi3_lightning.data.packing import pack_documents, piece_bounds  # noqa: E402
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


def split_docs(docs, max_len):
    """Documents cut as the packer cuts them (``piece_bounds``); pieces of one token have no target and are dropped."""
    return [d[s:e] for d in docs for s, e in piece_bounds(len(d), max_len) if e - s > 1]


def padded_batches(docs, max_len, rows_per_batch, pad_id, to_max_length=False):
    coll = PaddingCollator(pad_token_id=pad_id, pad_to_multiple_of=max_len if to_max_length else None)
    out = []
    for i in range(0, len(docs), rows_per_batch):
        out.append(coll([{"input_ids": d, "labels": d} for d in docs[i : i + rows_per_batch]]))
    return out


def packed_batches(docs, max_len, rows_per_batch, pad_id):
    packed = pack_documents(docs, row_length=max_len, pad_token_id=pad_id, split_long=True)
    return [
        {
            k: getattr(packed, k)[i : i + rows_per_batch]
            for k in ("input_ids", "attention_mask", "position_ids", "labels")
        }
        for i in range(0, len(packed), rows_per_batch)
    ]


def measure(model, opt, batches, warmup):
    """Real tokens/s over all batches after `warmup` extra steps (on the first batch), and the real fraction."""

    def step(b):
        model(
            b["input_ids"],
            attention_mask=b["attention_mask"],
            position_ids=b["position_ids"],
            labels=b["labels"],
            return_logits=False,
        ).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step(batches[0])
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    elapsed = time.perf_counter() - t0
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    slots = sum(b["input_ids"].numel() for b in batches)
    return real / elapsed, real / slots


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--rows", type=int, default=4, help="rows per batch (padded examples or packed rows)")
    p.add_argument(
        "--steps", type=int, default=6, help="token budget: documents are taken until they fill this many packed steps"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--corpora", default="lm,code_cls,token_types")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    tok = ByteTokenizer()
    cfg = get_preset("tiny", max_position_embeddings=max(1024, args.max_len))
    print(
        f"tiny causal LM ({cfg.num_parameters() / 1e6:.1f}M params), fp32 SDPA, {args.rows} rows per step, "
        f"rows of up to {args.max_len} tokens, the same documents (~{args.steps} packed steps of tokens) in every "
        f"column, torch {torch.__version__}, {os.cpu_count()} cores\n"
    )
    print(
        "| corpus | docs | real fraction: max_length / longest / packed | real tok/s: max_length | longest | "
        "packed | packed / max_length | packed / longest |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    budget = args.steps * args.rows * args.max_len
    for kind in args.corpora.split(","):
        docs = split_docs(corpus_documents(kind, tok, limit=4000), args.max_len)
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(docs), generator=g).tolist()
        chosen, total = [], 0
        for i in order:
            if total >= budget:
                break
            chosen.append(docs[i])
            total += len(docs[i])
        results = []
        makers = (lambda *a: padded_batches(*a, to_max_length=True), padded_batches, packed_batches)
        for make in makers:
            torch.manual_seed(0)
            model = Phi3ForCausalLM(cfg)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
            batches = make(chosen, args.max_len, args.rows, tok.pad_token_id)
            results.append(measure(model, opt, batches, args.warmup))
        (fix_tps, fix_eff), (pad_tps, pad_eff), (pack_tps, pack_eff) = results
        print(
            f"| {kind} | {len(chosen)} | {fix_eff:.1%} / {pad_eff:.1%} / {pack_eff:.1%} | {fix_tps:,.0f} | "
            f"{pad_tps:,.0f} | {pack_tps:,.0f} | {pack_tps / fix_tps:.2f}x | {pack_tps / pad_tps:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
