"""The `datasets` / parquet data paths: local parquet files, ``save_to_disk`` directories, ``hf:`` on local files, and
``datasets`` objects passed from Python (in memory and streamed), through the causal-LM DataModule. Never the hub:
every test runs with the Hugging Face offline switches on and a temporary cache."""

from __future__ import annotations

import itertools
import pickle

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from phi3_lightning.data import CausalLMDataModule
from phi3_lightning.data.sampling import EpochSampler, ResumableDataLoader
from phi3_lightning.data.sources import load_source

DOCS = [f"doc {i}: " + "abcdefghij"[i % 10] * (3 + i % 7) for i in range(12)]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No hub access: the offline switches (environment and the values `datasets` read at import) and a tmp cache."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _dm(source, **kw):
    args = dict(source=source, max_length=32, batch_size=2, val_fraction=0.0, test_fraction=0.0, progress=False)
    args.update(kw)
    return CausalLMDataModule(**args)


def _expected(dm, texts):
    """The documents as the byte tokenizer encodes them (+ eos), as a sorted list of token lists."""
    return sorted(dm.tokenizer.encode(t) + [dm.tokenizer.eos_token_id] for t in texts)


def _packed_docs(rows) -> list[list[int]]:
    """The documents inside packed rows, cut where ``position_ids`` restart, with the labels checked on the way:
    a document's labels are its ids except -100 at its first token."""
    docs = []
    for r in range(len(rows)):
        ids, pos, lab, mask = (rows[r][k].tolist() for k in ("input_ids", "position_ids", "labels", "attention_mask"))
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n)
        for i in range(n):
            if pos[i] == 0:
                docs.append([])
                assert lab[i] == -100
            else:
                assert lab[i] == ids[i]
            docs[-1].append(ids[i])
    return sorted(docs)


def _first_doc(rows) -> str:
    return "".join(chr(b) for b in rows.input_ids[0].tolist() if b < 256)


# ---------------------------------------------------------------------------------------------------------------- files


def test_parquet_file_is_packed_with_its_text(tmp_path):
    pq.write_table(pa.table({"text": DOCS, "label": list(range(len(DOCS)))}), tmp_path / "train.parquet")
    dm = _dm(str(tmp_path / "train.parquet"))
    dm.setup()
    assert _packed_docs(dm.datasets["train"]) == _expected(dm, DOCS)


