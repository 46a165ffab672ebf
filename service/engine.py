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
from service.first_stage import FirstStage, _ends
from service.labels import Labels
from service.ood import input_warnings
from service.settings import Settings


def _inverse_norms(self_influence: np.ndarray) -> np.ndarray:
    """1 / ||g(z)|| in the TracIn metric (float64; 0 where the gradient is 0)."""
    norms = np.sqrt(np.asarray(self_influence, dtype=np.float64))
    return np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)


def _float32():
    import torch

    return torch.float32


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
                       objective=None) -> dict[str, Any]:
        """Encode validated examples, predict, embed with `labels` (JSON form; default: the predictions).

        The vectors come from the indexer's `Embedder.embed`, the function that built the index; with
        `keep_grads` the per-checkpoint block gradients come back too (for exact re-ranking); `objective`
        replaces the task's loss on the query side (a metric, `indexer.score.metrics`)."""

        try:
            inputs = self.task.encode(examples)
        except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as exc:
            raise ApiError(422, "invalid_example", "example", f"the task cannot encode this example: {exc}") from None
        with self.stage("predict"):
            predictions, probabilities = self._predict(inputs)
        if labels is None:
            used = predictions
        else:
            used = labels
            classes = int(probabilities.shape[-1]) if probabilities is not None and probabilities.dim() > 1 else None
            self.labels.check_for_model(used, classes)
        with self.stage("embed"):
            embedding = self._embed(inputs, self.task.labels_tensor(used), keep_grads, objective)
        return {**embedding, "predicted": predictions, "probabilities": probabilities, "labels": used,
                "inputs": inputs}

    def _predict(self, inputs) -> tuple[list[Any], Any]:
        """(predictions as JSON labels, probabilities float64 or None) at the last checkpoint."""
        import torch

        predicted, probabilities = self.embedder.predict(inputs)
        predicted = predicted.detach().to("cpu")
        if probabilities is not None:
            probabilities = probabilities.detach().to("cpu", torch.float64)
        finite = bool(torch.isfinite(predicted.double()).all()) and (
            probabilities is None or bool(torch.isfinite(probabilities).all()))
        if not finite:
            raise ApiError(422, "non_finite_output", "example", "the model's output is not finite for this example")
        return [self.task.label_to_json(predicted[i]) for i in range(predicted.shape[0])], probabilities

    def _embed(self, inputs, labels, keep_grads: bool, objective) -> dict[str, Any]:
        import torch

        from indexer.capture.routes import CaptureError

        try:
            embedding = self.embedder.embed(inputs, labels, keep_grads=keep_grads, objective=objective)
        except CaptureError as exc:
            field_name = "metric" if objective is not None else "example"
            raise ApiError(422, "capture_failed", field_name, str(exc)[:500]) from None
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            if objective is None:
                raise
            raise ApiError(422, "invalid_metric", "metric", f"the metric cannot be computed on this model's outputs "
                                                            f"({type(exc).__name__}: {str(exc)[:300]})") from None
        vectors = embedding.vectors.detach().to("cpu")
        self_influence = embedding.self_influence.detach().to("cpu", torch.float64)
        if not (bool(torch.isfinite(vectors).all()) and bool(torch.isfinite(self_influence).all())):
            raise ApiError(422, "non_finite_gradient", "example",
                           "the gradient of this example is not finite (inputs too large for the model?)")
        return {"vectors": vectors, "self_influence": self_influence, "per_checkpoint": embedding.per_checkpoint,
                "grads": [p.grads for p in embedding.per_checkpoint] if keep_grads else None}

    def _query_checkpoints(self, per_checkpoint, labels, metric, params) -> list[dict[str, Any]]:
        """The query's loss (label used) and metric value at each checkpoint, from the outputs the
        embedding already computed."""
        import torch

        out = []
        with torch.no_grad():
            for embedder, part in zip(self.embedder.per_checkpoint, per_checkpoint):
                y = labels.to(part.outputs.device) if isinstance(part.outputs, torch.Tensor) else labels
                if y.is_floating_point():
                    y = y.to(embedder.dtype)
                loss = float(self.task.loss(part.outputs, y)[0])
                value = loss if metric.name == "loss" else float(metric.value(part.outputs, y, params)[0])
                out.append({"lr": embedder.checkpoint.lr, "loss": loss, "metric": value})
        return out

    def influence(self, req: Any, started: float | None = None) -> dict[str, Any]:
        """POST /influence for a validated request model (see service.schemas.make_influence_request).

        score(z, q) = sum_i lr_i grad l(w_i, z) . grad o(w_i, q) with o the query's loss, or minus a
        higher-is-better metric (so that proponents always moved the metric the right way), optionally
        divided by ||g(z)|| (normalize = train) or ||g(z)|| ||g(q)|| (cosine), the exact norms in the
        TracIn metric (sqrt of self-influence). The first stage ranks by the (normalised) estimate over
        the whole index; the second re-scores K' candidates per end exactly."""
        started = time.perf_counter() if started is None else started
        if (req.example is None) == (req.train_id is None):
            raise ApiError(422, "invalid", "example", "give exactly one of `example` or `train_id`")
        metric, params = self.resolve_metric(getattr(req, "metric", None))
        objective = None if metric.name == "loss" else metric.objective(params)
        normalize = getattr(req, "normalize", None) or "none"
        if normalize != "none" and not self.first_stage.can_normalize:
            raise ApiError(422, "unsupported", "normalize", "this index has no normalised first stage (an "
                                                            "approximate index built by an older version): rebuild it")
        rows = None
        if req.filter_label is not None:
            _, rows = self.labels.rows(req.filter_label, "filter_label")
        depth = self.rerank_depth(req)
        query: dict[str, Any] = {"train_id": None, "self_influence": None, "embedding": None, "checkpoints": None}
        self_row, grads, prediction = None, None, None
        if req.train_id is not None:
            if req.label is not None:
                raise ApiError(422, "invalid", "label", "cannot be combined with train_id: a training example is "
                                                        "explained with its training label")
            self_row = self.row_of(req.train_id, "train_id")
            label_used = self.examples[self_row]["label"]
            query["train_id"] = req.train_id
            if self.scorer is not None:
                inputs, labels = self.scorer.rows_of(np.asarray([self_row]))
                with self.stage("predict"):
                    predictions, probabilities = self._predict(inputs)
                prediction = self._prediction(predictions[0], probabilities)
            if depth > 0 or objective is not None:  # its gradients, recomputed from the training example
                if self.scorer is None:
                    raise ApiError(422, "unsupported", "metric", f"a metric on a training example needs its "
                                                                 f"gradient: {self.rerank_error}")
                with self.stage("embed"):
                    emb = self._embed(inputs, labels, depth > 0, objective)
                vector = emb["vectors"][0].to(dtype=_float32()).numpy()
                grads = emb["grads"]
                query["self_influence"] = float(emb["self_influence"][0])
                query["checkpoints"] = self._query_checkpoints(emb["per_checkpoint"], labels, metric, params)
            else:
                if self.first_stage.reconstruct_error is not None:
                    raise ApiError(422, "unsupported", "train_id", self.first_stage.reconstruct_error)
                with self.stage("lookup"):
                    vector = self.first_stage.reconstruct(self_row)
                query["self_influence"] = float(self.index_dir.self_influence[self_row])
        else:
            label = self.labels.parse(req.label, "label") if req.label is not None else None
            out = self.embed_examples([req.example], None if label is None else [label], depth > 0, objective)
            vector = out["vectors"][0].to(dtype=_float32()).numpy()  # as the indexer stores it (any model dtype)
            grads = out["grads"]
            label_used = out["labels"][0]
            prediction = self._prediction(out["predicted"][0], out["probabilities"])
            query["self_influence"] = float(out["self_influence"][0])
            query["checkpoints"] = self._query_checkpoints(out["per_checkpoint"], self.task.labels_tensor(out["labels"]),
                                                           metric, params)
        if req.include_embedding:
            query["embedding"] = vector.astype(np.float64).tolist()

        q_norm = float(np.sqrt(max(query["self_influence"] or 0.0, 0.0)))
        q_scale = (1.0 / q_norm if q_norm > 0 else 0.0) if normalize == "cosine" else 1.0
        k = int(req.k)
        skip = self_row if (bool(req.exclude_self) and self_row is not None) else None
        extra = 1 if skip is not None else 0
        with self.stage("search"):
            (pro_rows, pro_scores), (opp_rows, opp_scores) = self.first_stage.search(
                vector, max(k, depth) + extra, max(k, depth), rows, normalized=normalize != "none")
        pro_scores, opp_scores = pro_scores * q_scale, opp_scores * q_scale
        contributions, losses, raw = None, None, None
        if depth > 0:
            candidates = np.unique(np.concatenate([pro_rows[:depth + extra], opp_rows[:depth]]))
            if skip is not None:
                candidates = candidates[candidates != skip]
            with self.stage("rerank"):
                exact = self.scorer.scores(grads, candidates)
            weight = (_inverse_norms(self.index_dir.self_influence[candidates]) if normalize != "none"
                      else np.ones(candidates.size)) * q_scale
            scores = exact.total * weight
            (pro_at, pro_scores), (opp_at, opp_scores) = _ends(scores, k, 1), _ends(scores, k, -1)
            pro_scores, opp_scores = scores[pro_at], scores[opp_at]
            pro_rows, opp_rows = candidates[pro_at], candidates[opp_at]
            at = {int(r): i for i, r in enumerate(candidates.tolist())}
            contributions = {r: exact.per_checkpoint[:, i] * weight[i] for r, i in at.items()}
            losses = {r: exact.losses[:, i] for r, i in at.items()}
            raw = {r: float(exact.total[i]) for r, i in at.items()}
            brief = {"depth": depth, "candidates": int(candidates.size)}
        else:
            brief = None
        proponents = self._hits(pro_rows, pro_scores, k, skip, contributions, losses, raw)
        opponents = self._hits(opp_rows, opp_scores, k, None, contributions, losses, raw)
        can_add = self.scorer is not None or self.index_dir.label_review is not None
        if losses is None and can_add and (proponents or opponents):
            self._add_losses(proponents + opponents)
        return {
            "prediction": prediction,
            "label_used": label_used,
            "label_used_name": self.label_name(label_used),
            "metric": {"name": metric.name, "params": params.model_dump() if params is not None else None,
                       "higher_is_better": metric.higher_is_better},
            "normalize": normalize,
            "query": query,
            "proponents": proponents,
            "opponents": opponents,
            "exact": depth > 0 or (self.exact_index and metric.name == "loss" and normalize == "none"),
            "rerank": brief,
            "index": {"approximate": self.approximate, "count": self.count,
                      "candidates": int(rows.size) if rows is not None else self.count},
            "took_ms": round((time.perf_counter() - started) * 1000.0, 3),
            "warnings": input_warnings(self, req),
        }

    def _prediction(self, predicted: Any, probabilities) -> dict[str, Any]:
        return {"label": predicted, "label_name": self.label_name(predicted),
                "probabilities": probabilities[0].tolist() if probabilities is not None else None}

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

    def _hits(self, rows: np.ndarray, scores: np.ndarray, k: int, skip: int | None,
              contributions: dict[int, np.ndarray] | None = None, losses: dict[int, np.ndarray] | None = None,
              raw: dict[int, float] | None = None) -> list[dict[str, Any]]:
        out = []
        si = self.index_dir.self_influence
        for row, score in zip(rows.tolist(), scores.tolist()):
            if (skip is not None and row == skip) or (self.live is not None and not self.live[row]):
                continue
            if not math.isfinite(score):
                continue
            ex = self.examples[row]
            hit = {"id": ex["id"], "score": score, "label": ex["label"], "label_name": self.label_name(ex["label"]),
                   "display": ex.get("display") or {}, "self_influence": float(si[row]),
                   "self_influence_rank": int(self.si_rank[row])}
            if raw is not None:
                hit["raw_score"] = raw[row]
            if contributions is not None:
                hit["checkpoints"] = [float(x) for x in contributions[row]]
            if losses is not None:
                hit["losses"] = [float(x) for x in losses[row]]
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

    def queries_page(self, offset: int, limit: int) -> dict[str, Any]:
        items = [{"id": str(q.get("id")), "label": q.get("label"), "example": q.get("example"),
                  "display": q.get("display") or {}} for q in self.queries[offset:offset + limit]]
        return {"items": items, "total": len(self.queries), "offset": offset, "limit": limit}

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


