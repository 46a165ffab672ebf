"""The Task: the one object a user writes to plug a model into tracin-service.

A task knows how to build the model, how to turn JSON examples into input tensors, how to compute the
*per-example* loss (shape [B]; the indexer sums it, never averages), how to predict, and how to show a
training example to a person. The indexer calls `training_set()`; the service only needs the rest (and
`training_set()` again when it re-ranks candidates by exact TracIn).

Inputs are a tensor [B, ...], a dict of such tensors, or a tuple/list of them (the model is then called as
`model(*inputs)`). Labels are whatever the loss takes: class ids (int64 [B]), float targets ([B] or [B, K])
or label vectors (multi-hot [B, C]); `label_kind` says which ("class", "regression", "multilabel").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

Inputs = Union[torch.Tensor, Mapping[str, torch.Tensor], Sequence[torch.Tensor]]
LABEL_KINDS = ("class", "regression", "multilabel")


def take_rows(inputs: Inputs, rows: slice | torch.Tensor) -> Inputs:
    """Select rows of a tensor, of every tensor in a dict, or of every tensor in a tuple/list."""
    if isinstance(inputs, torch.Tensor):
        return inputs[rows]
    if isinstance(inputs, Mapping):
        return {name: value[rows] for name, value in inputs.items()}
    return tuple(value[rows] for value in inputs)


def move_inputs(inputs: Inputs, device: torch.device | str, float_dtype: torch.dtype | None = None) -> Inputs:
    """Move every tensor to `device`; with `float_dtype`, floating tensors are also cast to it."""
    def move(value: torch.Tensor) -> torch.Tensor:
        if float_dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=float_dtype)
        return value.to(device)

    if isinstance(inputs, torch.Tensor):
        return move(inputs)
    if isinstance(inputs, Mapping):
        return {name: move(value) for name, value in inputs.items()}
    return tuple(move(value) for value in inputs)


def input_tensors(inputs: Inputs) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return list(inputs.values())
    return list(inputs)


def batch_size_of(inputs: Inputs) -> int:
    tensors = input_tensors(inputs)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError("inputs must be a tensor, a dict of tensors or a tuple/list of tensors")
    sizes = {int(t.shape[0]) if t.dim() else -1 for t in tensors}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"every input tensor must have the same number of rows (axis 0), got {sorted(sizes)}")
    return sizes.pop()


def unsqueeze_inputs(inputs: Inputs) -> Inputs:
    """One example (no batch axis) -> a batch of one."""
    if isinstance(inputs, torch.Tensor):
        return inputs.unsqueeze(0)
    if isinstance(inputs, Mapping):
        return {k: v.unsqueeze(0) for k, v in inputs.items()}
    return tuple(v.unsqueeze(0) for v in inputs)


@dataclass
class ExampleSet:
    """A training (or held-out) set in row order.

    inputs:  a tensor [N, ...], a dict of such tensors, or a tuple/list of them (row-indexable)
    labels:  tensor [N] or [N, K] (the labels the model was trained with: class ids, float targets or
             multi-hot label vectors)
    ids:     optional string ids (default: the row number)
    display: optional callable row -> dict of display fields (text snippet, thumbnail, flags)
    """

    inputs: Inputs
    labels: torch.Tensor
    ids: Sequence[str] | None = None
    display: Callable[[int], dict[str, Any]] | None = None
    examples: Callable[[int], dict[str, Any]] | None = field(default=None)

    def __post_init__(self) -> None:
        n = batch_size_of(self.inputs)
        if int(self.labels.shape[0]) != n:
            raise ValueError(f"ExampleSet: {n} inputs but {int(self.labels.shape[0])} labels")
        if self.ids is not None and len(self.ids) != n:
            raise ValueError(f"ExampleSet: {n} inputs but {len(self.ids)} ids")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, start: int, stop: int) -> tuple[Inputs, torch.Tensor]:
        return take_rows(self.inputs, slice(start, stop)), self.labels[start:stop]

    def rows(self, rows: Sequence[int] | torch.Tensor) -> tuple[Inputs, torch.Tensor]:
        """(inputs, labels) of the given rows, in that order (e.g. re-ranking candidates)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        return take_rows(self.inputs, index), self.labels[index]

    def id_of(self, row: int) -> str:
        return str(self.ids[row]) if self.ids is not None else str(row)

    def display_of(self, row: int) -> dict[str, Any]:
        return dict(self.display(row)) if self.display is not None else {}

    def example_of(self, row: int) -> dict[str, Any] | None:
        """The row as a JSON example of the task's schema (for held-out query lists)."""
        return self.examples(row) if self.examples is not None else None