def test_save_to_disk_dir_splits_and_content(tmp_path):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": DOCS[:8]}),
            "validation": datasets.Dataset.from_dict({"text": DOCS[8:10]}),
            "test": datasets.Dataset.from_dict({"text": DOCS[10:]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    dm = _dm(str(tmp_path / "ds"), val_fraction=0.1, test_fraction=0.1)  # given splits win over the fractions
    dm.setup()
    for split, texts in (("train", DOCS[:8]), ("val", DOCS[8:10]), ("test", DOCS[10:])):
        assert _packed_docs(dm.datasets[split]) == _expected(dm, texts), split


def test_hf_prefix_on_a_local_parquet_dir_stays_offline(tmp_path):
    d = tmp_path / "repo" / "data"
    d.mkdir(parents=True)
    pq.write_table(pa.table({"text": DOCS[:6]}), d / "train.parquet")
    pq.write_table(pa.table({"text": DOCS[6:8]}), d / "validation.parquet")
    splits = load_source(f"hf:{tmp_path / 'repo'}")
    assert [r["text"] for r in splits["train"]] == DOCS[:6]
    assert [r["text"] for r in splits["val"]] == DOCS[6:8]


def test_dataset_script_is_never_run(tmp_path):
    repo = tmp_path / "scripted"
    repo.mkdir()
    marker = tmp_path / "script_ran"
    (repo / "scripted.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ValueError, match=r"is a dataset loading script .* never runs dataset code"):
        load_source(f"hf:{repo}")
    assert not marker.exists()


def test_old_datasets_get_trust_remote_code_false(monkeypatch):
    seen = {}

    def fake_load_dataset(name, config=None, **kwargs):
        seen.update(kwargs, name=name, config=config)
        return datasets.Dataset.from_dict({"text": ["x"]})

    monkeypatch.setattr(datasets, "__version__", "2.21.0")
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    load_source("hf:some/name:cfg")
    assert seen == {"name": "some/name", "config": "cfg", "trust_remote_code": False}
    seen.clear()
    monkeypatch.setattr(datasets, "__version__", "5.2.0")  # no script loading at all: nothing to pass
    load_source("hf:some/name")
    assert seen == {"name": "some/name", "config": None}


def test_unreadable_parquet_names_file_and_fix(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(ValueError, match=r"'.*bad.parquet' is not a readable parquet file .*convert it to jsonl/csv"):
        load_source(str(tmp_path / "bad.parquet"))


def test_parquet_binary_column_not_utf8(tmp_path):
    pq.write_table(pa.table({"text": pa.array([b"ok", b"caf\xe9"], pa.binary())}), tmp_path / "t.parquet")
    dm = _dm(str(tmp_path / "t.parquet"))
    with pytest.raises(ValueError, match=r"t.parquet row 0: text field 'text' holds bytes \(a binary column\)"):
        dm.setup()
    pq.write_table(pa.table({"text": pa.array([b"caf\xe9"], pa.binary())}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"row 0: .*not valid UTF-8 \(byte 0xe9 at offset 3\); re-encode"):
        _dm(str(tmp_path / "t.parquet")).setup()


# ------------------------------------------------------------------------------------------------- in-memory objects


def test_in_memory_dataset_and_datasetdict(tmp_path):
    ds = datasets.Dataset.from_dict({"body": DOCS, "text": ["wrong column"] * len(DOCS)})
    dm = _dm(ds, text_field="body")
    dm.setup()
    assert _packed_docs(dm.datasets["train"]) == _expected(dm, DOCS)
    # the object stays out of the hyperparameters (checkpoints, hparams.yaml): its description is recorded
    assert dm.hparams["source"] == "<in-memory datasets.Dataset>"
    assert b"abcdef" not in pickle.dumps(dict(dm.hparams)) and b"wrong column" not in pickle.dumps(dict(dm.hparams))

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": DOCS[:9]}), "dev": datasets.Dataset.from_dict({"text": DOCS[9:]})}
    )
    dm = _dm(dd, max_documents=5)
    dm.setup()
    assert _packed_docs(dm.datasets["train"]) == _expected(dm, DOCS[:5])  # max_documents: the first 5
    assert _packed_docs(dm.datasets["val"]) == _expected(dm, DOCS[9:])
    assert dm.hparams["source"] == "<in-memory datasets.DatasetDict: train, dev>"


def test_unknown_split_names_warn():
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["a"]}), "extra": datasets.Dataset.from_dict({"text": ["b"]})}
    )
    with pytest.warns(UserWarning, match=r"split 'extra' is not used .* rename it"):
        splits = load_source(dd)
    assert set(splits) == {"train"}


def test_chat_dataset_labels_only_assistant_tokens():
    rows = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"A{i}"}] for i in range(4)]
    dm = _dm(datasets.Dataset.from_list([{"messages": m} for m in rows]), max_length=64, add_eos=False)
    dm.setup()
    rows_ds = dm.datasets["train"]
    assert dm.tokenizer.decode(rows_ds.input_ids[0].tolist()).startswith("<|user|>\nq")
    trained = dm.tokenizer.decode(rows_ds.labels[rows_ds.labels != -100].tolist())
    assert sorted(trained.split("<|end|>")) == ["", "A0", "A1", "A2", "A3"]  # the assistant turns, nothing else


# --------------------------------------------------------------------------------------------------------------- streams


def _endless():
    for i in itertools.count():
        yield {"text": DOCS[i % len(DOCS)] + f" #{i}"}


def test_stream_is_packed_up_to_max_documents():
    stream = datasets.IterableDataset.from_generator(_endless)  # endless: only max_documents are ever read
    dm = _dm(stream, max_documents=10, val_fraction=0.2)
    dm.setup()
    texts = [DOCS[i] + f" #{i}" for i in range(10)]
    got = _packed_docs(dm.datasets["train"]) + _packed_docs(dm.datasets["val"])
    assert sorted(got) == _expected(dm, texts)  # the first 10, split between train and val
    assert len(_packed_docs(dm.datasets["val"])) >= 1
    assert dm.hparams["source"] == "<streamed datasets.IterableDataset>"


