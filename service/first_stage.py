"""The first stage of retrieval: candidate proponents and opponents from the FAISS index.

Proponents are the largest e(train) . q, opponents the most negative (FAISS searches -q and the scores
are negated back). A label subset is searched inside FAISS with an ID selector (`indexer.store.search.top_k`),
as is every approximate index. An exact inner-product `Flat` index without a subset takes one pass over
the stored vectors for both ends (same exact top-k as two FAISS scans), in parallel row blocks when it
is large. Exact re-ranking (`indexer.score.exact`) then decides the answer from these candidates.
"""
from __future__ import annotations

import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import ServiceStartupError
from service.settings import Settings

log = logging.getLogger("service")

PARALLEL_SCAN_FLOATS = 1 << 22  # Flat indexes above 16 MB are scanned in parallel row blocks


@dataclass
class FirstStage:
    index: Any  # faiss.Index
    params: dict[str, Any]  # FAISS search parameters in use
    threads: int
    flat_vectors: np.ndarray | None = None  # exact Flat index: a read-only view of the stored vectors
    gpu_index: Any = None  # a faiss-gpu copy for unfiltered searches (label filters stay on the CPU index)
    pool: ThreadPoolExecutor | None = None  # block-parallel Flat scans, q and -q at once
    reconstruct_error: str | None = None  # why stored vectors cannot be read back (None: they can)
    inverse_norms: np.ndarray | None = None  # float32 [N]: 1 / sqrt(self-influence) (0 where it is 0)
    normalized_index: Any = None  # approximate indexes: a FAISS index of the normalised vectors
    removed: np.ndarray | None = None  # int64 sorted: rows marked removed (tracin index --remove-ids), never returned
    _torch_view: Any = None  # a torch view of flat_vectors (made on first use)

    @classmethod
    def open(cls, index, manifest: dict, settings: Settings, path, self_influence: np.ndarray | None = None,
             normalized_index=None, removed: np.ndarray | None = None) -> "FirstStage":
        """Search parameters (manifest, then TRACIN_FAISS_PARAMS) checked against the index type, the
        one-pass view of a Flat index, a GPU copy when asked for. ServiceStartupError names a problem."""
        import faiss

        params = dict(manifest.get("faiss", {}).get("search_params") or {})
        params.update(settings.faiss_params)
        if params:
            from indexer.store.search import check_search_params

            problem = check_search_params(index, params, f"this {type(faiss.downcast_index(index)).__name__} index")
            if problem:
                raise ServiceStartupError(f"{path}: FAISS search parameters{problem} "
                                          "(TRACIN_FAISS_PARAMS / index.search_params)")
        threads = settings.effective_search_threads
        stage = cls(index, params, threads,
                    flat_vectors=_flat_vectors(index) if settings.search == "auto" else None,
                    pool=ThreadPoolExecutor(threads, thread_name_prefix="tracin-search") if threads > 1 else None,
                    reconstruct_error=_enable_reconstruct(index))
        stage.gpu_index = _gpu_copy(index, settings)
        if stage.gpu_index is not None:
            stage.flat_vectors = None
        if self_influence is not None:
            norms = np.sqrt(np.asarray(self_influence, dtype=np.float64))
            stage.inverse_norms = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0).astype(np.float32)
        stage.normalized_index = normalized_index
        if removed is not None and removed.size:
            stage.removed = np.asarray(removed, dtype=np.int64)
        return stage

    @property
    def can_normalize(self) -> bool:
        """Normalised ranking over the whole index: a Flat scan divides on the fly, an approximate index
        needs its normalised twin (built by the indexer for approximate factories)."""
        return self.inverse_norms is not None and (self.flat_vectors is not None or self.normalized_index is not None)

    def reconstruct(self, row: int) -> np.ndarray:
        return np.asarray(self.index.reconstruct(int(row)), dtype=np.float32)

    def search(self, vector: np.ndarray, k_pro: int, k_opp: int, rows: np.ndarray | None = None,
               normalized: bool = False):
        """((rows, scores) of the proponents, (rows, scores) of the opponents) for a float32 query; with
        `normalized`, ranked by e(z) . q / ||g(z)|| over the whole index (or the row subset) and those
        normalised scores returned."""
        from indexer.store.search import top_k

        removed = self.removed  # rows marked removed: excluded inside every search below
        if normalized:
            if self.flat_vectors is not None:
                scores = self.flat_scores(vector) * self.inverse_norms
                if removed is not None:
                    scores[removed] = 0.0  # neither a proponent (> 0) nor an opponent (< 0)
                if rows is None:
                    return _ends(scores, k_pro, 1), _ends(scores, k_opp, -1)
                (pr, ps), (orows, os_) = _ends(scores[rows], k_pro, 1), _ends(scores[rows], k_opp, -1)
                return (rows[pr], ps), (rows[orows], os_)
            pro = top_k(self.normalized_index, vector, k_pro, 1, rows, self.params, removed)
            opp = top_k(self.normalized_index, vector, k_opp, -1, rows, self.params, removed)
            return (pro.rows, pro.scores), (opp.rows, opp.scores)

        if self.gpu_index is not None and rows is None and removed is None:
            pro = top_k(self.gpu_index, vector, k_pro, 1)
            opp = top_k(self.gpu_index, vector, k_opp, -1)
            return (pro.rows, pro.scores), (opp.rows, opp.scores)
        if self.flat_vectors is not None and rows is None:
            scores = self.flat_scores(vector)
            if removed is not None:
                scores[removed] = 0.0
            return _ends(scores, k_pro, 1), _ends(scores, k_opp, -1)
        if self.pool is not None:  # q and -q at once (FAISS releases the GIL; nq=1 is one thread)
            pending = self.pool.submit(top_k, self.index, vector, k_pro, 1, rows, self.params, removed)
            opp = top_k(self.index, vector, k_opp, -1, rows, self.params, removed)
            pro = pending.result()
        else:
            pro = top_k(self.index, vector, k_pro, 1, rows, self.params, removed)
            opp = top_k(self.index, vector, k_opp, -1, rows, self.params, removed)
        return (pro.rows, pro.scores), (opp.rows, opp.scores)

    def search_many(self, vectors: np.ndarray, k_pro: int, k_opp: int, rows: np.ndarray | None = None,
                    normalized: bool = False) -> list:
        """`search` for each row of vectors [Q, D] (a batch of queries): an exact Flat index without a label
        filter scores every query in one pass over the stored vectors (a matrix product, not Q passes); the
        rest query by query. Same answers as `search` one vector at a time."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.flat_vectors is None or rows is not None or vectors.shape[0] < 2 or self.gpu_index is not None:
            return [self.search(v, k_pro, k_opp, rows, normalized) for v in vectors]
        out = []
        step = max(1, PARALLEL_SCAN_FLOATS * 8 // max(1, self.flat_vectors.shape[0]))  # [N, step] float32 <= 128 MB
        for start in range(0, vectors.shape[0], step):
            scores = self.flat_scores_many(vectors[start:start + step])
            if normalized:
                scores = scores * self.inverse_norms[:, None]
            if self.removed is not None:
                scores[self.removed] = 0.0  # rows marked removed: neither a proponent nor an opponent
            for j in range(scores.shape[1]):
                column = np.ascontiguousarray(scores[:, j])
                out.append((_ends(column, k_pro, 1), _ends(column, k_opp, -1)))
        return out

    def flat_scores_many(self, vectors: np.ndarray) -> np.ndarray:
        """e . q for every stored vector and each query: [N, Q] float32 (torch's matrix product over the
        zero-copy view, in row blocks on the search threads for large indexes). Each column equals
        `flat_scores` of that query up to float32 summation order."""
        import torch

        view = self._view()
        count, dim = view.shape
        queries = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).T.contiguous()
        out = torch.empty(count, queries.shape[1], dtype=torch.float32)

        self._in_row_blocks(count, dim, lambda start, stop: torch.mm(view[start:stop], queries, out=out[start:stop]))
        return out.numpy()

    def _in_row_blocks(self, count: int, dim: int, block) -> None:
        """block(start, stop) over rows 0..count: at once for small indexes, else in `threads` contiguous row
        blocks on the search pool (the torch ops release the GIL)."""
        parts = self.threads if count * dim >= PARALLEL_SCAN_FLOATS else 1
        if parts <= 1 or self.pool is None:
            block(0, count)
        else:
            edges = [count * i // parts for i in range(parts + 1)]
            list(self.pool.map(block, edges[:-1], edges[1:]))

    def _view(self):
        import torch

        if self._torch_view is None:
            with warnings.catch_warnings():  # a read-only view: nothing writes through it
                warnings.simplefilter("ignore", UserWarning)
                self._torch_view = torch.from_numpy(self.flat_vectors)
        return self._torch_view

    def flat_scores(self, vector: np.ndarray) -> np.ndarray:
        """e . q for every stored vector: a zero-copy torch view of the FAISS storage and MKL's gemv
        (measured 2x FAISS's inner-product kernel on this project's CPUs), in row blocks on `threads`
        threads for large indexes (the op releases the GIL; each block runs with torch's intra-op
        threads, 1 by default in the service)."""
        import torch

        view = self._view()
        count, dim = view.shape
        query = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
        out = torch.empty(count, dtype=torch.float32)

        self._in_row_blocks(count, dim, lambda start, stop: torch.mv(view[start:stop], query, out=out[start:stop]))
        return out.numpy()


def _ends(scores: np.ndarray, k: int, sign: int) -> tuple[np.ndarray, np.ndarray]:
    """The k rows with the largest sign * score > 0, by score (ties by row)."""
    signed = sign * scores
    k = min(k, signed.size)
    if k <= 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    part = np.argpartition(-signed, k - 1)[:k] if k < signed.size else np.arange(signed.size)
    part = part[signed[part] > 0]
    part = part[np.lexsort((part, -signed[part]))]
    return part.astype(np.int64), scores[part].astype(np.float32)


def _flat_vectors(index) -> np.ndarray | None:
    """A read-only [N, D] float32 view of an exact inner-product Flat index's stored vectors."""
    import faiss

    base = faiss.downcast_index(index)
    if not isinstance(base, faiss.IndexFlat) or base.metric_type != faiss.METRIC_INNER_PRODUCT or not base.ntotal:
        return None
    view = faiss.rev_swig_ptr(base.get_xb(), base.ntotal * base.d).reshape(base.ntotal, base.d)
    view.flags.writeable = False
    return view


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
