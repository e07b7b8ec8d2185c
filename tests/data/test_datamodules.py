import json
import warnings

import pytest
import torch

from phi3_lightning.data import (
    CausalLMDataModule,
    SequenceClassificationDataModule,
    TokenClassificationDataModule,
)
from phi3_lightning.data.collate import padding_efficiency
from phi3_lightning.data.sampling import EpochSampler
from phi3_lightning.data.tokenizer import ByteTokenizer

BATCH_KEYS = {"input_ids", "attention_mask", "position_ids", "labels"}


def _check_common(batch, T=None):
    assert BATCH_KEYS <= set(batch)
    B, t = batch["input_ids"].shape
    if T is not None:
        assert t == T
    for k in ("input_ids", "attention_mask", "position_ids"):
        assert batch[k].shape == (B, t) and batch[k].dtype == torch.long
    return B, t


# ------------------------------------------------------------------------------------------------ causal LM
def test_causal_lm_embedded_packed(cache_dir):
    dm = CausalLMDataModule(max_files=8, max_length=64, batch_size=4, cache_dir=cache_dir, progress=False)
    assert dm.vocab_size == 262 and dm.pad_token_id == 257
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    B, T = _check_common(batch, 64)
    assert B == 4 and batch["labels"].shape == (4, 64)
    pos, lab, ids = batch["position_ids"], batch["labels"], batch["input_ids"]
    assert (lab[pos == 0] == -100).all()  # every document start: no label from the previous document
    real = batch["attention_mask"].bool()
    assert ((lab == ids) | (lab == -100)).all() and (lab[~real] == -100).all()
    assert dm.efficiency["train"] > 0.95
    assert set(dm.datasets) == {"train", "val", "test"}
    # each document ends with eos
    assert (ids == ByteTokenizer().eos_token_id).any() or len(dm.datasets["train"]) > 4


def test_causal_lm_train_order_is_seeded(cache_dir):
    kw = dict(max_files=4, max_length=32, batch_size=2, cache_dir=cache_dir, progress=False)
    a, b = CausalLMDataModule(seed=1, **kw), CausalLMDataModule(seed=1, **kw)
    a.setup(), b.setup()
    assert torch.equal(next(iter(a.train_dataloader()))["input_ids"], next(iter(b.train_dataloader()))["input_ids"])


def test_causal_lm_unpacked_padding(cache_dir):
    dm = CausalLMDataModule(
        max_files=4, max_length=48, batch_size=3, pack=False, pad_to_multiple_of=16, cache_dir=cache_dir, progress=False
    )
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochSampler) and loader.sampler.lengths is not None  # grouped by length
    batch = next(iter(loader))
    B, T = _check_common(batch)
    assert T % 16 == 0 and T <= 48
    assert batch["position_ids"][0].tolist() == list(range(T))
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == -100).all() and (batch["input_ids"][pad] == dm.pad_token_id).all()


def test_causal_lm_text_file_and_left_padding(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "train.jsonl", [{"body": "hello world " * (i + 1)} for i in range(20)])
    dm = CausalLMDataModule(
        train_file=str(tmp_path / "train.jsonl"),
        text_field="body",
        pack=False,
        padding_side="left",
        max_length=64,
        batch_size=4,
        val_fraction=0.2,
        test_fraction=0.0,
    )
    dm.setup()
    assert dm.resolved_format() == "text"
    assert len(dm.datasets["val"]) > 0 and dm.datasets["test"] is dm.datasets["val"]
    batch = next(iter(dm.val_dataloader()))
    mask = batch["attention_mask"]
    assert (batch["position_ids"] == (mask.cumsum(-1) - 1).clamp(min=0)).all()
    assert (mask[:, -1] == 1).all()  # left padding: every row ends with a real token


