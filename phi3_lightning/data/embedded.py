"""Embedded default data: built from the Python standard library's own source files, so training runs on a fresh
machine with nothing to download.

Three datasets, one per head:

* ``"lm"`` (causal LM): each selected ``.py`` file is a document ``{"text": source}``.
* ``"code_cls"`` (sequence classification): ``{"text": snippet, "label": package}``, which top-level stdlib package
  (``asyncio``, ``email``, ``json`` ...; only those present) a snippet of ``snippet_lines`` lines comes from.
* ``"token_types"`` (token classification): ``{"words": [...], "labels": [...]}``: the token strings of a few
  logical lines of code and each one's ``tokenize`` type name (``NAME``, ``OP``, ``STRING``, ``NUMBER``,
  ``COMMENT``, ``NEWLINE``, ``NL``, plus the f-string parts on Python >= 3.12).

Everything is deterministic for a given Python version: files are listed in sorted order and excluding tests,
``site-packages`` and machine-specific files; subsets and splits go by a hash of the relative file path (snippets:
path and line), never by directory-listing order. Built records are cached as JSON in ``cache_dir`` (default
``$PHI3_LIGHTNING_CACHE`` or ``~/.cache/phi3_lightning``), written atomically (temp file + ``os.replace``), so a
second run, or a second DDP rank, reads them back.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import sysconfig
import tokenize
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from .sources import Record, split_by_hash, stable_fraction

__all__ = [
    "DEFAULT_PACKAGES",
    "EMBEDDED_KINDS",
    "stdlib_dir",
    "stdlib_files",
    "available_packages",
    "token_type_names",
    "default_cache_dir",
    "build_lm_corpus",
    "build_code_classification",
    "build_token_types",
    "load_embedded",
    "embedded_splits",
]

CACHE_FORMAT = 1  # bump when the records a builder makes change
EMBEDDED_KINDS = ("lm", "code_cls", "token_types")
DEFAULT_PACKAGES = ("asyncio", "email", "json", "unittest", "xml", "http", "concurrent", "importlib")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_SELECT_SALT = "embedded-select"  # choosing subsets is independent of the split seed


def stdlib_dir() -> Path:
    """The standard library's directory (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None, package: str | None = None) -> list[str]:
    """Relative POSIX paths of the stdlib's ``.py`` files (or one top-level package's), sorted.

    Left out: test suites, ``site-packages`` and the machine-generated ``_sysconfigdata*`` files.
    """
    root = root or stdlib_dir()
    base = root / package if package else root
    if not base.is_dir():
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]  # prune: never walk into test suites
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                out.append((rel_dir / name).as_posix())
    return sorted(out)


def available_packages(packages: Sequence[str] = DEFAULT_PACKAGES, root: Path | None = None) -> list[str]:
    """The requested top-level stdlib packages that exist here (they are the class labels, in this order)."""
    root = root or stdlib_dir()
    return [p for p in packages if (root / p / "__init__.py").is_file()]


def token_type_names() -> list[str]:
    """Labels of the token-type dataset: the ``tokenize`` type names kept, in a fixed order."""
    names = ["NAME", "OP", "STRING", "NUMBER", "COMMENT", "NEWLINE", "NL"]
    for extra in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END", "TSTRING_START", "TSTRING_MIDDLE", "TSTRING_END"):
        if hasattr(tokenize, extra):
            names.append(extra)
    return names


