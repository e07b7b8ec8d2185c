"""Backbone-wide behaviour: meta-device init with reset_parameters, gradient checkpointing. (Each component in isolation, against transformers' own component or the formula.)"""

import torch

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
