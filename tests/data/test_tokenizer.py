import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phi3_lightning.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    check_vocab_fits,
    detect_chat_format,
    load_tokenizer,
)


# ------------------------------------------------------------------------------------------------ byte tokenizer
def test_byte_tokenizer_ids_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 262
    assert tok.encode("Ab") == [65, 98]
    assert tok.eos_token_id == tok.bos_token_id == 256
    assert tok.pad_token_id == 257
    assert [tok.token_to_id(t) for t in ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>")] == [258, 259, 260, 261]
    assert tok.eos_token_ids == [256, 261]
    assert tok.chat_format == "byte"
    assert tok.encode("hi<|end|>\n") == [104, 105, 261, 10]
    assert tok.encode("x", add_special_tokens=True) == [256, 120]
    assert tok.decode([104, 105, 261]) == "hi<|end|>"
    assert tok.decode([104, 105, 261], skip_special_tokens=True) == "hi"
    assert tok.encode("é") == [0xC3, 0xA9]
    with pytest.raises(ValueError, match="outside the byte tokenizer's vocab"):
        tok.decode([999])


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=60), st.sampled_from(["", "<|user|>", "<|end|>", "<|endoftext|>"]))
def test_byte_tokenizer_roundtrip_and_offsets(text, special):
    tok = ByteTokenizer()
    full = text + special + text
    ids, offsets = tok.encode_with_offsets(full)
    assert tok.decode(ids) == full
    assert ids == tok.encode(full)
    assert len(offsets) == len(ids)
    # every id comes from the characters its offset names
    for i, (s, e) in zip(ids, offsets):
        piece = full[s:e]
        assert i in tok.encode(piece)


def test_byte_tokenizer_batch():
    tok = ByteTokenizer()
    assert tok.encode_batch(["a", "bc"]) == [[97], [98, 99]]


# ------------------------------------------------------------------------------------------------ HF tokenizer.json
@pytest.mark.parametrize("family", ["phi3", "phi4-mini", "phi4"])
def test_hf_tokenizer_reads_specials_and_format(hf_dirs, family):
    tok = load_tokenizer(str(hf_dirs[family]))
    assert isinstance(tok, HFTokenizer)
    assert tok.chat_format == family
    # vocab_size is the max id + 1, not the number of entries (the fixture leaves a gap up to id 1000)
    vocab = tok._tok.get_vocab(with_added_tokens=True)
    assert tok.vocab_size == max(vocab.values()) + 1 > len(vocab)
    end = "<|im_end|>" if family == "phi4" else "<|end|>"
    assert tok.token_to_id(end) in tok.eos_token_ids
    assert tok.token_to_id("<|endoftext|>") in tok.eos_token_ids
    assert tok.eos_token_ids[0] == tok.eos_token_id
    text = "hello the world <|endoftext|>"
    assert tok.decode(tok.encode(text)) == text


def test_hf_tokenizer_special_ids_per_family(hf_dirs):
    phi3 = HFTokenizer(hf_dirs["phi3"])
    assert phi3.bos_token_id == phi3.token_to_id("<s>")
    assert phi3.eos_token_id == phi3.pad_token_id == phi3.token_to_id("<|endoftext|>")
    assert phi3.token_to_id("<|assistant|>") in phi3.eos_token_ids  # from generation_config.json
    phi4 = HFTokenizer(hf_dirs["phi4"] / "tokenizer.json")  # the file itself works too
    assert phi4.eos_token_id == phi4.token_to_id("<|im_end|>")  # {"content": ...} form
    assert phi4.pad_token_id == phi4.token_to_id("<|dummy_85|>")


def test_hf_tokenizer_without_template_detects_by_vocab(tmp_path, make_hf_dir):
    d = make_hf_dir(tmp_path / "p4", "phi4", with_template=False)
    assert HFTokenizer(d).chat_format == "phi4"
    d = make_hf_dir(tmp_path / "p3", "phi3", with_template=False)
    assert HFTokenizer(d).chat_format == "phi3"
    assert detect_chat_format(None, {"<|user|>": 1, **{str(i): i for i in range(100_001)}}) == "phi4-mini"


def test_hf_tokenizer_matches_transformers(hf_dirs):
    transformers = pytest.importorskip("transformers")
    for family, d in hf_dirs.items():
        ours = HFTokenizer(d)
        theirs = transformers.AutoTokenizer.from_pretrained(str(d))
        text = "<|user|>\nthe in thing<|end|>\n<|im_start|>x"
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], family


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="neither 'byte' nor an existing directory"):
        load_tokenizer("microsoft/Phi-3-mini-4k-instruct")
    with pytest.raises(ValueError, match="no tokenizer.json found"):
        load_tokenizer(str(tmp_path))
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_check_vocab_fits():
    tok = ByteTokenizer()
    check_vocab_fits(tok, 262)
    check_vocab_fits(tok, 32064)
    with pytest.raises(ValueError) as e:
        check_vocab_fits(tok, 256)
    assert str(e.value) == (
        "tokenizer has ids up to 261 but the model's vocab_size is 256; use the tokenizer of the checkpoint or "
        "raise vocab_size"
    )


def test_check_vocab_fits_hf(hf_dirs):
    tok = HFTokenizer(hf_dirs["phi4"])
    with pytest.raises(ValueError, match=rf"ids up to {tok.vocab_size - 1} but the model's vocab_size is 512"):
        check_vocab_fits(tok, 512)
