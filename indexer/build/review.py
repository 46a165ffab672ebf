"""Label review: rankings of the training set for finding mislabeled examples, from what the embedding
loop already computes at every checkpoint (the per-example losses and the model's outputs): no extra
training and no extra forward pass.

`ReviewAccumulator` gathers, per training example, in the build's resume state (one float64 matrix,
committed with each checkpoint, so a resumed build writes the same bytes):

    loss[c]      the loss of the given label at checkpoint c (the task's per-example loss)
    margin[c]    class tasks: the logit of the given label minus the largest other logit at checkpoint c
                 (< 0: the model predicts another class); multi-label tasks: the smallest signed logit
                 (2 y_j - 1) z_j over the labels j (< 0: a label the model contradicts). Only when the
                 outputs are logits [B, classes] (class) or [B, labels] (multi-label); never for regression
    prediction   Task.predict at the last checkpoint (class id; 0/1 vector; predicted value(s))
    probability  class: the softmax probability of the prediction; multi-label: the probability of the
                 predicted label vector under the model's independent sigmoids; none for regression
    label_probability   the same for the given label

and `label_table` turns it into the structured array of `label_review.npy` in the index directory
(`LABEL_REVIEW_FILE`). `ranking_scores` derives every ranking from that table and the exact
self-influence; the service and bench/bench_mislabel.py both call it (one definition).

Rankings (`RANKINGS`): each has a score in its own units and an order; "most suspicious first" means
descending self_influence, loss and combined, ascending margin and aum.

The combined rule (the default) was chosen by measurement (bench/bench_mislabel.py, docs/mislabel.md:
Fashion-MNIST with 10% of the labels flipped): the last checkpoint's loss is the best single ranking while
the model has not memorised its noisy labels, and close to useless once it has; averaged over the
checkpoints, loss and margin keep what the earlier checkpoints saw. Their percentile ranks, averaged,
measured best over both regimes; adding self-influence made it worse in both.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

LABEL_REVIEW_FILE = "label_review.npy"
FORMAT = "tracin-label-review/1"

#: name -> (order of the most suspicious first, what it means). The API documents these words.
RANKINGS: dict[str, tuple[str, str]] = {
    "combined": ("descending", "the mean of two percentile ranks in 0..1 (1 = the most suspicious by both): the "
                               "loss averaged over the checkpoints' and the area under the margin's (low margin = "
                               "high rank); without margins (regression), the averaged loss's alone. Measured best "
                               "on average over a model that has not memorised its noisy labels and one that has; "
                               "keep checkpoints from early in training (docs/mislabel.md)"),
    "self_influence": ("descending", "exact self-influence sum_i lr_i ||grad loss(w_i, z)||^2 over the checkpoints: "
                                     "how hard the example pulled on the model (mislabeled, rare or odd examples)"),
    "loss": ("descending", "the loss of the given label at the last checkpoint"),
    "margin": ("ascending", "the margin at the last checkpoint: logit of the given label minus the largest other "
                            "logit (< 0: the model predicts another class; multi-label: the smallest signed logit "
                            "(2y-1)z over the labels); low = suspicious"),
    "aum": ("ascending", "area under the margin: the margin averaged over the checkpoints (the model kept "
                         "disagreeing with the label during training); low = suspicious"),
}
DEFAULT_RANKING = "combined"


class ReviewError(ValueError):
    """A label-review table that does not fit the index (one line)."""


class ReviewAccumulator:
    """Per-example label-review numbers of rows 0..rows-1 (a build's rows, or a shard's), one float64
    matrix [rows, 2C + K + 2]: loss per checkpoint (C), margin per checkpoint (C), the prediction at the
    last checkpoint (K numbers), its probability and the given label's. NaN where not (yet) known."""

    def __init__(self, kind: str, rows: int, checkpoints: int, prediction_width: int):
        self.kind, self.rows, self.checkpoints, self.width = kind, rows, checkpoints, prediction_width
        self.data = np.full((rows, 2 * checkpoints + prediction_width + 2), np.nan, dtype=np.float64)

    @classmethod
    def for_task(cls, task: Any, rows: int, checkpoints: int, label_width: int) -> "ReviewAccumulator":
        kind = task.kind
        width = 1 if kind == "class" else max(1, label_width)
        return cls(kind, rows, checkpoints, width)

    def restore(self, data: np.ndarray | None) -> bool:
        """Take the matrix of a resume state; False (and nothing taken) when it does not fit."""
        if data is None or data.shape != self.data.shape or data.dtype != np.float64:
            return False
        self.data = np.array(data, dtype=np.float64)
        return True

    def add(self, c: int, start: int, stop: int, labels: torch.Tensor, losses: torch.Tensor, outputs: Any,
            task: Any) -> None:
        """Record batch rows start..stop at checkpoint c (0-based) from its losses and outputs."""
        C, B = self.checkpoints, stop - start
        loss = losses.detach().to("cpu", torch.float64).reshape(-1).numpy()
        if loss.shape != (B,):
            raise ReviewError(f"the task's loss gave {loss.shape} values for {B} examples")
        self.data[start:stop, c] = loss
        margin = _margin(self.kind, labels, outputs, B)
        if margin is not None:
            self.data[start:stop, C + c] = margin
        if c == C - 1:
            prediction, probability, label_probability = _prediction(self.kind, task, labels, outputs, B, self.width)
            if prediction is not None:
                self.data[start:stop, 2 * C:2 * C + self.width] = prediction
            if probability is not None:
                self.data[start:stop, 2 * C + self.width] = probability
                self.data[start:stop, 2 * C + self.width + 1] = label_probability

    def table(self) -> np.ndarray:
        """The structured array written as label_review.npy (see `label_table`)."""
        return label_table(self.kind, self.data, self.checkpoints, self.width)


