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


def _section(out: str, n: int) -> str:
    """The text of section ``n`` of gpu_bench's output (up to the next section header)."""
    m = re.search(rf"^## {n}\. .*?(?=^## {n + 1}\. |\Z)", out, re.M | re.S)
    assert m, f"section {n} missing:\n{out[-3000:]}"
    return m.group(0)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _rows(text: str, *prefix: str) -> list[list[str]]:
    return [
        _cells(line)
        for line in text.splitlines()
        if line.startswith("|") and _cells(line)[: len(prefix)] == list(prefix)
    ]


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_gpu_bench_falls_back_to_its_correctness_check_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA: the script would run its full GPU timing here")
    out = _run("benchmarks/gpu_bench.py")
    gate = _section(out, 1)
    verdicts = {r[0]: r[-1] for r in _rows(gate) if r[1] == "none" and "unavailable" not in r[2]}
    assert {"eager", "sdpa"} <= set(verdicts) and set(verdicts.values()) == {"yes"}, out
    assert "timing skipped" in out and "## 3." not in out


def test_gpu_bench_smoke_runs_every_section_on_cpu(tmp_path):
    """--smoke: every section runs on a tiny model (CUDA-only rows say unavailable), the table file is written."""
    from phi3_lightning import get_preset

    table = tmp_path / "bench.md"
    out = _run("benchmarks/gpu_bench.py", "--smoke", "--out", str(table), "--log-dir", str(tmp_path))
    text = table.read_text()
    for n, title in enumerate(
        [
            "Environment",
            "Correctness gate",
            "Attention alone",
            "Training step grid",
            "transformers side by side",
            "LoRA real-size step",
            "Lightning path",
        ]
    ):
        assert f"## {n}. {title}" in out and f"## {n}. {title}" in text
    env = _section(out, 0)
    assert _rows(env, "device")[0][1] == "CPU" and _rows(env, "MFU peak") and "6N + 12·L·H·d·T" in env
    assert _number(_rows(env, "measured matmul 256^3 float32")[0][1].split()[0]) > 0
    gate = _section(out, 1)
    assert [r[-1] for r in _rows(gate, "eager", "none") + _rows(gate, "sdpa", "none")] == ["yes", "yes"]
    assert "unavailable" in _rows(gate, "flash_attention_2", "none")[0][2]
    assert "all settings agree with fp32" in gate
    attn = _section(out, 2)
    assert _number(_rows(attn, "sdpa")[0][3]) > 0 and "unavailable" in _rows(attn, "flex")[0][2]
    grid = _section(out, 3)
    rows = [r for r in _rows(grid) if r[0] in ("sdpa", "flash_attention_2", "flex")]
    labels = [tuple(r[:3]) for r in rows]
    assert len(labels) == len(set(labels)) == 18  # 3 attention x 2 compile x 3 fused, each once
    timed = [r for r in rows if "unavailable" not in r[3]]
    assert [tuple(r[:3]) for r in timed] == [("sdpa", "off", "none")] and _number(timed[0][3]) > 0
    hf = _section(out, 4)
    assert _number(_rows(hf, "transformers", "sdpa", "off", "none")[0][4]) > 0
    assert _number(_rows(hf, "ours", "sdpa", "off", "none")[0][4]) > 0
    assert re.search(r"x transformers' tokens/s", hf)
    lora = _section(out, 5)
    cfg = get_preset("tiny")
    per_layer = sum(  # r x in (A) + out x r (B) for qkv, o, gate_up, down
        16 * (i + o)
        for i, o in [
            (cfg.hidden_size, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_size),
            (cfg.num_attention_heads * cfg.head_size, cfg.hidden_size),
            (cfg.hidden_size, 2 * cfg.intermediate_size),
            (cfg.intermediate_size, cfg.hidden_size),
        ]
    )
    row = _rows(lora, "sdpa", "off", "none")[0]
    assert _number(row[3]) == cfg.num_hidden_layers * per_layer and row[4] == "yes" and _number(row[5]) > 0
    fit = _section(out, 6)
    assert _number(_rows(fit, "fit (Lightning)")[0][4]) > 0, fit
    assert _number(_rows(fit, "bare step")[0][4]) > 0
    assert re.search(r"Lightning / bare tokens/s: \d", fit)
    assert "throughput:" in (tmp_path / "gpu_fit.log").read_text()
    assert "FAILED" not in out and "total wall time" in out


def test_compare_transformers_names_each_sides_optimizer_and_can_give_both_the_fused_one():
    # the train ratio compared our fused AdamW with transformers' for-each AdamW without saying so
    pytest.importorskip("transformers")
    out = _run("benchmarks/compare_transformers.py", "--quick", "--tasks", "train")
    assert "train step optimizer: transformers default (for-each) AdamW, phi3_lightning fused AdamW" in out
    out = _run("benchmarks/compare_transformers.py", "--quick", "--tasks", "train", "--hf-fused-adamw")
    assert "train step optimizer: transformers fused AdamW, phi3_lightning fused AdamW" in out


def test_decode_floor_quick_compares_equal_tokens_and_reports_consistent_shares():
    """benchmarks/decode_floor.py (the README's reason the generation target is out of reach): both sides generate the
    same tokens, and the printed shares and ratio follow from the printed per-token times."""
    pytest.importorskip("transformers")
    out = _run("benchmarks/decode_floor.py", "--quick")
    assert "same tokens on both sides: True" in out, out
    floor = float(re.search(r"floor \(those matrix-vector products alone\): ([\d.]+) ms", out).group(1))
    per = {k: float(re.search(rf"^{k}: ([\d.]+) ms per token", out, re.M).group(1)) for k in ("ours", "transformers")}
    shares = {k: int(re.search(rf"^{k}: .* (\d+)% of the floor", out, re.M).group(1)) for k in per}
    assert 0 < floor and all(v > 0 for v in per.values())
    for k in per:  # printed rounded: a share within a few points of floor / time
        assert abs(shares[k] - 100 * floor / per[k]) <= 5 + 100 * 0.01 / per[k], (k, out)
    ratio = float(re.search(r"ours / transformers speed: ([\d.]+)x", out).group(1))
    assert abs(ratio - per["transformers"] / per["ours"]) <= 0.02 + 0.01 / per["ours"], out
