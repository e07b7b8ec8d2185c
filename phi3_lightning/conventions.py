"""Label conventions shared by ``data/`` (which writes labels) and ``model/`` (which scores them).

A leaf module (nothing from the package, no torch), so both layers import it without importing each other.
"""

from __future__ import annotations

__all__ = ["IGNORE_INDEX", "PROBLEM_TYPES"]

IGNORE_INDEX = -100
"""Label of a position (or an item) the loss skips: padding, prompt tokens, a document's first token in a packed row,
a word's later sub-tokens. The value torch's ``cross_entropy`` ignores by default."""

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
"""What a sequence-classification label is: a class id ``(B,)`` long, a 0/1 vector ``(B, num_labels)`` float, or a
number ``(B,)`` float. The names (and their inference from the labels) are transformers'."""
