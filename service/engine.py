"""The loaded index and the query logic, without HTTP: what the routes call (in a worker thread).

`Engine.influence` answers POST /influence in two stages: the query is embedded with the indexer's own
embedding function (`indexer.embedding.Embedder`), the FAISS index proposes candidates
(`service.first_stage`), and, unless re-ranking is off, their exact TracIn scores are recomputed from
the training examples (`indexer.exact.ExactScorer`) and decide the answer. No gradient or projection
math lives here. Loading and verification are in `service.loading`, labels in `service.labels`.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import ApiError, ServiceStartupError
from service.first_stage import FirstStage, _ends
from service.labels import Labels
from service.ood import input_warnings
from service.settings import Settings


@dataclass
class Engine:
    settings: Settings
    index_dir: Any  # indexer.store.IndexDirectory
    task: Any  # indexer.task.Task
    embedder: Any  # indexer.embedding.Embedder
    labels: Labels
    first_stage: FirstStage
    scorer: Any  # indexer.exact.ExactScorer, or None when exact re-ranking is unavailable
    rerank_error: str | None  # why re-ranking is unavailable
    id_to_row: dict[str, int]
    si_order: np.ndarray  # rows by descending self-influence
    si_rank: np.ndarray  # 1-based rank of each row
    load_seconds: float = 0.0
    metrics: Any = None
    _display_flags: dict[str, np.ndarray] | None = None
    review: Any = None  # service.review.LabelReview: the label-review rankings
    input_ranges: Any = None  # indexer.input_ranges.InputRanges, or None (an index built before them)

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
            if self.metrics is not None:
                self.metrics.stage.labels(name).observe(time.perf_counter() - t0)

    def row_of(self, example_id: str, field_name: str, status: int = 422, loc: list | None = None) -> int:
        row = self.id_to_row.get(example_id)
        if row is None:
            raise ApiError(status, "unknown_id", field_name, "no training example has this id", loc, echo=example_id)
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
    def embed_examples(self, examples: list[Any], labels: list[Any] | None = None,
                       keep_grads: bool = False) -> dict[str, Any]:
        """Encode validated examples, predict, embed with `labels` (JSON form; default: the predictions).

        The vectors come from the indexer's `Embedder.embed`, the function that built the index; with
        `keep_grads` the per-checkpoint block gradients come back too (for exact re-ranking)."""
        import torch

        try:
            inputs = self.task.encode(examples)
        except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as exc:
            raise ApiError(422, "invalid_example", "example", f"the task cannot encode this example: {exc}") from None
        with self.stage("predict"):
            predicted, probabilities = self.embedder.predict(inputs)
        predicted = predicted.detach().to("cpu")
        if probabilities is not None:
            probabilities = probabilities.detach().to("cpu", torch.float64)
        finite = bool(torch.isfinite(predicted.double()).all()) and (
            probabilities is None or bool(torch.isfinite(probabilities).all()))
        if not finite:
            raise ApiError(422, "non_finite_output", "example", "the model's output is not finite for this example")
        predictions = [self.task.label_to_json(predicted[i]) for i in range(predicted.shape[0])]
        if labels is None:
            used = predictions
        else:
            used = labels
            classes = int(probabilities.shape[-1]) if probabilities is not None and probabilities.dim() > 1 else None
            self.labels.check_for_model(used, classes)
        with self.stage("embed"):
            embedding = self.embedder.embed(inputs, self.task.labels_tensor(used), keep_grads=keep_grads)
        vectors = embedding.vectors.detach().to("cpu")
        self_influence = embedding.self_influence.detach().to("cpu", torch.float64)
        if not (bool(torch.isfinite(vectors).all()) and bool(torch.isfinite(self_influence).all())):
            raise ApiError(422, "non_finite_gradient", "example",
                           "the loss gradient of this example is not finite (inputs too large for the model?)")
        grads = [p.grads for p in embedding.per_checkpoint] if keep_grads else None
        return {"vectors": vectors, "self_influence": self_influence, "predicted": predictions,
                "probabilities": probabilities, "labels": used, "grads": grads}

    def influence(self, req: Any, started: float | None = None) -> dict[str, Any]:
        """POST /influence for a validated request model (see service.schemas.make_influence_request)."""
        import torch

        started = time.perf_counter() if started is None else started
        if (req.example is None) == (req.train_id is None):
            raise ApiError(422, "invalid", "example", "give exactly one of `example` or `train_id`")
        rows = None
        if req.filter_label is not None:
            _, rows = self.labels.rows(req.filter_label, "filter_label")
        depth = self.rerank_depth(req)
        query: dict[str, Any] = {"train_id": None, "self_influence": None, "embedding": None}
        self_row, grads = None, None
        if req.train_id is not None:
            if req.label is not None:
                raise ApiError(422, "invalid", "label", "cannot be combined with train_id: the stored vector was "
                                                        "computed with the training label")
            self_row = self.row_of(req.train_id, "train_id")
            label_used = self.examples[self_row]["label"]
            prediction = None
            query.update(train_id=req.train_id, self_influence=float(self.index_dir.self_influence[self_row]))
            if depth > 0:  # its gradients, recomputed from the training example (also its first-stage vector)
                inputs, labels = self.scorer.rows_of(np.asarray([self_row]))
                with self.stage("embed"):
                    embedding = self.embedder.embed(inputs, labels, keep_grads=True)
                vector = embedding.vectors[0].detach().to("cpu", torch.float32).numpy()
                grads = [p.grads for p in embedding.per_checkpoint]
            else:
                if self.first_stage.reconstruct_error is not None:
                    raise ApiError(422, "unsupported", "train_id", self.first_stage.reconstruct_error)
                with self.stage("lookup"):
                    vector = self.first_stage.reconstruct(self_row)
        else:
            label = self.labels.parse(req.label, "label") if req.label is not None else None
            out = self.embed_examples([req.example], None if label is None else [label], keep_grads=depth > 0)
            vector = out["vectors"][0].to(torch.float32).numpy()  # as the indexer stores it (any model dtype)
            grads = out["grads"]
            label_used = out["labels"][0]
            predicted = out["predicted"][0]
            probabilities = out["probabilities"]
            prediction = {"label": predicted, "label_name": self.label_name(predicted),
                          "probabilities": probabilities[0].tolist() if probabilities is not None else None}
            query["self_influence"] = float(out["self_influence"][0])
        if req.include_embedding:
            query["embedding"] = vector.astype(np.float64).tolist()

        k = int(req.k)
        skip = self_row if (bool(req.exclude_self) and self_row is not None) else None
        extra = 1 if skip is not None else 0
        width = max(k, depth) + extra
        with self.stage("search"):
            (pro_rows, pro_scores), (opp_rows, opp_scores) = self.first_stage.search(vector, width,
                                                                                     max(k, depth), rows)
        contributions = None
        if depth > 0:
            candidates = np.unique(np.concatenate([pro_rows[:depth + extra], opp_rows[:depth]]))
            if skip is not None:
                candidates = candidates[candidates != skip]
            with self.stage("rerank"):
                exact = self.scorer.scores(grads, candidates)
            (pro_at, pro_scores), (opp_at, opp_scores) = _ends(exact.total, k, 1), _ends(exact.total, k, -1)
            pro_rows, opp_rows = candidates[pro_at], candidates[opp_at]
            contributions = {int(r): exact.per_checkpoint[:, i] for i, r in enumerate(candidates.tolist())}
            pro_scores = exact.total[pro_at]
            opp_scores = exact.total[opp_at]
            brief = {"depth": depth, "candidates": int(candidates.size)}
        else:
            brief = None
        proponents = self._hits(pro_rows, pro_scores, k, skip, contributions)
        opponents = self._hits(opp_rows, opp_scores, k, None, contributions)
        return {
            "prediction": prediction,
            "label_used": label_used,
            "label_used_name": self.label_name(label_used),
            "query": query,
            "proponents": proponents,
            "opponents": opponents,
            "exact": depth > 0 or self.exact_index,
            "rerank": brief,
            "index": {"approximate": self.approximate, "count": self.count,
                      "candidates": int(rows.size) if rows is not None else self.count},
            "took_ms": round((time.perf_counter() - started) * 1000.0, 3),
            "warnings": input_warnings(self, req),
        }

    def _hits(self, rows: np.ndarray, scores: np.ndarray, k: int, skip: int | None,
              contributions: dict[int, np.ndarray] | None = None) -> list[dict[str, Any]]:
        out = []
        for row, score in zip(rows.tolist(), scores.tolist()):
            if skip is not None and row == skip:
                continue
            if not math.isfinite(score):
                continue
            ex = self.examples[row]
            hit = {"id": ex["id"], "score": score, "label": ex["label"], "label_name": self.label_name(ex["label"]),
                   "display": ex.get("display") or {}}
            if contributions is not None:
                hit["checkpoints"] = [float(x) for x in contributions[row]]
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
        if self._display_flags is None:
            names = {k for k, v in (self.examples[0].get("display") or {}).items() if isinstance(v, bool)}
            flags = {}
            for name in sorted(names):
                values = [(ex.get("display") or {}).get(name) for ex in self.examples]
                if all(isinstance(v, bool) for v in values):
                    flags[name] = np.asarray(values, dtype=bool)
            self._display_flags = flags
        return self._display_flags

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
        return {
            "path": self.index_dir.path.resolve().name,  # the name only: the server's file layout is not shown
            "task": {"ref": m["task"]["ref"], "args": m["task"].get("args") or {}},
            "class_names": self.labels.class_names,
            "label_kind": self.labels.kind,
            "count": self.count,
            "embedding_dim": int(m["embedding_dim"]),
            "approximate": self.approximate,
            "faiss": faiss_info,
            "projection": {k: v for k, v in m["projection"].items()},
            "checkpoints": [{"file": c["file"], "lr": c["lr"], "sha256": c["sha256"]} for c in m["checkpoints"]],
            "layers": m.get("layers", []),
            "queries": len(self.queries),
            "created_at": m.get("created_at"),
            "versions": {str(k): str(v) for k, v in (m.get("versions") or {}).items()},
            "mmap": self.settings.mmap,
            "max_k": self.settings.max_k,
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
            req = SimpleNamespace(example=None, train_id=self.examples[0]["id"], label=None, filter_label=None,
                                  k=10, exclude_self=False, include_embedding=False, rerank=None)
        else:
            return
        try:
            self.influence(req)
        except ApiError as exc:
            raise ServiceStartupError(f"{self.index_dir.path}: a warm-up query failed: {exc.field}: {exc.message}") \
                from None