def test_causal_lm_chat_jsonl(tmp_path, write_jsonl):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(12)
    ]
    rows.append({"messages": [{"role": "user", "content": "no answer"}]})
    write_jsonl(tmp_path / "chat.jsonl", rows)
    dm = CausalLMDataModule(source=str(tmp_path / "chat.jsonl"), max_length=64, batch_size=2, val_fraction=0.25)
    with pytest.warns(UserWarning, match="without an assistant turn"):
        dm.setup()
    assert dm.resolved_format() == "chat"
    tok = dm.tokenizer
    rows_ds = dm.datasets["train"]
    trained = rows_ds.labels[rows_ds.labels != -100].tolist()
    text = tok.decode(trained)
    assert "<|end|>" in text and "q" not in text and "a" in text  # only assistant tokens carry labels
    # unpacked, the same
    dm2 = CausalLMDataModule(
        source=str(tmp_path / "chat.jsonl"), max_length=64, pack=False, add_eos=False, val_fraction=0.25
    )
    with pytest.warns(UserWarning):
        dm2.setup()
    ex = dm2.datasets["train"][0]
    got = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])
    assert got.startswith("a") and got.endswith("<|end|>")


def test_causal_lm_hf_tokenizer_chat(tmp_path, hf_dirs, write_jsonl):
    write_jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the in"}]}] * 4,
    )
    dm = CausalLMDataModule(
        tokenizer=str(hf_dirs["phi4"]),
        source=str(tmp_path / "c.jsonl"),
        max_length=32,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    assert dm.chat_format == "phi4" and dm.vocab_size > 1000
    dm.setup()
    labels = dm.datasets["train"].labels
    assert dm.tokenizer.decode(labels[labels != -100].tolist()).count("<|im_end|>") == 4


def test_predict_dataloader_carries_index(cache_dir):
    dm = CausalLMDataModule(max_files=4, max_length=32, batch_size=2, cache_dir=cache_dir, progress=False)
    dm.setup()
    idx = torch.cat([b["index"] for b in dm.predict_dataloader()])
    assert idx.tolist() == list(range(len(dm.datasets["test"])))
    assert "index" not in next(iter(dm.train_dataloader()))


# ------------------------------------------------------------------------------------------------ sequence cls
def test_seq_cls_embedded_labels_known_at_construction(cache_dir):
    dm = SequenceClassificationDataModule(
        cache_dir=cache_dir, progress=False, max_per_class=15, batch_size=8, max_length=64
    )
    assert dm._records is None  # nothing read yet
    assert dm.label_names[:3] == ["asyncio", "email", "json"] and dm.num_labels == len(dm.label_names)
    assert dm.problem_type == "single_label_classification" and dm._records is None
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    B, T = _check_common(batch)
    assert batch["labels"].shape == (B,) and batch["labels"].dtype == torch.long and T <= 64
    assert set(torch.cat([b["labels"] for b in dm.train_dataloader()]).tolist()) == set(range(dm.num_labels))
    pb = next(iter(dm.predict_dataloader()))
    named = dm.decode_predictions(pb["index"], pb["labels"])
    assert all(r["prediction"] == r["label"] and r["prediction"] in dm.label_names for r in named)


def test_seq_cls_from_files(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"t {i}", "label": ["pos", "neg"][i % 2]} for i in range(10)])
    write_jsonl(tmp_path / "val.jsonl", [{"text": "v", "label": "neg"}])
    dm = SequenceClassificationDataModule(source=str(tmp_path), batch_size=4)
    assert dm.label_names == ["neg", "pos"] and dm.num_labels == 2  # read lazily from train
    dm.setup()
    assert len(dm.datasets["val"]) == 1 and len(dm.datasets["test"]) > 0  # test carved from train
    assert dm.datasets["val"][0]["labels"] == 0


