"""compare-attention end to end on CPU (TensorBoard read back), the --check tolerance gate, and the flex backend."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from phi3_lightning import Phi3ForCausalLM
from phi3_lightning.compare import MEASURES, TOLERANCES, CompareConfig, build_parser, compare_attention, main
from phi3_lightning.compare.config import config_from_namespace
from phi3_lightning.compare.report import CHARTS, FWD_BWD_MEASURES, FWD_MEASURES
from phi3_lightning.model import BACKENDS, backends, get_preset
from phi3_lightning.model.backends import set_flash_kernels

from .model.reference_kernels import reference_flash_attn_func, reference_flash_attn_varlen_func

ROOT = Path(__file__).resolve().parents[1]
SEQ_LENS = [16, 40]
WINDOWS = [None, 8]
KINDS = ["padded", "packed"]


def _run_main(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def _settings():
    return [k if w is None else f"{k}_w{w}" for w in WINDOWS for k in KINDS]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One compare-attention run on a tiny GQA model: every backend (flash through its reference kernels)."""
    tmp = tmp_path_factory.mktemp("compare")
    cfg = {
        "preset": "tiny-gqa",  # 4 query / 2 kv heads of 32
        "device": "cpu",
        "dtype": "float32",
        "overrides": {"num_hidden_layers": 1},
        "backends": list(BACKENDS),
        "seq_lens": SEQ_LENS,
        "batch_size": 2,
        "batch_kinds": KINDS,
        "sliding_windows": WINDOWS,
        "warmup": 0,
        "repeats": 1,
        "num_threads": 1,  # tiny tensors gain nothing from more; keeps the test fast on a busy machine
        "log_dir": str(tmp / "logs"),
        "run_name": "tiny",
    }
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    set_flash_kernels((reference_flash_attn_func, reference_flash_attn_varlen_func))
    try:
        rc, out = _run_main(["--config", str(tmp / "cfg.yaml"), "--check"])
    finally:
        set_flash_kernels(None)
    return rc, out, _accumulators(tmp / "logs" / "tiny")


