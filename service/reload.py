"""Switching a running server to the newest version of its index: SIGHUP or POST /admin/reload.

`tracin index CONFIG --out DIR --update` (or `--remove-ids`) writes a new version of DIR and moves DIR's
CURRENT pointer to it (`indexer.store.versions`); a server started with `tracin serve DIR` keeps serving the
version it loaded until it is told to reload:

    kill -HUP <pid of tracin serve>
    curl -X POST -H "Authorization: Bearer $TRACIN_API_KEY" http://host:8000/admin/reload

A reload loads and verifies the version CURRENT names now, exactly as a start does (`service.loading.load_engine`:
checksums, signature, the consistency check, warm-up), in a worker thread while the old version goes on
answering; then `app.state.engine` is replaced by the new engine in one assignment. Every route takes the engine
once when its request starts, so a request in flight finishes on the version it started on and every request
that starts after the assignment sees the new one: nothing is dropped and no answer mixes two versions. A
reload that fails (a damaged or refused version) changes nothing: the old version goes on being served, and the
reason is logged and returned. One reload runs at a time: POST /admin/reload answers 409 while one is in
progress, and a SIGHUP that arrives meanwhile is run once the current reload has finished (the pointer may have
moved again). While both engines are alive the process holds two loaded indexes (memory).

The HTTP route needs TRACIN_API_KEY on the server (403 without it: a reload costs a full load, and an open
service must not let anyone trigger that); the bearer key is checked by `service.errors.BearerAuth` (401).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import APIRouter, Request

from service.errors import ApiError
from service.loading import ServiceStartupError, load_engine

log = logging.getLogger("service")


def version_info(engine: Any) -> dict[str, Any]:
    """What GET /index and the reload answers say about the version an engine serves: its number (1: a
    directory never updated, or its first build), the sha256 of its manifest (the identity of the version),
    its parent, what the update that wrote it added, how many training rows are marked removed, when it was
    written and when this server loaded it."""
    index_dir = engine.index_dir
    version = getattr(index_dir, "version", None)
    entry = index_dir.manifest.get("index_version") or {}
    removed = getattr(index_dir, "removed", None)
    return {
        "number": int(getattr(version, "number", None) or entry.get("number") or 1),
        "manifest_sha256": getattr(version, "manifest_sha256", None) or _manifest_sha256(index_dir.path),
        "parent": entry.get("parent"),
        "rows_added": entry.get("rows_added"),
        "checkpoints_added": entry.get("checkpoints_added"),
        "removed": int(removed.size) if removed is not None else 0,
        "created_at": index_dir.manifest.get("created_at"),
        "loaded_at": getattr(engine, "loaded_at", None),
    }


def _manifest_sha256(path) -> str | None:
    import hashlib

    try:
        return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass
class ReloadState:
    """One per app: whether a reload runs, whether a SIGHUP is waiting, and the last reload's outcome."""

    running: bool = False
    pending_signal: bool = False
    last: dict[str, Any] | None = None
    reloads: int = 0
    failures: int = 0
    tasks: set = field(default_factory=set)


def mark_loaded(engine: Any) -> None:
    engine.loaded_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


async def reload_index(app: Any, trigger: str) -> dict[str, Any]:
    """Load the version of the index directory that CURRENT names now and switch to it (see the module
    docstring). Returns {"reloaded", "changed", "trigger", "version", "previous", "seconds"} (and "error"
    when the new version was refused: the previous one is still served). Raises ApiError 409 while another
    reload is in progress, 503 before the first load."""
    state: ReloadState = app.state.reload
    old = getattr(app.state, "engine", None)
    if old is None or not getattr(app.state, "ready", False):
        raise ApiError(503, "not_ready", "index", "the index is not loaded yet; see GET /readyz", ["index"])
    if state.running:
        raise ApiError(409, "reload_in_progress", "reload", "a reload is in progress; the version served is "
                       f"{version_info(old)['number']} until it finishes (try again then)", ["reload"])
    state.running = True
    started = time.perf_counter()
    settings = app.state.settings
    previous = version_info(old)
    try:
        log.info("reload (%s): loading the current version of %s", trigger, settings.index_dir)
        try:
            new = await anyio.to_thread.run_sync(load_engine, settings)
        except ServiceStartupError as exc:
            state.failures += 1
            out = {"reloaded": False, "changed": False, "trigger": trigger, "error": str(exc), "version": previous,
                   "previous": previous, "seconds": round(time.perf_counter() - started, 3)}
            log.error("reload (%s) refused, still serving version %s: %s", trigger, previous["number"], exc)
            state.last = out
            return out
        mark_loaded(new)
        new.stats = getattr(old, "stats", None)
        app.state.engine = new  # the switch: requests that started before it keep the engine they took
        state.reloads += 1
        metrics = getattr(app.state, "metrics", None)
        if metrics is not None:
            metrics.index_examples.set(new.count)
            metrics.index_dim.set(int(new.index_dir.manifest["embedding_dim"]))
            metrics.load_seconds.set(new.load_seconds)
        current = version_info(new)
        out = {"reloaded": True, "changed": current["manifest_sha256"] != previous["manifest_sha256"],
               "trigger": trigger, "version": current, "previous": previous,
               "seconds": round(time.perf_counter() - started, 3)}
        log.info("reload (%s): now serving version %s (was %s) of %s, %d examples, in %.1fs", trigger,
                 current["number"], previous["number"], settings.index_dir, new.count, out["seconds"])
        state.last = out
        return out
    finally:
        state.running = False


