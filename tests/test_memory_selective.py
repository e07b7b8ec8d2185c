"""Memory planner, selective activation checkpointing: the per-layer formula by hand, and the CLI option (the formula
vs what the checkpoint really keeps on CPU is checked with the other settings in tests/test_memory.py)."""

import pytest

from phi3_lightning.memory import estimate_memory, layer_activation_bytes, main, selective_layer_bytes
from phi3_lightning.model import get_preset


def test_selective_lies_between_full_checkpointing_and_none_for_phi3_mini():
    kw = dict(precision="bf16-true", seq_len=4096, batch_size=1, method="full")
    cfg = get_preset("phi-3-mini-4k", sliding_window=None)
    none, full = estimate_memory(cfg, **kw), estimate_memory(cfg, activation_checkpointing=True, **kw)
    sel = estimate_memory(cfg, activation_checkpointing="selective", **kw)
    assert full.activations < sel.activations < none.activations
    # by hand, bytes per token of one layer: 2 x (qkv 9216 + o 3072 + gate_up 16384 + attn 3072) + logsumexp
    # 4 x 32 heads (down_proj's output is not kept), plus the layer input 2 x 3072
    per_token = 2 * (9216 + 3072 + 16384 + 3072) + 4 * 32
    assert selective_layer_bytes(cfg, "bf16-true", 4096, 4096) == per_token * 4096
    d = sel.details
    assert d["activations: matmul + attention outputs kept (selective)"] == 32 * per_token * 4096
    assert d["activations: checkpointed layer inputs"] == 32 * 2 * 3072 * 4096
    # about half of the eager layer's saved bytes
    assert 0.4 < per_token / (layer_activation_bytes(cfg, "bf16-true", 1, 4096)) < 0.5
    # recompute working memory counted as for full checkpointing (the recomputed layer + its backward)
    assert sel.other == full.other
    assert "selective activation checkpointing" in sel.summary()


def test_cli_option_takes_nothing_n_or_selective(capsys):
    base = ["--preset", "phi-3-mini-4k", "--precision", "bf16-true", "--seq-len", "4096"]
    for extra, label in (
        (["--activation-checkpointing"], ", activation checkpointing"),
        (["--activation-checkpointing", "2"], "of every 2nd layer"),
        (["--activation-checkpointing", "selective"], "selective activation checkpointing"),
    ):
        assert main([*base, *extra]) == 0
        assert label in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*base, "--activation-checkpointing", "selectiv"])
    assert "neither a whole number N" in capsys.readouterr().err


def test_oom_advice_command_replays_selective():
    """The planner command an OOM prints for a selective run asks the planner for the same estimate."""
    import shlex

    from phi3_lightning.modules.oom import planner_command

    est = estimate_memory("tiny", precision="bf16-true", seq_len=64, activation_checkpointing="selective")
    cmd = planner_command(["--preset", "tiny"], est.settings)
    assert "--activation-checkpointing selective" in cmd
    argv = shlex.split(cmd)[3:]  # after "python -m phi3_lightning.memory"
    assert main(argv) == 0
