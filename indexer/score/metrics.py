"""Query metrics: influence on any differentiable function of the query's output, not only its loss.

TracIn's "general" form (Pruthi et al. 2020, sec. 3): a step of gradient descent on training example z
with learning rate lr changes a function f of the query z' by about -lr grad l(z) . grad f(z'). The service
reports, for every metric, the change in the metric's *good* direction, so that positive scores are
always proponents:

    score(z, z') = sum_i lr_i grad l(w_i, z) . grad o(w_i, z'),   o = loss        (default: lower is better)
                                                                   o = -f          (logit, log-probability,
                                                                                    margin: higher is better)

Only the query side changes; training examples keep the gradients of their training loss (the index).

Built-in metrics (class tasks): `loss` (the task's loss on the label used: the request's `label`, else
the prediction), `logit` (the class's logit), `log_probability` (its log-softmax) and `margin` (its logit
minus the largest other logit); the class is the label used. Tasks add their own with `Task.metrics()`,
each a `Metric` with an optional pydantic model of parameters (documented in the service's OpenAPI).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel


@dataclass(frozen=True)
class Metric:
    """A differentiable function of the model's outputs for a batch: fn(outputs, labels, params) -> [B].

    `labels` are the labels used for the query (the request's `label` or the prediction), in the form
    the task's loss takes; `params` is an instance of `params` (a pydantic model) or None.
    `higher_is_better`: True for a score to raise (a logit), False for one to lower (a loss)."""

    name: str
    description: str
    fn: Callable[[Any, torch.Tensor, BaseModel | None], torch.Tensor]
    higher_is_better: bool = True
    params: type[BaseModel] | None = None
    kinds: tuple[str, ...] = ("class", "regression", "multilabel")

    def objective(self, params: BaseModel | None = None) -> Callable[[Any, torch.Tensor], torch.Tensor]:
        """The function whose gradient is the query side of TracIn: o = f if lower is better, else -f."""
        sign = -1.0 if self.higher_is_better else 1.0

        def objective(outputs, labels):
            return sign * self.fn(outputs, labels, params)

        return objective

    def value(self, outputs, labels: torch.Tensor, params: BaseModel | None = None) -> torch.Tensor:
        return self.fn(outputs, labels, params)


def _class_logits(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return outputs.gather(1, labels.long().view(-1, 1)).squeeze(1)


def _margin(outputs: torch.Tensor, labels: torch.Tensor, params) -> torch.Tensor:
    own = _class_logits(outputs, labels)
    others = outputs.scatter(1, labels.long().view(-1, 1), float("-inf"))
    return own - others.max(dim=1).values


def builtin_metrics(task) -> dict[str, Metric]:
    """The built-in metrics of a task: `loss` always; `logit`, `log_probability`, `margin` for class tasks."""
    metrics = {"loss": Metric("loss", "the task's loss on the label used (the request's label, else the model's "
                                      "prediction): proponents lowered it", lambda o, y, p: task.loss(o, y),
                              higher_is_better=False)}
    if task.kind == "class":
        metrics["logit"] = Metric(
            "logit", "the logit of the class of the label used: proponents raised it",
            lambda o, y, p: _class_logits(o, y), kinds=("class",))
        metrics["log_probability"] = Metric(
            "log_probability", "the log-probability (log-softmax) of the class of the label used: proponents raised it",
            lambda o, y, p: _class_logits(F.log_softmax(o, dim=1), y), kinds=("class",))
        metrics["margin"] = Metric(
            "margin", "the class's logit minus the largest other logit (the label used is the class): proponents "
                      "widened it", _margin, kinds=("class",))
    return metrics


def task_metrics(task) -> dict[str, Metric]:
    """Every metric a query of this task may use: the built-ins that apply, then the task's own
    (`Task.metrics()`, which may not reuse a built-in name)."""
    metrics = builtin_metrics(task)
    for metric in task.metrics():
        if not isinstance(metric, Metric):
            raise TypeError(f"Task.metrics() must return indexer.score.metrics.Metric objects, got {type(metric).__name__}")
        if metric.name in metrics:
            raise ValueError(f"Task.metrics(): {metric.name!r} is a built-in metric name")
        if task.kind not in metric.kinds:
            continue
        metrics[metric.name] = metric
    return metrics
