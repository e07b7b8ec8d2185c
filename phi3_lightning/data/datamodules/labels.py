"""Labels of the classification DataModules: problem types, label names (read from the data when not given),
and the encoding of a record's label into a class id / 0-1 vector / float target."""

from __future__ import annotations

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
                f"{rec.where or 'a record'}: label {value} is out of range for {len(names)} label names {names}; "
                "fix the record or list all classes in --data.label_names"
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