def test_seq_cls_multi_label_and_regression(tmp_path, write_jsonl):
    write_jsonl(
        tmp_path / "m.jsonl",
        [{"text": "a", "tags": ["x", "z"]}, {"text": "b", "tags": []}, {"text": "c", "tags": ["y"]}],
    )
    dm = SequenceClassificationDataModule(
        train_file=str(tmp_path / "m.jsonl"), label_field="tags", val_fraction=0.0, test_fraction=0.0
    )
    assert dm.problem_type == "multi_label_classification" and dm.label_names == ["x", "y", "z"]
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].dtype == torch.float and batch["labels"].shape == (3, 3)
    assert sorted(map(tuple, batch["labels"].tolist())) == [(0, 0, 0), (0, 1, 0), (1, 0, 1)]

    (tmp_path / "cols.csv").write_text("text,toxic,insult\na,1,0\nb,0,1\nc,1,1\n")
    dm = SequenceClassificationDataModule(
        train_file=str(tmp_path / "cols.csv"), label_field="toxic,insult", val_fraction=0.0, test_fraction=0.0
    )
    assert dm.problem_type == "multi_label_classification" and dm.label_names == ["toxic", "insult"]
    dm.setup()
    assert dm.datasets["train"][2]["labels"] == [1.0, 1.0]

    write_jsonl(tmp_path / "r.jsonl", [{"text": "a", "score": 0.5}, {"text": "b", "score": 2}])
    dm = SequenceClassificationDataModule(
        train_file=str(tmp_path / "r.jsonl"), label_field="score", val_fraction=0.0, test_fraction=0.0
    )
    assert dm.problem_type == "regression" and dm.num_labels == 1
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].dtype == torch.float and batch["labels"].shape == (2,)


def test_seq_cls_integer_and_csv_labels(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\na,2\nb,0\nc,10\n")
    dm = SequenceClassificationDataModule(train_file=str(tmp_path / "d.csv"), val_fraction=0.0, test_fraction=0.0)
    assert dm.label_names == ["0", "2", "10"]  # numeric strings sort numerically
    dm = SequenceClassificationDataModule(
        train_file=str(tmp_path / "d.csv"), val_fraction=0.0, test_fraction=0.0, problem_type="regression"
    )
    dm.setup()
    assert sorted(ex["labels"] for ex in dm.datasets["train"].examples) == [0.0, 2.0, 10.0]


# ------------------------------------------------------------------------------------------------ token cls
def test_token_cls_embedded(cache_dir):
    dm = TokenClassificationDataModule(
        cache_dir=cache_dir, progress=False, max_files=2, max_examples=60, batch_size=4, max_length=128
    )
    assert dm.label_names[:2] == ["NAME", "OP"] and dm._records is None
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    B, T = _check_common(batch)
    assert batch["labels"].shape == (B, T) and batch["labels"].dtype == torch.long
    labelled = batch["labels"][batch["labels"] != -100]
    assert labelled.min() >= 0 and labelled.max() < dm.num_labels


def test_token_cls_subtoken_alignment(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "t.jsonl", [{"words": ["def", "fé", "(", ")"], "labels": ["KW", "NAME", "OP", "OP"]}])
    kw = dict(train_file=str(tmp_path / "t.jsonl"), val_fraction=0.0, test_fraction=0.0)
    dm = TokenClassificationDataModule(**kw)
    assert dm.label_names == ["KW", "NAME", "OP"]
    dm.setup()
    ex = dm.datasets["train"][0]
    # byte ids: "def" | " fé" (4 bytes) | " (" | " )"
    assert dm.tokenizer.decode(ex["input_ids"]) == "def fé ( )"
    assert ex["labels"] == [0, -100, -100, 1, -100, -100, -100, 2, -100, 2, -100]
    with pytest.raises(ValueError, match=r"there is no test split \(data from '.*t.jsonl'.*give a test_file"):
        dm.predict_dataloader()
    dm = TokenClassificationDataModule(label_all_subtokens=True, word_separator="", test_file=kw["train_file"], **kw)
    dm.setup()
    ex = dm.datasets["train"][0]
    assert ex["labels"] == [0, 0, 0, 1, 1, 1, 2, 2]
    pb = next(iter(dm.predict_dataloader()))
    out = dm.decode_predictions(pb["index"], pb["labels"].clamp(min=0))
    assert out[0]["predictions"] == ["KW", "NAME", "OP", "OP"]


def test_token_cls_hf_tokenizer_first_subtoken(tmp_path, hf_dirs, write_jsonl):
    write_jsonl(tmp_path / "t.jsonl", [{"words": ["the", "thing", "in"], "labels": [0, 1, 0]}])
    dm = TokenClassificationDataModule(
        tokenizer=str(hf_dirs["phi4"]), train_file=str(tmp_path / "t.jsonl"), val_fraction=0.0, test_fraction=0.0
    )
    dm.setup()
    ex = dm.datasets["train"][0]
    tok = dm.tokenizer
    assert ex["input_ids"] == tok.encode("the") + tok.encode(" thing") + tok.encode(" in")
    firsts = [i for i, lab in enumerate(ex["labels"]) if lab != -100]
    assert [ex["labels"][i] for i in firsts] == [0, 1, 0] and firsts[0] == 0


# ------------------------------------------------------------------------------------------------ Lightning
def test_cli_signature_and_help():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(CausalLMDataModule, "data")
    cfg = parser.parse_args(["--data.max_length", "64", "--data.pack", "false"])
    assert cfg.data.max_length == 64 and cfg.data.pack is False and cfg.data.tokenizer == "byte"
    help_text = parser.format_help()
    assert "tokens per packed row" in help_text
    for cls in (SequenceClassificationDataModule, TokenClassificationDataModule):
        p = jsonargparse.ArgumentParser()
        p.add_class_arguments(cls, "data")
        assert "label_names" in p.format_help()


def test_train_sampler_shards_by_rank_and_keeps_length_grouping(cache_dir):
    """The train sampler is a DistributedSampler (Lightning keeps it) that shards by rank itself, groups each rank's
    shard by length, and orders by (seed, epoch) alone."""
    from torch.utils.data import DistributedSampler

    dm = TokenClassificationDataModule(cache_dir=cache_dir, progress=False, max_files=2, max_examples=60, batch_size=4)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, DistributedSampler)  # Lightning's use_distributed_sampler leaves it alone
    ds = dm.datasets["train"]
    n = len(ds)
    seen, grouped, plain = [], 0.0, 0.0
    for rank in (0, 1):
        s = EpochSampler(ds, seed=0, num_replicas=2, rank=rank, batch_size=4, lengths=ds.lengths, mega_batch_mult=3)
        order = list(s)
        assert len(order) == len(s) and order == list(s)  # deterministic
        s.set_epoch(1)
        assert list(s) != order  # each epoch its own order
        s.set_epoch(0)
        seen += order
        batches = [[ds.lengths[i] for i in order[j : j + 4]] for j in range(0, len(order), 4)]
        grouped += padding_efficiency(batches)
        s.lengths = None
        plain_order = list(s)
        plain += padding_efficiency([[ds.lengths[i] for i in plain_order[j : j + 4]] for j in range(0, len(order), 4)])
    assert set(seen) == set(range(n))
    assert grouped > plain


