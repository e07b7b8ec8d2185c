"""Rotary embeddings: standard, LongRoPE switch and attention factor, partial rotary. (Each component in isolation, against transformers' own component or the formula.)"""

import math

import pytest
import torch

from phi3_lightning.model.rope import Phi3RotaryEmbedding, apply_rotary

from .hf_oracle import hf_config
from .shapes import config

hf_phi3 = pytest.importorskip("transformers.models.phi3.modeling_phi3")


@pytest.mark.parametrize("shape", ["mini-4k", "mini-128k", "phi-4-mini", "phi-4"])
@pytest.mark.parametrize("seq_len", [10, 40])
def test_rotary_matches_transformers(shape, seq_len):
    cfg = config(shape)
    ours = Phi3RotaryEmbedding(cfg)
    ref = hf_phi3.Phi3RotaryEmbedding(hf_config(cfg))
    pos = torch.arange(seq_len)[None]
    cos, sin = ours(pos, torch.float32)
    rcos, rsin = ref(torch.zeros(1, dtype=torch.float32), pos)
    assert cos.shape[-1] == cfg.rotary_dim
    assert torch.allclose(cos, rcos, atol=1e-6) and torch.allclose(sin, rsin, atol=1e-6)


def test_longrope_attention_factor_and_switch():
    cfg = config("mini-128k")  # max 64, original 16
    rope = Phi3RotaryEmbedding(cfg)
    expected = math.sqrt(1 + math.log(64 / 16) / math.log(16))
    assert rope.attention_factor == pytest.approx(expected)
    cos_short, _ = rope(torch.arange(16)[None], torch.float32)  # max + 1 = 16: short
    cos_long, _ = rope(torch.arange(17)[None], torch.float32)  # 17 > 16: long, for every position
    assert cos_short[0, 0, 0] == pytest.approx(expected)  # position 0: cos = 1 * factor
    assert not torch.allclose(cos_short[0, 5], cos_long[0, 5])
    inv_long = 1.0 / (torch.tensor(cfg.rope_scaling["long_factor"]) * 10000.0 ** (torch.arange(0, 16, 2) / 16))
    assert torch.allclose(cos_long[0, 5, :8], torch.cos(5 * inv_long) * expected, atol=1e-6)


def test_partial_rotary_leaves_tail_untouched():
    cfg = config("phi-4-mini")  # head 32, rotary 24
    rope = Phi3RotaryEmbedding(cfg)
    cos, sin = rope(torch.arange(6)[None], torch.float32)
    x = torch.randn(1, 2, 6, 32)
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 24:], x[..., 24:])
    assert not torch.allclose(y[..., :24], x[..., :24])
