"""The loaded index and the query logic, without HTTP: what the routes call (in a worker thread).

`load_engine(settings)` opens and verifies the index directory once (manifest, checkpoints kept in
memory, projection, FAISS index, self-influence order, examples table) and refuses with a
`ServiceStartupError` naming the problem. `Engine.influence` embeds a query with the indexer's own
embedding function (`indexer.embedding.Embedder`) and searches the FAISS index with
`indexer.search.top_k`; no gradient or projection math lives here.
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import ApiError
from service.settings import Settings

log = logging.getLogger("service")

PARALLEL_SCAN_FLOATS = 1 << 22  # Flat indexes above 16 MB are scanned in parallel row blocks


class ServiceStartupError(RuntimeError):
    """The index directory cannot be served; the message says why."""


def configure_threads(settings: Settings) -> None:
    """torch intra-op threads for the machine (one request's backward is small: more threads than CPUs
    only add contention); FAISS OpenMP threads when configured."""
    import torch

    torch.set_num_threads(settings.effective_torch_threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass
    if settings.faiss_threads:
        import faiss

        faiss.omp_set_num_threads(settings.faiss_threads)


TASK_FIELD = "manifest task.ref"


def open_task(settings: Settings):
    """Rebuild only the Task from the manifest (light: for the request schema at app creation).

    The manifest is checked against manifest.sha256 and validated (`indexer.manifest`) before its task
    reference is used; the reference must resolve to a Task subclass (type-checked before the one call
    that constructs it) from a module outside the index directory."""
    from indexer.config import ConfigError, TaskRef
    from indexer.manifest import ManifestError, read_manifest

    path = _index_path(settings)
    try:
        manifest, _ = read_manifest(path)
    except (ManifestError, OSError) as exc:
        raise ServiceStartupError(str(exc)) from None
    try:
        task = TaskRef(manifest.task.ref, dict(manifest.task.args)).build(TASK_FIELD, forbidden_dir=path)
    except ConfigError as exc:
        raise ServiceStartupError(f"{path}: cannot rebuild the task: {exc}") from None
    _check_schema(task, path)
    return task


def _index_path(settings: Settings) -> Path:
    if settings.index_dir is None:
        raise ServiceStartupError("no index directory: set TRACIN_INDEX_DIR or run `tracin serve DIR`")
    path = Path(settings.index_dir).expanduser()
    if not path.is_dir():
        raise ServiceStartupError(f"{path}: no such index directory")
    return path


def _check_schema(task, path: Path) -> None:
    from pydantic import BaseModel

    schema = getattr(task, "example_schema", None)
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        raise ServiceStartupError(f"{path}: task {type(task).__name__} has no example_schema (a pydantic model of "
                                  "one JSON example); the service cannot accept queries for it")


@dataclass
class Engine:
    settings: Settings
    index_dir: Any  # indexer.store.IndexDirectory
    task: Any  # indexer.task.Task
    embedder: Any  # indexer.embedding.Embedder
    search_params: dict[str, Any]
    labels: np.ndarray | None  # int64 [N] class ids (class tasks); None for regression / multi-label
    id_to_row: dict[str, int]
    si_order: np.ndarray  # rows by descending self-influence
    si_rank: np.ndarray  # 1-based rank of each row
    rows_by_label: dict[int, np.ndarray]
    si_order_by_label: dict[int, np.ndarray]
    num_classes: int | None
    reconstruct_error: str | None
    load_seconds: float = 0.0
    metrics: Any = None
    class_names: list[str] | None = field(default=None)
    flat_vectors: np.ndarray | None = None  # exact Flat index: a view of the stored vectors (one-pass search)
    search_pool: Any = None  # threads for block-parallel Flat scans and for searching q and -q at once
    _display_flags: dict[str, np.ndarray] | None = None
    gpu_index: Any = None  # a faiss-gpu copy for unfiltered searches (label filters stay on the CPU index)
    label_kind: str = "class"  # "class" | "multilabel" | "regression" (manifest task.label_kind)
    label_width: int = 0  # numbers per label row (0: one number)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return self.index_dir.count

    @property
    def approximate(self) -> bool:
        return self.index_dir.approximate

    @property
    def examples(self) -> list[dict[str, Any]]:
        return self.index_dir.examples

    @property
    def queries(self) -> list[dict[str, Any]]:
        return self.index_dir.queries

    def label_name(self, label: Any) -> str:
        return self.task.label_name(label)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.metrics is not None:
                self.metrics.stage.labels(name).observe(time.perf_counter() - t0)

    # -- input checks --------------------------------------------------------------------------
    def parse_label(self, value: Any, field_name: str, loc: list | None = None) -> Any:
        """A query label in the JSON form the task's loss takes (class id, target value(s), label vector)."""
        if self.label_kind != "class":
            try:
                return self.task.parse_label(value, self.label_width)
            except ValueError as exc:  # the task's message may quote the value: it is quoted once, cut, by ApiError
                message = str(exc).replace(f" {value!r}", "").replace(repr(value), "this label")[:300]
                raise ApiError(422, "invalid_label", field_name, message, loc, echo=value) from None
        return self.class_id(value, field_name, loc)

    def class_id(self, value: Any, field_name: str, loc: list | None = None) -> int:
        """An integer class id or a class name -> the class id (class and multi-label tasks)."""
        names = list(self.class_names) if self.class_names is not None else None
        if isinstance(value, str) and names is not None and value in names:
            label = names.index(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            label = value
        elif isinstance(value, str) and value.lstrip("-").isdigit():
            label = int(value)
        else:
            raise ApiError(422, "unknown_label", field_name,
                           "unknown label: give a class id" + (f" or one of {names[:20]}" if names else ""), loc,
                           echo=value)
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise ApiError(422, "unknown_label", field_name, f"label is out of range 0..{self.num_classes - 1}", loc,
                           echo=value)
        return label

    def label_rows(self, value: int | str, field_name: str, loc: list | None = None) -> tuple[int, np.ndarray]:
        """(class id, training rows with that label) for a label filter; 422 where filters do not apply."""
        if self.label_kind == "regression":
            raise ApiError(422, "unsupported", field_name, "this task's labels are regression targets: label "
                                                           "filters apply to class and multi-label tasks only", loc)
        label = self.class_id(value, field_name, loc)
        rows = self.rows_by_label.get(label)
        if rows is None or rows.size == 0:
            raise ApiError(422, "no_examples", field_name,
                           f"no training example has label {self.label_name(self._class_label(label))!r}", loc)
        return label, rows

    def _class_label(self, class_id: int) -> Any:
        """The JSON label meaning "class c" (a one-hot vector for multi-label tasks), for display."""
        if self.label_kind == "multilabel" and self.label_width:
            return [1 if i == class_id else 0 for i in range(self.label_width)]
        return class_id

    def row_of(self, example_id: str, field_name: str, status: int = 422, loc: list | None = None) -> int:
        row = self.id_to_row.get(example_id)
        if row is None:
            raise ApiError(status, "unknown_id", field_name, "no training example has this id", loc, echo=example_id)
        return row

    # -- queries -------------------------------------------------------------------------------
    def embed_examples(self, examples: list[Any], labels: list[Any] | None = None) -> dict[str, Any]:
        """Encode validated examples, predict, embed with `labels` (JSON form; default: the predictions).

        The vectors come from the indexer's `Embedder.embed`, the function that built the index."""
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
            if self.label_kind == "class" and classes is not None:
                for label in used:
                    if not 0 <= label < classes:
                        raise ApiError(422, "unknown_label", "label",
                                       f"label {label} is out of range 0..{classes - 1} for this model")
        with self.stage("embed"):
            embedding = self.embedder.embed(inputs, self.task.labels_tensor(used))
        vectors = embedding.vectors.detach().to("cpu")
        self_influence = embedding.self_influence.detach().to("cpu", torch.float64)
        if not (bool(torch.isfinite(vectors).all()) and bool(torch.isfinite(self_influence).all())):
            raise ApiError(422, "non_finite_gradient", "example",
                           "the loss gradient of this example is not finite (inputs too large for the model?)")
        return {"vectors": vectors, "self_influence": self_influence, "predicted": predictions,
                "probabilities": probabilities, "labels": used}

    def influence(self, req: Any, started: float | None = None) -> dict[str, Any]:
        """POST /influence for a validated request model (see service.schemas.make_influence_request)."""
        import torch

        started = time.perf_counter() if started is None else started
        if (req.example is None) == (req.train_id is None):
            raise ApiError(422, "invalid", "example", "give exactly one of `example` or `train_id`")
        rows = None
        if req.filter_label is not None:
            _, rows = self.label_rows(req.filter_label, "filter_label")
        query: dict[str, Any] = {"train_id": None, "self_influence": None, "embedding": None}
        self_row = None
        if req.train_id is not None:
            if req.label is not None:
                raise ApiError(422, "invalid", "label", "cannot be combined with train_id: the stored vector was "
                                                        "computed with the training label")
            self_row = self.row_of(req.train_id, "train_id")
            if self.reconstruct_error is not None:
                raise ApiError(422, "unsupported", "train_id", self.reconstruct_error)
            with self.stage("lookup"):
                vector = np.asarray(self.index_dir.index.reconstruct(int(self_row)), dtype=np.float32)
            label_used = self.examples[self_row]["label"]
            prediction = None
            query.update(train_id=req.train_id, self_influence=float(self.index_dir.self_influence[self_row]))
        else:
            label = self.parse_label(req.label, "label") if req.label is not None else None
            out = self.embed_examples([req.example], None if label is None else [label])
            vector = out["vectors"][0].to(torch.float32).numpy()  # as the indexer stores it (any model dtype)
            label_used = out["labels"][0]
            predicted = out["predicted"][0]
            probabilities = out["probabilities"]
            prediction = {"label": predicted, "label_name": self.label_name(predicted),
                          "probabilities": probabilities[0].tolist() if probabilities is not None else None}
            query["self_influence"] = float(out["self_influence"][0])
        if req.include_embedding:
            query["embedding"] = vector.astype(np.float64).tolist()

        k = int(req.k)
        skip_self = bool(req.exclude_self) and self_row is not None
        with self.stage("search"):
            (pro_rows, pro_scores), (opp_rows, opp_scores) = self.search(vector, k + (1 if skip_self else 0), k,
                                                                         rows)
        proponents = self._hits(pro_rows, pro_scores, k, self_row if skip_self else None)
        opponents = self._hits(opp_rows, opp_scores, k, None)
        return {
            "prediction": prediction,
            "label_used": label_used,
            "label_used_name": self.label_name(label_used),
            "query": query,
            "proponents": proponents,
            "opponents": opponents,
            "index": {"approximate": self.approximate, "count": self.count,
                      "candidates": int(rows.size) if rows is not None else self.count},
            "took_ms": round((time.perf_counter() - started) * 1000.0, 3),
        }

    def search(self, vector: np.ndarray, k_pro: int, k_opp: int, rows: np.ndarray | None = None):
        """((rows, scores) of the proponents, (rows, scores) of the opponents) for a float32 query.

        A label subset (`rows`) is searched inside FAISS with an ID selector (`indexer.search.top_k`), as
        is every approximate index. An exact inner-product `Flat` index without a subset takes one pass
        over the stored vectors for both ends instead of two FAISS scans (same exact top-k)."""
        from indexer.search import top_k

        if self.gpu_index is not None and rows is None:
            pro = top_k(self.gpu_index, vector, k_pro, 1)
            opp = top_k(self.gpu_index, vector, k_opp, -1)
            return (pro.rows, pro.scores), (opp.rows, opp.scores)
        if self.flat_vectors is not None and rows is None:
            return _both_ends(self.flat_scores(vector), k_pro, k_opp)
        index = self.index_dir.index
        if self.search_pool is not None:  # q and -q at once (FAISS releases the GIL; nq=1 is one thread)
            pending = self.search_pool.submit(top_k, index, vector, k_pro, 1, rows, self.search_params)
            opp = top_k(index, vector, k_opp, -1, rows, self.search_params)
            pro = pending.result()
        else:
            pro = top_k(index, vector, k_pro, 1, rows, self.search_params)
            opp = top_k(index, vector, k_opp, -1, rows, self.search_params)
        return (pro.rows, pro.scores), (opp.rows, opp.scores)

    def flat_scores(self, vector: np.ndarray) -> np.ndarray:
        """e . q for every stored vector with FAISS's SIMD kernel (no BLAS thread pool spinning against
        torch's), in row blocks on `search_threads` threads for large indexes (FAISS releases the GIL)."""
        import faiss

        view = self.flat_vectors
        count, dim = view.shape
        query = np.ascontiguousarray(vector, dtype=np.float32)
        out = np.empty(count, dtype=np.float32)

        def block(bounds: tuple[int, int]) -> None:
            start, stop = bounds
            faiss.fvec_inner_products_ny(faiss.swig_ptr(out[start:stop]), faiss.swig_ptr(query),
                                         faiss.swig_ptr(view[start:stop]), dim, stop - start)

        parts = self.settings.effective_search_threads if count * dim >= PARALLEL_SCAN_FLOATS else 1
        if parts <= 1 or self.search_pool is None:
            block((0, count))
        else:
            edges = [count * i // parts for i in range(parts + 1)]
            list(self.search_pool.map(block, zip(edges[:-1], edges[1:])))
        return out

    def _hits(self, rows: np.ndarray, scores: np.ndarray, k: int, skip: int | None) -> list[dict[str, Any]]:
        out = []
        for row, score in zip(rows.tolist(), scores.tolist()):
            if skip is not None and row == skip:
                continue
            if not math.isfinite(score):
                continue
            ex = self.examples[row]
            out.append({"id": ex["id"], "score": score, "label": ex["label"], "label_name": self.label_name(ex["label"]),
                        "display": ex.get("display") or {}})
            if len(out) == k:
                break
        return out

    def self_influence_page(self, k: int, offset: int, label: int | str | None) -> dict[str, Any]:
        if label is None:
            order, label_value = self.si_order, None
        else:
            label_value, _ = self.label_rows(label, "label", ["query", "label"])
            order = self.si_order_by_label[label_value]
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
            label_value, _ = self.label_rows(label, "label", ["query", "label"])
            rows = self.si_order_by_label[label_value]
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
        faiss_info["search_params_in_use"] = self.search_params
        return {
            "path": self.index_dir.path.resolve().name,  # the name only: the server's file layout is not shown
            "task": {"ref": m["task"]["ref"], "args": m["task"].get("args") or {}},
            "class_names": self.class_names,
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
                                  exclude_self=False, include_embedding=False)
        elif self.reconstruct_error is None:
            req = SimpleNamespace(example=None, train_id=self.examples[0]["id"], label=None, filter_label=None,
                                  k=10, exclude_self=False, include_embedding=False)
        else:
            return
        try:
            self.influence(req)
        except ApiError as exc:
            raise ServiceStartupError(f"{self.index_dir.path}: a warm-up query failed: {exc.field}: {exc.message}") \
                from None


def _ends(scores: np.ndarray, k: int, sign: int) -> tuple[np.ndarray, np.ndarray]:
    signed = sign * scores
    k = min(k, signed.size)
    if k <= 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    part = np.argpartition(-signed, k - 1)[:k] if k < signed.size else np.arange(signed.size)
    part = part[signed[part] > 0]
    part = part[np.lexsort((part, -signed[part]))]  # by score, ties by row
    return part.astype(np.int64), scores[part].astype(np.float32)


def _both_ends(scores: np.ndarray, k_pro: int, k_opp: int):
    return _ends(scores, k_pro, 1), _ends(scores, k_opp, -1)


def _flat_vectors(index) -> np.ndarray | None:
    """A read-only [N, D] float32 view of an exact inner-product Flat index's stored vectors."""
    import faiss

    base = faiss.downcast_index(index)
    if not isinstance(base, faiss.IndexFlat) or base.metric_type != faiss.METRIC_INNER_PRODUCT or not base.ntotal:
        return None
    view = faiss.rev_swig_ptr(base.get_xb(), base.ntotal * base.d).reshape(base.ntotal, base.d)
    view.flags.writeable = False
    return view


def load_engine(settings: Settings) -> Engine:
    """Open, verify and load the index directory; refuse with ServiceStartupError on any problem."""
    import faiss

    from indexer.checkpoints import CheckpointError
    from indexer.config import ConfigError, TaskRef
    from indexer.embedding import load_embedder
    from indexer.store import IndexDirectory, IndexDirectoryError

    t0 = time.perf_counter()
    path = _index_path(settings)
    _check_device(settings.device)
    try:
        index_dir = IndexDirectory.open(path, mmap=settings.mmap, verify=settings.verify_checksums)
    except IndexDirectoryError as exc:
        raise ServiceStartupError(str(exc)) from None
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
        raise ServiceStartupError(f"{path}: cannot read the index directory: {type(exc).__name__}: {exc}") from None

    try:  # resolved and type-checked (nothing called) before load_embedder constructs it
        TaskRef(index_dir.model.task.ref, dict(index_dir.model.task.args)).check(TASK_FIELD, forbidden_dir=path)
    except ConfigError as exc:
        raise ServiceStartupError(f"{path}: cannot rebuild the task/model: {exc}") from None
    try:
        task, embedder = load_embedder(index_dir, device=settings.device)
    except IndexDirectoryError as exc:
        raise ServiceStartupError(str(exc)) from None
    except (ConfigError, CheckpointError) as exc:
        raise ServiceStartupError(f"{path}: cannot rebuild the task/model: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - user task code; the message must reach the operator
        raise ServiceStartupError(f"{path}: cannot rebuild the task/model: {type(exc).__name__}: {exc}") from None
    _check_schema(task, path)

    manifest = index_dir.manifest
    class_names = list(task.class_names) if task.class_names is not None else None
    indexed_names = manifest["task"].get("class_names")
    if indexed_names is not None and class_names is not None and list(indexed_names) != class_names:
        raise ServiceStartupError(f"{path}: the task's class names {class_names[:10]} differ from those recorded at "
                                  f"indexing {list(indexed_names)[:10]}")

    params = dict(manifest.get("faiss", {}).get("search_params") or {})
    params.update(settings.faiss_params)
    if params:
        base = faiss.downcast_index(index_dir.index)
        kind = ("IVF" if isinstance(base, faiss.IndexIVF) else "HNSW" if isinstance(base, faiss.IndexHNSW) else "")
        probe_type = {"IVF": faiss.SearchParametersIVF, "HNSW": faiss.SearchParametersHNSW}.get(kind,
                                                                                                faiss.SearchParameters)
        unknown = sorted(name for name in params if name == "sel" or not hasattr(probe_type, name))
        if unknown:
            raise ServiceStartupError(f"{path}: FAISS search parameters {unknown} do not apply to this "
                                      f"{type(base).__name__} index (TRACIN_FAISS_PARAMS / index.search_params)")

    label_kind = manifest["task"].get("label_kind") or task.kind
    label_width = int(manifest["task"].get("label_width") or 0)
    labels, rows_by_label = _label_rows(index_dir.examples, label_kind, path)
    id_to_row: dict[str, int] = {}
    for row, ex in enumerate(index_dir.examples):
        id_to_row.setdefault(str(ex["id"]), row)
    if len(id_to_row) != len(index_dir.examples):
        log.warning("%s: %d duplicate example ids; GET /examples and train_id use the first row of each",
                    path, len(index_dir.examples) - len(id_to_row))
    si = np.asarray(index_dir.self_influence, dtype=np.float64)
    si_order = np.argsort(-si, kind="stable")
    si_rank = np.empty_like(si_order)
    si_rank[si_order] = np.arange(1, si.size + 1)
    rank_of = np.empty(si.size, dtype=np.int64)
    rank_of[si_order] = np.arange(si.size)
    si_order_by_label = {lab: rows[np.argsort(rank_of[rows], kind="stable")] for lab, rows in rows_by_label.items()}

    reconstruct_error = _enable_reconstruct(index_dir.index)
    flat = _flat_vectors(index_dir.index) if settings.search == "auto" else None
    engine = Engine(
        settings=settings, index_dir=index_dir, task=task, embedder=embedder, search_params=params,
        labels=labels, id_to_row=id_to_row, si_order=si_order, si_rank=si_rank, rows_by_label=rows_by_label,
        si_order_by_label=si_order_by_label,
        num_classes=len(class_names) if class_names is not None else (label_width if label_kind == "multilabel" else None),
        reconstruct_error=reconstruct_error, class_names=class_names, flat_vectors=flat,
        label_kind=label_kind, label_width=label_width,
        search_pool=(ThreadPoolExecutor(settings.effective_search_threads, thread_name_prefix="tracin-search")
                     if settings.effective_search_threads > 1 else None),
    )
    engine.gpu_index = _gpu_copy(index_dir.index, settings)
    if engine.gpu_index is not None:
        engine.flat_vectors = None
    if settings.warmup:
        engine.warm_up()
    engine.load_seconds = time.perf_counter() - t0
    return engine


def _label_rows(examples: list[dict[str, Any]], kind: str, path) -> tuple[np.ndarray | None, dict[int, np.ndarray]]:
    """(class ids [N] or None, class id -> training rows with that label) for label filters."""
    try:
        if kind == "class":
            labels = np.asarray([int(e["label"]) for e in examples], dtype=np.int64)
            return labels, {int(lab): np.flatnonzero(labels == lab).astype(np.int64) for lab in np.unique(labels)}
        if kind == "multilabel":
            matrix = np.asarray([e["label"] for e in examples], dtype=np.float64)
            return None, {c: np.flatnonzero(matrix[:, c] > 0.5).astype(np.int64) for c in range(matrix.shape[1])}
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise ServiceStartupError(f"{path}: the examples table's labels do not fit the task's label kind "
                                  f"{kind!r}: {exc}") from None
    return None, {}


def _gpu_copy(index, settings: Settings):
    """A faiss-gpu copy of the index on TRACIN_DEVICE's GPU, or None (CPU search)."""
    import faiss
    import torch

    has_gpu_faiss = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    wanted = settings.faiss_gpu == "true" or (settings.faiss_gpu == "auto" and settings.device.startswith("cuda"))
    if not wanted:
        return None
    if not has_gpu_faiss:
        if settings.faiss_gpu == "true":
            raise ServiceStartupError("TRACIN_FAISS_GPU=true but this FAISS build has no GPU support "
                                      "(install faiss-gpu-cu12 instead of faiss-cpu, see docs/gpu.md)")
        log.info("FAISS has no GPU support here: searching on the CPU")
        return None
    device = torch.device(settings.device)
    gpu = device.index if device.type == "cuda" and device.index is not None else 0
    resources = faiss.StandardGpuResources()
    copy = faiss.index_cpu_to_gpu(resources, gpu, index)
    copy.referenced_resources = resources  # keep the resources alive with the index
    return copy


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ServiceStartupError(f"TRACIN_DEVICE: {device!r} is not a torch device: {exc}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ServiceStartupError(f"TRACIN_DEVICE: {device!r} requested but CUDA is not available on this machine")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ServiceStartupError(f"TRACIN_DEVICE: {device!r} but only {torch.cuda.device_count()} CUDA devices")


def _enable_reconstruct(index) -> str | None:
    """None when stored vectors can be read back (train_id queries); else why not."""
    import faiss

    base = faiss.downcast_index(index)
    try:
        if isinstance(base, faiss.IndexIVF):
            base.make_direct_map()
        if index.ntotal:
            index.reconstruct(0)
        return None
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        log.warning("train_id queries are disabled: FAISS cannot reconstruct stored vectors (%s)", reason)
        return f"this index cannot return stored vectors ({type(base).__name__}: {reason}); post the example instead"