def test_trainer_runs_on_each_datamodule(cache_dir):
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self, vocab, out):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, 8)
            self.head = torch.nn.Linear(8, out)

        def training_step(self, batch, _):
            h = self.emb(batch["input_ids"]) * batch["attention_mask"].unsqueeze(-1)
            assert batch["position_ids"].shape == batch["input_ids"].shape
            return self.head(h).float().mean()

        def validation_step(self, batch, _):
            return self.training_step(batch, _)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dms = [
        CausalLMDataModule(max_files=3, max_length=32, batch_size=2, cache_dir=cache_dir, progress=False),
        SequenceClassificationDataModule(
            max_per_class=4, max_length=32, batch_size=2, cache_dir=cache_dir, progress=False
        ),
        TokenClassificationDataModule(max_files=1, max_examples=20, batch_size=2, cache_dir=cache_dir, progress=False),
    ]
    for dm in dms:
        trainer = pl.Trainer(
            max_steps=2,
            limit_val_batches=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        trainer.fit(Tiny(dm.vocab_size, getattr(dm, "num_labels", 1)), datamodule=dm)
        assert trainer.global_step == 2
        assert json.dumps(dict(dm.hparams), default=str)  # hyperparameters are plain values


def test_token_cls_truncation_cuts_ids_labels_and_word_ids_together(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "t.jsonl", [{"words": ["abc", "de", "f"], "labels": ["A", "B", "C"]}])
    kw = dict(train_file=str(tmp_path / "t.jsonl"), val_fraction=0.0, test_fraction=0.0, max_length=5)
    dm = TokenClassificationDataModule(**kw)
    dm.setup()
    ex = dm.datasets["train"].examples[0]  # byte ids: "abc" | " de" | " f" = 3 + 3 + 2 tokens, cut to 5
    assert dm.tokenizer.decode(ex["input_ids"]) == "abc d"
    assert ex["labels"] == [0, -100, -100, 1, -100] and ex["word_ids"] == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"line 1: 8 tokens, more than max_length=5; raise max_length or set truncate"):
        TokenClassificationDataModule(**kw, truncate=False).setup()


