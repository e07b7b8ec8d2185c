"""Parity with transformers' Phi3* classes (the oracle): fp32, CPU, tiny copies of every preset's shape."""

import pytest
import torch

from phi3_lightning import Phi3ForCausalLM, Phi3ForSequenceClassification, Phi3ForTokenClassification

from .hf_oracle import hf_model
from .shapes import SHAPES, config

PADDINGS = ("none", "left", "right")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def make_batch(padding, seq_len, vocab=97, pad_id=0, batch=3):
    x = torch.randint(3, vocab, (batch, seq_len))
    mask = torch.ones_like(x)
    if padding != "none":
        for i, n_pad in enumerate([0, 3, seq_len // 2][:batch]):
            if n_pad == 0:
                continue
            if padding == "left":
                mask[i, :n_pad] = 0
            else:
                mask[i, -n_pad:] = 0
        x = x.masked_fill(mask == 0, pad_id)
    labels = x.masked_fill(mask == 0, -100)
    # a token right after padding is predicted from a padding position: not a real target
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return x, mask, labels


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One random transformers checkpoint per shape and head, saved once per module."""
    out = {}
    for name in SHAPES:
        for head in ("causal_lm", "sequence_classification", "token_classification"):
            cfg = config(name, num_labels=3)
            torch.manual_seed(hash((name, head)) % 2**31)
            hf = hf_model(cfg, head)
            d = tmp_path_factory.mktemp(f"{name}-{head}")
            hf.save_pretrained(d)
            out[name, head] = d
    return out


def _hf(d, head, attn):
    import transformers

    cls = {
        "causal_lm": transformers.Phi3ForCausalLM,
        "sequence_classification": transformers.Phi3ForSequenceClassification,
        "token_classification": transformers.Phi3ForTokenClassification,
    }[head]
    return cls.from_pretrained(d, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_causal_lm_logits_and_loss(checkpoints, name, padding, attn):
    d = checkpoints[name, "causal_lm"]
    hf = _hf(d, "causal_lm", attn)
    ours = Phi3ForCausalLM.from_pretrained(d, attn_implementation=attn).eval()
    # 30 tokens: past every sliding window (7, 9) and past the LongRoPE switch (16); 12 stays below it.
    for seq_len in (12, 30):
        x, mask, labels = make_batch(padding, seq_len)
        with torch.no_grad():
            ref = hf(input_ids=x, attention_mask=mask, labels=labels)
            out = ours(x, attention_mask=mask, labels=labels)
        real = mask.bool()
        assert rel_err(out.logits[real], ref.logits[real]) < 1e-4
        assert abs(out.loss.item() - ref.loss.item()) / ref.loss.item() < 1e-5


@pytest.mark.parametrize("name", list(SHAPES))
def test_sequence_classification(checkpoints, name):
    d = checkpoints[name, "sequence_classification"]
    for attn in ("eager", "sdpa"):
        hf = _hf(d, "sequence_classification", attn)
        ours = Phi3ForSequenceClassification.from_pretrained(d, attn_implementation=attn).eval()
        for padding in PADDINGS:
            x, mask, _ = make_batch(padding, 20)
            y = torch.tensor([0, 2, 1])
            with torch.no_grad():
                ref = hf(input_ids=x, attention_mask=mask, labels=y)
                out = ours(x, attention_mask=mask, labels=y)
            assert out.logits.shape == (3, 3)
            assert rel_err(out.logits, ref.logits) < 1e-4
            assert abs(out.loss.item() - ref.loss.item()) / ref.loss.item() < 1e-5


@pytest.mark.parametrize("problem_type", ["regression", "multi_label_classification"])
def test_sequence_classification_problem_types(checkpoints, problem_type):
    import transformers

    d = checkpoints["mini-4k", "sequence_classification"]
    num_labels = 1 if problem_type == "regression" else 3
    hf = transformers.Phi3ForSequenceClassification.from_pretrained(
        d, num_labels=num_labels, problem_type=problem_type, ignore_mismatched_sizes=True
    ).eval()
    # copy the (re-initialised) score layer of the oracle so both heads hold the same weights
    ours = Phi3ForSequenceClassification.from_pretrained(
        d, num_labels=num_labels, problem_type=problem_type, strict_head=False
    ).eval()
    ours.score.weight.data.copy_(hf.score.weight.data)
    x, mask, _ = make_batch("right", 16)
    y = torch.randn(3) if num_labels == 1 else torch.randint(0, 2, (3, 3)).float()
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, labels=y)
        out = ours(x, attention_mask=mask, labels=y)
    assert rel_err(out.logits, ref.logits) < 1e-4
    assert abs(out.loss.item() - ref.loss.item()) / ref.loss.item() < 1e-5


@pytest.mark.parametrize("name", list(SHAPES))
def test_token_classification(checkpoints, name):
    d = checkpoints[name, "token_classification"]
    hf = _hf(d, "token_classification", "sdpa")
    ours = Phi3ForTokenClassification.from_pretrained(d, attn_implementation="sdpa").eval()
    for padding in PADDINGS:
        x, mask, _ = make_batch(padding, 18)
        y = torch.randint(0, 3, x.shape).masked_fill(mask == 0, -100)
        with torch.no_grad():
            ref = hf(input_ids=x, attention_mask=mask, labels=y)
            out = ours(x, attention_mask=mask, labels=y)
        real = mask.bool()
        assert rel_err(out.logits[real], ref.logits[real]) < 1e-4
        assert abs(out.loss.item() - ref.loss.item()) / ref.loss.item() < 1e-5


@pytest.mark.parametrize("name", ["mini-4k", "mini-128k", "phi-4-mini"])
def test_greedy_generation_token_identical(checkpoints, name):
    """Our cached greedy decode == transformers' generate; mini-128k/phi-4-mini cross the LongRoPE switch (16)."""
    d = checkpoints[name, "causal_lm"]
    hf = _hf(d, "causal_lm", "sdpa")
    ours = Phi3ForCausalLM.from_pretrained(d).eval()
    x = torch.randint(3, 97, (1, 10))
    ref = hf.generate(x, max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=14)
    out = ours.generate(x, max_new_tokens=14, eos_token_id=[])
    assert torch.equal(out, ref)


def test_batched_left_padded_generation_matches_transformers(checkpoints):
    d = checkpoints["medium-4k", "causal_lm"]
    hf = _hf(d, "causal_lm", "eager")
    ours = Phi3ForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    x, mask, _ = make_batch("left", 12)
    ref = hf.generate(
        input_ids=x,
        attention_mask=mask,
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        min_new_tokens=10,
    )
    out = ours.generate(x, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(out, ref)
