"""Selective (op-level) activation checkpointing: same gradients as no checkpointing, matmuls never re-run in
backward, and a saved-bytes footprint between full checkpointing and none."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from phi3_lightning.memory import measure
from phi3_lightning.model import get_preset
from phi3_lightning.model.heads import Phi3ForCausalLM
from phi3_lightning.model.lora import LoRAConfig, apply_lora
from phi3_lightning.model.selective_checkpoint import SAVED_OPS, layer_policy, policy, saves

MATMULS = ("mm", "addmm", "bmm", "baddbmm")


class _CountOps(TorchDispatchMode):
    """Counts aten calls by op name (what actually runs: an op served from the selective cache never gets here)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def matmuls(self) -> int:
        return sum(self.calls.get(n, 0) for n in MATMULS)


def _batch(layout: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, 97, (2, 24), generator=g)
    mask = pos = None
    if layout == "padded":
        mask = torch.ones_like(x)
        mask[0, :5] = 0  # left padding in row 0
    elif layout == "packed":
        pos = torch.cat([torch.arange(10), torch.arange(14)])[None].expand(2, -1)  # two documents per row
    return x, mask, pos


def _run(mode: str, attn: str, layout: str, lora: bool = False, fused: str | None = None, model=None):
    """(gradients, matmuls run in forward, matmuls run in backward) of one step with checkpointing ``mode``."""
    if model is None:
        torch.manual_seed(0)
        model = Phi3ForCausalLM(get_preset("tiny"), attn_implementation=attn).train()
        if lora:
            apply_lora(model, LoRAConfig(r=4))
        if fused:
            model.set_fused_kernels(fused)
    model.zero_grad(set_to_none=True)
    if mode == "none":
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(selective=mode == "selective")
    x, mask, pos = _batch(layout)
    fwd, bwd = _CountOps(), _CountOps()
    with fwd:
        loss = model(x, attention_mask=mask, position_ids=pos, labels=x, return_logits=False).loss
    with bwd:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, fwd.matmuls(), bwd.matmuls()


@pytest.mark.parametrize(
    "attn, layout, lora",
    [
        ("sdpa", "full", False),
        ("sdpa", "padded", False),
        ("sdpa", "packed", False),  # the document-by-document SDPA path (model/varlen.py)
        ("eager", "full", False),
        ("eager", "packed", False),
        ("sdpa", "packed", True),  # LoRA: the adapters' matmuls are saved too
    ],
)
def test_same_gradients_as_no_checkpointing_and_no_matmul_recomputed(attn, layout, lora):
    g_none, fwd_none, bwd_none = _run("none", attn, layout, lora)
    g_full, _, bwd_full = _run("full", attn, layout, lora)
    g_sel, fwd_sel, bwd_sel = _run("selective", attn, layout, lora)
    assert g_sel.keys() == g_none.keys() and len(g_none) > 0
    for n, g in g_none.items():  # CPU fp32: the same ops on the same inputs, bit for bit
        assert torch.equal(g_sel[n], g), n
        assert torch.equal(g_full[n], g), n
    # the counter sees recomputation: full checkpointing re-runs every forward matmul of the layers in backward
    # (all of them but the loss head's, which is not checkpointed)
    assert fwd_sel == fwd_none and bwd_full > bwd_none
    # selective: the backward runs exactly the matmuls of plain backpropagation, none of the forward's again
    assert bwd_sel == bwd_none


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_flash_varlen_glue_under_selective_checkpointing(layout):
    """flash_attention_2 through torch's varlen path (a pure-torch stand-in of varlen_attn on CPU): the unpad /
    cu_seqlens glue recomputes cleanly, same gradients, no matmul re-run (the stand-in's own matmuls included)."""
    from phi3_lightning.model.backends import set_flash_kernels

    from .reference_kernels import reference_torch_varlen_attn

    set_flash_kernels(torch_varlen=reference_torch_varlen_attn)
    try:
        g_none, _, bwd_none = _run("none", "flash_attention_2", layout)
        g_sel, _, bwd_sel = _run("selective", "flash_attention_2", layout)
    finally:
        set_flash_kernels(None)
    for n, g in g_none.items():
        assert torch.equal(g_sel[n], g), n
    assert bwd_sel == bwd_none


