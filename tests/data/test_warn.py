"""Data warnings: one category, attributed to the data module's line that found the problem (not to Lightning's
trainer/call.py, which called the hook), and said once per run: on the process of global rank 0 only."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from phi3_lightning.data import SequenceClassificationDataModule
from phi3_lightning.data.warn import DataWarning, global_rank, warn_data

DATA = Path(__file__).resolve().parents[2] / "phi3_lightning" / "data"


def _caught(fn, *args, **kwargs) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return [x for x in w if issubclass(x.category, DataWarning)]


def _hook_caller(dm) -> None:
    """Stands in for Lightning's trainer/call.py, which calls setup() (the line the old stacklevel=2 pointed at)."""
    dm.setup("fit")


def test_a_data_warning_names_the_data_module_not_the_caller_of_the_hook(tmp_path, write_jsonl, monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(var, raising=False)
    write_jsonl(tmp_path / "s.jsonl", [{"text": "x" * 10, "label": "a"}, {"text": "y" * 3, "label": "b"}])
    dm = SequenceClassificationDataModule(
        train_file=str(tmp_path / "s.jsonl"), val_fraction=0.0, test_fraction=0.0, add_eos=False, max_length=6
    )
    (w,) = _caught(_hook_caller, dm)
    assert "train: cut 1 of 2 examples longer than max_length=6" in str(w.message)
    assert Path(w.filename).resolve().is_relative_to(DATA), w.filename  # phi3_lightning/data/..., not this file
    assert issubclass(DataWarning, UserWarning)  # shown by default, and `-W ignore::...DataWarning` silences them


@pytest.mark.parametrize("var", ["RANK", "LOCAL_RANK"])
def test_a_data_warning_is_said_on_rank_zero_only(monkeypatch, var):
    for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(v, raising=False)
    assert global_rank() == 0
    (w,) = _caught(warn_data, "train: cut 3 of 9 examples")
    assert str(w.message) == "train: cut 3 of 9 examples" and w.category is DataWarning
    assert Path(w.filename).resolve() == Path(__file__).resolve()  # the line that called warn_data
    monkeypatch.setenv(var, "1")  # a launched DDP process (before or without a process group)
    assert global_rank() == 1
    assert _caught(warn_data, "train: cut 3 of 9 examples") == []
    monkeypatch.setenv(var, "0")
    assert len(_caught(warn_data, "train: cut 3 of 9 examples")) == 1
