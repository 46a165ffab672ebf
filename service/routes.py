"""HTTP routes: thin mappings from requests to `service.engine.Engine` calls.

No `from __future__ import annotations` here: FastAPI must see the request model built at app creation
as a real annotation, not a string.
"""
import time
from typing import Any, Literal, Optional, Union

import anyio
from fastapi import APIRouter, Body, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel

from service.errors import ApiError, reject_coerced_numbers, reject_non_finite
from service.schemas import (
    BatchInfluenceResponse, ErrorResponse, ExampleInfo, Health, IndexInfo, InfluenceResponse, LabelReviewHistogram, LabelReviewPage,
    QueryPage, RankingName, Ready, SelfInfluenceHistogram, SelfInfluencePage,
)
from service.settings import Settings

#: the error answers of the data routes (401, with a key set, is added by service.app to every route but the
#: health probes)
ERRORS = {
    408: {"model": ErrorResponse, "description": "request body not complete within TRACIN_BODY_TIMEOUT_S"},
    413: {"model": ErrorResponse, "description": "request body over TRACIN_MAX_BODY_BYTES"},
    422: {"model": ErrorResponse, "description": "invalid input; `detail[].field` names the field"},
}
NOT_FOUND = {404: {"model": ErrorResponse, "description": "unknown id"}}
#: routes that take a compute slot (service.compute)
BUSY = {503: {"model": ErrorResponse, "description": "all compute slots busy and TRACIN_MAX_QUEUE requests waiting "
                                                     "(or the index not loaded yet); see the Retry-After header",
              "headers": {"Retry-After": {"description": "seconds to wait before retrying",
                                          "schema": {"type": "integer"}}}}}
#: the label filter of the listing routes; `?label=` (empty) is no filter, like leaving it out
LABEL_FILTER = ("only training examples with this label (integer class id or class name; empty or left out: "
                "all)")


def _no_filter_if_empty(label: Optional[str]) -> Optional[str]:
    """`?label=` with nothing after it (what an HTML form sends for "all") means no label filter."""
    return label if label else None


def _engine(request: Request):
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not getattr(request.app.state, "ready", False):
        raise ApiError(503, "not_ready", "index", "the index is not loaded (yet); see GET /readyz", ["index"])
    return engine


def _ranking_help() -> str:
    from indexer.build.review import DEFAULT_RANKING, RANKINGS

    lines = [f"{name} ({order}{', the default' if name == DEFAULT_RANKING else ''}): {meaning}"
             for name, (order, meaning) in RANKINGS.items()]
    return ("which ranking orders the list (default: combined; self_influence on an index built before label "
            "review). " + " | ".join(lines))


RANKING_HELP = _ranking_help()