class Task:
    """Subclass this once per model. Only `build_model`, `example_schema` and `encode` are required
    for serving; `training_set` is required for indexing (and for exact re-ranking in the service).
    Defaults assume classification with cross-entropy on logits; set `label_kind` for regression
    ("regression": squared error summed over the outputs) or multi-label ("multilabel": binary
    cross-entropy on logits summed over labels), or override `loss` / `predict`."""

    #: pydantic model of one JSON example (documents the API's request body)
    example_schema: ClassVar[type[BaseModel]]
    #: class names, index = integer label (optional; also names the columns of multi-label vectors)
    class_names: ClassVar[Sequence[str] | None] = None
    #: "class" (int64 ids), "regression" (float targets) or "multilabel" (multi-hot vectors);
    #: None = inferred from the training labels (integer -> class, floating -> regression)
    label_kind: ClassVar[str | None] = None

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def training_set(self) -> ExampleSet:
        raise NotImplementedError(f"{type(self).__name__} does not provide training_set()")

    def held_out_set(self) -> ExampleSet | None:
        """Optional held-out examples (shipped with the index so dashboards can offer them)."""
        return None

    def encode(self, examples: Sequence[BaseModel]) -> Inputs:
        """Turn validated JSON examples into a batch of input tensors."""
        raise NotImplementedError

    def metrics(self) -> list:
        """Task-defined query metrics (`indexer.score.metrics.Metric`), besides the built-in loss / logit /
        log_probability / margin: influence can be taken on any differentiable function of the output."""
        return []

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)

    def __init_subclass__(cls, **kwargs):
        """`kind` is reserved: it is the label kind Task derives from `label_kind`, read by the loss, the
        label review and the service. A subclass attribute of that name would silently replace it (and the
        labels would then be judged by it), so defining one is refused at class creation, in one line."""
        super().__init_subclass__(**kwargs)
        value = cls.__dict__.get("kind")
        if "kind" in cls.__dict__ and not isinstance(value, property):
            raise TypeError(f"{cls.__name__} defines `kind` = {value!r}, a name Task reserves for the label kind "
                            f"(one of {', '.join(LABEL_KINDS)}, set through `label_kind`); rename the attribute"
                            + (f", or set label_kind = {value!r}" if value in LABEL_KINDS else ""))

    @property
    def kind(self) -> str:
        """The label kind: `label_kind`, or "class" when unset. Reserved (see `__init_subclass__`)."""
        return self.label_kind or "class"

    @kind.setter
    def kind(self, value) -> None:
        raise AttributeError(f"{type(self).__name__}: `kind` is reserved for the label kind (set through "
                             f"`label_kind`, one of {', '.join(LABEL_KINDS)}); name the attribute otherwise "
                             f"(tried to set kind = {value!r})")

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-example loss, shape [B]. Must not reduce over the batch."""
        kind = self.kind
        if kind == "class":
            return F.cross_entropy(outputs, labels, reduction="none")
        batch = outputs.shape[0]
        target = labels.to(outputs.dtype).reshape(batch, -1)
        flat = outputs.reshape(batch, -1)
        if kind == "multilabel":
            return F.binary_cross_entropy_with_logits(flat, target, reduction="none").sum(dim=1)
        return (flat - target).pow(2).sum(dim=1)

    def predict(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction in the form the loss takes as labels [B] or [B, K], probabilities [B, C] or None).

        class: (argmax, softmax); multilabel: (sigmoid > 0.5 as floats, sigmoid); regression: (outputs, None).
        The prediction is the default target of a query's loss."""
        kind = self.kind
        if kind == "class":
            probabilities = torch.softmax(outputs.double(), dim=-1)
            return probabilities.argmax(dim=-1), probabilities
        if kind == "multilabel":
            probabilities = torch.sigmoid(outputs.double())
            return (probabilities > 0.5).to(torch.float32), probabilities
        return outputs.detach().to(torch.float32), None

    # -- labels as JSON ----------------------------------------------------------------------------
    def label_name(self, label: Any) -> str:
        """A person's name for a label (JSON form): the class name, the names of a multi-label vector's set
        labels, or the target value(s)."""
        names = self.class_names
        kind = self.kind
        if kind == "class":
            if isinstance(label, (list, tuple)):  # a class per position (e.g. next tokens)
                flat = _flatten(label)
                shown = [self.label_name(int(v)) for v in flat[:8]]
                return ", ".join(shown) + (f", ... ({len(flat)} in all)" if len(flat) > 8 else "")
            label = int(label)
            return str(names[label]) if names is not None and 0 <= label < len(names) else str(label)
        if kind == "multilabel":
            values = label if isinstance(label, (list, tuple)) else [label]
            on = [i for i, v in enumerate(values) if float(v) > 0.5]
            return ", ".join(str(names[i]) if names is not None and i < len(names) else str(i) for i in on) or "(none)"
        values = label if isinstance(label, (list, tuple)) else [label]
        return ", ".join(f"{float(v):.6g}" for v in values)

    def label_to_json(self, label: torch.Tensor) -> Any:
        """One row of a labels tensor as JSON: int (class), float or list of floats (regression), list of
        0/1 ints (multilabel)."""
        kind = self.kind
        if kind == "class":
            return int(label) if label.dim() == 0 else label.tolist()
        if kind == "multilabel":
            return [int(round(float(v))) for v in label.reshape(-1).tolist()]
        values = [float(v) for v in label.reshape(-1).tolist()]
        return values[0] if label.dim() == 0 else values

    def labels_tensor(self, values: Sequence[Any]) -> torch.Tensor:
        """JSON labels (as parse_label returns them) -> the labels tensor the loss takes."""
        if self.kind == "class":
            return torch.tensor([v if isinstance(v, list) else int(v) for v in values], dtype=torch.long)
        return torch.tensor([v for v in values], dtype=torch.float32)

    def parse_label(self, value: Any, width: int | None = None) -> Any:
        """Validate a JSON label; return its JSON form (see `label_to_json`). Raises ValueError.

        class: an integer or a class name. multilabel: a list of 0/1 of length `width` (the number of
        labels) or a list of class names. regression: a number, or a list of `width` numbers."""
        names = list(self.class_names) if self.class_names is not None else None
        kind = self.kind
        if kind == "class":
            if isinstance(value, bool):
                raise ValueError("label must be an integer or a class name")
            if isinstance(value, list) and value:  # a class per position
                flat = _flatten(value)
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
                    raise ValueError("a label sequence holds integer class ids")
                if names is not None and any(not 0 <= v < len(names) for v in flat):
                    raise ValueError(f"label ids must be in 0..{len(names) - 1}")
                if width is not None and width > 0 and len(flat) != width:
                    raise ValueError(f"a label sequence has {width} ids, got {len(flat)}")
                return value
            if isinstance(value, int):
                if names is not None and not 0 <= value < len(names):
                    raise ValueError(f"label {value} is out of range 0..{len(names) - 1}")
                return value
            if isinstance(value, str):
                if names is not None and value in names:
                    return names.index(value)
                if value.lstrip("-").isdigit():
                    return self.parse_label(int(value))
                shown = value if len(value) <= 60 else value[:60] + "..."
                raise ValueError(f"unknown label {shown!r}; known: {names}")
            raise ValueError("label must be an integer or a class name")
        if kind == "multilabel":
            if not isinstance(value, list):
                raise ValueError("label must be a list of 0/1 values or a list of class names (multi-label task)")
            if value and all(isinstance(v, str) for v in value):
                if names is None:
                    raise ValueError("this task has no class names: give the label as a list of 0/1 values")
                unknown = [v for v in value if v not in names]
                if unknown:
                    raise ValueError(f"unknown labels {unknown[:5]}; known: {names}")
                return [1 if n in value else 0 for n in names]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v in (0, 1) for v in value):
                raise ValueError("a multi-label label is a list of 0/1 integers (or of class names)")
            if width is not None and len(value) != width:
                raise ValueError(f"a label vector has {width} entries, got {len(value)}")
            return list(value)
        scalar = isinstance(value, (int, float)) and not isinstance(value, bool)
        if scalar:
            if not math.isfinite(float(value)):
                raise ValueError("label must be a finite number")
            if width not in (None, 0):
                if width == 1:
                    return [float(value)]
                raise ValueError(f"the target has {width} values: give a list of {width} numbers")
            return float(value)
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in value):
            if not all(math.isfinite(float(v)) for v in value):
                raise ValueError("label values must be finite numbers")
            if width is not None and width > 0 and len(value) != width:
                raise ValueError(f"the target has {width} values, got {len(value)}")
            return [float(v) for v in value]
        raise ValueError("label must be a number or a list of numbers (regression task)")


def infer_label_kind(task: Task, labels: torch.Tensor) -> str:
    """The task's `label_kind`, else inferred: integer labels [N] -> class, integer [N, C] -> multilabel,
    floating -> regression. Raises ValueError for labels no kind fits."""
    if task.label_kind is not None:
        if task.label_kind not in LABEL_KINDS:
            raise ValueError(f"label_kind {task.label_kind!r} is not one of {LABEL_KINDS}")
        return task.label_kind
    if labels.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        if labels.dim() == 1:
            return "class"
        # 0/1 vectors are label sets; any other integers are a class per position (next-token ids, tags)
        return "multilabel" if bool(((labels == 0) | (labels == 1)).all()) else "class"
    if labels.is_floating_point():
        return "regression"
    raise ValueError(f"cannot tell the label kind of labels with dtype {labels.dtype}; set Task.label_kind")


def _flatten(value) -> list:
    out = []
    for v in value:
        out.extend(_flatten(v) if isinstance(v, (list, tuple)) else [v])
    return out


def label_width(labels: torch.Tensor) -> int:
    """Numbers per label row: 0 for a scalar per example, else the size of the rest of a row."""
    return 0 if labels.dim() == 1 else int(labels[0].numel())
