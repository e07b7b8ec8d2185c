"""Host memory of loading a full-size checkpoint: peak RSS of ``from_pretrained`` vs the size of the weights.

    python benchmarks/load_memory.py                       # phi-3-mini-4k, bf16, 5 GB shards (like the Hub's)
    python benchmarks/load_memory.py --shard-size 2GB --keep /data/phi3-random

1. Writes a *random* checkpoint of the preset's exact shapes to a temporary directory as sharded bf16
   safetensors + index + config.json. No fp32 copy of the model ever exists: the tensor names and shapes come from
   a model built on the meta device, and each shard's tensors are drawn directly in bf16 and written, one shard
   in memory at a time.
2. In a fresh subprocess imports the package, runs ``Phi3ForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)``
   and reports the process's own peak RSS (VmHWM) and its RSS split into anonymous and file-backed pages
   (/proc/self/status) -- right after loading, and again after every weight has been read once (what the first
   forward or ``.to("cuda")`` does) -- against the bytes of the loaded parameters.
3. Deletes the directory (unless ``--keep``).

Needs about 8 GB of disk and, for the loader, about 1.1x the weights of RAM.

What it showed (2 CPU cores, 24 GiB RAM, safetensors 0.8, torch 2.13): loading bf16 shards as bf16 is zero-copy --
safetensors hands out tensors that are private memory maps of the shard files, so ``from_pretrained`` itself adds
~0.1 GB, the pages come in on first use, and once every weight has been read RSS is 1.04x the weights, almost all
of it file-backed page cache (shared with any other process that maps the same files, e.g. the ranks of one node).
Loading as float32 converts every tensor (anonymous memory) while the shard being read stays mapped: peak 1.20x
the fp32 weights. ``ru_maxrss`` is not used: Linux carries the parent's RSS at fork into the child's ru_maxrss,
which made a first version of this script report the writer's 5 GB as the loader's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GB = 10**9
GiB = 2**30


def write_random_checkpoint(
    path: Path, preset: str, shard_size: int, dtype: torch.dtype = torch.bfloat16, std: float = 0.02, seed: int = 0
) -> int:
    """Random checkpoint with the preset's tensor names/shapes, written shard by shard. Returns total bytes."""
    from safetensors.torch import save_file

    from phi3_lightning.model import Phi3ForCausalLM, get_preset
    from phi3_lightning.model.checkpoint import SAFE_INDEX

    cfg = get_preset(preset)
    with torch.device("meta"):
        meta = Phi3ForCausalLM(cfg, device=torch.device("meta"))
    specs = [
        (k, tuple(v.shape))
        for k, v in meta.state_dict().items()
        if not (cfg.tie_word_embeddings and k == "lm_head.weight")
    ]
    elt = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = elt * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=dtype)
            else:
                t = torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=gen)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {fname}", flush=True)
    (path / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = cfg.to_dict()
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return total


_LOADER = r"""
import json, sys, time
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out
import torch
from phi3_lightning.model import Phi3ForCausalLM
dtype = getattr(torch, sys.argv[2])
before = status()
t0 = time.perf_counter()
model = Phi3ForCausalLM.from_pretrained(sys.argv[1], dtype=dtype)
seconds = time.perf_counter() - t0
loaded = status()
seen, weights = set(), 0
for p in model.parameters():
    if id(p) not in seen:
        seen.add(id(p)); weights += p.numel() * p.element_size()
weights += sum(b.numel() * b.element_size() for b in model.buffers())
# Read every weight once (a reduction, no full-size temporary), as the first forward or .to("cuda") would.
t1 = time.perf_counter()
with torch.no_grad():
    for p in model.parameters():
        p.sum()
touch_seconds = time.perf_counter() - t1
touched = status()
print(json.dumps({"rss_before": before["VmRSS"], "peak_load": loaded["VmHWM"], "rss_loaded": loaded["VmRSS"],
                  "anon_loaded": loaded["RssAnon"], "file_loaded": loaded["RssFile"], "peak_touched": touched["VmHWM"],
                  "rss_touched": touched["VmRSS"], "anon_touched": touched["RssAnon"], "file_touched": touched["RssFile"],
                  "weights": weights, "seconds": seconds, "touch_seconds": touch_seconds,
                  "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""


def measure_load(path: Path, dtype: str = "bfloat16") -> dict:
    """Load in a fresh interpreter. Peaks are /proc's VmHWM (this process's own high-water mark): ``ru_maxrss``
    would be wrong here, because Linux carries the parent's RSS at fork into the child's ru_maxrss."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "-c", _LOADER, str(path), dtype], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"loader failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(r: dict, preset: str, dtype: str) -> None:
    w = r["weights"]
    print()
    print(
        f"Phi3ForCausalLM.from_pretrained({preset}, dtype=torch.{dtype}) in a fresh process: {r['seconds']:.1f} s, "
        f"then every weight read once: {r['touch_seconds']:.1f} s"
    )
    rows = [
        ("loaded weights (params + buffers)", w),
        ("RSS after imports (baseline)", r["rss_before"]),
        ("peak RSS during from_pretrained", r["peak_load"]),
        ("RSS after from_pretrained", r["rss_loaded"]),
        ("  anonymous", r["anon_loaded"]),
        ("  file-backed (mapped shard pages)", r["file_loaded"]),
        ("peak RSS after reading every weight", r["peak_touched"]),
        ("RSS after reading every weight", r["rss_touched"]),
        ("  anonymous", r["anon_touched"]),
        ("  file-backed (mapped shard pages)", r["file_touched"]),
    ]
    for name, b in rows:
        print(f"  {name:<40}{b / GB:>8.2f} GB {b / GiB:>8.2f} GiB")
    for label, key in (("peak during load", "peak_load"), ("peak once every weight is read", "peak_touched")):
        print(
            f"  {label + ' / weights':<40}{r[key] / w:>8.2f} x   (minus baseline: {(r[key] - r['rss_before']) / w:.2f} x)"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="phi-3-mini-4k")
    ap.add_argument("--shard-size", default="5GB", help="max bytes per safetensors shard (the Hub uses ~5GB)")
    ap.add_argument("--keep", default=None, help="write here and keep the checkpoint instead of a temp dir")
    ap.add_argument(
        "--load-dtypes",
        default="bfloat16",
        help="comma-separated dtypes to load as, e.g. bfloat16,float32 (float32 needs ~16 GB RAM)",
    )
    ap.add_argument("--dir", default=None, help="parent of the temporary directory (default: the system temp)")
    args = ap.parse_args(argv)
    from phi3_lightning.model.checkpoint import parse_size

    path = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="phi3-load-", dir=args.dir))
    path.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        print(f"writing a random {args.preset} checkpoint (bf16, shards <= {args.shard_size}) to {path}", flush=True)
        total = write_random_checkpoint(path, args.preset, parse_size(args.shard_size))
        print(f"  {total / GB:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
        results = {d: measure_load(path, d) for d in args.load_dtypes.split(",")}
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
    for dtype, r in results.items():
        report(r, args.preset, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
