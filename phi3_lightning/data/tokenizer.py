"""Tokenizers: a built-in byte-level tokenizer and a wrapper around any Hugging Face ``tokenizer.json``.

Both share one small interface (the ``Tokenizer`` protocol below), which is all the rest of the data layer uses:

    encode(text, add_special_tokens=False) -> list[int]
    encode_with_offsets(text) -> (ids, offsets)       # offsets: (start, end) character spans into ``text``
    encode_batch(texts) -> list[list[int]]
    decode(ids, skip_special_tokens=False) -> str
    vocab_size            max id + 1 (what the model's embedding must hold)
    pad_token_id, eos_token_id, bos_token_id, eos_token_ids (every id that ends a generation)
    token_to_id(str) -> int | None
    chat_format           "phi3" | "phi4-mini" | "phi4" | "byte"  (see ``chat.py``)

Special-token strings that appear in the text (``<|user|>``, ``<|end|>`` ...) are encoded as their single special id
by both tokenizers, as Hugging Face tokenizers do; that is how a rendered chat template becomes ids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "check_vocab_fits",
    "CHAT_FORMATS",
]

CHAT_FORMATS = ("phi3", "phi4-mini", "phi4", "byte")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data layer needs from a tokenizer (``ByteTokenizer`` and ``HFTokenizer`` implement it)."""

    pad_token_id: int
    eos_token_id: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    chat_format: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


# ----------------------------------------------------------------------------------------------------------------------
# Byte-level tokenizer (no files needed)
# ----------------------------------------------------------------------------------------------------------------------


