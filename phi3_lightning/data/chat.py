"""Chat templates of the Phi family, and tokenising a conversation with loss only on the assistant's tokens.

The layouts (``…`` is a message's content):

* ``"phi3"`` (Phi-3, Phi-3.5) and ``"byte"`` (the built-in byte tokenizer)::

      <|system|>\\n…<|end|>\\n<|user|>\\n…<|end|>\\n<|assistant|>\\n…<|end|>\\n

* ``"phi4-mini"`` (Phi-4-mini)::

      <|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|>

* ``"phi4"`` (phi-4)::

      <|im_start|>system<|im_sep|>…<|im_end|><|im_start|>user<|im_sep|>…<|im_end|><|im_start|>assistant<|im_sep|>…<|im_end|>

Trained on (label = token id) are the assistant's content and the end-of-turn token that closes it (``<|end|>`` /
``<|im_end|>``), so the model learns both to answer and to stop. The role headers, the other turns and the newline
after ``<|end|>`` (phi3) get -100.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from .collate import IGNORE_INDEX
from .tokenizer import CHAT_FORMATS, Tokenizer

__all__ = ["Segment", "render_chat", "tokenize_chat", "chat_text", "ROLES"]

ROLES = ("system", "user", "assistant")


class Segment(NamedTuple):
    """A piece of a rendered conversation; ``is_assistant`` pieces are the ones trained on."""

    text: str
    is_assistant: bool


def _turn(chat_format: str, role: str, content: str) -> tuple[str, str, str]:
    """(header, content + end-of-turn, trailer) of one message in a format."""
    if chat_format in ("phi3", "byte"):
        return f"<|{role}|>\n", f"{content}<|end|>", "\n"
    if chat_format == "phi4-mini":
        return f"<|{role}|>", f"{content}<|end|>", ""
    if chat_format == "phi4":
        return f"<|im_start|>{role}<|im_sep|>", f"{content}<|im_end|>", ""
    raise ValueError(f"chat_format {chat_format!r} is unknown; use one of {CHAT_FORMATS}")


def _generation_prompt(chat_format: str) -> str:
    return _turn(chat_format, "assistant", "")[0]


def render_chat(
    messages: Sequence[Mapping[str, Any]], chat_format: str, add_generation_prompt: bool = False
) -> list[Segment]:
    """Render ``[{"role": ..., "content": ...}, ...]`` in a Phi chat format, as segments flagged assistant or not.

    ``"".join(s.text for s in segments)`` is the text the checkpoint's chat template produces (without a trailing
    eos). ``add_generation_prompt`` appends the assistant header (for generation).
    """
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format {chat_format!r} is unknown; use one of {CHAT_FORMATS}")
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ValueError(
            f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, got {str(messages)[:80]!r}"
        )
    segments: list[Segment] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i} is {str(msg)[:80]!r}; each message needs a 'role' and a 'content' key")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; use one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} has content of type {type(content).__name__}; content must be a string")
        header, body, trailer = _turn(chat_format, role, content)
        is_assistant = role == "assistant"
        segments.append(Segment(header, False))
        segments.append(Segment(body, is_assistant))
        if trailer:
            segments.append(Segment(trailer, False))
    if add_generation_prompt:
        segments.append(Segment(_generation_prompt(chat_format), False))
    return segments


def chat_text(messages: Sequence[Mapping[str, Any]], chat_format: str, add_generation_prompt: bool = False) -> str:
    """The rendered conversation as one string."""
    return "".join(s.text for s in render_chat(messages, chat_format, add_generation_prompt))


def tokenize_chat(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    chat_format: str | None = None,
    add_bos: bool = False,
    add_eos: bool = False,
) -> dict[str, list[int]]:
    """Token ids and labels of a conversation: ``labels[t] = input_ids[t]`` on assistant tokens, -100 elsewhere.

    The whole rendered text is tokenised at once (exactly as at inference), and a token counts as the assistant's
    when its first character lies in an assistant segment (character offsets from the tokenizer).

    Args:
        messages: the conversation.
        tokenizer: its tokenizer; the chat format defaults to ``tokenizer.chat_format``.
        chat_format: override the format.
        add_bos: prepend ``tokenizer.bos_token_id`` (label -100); an error if the tokenizer has no bos token.
        add_eos: append ``tokenizer.eos_token_id`` (labelled when the conversation ends with an assistant turn),
            unless the text already ends with it (phi-4, whose eos is the end-of-turn ``<|im_end|>``).
    """
    if add_bos and tokenizer.bos_token_id is None:
        raise ValueError(
            "add_bos=True but the tokenizer has no bos token; there is nothing to prepend: pass add_bos=False, or "
            "use a tokenizer that defines a bos token"
        )
    chat_format = chat_format or tokenizer.chat_format
    segments = render_chat(messages, chat_format)
    end_token = "<|im_end|>" if chat_format == "phi4" else "<|end|>"
    if tokenizer.token_to_id(end_token) is None:
        raise ValueError(
            f"the tokenizer has no {end_token} token, so it cannot encode the {chat_format!r} chat format; use the "
            "tokenizer of a chat (instruct) checkpoint, or plain text data"
        )
    text = "".join(s.text for s in segments)
    # character ranges [start, end) of the assistant segments
    spans: list[tuple[int, int]] = []
    pos = 0
    for seg in segments:
        if seg.is_assistant:
            spans.append((pos, pos + len(seg.text)))
        pos += len(seg.text)
    ids, offsets = tokenizer.encode_with_offsets(text)
    labels: list[int] = []
    k = 0
    for tok, (start, _end) in zip(ids, offsets):
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        inside = k < len(spans) and spans[k][0] <= start < spans[k][1]
        labels.append(tok if inside else IGNORE_INDEX)
    if add_bos:
        ids = [tokenizer.bos_token_id, *ids]
        labels = [IGNORE_INDEX, *labels]
    if add_eos and not (ids and ids[-1] == tokenizer.eos_token_id):  # phi-4: eos is <|im_end|>, already there
        last_is_assistant = bool(segments) and messages[-1]["role"] == "assistant"
        ids = [*ids, tokenizer.eos_token_id]
        labels = [*labels, tokenizer.eos_token_id if last_is_assistant else IGNORE_INDEX]
    return {"input_ids": list(ids), "labels": labels}
