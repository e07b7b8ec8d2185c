"""flash_attention_2 through torch's own varlen_attn (no flash-attn package): the glue on CPU with a pure-torch
stand-in of the same signature (current and older torch signatures), the kernel choice and its report, and (on a
CUDA GPU with torch's flash kernels) the real varlen_attn against the eager fp32 reference."""

from __future__ import annotations

import pytest
import torch

from phi3_lightning import Phi3ForCausalLM
from phi3_lightning.model import backends
from phi3_lightning.model.backends import flash_available, flash_kernel, set_flash_kernels, use_torch_flash_impl
from phi3_lightning.model.masking import build_context

from .reference_kernels import (
    older_torch_varlen_attn,
    reference_flash_attn_func,
    reference_flash_attn_varlen_func,
    reference_torch_varlen_attn,
)
from .shapes import config
from .test_packing_backends import packed_batch


@pytest.fixture(autouse=True)
def _restore_kernels():
    yield
    set_flash_kernels(None)


def layout(kind: str, t: int = 24, doc_lens=((9, 11, 4), (13, 6))):
    """(attention_mask or None, position_ids) of batch 2: packed documents, left/right padding, or full rows."""
    b = len(doc_lens)
    pos = torch.arange(t).repeat(b, 1)
    mask = None
    if kind == "packed":
        for r, lens in enumerate(doc_lens):
            at = 0
            for n in lens:
                pos[r, at : at + n] = torch.arange(n)
                at += n
            pos[r, at:] = torch.arange(t - at)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[1, sum(doc_lens[1]) :] = 0  # row 1 also ends in padding
    elif kind == "padded":
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, :5] = 0  # left padding
        mask[1, t - 3 :] = 0  # right padding
    return mask, pos


def contexts(kind: str, window: int | None, t: int = 24, doc_lens=((9, 11, 4), (13, 6)), device="cpu"):
    mask, pos = layout(kind, t, doc_lens)
    mask = mask.to(device) if mask is not None else None
    pos = pos.to(device)

    def make():
        return build_context(
            batch_size=pos.shape[0],
            q_len=pos.shape[1],
            attention_mask=mask,
            position_ids=pos,
            past_len=0,
            sliding_window=window,
            derive_documents=True,
            device=torch.device(device),
        )

    real = mask.bool() if mask is not None else torch.ones_like(pos, dtype=torch.bool)
    return make, real


def run_backend(name, make_ctx, q, k, v, real, scale, dtype=torch.float32):
    """Output at real tokens and grads of q, k, v for a loss over real tokens only."""
    ctx = make_ctx()
    record = backends.BACKENDS[name]
    record.prepare(ctx, dtype)
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = record.attend(q, k, v, ctx, scale, 0.0)  # (B, T, H, D)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    loss = (out.float() * g.float() * real[:, :, None, None]).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return out.float()[real], [x.float() for x in grads]


