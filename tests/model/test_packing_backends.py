"""A packed row (position_ids restarting per document) equals the documents run one by one, on every backend."""

import dataclasses
import re

import pytest
import torch

from phi3_lightning import Phi3ForCausalLM
from phi3_lightning.model import backends
from phi3_lightning.model.backends import set_flash_kernels
from phi3_lightning.model.masking import document_ids

from .reference_kernels import reference_flash_attn_func, reference_flash_attn_varlen_func
from .shapes import config


@pytest.fixture
def flash_reference():
    """The flash backend's unpad/varlen glue, run on CPU with pure-torch kernels of the same signature."""
    set_flash_kernels((reference_flash_attn_func, reference_flash_attn_varlen_func))
    yield
    set_flash_kernels(None)


def cpu_backends():
    names = ["eager", "sdpa", "flash_attention_2"]
    if backends.flex_available()[0]:
        names.append("flex")
    return names


def packed_batch(lengths_per_row, vocab=97, row_len=None):
    rows, docs = [], []
    for lengths in lengths_per_row:
        ids, pos = [], []
        row_docs = []
        for n in lengths:
            d = torch.randint(3, vocab, (n,))
            row_docs.append(d)
            ids.append(d)
            pos.append(torch.arange(n))
        ids, pos = torch.cat(ids), torch.cat(pos)
        rows.append((ids, pos))
        docs.append(row_docs)
    t = max(r[0].numel() for r in rows) if row_len is None else row_len
    input_ids = torch.zeros(len(rows), t, dtype=torch.long)
    position_ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, (ids, pos) in enumerate(rows):
        input_ids[i, : ids.numel()] = ids
        position_ids[i, : ids.numel()] = pos
        # tail padding continues counting as its own pseudo-document
        position_ids[i, ids.numel() :] = torch.arange(t - ids.numel())
        mask[i, : ids.numel()] = 1
    return input_ids, position_ids, mask, docs


def test_document_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [5, 6, 7, 8, 0, 1, 2, 3]])
    assert document_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 0, 0, 0, 1, 1, 1, 1]]


