"""KV-cached generation: greedy and sampling (temperature, top-k, top-p), left-padded batches, several eos ids.

The loop is lean: one preallocated :class:`KVCache`, logits only for the last position, sampling on those.
Cached generation equals greedy recomputation of the whole sequence at every step, including across the
LongRoPE switch: when the sequence first grows past ``original_max_position_embeddings`` the rotary regime of
a full recomputation changes for *every* position, so the cache is rebuilt once in the long regime.

Position ids follow transformers' ``generate``: ``cumsum(attention_mask) - 1`` with padding set to 1.
"""

from __future__ import annotations

import math

import torch

from .cache import KVCache


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def check_generation_args(
    max_new_tokens: int, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    """ValueError naming the value, before any work: these would otherwise fail mid-generation with a shape error or
    "probability tensor contains either inf, nan or element < 0"."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0 (the number of tokens to add)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1; use None to sample from the whole vocabulary")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (the probability mass kept); use None or 1.0 to keep all")
    if not do_sample:
        # greedy decoding takes the argmax: a sampling setting would be silently ignored
        unused = [
            f"{name}={value!r}"
            for name, value, neutral in (
                ("temperature", temperature, (1.0,)),
                ("top_k", top_k, (None,)),
                ("top_p", top_p, (None, 1.0)),
            )
            if value not in neutral
        ]
        if unused:
            raise ValueError(
                f"{', '.join(unused)} only apply when sampling, but do_sample is off (greedy decoding picks the most "
                "likely token); add do_sample=True (--do_sample), or drop them for greedy decoding"
            )
    if do_sample and not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature={temperature!r} must be a finite number > 0 when sampling (1.0 = the model's "
            "distribution); use do_sample=False for greedy decoding"
        )


def _check_left_padded(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> None:
    """ValueError unless every row is left padding (0s) followed by at least one token (1s): new tokens are appended
    at the right end and the first one is predicted from the last position, so right padding (or a row with no
    token) would silently continue from a pad."""
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not match input_ids "
            f"{tuple(input_ids.shape)}; give one 0/1 entry per prompt token"
        )
    m = attention_mask.long()
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    empty = (m.sum(-1) == 0).nonzero()
    if empty.numel():
        raise ValueError(
            f"attention_mask row {int(empty[0])} has no tokens; every prompt needs at least one token (e.g. bos)"
        )
    right = (m[:, 1:] < m[:, :-1]).any(-1).nonzero()
    if right.numel():
        raise ValueError(
            f"attention_mask row {int(right[0])} has padding after its tokens; generate appends new tokens at the "
            "right end, so prompts need left padding (the collators' padding_side='left')"
        )


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """(B, V) logits -> fp32 logits divided by ``temperature``, ``-inf`` outside the sampled set: the same set and
    values as transformers' warpers in ``generate``'s order (temperature, top-k, top-p; tested against them).

    top-k keeps every token whose logit is at least the k-th largest (a tie at the k-th value keeps all of it).
    top-p (nucleus) keeps the most probable tokens whose mass reaches ``top_p``, probabilities taken after top-k:
    sorted ascending, a token is dropped when the mass up to and including it is at most ``1 - top_p``; the most
    probable token is always kept. So a nucleus whose mass equals ``top_p`` exactly gets no further token, and of
    tied tokens straddling the boundary only those that ``torch.sort`` (not stable, as transformers calls it) places
    last are kept: the same tokens as transformers on the same device (on CPU, for a short row, the higher ids; in
    general an arbitrary but deterministic choice among equal logits)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ascending, order = logits.sort(dim=-1)  # unstable, as transformers': the same order of ties
        below = ascending.softmax(-1).cumsum(-1) <= 1 - top_p  # (B, V): the tail holding at most 1 - top_p
        below[:, -1] = False  # the most probable token stays
        logits = logits.masked_fill(below.scatter(-1, order, below), float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) last-position logits -> (B,) next tokens: the argmax, or a draw from :func:`warp_logits`' set."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling; use do_sample=False for greedy")
    probs = warp_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return (B, T + n) = prompt followed by generated tokens; finished rows are filled with the pad id."""
    config = model.config
    check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, seq_len) tensor, got shape {tuple(input_ids.shape)}")
    b, t0 = input_ids.shape
    total = t0 + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt of {t0} + {max_new_tokens} new tokens exceeds max_position_embeddings="
            f"{config.max_position_embeddings}; shorten the prompt or max_new_tokens"
        )
    if eos_token_id is None:
        eos_token_id = config.eos_token_ids
    eos = torch.tensor(
        eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id],
        dtype=torch.long,
        device=input_ids.device,
    )
    pad = (
        pad_token_id
        if pad_token_id is not None
        else (config.pad_token_id if config.pad_token_id is not None else int(eos[0]) if eos.numel() else 0)
    )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    else:
        _check_left_padded(attention_mask, input_ids)
    mask = torch.ones(b, total, dtype=torch.long, device=input_ids.device)
    mask[:, :t0] = attention_mask
    tokens = torch.full((b, total), pad, dtype=torch.long, device=input_ids.device)
    tokens[:, :t0] = input_ids
    positions = _positions(mask)  # (B, total): future positions continue each row's count
    was_training = model.training
    model.eval()
    cache = KVCache.for_model(config, b, total, model.dtype, input_ids.device)
    orig = config.original_max_position_embeddings

    logits = _prefill(model, tokens, mask, positions, cache, t0, orig)
    finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    cur = t0
    for step in range(max_new_tokens):
        nxt = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        tokens[:, cur] = nxt
        cur += 1
        if eos.numel():
            finished |= torch.isin(nxt, eos)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        # Would recomputing the whole sequence [0, cur) use another LongRoPE regime than the cached keys did?
        if config.is_longrope and bool(positions[:, cur - 1].max() + 1 > orig) != cache.long_rope:
            logits = _prefill(model, tokens, mask, positions, cache, cur, orig)
            continue
        out = model(
            tokens[:, cur - 1 : cur],
            attention_mask=mask[:, :cur],
            position_ids=positions[:, cur - 1 : cur],
            cache=cache,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1]
    model.train(was_training)
    return tokens[:, :cur]


def _prefill(model, tokens, mask, positions, cache: KVCache, cur: int, orig: int) -> torch.Tensor:
    """(Re)build the cache over tokens [0, cur) in the regime a full recomputation would use; last logits."""
    cache.reset()
    out = model(
        tokens[:, :cur], attention_mask=mask[:, :cur], position_ids=positions[:, :cur], cache=cache, logits_to_keep=1
    )
    cache.long_rope = bool(positions[:, :cur].max() + 1 > orig)
    return out.logits[:, -1]