def _margin(kind: str, labels: torch.Tensor, outputs: Any, batch: int) -> np.ndarray | None:
    if not isinstance(outputs, torch.Tensor) or outputs.dim() < 1 or outputs.shape[0] != batch:
        return None
    with torch.no_grad():
        z = outputs.detach().to("cpu", torch.float64).reshape(batch, -1)
        if kind == "class":
            if outputs.dim() != 2 or z.shape[1] < 2:
                return None
            y = labels.detach().to("cpu").long().reshape(-1, 1)
            if y.shape[0] != batch or bool((y < 0).any()) or bool((y >= z.shape[1]).any()):
                return None
            given = z.gather(1, y).squeeze(1)
            other = z.scatter(1, y, -math.inf).max(dim=1).values
            return (given - other).numpy()
        if kind == "multilabel":
            y = labels.detach().to("cpu", torch.float64).reshape(batch, -1)
            if y.shape != z.shape:
                return None
            return ((2.0 * y - 1.0) * z).min(dim=1).values.numpy()
    return None


def _prediction(kind: str, task: Any, labels: torch.Tensor, outputs: Any, batch: int, width: int):
    """(prediction [B, width], probability [B], the given label's probability [B]) at the last checkpoint,
    by the task's own `predict`; None where it does not give them in the expected form."""
    with torch.no_grad():
        predicted, probabilities = task.predict(outputs)
    if not isinstance(predicted, torch.Tensor) or predicted.shape[0] != batch:
        return None, None, None
    prediction = predicted.detach().to("cpu", torch.float64).reshape(batch, -1)
    if prediction.shape[1] != width:
        return None, None, None
    if kind == "regression" or not isinstance(probabilities, torch.Tensor):
        return prediction.numpy(), None, None
    p = probabilities.detach().to("cpu", torch.float64).reshape(batch, -1)
    if kind == "class":
        pred = prediction[:, 0].long().reshape(-1, 1)
        y = labels.detach().to("cpu").long().reshape(-1, 1)
        if bool((pred < 0).any()) or bool((pred >= p.shape[1]).any()) or bool((y < 0).any()) \
                or bool((y >= p.shape[1]).any()):
            return prediction.numpy(), None, None
        return prediction.numpy(), p.gather(1, pred).squeeze(1).numpy(), p.gather(1, y).squeeze(1).numpy()
    y = labels.detach().to("cpu", torch.float64).reshape(batch, -1)
    if p.shape != prediction.shape or y.shape != p.shape:
        return prediction.numpy(), None, None
    own = torch.where(prediction > 0.5, p, 1.0 - p).prod(dim=1)
    given = torch.where(y > 0.5, p, 1.0 - p).prod(dim=1)
    return prediction.numpy(), own.numpy(), given.numpy()