@pytest.mark.parametrize("shape", ["mini-4k", "medium-4k", "phi-4-mini"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_packed_equals_one_by_one(shape, backend, flash_reference):
    torch.manual_seed(1)
    cfg = config(shape)
    model = Phi3ForCausalLM(cfg, attn_implementation=backend).eval()
    # documents longer than the sliding windows (7, 9) so the window matters inside a document, and no longer
    # than 16 so LongRoPE (switch at 16) picks the short regime for the packed row and each document alike: the
    # regime follows max(position_ids) + 1, i.e. the longest document, not the row length.
    input_ids, position_ids, mask, docs = packed_batch([[11, 5, 14], [16, 3]], row_len=32)
    with torch.no_grad():
        packed = model(input_ids, attention_mask=mask, position_ids=position_ids).logits
        ref_model = Phi3ForCausalLM(cfg, attn_implementation="eager").eval()
        ref_model.load_state_dict(model.state_dict())
        for r, row_docs in enumerate(docs):
            start = 0
            for d in row_docs:
                alone = ref_model(d[None]).logits[0]
                got = packed[r, start : start + d.numel()]
                assert (got - alone).abs().max().item() < 1e-4 * alone.abs().max().item()
                start += d.numel()


def test_packed_loss_is_token_weighted_mean_of_documents():
    torch.manual_seed(2)
    model = Phi3ForCausalLM(config("medium-4k")).eval()
    input_ids, position_ids, mask, docs = packed_batch([[9, 6], [12]], row_len=16)
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[position_ids == 0] = -100  # no target crosses a document boundary
    with torch.no_grad():
        packed = model(input_ids, attention_mask=mask, position_ids=position_ids, labels=labels).loss
        total, count = 0.0, 0
        for row_docs in docs:
            for d in row_docs:
                total += model(d[None], labels=d[None]).loss.item() * (d.numel() - 1)
                count += d.numel() - 1
    assert abs(packed.item() - total / count) < 1e-5 * abs(total / count)


def test_flash_backend_padded_batch_matches_sdpa(flash_reference):
    torch.manual_seed(3)
    cfg = config("medium-4k")
    flash = Phi3ForCausalLM(cfg, attn_implementation="flash_attention_2").eval()
    sdpa = Phi3ForCausalLM(cfg, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(flash.state_dict())
    x = torch.randint(3, 97, (2, 20))
    mask = torch.ones_like(x)
    mask[1, :6] = 0  # left padding -> unpadded varlen path
    with torch.no_grad():
        a = flash(x, attention_mask=mask).logits
        b = sdpa(x, attention_mask=mask).logits
        c = flash(x).logits  # full rows -> flash_attn_func path
        d = sdpa(x).logits
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() < 1e-4
    assert (c - d).abs().max() < 1e-4


def test_unavailable_backend_is_a_clear_error():
    with pytest.raises(
        ValueError, match="unknown attn_implementation='xformers'; choose one of eager, sdpa, flash_attention_2, flex"
    ):
        Phi3ForCausalLM(config("mini-4k"), attn_implementation="xformers")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="flash_attention_2.*unavailable"):
            Phi3ForCausalLM(config("mini-4k"), attn_implementation="flash_attention_2")


@pytest.mark.skipif(
    not torch.cuda.is_available() or not backends.flash_attn_installed(),
    reason="needs a CUDA GPU and the flash-attn package",
)
def test_real_flash_kernel_packed_matches_sdpa():
    torch.manual_seed(4)
    cfg = config("medium-4k")
    model = Phi3ForCausalLM(cfg, attn_implementation="sdpa").cuda().to(torch.bfloat16).eval()
    input_ids, position_ids, mask, _ = packed_batch([[11, 5, 14], [20, 3]], row_len=32)
    input_ids, position_ids, mask = input_ids.cuda(), position_ids.cuda(), mask.cuda()
    with torch.no_grad():
        ref = model(input_ids, attention_mask=mask, position_ids=position_ids).logits.float()
        model.set_attn_implementation("flash_attention_2")
        out = model(input_ids, attention_mask=mask, position_ids=position_ids).logits.float()
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max() < 3e-2 * ref.abs().max()


@pytest.mark.parametrize("window", [None, 6])
def test_sdpa_by_document_groups_equal_one_call_per_document_with_grads(window):
    """Documents grouped by length and right-padded inside a group give each document's own causal attention,
    forward and backward (padding queries dropped, padding keys never seen by a real query)."""
    import torch.nn.functional as F

    from phi3_lightning.model.masking import build_context
    from phi3_lightning.model.varlen import sdpa_by_document

    torch.manual_seed(3)
    rows = [[1, 7, 2, 13, 4, 3], [9, 8, 16, 1], [5]]  # many lengths -> several groups, one doc per group too
    t, h, d = 40, 2, 8
    pos = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for r, lens in enumerate(rows):
        at = 0
        for n in lens:
            pos[r, at : at + n] = torch.arange(n)
            at += n
        mask[r, :at] = 1
        pos[r, at:] = torch.arange(t - at)
    ctx = build_context(
        batch_size=len(rows),
        q_len=t,
        attention_mask=mask,
        position_ids=pos,
        past_len=0,
        sliding_window=window,
        derive_documents=True,
        device=pos.device,
    )
    q, k, v = (torch.randn(len(rows), h, t, d, requires_grad=True) for _ in range(3))
    out = sdpa_by_document(q, k, v, ctx, d**-0.5, 0.0)  # (B, T, H, D)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref = torch.zeros_like(out)
    for r, lens in enumerate(rows):
        at = 0
        for n in lens:
            sl = slice(at, at + n)
            i = torch.arange(n)
            allowed = i[None, :] <= i[:, None]
            if window is not None:
                allowed &= i[None, :] > i[:, None] - window
            ref[r, sl] = F.scaled_dot_product_attention(
                q[r : r + 1, :, sl], k[r : r + 1, :, sl], v[r : r + 1, :, sl], attn_mask=allowed, scale=d**-0.5
            )[0].transpose(0, 1)
            at += n
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    assert torch.allclose(out, ref, atol=1e-6)
    assert out[mask == 0].abs().max() == 0  # padding rows are zero
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
def test_prepare_builds_everything_the_layers_read(backend, flash_reference):
    """Each backend's prepare fills the context once; the layers then only read it (nothing added per layer)."""
    torch.manual_seed(5)
    model = Phi3ForCausalLM(config("mini-4k"), attn_implementation=backend).eval()
    ids, pos, mask, _ = packed_batch([[11, 5, 14], [20, 3]], row_len=40)
    seen = []
    record = backends.BACKENDS[backend]

    def attend(q, k, v, ctx, scale, dropout_p):
        seen.append(set(ctx.cache))
        return record.attend(q, k, v, ctx, scale, dropout_p)

    backends.BACKENDS[backend] = dataclasses.replace(record, attend=attend)
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=pos)
    finally:
        backends.BACKENDS[backend] = record
    assert len(seen) == model.config.num_hidden_layers and seen[0] and all(s == seen[0] for s in seen)


def test_one_message_for_a_wrong_backend_name():
    assert list(backends.BACKENDS) == ["eager", "sdpa", "flash_attention_2", "flex"]
    assert backends.DEFAULT_BACKEND in backends.BACKENDS
    with pytest.raises(
        ValueError,
        match=r"unknown attn_implementation='flash_attention'; choose one of eager, "
        r"sdpa, flash_attention_2, flex; did you mean flash_attention_2\?",
    ):
        backends.check_backend("flash_attention")
    from phi3_lightning.memory import estimate_memory

    with pytest.raises(ValueError, match="unknown attn_implementation='spda'.*did you mean sdpa"):
        estimate_memory("tiny", attn_implementation="spda", seq_len=16)


# ----------------------------------------------------------------------------- flex mask rule and kernel options
def _dense(mask_mod, b, t):
    """Evaluate a flex mask_mod on the whole (B, T, T) grid, as create_block_mask does."""
    bi = torch.arange(b)[:, None, None]
    qi = torch.arange(t)[None, :, None]
    ki = torch.arange(t)[None, None, :]
    return mask_mod(bi, 0, qi, ki).expand(b, t, t)


@pytest.mark.parametrize("kind", ["padded", "packed", "packed_window", "plain_window"])
def test_flex_mask_rule_is_the_reference_mask_and_every_row_is_safe(kind):
    """The flex mask equals the eager/sdpa boolean mask, and every query sees at least itself: what makes the
    ROWS_GUARANTEED_SAFE kernel option (passed on CUDA) valid."""
    from phi3_lightning.model.masking import build_context

    b, t = 2, 24
    pos = torch.arange(t)[None].repeat(b, 1)
    mask = None
    if kind == "padded":
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, 17:] = 0
        mask[1, :5] = 0
    if kind.startswith("packed"):
        _, pos, mask, _ = packed_batch([[7, 9, 8], [3, 12, 5, 4]], row_len=t)
    window = 4 if kind.endswith("window") else None
    ctx = build_context(
        batch_size=b,
        q_len=t,
        attention_mask=mask,
        position_ids=pos,
        past_len=0,
        sliding_window=window,
        derive_documents=True,
        device=torch.device("cpu"),
    )
    dense = _dense(backends.flex_mask_mod(ctx), b, t)
    ref = ctx.bool_mask()
    assert ref is not None
    assert torch.equal(dense, ref[:, 0])
    assert bool(dense.any(-1).all())  # no empty row
    assert bool(dense.diagonal(dim1=1, dim2=2).all())


