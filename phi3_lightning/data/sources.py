"""Where records come from: local files (txt / jsonl / json / csv / tsv / parquet), a ``datasets`` dataset (saved to
disk, ``hf:NAME``, or an in-memory / streamed ``datasets`` object passed from Python), and the train / val / test split
logic.

A *record* is a dict (one JSON object, one CSV row, one paragraph of a text file ...). Records are
:class:`Record` objects: plain dicts that also remember where they came from (``record.where``, e.g.
``"data/train.jsonl line 7"``) so that errors about them can say so.

Splits are deterministic: a record missing from an explicit split is assigned by a hash of its content (or of a key,
e.g. a file path), never by the random order of a directory listing or a shuffle.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .warn import warn_data

__all__ = [
    "Record",
    "SPLITS",
    "read_records",
    "load_source",
    "describe_source",
    "check_streaming",
    "split_by_hash",
    "stable_fraction",
    "resolve_splits",
    "TEXT_SUFFIXES",
]

SPLITS = ("train", "val", "test")
TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


class Record(dict):
    """A record (dict of fields) that remembers where it came from in ``where``."""

    __slots__ = ("where",)

    def __init__(self, fields: dict[str, Any] | None = None, where: str = "") -> None:
        super().__init__(fields or {})
        self.where = where

    def __reduce__(self):  # keep `where` through pickling (dataloader workers)
        return (Record, (dict(self), self.where))


# ----------------------------------------------------------------------------------------------------------------------
# local files
# ----------------------------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path, limit: int | None) -> list[Record]:
    records: list[Record] = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: a leading byte order mark is not data
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: not valid JSON ({e.msg}); fix or remove the line") from e
            if not isinstance(obj, dict):
                raise ValueError(
                    f'{path} line {lineno}: expected a JSON object like {{"text": ...}}, got a '
                    f"{type(obj).__name__}; fix or remove the line"
                )
            records.append(Record(obj, f"{path} line {lineno}"))
            if limit is not None and len(records) >= limit:
                break
    return records


def _read_json(path: Path, limit: int | None) -> list[Record]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}: not valid JSON ({e.msg}); fix the file") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(
            f'{path}: expected a JSON list of objects (or {{"data": [...]}}), got a {type(data).__name__}; '
            "use that layout or one object per line in a .jsonl file"
        )
    records: list[Record] = []
    for i, obj in enumerate(data[:limit] if limit is not None else data):
        if not isinstance(obj, dict):
            raise ValueError(f"{path} item {i}: expected a JSON object, got a {type(obj).__name__}; fix the item")
        records.append(Record(obj, f"{path} item {i}"))
    return records


def _read_csv(path: Path, limit: int | None, delimiter: str) -> list[Record]:
    records: list[Record] = []
    # a document may be longer than the csv module's default field limit (131072 characters)
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with open(path, encoding="utf-8-sig", newline="") as f:
        # strict: an unterminated quote is an error, not one record holding the rest of the file
        reader = csv.DictReader(f, delimiter=delimiter, strict=True)
        try:
            for row in reader:
                # reader.line_num is the physical line the row ended on (the header is line 1)
                if None in row:
                    raise ValueError(
                        f"{path} line {reader.line_num}: more fields than the header has columns; fix the row or "
                        "quote it"
                    )
                # a short row lacks its last columns (DictReader fills them with None): leave them out, so that a
                # needed one is reported missing with the row's line
                records.append(
                    Record({k: v for k, v in row.items() if v is not None}, f"{path} line {reader.line_num}")
                )
                if limit is not None and len(records) >= limit:
                    break
        except csv.Error as e:
            raise ValueError(
                f"{path} line {reader.line_num}: malformed CSV ({e}); check the quoting of that row (a field holding "
                "the delimiter, a quote or a newline must be quoted, and quotes inside it doubled)"
            ) from None
    return records


def _read_txt(path: Path, limit: int | None, text_field: str, text_unit: str) -> list[Record]:
    text = path.read_text(encoding="utf-8-sig")
    parts: list[tuple[int, str]] = []  # (line number of the record's first line, text)
    if text_unit == "file":
        if text.strip():
            parts.append((1, text))
    elif text_unit in ("line", "paragraph"):
        sep = "\n" if text_unit == "line" else "\n\n"
        lineno = 1
        for chunk in text.split(sep):
            body = chunk.strip("\n")
            if body.strip():
                parts.append((lineno + len(chunk) - len(chunk.lstrip("\n")), body))
            lineno += chunk.count("\n") + len(sep)
    else:
        raise ValueError(f"text_unit={text_unit!r}; use 'file', 'paragraph' or 'line'")
    records = [Record({text_field: t}, f"{path} line {n}") for n, t in parts]
    return records[:limit] if limit is not None else records


def _read_parquet(path: Path, limit: int | None) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        import pyarrow as pa

        try:
            rows = pq.read_table(path).to_pylist()
        except pa.ArrowException as e:  # not a parquet file, truncated, a column that is not valid UTF-8, ...
            raise ValueError(
                f"{str(path)!r} is not a readable parquet file ({e}); re-write it (pyarrow.parquet.write_table or "
                "pandas.DataFrame.to_parquet) or convert it to jsonl/csv"
            ) from None
    else:
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                f"reading {path} needs pyarrow (or pandas with a parquet engine), which is not installed; "
                "pip install pyarrow, or convert the file to jsonl/csv"
            ) from None
        rows = pd.read_parquet(path).to_dict(orient="records")
    if limit is not None:
        rows = rows[:limit]
    return [Record(r, f"{path} row {i}") for i, r in enumerate(rows)]


def not_utf8_message(path: Path, what: str = "file") -> str:
    """'<what> <path> is not valid UTF-8 (line N, byte 0x..)' and the fix; the file is re-read only on this error path."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
        where = ""
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        where = f" (line {line}, byte 0x{raw[e.start]:02x} at offset {e.start})"
    return (
        f"{what} {str(path)!r} is not valid UTF-8{where}; text files are read as UTF-8: re-save it as UTF-8 "
        "(e.g. iconv -f latin1 -t utf-8 IN > OUT)"
    )