def _accumulators(run: Path) -> dict:
    """The run directory ("") and its per-backend runs ("<backend>"), read back as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for d in [run] + sorted(p for p in run.iterdir() if p.is_dir()):
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        acc.Reload()
        out["" if d == run else d.name] = acc
    return out


def test_compare_attention_logs_series_table_and_chart(tiny_run):
    rc, out, runs = tiny_run
    assert rc == 0, out
    acc = runs[""]
    assert set(runs) == {""} | set(BACKENDS)  # one run per backend: TensorBoard overlays them per measure
    summary = acc.Tensors("compare/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    for backend in BACKENDS:
        scalars = set(runs[backend].Tags()["scalars"])
        for setting in _settings():
            logged = {m for m in MEASURES if f"compare/{setting}/{m}" in scalars}
            assert set(FWD_MEASURES) <= logged, (backend, setting, logged)
            if backend != "flex":
                assert logged == set(MEASURES), (backend, setting)
            elif logged != set(MEASURES):  # flex without a CPU backward: said so, not silently dropped
                assert not logged & set(FWD_BWD_MEASURES)
                assert "not measured: flex forward+backward (all batches)" in summary
            for m in logged:  # one series per backend and measure, step = seq_len
                events = runs[backend].Scalars(f"compare/{setting}/{m}")
                assert [e.step for e in events] == SEQ_LENS
                assert all(math.isfinite(e.value) for e in events)
            for m in {"fwd_ms", "fwd_bwd_ms"} & logged:  # the spread beside every timed median
                q1 = [e.value for e in runs[backend].Scalars(f"compare_spread/{setting}/{m}/q1")]
                q3 = [e.value for e in runs[backend].Scalars(f"compare_spread/{setting}/{m}/q3")]
                med = [e.value for e in runs[backend].Scalars(f"compare/{setting}/{m}")]
                assert all(a <= b <= c for a, b, c in zip(q1, med, q3)), (backend, setting, m, q1, med, q3)
    # the summary table: as TensorBoard text and, identically, on the terminal
    table_lines = [line for line in summary.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + len(BACKENDS) * len(_settings()) * len(SEQ_LENS)
    assert "| batch" in table_lines[0] and "fwd+bwd ms" in table_lines[0] and "grad err" in table_lines[0]
    assert "| timing" in table_lines[0] and "| n " in table_lines[0]
    eager = [line for line in table_lines if "| eager " in line]
    assert eager and all(re.search(r"\| +[0-9.]+ \([0-9.]+-[0-9.]+\) \|", line) for line in eager)  # median (q1-q3)
    assert all(line in out for line in table_lines)
    assert "flash_attention_2*" in out and "substituted pure-torch kernels" in out
    # the chart
    (image,) = acc.Images("compare/chart")
    assert image.width > 300 and image.height > 200
    assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


def test_custom_scalars_layout_has_one_chart_per_measure_with_every_backend(tiny_run):
    from tensorboard.plugins.custom_scalar import layout_pb2

    _, _, runs = tiny_run
    (event,) = runs[""].Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    titles = [c.title for c in layout.category]
    assert titles[: len(_settings())] == [f"compare-attention {s}" for s in _settings()]  # per measure charts first
    for setting, category in zip(_settings(), layout.category):
        assert [c.title for c in category.chart] == [title for title, _ in CHARTS]
        for chart, (_, measure) in zip(category.chart, CHARTS):
            (regex,) = chart.multiline.tag
            lines = [b for b in BACKENDS if any(re.search(regex, t) for t in runs[b].Tags()["scalars"])]
            expected = [
                b
                for b in BACKENDS
                if b != "flex"
                or measure in FWD_MEASURES
                or f"compare/{setting}/{measure}" in runs["flex"].Tags()["scalars"]
            ]
            assert lines == expected, (setting, measure, lines)


def test_every_backend_agrees_with_fp64_reference(tiny_run):
    """Padded and packed batches, with and without the sliding window, every backend, logits and gradients."""
    _, out, runs = tiny_run
    tol = TOLERANCES[torch.float32]
    checked = 0
    for backend in BACKENDS:
        for setting in _settings():
            for measure, limit in (("logits_rel_err", tol["logits"]), ("grad_rel_err", tol["grads"])):
                tag, acc = f"compare/{setting}/{measure}", runs[backend]
                if measure == "grad_rel_err" and backend == "flex" and tag not in acc.Tags()["scalars"]:
                    continue  # flex has no backward on this CPU torch (asserted in the test above)
                values = [e.value for e in acc.Scalars(tag)]
                assert len(values) == len(SEQ_LENS) and max(values) <= limit, (tag, values)
                checked += 1
    assert checked >= (len(BACKENDS) * 2 - 1) * len(_settings())
    assert "within tolerance" in out


def test_check_flag_fails_on_a_wrong_mask(tmp_path, monkeypatch):
    """--check exits 1 when a backend is out of tolerance: sdpa made to ignore documents and padding."""
    sdpa = backends.BACKENDS["sdpa"].attend

    def causal_only(q, k, v, ctx, scale, dropout_p):
        plain = backends.AttentionContext(
            ctx.batch_size, ctx.q_len, ctx.kv_len, ctx.offset, ctx.k_start, ctx.sliding_window, None, None, ctx.device
        )
        return sdpa(q, k, v, plain, scale, dropout_p)

    monkeypatch.setitem(backends.BACKENDS, "sdpa", dataclasses.replace(backends.BACKENDS["sdpa"], attend=causal_only))
    argv = [
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--overrides",
        "{num_hidden_layers: 1}",
        "--backends",
        "[eager, sdpa]",
        "--seq_lens",
        "[32]",
        "--batch_kinds",
        "[packed]",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--no_memory",
        "--num_threads",
        "1",
        "--log_dir",
        str(tmp_path),
        "--check",
    ]
    rc, out = _run_main(argv)
    assert rc == 1
    assert "FAILED" in out and "sdpa packed T=32: logits_rel_err=" in out
    rc, out = _run_main(argv[:-1])  # without --check: reported, exit 0
    assert rc == 0 and "FAILED" in out


def test_unavailable_backend_is_listed_with_its_reason(tmp_path):
    res = compare_attention(
        preset="tiny",
        device="cpu",
        overrides={"num_hidden_layers": 1},
        backends=["eager", "flash_attention_2"],
        seq_lens=[16],
        batch_kinds=["padded"],
        warmup=0,
        repeats=1,
        memory=False,
        num_threads=1,
        log_dir=str(tmp_path),
    )
    assert set(res.unavailable) == {"flash_attention_2"} and "CUDA" in res.unavailable["flash_attention_2"]  # CPU run
    assert "unavailable: flash_attention_2: " in res.summary
    assert {r.backend for r in res.rows} == {"eager"}
    assert res.passed and res.dtype == torch.float32


def test_shipped_config_parses():
    ns = build_parser().parse_args(["--config", str(ROOT / "configs" / "compare_attention.yaml")])
    cfg = config_from_namespace(ns)
    assert cfg.preset == "tiny" and cfg.backends == list(BACKENDS) and set(cfg.batch_kinds) == {"padded", "packed"}
    assert None in cfg.sliding_windows and any(w for w in cfg.sliding_windows)
    assert cfg.torch_dtype() == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert max(cfg.seq_lens) <= get_preset(cfg.preset).max_position_embeddings


def test_config_errors_are_clear():
    with pytest.raises(
        ValueError, match="unknown attn_implementation='xformers'; choose one of eager, sdpa, flash_attention_2, flex"
    ):
        CompareConfig(backends=["eager", "xformers"])
    with pytest.raises(ValueError, match="batch_kinds"):
        CompareConfig(batch_kinds=["ragged"])
    with pytest.raises(ValueError, match="exceed max_position_embeddings=1024"):
        compare_attention(seq_lens=[2048], backends=["eager"])


# ----------------------------------------------------------------------------- the flex backend
needs_flex = pytest.mark.skipif(not backends.flex_available()[0], reason="this torch has no flex_attention")


def _packed_inputs(vocab: int, t: int = 24):
    ids = torch.randint(3, vocab, (2, t))
    pos = torch.cat([torch.arange(10), torch.arange(t - 10)])[None].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    return ids, pos, mask


@needs_flex
def test_flex_pads_head_dims_this_torch_rejects(monkeypatch):
    """Older torch rejects non-power-of-two head dims (Phi-3's 96): the backend zero-pads them, exactly."""
    cfg = get_preset(
        "tiny-gqa", hidden_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1, sliding_window=6
    )  # head_dim 24
    model = Phi3ForCausalLM(cfg, attn_implementation="eager").eval()
    ids, pos, mask = _packed_inputs(cfg.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=pos).logits
    real_fn = backends._flex_fn(torch.device("cpu"))
    seen = []

    def old_torch_flex(q, k, v, **kw):
        seen.append(q.shape[-1])
        d = q.shape[-1]
        if d & (d - 1):
            raise ValueError(f"NYI: Currently non power of 2 embedding dimension are not supported. Got E={d}.")
        return real_fn(q, k, v, **kw)

    monkeypatch.setattr(backends, "_flex_padded_dims", set())
    monkeypatch.setattr(backends, "_flex_fn", lambda device: old_torch_flex)
    model.set_attn_implementation("flex")
    with torch.no_grad(), pytest.warns(UserWarning, match="cannot take head_dim=24.*zero-pads it to 32"):
        out = model(ids, attention_mask=mask, position_ids=pos).logits
    assert seen == [24, 32]  # rejected once, then padded
    with torch.no_grad():
        out2 = model(ids, attention_mask=mask, position_ids=pos).logits  # remembered: padded directly, no warning
    assert seen == [24, 32, 32]
    for o in (out, out2):
        assert (o[real] - ref[real]).abs().max() < 1e-5 * ref[real].abs().max()


@needs_flex
def test_flex_head_dim_96_matches_eager():
    """Phi-3's head_dim 96 runs through flex as it is on this torch (padded if it were rejected)."""
    cfg = get_preset(
        "small-bench",
        vocab_size=64,
        num_hidden_layers=1,
        sliding_window=5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )  # 4 heads x 96
    model = Phi3ForCausalLM(cfg, attn_implementation="eager").eval()
    ids, pos, mask = _packed_inputs(cfg.vocab_size)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=pos).logits
        model.set_attn_implementation("flex")
        out = model(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max() < 1e-5 * ref[real].abs().max()


@needs_flex
def test_flex_backward_on_cpu_is_a_clear_error_or_works():
    cfg = get_preset("tiny", num_hidden_layers=1)
    model = Phi3ForCausalLM(cfg, attn_implementation="flex")
    ids, pos, mask = _packed_inputs(cfg.vocab_size, t=16)
    try:
        model(ids, attention_mask=mask, position_ids=pos, labels=ids).loss.backward()
    except backends.FlexUnsupportedError as e:
        assert "no backward pass on cpu" in str(e) and "attn_implementation='sdpa'" in str(e)
    else:  # a torch with CPU flex backward: gradients exist
        assert model.lm_head.weight.grad is not None


def test_flex_compile_setting():
    assert backends.flex_compiled("cuda") and not backends.flex_compiled("cpu")  # auto
    try:
        backends.set_flex_compile(True)
        assert backends.flex_compiled("cpu")
        backends.set_flex_compile(False)
        assert not backends.flex_compiled("cuda")
    finally:
        backends.set_flex_compile(None)
    with pytest.raises(ValueError, match="True, False or None"):
        backends.set_flex_compile("yes")


# ----------------------------------------------------------------------------- timing quality
class _FakeClock:
    """perf_counter that advances only when a timed function "runs" for the duration it is given."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def fn(self, name, durations, calls):
        it = iter(durations)

        def run():
            calls.append(name)
            self.now += next(it)

        return run


def test_quantiles_match_numpy():
    import numpy as np

    from phi3_lightning.compare.bench import Timing

    xs = [5.0, 1.0, 4.0, 2.0, 10.0, 3.0]
    t = Timing(xs)
    assert t.q1 == pytest.approx(np.quantile(xs, 0.25)) and t.q3 == pytest.approx(np.quantile(xs, 0.75))
    assert t.median == 3.5 and t.min == 1.0 and t.max == 10.0
    assert t.rel_spread == pytest.approx((np.quantile(xs, 0.75) - np.quantile(xs, 0.25)) / 3.5)


def test_timing_repeats_until_the_spread_is_small(monkeypatch):
    """Noisy first calls, then steady ones: rounds continue past `repeats` until IQR/median <= max_spread."""
    from phi3_lightning.compare import bench

    clock, calls = _FakeClock(), []
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    a = [1.0, 3.0, 1.0, 3.0] + [2.0] * 100  # spread 100% over the first 4, then constant
    b = [5.0, 9.0, 5.0, 9.0] + [6.0] * 100
    out = bench.time_interleaved(
        {"a": clock.fn("a", a, calls), "b": clock.fn("b", b, calls)},
        torch.device("cpu"),
        warmup=0,
        min_repeats=4,
        max_spread=0.1,
        time_budget_s=1e9,
    )
    assert calls[:6] == ["a", "b", "a", "b", "a", "b"]  # interleaved: one call of each per round
    assert out["a"].n == out["b"].n > 4 and not out["a"].budget_spent
    assert out["a"].rel_spread <= 0.1 and out["b"].rel_spread <= 0.1
    n = out["a"].n  # the first round count at which both spreads are under 0.1: nothing more was timed
    assert bench.Timing(a[: n - 1]).rel_spread > 0.1 or bench.Timing(b[: n - 1]).rel_spread > 0.1


def test_timing_stops_at_the_time_budget(monkeypatch):
    from phi3_lightning.compare import bench

    clock, calls = _FakeClock(), []
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    a = [1.0, 3.0] * 1000  # never steady
    out = bench.time_interleaved(
        {"a": clock.fn("a", a, calls)}, torch.device("cpu"), warmup=2, min_repeats=5, max_spread=0.1, time_budget_s=50.0
    )
    assert out["a"].budget_spent and 50.0 <= sum(out["a"].samples) <= 53.0
    assert len(calls) == 2 + out["a"].n  # warm-up calls are not timed
    out = bench.time_interleaved(
        {"a": clock.fn("a", a, calls)}, torch.device("cpu"), warmup=0, min_repeats=5, max_spread=0.1, time_budget_s=0.0
    )
    assert out["a"].n == 5  # budget 0: exactly `repeats`


def test_noisy_rows_are_flagged_and_do_not_fail_check(tmp_path, monkeypatch):
    """Spread above max_spread, and fwd+bwd timed faster than fwd: flagged 'noisy'; --check stays 0 (correctness)."""
    from phi3_lightning.compare import bench

    steady, noisy = bench.Timing([0.010] * 5), bench.Timing([0.001, 0.002, 0.004], budget_spent=True)  # IQR 75%
    fwd_bwd = iter([noisy, bench.Timing([0.005] * 5)])  # T=16: noisy; T=32: fwd+bwd faster than fwd

    def fake_timings(fns, device, warmup, min_repeats, max_spread, time_budget_s):
        assert list(fns) == ["fwd_ms", "fwd_bwd_ms"] and max_spread == 0.1
        return {"fwd_ms": steady, "fwd_bwd_ms": next(fwd_bwd)}

    monkeypatch.setattr(bench, "time_interleaved", fake_timings)
    argv = [
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--overrides",
        "{num_hidden_layers: 1}",
        "--backends",
        "[eager]",
        "--seq_lens",
        "[16, 32]",
        "--batch_kinds",
        "[padded]",
        "--warmup",
        "0",
        "--repeats",
        "3",
        "--no_memory",
        "--num_threads",
        "1",
        "--log_dir",
        str(tmp_path),
        "--run_name",
        "noisy",
        "--check",
    ]
    rc, out = _run_main(argv)
    assert rc == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| padded")]
    assert len(rows) == 2 and all("| noisy " in r and "| yes" in r for r in rows)
    assert "eager padded T=16: fwd_bwd_ms IQR 75% of median" in out
    assert "eager padded T=32: fwd+bwd timed faster than fwd" in out
    assert "2 of 2 rows" in out and "--check does not look at timings" in out
    runs = _accumulators(tmp_path / "noisy")
    rel = [e.value for e in runs["eager"].Scalars("compare_spread/padded/fwd_bwd_ms/rel_iqr")]
    assert rel[0] == pytest.approx(0.75) and rel[1] == 0.0


# ----------------------------------------------------------------------------- bad settings found by a user
_QUICK = ["--seq_lens", "[16]", "--warmup", "0", "--repeats", "1", "--no_memory", "--backends", "[eager]"]


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    from phi3_lightning.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(["compare-attention", *argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "device, message",
    [
        ("foo", "--device 'foo' is not a torch device"),  # was a RuntimeError traceback
        ("meta", "--device 'meta' holds no data"),  # was "Cannot copy out of meta tensor" traceback
        pytest.param(
            "cuda",
            "no CUDA device is available here",  # was "Torch not compiled with CUDA enabled" traceback
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_a_device_this_machine_cannot_use_is_refused_before_the_run(device, message, tmp_path):
    rc, out, err = _run_cli([*_QUICK, "--log_dir", str(tmp_path), "--device", device])
    assert rc == 2 and message in err, err[-2000:]
    assert "Traceback" not in err and not any(tmp_path.iterdir())  # nothing ran, nothing logged
    with pytest.raises(ValueError, match=re.escape(message)):
        compare_attention(backends=["eager"], seq_lens=[16], device=device, log_dir=str(tmp_path))


def test_no_runnable_backend_is_an_error_not_a_vacuous_pass(tmp_path):
    # --backends [flash_attention_2] on CPU measured nothing, said "every measured backend agrees" and --check
    # exited 0
    rc, out, err = _run_cli(
        [*_QUICK[:-2], "--backends", "[flash_attention_2]", "--device", "cpu", "--log_dir", str(tmp_path), "--check"]
    )
    assert rc == 1 and "none of the requested backends can run" in err and "flash_attention_2: " in err, err
    assert "agrees" not in out


@pytest.mark.parametrize(
    "field, value",
    [
        ("seq_lens", [16, 16]),
        ("backends", ["eager", "eager"]),
        ("batch_kinds", ["padded", "padded"]),
        ("sliding_windows", [8, None, 8]),
    ],
)
def test_repeated_values_are_refused(field, value):
    # a repeated seq_len ran twice and logged two TensorBoard points at the same step of every series
    with pytest.raises(ValueError, match=f"{field}=.* repeats"):
        CompareConfig(**{field: value})


def _one_layer_run(tmp_path) -> dict:
    """compare_attention settings of a quick run: the tiny preset with one layer, on the CPU, one untimed repeat."""
    return dict(
        preset="tiny",
        device="cpu",
        overrides={"num_hidden_layers": 1},
        warmup=0,
        repeats=1,
        time_budget_s=0,
        memory=False,
        num_threads=1,
        log_dir=str(tmp_path),
    )


def test_float64_backends_pass_against_the_reference_whose_softmax_is_fp32(tmp_path):
    # eager attention takes its softmax in fp32 (as transformers' eager does), so the "fp64" reference is itself off
    # by ~1e-7; sdpa in float64 (exact to ~1e-15 here) failed --check against the 1e-9 / 1e-8 float64 tolerance
    res = compare_attention(**_one_layer_run(tmp_path), dtype="float64", backends=["eager", "sdpa"], seq_lens=[32])
    assert res.passed, res.failures
    sdpa = [r for r in res.rows if r.backend == "sdpa"]
    assert all(1e-12 < r.values["logits_rel_err"] < 1e-6 for r in sdpa)  # the reference's fp32 softmax, no more
    assert "softmax" in res.summary  # the table says why the float64 floor is not 1e-15


def test_a_run_name_that_already_holds_a_comparison_is_refused_before_the_run(tmp_path, monkeypatch):
    # a second run with the same --run_name appended to the first one's event files: two points at every step,
    # two summaries, with nothing to tell them apart
    kw = dict(**_one_layer_run(tmp_path), backends=["eager"], seq_lens=[16], batch_kinds=["padded"])
    first = compare_attention(run_name="same", **kw)
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    from phi3_lightning.compare import run as run_module

    monkeypatch.setattr(run_module, "_run_all", lambda *a, **k: pytest.fail("ran before refusing the run name"))
    with pytest.raises(ValueError, match=r"run_name='same' already holds a comparison .*choose another"):
        compare_attention(run_name="same", **kw)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == files
    monkeypatch.undo()
    # an automatic name that collides (two runs in one second) gets a suffix instead
    monkeypatch.setattr(run_module.time, "strftime", lambda *a: "20260101-000000")
    a = compare_attention(**kw)
    b = compare_attention(**kw)
    assert a.log_dir != b.log_dir and b.log_dir.name == a.log_dir.name + "-2" and first.log_dir.name == "same"


@pytest.mark.parametrize(
    "argv, field, value",
    [
        (["--check", "false"], "check", False),  # was "unrecognized arguments: false"
        (["--check=true"], "check", True),  # was "ignored explicit argument 'true'"
        (["--memory", "false"], "memory", False),
        (["--memory", "False", "--check"], "memory", False),
        (["--no_memory"], "memory", False),
        (["--check"], "check", True),
    ],
)
def test_boolean_flags_take_true_false_like_the_other_commands(argv, field, value):
    from phi3_lightning.compare import parse_config

    assert getattr(parse_config(argv), field) is value


def test_a_boolean_flag_with_another_value_names_the_forms():
    from phi3_lightning.compare import parse_config

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        parse_config(["--check=maybe"])
    assert "--check='maybe'" in err.getvalue() and "--no_check" in err.getvalue()
