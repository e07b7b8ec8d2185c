"""Bad input gives a ValueError that names the offending value and says what to do."""

from pathlib import Path

import pytest

from phi3_lightning.data import (
    ByteTokenizer,
    CausalLMDataModule,
    SequenceClassificationDataModule,
    TokenClassificationDataModule,
    check_vocab_fits,
)

NO_SPLITS = dict(val_fraction=0.0, test_fraction=0.0)


def test_empty_dataset(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(ValueError) as e:
        CausalLMDataModule(train_file=str(tmp_path / "train.jsonl")).setup()
    assert f"train_file '{tmp_path / 'train.jsonl'}' holds no records (it is empty)" in str(e.value)
    assert "add data or point train_file elsewhere" in str(e.value)


def test_dataset_of_empty_texts(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "t.jsonl", [{"text": ""}, {"text": ""}])
    with pytest.raises(ValueError, match=r"the train split has no tokens after tokenization \(2 records, all empty\)"):
        CausalLMDataModule(train_file=str(tmp_path / "t.jsonl"), add_eos=False, **NO_SPLITS).setup()


def test_missing_text_column(tmp_path, write_jsonl):
    p = write_jsonl(tmp_path / "t.jsonl", [{"body": "x", "label": "a"}])
    with pytest.raises(ValueError) as e:
        CausalLMDataModule(train_file=str(p), **NO_SPLITS).setup()
    msg = str(e.value)
    assert f"{p} line 1" in msg and "neither a text field 'text' nor a messages field 'messages'" in msg
    assert "fields: ['body', 'label']" in msg and "--data.text_field" in msg
    with pytest.raises(ValueError) as e:
        SequenceClassificationDataModule(train_file=str(p), **NO_SPLITS).setup()
    assert f"{p} line 1: has no text field 'text'" in str(e.value) and "--data.text_field" in str(e.value)


def test_missing_label_column(tmp_path, write_jsonl):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "target": "a"}])
    dm = SequenceClassificationDataModule(train_file=str(p), **NO_SPLITS)
    with pytest.raises(ValueError) as e:
        _ = dm.num_labels
    assert f"{p} line 1: has no label field 'label' (fields: ['target', 'text'])" in str(e.value)
    assert "--data.label_field" in str(e.value)
    with pytest.raises(ValueError, match="has no label field 'labels'"):
        TokenClassificationDataModule(
            train_file=str(write_jsonl(tmp_path / "w.jsonl", [{"words": ["a"]}])), **NO_SPLITS
        ).setup()


def test_unknown_label(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}] * 5)
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "c", "label": "pos"}, {"text": "d", "label": "spam"}])
    dm = SequenceClassificationDataModule(source=str(tmp_path), test_fraction=0.0)
    with pytest.raises(ValueError) as e:
        dm.setup()
    assert str(e.value) == (
        f"{val} line 2: label 'spam' is not one of the label names ['neg', 'pos']; add it to --data.label_names or "
        "fix the record"
    )
    dm = SequenceClassificationDataModule(source=str(tmp_path), label_names=["neg", "pos", "spam"], test_fraction=0.0)
    dm.setup()  # fixed by listing it
    assert dm.num_labels == 3
    dm = SequenceClassificationDataModule(train_file=str(tmp_path / "train.jsonl"), label_names=["pos"], **NO_SPLITS)
    with pytest.raises(ValueError, match=r"label 'neg' is not one of the label names \['pos'\]"):
        dm.setup()


def test_unknown_word_label_and_misaligned_words(tmp_path, write_jsonl):
    p = write_jsonl(tmp_path / "t.jsonl", [{"words": ["a", "b"], "labels": ["X", "Y"]}])
    with pytest.raises(ValueError, match=r"line 1: label 'Y' is not one of the label names \['X'\]"):
        TokenClassificationDataModule(train_file=str(p), label_names=["X"], **NO_SPLITS).setup()
    p = write_jsonl(tmp_path / "m.jsonl", [{"words": ["a", "b"], "labels": ["X"]}])
    with pytest.raises(ValueError, match=r"line 1: 2 words but 1 labels; give exactly one label per word"):
        TokenClassificationDataModule(train_file=str(p), **NO_SPLITS).setup()