def default_cache_dir() -> Path:
    """``$PHI3_LIGHTNING_CACHE`` if set, else ``~/.cache/phi3_lightning``."""
    env = os.environ.get("PHI3_LIGHTNING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "phi3_lightning"


def _read_source(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _by_hash(keys: Sequence[str]) -> list[str]:
    return sorted(keys, key=lambda k: (stable_fraction(k, _SELECT_SALT), k))  # type: ignore[arg-type]


def _progress(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="file", disable=not enabled, leave=False)


# ----------------------------------------------------------------------------------------------------------------------
# builders (no caching)
# ----------------------------------------------------------------------------------------------------------------------


def build_lm_corpus(
    max_files: int | None = 100, max_documents: int | None = None, root: Path | None = None, progress: bool = True
) -> list[Record]:
    """Language-modelling documents: ``{"text": source, "path": rel}`` for up to ``max_files`` stdlib files.

    The files are a hash-ordered (deterministic, spread over the whole stdlib) subset.
    """
    root = root or stdlib_dir()
    files = _by_hash(stdlib_files(root))
    records: list[Record] = []
    limit = min(x for x in (max_files, max_documents) if x is not None) if (max_files or max_documents) else None
    for rel in _progress(files, "embedded lm corpus", progress):
        if limit is not None and len(records) >= limit:
            break
        text = _read_source(root, rel)
        if text and text.strip():
            records.append(Record({"text": text, "path": rel, "key": rel}, f"stdlib {rel}"))
    return records


def build_code_classification(
    packages: Sequence[str] = DEFAULT_PACKAGES,
    snippet_lines: int = 8,
    min_chars: int = 80,
    max_per_class: int | None = 200,
    root: Path | None = None,
    progress: bool = True,
) -> list[Record]:
    """Snippets labelled with their package: ``{"text", "label", "path", "line"}``.

    Each file of each package is cut into non-overlapping windows of ``snippet_lines`` lines; windows with fewer
    than ``min_chars`` non-blank characters are dropped; at most ``max_per_class`` snippets per package are kept
    (a hash-ordered subset).
    """
    root = root or stdlib_dir()
    labels = available_packages(packages, root)
    if not labels:
        raise ValueError(
            f"none of the packages {list(packages)} is in the standard library at {root}; pick packages that exist"
        )
    records: list[Record] = []
    files = [(p, rel) for p in labels for rel in stdlib_files(root, p)]
    per_class: dict[str, list[Record]] = {p: [] for p in labels}
    for package, rel in _progress(files, "embedded code classification", progress):
        text = _read_source(root, rel)
        if not text:
            continue
        lines = text.splitlines()
        for start in range(0, len(lines), snippet_lines):
            snippet = "\n".join(lines[start : start + snippet_lines]).strip("\n")
            if len("".join(snippet.split())) < min_chars:
                continue
            key = f"{rel}#{start + 1}"
            rec = Record({"text": snippet, "label": package, "path": rel, "line": start + 1, "key": key}, key)
            per_class[package].append(rec)
    for package in labels:
        recs = sorted(per_class[package], key=lambda r: (stable_fraction(r["key"], _SELECT_SALT), r["key"]))
        records.extend(recs[:max_per_class] if max_per_class is not None else recs)
    return records


def _logical_lines(source: str) -> list[list[tuple[str, str]]]:
    """(token string, type name) per line of code; a line ends at NEWLINE or NL. Indentation tokens are dropped."""
    keep = set(token_type_names())
    lines: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        name = tokenize.tok_name[tok.type]
        if name in keep and tok.string:
            current.append((tok.string, name))
        if name in ("NEWLINE", "NL"):
            if any(t != "NL" for _, t in current):  # skip blank lines
                lines.append(current)
            current = []
    if current:
        lines.append(current)
    return lines


def build_token_types(
    max_files: int | None = 40,
    lines_per_example: int = 4,
    max_examples: int | None = 3000,
    root: Path | None = None,
    progress: bool = True,
) -> list[Record]:
    """Token-type tagging: ``{"words": [token strings], "labels": [type names], "path", "line"}``.

    Each example holds ``lines_per_example`` consecutive non-blank lines of one file (hash-ordered subset of
    ``max_files`` files, at most ``max_examples`` examples). Files that do not tokenize are skipped.
    """
    root = root or stdlib_dir()
    files = _by_hash(stdlib_files(root))
    records: list[Record] = []
    used = 0
    for rel in _progress(files, "embedded token types", progress):
        if (max_files is not None and used >= max_files) or (max_examples is not None and len(records) >= max_examples):
            break
        text = _read_source(root, rel)
        if not text:
            continue
        try:
            lines = _logical_lines(text)
        except (tokenize.TokenError, SyntaxError):
            continue
        used += 1
        for i in range(0, len(lines), lines_per_example):
            group = [tok for line in lines[i : i + lines_per_example] for tok in line]
            if not group:
                continue
            records.append(
                Record(
                    {
                        "words": [w for w, _ in group],
                        "labels": [t for _, t in group],
                        "path": rel,
                        "line": i,
                        "key": f"{rel}#{i}",
                    },
                    f"stdlib {rel} line-group {i}",
                )
            )
            if max_examples is not None and len(records) >= max_examples:
                break
    return records


_BUILDERS: dict[str, Callable[..., list[Record]]] = {
    "lm": build_lm_corpus,
    "code_cls": build_code_classification,
    "token_types": build_token_types,
}


# ----------------------------------------------------------------------------------------------------------------------
# cache + splits
# ----------------------------------------------------------------------------------------------------------------------


def _cache_path(kind: str, params: dict[str, Any], cache_dir: Path, root: Path) -> Path:
    ident = {
        "kind": kind,
        "params": params,
        "format": CACHE_FORMAT,
        "python": list(sys.version_info[:3]),
        "stdlib": str(root),
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    v = sys.version_info
    return cache_dir / f"embedded-{kind}-py{v.major}{v.minor}-{digest}.json"


def load_embedded(kind: str, cache_dir: str | Path | None = None, progress: bool = True, **params: Any) -> list[Record]:
    """All records of an embedded dataset (``kind`` in ``EMBEDDED_KINDS``), from the cache or built and cached.

    ``params`` go to the builder (``build_lm_corpus``, ``build_code_classification``, ``build_token_types``) and
    are part of the cache key.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"embedded dataset {kind!r} is unknown; use one of {EMBEDDED_KINDS}")
    root = Path(params.pop("root", None) or stdlib_dir())
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = _cache_path(kind, params, cache, root)
    if path.is_file():
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
            return [Record(r, f"stdlib {r.get('path', '?')}") for r in payload["records"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"embedded cache {path} is unreadable ({e}); rebuilding it", stacklevel=2)
    records = _BUILDERS[kind](root=root, progress=progress, **params)
    if not records:
        raise ValueError(
            f"the embedded {kind!r} dataset built from {root} is empty; raise max_files / max_documents or use "
            "another source"
        )
    try:
        payload = {"kind": kind, "params": params, "python": sys.version, "records": records}
        atomic_write_text(path, json.dumps(payload, ensure_ascii=False))
    except OSError as e:  # a read-only home still trains, it just rebuilds next time
        warnings.warn(
            f"could not write the embedded cache {path} ({e}); set cache_dir to a writable place", stacklevel=2
        )
    return records


def embedded_splits(
    kind: str,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    **params: Any,
) -> dict[str, list[Record]]:
    """The embedded dataset ``kind`` split into train / val / test by a hash of each record's ``key``.

    ``key`` is the relative file path for lm (a document is a file), and path + line for code_cls and token_types
    (examples are small pieces of files; hashing pieces gives every split every package even when a package has
    few files, and val/test splits of the expected size). When ``test_fraction`` is 0 the
    test split is the val split.
    """
    records = load_embedded(kind, cache_dir=cache_dir, progress=progress, **params)
    parts = split_by_hash(records, val_fraction, test_fraction, seed, key=lambda r: r["key"])
    if test_fraction == 0:
        parts["test"] = parts["val"]
    return parts