def read_records(
    path: str | Path,
    text_field: str = "text",
    text_unit: str = "paragraph",
    limit: int | None = None,
    what: str = "file",
) -> list[Record]:
    """Read one local file into records, by its suffix.

    * ``.jsonl``: one JSON object per line (blank lines skipped);
    * ``.json``: a list of objects, or ``{"data": [...]}``;
    * ``.csv`` / ``.tsv``: a header row, then one record per row (all values are strings);
    * ``.txt``: ``{text_field: ...}`` per paragraph (blank-line separated, ``text_unit="paragraph"``), per
      non-empty line (``"line"``) or the whole file (``"file"``);
    * ``.parquet``: needs ``pyarrow`` (or ``pandas``).

    Args:
        path: the file.
        text_field: field name given to the text of ``.txt`` records.
        text_unit: how a ``.txt`` file is cut into records.
        limit: read at most this many records.
        what: how the file is named in error messages (e.g. ``"train_file"``).

    Raises ``ValueError`` for a missing, unreadable, malformed or empty file, with the file (and line) in the message.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist; check the path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            records = _read_jsonl(path, limit)
        elif suffix == ".json":
            records = _read_json(path, limit)
        elif suffix in (".csv", ".tsv"):
            records = _read_csv(path, limit, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".txt":
            records = _read_txt(path, limit, text_field, text_unit)
        elif suffix == ".parquet":
            records = _read_parquet(path, limit)
        else:
            raise ValueError(f"{what} {str(path)!r} has an unknown suffix {suffix!r}; use one of {TEXT_SUFFIXES}")
    except UnicodeDecodeError as e:
        raise ValueError(not_utf8_message(path, what)) from e
    if not records:
        raise ValueError(f"{what} {str(path)!r} holds no records (it is empty); add data or point {what} elsewhere")
    return records


# ----------------------------------------------------------------------------------------------------------------------
# `datasets` (optional)
# ----------------------------------------------------------------------------------------------------------------------


def _import_datasets(source: str):
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise ImportError(
            f"source {source!r} needs the optional `datasets` package, which is not installed; "
            "pip install 'phi3_lightning[datasets]' (or datasets), or use local jsonl/csv files"
        ) from None
    return datasets


def _is_saved_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _datasets_classes() -> tuple[type, ...]:
    """(Dataset, DatasetDict, IterableDataset, IterableDatasetDict) when ``datasets`` is importable, else ()."""
    try:
        import datasets
    except ImportError:
        return ()
    return (datasets.Dataset, datasets.DatasetDict, datasets.IterableDataset, datasets.IterableDatasetDict)


def _is_stream(obj: Any) -> bool:
    import datasets

    return isinstance(obj, (datasets.IterableDataset, datasets.IterableDatasetDict))


def describe_source(source: Any) -> str:
    """``source`` as messages and hyperparameters name it: the string itself, or e.g.
    ``"<in-memory datasets.DatasetDict: train, validation>"`` for an object passed from Python."""
    if isinstance(source, str):
        return source
    classes = _datasets_classes()
    if classes and isinstance(source, classes):
        kind = "streamed" if _is_stream(source) else "in-memory"
        splits = f": {', '.join(map(str, source.keys()))}" if hasattr(source, "keys") else ""
        return f"<{kind} datasets.{type(source).__name__}{splits}>"
    return f"<{type(source).__module__}.{type(source).__name__}>"


def check_streaming(source: Any, limit: int | None, limit_option: str = "limit") -> None:
    """Refuse ``streaming=True`` where it cannot apply: a ``source`` that is not ``hf:NAME[:CONFIG]``, or no record
    ``limit`` (a stream may be endless); ``limit_option`` is how the caller names its limit in the message (the
    DataModules: ``max_documents``)."""
    if not (isinstance(source, str) and source.startswith("hf:")):
        if not isinstance(source, str):
            what = f"a datasets object ({describe_source(source)})"
            fix = (
                "drop streaming: pass a stream itself as source (load_dataset(..., streaming=True) or "
                f"ds.to_iterable_dataset()) with {limit_option}=N"
            )
        elif source == "embedded" or source in ("", "files"):
            what = "the embedded data" if source == "embedded" else "train_file/val_file/test_file"
            fix = f"drop streaming (use {limit_option}=N to read fewer records), or use source: hf:NAME to stream"
        else:
            path = Path(source).expanduser()
            if path.is_dir():
                what = "a saved datasets directory" if _is_saved_dataset_dir(path) else "a local directory"
            else:
                what = "a local file" if path.is_file() else "not an hf:NAME source"
            fix = (
                f"drop streaming: local data is read directly (use {limit_option}=N to read only the first N records "
                "per split), or name a directory of parquet/json/csv files as hf:/path/to/dir to stream it"
            )
        raise ValueError(
            f"streaming=True with source={describe_source(source)!r} ({what}): streaming applies to hf:NAME[:CONFIG] "
            f"sources only; {fix}"
        )
    if limit is None:
        raise ValueError(
            f"streaming=True with source={source!r} and no {limit_option}: a stream has no length (it may be "
            f"endless); set {limit_option}=N to read the first N records of each split in stream order, or drop "
            "streaming to load the whole dataset"
        )


def _load_dataset(datasets, name: str, config: str | None, streaming: bool = False):
    """``datasets.load_dataset(name, config)`` that never runs a dataset script (remote or local code); with
    ``streaming`` the dataset is opened as a stream (``IterableDatasetDict``) instead of downloaded and prepared.

    ``datasets`` >= 4 has no script loading at all (it raises on a dataset made of a ``.py`` script); older
    versions would run one when ``trust_remote_code`` (or ``HF_DATASETS_TRUST_REMOTE_CODE``) allows it, so they get
    ``trust_remote_code=False`` explicitly, which also overrides that environment variable.
    """
    kwargs: dict[str, Any] = {}
    if int(datasets.__version__.split(".")[0]) < 4:
        kwargs["trust_remote_code"] = False
    if streaming:
        kwargs["streaming"] = True
    try:
        return datasets.load_dataset(name, config, **kwargs)
    except Exception as e:  # rewritten only when it is the refused-script error; anything else as it is
        text = str(e)
        if "script" in text.lower() and ("no longer supported" in text or "trust_remote_code" in text):
            raise ValueError(
                f"source 'hf:{name}' is a dataset loading script ({text.strip().splitlines()[0]}); phi3_lightning "
                "never runs dataset code: use a dataset stored as parquet/json/csv files, or download such files "
                "(e.g. the hub's parquet export, branch refs/convert/parquet) and pass them as a local source"
            ) from None
        raise


def _load_hf(source: str, limit: int | None, streaming: bool = False) -> dict[str, list[Record]]:
    """``hf:NAME`` / ``hf:NAME:CONFIG`` (from the hub or the local HF cache; streamed with ``streaming``: only the
    first ``limit`` records of each split are read) or a ``save_to_disk`` directory."""
    datasets = _import_datasets(source)
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        loaded = _load_dataset(datasets, name, config or None, streaming=streaming)
    else:
        loaded = datasets.load_from_disk(source)
    return _datasets_splits(loaded, source, limit)


def _datasets_splits(loaded: Any, name: str, limit: int | None) -> dict[str, list[Record]]:
    """The records of a ``datasets`` object: a ``Dataset`` / ``IterableDataset`` is the train split, a
    ``DatasetDict`` / ``IterableDatasetDict`` maps its split names (train / validation / val / dev / test ...).

    A streamed split (``IterableDataset``) is read in order up to ``limit`` records and held in memory; without a
    ``limit`` it is an error (a stream may be endless)."""
    import datasets

    if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):
        loaded = {"train": loaded}
    out: dict[str, list[Record]] = {}
    for split_name, ds in loaded.items():
        split = _SPLIT_ALIASES.get(str(split_name).lower())
        if split is None or split in out:
            why = "its name is not a train/val/test name" if split is None else f"another split is already {split}"
            warn_data(
                f"{name}: split {split_name!r} is not used ({why}; known names: {sorted(_SPLIT_ALIASES)}); "
                "rename it (DatasetDict keys) or pass it as train_file/val_file/test_file"
            )
            continue
        if isinstance(ds, datasets.IterableDataset):
            if limit is None:
                raise ValueError(
                    f"{name}: split {split_name!r} is a stream (datasets.IterableDataset) with no length; set "
                    "max_documents=N to read its first N records (they are held in memory, so splits, shuffling "
                    "and exact resume work as for any source), or pass a map-style datasets.Dataset"
                )
            rows: Iterable[Any] = itertools.islice(ds, limit)
        else:
            rows = itertools.islice(ds, len(ds) if limit is None else min(limit, len(ds)))
        recs = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(
                    f"{name} [{split_name}] row {i}: expected a dict of columns, got a {type(row).__name__}; "
                    "pass a datasets.Dataset whose rows are dicts of columns"
                )
            recs.append(Record(dict(row), f"{name} [{split_name}] row {i}"))
        out[split] = recs
    return out


# ----------------------------------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------------------------------


def stable_fraction(key: str, seed: int = 0) -> float:
    """A number in [0, 1) that depends only on ``key`` and ``seed`` (the same on every machine and run)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _content_key(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)