def test_out_of_range_integer_label(tmp_path, write_jsonl):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 3}])
    with pytest.raises(ValueError, match=r"line 1: label 3 is out of range for 2 label names \['a', 'b'\]"):
        SequenceClassificationDataModule(train_file=str(p), label_names=["a", "b"], **NO_SPLITS).setup()


def test_sequence_longer_than_row_with_splitting_off(tmp_path, write_jsonl):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "short"}, {"text": "x" * 40}])
    with pytest.raises(ValueError) as e:
        CausalLMDataModule(train_file=str(p), max_length=16, split_long=False, **NO_SPLITS).setup()
    msg = str(e.value)
    assert f"{p} line 2: 41 tokens, more than max_length=16 (the row length) and split_long=False" in msg
    assert "raise max_length, set split_long=True" in msg
    with pytest.raises(ValueError, match="more than max_length=16 \\(the sequence length\\)"):
        CausalLMDataModule(train_file=str(p), max_length=16, split_long=False, pack=False, **NO_SPLITS).setup()
    dm = CausalLMDataModule(train_file=str(p), max_length=16, split_long=True, **NO_SPLITS)
    dm.setup()  # split instead
    assert dm.datasets["train"].num_real_tokens == 6 + 41
    with pytest.raises(
        ValueError,
        match=r"line 2: 40 tokens, more than max_length=16; raise max_length or set "
        r"truncate=True",
    ):
        SequenceClassificationDataModule(
            train_file=str(
                write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": 0}, {"text": "y" * 40, "label": 1}])
            ),
            max_length=16,
            truncate=False,
            **NO_SPLITS,
        ).setup()