class ByteTokenizer:
    """A file-free tokenizer: ids 0..255 are the UTF-8 bytes of the text, followed by a few special tokens.

    ======  =================  =====================================================
    id      token              role
    ======  =================  =====================================================
    0-255   the raw bytes      text
    256     ``<|endoftext|>``  end of document (eos) and beginning of sequence (bos)
    257     ``<|pad|>``        padding
    258     ``<|user|>``       chat: start of a user turn
    259     ``<|assistant|>``  chat: start of an assistant turn
    260     ``<|system|>``     chat: start of a system turn
    261     ``<|end|>``        chat: end of a turn (also ends generation)
    ======  =================  =====================================================

    ``vocab_size`` is 262. Its chat format is ``"byte"``, laid out like Phi-3's
    (``<|user|>\\n…<|end|>\\n<|assistant|>\\n…<|end|>\\n``).
    """

    SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")

    def __init__(self) -> None:
        self._special_to_id = {tok: 256 + i for i, tok in enumerate(self.SPECIAL_TOKENS)}
        self._id_to_special = {i: tok for tok, i in self._special_to_id.items()}
        # longest first so that no special token is shadowed by a prefix of another
        alternatives = sorted(self.SPECIAL_TOKENS, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in alternatives))
        self.eos_token_id = self._special_to_id["<|endoftext|>"]
        self.bos_token_id = self.eos_token_id
        self.pad_token_id = self._special_to_id["<|pad|>"]
        self.eos_token_ids = [self.eos_token_id, self._special_to_id["<|end|>"]]
        self.chat_format = "byte"
        self.name = "byte"

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.SPECIAL_TOKENS)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

    def token_to_id(self, token: str) -> int | None:
        if token in self._special_to_id:
            return self._special_to_id[token]
        raw = token.encode("utf-8")
        return raw[0] if len(raw) == 1 else None

    def id_to_token(self, idx: int) -> str | None:
        if idx in self._id_to_special:
            return self._id_to_special[idx]
        if 0 <= idx < 256:
            return bytes([idx]).decode("latin-1")
        return None

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, for each id, the (start, end) character span of ``text`` it came from.

        Every byte of a multi-byte character gets that character's span.
        """
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos = 0
        for match in self._special_re.finditer(text):
            self._encode_plain(text, pos, match.start(), ids, offsets)
            ids.append(self._special_to_id[match.group()])
            offsets.append((match.start(), match.end()))
            pos = match.end()
        self._encode_plain(text, pos, len(text), ids, offsets)
        return ids, offsets

    @staticmethod
    def _encode_plain(text: str, start: int, end: int, ids: list[int], offsets: list[tuple[int, int]]) -> None:
        chunk = text[start:end]
        raw = chunk.encode("utf-8", errors="surrogatepass")
        ids.extend(raw)
        if len(raw) == len(chunk):  # pure ASCII: one byte per character
            offsets.extend((i, i + 1) for i in range(start, end))
        else:
            for i, ch in enumerate(chunk, start):
                n = len(ch.encode("utf-8", errors="surrogatepass"))
                offsets.extend([(i, i + 1)] * n)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """UTF-8 bytes of ``text`` (special-token strings become their ids); ``add_special_tokens`` prepends bos."""
        if "<|" in text:
            ids, _ = self.encode_with_offsets(text)
        else:
            ids = list(text.encode("utf-8", errors="surrogatepass"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
            if i in self._id_to_special:
                if not skip_special_tokens:
                    out.append(self._id_to_special[i])
            else:
                raise ValueError(f"id {i} is outside the byte tokenizer's vocab (0..{self.vocab_size - 1})")
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# ----------------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix or remove the file") from e
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start}); fix or remove the file"
        ) from e
    return data if isinstance(data, dict) else {}


def _tokenizer_file_error(file: Path, error: Exception) -> ValueError:
    """Why ``tokenizers`` refused ``file``: not JSON at all (named with the JSON error), or JSON it cannot read."""
    try:
        json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        detail = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else f"not UTF-8 text: {e.reason}"
        return ValueError(
            f"tokenizer file {file} is not valid JSON ({detail}); a tokenizer is a Hugging Face "
            "tokenizer.json: pass the checkpoint directory that holds it, re-download it, or use "
            "tokenizer='byte'"
        )
    return ValueError(
        f"tokenizer file {file} is JSON but not a tokenizer.json the tokenizers library can read "
        f"({error}); re-download it from the checkpoint, or use tokenizer='byte'"
    )


def _token_content(value: Any) -> str | None:
    """``"<|end|>"`` or ``{"content": "<|end|>", ...}`` (how transformers serialises an AddedToken) -> the string."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def detect_chat_format(chat_template: str | None, vocab: dict[str, int]) -> str:
    """Which of the Phi chat layouts a checkpoint uses, from its Jinja ``chat_template`` or else from its vocab.

    * ``"phi4"``: ``<|im_start|>user<|im_sep|>…<|im_end|>`` (phi-4)
    * ``"phi3"``: ``<|user|>\\n…<|end|>\\n`` (Phi-3, Phi-3.5): a newline follows the role tag
    * ``"phi4-mini"``: ``<|user|>…<|end|>`` (Phi-4-mini): no newlines
    """
    if chat_template:
        if "<|im_start|>" in chat_template:
            return "phi4"
        if re.search(r"<\|(user|assistant|system)\|>(\\n|\n)", chat_template):
            return "phi3"
        if "<|end|>" in chat_template:
            return "phi4-mini"
    if "<|im_start|>" in vocab:
        return "phi4"
    if "<|user|>" in vocab and len(vocab) > 100_000:
        return "phi4-mini"  # Phi-4-mini's 200k vocab; Phi-3's is 32k
    return "phi3"


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (Phi-3, Phi-3.5, Phi-4-mini, phi-4 or any other), via the ``tokenizers`` library.

    Args:
        path: a checkpoint directory holding ``tokenizer.json``, or the ``tokenizer.json`` file itself.
            Special tokens are read from ``tokenizer_config.json``, ``special_tokens_map.json``, ``config.json`` and
            ``generation_config.json`` next to it when present (first found wins, in that order); the chat format is
            detected from the ``chat_template``.
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        path = Path(path).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(
                f"tokenizer {str(path)!r}: no tokenizer.json found there; pass a checkpoint directory that contains "
                "tokenizer.json, or tokenizer='byte'"
            )
        directory = file.parent
        self.name = str(path)
        try:
            self._tok = _RustTokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for unreadable files
            raise _tokenizer_file_error(file, e) from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0

        tok_cfg = _read_json(directory / "tokenizer_config.json")
        special_map = _read_json(directory / "special_tokens_map.json")
        model_cfg = _read_json(directory / "config.json")
        gen_cfg = _read_json(directory / "generation_config.json")

        def special_id(key: str) -> int | None:
            for source in (tok_cfg, special_map):
                content = _token_content(source.get(key))
                if content is not None and self._tok.token_to_id(content) is not None:
                    return self._tok.token_to_id(content)
            ids = _as_id_list(model_cfg.get(f"{key}_id"))
            return ids[0] if ids else None

        template = tok_cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.chat_format = detect_chat_format(self.chat_template, vocab)

        self.bos_token_id = special_id("bos_token")
        eos = special_id("eos_token")
        if eos is None:
            eos = self._tok.token_to_id("<|endoftext|>")
        if eos is None:
            raise ValueError(
                f"tokenizer {str(path)!r}: cannot tell its eos token (no eos_token in tokenizer_config.json / "
                "special_tokens_map.json, no eos_token_id in config.json, no <|endoftext|>); add eos_token to "
                "tokenizer_config.json"
            )
        self.eos_token_id: int = eos
        pad = special_id("pad_token")
        self.pad_token_id: int = eos if pad is None else pad  # no pad token: pad with eos (masked out anyway)

        eos_ids = [eos, *_as_id_list(model_cfg.get("eos_token_id")), *_as_id_list(gen_cfg.get("eos_token_id"))]
        end_of_turn = {"phi4": "<|im_end|>"}.get(self.chat_format, "<|end|>")
        for extra in (end_of_turn, "<|endoftext|>"):
            extra_id = self._tok.token_to_id(extra)
            if extra_id is not None:
                eos_ids.append(extra_id)
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_ids))  # dedupe, keep order

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, chat_format={self.chat_format!r})"

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(idx)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


# ----------------------------------------------------------------------------------------------------------------------


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; a checkpoint directory (or a ``tokenizer.json`` path) -> :class:`HFTokenizer`."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer {spec!r}: expected 'byte' or a checkpoint directory containing tokenizer.json")
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir() or path.is_file():
        return HFTokenizer(path)
    raise ValueError(
        f"tokenizer {spec!r} is neither 'byte' nor an existing directory with tokenizer.json; pass 'byte' or a local "
        "checkpoint directory (nothing is downloaded)"
    )


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raise ``ValueError`` before training if the tokenizer can produce ids the model's embedding does not have."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer has ids up to {tokenizer.vocab_size - 1} but the model's vocab_size is {model_vocab_size}; "
            "use the tokenizer of the checkpoint or raise vocab_size"
        )
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and not 0 <= value < model_vocab_size:
            raise ValueError(
                f"tokenizer's {name}={value} is outside the model's vocab (vocab_size={model_vocab_size}); "
                "use the tokenizer of the checkpoint or raise vocab_size"
            )
