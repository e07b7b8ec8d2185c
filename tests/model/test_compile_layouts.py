"""Per-layer torch.compile over batches whose packing layout changes every step (what a packed fit sees).

The layout of a packed or padded batch (how many documents, their lengths) is Python-level structure in the sdpa
by-document path: traced into a compiled layer, each new layout was a new graph (a recompile per batch until
dynamo's cache limit, after which the layer ran eagerly). That path now runs outside the compiled graph (one graph
break around attention, graphs built once). The varlen paths (flash-attn, torch's varlen_attn) stay inside the
graph: their only layout-dependent value, max_seqlen, becomes a symbolic int after one recompile.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from phi3_lightning import Phi3ForCausalLM
from phi3_lightning.model import Phi3Config
from phi3_lightning.model.backends import set_flash_kernels

from .reference_kernels import (
    reference_flash_attn_func,
    reference_torch_varlen_attn,
)


# The reference varlen kernels loop over the documents in Python (``int(cu[i])``), which dynamo cannot trace: as
# custom ops (opaque to dynamo, like the real kernels) a compiled layer sees them as the real ones, max_seqlen ints
# included.
@torch.library.custom_op("phi3_tests::ref_varlen", mutates_args=())
def _ref_varlen_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    max_q: int,
    scale: float,
    left: int,
    right: int,
    gqa: bool,
) -> torch.Tensor:
    return reference_torch_varlen_attn(
        q, k, v, cu, cu, max_q, max_q, scale=scale, window_size=(left, right), enable_gqa=gqa
    )


@_ref_varlen_op.register_fake
def _(q, k, v, cu, max_q, scale, left, right, gqa):
    return torch.empty_like(q)


def _traceable_torch_varlen(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
):
    return _ref_varlen_op(query, key, value, cu_seq_q, max_q, scale, window_size[0], window_size[1], enable_gqa)


def _traceable_flash_varlen(
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)
):
    left, right = window_size
    return _ref_varlen_op(q, k, v, cu_q, max_q, softmax_scale, left, 0 if causal else right, q.shape[1] != k.shape[1])


KERNELS = {
    "flash_attn": dict(kernels=(reference_flash_attn_func, _traceable_flash_varlen)),
    "torch_varlen": dict(torch_varlen=_traceable_torch_varlen),
}


def _layouts(n: int, t: int = 48, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths: list[int] = []
        while sum(lengths) < t - 6:  # the tail is padding
            lengths.append(min(int(torch.randint(2, 24, (1,), generator=g)), t - 6 - sum(lengths)))
        pos = torch.cat([torch.arange(m) for m in lengths])
        mask = torch.ones(1, t, dtype=torch.long)
        mask[0, pos.numel() :] = 0
        pos = torch.cat([pos, torch.arange(t - pos.numel())])
        out.append((pos[None], mask))
    return out


@pytest.mark.parametrize(
    "backend, kernels",
    [("eager", None), ("sdpa", None), ("flash_attention_2", "flash_attn"), ("flash_attention_2", "torch_varlen")],
)
def test_compiled_layers_do_not_recompile_per_packing_layout(backend, kernels):
    torch._dynamo.reset()
    counters.clear()
    if kernels:
        set_flash_kernels(**KERNELS[kernels])
    try:
        cfg = Phi3Config.from_pretrained("tiny", num_hidden_layers=2, sliding_window=8)
        torch.manual_seed(0)
        model = Phi3ForCausalLM(cfg, attn_implementation=backend).eval()
        ref = Phi3ForCausalLM(cfg, attn_implementation=backend).eval()
        ref.load_state_dict(model.state_dict())
        for layer in model.model.layers:
            layer.compile(backend="eager")  # dynamo's tracing and guards only: no code generation on the CPU
        graphs = []
        with torch.no_grad():
            for pos, mask in _layouts(6):
                ids = torch.randint(0, cfg.vocab_size, pos.shape)
                got = model(ids, attention_mask=mask, position_ids=pos).logits
                want = ref(ids, attention_mask=mask, position_ids=pos).logits
                real = mask.bool()
                torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
                graphs.append(counters["stats"]["unique_graphs"])
    finally:
        set_flash_kernels(None)
        torch._dynamo.reset()
    # the first layouts may compile (and once more when dynamo marks a size dynamic); then no new graph per layout
    assert graphs[2:] == [graphs[2]] * 4, graphs


def test_importing_the_model_does_not_import_dynamo():
    """The outside-the-graph wrapper is made on first need: a model used without compile does not pay the ~1 s
    import of torch._dynamo."""
    import subprocess
    import sys

    code = "import sys, phi3_lightning.model; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
