"""Built-in task `tabular.mlp`: a table (CSV / TSV / JSONL / Parquet / a `datasets` folder) with feature columns
and a label column, and an MLP trained on the standardised features.

    task = "tabular.mlp"
    task_args = { data = "train.csv", feature_columns = ["alcohol", "ash"], label_column = "cultivar",
                  hidden = [16], num_classes = 3 }

The model is `nn.Sequential(Linear(d, h1), ReLU(), ..., Linear(hk, C))` (`mlp`), so the checkpoints are
`torch.save(model.state_dict())` of such a Sequential (keys "0.weight", "0.bias", "2.weight", ...), or any
format `tracin index` reads. `hidden` gives the hidden layer sizes in order, `activation` the nonlinearity
between them (relu, tanh, gelu, sigmoid, silu); a model with dropout or other layers between its Linears is not
this Sequential: write a Task for it.

Standardisation (`standardize = true`, the default): every feature is mapped to (x - mean) / std with mean and
std (population, ddof = 0) of the training rows, what scikit-learn's StandardScaler does (a constant column
gets std 1), computed from the `data` file whenever the task is built (by `tracin index` and by the service,
which refuses to serve when the training rows are not those indexed); the model must have been trained on
features standardised that way. `mean` / `std` in the task's arguments give other values instead.

Labels: class ids (integers, as numbers or CSV strings) or class names listed in `classes` (in id order);
`label_kind = "regression"` takes a numeric target instead (one output, squared error). The JSON example is
an object with one number per feature column: {"alcohol": 13.2, "ash": 2.4}.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, create_model
from torch import nn

from indexer.config import ConfigError
from indexer.task import ExampleSet, Task
from indexer.tasks.data import class_ids, float_values, read_table

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}
DISPLAY_FEATURES = 12  # features shown per training example (all when there are at most this many)


def mlp(in_features: int, hidden: Sequence[int], out_features: int, activation: str = "relu") -> nn.Sequential:
    """`nn.Sequential(Linear(in, h1), act, ..., Linear(hk, out))`: the model of `tabular.mlp` (train this, or an
    `nn.Sequential` written the same way, and save its `state_dict()`)."""
    sizes = [int(in_features), *map(int, hidden), int(out_features)]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def _example_schema(columns: Sequence[str]) -> type[BaseModel]:
    """A pydantic model with one required finite number per feature column (the column names are the JSON keys)."""
    fields: dict[str, Any] = {
        f"x{i}": (float, Field(alias=name, allow_inf_nan=False, description=f"feature column {name!r}"))
        for i, name in enumerate(columns)}
    return create_model("TabularExample", __config__=ConfigDict(extra="forbid", populate_by_name=False,
                                                                 title="TabularExample"), **fields)


class TabularMLPTask(Task):
    """Built-in `tabular.mlp` (see the module docstring). Arguments (task_args):

    data: table file or `datasets` folder; feature_columns: list of column names (default: every column but
    the label and id columns); label_column: "label"; hidden: hidden layer sizes (required, may be []);
    num_classes / classes: the output size, or the class names in id order; activation: "relu";
    label_kind: "class" | "regression"; standardize: true; mean / std: the standardisation, when not the
    training rows'; id_column: ids of the rows (default: the row number); held_out: a table of the same
    columns offered as example queries (GET /queries); split: the split of a `datasets` folder.
    Raises ConfigError (one line, naming the argument) for a bad argument, column or value."""

    def __init__(self, data: str, hidden: Sequence[int], feature_columns: Sequence[str] | None = None,
                 label_column: str = "label", num_classes: int | None = None, classes: Sequence[str] | None = None,
                 activation: str = "relu", label_kind: str = "class", standardize: bool = True,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, id_column: str | None = None,
                 held_out: str | None = None, split: str | None = None, seed: int = 0):
        if not isinstance(hidden, (list, tuple)) or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0
                                                             for h in hidden):
            raise ConfigError(f"task_args.hidden: expected a list of positive layer sizes such as [64, 32], got {hidden!r}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"task_args.activation: {activation!r} is not one of {sorted(ACTIVATIONS)}")
        if label_kind not in ("class", "regression"):
            raise ConfigError(f"task_args.label_kind: {label_kind!r} is not one of ['class', 'regression']")
        self.table = read_table(data, split)
        self.label_column = self.table.require(label_column, "label_column")
        self.id_column = self.table.require(id_column, "id_column") if id_column is not None else None
        if feature_columns is None:
            feature_columns = [c for c in self.table.columns if c not in (label_column, id_column)]
        if not isinstance(feature_columns, (list, tuple)) or not feature_columns:
            raise ConfigError(f"task_args.feature_columns: expected a non-empty list of column names, got "
                              f"{feature_columns!r}")
        self.feature_columns = [self.table.require(str(c), "feature_columns") for c in feature_columns]
        if self.label_column in self.feature_columns:
            raise ConfigError(f"task_args.feature_columns: holds the label column {label_column!r}")
        self.label_kind = label_kind
        self.hidden, self.activation, self.seed = list(hidden), activation, seed
        if label_kind == "regression":
            if classes is not None or num_classes is not None:
                raise ConfigError("task_args.classes / num_classes: a regression task has one output; remove them")
            self.outputs = 1
        else:
            if classes is not None:
                if not isinstance(classes, (list, tuple)) or not classes or len(set(map(str, classes))) != len(classes):
                    raise ConfigError(f"task_args.classes: expected a list of distinct class names, got {classes!r}")
                self.class_names = [str(c) for c in classes]
                if num_classes is not None and num_classes != len(classes):
                    raise ConfigError(f"task_args.num_classes: {num_classes} but classes names {len(classes)}")
            elif not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
                raise ConfigError(f"task_args.num_classes: the model's number of outputs (>= 2) is required, or "
                                  f"the class names as classes = [...]; got {num_classes!r}")
            self.outputs = len(classes) if classes is not None else num_classes
        sizes = [len(self.feature_columns), *self.hidden, self.outputs]
        self.model_name = f"tabular.mlp {' -> '.join(map(str, sizes))} (nn.Sequential of Linear and {activation})"
        self.features = self._features(self.table, "data")
        self.labels = self._labels(self.table, "data")
        if standardize:
            self.mean = self._vector(mean, "mean") if mean is not None else self.features.mean(dim=0)
            self.std = self._vector(std, "std") if std is not None else self.features.std(dim=0, correction=0)
            self.std = torch.where(self.std > 0, self.std, torch.ones_like(self.std))  # StandardScaler: 1 if constant
        elif mean is not None or std is not None:
            raise ConfigError("task_args.mean / std: given with standardize = false; remove them or standardize")
        else:
            self.mean, self.std = torch.zeros(len(self.feature_columns)), torch.ones(len(self.feature_columns))
        self.held_out = read_table(held_out, None, "held_out") if held_out is not None else None
        if self.held_out is not None:
            for name in [*self.feature_columns, self.label_column]:
                self.held_out.require(name, "held_out")
        self.example_schema = _example_schema(self.feature_columns)

    # -- data --------------------------------------------------------------------------------------
    def _features(self, table, arg: str) -> torch.Tensor:
        columns = [float_values(table.column(c, arg), f"task_args.{arg} ({table.path.name}) column {c!r}")
                   for c in self.feature_columns]
        return torch.tensor(columns, dtype=torch.float64).T.contiguous()

    def _labels(self, table, arg: str) -> torch.Tensor:
        where = f"task_args.label_column ({table.path.name} column {self.label_column!r})"
        values = table.column(self.label_column, arg)
        if self.label_kind == "regression":
            return torch.tensor(float_values(values, where), dtype=torch.float32)
        if self.class_names is not None:
            return class_ids(values, self.class_names, where)
        ids = class_ids(values, None, where)
        too_big = (ids >= self.outputs).nonzero()
        if len(too_big):
            row = int(too_big[0])
            raise ConfigError(f"{where}: row {row}: class id {int(ids[row])} is out of range 0..{self.outputs - 1} "
                              f"(num_classes = {self.outputs})")
        return ids

    def _vector(self, values, name: str) -> torch.Tensor:
        if not isinstance(values, (list, tuple)) or len(values) != len(self.feature_columns):
            raise ConfigError(f"task_args.{name}: expected {len(self.feature_columns)} numbers (one per feature "
                              f"column), got {values!r}"[:300])
        return torch.tensor(float_values(values, f"task_args.{name}"), dtype=torch.float64)

    def standardized(self, features: torch.Tensor) -> torch.Tensor:
        """float64 [N, d] raw features -> float32 [N, d] model inputs ((x - mean) / std)."""
        return ((features - self.mean) / self.std).to(torch.float32)

    def _set(self, table, features: torch.Tensor, labels: torch.Tensor, arg: str) -> ExampleSet:
        ids = [str(v) for v in table.column(self.id_column, arg)] if self.id_column is not None else None
        if ids is not None and len(set(ids)) != len(ids):
            raise ConfigError(f"task_args.id_column: column {self.id_column!r} of {table.path} repeats ids")
        names = self.feature_columns
        shown = names[:DISPLAY_FEATURES]

        def display(i: int) -> dict[str, Any]:
            return {name: float(features[i, j]) for j, name in enumerate(shown)}

        return ExampleSet(self.standardized(features), labels, ids=ids, display=display,
                          examples=lambda i: {name: float(features[i, j]) for j, name in enumerate(names)})

    def training_set(self) -> ExampleSet:
        return self._set(self.table, self.features, self.labels, "data")

    def held_out_set(self) -> ExampleSet | None:
        if self.held_out is None:
            return None
        return self._set(self.held_out, self._features(self.held_out, "held_out"),
                         self._labels(self.held_out, "held_out"), "held_out")

    # -- model -------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return mlp(len(self.feature_columns), self.hidden, self.outputs, self.activation)

    def encode(self, examples: Sequence[BaseModel]) -> torch.Tensor:
        raw = torch.tensor([[getattr(e, f"x{j}") for j in range(len(self.feature_columns))] for e in examples],
                           dtype=torch.float64)
        return self.standardized(raw)
