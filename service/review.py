"""Label review in the service: the training set ranked for mislabeled examples (GET /label-review, its
histogram and its export), from the index's self-influence and label_review.npy (`indexer.build.review`, which
defines every ranking; nothing is recomputed here but the orders).

Each row carries the model's prediction at the last checkpoint, its probability, and the suggested label:
the prediction where it differs from the given label (class and multi-label tasks; none for regression).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexer.build.review import RANKINGS, available_rankings, default_ranking, ranking_scores, suspicious_first
from service.errors import ApiError

#: display values that are pictures (data URLs) are left out of exports: a 60k-row CSV stays a few MB
_PICTURE_PREFIX = "data:"
#: a spreadsheet runs cells that start with these as formulas; exported strings get a leading apostrophe
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass
class LabelReview:
    table: np.ndarray | None  # label_review.npy, None for an index built before it existed
    kind: str
    label_width: int
    scores: dict[str, np.ndarray]
    orders: dict[str, np.ndarray]  # rows, most suspicious first
    ranks: dict[str, np.ndarray]  # 1-based rank of each row
    default: str
    _label_orders: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)

    @classmethod
    def build(cls, index_dir: Any, kind: str, label_width: int, live: np.ndarray | None = None) -> "LabelReview":
        """Every ranking's scores, order and ranks; with `live` (bool [N], False for rows marked removed) over the
        rows served only: removed rows get no score (NaN), no place in any order and rank 0."""
        table = getattr(index_dir, "label_review", None)
        si = np.asarray(index_dir.self_influence)
        rows = np.arange(si.size) if live is None else np.flatnonzero(live)
        served = ranking_scores(table[rows] if table is not None else None, si[rows])
        scores, orders, ranks = {}, {}, {}
        for name, values in served.items():
            order = rows[suspicious_first(name, values)]
            full = np.full(si.size, np.nan)
            full[rows] = values
            rank = np.zeros(si.size, dtype=np.int64)
            rank[order] = np.arange(1, order.size + 1)
            scores[name], orders[name], ranks[name] = full, order, rank
        return cls(table, kind, label_width, scores, orders, ranks, default_ranking(table))

    @property
    def available(self) -> list[str]:
        return available_rankings(self.table)

    def ranking(self, name: str | None) -> str:
        """The ranking asked for (None: the default), or 422 naming the field when this index lacks it."""
        if name is None:
            return self.default
        if name not in RANKINGS:
            raise ApiError(422, "invalid", "ranking", f"unknown ranking; one of {list(RANKINGS)}",
                           ["query", "ranking"], echo=name)
        if name not in self.scores:
            if self.table is None:
                why = ("this index has no label-review data (built by an older version): only self_influence; "
                       "rebuild it for the others")
            else:
                why = ("this task has no margins (regression targets, or outputs that are not logits [B, classes]): "
                       f"use one of {self.available}")
            raise ApiError(422, "unsupported", "ranking", why, ["query", "ranking"], echo=name)
        return name

    def order(self, ranking: str, label: int | None = None, label_rows: np.ndarray | None = None) -> np.ndarray:
        """Rows by the ranking, most suspicious first; only `label_rows` (a label filter) when given."""
        if label_rows is None:
            return self.orders[ranking]
        key = (ranking, int(label))
        if key not in self._label_orders:
            mask = np.zeros(self.scores[ranking].size, dtype=bool)
            mask[label_rows] = True
            order = self.orders[ranking]
            self._label_orders[key] = order[mask[order]]
        return self._label_orders[key]

    # -- one row ---------------------------------------------------------------------------------
    def prediction(self, row: int) -> Any:
        """The prediction at the last checkpoint in the JSON form of a label, or None."""
        if self.table is None or "prediction" not in self.table.dtype.names:
            return None
        value = self.table["prediction"][row]
        if self.kind == "class":
            return int(value)
        values = [float(v) for v in np.asarray(value).reshape(-1)]
        if self.kind == "multilabel":
            return [int(round(v)) for v in values]
        return values[0] if self.label_width == 0 else values

    def probability(self, row: int, name: str = "probability") -> float | None:
        if self.table is None or name not in self.table.dtype.names:
            return None
        return float(self.table[name][row])

    def suggested(self, row: int, label: Any) -> Any:
        """The prediction where it differs from the given label (class, multi-label); else None."""
        if self.kind == "regression":
            return None
        prediction = self.prediction(row)
        if prediction is None or _same_label(prediction, label):
            return None
        return prediction

    def item(self, engine: Any, row: int, ranking: str) -> dict[str, Any]:
        ex = engine.examples[row]
        label = ex["label"]
        prediction = self.prediction(row)
        suggested = self.suggested(row, label)
        return {
            "id": ex["id"], "rank": int(self.ranks[ranking][row]), "score": float(self.scores[ranking][row]),
            "label": label, "label_name": engine.label_name(label), "display": ex.get("display") or {},
            "self_influence": float(engine.index_dir.self_influence[row]),
            "prediction": prediction,
            "prediction_name": engine.label_name(prediction) if prediction is not None else None,
            "probability": self.probability(row),
            "label_probability": self.probability(row, "label_probability"),
            "suggested_label": suggested,
            "suggested_label_name": engine.label_name(suggested) if suggested is not None else None,
        }

    def describe(self, ranking: str) -> dict[str, Any]:
        order, meaning = RANKINGS[ranking]
        return {"ranking": ranking, "order": order, "description": meaning, "default_ranking": self.default,
                "rankings": self.available}


def _same_label(a: Any, b: Any) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        left = a if isinstance(a, list) else [a]
        right = b if isinstance(b, list) else [b]
        return len(left) == len(right) and all(float(x) == float(y) for x, y in zip(left, right))
    return float(a) == float(b)


def histogram(scores: np.ndarray, bins: int, scale: str, order: str, flags: dict[str, np.ndarray],
              rows: np.ndarray) -> dict[str, Any]:
    """Counts of `scores[rows]` in `bins` bins: log-spaced from the smallest positive score when asked and
    every score is positive-valued (scores at or below it fall in the first bin), else linear."""
    values = np.asarray(scores, dtype=np.float64)[rows]
    lo, hi = float(values.min()), float(values.max())
    positive = values[values > 0]
    use_log = scale == "log" and positive.size > 0 and hi > float(positive.min()) and lo >= 0
    if use_log:
        lo = float(positive.min())
        edges = np.logspace(np.log10(lo), np.log10(hi), bins + 1)
        position = (np.log10(np.maximum(values, lo)) - np.log10(lo)) / (np.log10(hi) - np.log10(lo))
    else:
        span = (hi - lo) or 1.0
        edges = lo + span * np.linspace(0.0, 1.0, bins + 1)
        position = (values - lo) / span
    which = np.clip((position * bins).astype(np.int64), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    flagged = {name: np.bincount(which[mask[rows]], minlength=bins).tolist() for name, mask in flags.items()}
    return {"edges": edges.tolist(), "counts": counts.tolist(), "total": int(rows.size),
            "scale": "log" if use_log else "linear", "order": order, "flagged": flagged}


# -- export ------------------------------------------------------------------------------------------

def export_rows(engine: Any, review: LabelReview, ranking: str, rows: np.ndarray) -> list[dict[str, Any]]:
    """The export's rows: every item field but pictures (data-URL display values)."""
    out = []
    for row in rows.tolist():
        item = review.item(engine, row, ranking)
        item["display"] = {k: v for k, v in item["display"].items()
                           if not (isinstance(v, str) and v.startswith(_PICTURE_PREFIX))}
        out.append(item)
    return out


CSV_COLUMNS = ["rank", "id", "label", "label_name", "prediction", "prediction_name", "probability",
               "suggested_label", "suggested_label_name", "score", "ranking", "self_influence", "label_probability"]


def to_csv(items: list[dict[str, Any]], ranking: str) -> str:
    """One header line, one line per item: CSV_COLUMNS then `display.<name>` for every display field seen
    (lists and objects as JSON). Strings that a spreadsheet would run as a formula get a leading '."""
    display_names: list[str] = []
    seen = set()
    for item in items:
        for name in item["display"]:
            if name not in seen:
                seen.add(name)
                display_names.append(name)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + [f"display.{n}" for n in display_names])
    for item in items:
        values = [item.get(c) if c != "ranking" else ranking for c in CSV_COLUMNS]
        values += [item["display"].get(n) for n in display_names]
        writer.writerow([_cell(v) for v in values])
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(float(value)) if isinstance(value, float) and math.isfinite(value) else str(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text
