"""The benchmark scripts run end to end (tiny settings); their timings are not asserted, their checks are."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_compare_transformers_quick_runs_and_generates_the_same_tokens():
    pytest.importorskip("transformers")
    out = _run("benchmarks/compare_transformers.py", "--quick")
    ratios = dict(kv.split("=") for kv in re.search(r"^RATIOS (.*)$", out, re.M).group(1).split())
    assert set(ratios) == {"train_speed", "train_memory", "generate_speed", "generate_same_tokens"}
    assert float(ratios["generate_same_tokens"]) == 1.0  # greedy tokens identical to transformers' generate
    assert all(float(v) > 0 for v in ratios.values())
    assert "| train step tokens/s |" in out and "| greedy generate new tokens/s |" in out


def test_packing_throughput_runs_and_orders_the_real_token_fractions():
    out = _run(
        "benchmarks/packing_throughput.py",
        "--steps",
        "1",
        "--max-len",
        "128",
        "--rows",
        "2",
        "--corpora",
        "token_types",
    )
    row = next(line for line in out.splitlines() if line.startswith("| token_types |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    fix, longest, packed = (float(x.rstrip("%")) for x in cells[2].split(" / "))
    assert fix <= longest <= packed <= 100.0  # padding to max_length wastes the most, packing the least
    assert int(cells[1]) > 2


def test_gpu_bench_falls_back_to_its_correctness_check_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA: the script would run its full GPU timing here")
    out = _run("benchmarks/gpu_bench.py")
    rows = [
        line
        for line in out.splitlines()
        if line.startswith("| ") and "unavailable" not in line and not line.startswith("| backend")
    ]
    checked = {line.split("|")[1].strip(): line.rstrip(" |").rsplit("|", 1)[-1].strip() for line in rows}
    assert {"eager", "sdpa"} <= set(checked) and set(checked.values()) == {"yes"}, out
    assert "timing skipped" in out
