"""How much of a batch is real tokens: padding vs length-grouped padding vs packing.

    python -m phi3_lightning.data.report                       # embedded corpora, byte tokenizer
    python -m phi3_lightning.data.report --max-length 256 1024 --batch-size 8 --tokenizer path/to/checkpoint

For each corpus and ``max_length`` it prints the real-token fraction (1.0 = no padding) of:

* ``padding``: examples in random order, each batch padded to its longest example;
* ``grouped``: the same, with :class:`~phi3_lightning.data.collate.LengthGroupedSampler` batches;
* ``packed``: best-fit packing into rows of ``max_length`` (``packed_seq``: sequential, order-keeping packing).

Documents longer than ``max_length`` are cut into ``max_length`` pieces first, in every column, so all columns
hold the same tokens.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from ..options import DefaultsHelpFormatter, StrictArgumentParser
from .efficiency import efficiency_report

__all__ = ["CORPORA", "efficiency_report", "corpus_lengths", "format_table", "main"]

CORPORA = ("lm", "code_cls", "token_types")  # the embedded corpora corpus_lengths reads


def corpus_lengths(kind: str, tokenizer: str = "byte", cache_dir: str | None = None, split: str = "train") -> list[int]:
    """Token lengths of an embedded dataset's split, tokenised as its DataModule does (defaults of each module)."""
    from .datamodules import CausalLMDataModule, SequenceClassificationDataModule, TokenClassificationDataModule

    modules = {
        "lm": CausalLMDataModule,
        "code_cls": SequenceClassificationDataModule,
        "token_types": TokenClassificationDataModule,
    }
    if kind not in modules:
        raise ValueError(f"unknown corpus {kind!r}; choose one of {', '.join(CORPORA)}")
    cls = modules[kind]
    kwargs = {"tokenizer": tokenizer, "cache_dir": cache_dir, "progress": False}
    if kind == "lm":
        kwargs["pack"] = False  # the documents themselves, not rows
        kwargs["max_length"] = 10**9
    else:
        kwargs["max_length"] = 10**9  # untruncated lengths
    dm = cls(**kwargs)
    dm.setup("fit")
    return list(dm.datasets[split].lengths)  # type: ignore[attr-defined]


def format_table(rows: list[dict[str, object]]) -> str:
    cols = ["corpus", "examples", "tokens", "max_len", "batch", "padding", "grouped", "packed", "packed_seq"]
    pct = {"padding", "grouped", "packed", "packed_seq"}
    cells = [[_fmt(r[c], c in pct) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(out)


def _fmt(v: object, percent: bool) -> str:
    if percent:
        return f"{float(v):.1%}"  # type: ignore[arg-type]
    if isinstance(v, float):
        return f"{int(v):,}"
    return str(v)


def build_parser() -> StrictArgumentParser:
    """The report's command line (``python -m phi3_lightning data-report --help``)."""
    p = StrictArgumentParser(
        prog="python -m phi3_lightning data-report",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--corpus",
        nargs="+",
        default=list(CORPORA),
        choices=CORPORA,
        help="embedded corpora: lm (stdlib files), code_cls (package snippets), token_types (source lines)",
    )
    p.add_argument("--max-length", nargs="+", type=int, default=[256, 1024, 4096], help="row / maximum lengths")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    p.add_argument("--pad-to-multiple-of", type=int, default=None, help="round padded lengths up to a multiple of this")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a checkpoint directory")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where the embedded corpora are cached (default: $PHI3_LIGHTNING_CACHE or ~/.cache/phi3_lightning)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the batch shuffling")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    for flag, values, what in (
        ("--max-length", args.max_length, "a positive number of tokens per row"),
        ("--batch-size", [args.batch_size], "a positive number of rows per batch"),
        (
            "--pad-to-multiple-of",
            [] if args.pad_to_multiple_of is None else [args.pad_to_multiple_of],
            "a positive number of tokens, or leave it out for no rounding",
        ),
    ):
        for v in values:
            if v < 1:
                p.error(f"{flag} {v}: use {what}")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # no per-module chatter
    rows = []
    for kind in args.corpus:
        lengths = corpus_lengths(kind, args.tokenizer, args.cache_dir)
        for max_length in args.max_length:
            r = efficiency_report(lengths, max_length, args.batch_size, args.pad_to_multiple_of, seed=args.seed)
            rows.append({"corpus": kind, "max_len": max_length, "batch": args.batch_size, **r})
    print(f"real-token fraction per batch slot (tokenizer={args.tokenizer}, train split)")
    print(format_table(rows))


if __name__ == "__main__":  # through the package's entry point: bad input is a one-line error, not a traceback
    from phi3_lightning.cli import main as _cli_main

    sys.exit(_cli_main(["data-report", *sys.argv[1:]]))
