"""The Task: the one object a user writes to plug a model into tracin-service.

A task knows how to build the model, how to turn JSON examples into input tensors, how to compute the
*per-example* loss (shape [B]; the indexer sums it, never averages), how to predict, and how to show a
training example to a person. The indexer calls `training_set()`; the service only needs the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

Inputs = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def take_rows(inputs: Inputs, rows: slice | torch.Tensor) -> Inputs:
    """Select rows of a tensor or of every tensor in a dict of tensors."""
    if isinstance(inputs, Mapping):
        return {name: value[rows] for name, value in inputs.items()}
    return inputs[rows]


def move_inputs(inputs: Inputs, device: torch.device | str) -> Inputs:
    if isinstance(inputs, Mapping):
        return {name: value.to(device) for name, value in inputs.items()}
    return inputs.to(device)


def batch_size_of(inputs: Inputs) -> int:
    if isinstance(inputs, Mapping):
        return int(next(iter(inputs.values())).shape[0])
    return int(inputs.shape[0])


@dataclass
class ExampleSet:
    """A training (or held-out) set in row order.

    inputs:  a tensor [N, ...] or a dict of such tensors (row-indexable)
    labels:  tensor [N] (the labels the model was trained with)
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

    def id_of(self, row: int) -> str:
        return str(self.ids[row]) if self.ids is not None else str(row)

    def display_of(self, row: int) -> dict[str, Any]:
        return dict(self.display(row)) if self.display is not None else {}

    def example_of(self, row: int) -> dict[str, Any] | None:
        """The row as a JSON example of the task's schema (for held-out query lists)."""
        return self.examples(row) if self.examples is not None else None


class Task:
    """Subclass this once per model. Only `build_model`, `example_schema` and `encode` are required
    for serving; `training_set` is required for indexing. Defaults assume classification with
    cross-entropy on logits."""

    #: pydantic model of one JSON example (documents the API's request body)
    example_schema: ClassVar[type[BaseModel]]
    #: class names, index = integer label (optional)
    class_names: ClassVar[Sequence[str] | None] = None

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

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        return model(inputs)

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-example loss, shape [B]. Must not reduce over the batch."""
        return F.cross_entropy(outputs, labels, reduction="none")

    def predict(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted labels [B], probabilities [B, C])."""
        probabilities = torch.softmax(outputs.double(), dim=-1)
        return probabilities.argmax(dim=-1), probabilities

    def label_name(self, label: int) -> str:
        names = self.class_names
        return str(names[label]) if names is not None and 0 <= label < len(names) else str(label)

    def parse_label(self, value: int | str) -> int:
        """Accept an integer label or a class name; raise ValueError otherwise."""
        names = list(self.class_names) if self.class_names is not None else None
        if isinstance(value, bool):
            raise ValueError("label must be an integer or a class name")
        if isinstance(value, int):
            if names is not None and not 0 <= value < len(names):
                raise ValueError(f"label {value} is out of range 0..{len(names) - 1}")
            return value
        if isinstance(value, str):
            if names is not None and value in names:
                return names.index(value)
            if value.lstrip("-").isdigit():
                return self.parse_label(int(value))
            raise ValueError(f"unknown label {value!r}; known: {names}")
        raise ValueError("label must be an integer or a class name")
