"""The loaded index and the query logic, without HTTP: what the routes call (in a worker thread).

`Engine.influence` answers POST /influence in two stages: the query is embedded with the indexer's own
embedding function (`indexer.sketch.embedding.Embedder`), the FAISS index proposes candidates
(`service.first_stage`), and, unless re-ranking is off, their exact TracIn scores are recomputed from
the training examples (`indexer.score.exact.ExactScorer`) and decide the answer. No gradient or projection
math lives here. Loading and verification are in `service.loading`, labels in `service.labels`.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import ApiError, ServiceStartupError
from service.first_stage import FirstStage
from service.labels import Labels
from service.settings import Settings


@dataclass
class Engine:
    settings: Settings
    index_dir: Any  # indexer.store.directory.IndexDirectory
    task: Any  # indexer.task.Task
    embedder: Any  # indexer.sketch.embedding.Embedder
    labels: Labels
    first_stage: FirstStage
    scorer: Any  # indexer.score.exact.ExactScorer, or None when exact re-ranking is unavailable
    rerank_error: str | None  # why re-ranking is unavailable
    id_to_row: dict[str, int]
    si_order: np.ndarray  # rows by descending self-influence
    si_rank: np.ndarray  # 1-based rank of each row
    load_seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)  # query metrics by name (indexer.score.metrics.Metric)
    stats: Any = None  # service.metrics.Metrics (Prometheus), set by the app
    review: Any = None  # service.review.LabelReview: the label-review rankings
    input_ranges: Any = None  # indexer.build.input_ranges.InputRanges, or None (an index built before them)
    removed_ids: set = field(default_factory=set)  # ids of training rows marked removed (tracin index --remove-ids)
    live: Any = None  # bool [N]: False for rows marked removed (None: none are)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return self.index_dir.count

    @property
    def approximate(self) -> bool:
        return self.index_dir.approximate

    @property
    def exact_index(self) -> bool:
        """Scores straight from the index are exact TracIn (up to float32) only for an exact-mode Flat index."""
        return self.index_dir.manifest["projection"]["kind"] == "exact" and not self.approximate

    @property
    def examples(self) -> list[dict[str, Any]]:
        return self.index_dir.examples

    @property
    def queries(self) -> list[dict[str, Any]]:
        return self.index_dir.queries

    @property
    def class_names(self) -> list[str] | None:
        return self.labels.class_names

    def label_name(self, label: Any) -> str:
        return self.labels.name(label)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.stats is not None:
                self.stats.stage.labels(name).observe(time.perf_counter() - t0)

    def row_of(self, example_id: str, field_name: str, status: int = 422, loc: list | None = None) -> int:
        row = self.id_to_row.get(example_id)
        if row is None:
            why = "this training example was removed from the index" if example_id in self.removed_ids \
                else "no training example has this id"
            raise ApiError(status, "unknown_id", field_name, why, loc, echo=example_id)
        return row

    def rerank_depth(self, req: Any) -> int:
        """K' for this request: its `rerank` field, else the server default; 0 = scores from the index."""
        asked = getattr(req, "rerank", None)
        if asked is None:
            return self.settings.rerank if self.scorer is not None else 0
        if asked > 0 and self.scorer is None:
            raise ApiError(422, "unsupported", "rerank", f"exact re-ranking is unavailable: {self.rerank_error}")
        return int(asked)

    # -- queries -------------------------------------------------------------------------------
    def resolve_metric(self, spec: Any) -> tuple[Any, Any]:
        """(Metric, its validated params or None) for a request's `metric` (None, a name, or an object with
        `name` and the metric's parameters; the request model already validated the object's fields)."""
        if spec is None:
            return self.metrics["loss"], None
        name = spec if isinstance(spec, str) else spec.name
        metric = self.metrics.get(name)
        if metric is None:
            raise ApiError(422, "unknown_metric", "metric", f"unknown metric; this task has {sorted(self.metrics)}",
                           echo=name)
        params = None
        if metric.params is not None:
            data = {} if isinstance(spec, str) else spec.model_dump(exclude={"name"})
            try:
                params = metric.params.model_validate(data)
            except Exception as exc:  # noqa: BLE001 - pydantic ValidationError: name the field
                raise ApiError(422, "invalid_metric", "metric", f"parameters of metric {name!r}: {exc}") from None
        return metric, params

    def embed_examples(self, examples: list[Any], labels: list[Any] | None = None, keep_grads: bool = False,
                       objective=None, fields: list[tuple[str, str]] | None = None) -> dict[str, Any]:
        """Encode validated examples, predict, embed with `labels` (JSON form; default, or a None entry: the
        prediction).

        The vectors come from the indexer's `Embedder.embed`, the function that built the index; with
        `keep_grads` the per-checkpoint block gradients come back too (for exact re-ranking); `objective`
        replaces the task's loss on the query side (a metric, `indexer.score.metrics`). `fields` names each
        example and its label in errors (default "example", "label"): a member of a set is named alone."""
        fields = fields or [("example", "label")] * len(examples)
        try:
            inputs = self.task.encode(examples)
        except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as exc:
            field_name, exc = self._failing_example(examples, fields, exc)
            raise ApiError(422, "invalid_example", field_name, f"the task cannot encode this example: {exc}") from None
        with self.stage("predict"):
            predictions, probabilities = self._predict(inputs, [f for f, _ in fields])
        if labels is None:
            used = predictions
        else:
            used = [p if label is None else label for label, p in zip(labels, predictions)]
            classes = int(probabilities.shape[-1]) if probabilities is not None and probabilities.dim() > 1 else None
            for label, (_, label_field) in zip(used, fields):
                try:
                    self.labels.check_for_model([label], classes)
                except ApiError as exc:
                    raise ApiError(exc.status, exc.code, label_field, exc.message) from None
        with self.stage("embed"):
            embedding = self._embed(inputs, self.task.labels_tensor(used), keep_grads, objective,
                                    [f for f, _ in fields])
        return {**embedding, "predicted": predictions, "probabilities": probabilities, "labels": used,
                "inputs": inputs}

    def _failing_example(self, examples: list[Any], fields: list[tuple[str, str]], exc: Exception):
        """(the field of the example at fault, its error) for a batch whose encoding failed: the first that the
        task cannot encode alone, else the first whose encoded shape differs from most members'."""
        if len(examples) == 1:
            return fields[0][0], exc
        from collections import Counter

        from indexer.task import input_tensors

        shapes = []
        for example, (field_name, _) in zip(examples, fields):
            try:
                encoded = self.task.encode([example])
            except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as one:
                return field_name, one
            shapes.append(tuple(tuple(t.shape[1:]) if hasattr(t, "shape") else () for t in input_tensors(encoded)))
        usual = Counter(shapes).most_common(1)[0][0]
        for shape, (field_name, _) in zip(shapes, fields):
            if shape != usual:
                return field_name, f"its encoded shape {list(shape)} differs from the other members' {list(usual)}"
        return fields[0][0].split(".")[0], exc

    def _predict(self, inputs, fields: list[str] | None = None) -> tuple[list[Any], Any]:
        """(predictions as JSON labels, probabilities float64 or None) at the last checkpoint. A non-finite
        output is a 422 naming the example (`fields[i]`, default "example")."""
        import torch

        try:
            predicted, probabilities = self.embedder.predict(inputs)
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:  # the model cannot run on this input
            raise ApiError(422, "invalid_example", self._failing_forward(inputs, fields, exc),
                           f"the model cannot run on this example ({type(exc).__name__}: {str(exc)[:300]})") from None
        predicted = predicted.detach().to("cpu")
        if probabilities is not None:
            probabilities = probabilities.detach().to("cpu", torch.float64)
        finite = torch.isfinite(predicted.double()).reshape(predicted.shape[0], -1).all(dim=1)
        if probabilities is not None:
            finite &= torch.isfinite(probabilities).reshape(probabilities.shape[0], -1).all(dim=1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0, 0])
            raise ApiError(422, "non_finite_output", fields[row] if fields else "example",
                           "the model's output is not finite for this example")
        return [self.task.label_to_json(predicted[i]) for i in range(predicted.shape[0])], probabilities

    def _failing_forward(self, inputs, fields: list[str] | None, exc: Exception) -> str:
        """The field of the first example the model cannot run on alone (the batch's first field otherwise)."""
        if not fields:
            return "example"
        if len(fields) > 1:
            from indexer.task import take_rows

            for i, field_name in enumerate(fields):
                try:
                    self.embedder.predict(take_rows(inputs, slice(i, i + 1)))
                except (RuntimeError, ValueError, IndexError, TypeError):
                    return field_name
        return fields[0]

    def _embed(self, inputs, labels, keep_grads: bool, objective, fields: list[str] | None = None) -> dict[str, Any]:
        """The embedding of a batch (vectors, exact self-influence, per-checkpoint parts, gradients when
        kept); a non-finite gradient is a 422 naming the example (`fields[i]`, default "example")."""
        import torch

        from indexer.capture.routes import CaptureError

        try:
            embedding = self.embedder.embed(inputs, labels, keep_grads=keep_grads, objective=objective)
        except CaptureError as exc:
            field_name = "metric" if objective is not None else (fields[0].split(".")[0] if fields else "example")
            raise ApiError(422, "capture_failed", field_name, str(exc)[:500]) from None
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            if objective is None:
                raise
            raise ApiError(422, "invalid_metric", "metric", f"the metric cannot be computed on this model's outputs "
                                                            f"({type(exc).__name__}: {str(exc)[:300]})") from None
        vectors = embedding.vectors.detach().to("cpu")
        self_influence = embedding.self_influence.detach().to("cpu", torch.float64)
        finite = torch.isfinite(vectors).all(dim=1) & torch.isfinite(self_influence)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0, 0])
            raise ApiError(422, "non_finite_gradient", fields[row] if fields else "example",
                           "the gradient of this example is not finite (inputs too large for the model?)")
        return {"vectors": vectors, "self_influence": self_influence, "per_checkpoint": embedding.per_checkpoint,
                "grads": [p.grads for p in embedding.per_checkpoint] if keep_grads else None}

    def _query_checkpoints(self, per_checkpoint, labels, metric, params) -> list[list[dict[str, Any]]]:
        """Per example of the batch: its loss (label used) and metric value at each checkpoint, from the
        outputs the embedding already computed."""
        import torch

        columns = []
        with torch.no_grad():
            for embedder, part in zip(self.embedder.per_checkpoint, per_checkpoint):
                y = labels.to(part.outputs.device) if isinstance(part.outputs, torch.Tensor) else labels
                if y.is_floating_point():
                    y = y.to(embedder.dtype)
                losses = self.task.loss(part.outputs, y).detach().to("cpu", torch.float64).reshape(-1).tolist()
                values = losses if metric.name == "loss" else \
                    metric.value(part.outputs, y, params).detach().to("cpu", torch.float64).reshape(-1).tolist()
                columns.append([{"lr": embedder.checkpoint.lr, "loss": a, "metric": b} for a, b in zip(losses, values)])
        return [list(row) for row in zip(*columns)]

    def influence(self, req: Any, started: float | None = None) -> dict[str, Any]:
        """POST /influence for a validated request model (see service.schemas.make_influence_request): one
        example, a training example, a set or a batch. The stages are in `service.query`.

        score(z, q) = sum_i lr_i grad l(w_i, z) . grad o(w_i, q) with o the query's loss, or minus a
        higher-is-better metric (so that proponents always moved the metric the right way), optionally
        divided by ||g(z)|| (normalize = train) or ||g(z)|| ||g(q)|| (cosine), the exact norms in the
        TracIn metric (sqrt of self-influence). A set's g(q) is the sum (mean) of its members'. The first
        stage ranks by the (normalised) estimate over the whole index; the second re-scores K' candidates
        per end exactly."""
        from service.query import answer_request

        return answer_request(self, req, time.perf_counter() if started is None else started)

    def _prediction(self, predicted: Any, probabilities, row: int = 0) -> dict[str, Any]:
        return {"label": predicted, "label_name": self.label_name(predicted),
                "probabilities": probabilities[row].tolist() if probabilities is not None else None}

    def _add_losses(self, hits: list[dict[str, Any]]) -> None:
        """Each hit's training loss at every checkpoint: recorded at index time (label_review.npy, the
        indexer's forward pass of every checkpoint) or, for an index without it, a forward pass over the
        hits only."""
        rows = np.asarray([self.id_to_row[h["id"]] for h in hits])
        table = self.index_dir.label_review
        with self.stage("losses"):
            if table is not None and "loss" in (table.dtype.names or ()):
                losses = np.asarray(table["loss"][rows], dtype=np.float64).reshape(rows.size, -1).T
            else:
                losses = self.scorer.losses(rows)
        for i, hit in enumerate(hits):
            hit["losses"] = [float(x) for x in losses[:, i]]

    def _hits(self, rows: np.ndarray, scores: np.ndarray, k: int, exclude: set[int] | frozenset = frozenset(),
              terms: dict[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Up to k hits from rows in score order, leaving out `exclude` and non-finite scores; `terms[row]`
        adds the exact fields of a re-ranked row (raw_score, checkpoints, blocks, losses, member_scores)."""
        out = []
        si = self.index_dir.self_influence
        for row, score in zip(rows.tolist(), scores.tolist()):
            if row in exclude or (self.live is not None and not self.live[row]) or not math.isfinite(score):
                continue
            ex = self.examples[row]
            hit = {"id": ex["id"], "score": score, "label": ex["label"], "label_name": self.label_name(ex["label"]),
                   "display": ex.get("display") or {}, "self_influence": float(si[row]),
                   "self_influence_rank": int(self.si_rank[row])}
            if terms is not None and row in terms:
                hit.update(terms[row])
            out.append(hit)
            if len(out) == k:
                break
        return out

    def self_influence_page(self, k: int, offset: int, label: int | str | None) -> dict[str, Any]:
        if label is None:
            order, label_value = self.si_order, None
        else:
            label_value, _ = self.labels.rows(label, "label", ["query", "label"])
            order = self.labels.si_order_by_class[label_value]
        rows = order[offset:offset + k].tolist()
        si = self.index_dir.self_influence
        items = [{"id": self.examples[r]["id"], "score": float(si[r]), "label": self.examples[r]["label"],
                  "label_name": self.label_name(self.examples[r]["label"]),
                  "display": self.examples[r].get("display") or {}, "rank": int(self.si_rank[r])} for r in rows]
        return {"items": items, "total": int(order.size), "offset": offset, "k": k, "label": label_value}

    def self_influence_histogram(self, bins: int, label: int | str | None, scale: str) -> dict[str, Any]:
        """Counts of exact self-influence in `bins` bins (log-spaced from the smallest positive score when
        scale = "log"; scores at or below it fall in the first bin), over all training examples or one
        label, plus per-bin counts of every boolean display field (e.g. `flipped`)."""
        if label is None:
            rows, label_value = self.si_order, None
        else:
            label_value, _ = self.labels.rows(label, "label", ["query", "label"])
            rows = self.labels.si_order_by_class[label_value]
        scores = np.asarray(self.index_dir.self_influence, dtype=np.float64)[rows]
        lo, hi = float(scores.min()), float(scores.max())
        positive = scores[scores > 0]
        use_log = scale == "log" and positive.size > 0 and hi > float(positive.min())
        if use_log:
            lo = float(positive.min())
            edges = np.logspace(np.log10(lo), np.log10(hi), bins + 1)
            position = (np.log10(np.maximum(scores, lo)) - np.log10(lo)) / (np.log10(hi) - np.log10(lo))
        else:
            span = (hi - lo) or 1.0
            edges = lo + span * np.linspace(0.0, 1.0, bins + 1)
            position = (scores - lo) / span
        which = np.clip((position * bins).astype(np.int64), 0, bins - 1)
        counts = np.bincount(which, minlength=bins)
        flagged = {name: np.bincount(which[flags[rows]], minlength=bins).tolist()
                   for name, flags in self.display_flags().items()}
        return {"edges": edges.tolist(), "counts": counts.tolist(), "total": int(rows.size),
                "scale": "log" if use_log else "linear", "label": label_value, "flagged": flagged}

    # -- label review (service.review) -----------------------------------------------------------
    def _review_rows(self, ranking: str | None, label: int | str | None) -> tuple[str, int | None, np.ndarray]:
        """(ranking, label filter's class id, rows most suspicious first) for the label-review routes."""
        name = self.review.ranking(ranking)
        if label is None:
            return name, None, self.review.order(name)
        label_value, rows = self.labels.rows(label, "label", ["query", "label"])
        return name, label_value, self.review.order(name, label_value, rows)

    def label_review_page(self, ranking: str | None, k: int, offset: int, label: int | str | None) -> dict[str, Any]:
        """GET /label-review: a page of training examples by `ranking` (None: the default), most suspicious
        first, each with the prediction, its probability and the suggested label."""
        name, label_value, order = self._review_rows(ranking, label)
        items = [self.review.item(self, r, name) for r in order[offset:offset + k].tolist()]
        return {"items": items, "total": int(order.size), "offset": offset, "k": k, "label": label_value,
                **self.review.describe(name)}

    def label_review_histogram(self, ranking: str | None, bins: int, label: int | str | None,
                               scale: str) -> dict[str, Any]:
        from service.review import histogram

        name, label_value, order = self._review_rows(ranking, label)
        out = histogram(self.review.scores[name], bins, scale, self.review.describe(name)["order"],
                        self.display_flags(), order)
        return {**out, "label": label_value, "ranking": name}

    def label_review_export(self, ranking: str | None, label: int | str | None,
                            limit: int | None) -> tuple[str, list[dict[str, Any]]]:
        """(ranking, the rows of GET /label-review/export, most suspicious first, at most `limit`)."""
        from service.review import export_rows

        name, _, order = self._review_rows(ranking, label)
        if limit is not None:
            order = order[:limit]
        return name, export_rows(self, self.review, name, order)

    def display_flags(self) -> dict[str, np.ndarray]:
        """Boolean display fields present on every training example, as [N] masks (cached)."""
        return self.examples.flags  # collected when the examples table was opened

    def example_info(self, example_id: str) -> dict[str, Any]:
        row = self.row_of(example_id, "id", status=404, loc=["path", "id"])
        ex = self.examples[row]
        return {"id": ex["id"], "row": row, "label": ex["label"], "label_name": self.label_name(ex["label"]),
                "display": ex.get("display") or {}, "self_influence": float(self.index_dir.self_influence[row]),
                "rank": int(self.si_rank[row])}

    def queries_page(self, offset: int, limit: int, predictions: bool = False) -> dict[str, Any]:
        """A page of the held-out examples; with `predictions`, each with the model's prediction at the last
        checkpoint (a forward pass over the page; None for an example the task cannot encode)."""
        page = self.queries[offset:offset + limit]
        items = [{"id": str(q.get("id")), "label": q.get("label"), "example": q.get("example"),
                  "display": q.get("display") or {}} for q in page]
        if predictions and items:
            with self.stage("predict"):
                for item, prediction in zip(items, self._query_predictions(page)):
                    item["prediction"] = prediction
        return {"items": items, "total": len(self.queries), "offset": offset, "limit": limit}

    def _query_predictions(self, queries: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
        out: list[dict[str, Any] | None] = [None] * len(queries)
        valid, at = [], []
        for i, q in enumerate(queries):
            try:
                valid.append(self.task.example_schema.model_validate(q.get("example")))
                at.append(i)
            except Exception:  # noqa: BLE001 - a stored example that does not fit: no prediction
                continue
        for start in range(0, len(valid), 256):
            part = valid[start:start + 256]
            try:
                predicted, probabilities = self._predict(self.task.encode(part))
            except (ApiError, ValueError, TypeError, IndexError, KeyError, RuntimeError):
                continue
            for j, p in enumerate(predicted):
                out[at[start + j]] = self._prediction(p, probabilities, j)
        return out

    def index_info(self) -> dict[str, Any]:
        m = self.index_dir.manifest
        faiss_info = dict(m.get("faiss", {}))
        faiss_info["search_params_in_use"] = self.first_stage.params
        from service.reload import version_info

        return {
            "path": self.index_dir.path.resolve().name,  # the name only: the server's file layout is not shown
            "version": version_info(self),
            "task": {"ref": m["task"]["ref"], "args": m["task"].get("args") or {}},
            "class_names": self.labels.class_names,
            "label_kind": self.labels.kind,
            "count": self.count,
            "embedding_dim": int(m["embedding_dim"]),
            "approximate": self.approximate,
            "faiss": faiss_info,
            "projection": {k: v for k, v in m["projection"].items()},
            "checkpoints": [{"file": c["file"], "lr": c["lr"], "sha256": c["sha256"],
                             "formula": (c.get("step") or {}).get("formula", "sgd"),
                             "groups": [{"lr": g["lr"], "params": len(g["params"])}
                                        for g in (c.get("step") or {}).get("groups", [])]}
                            for c in m["checkpoints"]],
            "optimizer": m.get("optimizer") or {"formula": "sgd", "why": "an index built before optimizer-aware "
                                                                        "TracIn: one lr per checkpoint"},
            "layers": m.get("layers", []),
            "queries": len(self.queries),
            "created_at": m.get("created_at"),
            "versions": {str(k): str(v) for k, v in (m.get("versions") or {}).items()},
            "mmap": self.settings.mmap,
            "max_k": self.settings.max_k,
            "metrics": [{"name": m.name, "description": m.description, "higher_is_better": m.higher_is_better,
                         "params": m.params.model_json_schema() if m.params is not None else None}
                        for m in self.metrics.values()],
            "rerank": {"available": self.scorer is not None, "default": self.settings.rerank if self.scorer else 0,
                       "max": self.settings.max_rerank if self.scorer else 0, "reason": self.rerank_error},
            "example_schema": self.task.example_schema.model_json_schema(),
        }

    def warm_up(self) -> None:
        """One query through every stage, so the first real request does not pay for lazy init."""
        from types import SimpleNamespace

        example = next((q.get("example") for q in self.queries if q.get("example") is not None), None)
        if example is not None:
            try:
                validated = self.task.example_schema.model_validate(example)
            except Exception as exc:  # noqa: BLE001
                raise ServiceStartupError(f"{self.index_dir.path}: the stored held-out example "
                                          f"{self.queries[0].get('id')!r} does not fit the task's example_schema: "
                                          f"{exc}") from None
            req = SimpleNamespace(example=validated, train_id=None, label=None, filter_label=None, k=10,
                                  exclude_self=False, include_embedding=False, rerank=None)
        elif self.first_stage.reconstruct_error is None or self.scorer is not None:
            first = int(self.si_order[0]) if self.si_order.size else 0  # a row served (not one marked removed)
            req = SimpleNamespace(example=None, train_id=self.examples[first]["id"], label=None, filter_label=None,
                                  k=10, exclude_self=False, include_embedding=False, rerank=None)
        else:
            return
        try:
            self.influence(req)
        except ApiError as exc:
            raise ServiceStartupError(f"{self.index_dir.path}: a warm-up query failed: {exc.field}: {exc.message}") \
                from None


