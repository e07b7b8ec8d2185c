"""Labels of the classification DataModules: problem types, label names (read from the data when not given),
and the encoding of a record's label into a class id / 0-1 vector / float target."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ...conventions import PROBLEM_TYPES
from ..sources import Record

__all__ = ["PROBLEM_TYPES"]


def _natural_sorted(names: set[str]) -> list[str]:
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numeric(v: Any) -> float | None:
    """``v`` as a number when it is one or a string that spells one (csv / tsv values are strings), else None."""
    if _is_number(v):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _where(rec: Record) -> str:
    return rec.where or "a record"


def infer_class_names(labelled: Iterable[tuple[Record, Any]]) -> list[str]:
    """Class names from the labels of a training split, read the way :meth:`_LabelMixin._class_id` reads them:
    integers (and bools, integer-valued floats) are class indices -> ``["0", ..., str(max)]``; strings are class
    names -> their sorted set. A mix of the two, a negative index or another type is a ``ValueError`` naming the
    record, since any mapping would silently relabel some of the records."""
    names: set[str] = set()
    top = -1
    first_index = first_name = None
    for rec, v in labelled:
        if isinstance(v, str):
            names.add(v)
            first_name = first_name or (rec, v)
        elif isinstance(v, (bool, int)) or (isinstance(v, float) and v.is_integer()):
            if v < 0:
                raise ValueError(
                    f"{_where(rec)}: label {v!r} is a negative integer, but integer labels are class indices "
                    '0..n-1; store the labels as strings ("-1", "0", "1") to use them as class names, or map '
                    "them to 0..n-1"
                )
            top = max(top, int(v))
            first_index = first_index or (rec, v)
        else:
            raise ValueError(f"{_where(rec)}: label {v!r} has type {type(v).__name__}; use a class name or index")
        if first_index and first_name:
            (ri, vi), (rn, vn) = first_index, first_name
            raise ValueError(
                f"{_where(ri)}: label {vi!r} is a class index but {_where(rn)}: label {vn!r} is a class name; labels "
                "must be all indices (integers) or all names (strings), or give --data.label_names (integers then "
                "index into it, strings name its entries)"
            )
    return _natural_sorted(names) if names else [str(i) for i in range(top + 1)]


class _LabelMixin:
    """Label names, problem type and label -> target encoding for the classification modules."""

    label_field: str
    _label_names: list[str] | None
    _problem_type: str | None

    def _infer_labels(self) -> None:
        raise NotImplementedError

    @property
    def label_names(self) -> list[str]:
        """Names of the classes (or of the regression target), in class-id order."""
        if self._label_names is None:
            self._infer_labels()
        return list(self._label_names)  # type: ignore[arg-type]

    @property
    def num_labels(self) -> int:
        """Size of the classification head's output."""
        return len(self.label_names)

    @property
    def problem_type(self) -> str:
        if self._problem_type is None:
            self._infer_labels()
        return self._problem_type  # type: ignore[return-value]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.label_names)}

    def _unknown(self, rec: Record, value: Any) -> ValueError:
        return ValueError(
            f"{rec.where or 'a record'}: label {value!r} is not one of the label names {self.label_names}; add it to "
            "--data.label_names or fix the record"
        )

    def _class_id(self, rec: Record, value: Any) -> int:
        names = self.label_names
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, int):
            if 0 <= value < len(names):
                return value
            raise ValueError(
                f"{rec.where or 'a record'}: label {value} is out of range for {len(names)} label names {names} "
                "(integer labels are indices into the label names, 0..n-1, not names); fix the record, list all "
                "classes in --data.label_names, or store the labels as strings to use them as names"
            )
        if isinstance(value, float) and value.is_integer():
            return self._class_id(rec, int(value))
        if isinstance(value, str):
            idx = self.label2id.get(value)
            if idx is None:
                raise self._unknown(rec, value)
            return idx
        raise ValueError(
            f"{rec.where or 'a record'}: label {value!r} has type {type(value).__name__}; use a class name or index"
        )
