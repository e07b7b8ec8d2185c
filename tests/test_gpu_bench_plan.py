"""benchmarks/gpu_bench.py's time plan, checked without a GPU: every timed part is replaced by a stub that advances a
fake clock by what it would cost on the GPU, so the order in which main() spends its budget (and its bookkeeping of
rows that are unavailable, deferred or skipped) runs exactly as it will in the one device call."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def bench(monkeypatch):
    name = "gpu_bench_plan_under_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _stub(bench, monkeypatch, costs: dict, unavailable=("liger",), wrong=()):
    """Replace every section by a stub costing ``costs[...]`` fake seconds; returns the log of what ran, in order.
    ``wrong``: (kind, name) pairs the stubbed correctness gate finds wrong."""
    clock = [0.0]
    ran: list[str] = []
    monkeypatch.setattr(bench, "time", SimpleNamespace(time=lambda: clock[0], perf_counter=lambda: clock[0]))

    def spend(what: str, sec: float) -> None:
        ran.append(what)
        clock[0] += sec

    def environment(args, rep, device, cuda):
        rep.header(0)
        spend("env", costs["env"])
        return 989.0

    def correctness(args, rep, device, cuda):
        rep.header(1)
        spend("gate", costs["gate"])
        bench.GATE_FAILED.clear()
        bench.GATE_FAILED.update({k: "errors 3e-01 vs tolerance 0.05" for k in wrong})
        return not wrong

    def attention_alone(args, rep, device, cuda, budget, reserve):
        rep.header(2)
        spend("attention", costs["attention"])

    def grid_row(args, s, rep, device, cuda, peak, results):
        sec = costs["compiled" if s.compiled else "eager"]
        spend(s.label, sec)
        results[s] = {"tok_s": 1000.0 + len(ran), "mfu": 0.4, "wall": sec, "sec": 1.0, "first": 1.0, "peak": "-"}
        rep.log(3, f"| {s.label} | 1,000 | 40.0% | - | 1 | 1 | - | {sec:.0f} |")

    def section(name):
        def run(*a, **k):
            spend(name, costs[name])

        return run

    monkeypatch.setattr(bench, "environment", environment)
    monkeypatch.setattr(bench, "correctness", correctness)
    monkeypatch.setattr(bench, "attention_alone", attention_alone)
    monkeypatch.setattr(bench, "grid_row", grid_row)
    monkeypatch.setattr(bench, "hf_side_by_side", section("hf"))
    monkeypatch.setattr(bench, "lora_rows", section("lora"))
    monkeypatch.setattr(bench, "lightning_path", section("fit"))
    # main() plans for a CUDA device (no --smoke); nothing touches it, every part that would is a stub
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    # as on a GPU without the liger wheel: those rows are unavailable, every other one can run (bench's own
    # setting_unavailable decides, on what these stubs say)
    monkeypatch.setattr(bench, "fused_status", lambda name, device: (name not in unavailable, "not installed"))
    monkeypatch.setattr(bench, "backend_available", lambda name, device=None, dtype=None: (True, "stub"))
    return ran


def _grid_lines(out: str) -> dict[str, list[str]]:
    grid = out.split("## 3.")[1].split("## 4.")[0]
    lines: dict[str, list[str]] = {}
    for line in grid.splitlines():
        m = re.match(r"\| (\w+) \| (on|off) \| (\w+) \| (.*)", line)
        if m:
            lines.setdefault(f"{m[1]} | {m[2]} | {m[3]}", []).append(m[4])
    return lines


# what each part costs on the H200 by the script's own estimates (bench.EST), in fake seconds
COSTS = dict(env=5, gate=65, attention=45, eager=15, compiled=50, hf=40, lora=15, fit=160)


def test_first_grid_rows_run_before_sections_4_to_6_even_after_an_unavailable_row(bench, monkeypatch, tmp_path):
    """An unavailable row (liger without its wheel) before a runnable one used to crash the grid (KeyError 'wall'
    in the row estimate); and the reserve for sections 4-6 used to skip every compiled row (the expected best) for
    good. Here the first four runnable rows, three of them compiled, all run before section 4."""
    ran = _stub(bench, monkeypatch, COSTS)
    assert bench.main(["--budget-s", "400", "--out", str(tmp_path / "t.md")]) == 0
    out = (tmp_path / "t.md").read_text()  # the table file: sections in order
    first = ["sdpa | off | none", "sdpa | on | none", "flash_attention_2 | on | none", "flex | on | none"]
    assert ran[: 3 + len(first)] == ["env", "gate", "attention", *first]
    assert ran.index("hf") == 3 + len(first) and "lora" in ran
    lines = _grid_lines(out)
    assert len(lines) == 18 and all(len(v) == 1 for v in lines.values()), lines  # every setting exactly once
    assert lines["flash_attention_2 | on | liger"][0].startswith("unavailable: not installed")


def test_a_first_row_that_does_not_fit_is_retried_after_sections_4_to_6(bench, monkeypatch, tmp_path):
    ran = _stub(bench, monkeypatch, COSTS)
    assert bench.main(["--budget-s", "340", "--out", str(tmp_path / "t.md")]) == 0
    out = (tmp_path / "t.md").read_text()
    # 340 - 65 (gate) - 5 - 45 - 15 - 50 - 50 = 110 s left: flex | on (50 s) would leave less than the 65 s that
    # sections 4 and 5 need, so it waits; after them (55 s left) it is the first row tried, before rows never tried
    assert ran[3:9] == [
        "sdpa | off | none",
        "sdpa | on | none",
        "flash_attention_2 | on | none",
        "hf",
        "lora",
        "flex | on | none",
    ]
    assert "fit" not in ran  # section 6 needs its fit and its bare step (165 s): skipped, and said so
    assert re.search(r"## 6\. Lightning path\s+skipped: time budget", out)
    lines = _grid_lines(out)
    assert len(lines) == 18 and all(len(v) == 1 for v in lines.values()), lines
    assert lines["flex | on | none"][0].startswith("1,000")
    assert lines["flash_attention_2 | off | none"][0].startswith("skipped: time budget")


def test_row_estimate_reads_only_rows_that_ran(bench):
    S = bench.Setting
    results = {
        S("sdpa", True, "liger"): {"unavailable": "not installed"},
        S("flex", True, "none"): {"skipped": True},
        S("sdpa", True, "none"): {"failed": "OutOfMemoryError: ...", "wall": 3.0},
        S("flash_attention_2", True, "none"): {"tok_s": 1.0, "wall": 70.0},
        S("sdpa", False, "none"): {"tok_s": 1.0, "wall": 9.0},
    }
    assert bench.row_estimate(S("flex", True, "liger"), results) == 70.0
    assert bench.row_estimate(S("flex", False, "none"), results) == 9.0
    assert bench.row_estimate(S("flex", False, "none"), {}) == bench.EST["eager_row"]


def test_a_wrong_kernel_set_is_left_out_and_the_rest_is_timed(bench, monkeypatch, tmp_path):
    """One wrong setting in the gate (here flex) used to stop every timing of the call; now only the rows that use
    it are left out (saying why), everything else is timed, and the exit code still says something was wrong."""
    ran = _stub(bench, monkeypatch, COSTS, unavailable=(), wrong=[("attention", "flex")])
    assert bench.main(["--budget-s", "2000", "--out", str(tmp_path / "t.md")]) == 1
    out = (tmp_path / "t.md").read_text()
    assert "CORRECTNESS FAILED for attention flex: the settings using them are not timed" in out
    lines = _grid_lines(out)
    assert len(lines) == 18 and all(len(v) == 1 for v in lines.values()), lines
    flex = [k for k in lines if k.startswith("flex")]
    assert len(flex) == 6 and all(lines[k][0].startswith("unavailable: failed the correctness gate") for k in flex)
    timed = [k for k in lines if lines[k][0].startswith("1,000")]
    assert len(timed) == 12 and set(timed) <= set(ran) and not any(k.startswith("flex") for k in ran)
    assert {"hf", "lora", "fit"} <= set(ran)


@pytest.mark.parametrize("baseline", ["eager", "sdpa"])
def test_a_wrong_baseline_stops_everything(bench, monkeypatch, tmp_path, baseline):
    ran = _stub(bench, monkeypatch, COSTS, wrong=[("attention", baseline)])
    assert bench.main(["--budget-s", "2000", "--out", str(tmp_path / "t.md")]) == 1
    assert ran == ["env", "gate"]
    assert "nothing is timed" in (tmp_path / "t.md").read_text()


def test_memory_lean_row_recomputes_the_fewest_layers_that_reach_the_goal(bench):
    """Section 4's memory-lean row: optimizer in backward + the cheapest checkpointing (selective, then every n-th
    layer for n = 8, 4, 2, 1) the planner predicts for <= 0.7x transformers' measured peak; none when the fastest row
    already meets it."""
    cfg = bench.get_preset("phi-3-mini-4k")
    args = SimpleNamespace(seq=4096, batch=1)
    s = bench.Setting("flash_attention_2", True, "liger")
    order = ["selective", 8, 4, 2, 1]  # cheapest recompute first

    def choose(hf_peak, ours_peak):
        return bench.lean_checkpointing(args, cfg, s, {"peak": f"{hf_peak:.1f}"}, {"peak": f"{ours_peak:.1f}"}, True)

    n, why = choose(50.0, 34.0)
    assert n is None and "not needed" in why
    chosen = {}
    for hf_peak in (30.0, 40.0, 46.0, 52.0, 57.0):
        n, why = choose(hf_peak, 42.0)
        predicted = float(re.search(r"predicted ([\d.]+) GiB", why).group(1))
        assert n == 1 or predicted <= 0.97 * 0.7 * hf_peak, why
        chosen[hf_peak] = order.index(n)
    # a looser goal never needs more recomputation; a goal out of reach falls back to every layer
    assert [chosen[k] for k in sorted(chosen)] == sorted(chosen.values(), reverse=True)
    assert chosen[30.0] == order.index(1) and chosen[57.0] == order.index("selective")
    assert bench.lean_checkpointing(args, cfg, s, None, {"peak": "42.0"}, True)[0] is None
    assert bench.lean_checkpointing(args, cfg, s, {"peak": "-"}, {"peak": "42.0"}, True)[0] is None