def split_by_hash(
    records: Sequence[Any],
    val_fraction: float,
    test_fraction: float = 0.0,
    seed: int = 0,
    key: Callable[[Any], str] = _content_key,
) -> dict[str, list[Any]]:
    """Deterministically split records into train / val / test by a hash of ``key(record)``.

    A record goes to test when its hash fraction is below ``test_fraction``, to val when below
    ``test_fraction + val_fraction``, else to train. Identical records land in the same split (no leakage). When a
    requested split would be empty and train has more than one record, the train record with the smallest hash
    fraction above the thresholds moves there, so tiny datasets still get a val/test split.
    """
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name}={frac}; use a fraction in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves nothing for training; lower them"
        )
    scored = sorted(((stable_fraction(key(r), seed), i) for i, r in enumerate(records)), key=lambda x: x[0])
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    fraction: dict[int, float] = {}
    for u, i in scored:
        split = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
        out[split].append(i)
        fraction[i] = u
    for split, frac in (("test", test_fraction), ("val", val_fraction)):
        if frac > 0 and not out[split]:
            # train is in ascending hash order: move its first record, with every copy of it (copies have the same
            # hash and sit next to it), so that no record is in two splits; train keeps at least one record
            train = out["train"]
            n = 0
            while n < len(train) and fraction[train[n]] == fraction[train[0]]:
                n += 1
            if n < len(train):
                out[split].extend(train[:n])
                del train[:n]
    return {s: [records[i] for i in sorted(idx)] for s, idx in out.items()}