def qkv(b=2, h=4, hkv=2, t=24, d=16, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(11)
    return tuple(torch.randn(b, n, t, d, generator=gen).to(device=device, dtype=dtype) for n in (h, hkv, hkv))


def assert_matches_eager(kind, window, stand_in, h=4, hkv=2, scale=None, atol=1e-5):
    make, real = contexts(kind, window)
    q, k, v = qkv(h=h, hkv=hkv)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    ref_out, ref_grads = run_backend("eager", make, q, k, v, real, scale)
    set_flash_kernels(torch_varlen=stand_in)
    out, grads = run_backend("flash_attention_2", make, q, k, v, real, scale)
    assert (out - ref_out).abs().max().item() < atol
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max().item() < atol


# ----------------------------------------------------------------------------- CPU: the glue, with a stand-in
@pytest.mark.parametrize("kind", ["packed", "padded", "full"])
@pytest.mark.parametrize("window", [3, None])
def test_torch_varlen_glue_matches_eager_forward_and_grads(kind, window):
    """GQA passed as enable_gqa; a window of 3 is shorter than every document (and row), so its boundary matters."""
    assert_matches_eager(kind, window, reference_torch_varlen_attn)


@pytest.mark.parametrize("kind", ["packed", "padded", "full"])
def test_torch_varlen_without_enable_gqa_repeats_kv_heads(kind):
    """A torch whose varlen_attn has no enable_gqa (and refuses unequal heads): kv heads are repeated first."""
    fn = older_torch_varlen_attn(enable_gqa=False)
    assert_matches_eager(kind, 3, fn)
    assert fn.calls and all("enable_gqa" not in c for c in fn.calls)


def test_window_maps_to_left_w_minus_1_and_plain_causal_when_it_cannot_bite():
    fn = older_torch_varlen_attn()
    assert_matches_eager("packed", 5, fn)  # longest document 13 > 5
    assert fn.calls[-1]["window_size"] == (4, 0) and fn.calls[-1]["enable_gqa"] is True
    fn.calls.clear()
    assert_matches_eager("packed", 13, fn)  # as long as the longest document: plain causal, the cheaper kernel
    assert fn.calls[-1]["window_size"] == (-1, 0)
    assert_matches_eager("full", 24, fn)  # rows of 24
    assert fn.calls[-1]["window_size"] == (-1, 0)
    assert_matches_eager("full", 23, fn)
    assert fn.calls[-1]["window_size"] == (22, 0)


def test_a_window_of_w_0_would_fail_the_parity_test():
    """The boundary test can fail: Phi-3's window w (q - w < k <= q) is flash's (w - 1, 0), not (w, 0)."""

    def off_by_one(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
    ):
        if window_size != (-1, 0):
            window_size = (window_size[0] + 1, 0)
        return reference_torch_varlen_attn(
            query,
            key,
            value,
            cu_seq_q,
            cu_seq_k,
            max_q,
            max_k,
            scale=scale,
            window_size=window_size,
            enable_gqa=enable_gqa,
        )

    with pytest.raises(AssertionError):
        assert_matches_eager("packed", 3, off_by_one)


def test_torch_2_10_signature_is_causal_and_default_scale():
    """torch 2.10's varlen_attn(..., is_causal=False, return_aux=None): no scale (folded into q), no window, no GQA."""
    fn = older_torch_varlen_attn(window_size=False, enable_gqa=False, scale=False)
    assert_matches_eager("packed", 13, fn, scale=0.3)  # the window cannot bite: longest document is 13
    assert fn.calls[-1] == {"is_causal": True}
    assert_matches_eager("full", None, fn)


def test_window_that_bites_is_refused_without_window_size():
    set_flash_kernels(torch_varlen=older_torch_varlen_attn(window_size=False, scale=False))
    make, real = contexts("packed", 3)
    q, k, v = qkv()
    with pytest.raises(
        ValueError,
        match=r"has no window_size, and sliding_window=3 is shorter .* \(13 tokens\); "
        r"use attn_implementation='sdpa'.*newer torch",
    ):
        run_backend("flash_attention_2", make, q, k, v, real, 0.25)


def test_dropout_is_refused_naming_attention_dropout():
    set_flash_kernels(torch_varlen=reference_torch_varlen_attn)
    make, _ = contexts("packed", None)
    ctx = make()
    backends.BACKENDS["flash_attention_2"].prepare(ctx, torch.float32)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"no attention dropout \(attention_dropout=0.1\); set attention_dropout=0"):
        backends.flash_attention(q, k, v, ctx, 0.25, 0.1)
    model = Phi3ForCausalLM(config("medium-4k", attention_dropout=0.1), attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="attention_dropout"):
        model.train()(torch.randint(3, 97, (1, 8)))
    model.eval()(torch.randint(3, 97, (1, 8)))  # no dropout at evaluation: runs