def label_table(kind: str, data: np.ndarray, checkpoints: int, width: int) -> np.ndarray:
    """The structured array of label_review.npy from an accumulator's matrix. Fields: loss (C,) always;
    margin (C,) when every row has one (class / multi-label logits); prediction (int64 for class tasks,
    float64 (K,) otherwise) when every row has one; probability and label_probability when every row has
    them (class, multi-label). Raises ReviewError when a loss is missing or not finite."""
    C = checkpoints
    loss = data[:, :C]
    if not np.isfinite(loss).all():
        row, c = np.argwhere(~np.isfinite(loss))[0]
        raise ReviewError(f"the loss of training row {int(row)} at checkpoint {int(c)} is not finite "
                          f"({loss[row, c]!r})")
    margin = data[:, C:2 * C]
    prediction = data[:, 2 * C:2 * C + width]
    probability = data[:, 2 * C + width:2 * C + width + 2]
    fields: list[tuple] = [("loss", "<f8", (C,))]
    has_margin = kind in ("class", "multilabel") and np.isfinite(margin).all()
    if has_margin:
        fields.append(("margin", "<f8", (C,)))
    has_prediction = bool(np.isfinite(prediction).all())
    if has_prediction:
        fields.append(("prediction", "<i8") if kind == "class" else ("prediction", "<f8", (width,)))
    has_probability = has_prediction and kind != "regression" and bool(np.isfinite(probability).all())
    if has_probability:
        fields += [("probability", "<f8"), ("label_probability", "<f8")]
    table = np.zeros(data.shape[0], dtype=np.dtype(fields))
    table["loss"] = loss
    if has_margin:
        table["margin"] = margin
    if has_prediction:
        table["prediction"] = prediction[:, 0].astype(np.int64) if kind == "class" else prediction
    if has_probability:
        table["probability"] = probability[:, 0]
        table["label_probability"] = probability[:, 1]
    return table


def check_table(table: Any, kind: str, count: int, checkpoints: int, label_width: int,
                classes: int | None) -> None:
    """Validate a label_review.npy read from an index directory; ReviewError (one line) when it does
    not fit: a structured array of `count` rows, the fields its label kind allows, `checkpoints`
    losses (and margins), finite numbers, probabilities in 0..1, class predictions in 0..classes-1."""
    if not isinstance(table, np.ndarray) or table.dtype.names is None:
        raise ReviewError("is not a structured array")
    if table.shape != (count,):
        raise ReviewError(f"has {table.shape[0] if table.ndim else 0} rows, the index {count}")
    names = set(table.dtype.names)
    allowed = {"loss", "margin", "prediction", "probability", "label_probability"}
    if not names <= allowed or "loss" not in names:
        raise ReviewError(f"has fields {sorted(names)}, expected loss and some of {sorted(allowed - {'loss'})}")
    if kind == "regression" and names & {"margin", "probability", "label_probability"}:
        raise ReviewError("has margins or probabilities, which a regression task does not have")
    if ("probability" in names) != ("label_probability" in names) or ("probability" in names
                                                                       and "prediction" not in names):
        raise ReviewError("has a probability without its prediction or label probability")
    for name in ("loss", "margin"):
        if name in names:
            field = table.dtype.fields[name][0]
            if field.base != np.float64 or field.shape != (checkpoints,):
                raise ReviewError(f"field {name} is {field}, expected float64 ({checkpoints},) (one per checkpoint)")
    for name in ("probability", "label_probability"):
        if name in names and table.dtype.fields[name][0] != np.float64:
            raise ReviewError(f"field {name} is not float64")
    for name in sorted(names):
        values = np.asarray(table[name], dtype=np.float64)
        if not np.isfinite(values).all():
            raise ReviewError(f"field {name} holds a value that is not finite")
    for name in ("probability", "label_probability"):
        if name in names and ((table[name] < 0).any() or (table[name] > 1).any()):
            raise ReviewError(f"field {name} holds a value outside 0..1")
    if "prediction" in names:
        field = table.dtype.fields["prediction"][0]
        if kind == "class":
            if field != np.int64:
                raise ReviewError("field prediction of a class task is not int64")
            if classes is not None and ((table["prediction"] < 0).any() or (table["prediction"] >= classes).any()):
                raise ReviewError(f"field prediction holds a class outside 0..{classes - 1}")
        else:
            want = (max(1, label_width),)
            if field.base != np.float64 or field.shape != want:
                raise ReviewError(f"field prediction is {field}, expected float64 {want}")


