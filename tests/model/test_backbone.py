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