def test_malformed_jsonl_line(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(ValueError) as e:
        CausalLMDataModule(train_file=str(p)).setup()
    assert str(e.value).startswith(f"{p} line 2: not valid JSON (")
    assert str(e.value).endswith("); fix or remove the line")


def test_bad_chat_record(tmp_path, write_jsonl):
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(ValueError, match=rf"{p} line 1: message 0 has role 'bot'; use one of"):
        CausalLMDataModule(train_file=str(p), **NO_SPLITS).setup()


def test_bad_arguments():
    with pytest.raises(ValueError, match="padding_side='top'; use 'right' or 'left'"):
        CausalLMDataModule(padding_side="top")
    with pytest.raises(ValueError, match="val_fraction=1.0; use a fraction in"):
        CausalLMDataModule(val_fraction=1.0)
    with pytest.raises(ValueError, match="data_format='xml'"):
        CausalLMDataModule(data_format="xml")
    with pytest.raises(ValueError, match="problem_type='ranking'"):
        SequenceClassificationDataModule(problem_type="ranking")
    with pytest.raises(ValueError, match="none of packages=\\['nope'\\]"):
        SequenceClassificationDataModule(packages=["nope"])
    with pytest.raises(ValueError, match="given without a train_file while source='embedded'; pass train_file"):
        CausalLMDataModule(val_file="v.jsonl")
    with pytest.raises(ValueError, match="tokenizer 'no/such/dir' is neither 'byte' nor an existing directory"):
        CausalLMDataModule(tokenizer="no/such/dir")


def test_tokenizer_larger_than_model_vocab():
    with pytest.raises(
        ValueError,
        match=r"^tokenizer has ids up to 261 but the model's vocab_size is 100; use the "
        r"tokenizer of the checkpoint or raise vocab_size$",
    ):
        check_vocab_fits(ByteTokenizer(), 100)


@pytest.mark.parametrize(
    "name,content,line",
    [
        ("train.txt", b"first paragraph\n\nsecond caf\xe9 paragraph\n", 3),
        ("train.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', 2),
        ("train.csv", b"text,label\nfine,a\ncaf\xe9,b\n", 3),
        ("train.json", b'[{"text": "caf\xe9"}]', 1),
    ],
)
def test_file_that_is_not_utf8_is_named_with_line_and_fix(tmp_path, name, content, line):
    p = tmp_path / name
    p.write_bytes(content)
    module = SequenceClassificationDataModule if name.endswith(".csv") else CausalLMDataModule
    with pytest.raises(ValueError) as e:
        module(train_file=str(p), **NO_SPLITS).setup()
    msg = str(e.value)
    assert f"train_file '{p}' is not valid UTF-8 (line {line}, byte 0xe9" in msg
    assert "re-save it as UTF-8" in msg


def test_tokenizer_file_that_is_not_json_is_named(tmp_path, make_hf_dir):
    from phi3_lightning.data import load_tokenizer

    d = make_hf_dir(tmp_path / "tok", "phi3")
    (d / "tokenizer.json").write_text("version: 1\nmodel: bpe\n")  # YAML, not JSON
    for spec in (d, d / "tokenizer.json"):
        with pytest.raises(
            ValueError,
            match=rf"^tokenizer file {d / 'tokenizer.json'} is not valid JSON \(Expecting "
            r"value at line 1\); .*pass the checkpoint directory that holds it",
        ):
            load_tokenizer(str(spec))
    (d / "tokenizer.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=r"tokenizer.json is not valid JSON \(not UTF-8 text"):
        load_tokenizer(str(d))
    (d / "tokenizer.json").write_text('{"version": "1.0"}')  # JSON, but not a tokenizer
    with pytest.raises(
        ValueError,
        match=r"tokenizer.json is JSON but not a tokenizer.json the tokenizers library can "
        r"read \(.*\); re-download it",
    ):
        load_tokenizer(str(d))
    with pytest.raises(ValueError, match=r"README.md is not valid JSON"):
        CausalLMDataModule(tokenizer=str(Path(__file__).parents[2] / "README.md"))


def test_tokenizer_side_file_that_is_not_utf8_is_named(tmp_path, make_hf_dir):
    from phi3_lightning.data import load_tokenizer

    d = make_hf_dir(tmp_path / "tok", "phi3")
    (d / "tokenizer_config.json").write_bytes(b'{"eos_token": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"tokenizer_config.json: not valid JSON \(not UTF-8 text"):
        load_tokenizer(str(d))


def test_token_cls_text_file_says_it_has_no_word_labels(tmp_path):
    """A .txt file holds paragraphs, not words with one label each: the error says so and names the fix. (It used to
    be "no label field 'labels' (fields: ['words'])": the token module passed its words_field into the base module's
    text_field slot, so each paragraph was filed under 'words'.)"""
    (tmp_path / "t.txt").write_text("def f ( ) :\n\nreturn 1\n")
    with pytest.raises(
        ValueError,
        match=r"train_file='.*t\.txt' is a \.txt file: plain text has no words .*'words' "
        r"list and a 'labels' list \(jsonl",
    ):
        TokenClassificationDataModule(train_file=str(tmp_path / "t.txt"), **NO_SPLITS).setup()
    dm = TokenClassificationDataModule(**NO_SPLITS, progress=False, max_files=1, max_examples=4)
    assert dm.text_field == "text"  # the base's .txt field name, no longer the words field


# ------------------------------------------------------------------------------------------------ audit: labels
def test_labels_mixing_indices_and_names_are_refused_not_remapped(tmp_path, write_jsonl):
    # inferred names ['1', '2', 'neg'] made the integer 1 mean '2' and 2 mean 'neg'
    p = write_jsonl(tmp_path / "s.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "neg"}])
    with pytest.raises(ValueError) as e:
        _ = SequenceClassificationDataModule(train_file=str(p), **NO_SPLITS).label_names
    msg = str(e.value)
    assert f"{p} line 1: label 1 is a class index but {p} line 2: label 'neg' is a class name" in msg
    assert "--data.label_names" in msg
    # word labels: [0, 'B', 'I'] made 0 mean 'B'
    p = write_jsonl(tmp_path / "t.jsonl", [{"words": ["a", "b", "c"], "labels": [0, "B", "I"]}])
    with pytest.raises(ValueError, match=r"label 0 is a class index but .* label 'B' is a class name"):
        _ = TokenClassificationDataModule(train_file=str(p), **NO_SPLITS).label_names
    # with label_names given, integers index into them and strings name them: no ambiguity
    dm = TokenClassificationDataModule(train_file=str(p), label_names=["O", "B", "I"], **NO_SPLITS)
    dm.setup()
    assert dm.datasets["train"][0]["labels"] == [0, 1, -100, 2, -100]


def test_integer_valued_float_word_labels_are_indices(tmp_path, write_jsonl):
    # names inferred as ['0.0', '2.0', '3.0'] made 2.0 mean '3.0'
    p = write_jsonl(tmp_path / "t.jsonl", [{"words": ["a", "b", "c"], "labels": [0.0, 2.0, 3.0]}])
    dm = TokenClassificationDataModule(train_file=str(p), word_separator="", **NO_SPLITS)
    assert dm.label_names == ["0", "1", "2", "3"]
    dm.setup()
    assert dm.datasets["train"][0]["labels"] == [0, 2, 3]


def test_negative_integer_labels_say_how_to_use_them(tmp_path, write_jsonl):
    p = write_jsonl(tmp_path / "s.jsonl", [{"text": t, "label": v} for t, v in (("a", -1), ("b", 0), ("c", 1))])
    with pytest.raises(ValueError) as e:
        _ = SequenceClassificationDataModule(train_file=str(p), **NO_SPLITS).label_names
    msg = str(e.value)
    assert f"{p} line 1: label -1 is a negative integer" in msg
    assert "store the labels as strings" in msg
    # given names do not make -1 an index either: the message says why
    dm = SequenceClassificationDataModule(train_file=str(p), label_names=["-1", "0", "1"], **NO_SPLITS)
    with pytest.raises(
        ValueError, match=r"label -1 is out of range .*\(integer labels are indices into the label names"
    ):
        dm.setup()


def test_non_finite_regression_targets_are_refused_with_the_record(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"text": "a", "label": 0.5}\n{"text": "b", "label": NaN}\n')
    with pytest.raises(ValueError, match=r"r.jsonl line 2: regression target nan is not a finite number"):
        SequenceClassificationDataModule(train_file=str(tmp_path / "r.jsonl"), **NO_SPLITS).setup()
    (tmp_path / "r.csv").write_text("text,label\na,0.5\nb,inf\n")
    with pytest.raises(ValueError, match=r"r.csv line 3: regression target 'inf' is not a finite number"):
        SequenceClassificationDataModule(
            train_file=str(tmp_path / "r.csv"), problem_type="regression", **NO_SPLITS
        ).setup()


def test_csv_non_integer_numbers_are_a_regression_like_the_same_jsonl(tmp_path, write_jsonl):
    rows = [("a", 0.5), ("b", 1.25), ("c", 3.0)]
    (tmp_path / "r.csv").write_text("text,label\n" + "".join(f"{t},{v}\n" for t, v in rows))
    j = write_jsonl(tmp_path / "r.jsonl", [{"text": t, "label": v} for t, v in rows])
    for path in (tmp_path / "r.csv", j):
        dm = SequenceClassificationDataModule(train_file=str(path), **NO_SPLITS)
        assert dm.problem_type == "regression" and dm.num_labels == 1
        dm.setup()
        assert [ex["labels"] for ex in dm.datasets["train"].examples] == [0.5, 1.25, 3.0]


def test_multi_label_targets_outside_0_1_are_refused(tmp_path, write_jsonl):
    p = write_jsonl(tmp_path / "m.jsonl", [{"text": "a", "label": [1, 0]}, {"text": "b", "label": [2, 0]}])
    with pytest.raises(ValueError, match=r"m.jsonl line 2: multi-label targets \[2, 0\] must be numbers in \[0, 1\]"):
        SequenceClassificationDataModule(train_file=str(p), **NO_SPLITS).setup()


def test_a_split_the_fraction_could_not_carve_says_so(tmp_path, write_jsonl):
    # it used to say "give a val_file or a non-zero val_fraction" while val_fraction was 0.1
    p = write_jsonl(tmp_path / "one.jsonl", [{"text": "hello world"}])
    dm = CausalLMDataModule(train_file=str(p), val_fraction=0.1, test_fraction=0.0)
    dm.setup()
    with pytest.raises(ValueError) as e:
        dm.val_dataloader()
    msg = str(e.value)
    assert "there is no val split: val_fraction=0.1 carved no record out of the 1 training record" in msg
    assert "give a val_file or more (distinct) training records" in msg
    assert "non-zero val_fraction" not in msg


def _tokenizer_without_bos(make_hf_dir, path: Path) -> Path:
    """A Phi-3-like tokenizer directory that names no bos token anywhere."""
    import json

    tokdir = make_hf_dir(path, "phi3")
    cfg = json.loads((tokdir / "tokenizer_config.json").read_text())
    del cfg["bos_token"]
    (tokdir / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tokdir


@pytest.mark.parametrize("data_format", ["text", "chat"])
def test_add_bos_without_a_bos_token_is_refused_not_ignored(tmp_path, make_hf_dir, data_format):
    """add_bos=True with a tokenizer that has no bos token used to prepend nothing, silently: now the data module
    refuses it at construction, naming the setting and the fix; add_bos=False is unaffected."""
    tokdir = _tokenizer_without_bos(make_hf_dir, tmp_path / "tok")
    from phi3_lightning.data.tokenizer import HFTokenizer

    assert HFTokenizer(tokdir).bos_token_id is None
    kw = dict(tokenizer=str(tokdir), data_format=data_format, **NO_SPLITS)
    with pytest.raises(ValueError) as e:
        CausalLMDataModule(add_bos=True, **kw)
    msg = str(e.value)
    assert "add_bos=True" in msg and f"tokenizer {str(tokdir)!r} has no bos token" in msg
    assert "--data.add_bos false" in msg
    with pytest.raises(ValueError, match=r"add_bos=True but the tokenizer .* has no bos token"):
        SequenceClassificationDataModule(tokenizer=str(tokdir), add_bos=True, **NO_SPLITS)
    CausalLMDataModule(add_bos=False, **kw)  # not asked for: fine


def test_tokenize_chat_add_bos_without_a_bos_token_is_refused(tmp_path, make_hf_dir):
    from phi3_lightning.data.chat import tokenize_chat
    from phi3_lightning.data.tokenizer import HFTokenizer

    tok = HFTokenizer(_tokenizer_without_bos(make_hf_dir, tmp_path / "tok"))
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(ValueError, match=r"add_bos=True but the tokenizer has no bos token; .*add_bos=False"):
        tokenize_chat(convo, tok, add_bos=True)
    assert tokenize_chat(convo, tok)["input_ids"] == tok.encode("<|user|>\nhi<|end|>\n<|assistant|>\nyo<|end|>\n")


def test_classification_add_eos_when_pad_is_eos_is_warned_once(tmp_path, make_hf_dir, write_jsonl):
    """The Phi-3 tokenizer pads with its eos id: an eos appended to a classification example is then taken for
    padding by the pooling ("last" skips it, "attention" masks it), so add_eos=True changes nothing. One warning,
    at construction, naming add_eos, the shared id and the fix; a tokenizer whose pad differs (phi-4) is silent."""
    import warnings

    from phi3_lightning.data.tokenizer import HFTokenizer

    phi3 = make_hf_dir(tmp_path / "phi3", "phi3")
    tok = HFTokenizer(phi3)
    assert tok.pad_token_id == tok.eos_token_id
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "the x", "label": "a"}, {"text": "in", "label": "b"}])
    kw = dict(train_file=str(p), **NO_SPLITS)
    with pytest.warns(UserWarning) as caught:
        dm = SequenceClassificationDataModule(tokenizer=str(phi3), add_eos=True, **kw)
        dm.setup("fit")
    said = [str(w.message) for w in caught if "add_eos" in str(w.message)]
    assert len(said) == 1, said
    assert f"add_eos=True but the tokenizer's pad id is its eos id ({tok.eos_token_id};" in said[0]
    assert "pooling takes the appended eos for padding" in said[0] and "--data.add_eos false" in said[0]
    assert dm.datasets["train"][0]["input_ids"][-1] == tok.eos_token_id  # still appended, as asked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SequenceClassificationDataModule(tokenizer=str(phi3), add_eos=False, **kw)
        phi4 = make_hf_dir(tmp_path / "phi4", "phi4")
        dm = SequenceClassificationDataModule(tokenizer=str(phi4), add_eos=True, **kw)
        assert dm.pad_token_id != dm.tokenizer.eos_token_id
