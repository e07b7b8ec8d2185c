import pytest

from phi3_lightning.data.chat import chat_text, render_chat, tokenize_chat
from phi3_lightning.data.tokenizer import ByteTokenizer, HFTokenizer

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_render_phi3():
    text = chat_text(CONVO[1:3], "phi3")
    assert text == "<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
    segs = render_chat(CONVO[1:3], "phi3")
    assert [s.text for s in segs if s.is_assistant] == ["Hello!<|end|>"]
    assert chat_text(CONVO[1:2], "phi3", add_generation_prompt=True).endswith("<|end|>\n<|assistant|>\n")


def test_render_phi4_mini_and_phi4():
    assert chat_text(CONVO[1:3], "phi4-mini") == "<|user|>Hi<|end|><|assistant|>Hello!<|end|>"
    assert chat_text(CONVO[1:3], "phi4") == (
        "<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>Hello!<|im_end|>"
    )
    assert chat_text(CONVO[:1], "phi4", add_generation_prompt=True).endswith("<|im_start|>assistant<|im_sep|>")


def test_byte_format_is_phi3_layout():
    assert chat_text(CONVO, "byte") == chat_text(CONVO, "phi3")


def test_tokenize_chat_loss_only_on_assistant_tokens():
    tok = ByteTokenizer()
    ex = tokenize_chat(CONVO, tok)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    assert tok.decode(ids) == chat_text(CONVO, "byte")
    trained = [i for i, lab in zip(ids, labels) if lab != -100]
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))
    assert tok.decode(trained) == "Hello!<|end|>4<|end|>"
    # the role headers and the newline after <|end|> are not trained on
    assert labels[ids.index(tok.token_to_id("<|assistant|>"))] == -100


def test_tokenize_chat_bos_eos():
    tok = ByteTokenizer()
    ex = tokenize_chat(CONVO[1:3], tok, add_bos=True, add_eos=True)
    assert ex["input_ids"][0] == tok.bos_token_id and ex["labels"][0] == -100
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == tok.eos_token_id
    ex = tokenize_chat(CONVO[1:2], tok, add_eos=True)  # ends with a user turn: nothing to train on
    assert set(ex["labels"]) == {-100}


@pytest.mark.parametrize("family", ["phi3", "phi4-mini", "phi4"])
def test_chat_matches_transformers_template(hf_dirs, family):
    """Our rendering = the checkpoint's Jinja chat_template rendered by transformers (the oracle), and the
    token ids are those of tokenising that text in one go."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf_dirs[family]))
    ours = HFTokenizer(hf_dirs[family])
    assert ours.chat_format == family
    expected = theirs.apply_chat_template(CONVO, tokenize=False)
    eos = "" if family == "phi4" else theirs.eos_token  # Phi-3 / Phi-4-mini templates end training text with eos
    assert chat_text(CONVO, family) + eos == expected
    prompt = theirs.apply_chat_template(CONVO[:2], tokenize=False, add_generation_prompt=True)
    assert chat_text(CONVO[:2], family, add_generation_prompt=True) == prompt

    ex = tokenize_chat(CONVO, ours, add_eos=family != "phi4")
    assert ex["input_ids"] == theirs(expected, add_special_tokens=False)["input_ids"]
    trained = ours.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])
    end = "<|im_end|>" if family == "phi4" else "<|end|>"
    assert trained == f"Hello!{end}4{end}" + eos


def test_chat_errors():
    with pytest.raises(ValueError, match="role 'robot'"):
        render_chat([{"role": "robot", "content": "x"}], "phi3")
    with pytest.raises(ValueError, match="message 0 .* needs a 'role' and a 'content'"):
        render_chat([{"role": "user"}], "phi3")
    with pytest.raises(ValueError, match="non-empty list"):
        render_chat([], "phi3")
    with pytest.raises(ValueError, match="chat_format 'llama'"):
        render_chat(CONVO, "llama")
    with pytest.raises(ValueError, match="content of type int"):
        render_chat([{"role": "user", "content": 3}], "phi3")


def test_tokenizer_without_chat_tokens(tmp_path, make_hf_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(
        models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[])
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    plain = HFTokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"has no <\|end\|> token"):
        tokenize_chat(CONVO, plain)