def test_flex_kernel_options():
    assert backends.flex_kernel_options("cpu") is None  # eager flex: torch's defaults
    assert backends.flex_kernel_options("cuda") == {"ROWS_GUARANTEED_SAFE": True}
    try:
        backends.set_flex_kernel_options({"USE_TMA": True, "BLOCK_M": 64})
        assert backends.flex_kernel_options("cuda") == {"ROWS_GUARANTEED_SAFE": True, "USE_TMA": True, "BLOCK_M": 64}
        backends.set_flex_compile(False)  # uncompiled flex takes no Triton options
        assert backends.flex_kernel_options("cuda") is None
    finally:
        backends.set_flex_kernel_options(None)
        backends.set_flex_compile(None)
    assert backends.flex_kernel_options("cuda") == {"ROWS_GUARANTEED_SAFE": True}
    with pytest.raises(ValueError, match="a dict or None"):
        backends.set_flex_kernel_options("USE_TMA")


def test_flex_block_mask_builder_is_compiled_once_on_cuda_only():
    from torch.nn.attention.flex_attention import create_block_mask

    assert backends._create_block_mask_fn(torch.device("cpu")) is create_block_mask
    cuda_fn = backends._create_block_mask_fn(torch.device("cuda"))  # torch.compile wraps lazily: no CUDA needed
    assert cuda_fn is not create_block_mask
    assert backends._create_block_mask_fn(torch.device("cuda")) is cuda_fn  # one compiled builder per process


@pytest.mark.parametrize("attn", cpu_backends())
def test_position_ids_of_one_row_broadcast_over_the_batch(attn, flash_reference):
    """position_ids of shape (1, T) (as transformers accepts) with a batch of 2 packed rows: the same logits as the
    ids expanded to (B, T) on every backend (flex used to fail with an IndexError)."""
    torch.manual_seed(0)
    m = Phi3ForCausalLM(config("medium-4k"), attn_implementation=attn).eval()
    ids = torch.randint(3, 97, (2, 12))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        want = m(ids, position_ids=pos.expand(2, -1)).logits
        got = m(ids, position_ids=pos).logits
    assert torch.allclose(got, want, atol=1e-6)
    # and both are the documents run one by one
    with torch.no_grad():
        docs = torch.cat([m(ids[:, s:e]).logits for s, e in ((0, 4), (4, 7), (7, 12))], dim=1)
    assert torch.allclose(got, docs, atol=1e-5)


@pytest.mark.parametrize("shape", [(12,), (2, 11), (3, 12), (2, 12, 1)])
def test_position_ids_of_a_wrong_shape_are_named(shape):
    m = Phi3ForCausalLM(config("medium-4k")).eval()
    with pytest.raises(
        ValueError, match=re.escape(f"position_ids of shape {tuple(shape)}") + r".*\(2, 12\) or \(1, 12\)"
    ):
        m(torch.randint(3, 97, (2, 12)), position_ids=torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("shape", [(12,), (1, 12), (3, 12), (2, 12, 1)])
def test_attention_mask_of_a_wrong_shape_is_named(attn, shape):
    """A mask that is not (batch, seq_len) was an IndexError/RuntimeError, or (sdpa, a 1-D mask) silently
    broadcast over the batch."""
    m = Phi3ForCausalLM(config("medium-4k"), attn_implementation=attn).eval()
    mask = torch.ones(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=re.escape(f"attention_mask of shape {tuple(shape)}") + r".*\(2, 12\)"):
        with torch.no_grad():
            m(torch.randint(3, 97, (2, 12)), attention_mask=mask)