def review_entry(table: np.ndarray) -> dict[str, Any]:
    """The manifest's `label_review` entry: the file, its fields, the rankings it supports and the default."""
    return {"format": FORMAT, "file": LABEL_REVIEW_FILE, "fields": list(table.dtype.names),
            "rankings": available_rankings(table), "default": default_ranking(table)}


def available_rankings(table: np.ndarray | None) -> list[str]:
    """The rankings an index supports: self_influence always; loss, combined with a table; margin and
    aum with margins."""
    if table is None:
        return ["self_influence"]
    names = ["combined", "self_influence", "loss"]
    if "margin" in (table.dtype.names or ()):
        names += ["margin", "aum"]
    return names


def default_ranking(table: np.ndarray | None) -> str:
    return DEFAULT_RANKING if table is not None else "self_influence"


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """Rank of each value in 0..1 (ties share their mean rank; 1 = the largest), float64."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n <= 1:
        return np.ones(n, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.arange(n, dtype=np.float64)
    sorted_values = values[order]
    # ties: every member of a run of equal values gets the run's mean rank
    starts = np.flatnonzero(np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]]))
    ends = np.concatenate([starts[1:], [n]])
    run_mean = (starts + ends - 1) / 2.0
    ranks[order] = np.repeat(run_mean, ends - starts)
    return ranks / (n - 1)


def ranking_scores(table: np.ndarray | None, self_influence: np.ndarray) -> dict[str, np.ndarray]:
    """Every available ranking's score per row (float64, in its own units; see RANKINGS for the order)."""
    scores = {"self_influence": np.asarray(self_influence, dtype=np.float64)}
    if table is None:
        return scores
    scores["loss"] = np.asarray(table["loss"][:, -1], dtype=np.float64)
    if "margin" in table.dtype.names:
        scores["margin"] = np.asarray(table["margin"][:, -1], dtype=np.float64)
        scores["aum"] = np.asarray(table["margin"], dtype=np.float64).mean(axis=1)
    mean_loss = np.asarray(table["loss"], dtype=np.float64).mean(axis=1)
    if "aum" in scores:
        scores["combined"] = (percentile_rank(mean_loss) + percentile_rank(-scores["aum"])) / 2.0
    else:
        scores["combined"] = percentile_rank(mean_loss)
    return {name: scores[name] for name in available_rankings(table)}


def suspicion(name: str, score: np.ndarray) -> np.ndarray:
    """Higher = more suspicious, whatever the ranking's order."""
    return -score if RANKINGS[name][0] == "ascending" else score


def suspicious_first(name: str, score: np.ndarray) -> np.ndarray:
    """Row order, most suspicious first (ties by row)."""
    return np.argsort(-suspicion(name, score), kind="stable")
