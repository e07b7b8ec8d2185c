"""Attention against transformers' layer, and the one mask rule (window, padding, documents). (Each component in isolation, against transformers' own component or the formula.)"""

import pytest
import torch

from phi3_lightning.model.attention import Phi3Attention
from phi3_lightning.model.masking import build_context
from phi3_lightning.model.rope import Phi3RotaryEmbedding

from .hf_oracle import hf_config
from .shapes import config

hf_phi3 = pytest.importorskip("transformers.models.phi3.modeling_phi3")


def test_attention_gqa_matches_transformers_layer():
    cfg = config("medium-4k")  # 4 query heads, 2 kv heads
    ours = Phi3Attention(cfg, 0).eval()
    ref = hf_phi3.Phi3Attention(hf_config(cfg, "eager"), 0).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 64)
    pos = torch.arange(6)[None].expand(2, 6)
    rope = Phi3RotaryEmbedding(cfg)(pos, torch.float32)
    ctx = build_context(
        batch_size=2,
        q_len=6,
        attention_mask=None,
        position_ids=pos,
        past_len=0,
        sliding_window=None,
        derive_documents=True,
        device=x.device,
    )
    causal = torch.full((6, 6), float("-inf")).triu(1)[None, None]
    out_ref, _ = ref(x, rope, causal)
    assert torch.allclose(ours(x, rope, ctx), out_ref, atol=1e-6)


def test_mask_rule_window_padding_documents():
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    ctx = build_context(
        batch_size=1,
        q_len=8,
        attention_mask=mask,
        position_ids=pos,
        past_len=0,
        sliding_window=2,
        derive_documents=True,
        device=pos.device,
    )
    m = ctx.bool_mask()[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0, 0],  # window 2: q - 2 < k <= q
        [0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],  # new document
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],  # a padding query sees only itself: no empty row
    ]
    plain = build_context(
        batch_size=1,
        q_len=8,
        attention_mask=torch.ones(1, 8),
        position_ids=torch.arange(8)[None],
        past_len=0,
        sliding_window=8,
        derive_documents=True,
        device=pos.device,
    )
    assert plain.is_plain_causal and plain.bool_mask() is None  # SDPA runs with is_causal, no mask tensor