def _split_files_in_dir(directory: Path) -> dict[str, Path]:
    candidates: dict[str, list[Path]] = {}
    for path in sorted(directory.iterdir()):
        split = _SPLIT_ALIASES.get(path.stem.lower())
        if split and path.suffix.lower() in TEXT_SUFFIXES and path.is_file():
            candidates.setdefault(split, []).append(path)
    for split, paths in candidates.items():
        if len(paths) > 1:  # reading one and ignoring the other would silently drop data
            names = ", ".join(p.name for p in paths)
            raise ValueError(
                f"source directory {str(directory)!r} has {len(paths)} {split} files ({names}); keep one of them there, or "
                f"pass the one to use as {split}_file"
            )
    return {split: paths[0] for split, paths in candidates.items()}


def load_source(
    source: str | Any,
    train_file: str | None = None,
    val_file: str | None = None,
    test_file: str | None = None,
    text_field: str = "text",
    text_unit: str = "paragraph",
    limit: int | None = None,
    streaming: bool = False,
) -> dict[str, list[Record]]:
    """The splits a (non-embedded) source provides as given, before any split is carved out of train.

    ``source`` is one of:

    * a file (``.jsonl``/``.json``/``.csv``/``.tsv``/``.txt``/``.parquet``): the train split;
    * a directory holding ``train.*`` and optionally ``val.*``/``validation.*``/``dev.*`` and ``test.*`` files;
    * a directory written by ``datasets``' ``save_to_disk``, or ``hf:NAME`` / ``hf:NAME:CONFIG`` (needs the
      optional ``datasets`` package; dataset scripts are never run);
    * from Python, a ``datasets`` object: ``Dataset`` (the train split), ``DatasetDict`` (its splits), or a stream
      (``IterableDataset`` / ``IterableDatasetDict``), read in order up to ``limit`` records per split, which a
      stream requires;
    * ``""`` / ``"files"`` when only ``train_file`` (and ``val_file``, ``test_file``) are given.

    ``train_file``/``val_file``/``test_file`` override the split of the same name.

    ``streaming=True`` (``hf:NAME[:CONFIG]`` only, and it needs ``limit``) opens the dataset with
    ``load_dataset(..., streaming=True)`` instead of downloading and preparing all of it, and reads the first
    ``limit`` records of each split in stream order.
    """
    if streaming:
        check_streaming(source, limit)
    splits: dict[str, list[Record]] = {}
    files: dict[str, Path] = {}
    if not isinstance(source, str):
        classes = _datasets_classes()
        if not classes or not isinstance(source, classes):
            raise ValueError(
                f"source is a {type(source).__name__}; pass a path, 'hf:<name>' or 'embedded' (or, from Python, a "
                "datasets.Dataset / DatasetDict / IterableDataset / IterableDatasetDict)"
            )
        splits.update(_datasets_splits(source, describe_source(source), limit))
    elif source and source not in ("files",):
        if source.startswith("hf:"):
            splits.update(_load_hf(source, limit, streaming=streaming))
        else:
            path = Path(source).expanduser()
            if path.is_file():
                files["train"] = path
            elif path.is_dir():
                if _is_saved_dataset_dir(path):
                    splits.update(_load_hf(str(path), limit))
                else:
                    files.update(_split_files_in_dir(path))
                    if not files and not train_file:
                        raise ValueError(
                            f"source directory {source!r} has no train.* file (nor a saved `datasets` dataset); add "
                            f"train.jsonl (or .csv/.txt/...) there, or pass train_file="
                        )
            else:
                raise ValueError(
                    f"source {source!r} is not 'embedded', 'hf:<name>', nor an existing file or directory; "
                    "check the path"
                )
    for split, f in (("train", train_file), ("val", val_file), ("test", test_file)):
        if f:
            files[split] = Path(f)
    for split, path in files.items():
        what = {"train": "train_file", "val": "val_file", "test": "test_file"}[split]
        splits[split] = read_records(path, text_field=text_field, text_unit=text_unit, limit=limit, what=what)
    name = describe_source(source)
    if "train" not in splits:
        raise ValueError(
            f"no training data: source={name!r}, train_file={train_file!r}; pass a file, a directory with train.*, "
            "hf:<name>, a datasets object with a 'train' split, or source='embedded'"
        )
    for split, recs in splits.items():
        if not recs:
            raise ValueError(f"the {split} split of {name or train_file!r} is empty; add data or drop that split")
    return splits


