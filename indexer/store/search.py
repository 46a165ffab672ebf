"""Top proponents / opponents from a FAISS inner-product index.

Proponents: the largest e(z_train) . q  (search q; keep scores > 0).
Opponents:  the most negative e(z_train) . q  (search -q, negate the scores back; keep scores < 0).
An optional row subset (e.g. one training label) is applied inside FAISS with an ID selector, so the
k results are the true top-k of the subset, not a post-filtered short list.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


@dataclass
class Hits:
    rows: np.ndarray  # int64 [h]
    scores: np.ndarray  # float32 [h]


def _search_params(index: faiss.Index, selector, params: dict) -> faiss.SearchParameters | None:
    """FAISS search parameters of the index's own type: IVF (nprobe, ...), HNSW (efSearch, ...), a refine
    stage (k_factor; the rest and the selector go to its base index), through pre-transforms (OPQ, PCA)."""
    if selector is None and not params:
        return None
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexPreTransform):
        return _search_params(base.index, selector, params)
    if isinstance(base, faiss.IndexRefine):
        sp = faiss.IndexRefineSearchParameters()
        sp.k_factor = float(params.get("k_factor", base.k_factor))
        inner = _search_params(base.base_index, selector, {k: v for k, v in params.items() if k != "k_factor"})
        if inner is not None:
            sp.base_index_params = inner
            sp.keep_alive = inner  # the SWIG field does not own it
        return sp
    if isinstance(base, faiss.IndexIVF):
        sp = faiss.SearchParametersIVF()
    elif isinstance(base, faiss.IndexHNSW):
        sp = faiss.SearchParametersHNSW()
    else:
        sp = faiss.SearchParameters()
    for name, value in params.items():
        setattr(sp, name, value)
    if selector is not None:
        sp.sel = selector
    return sp


def index_stages(index: faiss.Index):
    """The index and every index inside it, outermost first, downcast: a refine stage's base, a
    pre-transform's sub-index (the owner stays alive while the caller holds `index`)."""
    stage = faiss.downcast_index(index)
    while True:
        yield stage
        if isinstance(stage, faiss.IndexRefine):
            stage = faiss.downcast_index(stage.base_index)
        elif isinstance(stage, faiss.IndexPreTransform):
            stage = faiss.downcast_index(stage.index)
        else:
            return


def pca_transforms(pretransform: faiss.IndexPreTransform) -> list:
    """The PCAMatrix transforms of a pre-transform's chain."""
    chain = [faiss.downcast_VectorTransform(pretransform.chain.at(i)) for i in range(pretransform.chain.size())]
    return [t for t in chain if isinstance(t, faiss.PCAMatrix)]


def check_search_params(index: faiss.Index, params: dict, what: str) -> str | None:
    """Why `params` (index.search_params / TRACIN_FAISS_PARAMS) cannot be used with `index` (called
    `what` in the message), or None: names the index does not take, or a refine `k_factor` below 1
    (fewer candidates than answers). The message starts with ": " or ".k_factor: " (after a field name)."""
    unknown = sorted(set(params) - search_param_names(index))
    if unknown:
        return f": {unknown} do not apply to {what} (it takes {sorted(search_param_names(index)) or 'none'})"
    k_factor = params.get("k_factor")
    if k_factor is not None and not k_factor >= 1:
        return f".k_factor: must be >= 1 (candidates re-scored = k x k_factor), got {k_factor!r}"
    return None


def search_param_names(index: faiss.Index) -> set[str]:
    """The FAISS search parameters `index` takes (`index.search_params` / TRACIN_FAISS_PARAMS), `sel` aside."""
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexPreTransform):
        return search_param_names(base.index)
    if isinstance(base, faiss.IndexRefine):
        return {"k_factor"} | search_param_names(base.base_index)
    kind = (faiss.SearchParametersIVF if isinstance(base, faiss.IndexIVF) else
            faiss.SearchParametersHNSW if isinstance(base, faiss.IndexHNSW) else faiss.SearchParameters)
    return {name for name in dir(kind) if not name.startswith("_") and name not in ("sel", "this", "thisown", "original_init")}


def row_selector(rows: np.ndarray):
    """A FAISS selector for a set of rows (kept alive by the caller along with the search params)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    return faiss.IDSelectorBatch(rows.size, faiss.swig_ptr(rows)), rows


def top_k(index: faiss.Index, query: np.ndarray, k: int, sign: int = 1, rows: np.ndarray | None = None,
          params: dict | None = None, exclude: np.ndarray | None = None) -> Hits:
    """Largest sign * (e . q) hits, returned as (rows, e . q) with sign * score > 0; only among `rows` when
    given, never among `exclude` (rows marked removed), both applied inside FAISS with an ID selector."""
    if k <= 0:
        return Hits(np.empty(0, np.int64), np.empty(0, np.float32))
    q = np.ascontiguousarray((sign * query).reshape(1, -1), dtype=np.float32)
    keep = None
    selector = None
    if exclude is not None and exclude.size and rows is not None:
        rows, exclude = np.setdiff1d(rows, exclude), None
    if rows is not None:
        selector, keep = row_selector(rows)
        k = min(k, int(keep.size))
        if k == 0:
            return Hits(np.empty(0, np.int64), np.empty(0, np.float32))
    elif exclude is not None and exclude.size:
        inner, keep = row_selector(exclude)
        selector = faiss.IDSelectorNot(inner)
        selector.referenced = inner  # keeps the batch selector alive with the one that negates it
    sp = _search_params(index, selector, params or {})
    k = min(k, index.ntotal)
    scores, ids = index.search(q, k, params=sp) if sp is not None else index.search(q, k)
    del keep
    scores, ids = scores[0], ids[0]
    ok = (ids >= 0) & (scores > 0)
    return Hits(ids[ok].astype(np.int64), (sign * scores[ok]).astype(np.float32))


#: the largest vector dimension a FAISS index file can be read back with (faiss/impl/index_read.cpp)
FAISS_MAX_DIM = 1 << 20


def build_faiss_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index for `factory`; ValueError (naming index.factory or the dim) if FAISS
    cannot build it or could not read it back."""
    if dim > FAISS_MAX_DIM:
        raise ValueError(f"projection: the embedding would have {dim:,} numbers per example, more than the "
                         f"{FAISS_MAX_DIM:,} a FAISS index can hold; exact mode suits small models: use "
                         "kind = \"sketch\" (the service re-ranks candidates by exact TracIn)")
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].rsplit(": ", 1)[-1]
        raise ValueError(f"index.factory: FAISS cannot build {factory!r}: {reason}") from None


def is_approximate(index: faiss.Index) -> bool:
    base = faiss.downcast_index(index)
    return not isinstance(base, faiss.IndexFlat)
