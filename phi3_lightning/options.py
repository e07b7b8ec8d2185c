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


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``"; did you mean --seq-len?"`` for the closest candidate, or ``""`` when none is close."""
    candidates = list(candidates)
    # Compare without leading dashes and with '-'/'_' unified, so --seq_len finds --seq-len.
    norm = {c.lstrip("-").replace("_", "-"): c for c in candidates}
    close = difflib.get_close_matches(name.lstrip("-").replace("_", "-"), list(norm), n=1, cutoff=0.6)
    return f"; did you mean {norm[close[0]]}?" if close else ""


class StrictArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` without prefix matching and with "did you mean" for unknown options."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        m = re.search(r"unrecognized arguments: (.*)", message)
        if m:
            options = [o for o in self._option_string_actions if o.startswith("--")]
            hints = []
            for token in m.group(1).split():
                if token.startswith("--"):
                    hint = did_you_mean(token.split("=", 1)[0], options)
                    if hint:
                        hints.append(f"{token.split('=', 1)[0]}{hint}")
            if hints:
                message = f"{message} ({'; '.join(h.replace('; did you mean', ': did you mean') for h in hints)})"
        super().error(message)