def install_sighup(app: Any) -> bool:
    """SIGHUP -> a reload on the running event loop (a SIGHUP during a reload runs one more afterwards). Only
    from the main thread (where Python delivers signals); False where it cannot be installed."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        return False
    loop = asyncio.get_running_loop()

    def on_signal(signum, frame) -> None:
        loop.call_soon_threadsafe(_start_signal_reload, app)

    try:
        app.state.previous_sighup = signal.signal(signal.SIGHUP, on_signal)
    except (ValueError, OSError):
        return False
    return True


def restore_sighup(app: Any) -> None:
    previous = getattr(app.state, "previous_sighup", None)
    if previous is not None and threading.current_thread() is threading.main_thread():
        try:
            signal.signal(signal.SIGHUP, previous)
        except (ValueError, OSError):
            pass


def _start_signal_reload(app: Any) -> None:
    state: ReloadState = app.state.reload
    if state.running:
        state.pending_signal = True
        log.info("SIGHUP during a reload: another reload follows it")
        return
    task = asyncio.get_running_loop().create_task(_signal_reload(app))
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)


async def _signal_reload(app: Any) -> None:
    state: ReloadState = app.state.reload
    while True:
        state.pending_signal = False
        try:
            await reload_index(app, "SIGHUP")
        except ApiError as exc:  # not loaded yet
            log.warning("SIGHUP: no reload: %s", exc.message)
        if not state.pending_signal:
            return


def build_admin_router(settings: Any) -> APIRouter:
    """POST /admin/reload (and GET /admin/reload: the last reload's outcome)."""
    from service.schemas import ErrorResponse, ReloadResponse

    router = APIRouter()
    errors = {401: {"model": ErrorResponse, "description": "missing or wrong bearer key"},
              403: {"model": ErrorResponse, "description": "TRACIN_API_KEY is not set on this server: no HTTP reload"},
              409: {"model": ErrorResponse, "description": "a reload is in progress"},
              422: {"model": ErrorResponse, "description": "the new version was refused; the previous one is served"},
              503: {"model": ErrorResponse, "description": "the index is not loaded yet"}}

    def _allowed() -> None:
        if settings.api_key is None:
            raise ApiError(403, "forbidden", "authorization", "reloading over HTTP needs TRACIN_API_KEY on the server "
                           "(send SIGHUP to the tracin serve process instead)", ["header", "authorization"])

    @router.post("/admin/reload", response_model=ReloadResponse, responses=errors, tags=["service"],
                 summary="Serve the index version CURRENT names now (after tracin index --update)")
    async def admin_reload(request: Request) -> Any:
        """Load and verify the version of the index directory that its CURRENT pointer names now, then switch
        to it: requests in flight finish on the old version, later ones see the new one. A version that fails
        verification is refused (422, the reason in `message`) and the old one stays served."""
        _allowed()
        out = await reload_index(request.app, "POST /admin/reload")
        if not out["reloaded"]:
            raise ApiError(422, "reload_failed", "index", f"the new version was refused, still serving version "
                           f"{out['version']['number']}: {out['error']}", ["index"])
        return out

    @router.get("/admin/reload", response_model=ReloadResponse, responses=errors, tags=["service"],
                summary="The outcome of the last reload")
    async def last_reload(request: Request) -> Any:
        _allowed()
        state: ReloadState = request.app.state.reload
        engine = getattr(request.app.state, "engine", None)
        if state.last is None:
            current = version_info(engine) if engine is not None else None
            return {"reloaded": False, "changed": False, "trigger": None, "version": current, "previous": None,
                    "seconds": 0.0, "running": state.running}
        return {**state.last, "running": state.running}

    return router