def test_stream_resume_is_exact():
    def fresh():
        dm = _dm(datasets.IterableDataset.from_generator(_endless), max_documents=24, max_length=16, batch_size=2)
        return dm, dm.train_dataloader()

    dm, loader = fresh()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, EpochSampler)
    full = [b["input_ids"] for b in loader]
    assert len(full) >= 4
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    _, resumed = fresh()  # a new run: the stream is read again
    resumed.load_state_dict(state)
    rest = [b["input_ids"] for b in resumed]
    assert len(rest) == len(full) - 3 and all(torch.equal(a, b) for a, b in zip(rest, full[3:]))


def test_iterable_datasetdict_splits():
    dd = datasets.IterableDatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": DOCS[:8]}).to_iterable_dataset(),
            "test": datasets.Dataset.from_dict({"text": DOCS[8:]}).to_iterable_dataset(),
        }
    )
    dm = _dm(dd, max_documents=100, val_fraction=0.0)
    dm.setup()
    assert _packed_docs(dm.datasets["train"]) == _expected(dm, DOCS[:8])
    assert _packed_docs(dm.datasets["test"]) == _expected(dm, DOCS[8:])


# ------------------------------------------------------------------------------------------------------------ bad input


def test_stream_without_max_documents_is_refused():
    stream = datasets.IterableDataset.from_generator(_rows, gen_kwargs={"rows": [{"text": t} for t in DOCS]})
    with pytest.raises(ValueError, match=r"split 'train' is a stream .* no length; set max_documents=N"):
        _dm(stream).setup()


def _rows(rows):
    yield from rows


@pytest.mark.parametrize("stream", [False, True])
def test_bad_datasets_objects(stream):
    def make(columns):
        if not stream:
            return datasets.Dataset.from_dict(columns)
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        return datasets.IterableDataset.from_generator(_rows, gen_kwargs={"rows": rows})

    kind = "streamed datasets.IterableDataset" if stream else "in-memory datasets.Dataset"
    with pytest.raises(ValueError, match=r"row 0: has no text field 'text' \(fields: \['body'\]\); pass --data.text"):
        _dm(make({"body": ["x"]}), data_format="text", max_documents=5).setup()
    with pytest.raises(ValueError, match=rf"the train split of '<{kind}>' is empty; add data"):
        _dm(make({"text": []}), max_documents=5).setup()
    with pytest.raises(ValueError, match=r"row 0: text field 'text' holds a int, not a string; fix the record"):
        _dm(make({"text": [3, 7]}), data_format="text", max_documents=5).setup()
    with pytest.raises(ValueError, match=r"row 0: text field 'text' holds bytes that are not valid UTF-8 \(byte 0xff"):
        _dm(make({"text": [b"\xff\xfe"]}), max_documents=5).setup()


def test_other_objects_are_refused():
    with pytest.raises(ValueError, match=r"source is a dict; pass a path, 'hf:<name>' or 'embedded'"):
        load_source({"text": ["x"]})


def test_fit_on_a_stream_writes_a_checkpoint_the_safe_reader_loads(tmp_path):
    import lightning.pytorch as pl

    from phi3_lightning.modules.safe_load import load_checkpoint_file

    class Tiny(pl.LightningModule):
        def __init__(self, vocab):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, 4)

        def training_step(self, batch, _):
            return self.emb(batch["input_ids"]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = _dm(datasets.IterableDataset.from_generator(_endless), max_documents=8, max_length=16)
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=0,
    )
    trainer.fit(Tiny(dm.vocab_size), datamodule=dm)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = load_checkpoint_file(tmp_path / "c.ckpt")  # weights_only: a datasets object in it would be refused
    assert ckpt["datamodule_hyper_parameters"]["source"] == "<streamed datasets.IterableDataset>"


# ------------------------------------------------------------------------------------------------ hf: with streaming


def _hf_repo(tmp_path, train=DOCS, validation=None):
    """A local dataset repository (``data/train.parquet`` [+ ``validation.parquet``]) that ``hf:<dir>`` loads."""
    d = tmp_path / "repo" / "data"
    d.mkdir(parents=True)
    pq.write_table(pa.table({"text": train}), d / "train.parquet")
    if validation is not None:
        pq.write_table(pa.table({"text": validation}), d / "validation.parquet")
    return f"hf:{tmp_path / 'repo'}"


@pytest.fixture
def load_calls(monkeypatch):
    """datasets.load_dataset as it is, recording (streaming kwarg, type of what it returned) per call."""
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((kwargs.get("streaming", False), type(out).__name__))
        return out

    monkeypatch.setattr(datasets, "load_dataset", spy)
    return calls


