"""Labels as the API sees them: parsing query labels and label filters, and the rows of each class.

A task's labels are class ids ("class"), regression targets ("regression") or label vectors
("multilabel"), recorded in the manifest (`task.label_kind`, `task.label_width`). Query labels take the
form the task's loss takes; label filters name one class (class and multi-label tasks only).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import ApiError, ServiceStartupError

#: a class id written as text: ASCII digits only ("²", "③" or "٣" are digits to str.isdigit, not to int)
_CLASS_ID_TEXT = re.compile(r"-?[0-9]{1,18}")


@dataclass
class Labels:
    task: Any  # indexer.task.Task
    kind: str  # "class" | "multilabel" | "regression"
    width: int  # numbers per label row (0: one number)
    class_names: list[str] | None
    num_classes: int | None
    ids: np.ndarray | None  # int64 [N] class ids (class tasks); None otherwise
    rows_by_class: dict[int, np.ndarray]  # class id -> training rows with that label
    si_order_by_class: dict[int, np.ndarray]  # class id -> those rows by descending self-influence
    sequence_shapes: frozenset = frozenset()  # shapes of the training labels of a class-per-position task

    @classmethod
    def build(cls, task, kind: str, width: int, labels: list[Any], si_order: np.ndarray,
              path, live: np.ndarray | None = None) -> Labels:
        """`si_order`: the rows served by descending self-influence; `live` (bool [N]): False for rows marked
        removed, which no label's rows include."""
        class_names = list(task.class_names) if task.class_names is not None else None
        ids, rows_by_class = _class_rows(labels, kind, path)
        if live is not None:
            rows_by_class = {c: rows[live[rows]] for c, rows in rows_by_class.items()}
        rank_of = np.full(len(labels), len(labels), dtype=np.int64)
        rank_of[si_order] = np.arange(si_order.size)
        ordered = {c: rows[np.argsort(rank_of[rows], kind="stable")] for c, rows in rows_by_class.items()}
        num_classes = len(class_names) if class_names is not None else (width if kind == "multilabel" else None)
        shapes = frozenset(_shape(label) for label in labels) if kind == "class" and ids is None else frozenset()
        return cls(task, kind, width, class_names, num_classes, ids, rows_by_class, ordered, shapes)

    def name(self, label: Any) -> str:
        return self.task.label_name(label)

    def parse(self, value: Any, field_name: str, loc: list | None = None) -> Any:
        """A query label in the JSON form the task's loss takes (class id, target value(s), label vector).

        Raises ApiError 422 naming `field_name` for anything the loss cannot take: a list where the task
        has one class per example, a single class where it has a class per position (or a sequence of
        another shape than the training labels'), and whatever the task's `parse_label` refuses."""
        if self.kind == "class":
            sequences = self.ids is None and bool(self.sequence_shapes)
            if isinstance(value, list) != sequences:
                want = "a list of class ids (a class per position)" if sequences else "one class id or class name"
                raise ApiError(422, "invalid_label", field_name, f"this task's labels are {want}, not "
                               f"{'a list' if isinstance(value, list) else 'a single class'}", loc, echo=value)
            if not sequences:
                return self.class_id(value, field_name, loc)
        try:
            parsed = self.task.parse_label(value, self.width)
        except ValueError as exc:  # the task's message may quote the value: it is quoted once, cut, by ApiError
            message = str(exc).replace(f" {value!r}", "").replace(repr(value), "this label")[:300]
            raise ApiError(422, "invalid_label", field_name, message, loc, echo=value) from None
        shape = _shape(parsed)
        if self.sequence_shapes and shape not in self.sequence_shapes:
            shapes = " or ".join(str(list(s)) for s in sorted(self.sequence_shapes)[:3])
            got = "a ragged list" if shape is None else f"a label sequence of shape {list(shape)}"
            raise ApiError(422, "invalid_label", field_name, f"{got}; the training labels have shape {shapes}", loc)
        return parsed

    def class_id(self, value: Any, field_name: str, loc: list | None = None) -> int:
        """An integer class id or a class name -> the class id (class and multi-label tasks)."""
        names = self.class_names
        if isinstance(value, str) and names is not None and value in names:
            label = names.index(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            label = value
        elif isinstance(value, str) and _CLASS_ID_TEXT.fullmatch(value):
            label = int(value)
        else:
            raise ApiError(422, "unknown_label", field_name,
                           "unknown label: give a class id" + (f" or one of {names[:20]}" if names else ""), loc,
                           echo=value)
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise ApiError(422, "unknown_label", field_name, f"label is out of range 0..{self.num_classes - 1}", loc,
                           echo=value)
        return label

    def rows(self, value: int | str, field_name: str, loc: list | None = None) -> tuple[int, np.ndarray]:
        """(class id, training rows with that label) for a label filter; 422 where filters do not apply."""
        if self.kind == "regression":
            raise ApiError(422, "unsupported", field_name, "this task's labels are regression targets: label "
                                                           "filters apply to class and multi-label tasks only", loc)
        if self.kind == "class" and self.ids is None:
            raise ApiError(422, "unsupported", field_name, "this task's labels are sequences (a class per "
                                                           "position): label filters need one class per example", loc)
        label = self.class_id(value, field_name, loc)
        rows = self.rows_by_class.get(label)
        if rows is None or rows.size == 0:
            raise ApiError(422, "no_examples", field_name,
                           f"no training example has label {self.name(self.one_class(label))!r}", loc)
        return label, rows

    def one_class(self, class_id: int) -> Any:
        """The JSON label meaning "class c" (a one-hot vector for multi-label tasks), for display."""
        if self.kind == "multilabel" and self.width:
            return [1 if i == class_id else 0 for i in range(self.width)]
        return class_id

    def check_for_model(self, labels: list[Any], classes: int | None) -> None:
        """Class labels must be in range for the model's output (`classes` columns)."""
        if self.kind == "class" and classes is not None:
            for label in labels:
                ids = _flat(label) if isinstance(label, list) else [label]
                if any(isinstance(v, int) and not 0 <= v < classes for v in ids):
                    shown = f"label {label}" if not isinstance(label, list) else "a label id"
                    raise ApiError(422, "unknown_label", "label",
                                   f"{shown} is out of range 0..{classes - 1} for this model")


def _flat(value: Any) -> list[Any]:
    return [x for v in value for x in _flat(v)] if isinstance(value, list) else [value]


def _shape(value: Any) -> tuple[int, ...] | None:
    """The shape of a (nested) JSON label, None for a ragged one."""
    try:
        return tuple(np.shape(value))
    except ValueError:
        return None


def _class_rows(labels: list[Any], kind: str, path) -> tuple[np.ndarray | None, dict[int, np.ndarray]]:
    """(class ids [N] or None, class id -> training rows with that label), from the JSON labels [N]."""
    try:
        if kind == "class":
            if any(isinstance(label, list) for label in labels):
                return None, {}  # a class per position: no per-example label to filter on
            ids = np.asarray([int(label) for label in labels], dtype=np.int64)
            return ids, {int(lab): np.flatnonzero(ids == lab).astype(np.int64) for lab in np.unique(ids)}
        if kind == "multilabel":
            matrix = np.asarray(labels, dtype=np.float64)
            return None, {c: np.flatnonzero(matrix[:, c] > 0.5).astype(np.int64) for c in range(matrix.shape[1])}
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise ServiceStartupError(f"{path}: the examples table's labels do not fit the task's label kind "
                                  f"{kind!r}: {exc}") from None
    return None, {}