@pytest.mark.parametrize("shape", ["mini-4k", "medium-4k", "phi-4-mini"])
def test_model_loss_and_grads_equal_eager(shape):
    """The whole tiny model (window 7 / 9 inside 11- and 16-token documents, GQA) on packed rows: loss and every
    parameter's gradient through the torch-varlen glue equal the eager backend's."""
    torch.manual_seed(3)
    cfg = config(shape)
    eager = Phi3ForCausalLM(cfg, attn_implementation="eager")
    flash = Phi3ForCausalLM(cfg, attn_implementation="eager")
    flash.load_state_dict(eager.state_dict())
    set_flash_kernels(torch_varlen=reference_torch_varlen_attn)
    flash.set_attn_implementation("flash_attention_2")
    ids, pos, mask, _ = packed_batch([[11, 5, 14], [16, 3]], row_len=32)
    labels = ids.masked_fill(mask == 0, -100)
    losses = []
    for m in (eager, flash):
        loss = m(ids, attention_mask=mask, position_ids=pos, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5
    for (n, a), b in zip(eager.named_parameters(), flash.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), n


# ----------------------------------------------------------------------------- CPU: which kernel runs
def test_kernel_is_resolved_once_and_follows_set_flash_kernels():
    """prepare puts the same kernel object on every batch's context (no lookup per batch or layer); a new
    substitution is seen at the next batch."""
    set_flash_kernels(torch_varlen=reference_torch_varlen_attn)
    prepare = backends.BACKENDS["flash_attention_2"].prepare
    make, _ = contexts("full", None)
    first, second = make(), make()
    prepare(first, torch.float32)
    prepare(second, torch.float32)
    assert first.cache["flash_kernel"] is second.cache["flash_kernel"]
    assert first.cache["flash_kernel"].route == "torch_varlen"
    assert first.cache["cu_uniform"].tolist() == [0, 24, 48] and first.cache["cu_uniform"].dtype == torch.int32
    set_flash_kernels((reference_flash_attn_func, reference_flash_attn_varlen_func))
    third = make()
    prepare(third, torch.float32)
    assert third.cache["flash_kernel"].route == "flash_attn" and "cu_uniform" not in third.cache


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_flash_unavailable_on_cpu_says_why():
    assert flash_kernel() is None
    assert flash_available() == (False, "no CUDA device")
    ok, why = flash_available("cpu", torch.bfloat16)
    assert not ok and "runs on CUDA only (flash-attn or torch's varlen_attn); device is cpu" in why
    with pytest.raises(ValueError, match="flash_attention_2.*unavailable here: no CUDA device"):
        Phi3ForCausalLM(config("mini-4k"), attn_implementation="flash_attention_2")


def test_substituted_kernels_are_reported_and_flash_attn_preferred():
    set_flash_kernels(torch_varlen=reference_torch_varlen_attn)
    assert flash_kernel("cpu") == "substituted kernels (torch varlen_attn signature)"
    assert flash_available("cpu", torch.float32) == (True, "substituted kernels (torch varlen_attn signature)")
    assert backends.flash_kernels_substituted()

    called = []

    def spy(name, fn):
        def wrapped(*a, **kw):
            called.append(name)
            return fn(*a, **kw)

        return wrapped

    set_flash_kernels(
        (spy("func", reference_flash_attn_func), spy("varlen", reference_flash_attn_varlen_func)),
        torch_varlen=spy("torch", reference_torch_varlen_attn),
    )
    assert flash_kernel() == "substituted kernels"
    model = Phi3ForCausalLM(config("medium-4k"), attn_implementation="flash_attention_2").eval()
    ids, pos, mask, _ = packed_batch([[11, 5], [9]], row_len=16)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=pos)
        model(ids)
    assert set(called) == {"func", "varlen"}
    set_flash_kernels(None)
    assert not backends.flash_kernels_substituted()


def test_kernel_name_says_which_flash_implementation_torch_runs(monkeypatch):
    import torch.nn.attention as tna

    assert backends._torch_varlen_name() == f"torch {torch.__version__} varlen_attn (FlashAttention-2)" or (
        getattr(tna, "current_flash_attention_impl", lambda: None)() is not None
    )
    monkeypatch.setattr(tna, "current_flash_attention_impl", lambda: "FA3", raising=False)
    assert backends._torch_varlen_name() == f"torch {torch.__version__} varlen_attn (FlashAttention-3)"
    monkeypatch.setattr(tna, "current_flash_attention_impl", lambda: "FA4", raising=False)
    assert backends._torch_varlen_name().endswith("(FlashAttention-4)")


def test_use_torch_flash_impl_errors_say_why(monkeypatch):
    import torch.nn.attention as tna

    use_torch_flash_impl(None)  # the default: nothing to restore, no error
    if hasattr(tna, "activate_flash_attention_impl"):
        with pytest.raises(ValueError, match=r"unknown flash attention implementation 'FA9'"):
            use_torch_flash_impl("FA9")
        if not backends._module_present("flash_attn_interface"):
            with pytest.raises(
                ValueError, match=r"FA3 .*needs the Python module 'flash_attn_interface'.*not installed"
            ):
                use_torch_flash_impl("FA3")
            assert tna.current_flash_attention_impl() is None
    monkeypatch.delattr(tna, "activate_flash_attention_impl", raising=False)
    with pytest.raises(ValueError, match=r"has no torch.nn.attention.activate_flash_attention_impl"):
        use_torch_flash_impl("FA3")


# ----------------------------------------------------------------------------- GPU: the real varlen_attn
def _torch_varlen_on_gpu() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    fn, why = backends._torch_varlen_fn()
    if fn is None:
        return False, why
    if not torch.backends.cuda.is_flash_attention_available() or torch.cuda.get_device_capability()[0] < 8:
        return False, "torch's flash kernels cannot run on this GPU"
    return True, ""


_GPU_OK, _GPU_WHY = _torch_varlen_on_gpu()


