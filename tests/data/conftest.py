"""Fixtures of the data-layer tests: a shared embedded-data cache and small Hugging Face tokenizer directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# The real chat templates of the three checkpoint families (tokenizer_config.json "chat_template").
PHI3_TEMPLATE = (
    r"{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    r"'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    r"{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant"
    "<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# special tokens, tokenizer_config entries and config.json / generation_config.json ids per family
FAMILIES = {
    "phi3": dict(
        specials=["<s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
        config={"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        template=PHI3_TEMPLATE,
        gen_eos=["<|endoftext|>", "<|assistant|>", "<|end|>"],
    ),
    "phi4-mini": dict(
        specials=["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>", "<|tool|>", "<|/tool|>"],
        config={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        template=PHI4_MINI_TEMPLATE,
        gen_eos=["<|endoftext|>", "<|end|>"],
    ),
    "phi4": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|dummy_85|>"],
        config={
            "bos_token": "<|endoftext|>",
            "eos_token": {
                "__type": "AddedToken",
                "content": "<|im_end|>",
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            },
            "pad_token": "<|dummy_85|>",
        },
        template=PHI4_TEMPLATE,
        gen_eos=["<|im_end|>", "<|endoftext|>"],
    ),
}


def make_hf_tokenizer_dir(path: Path, family: str, gap_to: int = 1000, with_template: bool = True) -> Path:
    """A checkpoint-like directory: byte-level BPE ``tokenizer.json`` (bytes + a few merges + a vocab gap up to
    ``gap_to``) with the family's special tokens, tokenizer_config.json, config.json, generation_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    spec = FAMILIES[family]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<unused_high_id>"] = gap_to  # ids need not be contiguous: vocab_size is max id + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(spec["specials"])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **spec["config"]}
    if with_template:
        cfg["chat_template"] = spec["template"]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    eos = spec["config"]["eos_token"]
    eos = eos["content"] if isinstance(eos, dict) else eos
    (path / "config.json").write_text(json.dumps({"vocab_size": gap_to + 64, "eos_token_id": tok.token_to_id(eos)}))
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [tok.token_to_id(t) for t in spec["gen_eos"]]})
    )
    return path


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tokenizer directory per family: {"phi3": dir, "phi4-mini": dir, "phi4": dir}."""
    root = tmp_path_factory.mktemp("hf_tokenizers")
    return {fam: make_hf_tokenizer_dir(root / fam, fam) for fam in FAMILIES}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """An embedded-data cache shared by the tests of one session (built once per worker)."""
    return str(tmp_path_factory.mktemp("embedded_cache"))


@pytest.fixture
def make_hf_dir():
    """``make_hf_dir(path, family, gap_to=1000, with_template=True)`` -> a tokenizer directory."""
    return make_hf_tokenizer_dir


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def write_jsonl():
    """``write_jsonl(path, rows)`` writes one JSON object per line and returns the path."""
    return _write_jsonl
