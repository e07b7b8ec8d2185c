"""One docstring style for options that become ``--help``: constructor arguments are documented in the class's
``Args:`` section, dataclass settings by a docstring under each field. Every class the CLI can build documents
each of its options, and that text (not a parent's, not nothing) is what the parser prints."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import docstring_parser
import pytest
from jsonargparse import ArgumentParser

from phi3_lightning.compare import CompareConfig, build_parser
from phi3_lightning.data import CausalLMDataModule, SequenceClassificationDataModule, TokenClassificationDataModule
from phi3_lightning.model.config import Phi3Config
from phi3_lightning.model.lora import LoRAConfig
from phi3_lightning.modules import (
    CausalLMModule,
    FSDP2Strategy,
    Phi3FSDPStrategy,
    Phi3TensorBoardLogger,
    Phi3ThroughputMonitor,
    PredictionWriter,
    SequenceClassificationModule,
    TokenClassificationModule,
    WarmupDecayLR,
)
from phi3_lightning.options import enable_field_docstrings, field_help

# Classes whose constructor arguments LightningCLI turns into options (Args: sections) ...
CONSTRUCTED = [
    CausalLMModule,
    SequenceClassificationModule,
    TokenClassificationModule,
    CausalLMDataModule,
    SequenceClassificationDataModule,
    TokenClassificationDataModule,
    Phi3ThroughputMonitor,
    PredictionWriter,
    Phi3TensorBoardLogger,
    FSDP2Strategy,
    Phi3FSDPStrategy,
    WarmupDecayLR,
]
# ... and dataclass settings (a docstring under each field).
SETTINGS = [LoRAConfig, CompareConfig, Phi3Config]


def _words(text: str | None) -> str:
    return " ".join((text or "").split())


def _init_chain(cls: type) -> list[type]:
    """``cls`` and the package's base classes that receive its ``**kwargs``: each of their arguments is an option."""
    chain = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        if not klass.__module__.startswith("phi3_lightning."):
            break  # Lightning's / torch's own arguments are documented (or not) there
        chain.append(klass)
        kinds = {p.kind for p in inspect.signature(klass.__init__).parameters.values()}
        if inspect.Parameter.VAR_KEYWORD not in kinds:
            break
    return chain


def _arguments(klass: type) -> tuple[list[str], str | None]:
    """Public named ``__init__`` arguments of ``klass`` and the name of its ``**kwargs`` (None when it has none)."""
    params = list(inspect.signature(klass.__init__).parameters.values())[1:]  # without self
    named = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and not p.name.startswith("_")]
    var_kw = next((p.name for p in params if p.kind == p.VAR_KEYWORD), None)
    return named, var_kw


def _documented(cls: type) -> dict[str, str]:
    """Option name -> the help text our docstrings give it."""
    if dataclasses.is_dataclass(cls):
        return field_help(cls)
    out: dict[str, str] = {}
    for klass in _init_chain(cls):
        for p in docstring_parser.parse(klass.__doc__ or "", style=docstring_parser.DocstringStyle.GOOGLE).params:
            out.setdefault(p.arg_name, p.description or "")
    return out


@pytest.mark.parametrize("cls", CONSTRUCTED, ids=lambda c: c.__name__)
def test_args_section_documents_every_argument_and_nothing_else(cls):
    for klass in _init_chain(cls):
        named, var_kw = _arguments(klass)
        doc = docstring_parser.parse(klass.__doc__ or "", style=docstring_parser.DocstringStyle.GOOGLE)
        documented = [p.arg_name for p in doc.params]
        missing = [n for n in named if n not in documented]
        allowed = set(named) | ({var_kw, f"**{var_kw}"} if var_kw else set())
        extra = [d for d in documented if d not in allowed]
        assert not missing, f"{klass.__name__}: arguments without an entry in its Args: section: {missing}"
        assert not extra, f"{klass.__name__}: Args: entries that name no argument: {extra}"
        assert len(documented) == len(set(documented)), f"{klass.__name__}: an argument documented twice"
        empty = [p.arg_name for p in doc.params if not _words(p.description)]
        assert not empty, f"{klass.__name__}: Args: entries without text: {empty}"


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_every_field_of_a_settings_dataclass_has_a_docstring(cls):
    docs = field_help(cls)
    assert list(docs) == [f.name for f in dataclasses.fields(cls)]
    assert all(docs.values())