def build_router(request_model: type[BaseModel], settings: Settings,
                 examples: Optional[dict[str, Any]] = None) -> APIRouter:
    router = APIRouter()
    max_page = settings.max_page

    @router.post("/influence", response_model=Union[InfluenceResponse, BatchInfluenceResponse],
                 responses={**ERRORS, **BUSY, 413: {"model": ErrorResponse, "description": (
                     "request body over TRACIN_MAX_BODY_BYTES, or a set / batch over TRACIN_MAX_SET / "
                     "TRACIN_MAX_BATCH members (the field names the first member beyond)")}},
                 tags=["influence"], summary="Top proponents and opponents of a prediction, a set or a batch")
    async def influence(request: Request,
                        body: request_model = Body(..., openapi_examples=examples or None)) -> Any:  # type: ignore[valid-type]
        """Give exactly one of `example`, `train_id`, or members (`examples` / `train_ids`).

        Embed the posted `example` with the indexer's embedding function (loss on `label`, default the
        model's prediction at the last checkpoint) or take the stored vector of training example
        `train_id`, then return the `k` training examples with the largest positive TracIn scores
        (proponents) and the `k` with the most negative (opponents). `filter_label` restricts the
        search to training examples of one label inside FAISS.

        Several members (`examples` and/or `train_ids`) with `aggregate` ("sum" or "mean") are one set
        query: the training examples ranked by their exact influence on the members' summed (mean)
        metric, each score the sum (mean) of the members' own scores. Without `aggregate` they are a batch:
        `results`, one answer per member, computed together."""
        started = time.perf_counter()
        posted = [("example", body.example)] if body.example is not None else []
        posted += [(("examples", i), e) for i, e in enumerate(body.examples or [])]
        if posted:
            raw = await request.json()  # parsed once by FastAPI and cached on the request
        for where, example in posted:
            loc = where if isinstance(where, tuple) else (where,)
            reject_non_finite(example.model_dump(mode="python"), loc)
            if isinstance(raw, dict):  # strict numbers: no `true` or "3" where the task's schema wants a number
                given = raw.get(loc[0])
                if len(loc) > 1:
                    given = given[loc[1]] if isinstance(given, list) and loc[1] < len(given) else None
                reject_coerced_numbers(given, example.model_dump(mode="python", by_alias=True), loc)
        return await request.app.state.compute.run(request, _engine(request).influence, body, started)

    @router.get("/self-influence/top", response_model=SelfInfluencePage, responses=ERRORS, tags=["influence"],
                summary="Training examples by descending exact self-influence")
    async def self_influence_top(
        request: Request,
        k: int = Query(10, ge=1, le=max_page, description=f"items per page (1..{max_page})"),
        offset: int = Query(0, ge=0, description="items to skip"),
        label: Optional[str] = Query(None, description=LABEL_FILTER),
    ) -> Any:
        """Mislabeled, rare and odd training examples first: self-influence sum_i lr_i ||g_i(z)||^2, exact."""
        return _engine(request).self_influence_page(k, offset, _no_filter_if_empty(label))

    @router.get("/self-influence/histogram", response_model=SelfInfluenceHistogram, responses=ERRORS,
                tags=["influence"], summary="Histogram of exact self-influence")
    async def self_influence_histogram(
        request: Request,
        bins: int = Query(40, ge=1, le=1000, description="number of bins"),
        label: Optional[str] = Query(None, description=LABEL_FILTER),
        scale: Literal["log", "linear"] = Query("log", description="bin spacing"),
    ) -> Any:
        """Bins over all (or one label's) training examples, with per-bin counts of boolean display
        fields such as `flipped`; clicking bin i in a dashboard maps to offset sum(counts[i+1:])."""
        return _engine(request).self_influence_histogram(bins, _no_filter_if_empty(label), scale)

    @router.get("/label-review", response_model=LabelReviewPage, responses=ERRORS, tags=["label review"],
                summary="Training examples most likely mislabeled first, by a chosen ranking")
    async def label_review(
        request: Request,
        ranking: Optional[RankingName] = Query(None, description=RANKING_HELP),
        k: int = Query(10, ge=1, le=max_page, description=f"items per page (1..{max_page})"),
        offset: int = Query(0, ge=0, description="items to skip"),
        label: Optional[str] = Query(None, description=LABEL_FILTER),
    ) -> Any:
        """The training set ranked for label review, most suspicious first, with the model's prediction at
        the last checkpoint, its probability and the suggested label (the prediction where it differs from
        the given label) per row. Every ranking is computed at index time from the checkpoints (no extra
        training); `combined` is the default. Measured on Fashion-MNIST with 10% of the labels flipped, in
        docs/mislabel.md."""
        return await anyio.to_thread.run_sync(_engine(request).label_review_page, ranking, k, offset,
                                              _no_filter_if_empty(label))

    @router.get("/label-review/histogram", response_model=LabelReviewHistogram, responses=ERRORS,
                tags=["label review"], summary="Histogram of a label-review ranking's scores")
    async def label_review_histogram(
        request: Request,
        ranking: Optional[RankingName] = Query(None, description=RANKING_HELP),
        bins: int = Query(40, ge=1, le=1000, description="number of bins"),
        label: Optional[str] = Query(None, description=LABEL_FILTER),
        scale: Literal["log", "linear"] = Query("log", description="bin spacing (log only for scores >= 0)"),
    ) -> Any:
        """Bins over all (or one label's) training examples, with per-bin counts of boolean display fields
        such as `flipped`."""
        return await anyio.to_thread.run_sync(_engine(request).label_review_histogram, ranking, bins,
                                              _no_filter_if_empty(label), scale)

    @router.get("/label-review/export", responses={**ERRORS, **BUSY, 200: {
        "content": {"text/csv": {}, "application/json": {}},
        "description": "the ranked list as a CSV file or a JSON document (an attachment)"}},
        tags=["label review"], summary="The ranked label-review list as CSV or JSON", response_class=Response)
    async def label_review_export(
        request: Request,
        format: Literal["csv", "json"] = Query("csv", description="csv or json"),
        ranking: Optional[RankingName] = Query(None, description=RANKING_HELP),
        label: Optional[str] = Query(None, description=LABEL_FILTER),
        limit: Optional[int] = Query(None, ge=1, description="only the first `limit` rows (default: all)"),
    ) -> Response:
        """Every training example (or the first `limit`), most suspicious first: rank, id, label,
        prediction, probability, suggested label, the chosen ranking's score, self-influence and the
        display fields (pictures, i.e. data-URL values, left out). CSV: one header line, lists as JSON,
        `display.<name>` columns; JSON: {ranking, order, description, total, items}."""
        from service.review import to_csv

        engine = _engine(request)
        name, items = await request.app.state.compute.run(request, engine.label_review_export, ranking,
                                                          _no_filter_if_empty(label), limit)
        filename = f"label-review-{name}.{format}"
        headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
        if format == "csv":
            return PlainTextResponse(to_csv(items, name), media_type="text/csv; charset=utf-8", headers=headers)
        described = engine.review.describe(name)
        body = {"ranking": name, "order": described["order"], "description": described["description"],
                "total": len(items), "items": items}
        return JSONResponse(body, headers=headers)

    @router.get("/examples/{id:path}", response_model=ExampleInfo, responses={**ERRORS, **NOT_FOUND},
                tags=["examples"], summary="One training example")
    async def example(request: Request, id: str = Path(..., description="training example id")) -> Any:
        return _engine(request).example_info(id)

    @router.get("/queries", response_model=QueryPage, responses=ERRORS, tags=["examples"],
                summary="Held-out examples shipped with the index (ready to post to /influence)")
    async def queries(request: Request,
                      offset: int = Query(0, ge=0),
                      limit: int = Query(100, ge=1, le=max_page),
                      predictions: bool = Query(False, description="add the model's prediction at the last "
                                                                    "checkpoint to each item (a forward pass)")) -> Any:
        if not predictions:
            return _engine(request).queries_page(offset, limit)
        return await request.app.state.compute.run(request, _engine(request).queries_page, offset, limit, True)

    @router.get("/index", response_model=IndexInfo, responses=ERRORS, tags=["service"],
                summary="Summary of the served index (manifest)")
    async def index_info(request: Request) -> Any:
        return _engine(request).index_info()

    @router.get("/healthz", response_model=Health, tags=["service"], summary="Liveness")
    async def healthz() -> Any:
        return {"status": "ok"}

    @router.get("/readyz", response_model=Ready, tags=["service"], summary="Readiness: index loaded",
                responses={503: {"model": Ready}})
    async def readyz(request: Request) -> Any:
        engine = getattr(request.app.state, "engine", None)
        if engine is None or not getattr(request.app.state, "ready", False):
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "count": engine.count, "load_seconds": round(engine.load_seconds, 3)}

    @router.get("/metrics", tags=["service"], summary="Prometheus metrics", response_class=Response,
                responses={200: {"content": {"text/plain": {}}}})
    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/", tags=["service"], summary="Service links")
    async def root(request: Request) -> Any:
        engine = getattr(request.app.state, "engine", None)
        return {
            "service": "tracin-service",
            "index": engine.index_dir.path.resolve().name if engine is not None else None,
            "count": engine.count if engine is not None else None,
            "docs": "/docs",
            "routes": ["POST /influence", "GET /self-influence/top", "GET /self-influence/histogram",
                       "GET /label-review", "GET /label-review/histogram", "GET /label-review/export", "GET /examples/{id}", "GET /queries",
                       "GET /index", "GET /healthz", "GET /readyz", "GET /metrics", "POST /admin/reload"],
        }

    return router
