"""The fused gate/up MLP. (Each component in isolation, against transformers' own component or the formula.)"""

import torch

from phi3_lightning.model.mlp import Phi3MLP

from .shapes import config


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