@pytest.mark.parametrize("cls", CONSTRUCTED + SETTINGS, ids=lambda c: c.__name__)
def test_every_option_prints_its_docstring_as_help(cls):
    enable_field_docstrings()  # what the CLI does before building its parsers
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "x", fail_untyped=False, sub_configs=True)
    helps = {a.dest[2:]: a.help for a in parser._actions if a.dest.startswith("x.") and not a.dest.endswith(".help")}
    assert not [name for name in helps if name.startswith("_")], "a private argument became an option"
    if dataclasses.is_dataclass(cls):
        expected = {f.name for f in dataclasses.fields(cls)}
    else:
        expected = {n for klass in _init_chain(cls) for n in _arguments(klass)[0]}
    assert expected and expected <= set(helps), f"options missing: {sorted(expected - set(helps))}"
    docs = _documented(cls)
    for name in sorted(expected):
        assert _words(helps[name]), f"{cls.__name__}: --{name} has no help text"
        assert _words(helps[name]) == _words(docs[name]), f"{cls.__name__}: --{name} prints another text than ours"


def test_compare_attention_parser_prints_the_field_docstrings():
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    docs = field_help(CompareConfig)
    defaults = CompareConfig()
    for f in dataclasses.fields(CompareConfig):
        assert actions[f.name].help == docs[f.name]
        assert actions[f.name].default == getattr(defaults, f.name)
    assert docs["batch_size"] == "Rows per batch."
    assert docs["repeats"].startswith("Fewest timed calls of each of forward and forward+backward (timed alternately,")
    text = parser.format_help()
    assert all(f"--{f.name}" in text for f in dataclasses.fields(CompareConfig))
    assert "--check, --no_check" in text and "--memory, --no_memory" in text


@dataclass
class _HalfDocumented:
    """A settings class with one field left without its docstring."""

    documented: int = 1
    """Has its help."""
    forgotten: int = 2


def test_a_field_without_docstring_is_named():
    with pytest.raises(TypeError, match=r"_HalfDocumented.*\['forgotten'\]"):
        field_help(_HalfDocumented)


@pytest.mark.parametrize("module", ["phi3_lightning.memory", "phi3_lightning.data.report"])
def test_plain_argparse_tools_print_each_default_they_use(module):
    """memory / data-report --help: every option with a default shows it, and the value shown is the one parsing
    an empty command line gives (flags and None defaults explain themselves or are absent)."""
    import argparse
    import importlib

    from phi3_lightning.options import format_default

    parser = importlib.import_module(module).build_parser()
    text = " ".join(parser.format_help().split())
    parsed = vars(parser.parse_args([]))
    shown = 0
    for action in parser._actions:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            continue
        assert action.default == parsed[action.dest]
        expected = f"(default: {format_default(action.default)})"
        assert f"{' '.join((action.help or '').split())} {expected}" in text, (action.dest, expected)
        shown += 1
    assert shown >= 4


def test_memory_and_data_report_help_name_their_main_defaults():
    from phi3_lightning.data.report import build_parser as report_parser
    from phi3_lightning.memory import build_parser as memory_parser

    memory = " ".join(memory_parser().format_help().split())
    for default in ("phi-3-mini-4k", "full", "bf16-mixed", "single", "adamw", "causal_lm", "sdpa"):
        assert f"(default: {default})" in memory
    report = " ".join(report_parser().format_help().split())
    assert "(default: lm code_cls token_types)" in report and "(default: 256 1024 4096)" in report
    assert "(default: 8)" in report and "(default: byte)" in report