def test_same_gradients_with_compiled_fused_kernels():
    """``fused_kernels: compile``: the compiled norm / SwiGLU / RoPE regions are recomputed (they hold no matmul);
    the numbers equal the same model without checkpointing."""
    torch.manual_seed(0)
    model = Phi3ForCausalLM(get_preset("tiny")).train()
    model.set_fused_kernels("compile")
    x, _, _ = _batch("full")

    def grads(selective):
        model.zero_grad(set_to_none=True)
        if selective is None:
            model.gradient_checkpointing_disable()
        else:
            model.gradient_checkpointing_enable(selective=selective)
        model(x, labels=x, return_logits=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    g_none, g_sel = grads(None), grads(True)
    for n, g in g_none.items():
        assert torch.equal(g_sel[n], g), n


def test_saved_bytes_lie_between_full_checkpointing_and_none():
    """What autograd and the checkpoint's cache keep after the forward (``memory.measure``: saved_tensors_hooks
    plus every tensor born in the forward that stays referenced, which includes the selective cache)."""
    kw = dict(precision="32-true", seq_len=48, batch_size=2, attn_implementation="sdpa")
    none = measure("tiny", activation_checkpointing=False, **kw)["activations"]
    full = measure("tiny", activation_checkpointing=True, **kw)["activations"]
    sel = measure("tiny", activation_checkpointing="selective", **kw)["activations"]
    assert full < sel < none
    # per token and layer, at least three matmul outputs and the attention output are kept: 4 bytes x
    # (qkv 3*128 + o 128 + gate_up 2*256 + attn 128) = 4608 bytes
    assert sel - full >= 2 * 48 * 2 * 4 * (384 + 128 + 512 + 128)


def test_policy_saves_matmuls_and_attention_only():
    aten = torch.ops.aten
    for op in (
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
    ):
        assert saves(op), op
    for op in (
        aten.mul.Tensor,
        aten.rsqrt.default,
        aten.silu.default,
        aten._to_copy.default,
        aten.index_select.default,
    ):
        assert not saves(op), op
        assert policy(None, op).name == "PREFER_RECOMPUTE"


def test_layer_policy_leaves_out_down_proj_only():
    """down_proj's output (an (N, I) @ (I, h) mm) is only added to the residual stream: not kept. The other
    matmuls (o_proj: (N, H d) @ (H d, h)) are; with H d == I the two cannot be told apart and both are kept."""
    mm = torch.ops.aten.mm.default
    x_i, w_down = torch.empty(5, 256), torch.empty(256, 128)
    x_h, w_o = torch.empty(5, 128), torch.empty(128, 128)
    pol = layer_policy(256, 128, 128)
    assert pol(None, mm, x_i, w_down).name == "PREFER_RECOMPUTE"
    assert pol(None, mm, x_h, w_o).name == "MUST_SAVE"
    assert layer_policy(256, 128, 256)(None, mm, x_i, w_down).name == "MUST_SAVE"


def test_selective_refuses_every_n_and_non_bool():
    model = Phi3ForCausalLM(get_preset("tiny"))
    with pytest.raises(ValueError, match="selective checkpointing applies to every decoder layer, not every=2"):
        model.gradient_checkpointing_enable(2, selective=True)
    with pytest.raises(ValueError, match="selective='yes'"):
        model.gradient_checkpointing_enable(selective="yes")
    model.gradient_checkpointing_enable(selective=True)
    assert model.model.gradient_checkpointing and model.model.checkpoint_selective


@pytest.mark.slow
def test_compiled_selective_layers_equal_compiled_layers_and_keep_less():
    """``torch_compile: layers`` + selective: the checkpointed call is compiled (dynamo traces checkpoint with the
    policy; one graph for all layers). Same gradients as compiled layers without checkpointing, and the bytes
    autograd keeps (parameters included: the compiled graphs save them) lie between full checkpointing of compiled
    layers and none. Packed rows under SDPA (which break
    the graph inside the checkpoint) run the eager selective checkpoint, with a warning, and still match."""
    torch.manual_seed(0)
    model = Phi3ForCausalLM(get_preset("tiny")).train()
    x, _, pos = _batch("packed")

    def step(position_ids=None):
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, position_ids=position_ids, labels=x, return_logits=False).loss
        loss.backward()
        return sum(saved.values()), {n: p.grad.clone() for n, p in model.named_parameters()}

    for layer in model.model.layers:
        layer.compile()
    none_bytes, g_none = step()
    model.gradient_checkpointing_enable()
    full_bytes, _ = step()
    model.gradient_checkpointing_disable()
    _, g_none_packed = step(pos)
    for layer in model.model.layers:  # back to plain modules, then the selective compile
        layer._compiled_call_impl = None
    model.gradient_checkpointing_enable(selective=True)
    model.model.compile_selective_layers()
    sel_bytes, g_sel = step()
    assert full_bytes < sel_bytes < none_bytes
    for n, g in g_none.items():
        assert torch.equal(g_sel[n], g), n
    with pytest.warns(UserWarning, match="packed or padded rows under sdpa run their layers uncompiled"):
        _, g_sel_packed = step(pos)
    for n, g in g_none_packed.items():
        torch.testing.assert_close(g_sel_packed[n], g, rtol=1e-5, atol=1e-7, msg=n)


class _CountSaved(_CountOps):
    def saved_ops(self) -> int:
        """Calls of ops the selective policy keeps (matmuls and attention kernels, custom varlen ops included)."""
        names = {op.__name__ for op in SAVED_OPS}
        return sum(n for name, n in self.calls.items() if name in names)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the real attention kernels)")
@pytest.mark.parametrize("attn, layout", [("sdpa", "full"), ("flash_attention_2", "packed")])
def test_cuda_attention_kernels_are_kept_not_recomputed(attn, layout):
    """On the GPU the attention runs CUDA kernels (SDPA's flash / efficient, torch's varlen_attn or flash-attn) that
    the CPU tests never see: under selective checkpointing none of them, and no matmul, may run again in backward;
    bf16 gradients agree with no checkpointing (kernels with atomics in backward: not bit for bit)."""
    from phi3_lightning.model.backends import backend_available

    ok, why = backend_available(attn, torch.device("cuda"), torch.bfloat16)
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(get_preset("tiny"), attn_implementation=attn).cuda().bfloat16().train()
    x, mask, pos = (t.cuda() if t is not None else None for t in _batch(layout))
    results = {}
    for mode in ("none", "selective"):
        model.zero_grad(set_to_none=True)
        if mode == "none":
            model.gradient_checkpointing_disable()
        else:
            model.gradient_checkpointing_enable(selective=True)
        bwd = _CountSaved()
        loss = model(x, attention_mask=mask, position_ids=pos, labels=x, return_logits=False).loss
        with bwd:
            loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        results[mode] = (grads, bwd.saved_ops(), dict(bwd.calls))
    (g_none, saved_none, calls_none), (g_sel, saved_sel, calls_sel) = results["none"], results["selective"]
    assert saved_sel == saved_none, (calls_none, calls_sel)
    cos = torch.nn.functional.cosine_similarity(g_sel, g_none, dim=0).item()
    assert cos > 0.999 and torch.allclose(g_sel.norm(), g_none.norm(), rtol=1e-2)