def test_truncation_is_counted_and_reported_per_split(tmp_path, write_jsonl):
    """Examples cut to max_length lose tokens (a classifier's eos, the words at the end): say how many, per split."""
    rows = [{"words": ["abc", "de", "f"], "labels": ["A", "B", "C"]}, {"words": ["ab"], "labels": ["A"]}]
    write_jsonl(tmp_path / "t.jsonl", rows)
    kw = dict(train_file=str(tmp_path / "t.jsonl"), val_fraction=0.0, test_fraction=0.0)
    with pytest.warns(UserWarning, match=r"train: cut 1 of 2 examples longer than max_length=5 \(3 tokens dropped"):
        TokenClassificationDataModule(**kw, max_length=5).setup()
    texts = [{"text": "x" * 10, "label": "a"}, {"text": "y" * 3, "label": "b"}, {"text": "z" * 7, "label": "a"}]
    write_jsonl(tmp_path / "s.jsonl", texts)
    skw = dict(train_file=str(tmp_path / "s.jsonl"), val_fraction=0.0, test_fraction=0.0, add_eos=True, max_length=6)
    with pytest.warns(UserWarning, match=r"train: cut 2 of 3 examples longer than max_length=6 \(7 tokens dropped"):
        SequenceClassificationDataModule(**skw).setup()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TokenClassificationDataModule(**kw, max_length=8).setup()  # nothing cut: no warning


@pytest.mark.parametrize("pack", [True, False])
def test_causal_lm_split_long_reports_the_targets_lost_at_the_cuts(tmp_path, write_jsonl, pack):
    """Each continuation piece of a split document starts a document of its own, so its first token is no target:
    the warning and ``cut_targets`` give exactly how many targets the rows lack against the uncut documents."""
    texts = ["a" * 50, "b" * 7, "c" * 33]  # 51 and 34 tokens with eos: 3 and 2 pieces of <= 20
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    dm = CausalLMDataModule(train_file=str(path), val_fraction=0.0, test_fraction=0.0, max_length=20, pack=pack)
    with pytest.warns(UserWarning, match=r"train: 2 documents longer than max_length=20 were split into 5 pieces") as w:
        dm.setup("fit")
    ds = dm.datasets["train"]
    rows = [ds[i] for i in range(len(ds))]
    in_rows = sum(int((torch.as_tensor(r["labels"])[1:] != -100).sum()) for r in rows)  # what the loss counts
    whole = sum(len(t) + 1 - 1 for t in texts)  # each uncut document: tokens 1..n-1 are targets
    assert dm.cut_targets["train"] == whole - in_rows == 3
    assert f"3 of {whole} targets" in str(w[-1].message)


def test_causal_lm_split_long_small_target_loss_is_said_in_the_summary_not_warned(tmp_path, write_jsonl):
    """Below 1 % of a split's targets (the default data loses 0.4 %) the loss is one part of the data summary line,
    not a warning on every run; ``cut_targets`` still has the exact count."""
    texts = ["x" * 250, *(f"short line {i}" for i in range(40))]  # 251 tokens with eos: 2 pieces of <= 200
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    dm = CausalLMDataModule(train_file=str(path), val_fraction=0.0, test_fraction=0.0, max_length=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.setup("fit")
    total = sum(len(t) for t in texts)  # tokens 1..n-1 of each document (n = len + eos) are targets
    assert dm.cut_targets["train"] == 1 and 1 / total < 0.01
    assert (
        dm._summary_extra()
        == f"; targets lost where long documents were split (first token of each continuation): train {1 / total:.2%}"
    )
