"""Command-line helpers shared by the package's plain-argparse tools (the memory planner, the data report).

argparse accepts any unambiguous prefix of an option (``--seq 512`` for ``--seq-len``) and says only
"unrecognized arguments" for a typo. :class:`StrictArgumentParser` turns prefix matching off and names the
closest valid option instead. :func:`did_you_mean` is the one suggestion rule every parser of the package uses.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Iterable
from contextvars import ContextVar


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``"; did you mean --seq-len?"`` for the closest candidate, or ``""`` when none is close."""
    candidates = list(candidates)
    # Compare without leading dashes and with '-'/'_' unified, so --seq_len finds --seq-len.
    norm = {c.lstrip("-").replace("_", "-"): c for c in candidates}
    close = difflib.get_close_matches(name.lstrip("-").replace("_", "-"), list(norm), n=1, cutoff=0.6)
    return f"; did you mean {norm[close[0]]}?" if close else ""


def format_default(value: object) -> str:
    """A default as it is typed on the command line: lists space-separated (``nargs="+"``), the rest as str."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with ``(default: X)`` where it has a default worth showing (not None, not a flag's
    False) and the text does not already explain its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or "default" in text:
            return text
        return f"{text} (default: {format_default(default).replace('%', '%%')})"


class StrictArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` without prefix matching and with "did you mean" for unknown options; an error is
    one line (``error: ...`` and where ``--help`` lists the options, exit code 2), as for the other commands, not
    argparse's whole usage first."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        message = explain_parse_error(message, self._option_string_actions)
        self.exit(2, f"error: {message} ({self.prog} --help lists the options)\n")


# ----------------------------------------------------------------------------------------------------------------------
# jsonargparse parsers (LightningCLI's, compare-attention's, generate / export)
# ----------------------------------------------------------------------------------------------------------------------

_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)", re.IGNORECASE)
# jsonargparse's error for an unknown init arg of a class given by class_path (an 8-line "Union subtypes" error).
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_CLASS_PATH = re.compile(r"given class_path '([^']+)'")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_NOT_ACCEPTED_KEY = re.compile(r"does not accept option '([^']+)'")  # an unknown key in a config file


def _class_options(class_path: str, key: str) -> list[str]:
    """``--<key>.init_args.<name>`` for every init argument of the class at ``class_path`` (as jsonargparse sees
    them, parents' through ``**kwargs`` included); empty when it cannot be imported."""
    import importlib

    from jsonargparse import ArgumentParser

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        p = ArgumentParser(exit_on_error=False)
        p.add_class_arguments(cls, f"{key}.init_args", fail_untyped=False)
    except Exception:  # any failure only costs the suggestion
        return []
    return [o for o in p._option_string_actions if o.startswith(f"--{key}.init_args.") and not o.endswith(".help")]


def explain_parse_error(message: str, options: Iterable[str]) -> str:
    """A jsonargparse error message with "did you mean" for unknown options: ``unrecognized arguments: --x 5`` gets
    the closest of ``options``; an unknown init argument of a class given by class_path (jsonargparse's many-line
    Union error) becomes one line naming the option, the class and the closest init argument."""
    options = [o for o in options if o.startswith("--")]
    m = _UNRECOGNIZED.search(message)
    if m:
        hints = []
        for token in m.group(1).split():
            name = token.split("=", 1)[0]
            if name.startswith("--") and (hint := did_you_mean(name, options)):
                hints.append((name, hint))
        if len(hints) == 1:
            return message.rstrip() + hints[0][1]
        if hints:
            return (
                f"{message.rstrip()} ({'; '.join(n + h.replace('; did you mean', ': did you mean') for n, h in hints)})"
            )
        return message
    m = _NOT_ACCEPTED_KEY.search(message)
    if m:
        return message.rstrip() + did_you_mean(f"--{m.group(1)}", options)
    bad = _NOT_ACCEPTED.search(message)
    cls = _CLASS_PATH.search(message)
    key = _PARSER_KEY.search(message)
    if bad and cls and key:
        name, class_path, key_name = bad.group(1), cls.group(1), key.group(1)
        option = f"--{key_name}.init_args.{name}"
        candidates = _class_options(class_path, key_name)
        return (
            f"{option}: Option '{name}' is not accepted by {class_path} (the {key_name} class)"
            f"{did_you_mean(option, candidates)} (`--{key_name}.help {class_path.rsplit('.', 1)[-1]}` lists its "
            "options)"
        )
    return message


_CONFIG_FILE: ContextVar[str | None] = ContextVar("phi3_lightning_config_file", default=None)


def _config_file_error(message: str, ex: BaseException | None) -> str | None:
    """The error of the --config file being parsed, naming it: ``<file> is not valid YAML: <problem> at line L,
    column C (<context> at line ..)`` for a syntax error, ``<file> is empty`` / ``holds '...'`` for a file that is
    no mapping; None for any other error."""
    path = _CONFIG_FILE.get()
    if path is not None and message.startswith("Unexpected config:"):
        content = message.removeprefix("Unexpected config:").strip()
        what = "is empty" if not content else f"holds {content[:60]!r}"
        return f"{path} {what}: a config is a YAML mapping of settings, one `key: value` per line"
    cause = ex
    while cause is not None and not hasattr(cause, "problem_mark"):  # yaml.MarkedYAMLError, without importing yaml
        cause = cause.__cause__
    if path is None or cause is None or getattr(cause, "problem_mark", None) is None:
        return None

    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    message = f"{path} is not valid YAML: {cause.problem} at {at(cause.problem_mark)}"
    if getattr(cause, "context", None) and getattr(cause, "context_mark", None) is not None:
        message += f" ({cause.context} at {at(cause.context_mark)})"
    return message


class SuggestingParserMixin:
    """For a jsonargparse ``ArgumentParser`` subclass: no prefix matching (``--trainer.max_step`` is an error, not
    ``--trainer.max_steps``), "did you mean" on unknown options, and a one-line usage in errors (the full usage of
    a LightningCLI subcommand is some 60 lines; ``--help`` still shows everything)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def parse_path(self, path, *args, **kwargs):
        # jsonargparse parses a --config file's text and yaml names it "<unicode string>": remember which file it is
        token = _CONFIG_FILE.set(str(path))
        try:
            return super().parse_path(path, *args, **kwargs)  # type: ignore[misc]
        finally:
            _CONFIG_FILE.reset(token)

    def error(self, message: str, ex: Exception | None = None):
        parser = getattr(ex, "subcommand_parser", None) or self
        message = _config_file_error(message, ex) or explain_parse_error(
            message, getattr(parser, "_option_string_actions", {})
        )
        return super().error(message, ex)  # type: ignore[misc]

    def format_usage(self) -> str:
        return f"usage: {self.prog} [options]\n"  # type: ignore[attr-defined]


def strict_jsonargparse_parser(**kwargs):
    """A ``jsonargparse.ArgumentParser`` with :class:`SuggestingParserMixin` (compare-attention, generate, export)."""
    from jsonargparse import ArgumentParser

    class StrictJsonArgumentParser(SuggestingParserMixin, ArgumentParser):
        pass

    return StrictJsonArgumentParser(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Help text: one docstring style for everything that becomes --help
# ----------------------------------------------------------------------------------------------------------------------
# Constructor arguments (LightningModules, DataModules, callbacks, loggers, strategies, schedulers) are documented in
# the class docstring's ``Args:`` section; dataclass settings (LoRAConfig, Phi3Config, CompareConfig) by a docstring
# under each field. jsonargparse reads both; compare-attention's hand-built parser reads the latter via field_help.


def enable_field_docstrings() -> None:
    """Let jsonargparse read dataclass field docstrings as help (off by default: it parses the class's source)."""
    try:
        from jsonargparse import set_parsing_settings

        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except (ImportError, TypeError):  # older jsonargparse: the fields still parse, without their help text
        pass


def field_help(cls: type) -> dict[str, str]:
    """Field name -> the docstring under that field of dataclass ``cls`` (whitespace collapsed), read the way
    jsonargparse reads them (``docstring_parser.parse_from_object``). A field without one is a ``TypeError``."""
    import dataclasses

    import docstring_parser

    docs = {p.arg_name: " ".join((p.description or "").split()) for p in docstring_parser.parse_from_object(cls).params}
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if not docs.get(n)]
    if missing:
        raise TypeError(
            f"{cls.__qualname__} fields {missing} have no docstring; write one under each field (it is its --help text)"
        )
    return {n: docs[n] for n in names}


def usable_device(spec: str, others: str = "cpu, cuda or cuda:N", default: str | None = None):
    """``spec`` as a ``torch.device`` this machine can run on, else a ``ValueError`` naming ``--device`` and the
    forms to use (``others``; ``default``: the value that picks the device by itself): not a device, ``meta`` (holds no data), CUDA without a GPU or past the last index,
    or another backend that cannot allocate here."""
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {spec!r} is not a torch device; use {others}") from None
    if device.type == "meta":
        raise ValueError(f"--device {spec!r} holds no data; use {others}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            alt = f" (or {default})" if default else ""
            raise ValueError(f"--device {spec!r} but no CUDA device is available here; use --device cpu{alt}")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"--device {spec!r} but this machine has {count} CUDA device(s): cuda:0 .. cuda:{count - 1}"
            )
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:
            why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise ValueError(f"--device {spec!r} cannot be used here ({why}); use {others}") from None
    return device
