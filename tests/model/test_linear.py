"""The row-split CPU inference linear. (Each component in isolation, against transformers' own component or the formula.)"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn


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
