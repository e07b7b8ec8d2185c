"""Backbone-wide behaviour: meta-device init with reset_parameters, gradient checkpointing. (Each component in isolation, against transformers' own component or the formula.)"""

import pytest
import torch

from phi3_lightning.model import get_preset
from phi3_lightning.model.backbone import Phi3Model
from phi3_lightning.model.heads import Phi3ForCausalLM

from .shapes import config


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


def _saved_bytes_and_grads(model, x, every):
    """Bytes autograd keeps for backward after one forward, and the weight gradients of that forward."""
    model.zero_grad(set_to_none=True)
    if every:
        model.gradient_checkpointing_enable(every)
    else:
        model.gradient_checkpointing_disable()
    saved = {}  # storage -> bytes (tensors sharing a storage counted once)

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, labels=x, return_logits=False).loss
    loss.backward()
    return sum(saved.values()), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_checkpointing_every_nth_layer_saves_that_share_with_the_same_gradients():
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config("mini-4k", num_hidden_layers=4)).train()
    x = torch.randint(3, 97, (2, 12))
    none, g_none = _saved_bytes_and_grads(model, x, 0)
    every, g_every = _saved_bytes_and_grads(model, x, 1)
    half, g_half = _saved_bytes_and_grads(model, x, 2)
    quarter, g_quarter = _saved_bytes_and_grads(model, x, 4)
    # four identical layers: recomputing layers 0 and 2 saves half of what recomputing all four saves, layer 0 alone
    # a quarter (up to the few small tensors shared across layers)
    assert none > quarter > half > every
    assert abs((none - half) / (none - every) - 1 / 2) < 0.02
    assert abs((none - quarter) / (none - every) - 1 / 4) < 0.02
    for grads in (g_every, g_half, g_quarter):
        for n, g in g_none.items():
            torch.testing.assert_close(grads[n], g, rtol=0, atol=1e-7, msg=n)


def test_checkpointing_every_must_be_a_whole_number_from_1():
    model = Phi3ForCausalLM(config("mini-4k"))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="whole number >= 1"):
            model.gradient_checkpointing_enable(bad)


def test_a_config_too_large_for_the_device_is_refused_before_allocation():
    """A crafted or mistyped config.json (here ~4 * 10^12 parameters, 17 TB in fp32) is an error naming the sizes
    before any layer is allocated (it was an allocator failure, or with many mid-sized layers the OOM killer); on
    the meta device, which allocates nothing, it still builds."""
    huge = get_preset(
        "tiny", hidden_size=2**18, intermediate_size=2**20, num_attention_heads=2048, num_key_value_heads=2048
    )
    with pytest.raises(ValueError) as e:
        Phi3ForCausalLM(huge)
    msg = str(e.value)
    assert "hidden_size=262144" in msg and "num_hidden_layers=2" in msg and "GiB" in msg and "meta" in msg
    with torch.device("meta"):
        assert Phi3ForCausalLM(huge).model.layers[0].mlp.down_proj.weight.is_meta
    Phi3ForCausalLM(get_preset("tiny"))  # a model that fits is built as before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_ids": torch.zeros(2, 0, dtype=torch.long)}, r"empty batch: input of shape \(2, 0\)"),
        ({"input_ids": torch.zeros(0, 5, dtype=torch.long)}, r"empty batch: input of shape \(0, 5\)"),
        (
            {"inputs_embeds": torch.randn(2, 5)},
            r"inputs_embeds must be \(batch, seq_len, hidden_size=64\), got \(2, 5\)",
        ),
        ({"inputs_embeds": torch.randn(2, 5, 32)}, r"hidden_size=64\), got \(2, 5, 32\)"),
    ],
)
def test_empty_or_misshapen_inputs_are_named(kwargs, message):
    """A LongRoPE model crashed on an empty batch inside torch.max; misshapen embeddings in unpacking or RMSNorm."""
    m = Phi3ForCausalLM(config("mini-128k")).eval()
    with pytest.raises(ValueError, match=message):
        m(**kwargs)