def _force_torch_varlen():
    """The real varlen_attn: the natural choice without flash-attn; substituted (same function) when it is installed."""
    if backends.flash_attn_installed():
        fn, _ = backends._torch_varlen_fn()
        set_flash_kernels(torch_varlen=fn)
    else:
        assert flash_kernel().startswith(f"torch {torch.__version__} varlen_attn (FlashAttention-")


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU_OK, reason=_GPU_WHY or "ok")
@pytest.mark.parametrize("kind", ["packed", "padded", "full"])
@pytest.mark.parametrize("hkv", [4, 2])
def test_gpu_real_varlen_attn_matches_eager_fp32(kind, hkv):
    """bf16 varlen_attn vs the eager fp32 reference on the same bf16 inputs: window 7 over 40-token documents."""
    _force_torch_varlen()
    t, lens = 128, ((40, 40, 30), (40, 25))
    make, real = contexts(kind, 7, t=t, doc_lens=lens, device="cuda")
    q, k, v = qkv(h=4, hkv=hkv, t=t, d=64, dtype=torch.bfloat16, device="cuda")
    scale = 64**-0.5
    out, grads = run_backend("flash_attention_2", make, q, k, v, real, scale, torch.bfloat16)
    ref_out, ref_grads = run_backend("eager", make, q.float(), k.float(), v.float(), real, scale)
    assert (out - ref_out).abs().max().item() < 2e-2 * ref_out.abs().max().item()
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max().item() < 2e-2 * b.abs().max().item()
    # the window bites: without it the output is far off
    nowin, _ = contexts(kind, None, t=t, doc_lens=lens, device="cuda")
    far, _ = run_backend("eager", nowin, q.float(), k.float(), v.float(), real, scale)
    assert (far - ref_out).abs().max().item() > 10 * (out - ref_out).abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU_OK, reason=_GPU_WHY or "ok")
@pytest.mark.parametrize("shape", ["medium-4k", "mini-4k"])
def test_gpu_model_loss_and_grads_flash_vs_sdpa(shape):
    """The tiny model in bf16 on packed rows: flash_attention_2 (torch varlen_attn) vs sdpa, loss and grads."""
    _force_torch_varlen()
    torch.manual_seed(4)
    cfg = config(shape)
    sdpa = Phi3ForCausalLM(cfg, attn_implementation="sdpa").cuda().to(torch.bfloat16)
    flash = Phi3ForCausalLM(cfg, attn_implementation="sdpa").cuda().to(torch.bfloat16)
    flash.load_state_dict(sdpa.state_dict())
    flash.set_attn_implementation("flash_attention_2")
    ids, pos, mask, _ = packed_batch([[11, 5, 14], [20, 3]], row_len=40)
    ids, pos, mask = ids.cuda(), pos.cuda(), mask.cuda()
    labels = ids.masked_fill(mask == 0, -100)
    losses = []
    for m in (sdpa, flash):
        loss = m(ids, attention_mask=mask, position_ids=pos, labels=labels).loss
        loss.backward()
        losses.append(loss.float().item())
    assert abs(losses[0] - losses[1]) < 2e-2 * abs(losses[0])
    for (n, a), b in zip(sdpa.named_parameters(), flash.parameters()):
        scale = a.grad.float().abs().max().item()
        assert (a.grad.float() - b.grad.float()).abs().max().item() <= 5e-2 * scale + 1e-3, n


# ----------------------------------------------------------------------------- where the kernel is reported
def test_compare_attention_footnote_names_the_kernel(monkeypatch):
    from phi3_lightning.compare import run as compare_run

    monkeypatch.setattr(backends, "flash_kernel", lambda device=None: "torch 9.9 varlen_attn (FlashAttention-3)")
    assert compare_run._backend_label("flash_attention_2", False, torch.device("cuda")) == (
        "flash_attention_2",
        "flash_attention_2 ran torch 9.9 varlen_attn (FlashAttention-3)",
    )
    set_flash_kernels(torch_varlen=reference_torch_varlen_attn)
    label, note = compare_run._backend_label("flash_attention_2", False, torch.device("cpu"))
    assert label == "flash_attention_2*" and "substituted pure-torch kernels" in note


@pytest.mark.parametrize("backend", ["flash_attention_2", "sdpa"])
def test_fit_report_names_the_flash_kernel(tmp_path, backend):
    from types import SimpleNamespace

    from phi3_lightning.cli import run_report

    set_flash_kernels(torch_varlen=reference_torch_varlen_attn)
    logger = SimpleNamespace(log_dir=str(tmp_path / "r" / "version_0"), name="r", version=0)
    trainer = SimpleNamespace(
        loggers=[logger],
        checkpoint_callbacks=[],
        callbacks=[],
        lightning_module=SimpleNamespace(attn_implementation=backend),
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )
    report = run_report(trainer, "fit", "wrote to", ["fit", "--config", "x.yaml"])
    line = "  attention: flash_attention_2 ran substituted kernels (torch varlen_attn signature)"
    assert (line in report.splitlines()) == (backend == "flash_attention_2")