def resolve_splits(
    given: dict[str, list[Any]],
    val_fraction: float,
    test_fraction: float,
    seed: int = 0,
    key: Callable[[Any], str] = _content_key,
) -> dict[str, list[Any]]:
    """Fill in missing splits: val (and test) are carved out of train by :func:`split_by_hash` when not given.

    When test is neither given nor carved (``test_fraction=0``), test is the val split.
    """
    out = dict(given)
    need_val = "val" not in out and val_fraction > 0
    need_test = "test" not in out and test_fraction > 0
    if need_val or need_test:
        parts = split_by_hash(
            out["train"], val_fraction if need_val else 0.0, test_fraction if need_test else 0.0, seed, key
        )
        out["train"] = parts["train"]
        if need_val:
            out["val"] = parts["val"]
        if need_test:
            out["test"] = parts["test"]
    out.setdefault("val", [])
    if "test" not in out:
        out["test"] = out["val"]
    return out


def iter_field(records: Iterable[Record], field: str, what: str) -> Iterable[tuple[Record, Any]]:
    """Yield (record, record[field]), raising a clear ``ValueError`` at the first record without that field."""
    for r in records:
        if field not in r:
            where = getattr(r, "where", "") or "a record"
            raise ValueError(
                f"{where}: has no {what} field {field!r} (fields: {sorted(r)}); pass --data.{what}_field with the "
                "right column name or fix the data"
            )
        yield r, r[field]


def not_text_message(rec: Record, field: str, value: Any) -> str:
    """Why ``rec[field]`` (a ``value`` that is not a ``str``) cannot be a text, and the fix. Bytes (a binary parquet /
    ``datasets`` column) are named as such, with the first byte that is not UTF-8 when there is one."""
    where = getattr(rec, "where", "") or "a record"
    if isinstance(value, (bytes, bytearray)):
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            return (
                f"{where}: text field {field!r} holds bytes that are not valid UTF-8 (byte 0x{value[e.start]:02x} at "
                f"offset {e.start}); re-encode the data as UTF-8 text (a string column)"
            )
        return (
            f"{where}: text field {field!r} holds bytes (a binary column), not a string; store the column as UTF-8 "
            "strings (e.g. datasets: ds.cast_column(name, Value('string')); pyarrow: table.cast with pa.string())"
        )
    return (
        f"{where}: text field {field!r} holds a {type(value).__name__}, not a string; fix the record or pass the "
        "right --data.text_field"
    )
