"""RMSNorm against transformers' and the formula. (Each component in isolation, against transformers' own component or the formula.)"""

import pytest
import torch
from torch import nn

from phi3_lightning.model.norm import Phi3RMSNorm

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
