"""Each component in isolation, against transformers' own component or the formula."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from phi3_lightning.model.attention import Phi3Attention
from phi3_lightning.model.backbone import Phi3Model
from phi3_lightning.model.heads import Phi3ForCausalLM, ignore_targets_after_padding
from phi3_lightning.model.loss import causal_lm_loss, fused_linear_cross_entropy
from phi3_lightning.model.masking import build_context
from phi3_lightning.model.mlp import Phi3MLP
from phi3_lightning.model.norm import Phi3RMSNorm
from phi3_lightning.model.rope import Phi3RotaryEmbedding, apply_rotary

from .hf_oracle import hf_config
from .shapes import config

hf_phi3 = pytest.importorskip("transformers.models.phi3.modeling_phi3")


def test_rmsnorm_matches_formula_and_transformers():
    norm = Phi3RMSNorm(64, eps=1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    ref = hf_phi3.Phi3RMSNorm(64, eps=1e-5)
    ref.weight.data.copy_(norm.weight.data)
    assert torch.equal(norm(x), ref(x))
    xf = x.float()
    manual = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * norm.weight
    assert torch.equal(norm(x), manual)


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


def test_mlp_is_fused_swiglu():
    cfg = config("mini-4k")
    mlp = Phi3MLP(cfg)
    x = torch.randn(2, 3, 64)
    w = mlp.gate_up_proj.weight
    gate, up = x @ w[: cfg.intermediate_size].T, x @ w[cfg.intermediate_size :].T
    manual = (up * torch.nn.functional.silu(gate)) @ mlp.down_proj.weight.T
    assert torch.allclose(mlp(x), manual, atol=1e-6)
    gelu = Phi3MLP(config("mini-4k", hidden_act="gelu_pytorch_tanh"))
    gelu.load_state_dict(mlp.state_dict())
    assert not torch.allclose(gelu(x), mlp(x))


def test_attention_gqa_matches_transformers_layer():
    cfg = config("medium-4k")  # 4 query heads, 2 kv heads
    ours = Phi3Attention(cfg, 0).eval()
    ref = hf_phi3.Phi3Attention(hf_config(cfg, "eager"), 0).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 64)
    pos = torch.arange(6)[None].expand(2, 6)
    rope = Phi3RotaryEmbedding(cfg)(pos, torch.float32)
    ctx = build_context(batch_size=2, q_len=6, attention_mask=None, position_ids=pos, past_len=0,
                        sliding_window=None, derive_documents=True, device=x.device)
    causal = torch.full((6, 6), float("-inf")).triu(1)[None, None]
    out_ref, _ = ref(x, rope, causal)
    assert torch.allclose(ours(x, rope, ctx), out_ref, atol=1e-6)


def test_mask_rule_window_padding_documents():
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    ctx = build_context(batch_size=1, q_len=8, attention_mask=mask, position_ids=pos, past_len=0,
                        sliding_window=2, derive_documents=True, device=pos.device)
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
    plain = build_context(batch_size=1, q_len=8, attention_mask=torch.ones(1, 8), position_ids=torch.arange(8)[None],
                          past_len=0, sliding_window=8, derive_documents=True, device=pos.device)
    assert plain.is_plain_causal and plain.bool_mask() is None  # SDPA runs with is_causal, no mask tensor


def test_fused_linear_cross_entropy_equals_reference_and_grads():
    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = -100
    ref = causal_lm_loss(h @ w.T, labels)
    gh, gw = torch.autograd.grad(ref, (h, w))
    fused = fused_linear_cross_entropy(h, w, labels, chunk_size=4)
    fh, fw = torch.autograd.grad(fused, (h, w))
    assert torch.allclose(fused, ref, rtol=1e-6)
    assert torch.allclose(fh, gh, atol=1e-6) and torch.allclose(fw, gw, atol=1e-6)


def test_training_loss_path_equals_logits_path():
    model = Phi3ForCausalLM(config("phi-4-mini"))  # tied embeddings: gradient reaches the embedding twice
    x = torch.randint(3, 97, (2, 12))
    a = model(x, labels=x).loss
    ga = torch.autograd.grad(a, model.model.embed_tokens.weight)[0]
    b = model(x, labels=x, return_logits=False).loss
    gb = torch.autograd.grad(b, model.model.embed_tokens.weight)[0]
    assert torch.allclose(a, b, rtol=1e-6) and torch.allclose(ga, gb, atol=1e-6)


def test_targets_after_padding_are_ignored():
    labels = torch.tensor([[-100, -100, 5, 6], [7, 8, -100, -100]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]])
    assert ignore_targets_after_padding(labels, mask).tolist() == [[-100, -100, -100, 6], [7, 8, -100, -100]]


def test_meta_init_and_reset_parameters():
    cfg = config("mini-128k")
    with torch.device("meta"):
        m = Phi3Model(cfg, device=torch.device("meta"))
    m.to_empty(device="cpu")
    m.reset_parameters()
    std = m.layers[0].self_attn.qkv_proj.weight.std().item()
    assert abs(std - cfg.initializer_range) < 0.003
    assert torch.equal(m.embed_tokens.weight[cfg.pad_token_id], torch.zeros(64))
    assert torch.equal(m.norm.weight, torch.ones(64))
    eager = Phi3Model(cfg)
    assert torch.equal(m.rotary_emb.long_inv_freq, eager.rotary_emb.long_inv_freq)


def test_gradient_checkpointing_same_gradients():
    model = Phi3ForCausalLM(config("mini-4k"))
    x = torch.randint(3, 97, (2, 10))
    g1 = torch.autograd.grad(model(x, labels=x).loss, model.model.layers[0].mlp.down_proj.weight)[0]
    model.gradient_checkpointing_enable()
    model.train()
    g2 = torch.autograd.grad(model(x, labels=x).loss, model.model.layers[0].mlp.down_proj.weight)[0]
    assert torch.allclose(g1, g2, atol=1e-7)


def test_fused_loss_with_frozen_weight_gives_hidden_grad_only():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(20, 8)  # frozen
    labels = torch.randint(0, 20, (2, 5))
    ref_gh = torch.autograd.grad(causal_lm_loss(h @ w.T, labels), h)[0]
    gh = torch.autograd.grad(fused_linear_cross_entropy(h, w, labels, chunk_size=3), h)[0]
    assert torch.allclose(gh, ref_gh, atol=1e-6)


def test_fused_loss_bf16_and_no_grad_paths():
    torch.manual_seed(0)
    h32 = torch.randn(2, 9, 16)
    w32 = torch.randn(40, 16) * 0.5
    labels = torch.randint(0, 40, (2, 9))
    h, w = h32.bfloat16().requires_grad_(), w32.bfloat16().requires_grad_()
    ref = causal_lm_loss(h @ w.T, labels)  # logits in bf16, softmax in fp32: what the fused path computes
    gh, gw = torch.autograd.grad(ref, (h, w))
    fused = fused_linear_cross_entropy(h, w, labels, chunk_size=5)
    fh, fw = torch.autograd.grad(fused, (h, w))
    assert fused.dtype == torch.float32 and torch.allclose(fused, ref, rtol=1e-5)
    assert fh.dtype == torch.bfloat16 and fw.dtype == torch.bfloat16
    assert torch.allclose(fh.float(), gh.float(), atol=2e-2, rtol=2e-2)
    assert torch.allclose(fw.float(), gw.float(), atol=2e-2, rtol=2e-2)
    with torch.no_grad():  # evaluation: loss only, chunk larger than the number of targets
        plain = fused_linear_cross_entropy(h32, w32, labels, chunk_size=1000)
    assert torch.allclose(plain, causal_lm_loss(h32 @ w32.T, labels), rtol=1e-6)


@pytest.mark.parametrize("rows", [1, 3, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_split_linear_equals_linear(rows, dtype):
    from phi3_lightning.model.linear import Linear, _row_split_linear

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        lin = Linear(0.02, 48, 300, bias=True).to(dtype)  # 300 rows: split in 4 parts of 75
        nn.init.normal_(lin.bias)
        x = torch.randn(1, rows, 48, dtype=dtype) if rows != 3 else torch.randn(3, 48, dtype=dtype)
        with torch.no_grad():
            y = _row_split_linear(x, lin.weight, lin.bias)
            assert y is not None and y.shape == x.shape[:-1] + (300,)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert torch.allclose(y.float(), F.linear(x, lin.weight, lin.bias).float(), atol=tol, rtol=tol)
            assert torch.equal(lin(x), y)  # the module takes this path for small inference inputs
        # training (autograd), more than 32 rows, or a single thread: plain F.linear
        assert _row_split_linear(x.requires_grad_(), lin.weight.requires_grad_(), None) is None
        assert _row_split_linear(torch.randn(33, 48, dtype=dtype), lin.weight, None) is None
        torch.set_num_threads(1)
        with torch.no_grad():
            assert _row_split_linear(x, lin.weight, None) is None
    finally:
        torch.set_num_threads(threads)


def test_fused_loss_scales_by_upstream_grad_and_refuses_a_second_backward():
    torch.manual_seed(0)
    h = torch.randn(2, 6, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    labels = torch.randint(0, 30, (2, 6))
    gh, gw = torch.autograd.grad(3.0 * causal_lm_loss(h @ w.T, labels), (h, w))
    fh, fw = torch.autograd.grad(3.0 * fused_linear_cross_entropy(h, w, labels, chunk_size=4), (h, w))
    assert torch.allclose(fh, gh, atol=1e-6) and torch.allclose(fw, gw, atol=1e-6)
    loss = fused_linear_cross_entropy(h, w, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_rmsnorm_fast_path_is_bit_identical_and_skipped_under_autocast():
    torch.manual_seed(0)
    norm = Phi3RMSNorm(48, eps=1e-5)
    nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 48, requires_grad=True)
    h = x.float()
    explicit = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(norm(x), explicit)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x).dtype == torch.float32  # normalised in fp32, as transformers does under autocast