@pytest.mark.parametrize("pack", [True, False])
def test_hf_streaming_reads_the_first_records_and_batches_like_the_prepared_source(tmp_path, load_calls, pack):
    source = _hf_repo(tmp_path, train=DOCS, validation=[t.upper() for t in DOCS])
    kw = dict(max_documents=7, pack=pack, val_fraction=0.0, max_length=16, batch_size=3)
    streamed = _dm(source, streaming=True, **kw)
    streamed.setup()
    assert load_calls == [(True, "IterableDatasetDict")]  # opened as a stream, not prepared
    assert not list((tmp_path / "hf_cache").rglob("*.arrow"))  # nothing written to the datasets cache
    # exactly the first 7 records of each split, in stream order
    assert [r["text"] for r in streamed.records()["train"]] == DOCS[:7]
    assert [r["text"] for r in streamed.records()["val"]] == [t.upper() for t in DOCS[:7]]
    assert streamed.hparams["streaming"] is True

    prepared = _dm(source, **kw)  # the same source downloaded/prepared whole, same limit (keeps file order)
    prepared.setup()
    assert load_calls[1] == (False, "DatasetDict")
    for split, a, b in (
        ("train", list(streamed.train_dataloader()), list(prepared.train_dataloader())),
        ("val", list(streamed.val_dataloader()), list(prepared.val_dataloader())),
    ):
        assert len(a) == len(b) >= 2, split
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            assert all(torch.equal(x[k], y[k]) for k in x), split


@pytest.mark.parametrize(
    "module", ["CausalLMDataModule", "SequenceClassificationDataModule", "TokenClassificationDataModule"]
)
def test_hf_streaming_without_max_documents_names_the_option(tmp_path, module):
    import phi3_lightning.data as data

    source = _hf_repo(tmp_path)
    with pytest.raises(
        ValueError, match=r"streaming=True with source='hf:.*' and no max_documents: .*set max_documents=N"
    ):
        getattr(data, module)(source=source, streaming=True)


def test_streaming_with_a_source_that_is_not_hf_is_refused(tmp_path):
    source = _hf_repo(tmp_path)
    parquet = str(tmp_path / "repo" / "data" / "train.parquet")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    cases = {
        "embedded": "the embedded data",
        parquet: "a local file",
        str(tmp_path / "repo" / "data"): "a local directory",
        str(tmp_path / "saved"): "a saved datasets directory",
    }
    for src, what in cases.items():
        with pytest.raises(
            ValueError, match=rf"\({what}\): streaming applies to hf:NAME\[:CONFIG\] sources only; drop"
        ):
            _dm(src, streaming=True, max_documents=5)
    with pytest.raises(ValueError, match=r"\(train_file/val_file/test_file\): streaming applies to hf:NAME"):
        _dm("embedded", train_file=parquet, streaming=True, max_documents=5)
    with pytest.raises(ValueError, match=r"\(a datasets object .*\): streaming applies .*pass a stream itself"):
        _dm(datasets.Dataset.from_dict({"text": DOCS}), streaming=True, max_documents=5)
    with pytest.raises(ValueError, match=r"\(a local file\): streaming applies to hf:NAME.*use limit=N"):
        load_source(parquet, limit=5, streaming=True)  # the function itself checks too
    assert [r["text"] for r in load_source(source, limit=3, streaming=True)["train"]] == DOCS[:3]


def test_cli_fit_streams_an_hf_source(tmp_path):
    from ..modules.helpers import run_main, small_args

    source = _hf_repo(tmp_path, train=DOCS * 3)
    logs, cache = tmp_path / "logs", tmp_path / "cache"
    args = [*small_args("causal_lm", logs, cache, steps=2, val_every=2), "--data.init_args.source", source]
    args += ["--data.init_args.streaming", "true"]
    rc, _, err = run_main("fit", *args)  # no max_documents: a clear error, no traceback
    assert rc == 1 and "error: " in err and "set max_documents=N" in err and "Traceback" not in err
    rc, _, err = run_main("fit", *args, "--data.init_args.max_documents", "30")
    assert rc == 0, err[-3000:]
    run = logs / "causal_lm" / "sdpa" / "version_0"
    assert "last.ckpt" in {p.name for p in (run / "checkpoints").iterdir()}
    hparams = (run / "hparams.yaml").read_text()
    assert "streaming: true" in hparams and "max_documents: 30" in hparams
