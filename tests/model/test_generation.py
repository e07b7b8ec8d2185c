"""KV-cached generation == greedy recomputation of the whole sequence at each step."""

import pytest
import torch

from phi3_lightning import Phi3ForCausalLM
from phi3_lightning.model.generation import sample_next, warp_logits

from .shapes import config


def recompute_greedy(model, x, mask, n):
    """The definition: at each step run the whole sequence, take the argmax of the last position."""
    tokens, m = x.clone(), mask.clone()
    for _ in range(n):
        pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 1)
        logits = model(tokens, attention_mask=m, position_ids=pos).logits[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
        m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    return tokens


@pytest.mark.parametrize("shape", ["mini-4k", "mini-128k", "medium-4k", "phi-4-mini", "phi-4"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_cached_equals_recomputation(shape, backend):
    torch.manual_seed(5)
    model = Phi3ForCausalLM(config(shape), attn_implementation=backend).eval()
    x = torch.randint(3, 97, (3, 9))
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding
    mask[2, :5] = 0
    x = x.masked_fill(mask == 0, 0)
    with torch.no_grad():
        ref = recompute_greedy(model, x, mask, 14)  # 9 + 14 = 23 > LongRoPE switch (16) and > windows
    out = model.generate(x, attention_mask=mask, max_new_tokens=14, eos_token_id=[])
    assert torch.equal(out, ref)


def test_longrope_switch_changes_the_numbers():
    """The regime matters: without the cache rebuild at the switch, the continuation would differ."""
    torch.manual_seed(6)
    model = Phi3ForCausalLM(config("mini-128k")).eval()
    x = torch.randint(3, 97, (1, 20))
    with torch.no_grad():
        long_logits = model(x).logits[0, 10]  # 20 > 16: long factors for every position
        short_logits = model(x[:, :11]).logits[0, 10]  # 11 <= 16: short factors
    assert (long_logits - short_logits).abs().max() > 1e-4  # fp32 noise is ~1e-7


def test_eos_stops_and_pads_finished_rows():
    torch.manual_seed(7)
    model = Phi3ForCausalLM(config("mini-4k")).eval()
    x = torch.randint(3, 97, (2, 5))
    free = model.generate(x, max_new_tokens=6, eos_token_id=[])
    first = int(free[0, 5])  # make row 0's first generated token an eos id
    out = model.generate(x, max_new_tokens=6, eos_token_id=[first, 96], pad_token_id=0)
    assert out[0, 5] == first and (out[0, 6:] == 0).all()
    if first not in free[1, 5:].tolist() and 96 not in free[1, 5:].tolist():
        assert torch.equal(out[1], free[1])


def test_sampling_is_reproducible_and_respects_top_k():
    torch.manual_seed(8)
    logits = torch.randn(4, 50)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = sample_next(logits, True, 0.7, 3, None, g1)
    b = sample_next(logits, True, 0.7, 3, None, g2)
    assert torch.equal(a, b)
    top3 = logits.topk(3, -1).indices
    for _ in range(20):
        s = sample_next(logits, True, 1.0, 3, None)
        assert all(int(s[i]) in top3[i].tolist() for i in range(4))


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sample_next(logits, True, 1.0, None, 0.7)) for _ in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7 <= 0.8: tokens 0 and 1 only


def _hf_warped(logits, temperature, top_k, top_p):
    """transformers' sampling warpers in generate's order (temperature, top-k, top-p): the oracle."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(None, logits.float())


def _kept(logits):
    return [row.isfinite().nonzero().flatten().tolist() for row in logits]


# (probabilities, temperature, top_k, top_p, the tokens transformers keeps): ties at the nucleus boundary, top_p
# exactly a cumulative mass (sums of powers of 2: no rounding), top_k ties at its k-th value, temperature. The rule:
# sorted ascending (ties in torch.sort's order: by token id for such short CPU rows), a token is dropped when the
# mass up to and including it is <= 1 - top_p.
TIE_CASES = [
    ([0.5, 0.25, 0.25], 1.0, None, 0.5, [0]),  # token 0's mass is exactly top_p: the tied pair is dropped
    ([0.5, 0.25, 0.25], 1.0, None, 0.75, [0, 2]),  # one of the tied pair: the higher token id
    ([0.25, 0.25, 0.25, 0.25], 1.0, None, 0.5, [2, 3]),  # all tied, top_p a cumulative mass
    ([0.25, 0.25, 0.25, 0.25], 1.0, None, 0.6, [1, 2, 3]),
    ([0.125, 0.375, 0.125, 0.375], 1.0, None, 0.375, [3]),  # exactly one token's mass, tied with another
    ([0.125, 0.375, 0.125, 0.375], 1.0, None, 0.8, [1, 2, 3]),  # into the lower tie: one of it
    ([0.7, 0.2, 0.1], 1.0, None, 0.9, [0, 1]),  # 0.7 + 0.2 reaches 0.9 (in float32)
    ([0.5, 0.25, 0.125, 0.125], 1.0, 3, 0.8, [0, 1, 3]),  # top_k's 3rd value is tied: 4 kept, then top_p drops one
    ([0.5, 0.25, 0.125, 0.0625, 0.0625], 1.0, 2, 0.5, [0]),  # top_p sees top_k's renormalised 2/3, 1/3
    ([0.5, 0.25, 0.125, 0.125], 0.5, None, 0.8, [0, 1]),  # temperature 0.5 sharpens: 16/21, 4/21, 1/21, 1/21
    ([0.4, 0.3, 0.3], 2.0, 2, 0.6, [0, 2]),  # temperature 2 flattens to 0.37, 0.32, 0.32; top_k keeps the tie
]


@pytest.mark.parametrize("probs, temperature, top_k, top_p, expected", TIE_CASES)
def test_sampling_filter_keeps_the_set_transformers_keeps(probs, temperature, top_k, top_p, expected):
    # ours kept one token too many whenever top_p equalled a cumulative mass (it dropped a token only when the mass
    # before it exceeded top_p) and, of tied tokens at the boundary, the lower token ids (transformers: the higher):
    # [0.5, 0.25, 0.25] with top_p 0.5 kept [0, 1], with 0.75 all three
    logits = torch.tensor([probs]).log()
    ref = _hf_warped(logits, temperature, top_k, top_p)
    got = warp_logits(logits, temperature, top_k, top_p)
    assert _kept(ref) == [expected]
    assert _kept(got) == [expected]
    assert torch.equal(got, ref)  # the kept logits too (temperature-scaled), -inf elsewhere


def test_sampling_filter_equals_transformers_on_random_tied_batches():
    # rows with many ties (logits rounded to a coarse grid), the batch dimension, top_p values that hit masses; in
    # rows this long torch.sort's (unstable) order of ties is not by token id, and ours follows it as transformers do
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 40, generator=g) * 2).round() / 2
    for temperature in (1.0, 0.7):
        for top_k in (None, 5, 12):
            for top_p in (0.3, 0.5, 0.9, 0.95, 1.0):
                ref = _hf_warped(logits, temperature, top_k, top_p)
                got = warp_logits(logits, temperature, top_k, top_p)
                assert torch.equal(got, ref), (temperature, top_k, top_p)


def test_sampling_draws_only_from_the_kept_set():
    logits = torch.tensor([[0.25, 0.25, 0.25, 0.25]]).log()
    seen = {int(sample_next(logits, True, 1.0, None, 0.5)) for _ in range(200)}
    assert seen == {2, 3}


def test_generate_rejects_too_long():
    model = Phi3ForCausalLM(config("mini-4k"))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=128"):
        model.generate(torch.ones(1, 100, dtype=torch.long), max_new_tokens=40)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_new_tokens=-1), r"max_new_tokens=-1 must be an integer >= 0"),
        (
            dict(do_sample=True, temperature=float("nan")),
            r"temperature=nan must be a finite number > 0 when sampling.*"
            r"do_sample=False for greedy",
        ),
        (dict(do_sample=True, temperature=float("inf")), r"temperature=inf must be a finite number > 0"),
        (dict(do_sample=True, temperature=0.0), r"temperature=0.0 must be a finite number > 0"),
        (dict(do_sample=True, top_p=-0.5), r"top_p=-0.5 must be in \(0, 1\].*use None or 1.0"),
        (dict(do_sample=True, top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(do_sample=True, top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(do_sample=True, top_k=0), r"top_k=0 must be an integer >= 1; use None"),
        (dict(do_sample=True, top_k=-3), r"top_k=-3 must be an integer >= 1"),
        # greedy decoding would silently ignore them
        (dict(temperature=0.7), r"temperature=0.7 only apply when sampling, but do_sample is off.*do_sample=True"),
        (dict(top_k=5, top_p=0.9), r"top_k=5, top_p=0.9 only apply when sampling"),
    ],
)
def test_generate_rejects_settings_that_cannot_work(kwargs, message):
    model = Phi3ForCausalLM(config("mini-4k"))
    with pytest.raises(ValueError, match=message):
        model.generate(torch.ones(1, 4, dtype=torch.long), **{"max_new_tokens": 3, **kwargs})


def test_generate_edge_values_that_work():
    model = Phi3ForCausalLM(config("mini-4k")).eval()
    x = torch.full((1, 4), 5, dtype=torch.long)
    assert torch.equal(model.generate(x, max_new_tokens=0), x)
    g = torch.Generator().manual_seed(0)
    out = model.generate(x, max_new_tokens=3, do_sample=True, temperature=1e-3, top_k=1, top_p=1.0, generator=g)
    assert torch.equal(out, model.generate(x, max_new_tokens=3))  # top_k=1 is greedy


@pytest.mark.parametrize(
    "mask_rows,message",
    [
        # right padding: the first new token would be predicted from a pad position and appended after the pads
        ([[1, 1, 1, 1], [1, 1, 0, 0]], r"attention_mask row 1 has padding after its tokens.*left padding"),
        ([[1, 0, 1, 1], [1, 1, 1, 1]], r"attention_mask row 0 has padding after its tokens"),
        # a row with no token at all has nothing to continue
        ([[1, 1, 1, 1], [0, 0, 0, 0]], r"attention_mask row 1 has no tokens"),
        ([[1, 1, 2, 1], [1, 1, 1, 1]], r"attention_mask must hold only 0 \(padding\) and 1"),
    ],
)
def test_generate_refuses_masks_it_would_continue_wrongly(mask_rows, message):
    model = Phi3ForCausalLM(config("mini-4k")).eval()
    x = torch.full((2, 4), 5, dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        model.generate(x, attention_mask=torch.tensor(mask_rows), max_new_tokens=2)


def test_generate_refuses_a_mask_of_another_shape():
    model = Phi3ForCausalLM(config("mini-4k")).eval()
    x = torch.full((2, 4), 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 5\) does not match input_ids \(2, 4\)"):
        model.generate(x, attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=2)


def test_left_padded_row_continues_as_the_row_alone():
    """A left-padded row generates exactly what the row alone generates (greedy, fp32)."""
    torch.manual_seed(9)
    model = Phi3ForCausalLM(config("mini-4k")).eval()
    x = torch.randint(3, 97, (2, 6))
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    out = model.generate(x.masked_fill(mask == 0, 0), attention_mask=mask, max_new_tokens=5, eos_token_id=[])
    alone = model.generate(x[1:, 3:], max_new_tokens=5, eos_token_id=[])
    assert torch.equal(out[1, 6:], alone[0, 3:])
