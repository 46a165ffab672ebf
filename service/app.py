"""`create_app(settings)`: the FastAPI app, with a lifespan that loads the index directory once.

    uvicorn --factory service.app:app_from_env      # settings from TRACIN_* environment variables
    tracin serve DIR                                 # loads first (clear errors), then runs uvicorn

Middlewares, outermost first: HEAD as GET -> metrics -> CORS (only when origins are configured) -> bearer key (only
when TRACIN_API_KEY is set) -> body size limit and read timeout (413 / 408) -> routes.
"""
from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.middleware import Middleware

from service.compute import ComputeQueue
from service.dashboard import mount_dashboard
from service.engine import Engine
from service.loading import ServiceStartupError, configure_threads, load_engine, open_task
from service.errors import BearerAuth, BodySizeLimit, JsonCORSMiddleware, install_handlers
from service.metrics import Metrics, MetricsMiddleware
from service.protocol import HeadAsGet
from service.routes import build_router
from service.schemas import make_influence_request
from service.settings import Settings

log = logging.getLogger("service")

DESCRIPTION = """TracIn influence retrieval: which training examples made this prediction?

`POST /influence` embeds an example's loss gradients with the same code that built the index and
returns the training examples with the largest positive TracIn scores (proponents) and the most
negative ones (opponents). `GET /self-influence/top` lists training examples by exact self-influence
(mislabeled, rare or odd examples first). Every 4xx is JSON: `{"error", "message", "detail": [{"field", ...}]}`.
"""


def _openapi_examples(engine: Engine | None, settings: Settings) -> dict[str, Any] | None:
    if engine is None:
        return None
    out: dict[str, Any] = {}
    query = next((q for q in engine.queries if q.get("example") is not None), None)
    if query is not None:
        out["held-out example"] = {"summary": f"held-out example {query.get('id')}",
                                   "value": {"example": query["example"], "k": settings.default_k}}
        several = [q for q in engine.queries if q.get("example") is not None][:3]
        out["set"] = {"summary": f"a set of {len(several)} held-out examples: influence on their summed loss",
                      "value": {"examples": [q["example"] for q in several], "aggregate": "sum",
                                "k": settings.default_k, "member_scores": True}}
        out["batch"] = {"summary": f"a batch of {len(several)} queries: one answer each",
                        "value": {"examples": [q["example"] for q in several], "k": settings.default_k}}
    if engine.examples:
        first = engine.examples[int(engine.si_order[0]) if engine.si_order.size else 0]["id"]  # a row served
        out["training example"] = {"summary": f"explain training example {first}",
                                   "value": {"train_id": first, "k": settings.default_k}}
        if engine.labels.ids is not None:
            label = int(engine.labels.ids[0])
            out["label filter"] = {"summary": f"only proponents/opponents with training label {label}",
                                   "value": {"train_id": first, "k": settings.default_k, "filter_label": label}}
    return out or None


def _manifest_examples(settings: Settings) -> dict[str, Any] | None:
    """OpenAPI examples before the engine is loaded (factory path): read the small files only."""
    try:
        path = settings.index_dir
        with open(path / "queries.jsonl", encoding="utf-8") as handle:
            query = json.loads(handle.readline())
        return {"held-out example": {"summary": f"held-out example {query.get('id')}",
                                     "value": {"example": query["example"], "k": settings.default_k}}}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The service app. Without `engine`, the lifespan loads the index named by `settings.index_dir`
    (the task is rebuilt here already, so that the request schema documents the task's example)."""
    settings = settings or Settings()
    task = engine.task if engine is not None else open_task(settings)
    metrics = Metrics()
    from indexer.score.metrics import task_metrics

    request_model = make_influence_request(task.example_schema, settings.max_k, settings.default_k,
                                           settings.max_rerank, settings.rerank, task_metrics(task),
                                           settings.max_set, settings.max_batch)
    examples = _openapi_examples(engine, settings) if engine is not None else _manifest_examples(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = engine
        if loaded is None:
            configure_threads(settings)
            try:
                loaded = await anyio.to_thread.run_sync(load_engine, settings)
            except ServiceStartupError as exc:
                log.error("tracin-service cannot start: %s", exc)
                raise
        from service.reload import ReloadState, install_sighup, mark_loaded, restore_sighup

        mark_loaded(loaded)
        loaded.stats = metrics
        app.state.reload = ReloadState()
        sighup = install_sighup(app)  # SIGHUP: serve the version the index directory's CURRENT names now
        app.state.engine = loaded
        app.state.compute = ComputeQueue(settings.effective_compute_threads, settings.max_queue, metrics)
        metrics.index_examples.set(loaded.count)
        metrics.index_dim.set(int(loaded.index_dir.manifest["embedding_dim"]))
        metrics.load_seconds.set(loaded.load_seconds)
        app.state.ready = True
        metrics.ready.set(1)
        try:
            yield
        finally:
            app.state.ready = False
            metrics.ready.set(0)
            if sighup:
                restore_sighup(app)

    middleware = [Middleware(HeadAsGet), Middleware(MetricsMiddleware, metrics=metrics)]
    if settings.cors_origins:
        middleware.append(Middleware(JsonCORSMiddleware, allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                                     max_age=600))
    if settings.api_key is not None:
        middleware.append(Middleware(BearerAuth, api_key=settings.api_key.get_secret_value()))
    middleware.append(Middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s))

    from indexer import __version__

    app = FastAPI(title="tracin-service", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  middleware=middleware, docs_url=None, redoc_url=None)  # /docs, /redoc: offline, see service/docs.py
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.ready = False
    install_handlers(app)
    app.include_router(build_router(request_model, settings, examples))
    from service.reload import build_admin_router

    app.include_router(build_admin_router(settings))
    if settings.api_key is not None:
        _document_bearer(app)
    mount_dashboard(app)
    return app


def _document_bearer(app: FastAPI) -> None:
    """OpenAPI with the bearer key: the security scheme, and on every route that needs the key (all but the
    health probes, `service.errors.BearerAuth.OPEN`) its 401 answer; the probes say they need none."""
    from fastapi.openapi.utils import get_openapi

    from service.errors import BearerAuth

    unauthorized = {"description": "missing or wrong bearer key: every route but /healthz and /readyz needs "
                                   "`Authorization: Bearer <key>` (TRACIN_API_KEY is set)",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer"}
            schema["security"] = [{"bearer": []}]
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    if path in BearerAuth.OPEN:
                        operation["security"] = []
                    else:
                        operation.setdefault("responses", {})["401"] = unauthorized
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def app_from_env() -> FastAPI:
    """ASGI factory for `uvicorn --factory service.app:app_from_env` (settings from TRACIN_* variables)."""
    return create_app(Settings())
