"""Crash, kill and interrupt cases of fit that the other run tests do not cover: a resume after the data changed
in place, a disk that fills up during a save, two fits started at once on one run name."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from phi3_lightning.data.packing import pack_documents
from phi3_lightning.data.sampling import EpochSampler, ResumableDataLoader

from .modules.helpers import CONFIGS, run_main

# ------------------------------------------------------------------------------------------------------------------
# A resume over other training rows than the checkpoint's (the same files edited in place, another tokenizer file)
# ------------------------------------------------------------------------------------------------------------------


def _loader(docs: list[list[int]]) -> ResumableDataLoader:
    rows = pack_documents(docs, 8, pad_token_id=0)
    return ResumableDataLoader(rows, batch_size=2, sampler=EpochSampler(rows, seed=0, batch_size=2))


def test_loader_state_refuses_rows_that_changed_but_not_their_number():
    docs = [[1 + (i * 7 + j) % 50 for j in range(6)] for i in range(12)]
    saved = _loader(docs)
    it = iter(saved)
    next(it)
    state = saved.state_dict()
    _loader([list(d) for d in docs]).load_state_dict(state)  # the same rows: accepted
    edited = [list(d) for d in docs]
    edited[3][2] = 99  # one token of one document: same number of rows, other content
    other = _loader(edited)
    assert len(other.dataset) == len(saved.dataset)
    with pytest.raises(ValueError, match="training rows differ from the checkpoint's"):
        other.load_state_dict(state)
    swapped = [docs[1], docs[0], *docs[2:]]  # two documents swapped: the same tokens in another order
    with pytest.raises(ValueError, match="training rows differ"):
        _loader(swapped).load_state_dict(state)


def _write_corpus(d: Path, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    paras = ["\n".join("".join(rng.choice("abcdefghij ") for _ in range(40)) for _ in range(2)) for _ in range(120)]
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.txt").write_text("\n\n".join(paras))
    (d / "validation.txt").write_text("\n\n".join(paras[:10]))
    return paras


def _file_args(logs: Path, cache: Path, data: Path, steps: int) -> list[str]:
    return [
        "--config",
        str(CONFIGS / "causal_lm.yaml"),
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(logs),
        "--data.init_args.cache_dir",
        str(cache),
        "--data.init_args.progress",
        "false",
        "--data.init_args.source",
        str(data),
        "--data.init_args.max_length",
        "32",
        "--data.init_args.batch_size",
        "4",
        "--run_name",
        "edited",
    ]


def test_fit_resume_after_the_train_file_was_edited_in_place_is_refused(tmp_path):
    # same path, same settings, same number of packed rows: only the content moved. The resumed epoch used to go on
    # at "batch k" of other rows, silently not the run it continued
    logs, cache, data = tmp_path / "logs", tmp_path / "cache", tmp_path / "data"
    paras = _write_corpus(data)
    rc, _, err = run_main("fit", *_file_args(logs, cache, data, 2))
    assert rc == 0, err[-3000:]
    last = logs / "edited" / "version_0" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    paras[20], paras[21] = paras[21], paras[20]  # reorder two paragraphs of train ...
    paras[30] = paras[30].replace("a", "j")  # ... and edit one: the same lengths
    (data / "train.txt").write_text("\n\n".join(paras))
    rc, _, err = run_main("fit", *_file_args(logs, cache, data, 4), "--ckpt_path", "last")
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    assert "training rows differ from the checkpoint's" in err, err[-3000:]
    assert last.read_bytes() == before
    assert torch.load(last, weights_only=True)["global_step"] == 2
