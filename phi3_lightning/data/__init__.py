"""Data layer: tokenizers, collators, packing, chat templates, sources, embedded data and the DataModules.

Imports nothing from ``phi3_lightning.model``; the LightningModules and the CLI import from here. The DataModules
(which import Lightning, slow to import) are loaded on first access, so the pure functions import quickly.
"""

from ..conventions import PROBLEM_TYPES
from .chat import Segment, chat_text, render_chat, tokenize_chat
from .collate import IGNORE_INDEX, LengthGroupedSampler, PaddingCollator, padding_efficiency
from .efficiency import efficiency_report
from .embedded import (
    DEFAULT_PACKAGES,
    available_packages,
    build_code_classification,
    build_lm_corpus,
    build_token_types,
    default_cache_dir,
    embedded_splits,
    load_embedded,
    token_type_names,
)
from .packing import PackedRows, pack_documents, packing_efficiency, plan_packing
from .sampling import EpochSampler, ResumableDataLoader
from .sources import Record, load_source, read_records, resolve_splits, split_by_hash
from .tokenizer import CHAT_FORMATS, ByteTokenizer, HFTokenizer, Tokenizer, check_vocab_fits, load_tokenizer
from .warn import DataWarning

__all__ = [
    "IGNORE_INDEX",
    "PROBLEM_TYPES",
    "CHAT_FORMATS",
    "DEFAULT_PACKAGES",
    # tokenizers
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "check_vocab_fits",
    # collation / packing
    "PaddingCollator",
    "LengthGroupedSampler",
    "padding_efficiency",
    "EpochSampler",
    "ResumableDataLoader",
    "PackedRows",
    "pack_documents",
    "plan_packing",
    "packing_efficiency",
    "efficiency_report",
    # chat
    "Segment",
    "render_chat",
    "chat_text",
    "tokenize_chat",
    # sources / embedded
    "Record",
    "read_records",
    "load_source",
    "resolve_splits",
    "split_by_hash",
    "available_packages",
    "token_type_names",
    "default_cache_dir",
    "build_lm_corpus",
    "build_code_classification",
    "build_token_types",
    "load_embedded",
    "embedded_splits",
    "DataWarning",
    # DataModules
    "CausalLMDataModule",
    "SequenceClassificationDataModule",
    "TokenClassificationDataModule",
]

_LAZY = {
    "CausalLMDataModule",
    "SequenceClassificationDataModule",
    "TokenClassificationDataModule",
}


def __getattr__(name: str):
    if name in _LAZY:
        from . import datamodules

        return getattr(datamodules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
