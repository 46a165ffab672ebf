"""Launch the service with uvicorn: `tracin serve DIR [--host] [--port]` and `tracin demo` call `serve`.

The index is loaded and verified *before* uvicorn starts, so a bad index directory ends the command
with one clear line and exit status 2 instead of a traceback. When the server accepts connections it
prints the URLs and a ready-to-paste curl example. `--port 0` picks a free port (printed).

    python -m service.server [DIR] [--host H] [--port P]    # the rest from TRACIN_* variables
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn

from service.engine import Engine
from service.loading import ServiceStartupError, configure_threads, load_engine
from service.settings import Settings


def _compact(value: Any) -> Any:
    """Integral floats as ints and long texts cut at a word, so the printed curl example stays short."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return int(value)
    if isinstance(value, str) and len(value) > 240:
        return value[:240].rsplit(" ", 1)[0]
    if isinstance(value, list):
        return [_compact(v) for v in value]
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    return value


def curl_example(engine: Engine, base_url: str, api_key_set: bool) -> str:
    query = next((q for q in engine.queries if q.get("example") is not None), None)
    if query is not None:
        body = {"example": _compact(query["example"]), "k": 5}
    else:
        body = {"train_id": engine.examples[int(engine.si_order[0]) if engine.si_order.size else 0]["id"], "k": 5}
    auth = ' -H "Authorization: Bearer $TRACIN_API_KEY"' if api_key_set else ""
    data = json.dumps(body, separators=(",", ":"))
    return (f"curl -s -X POST {base_url}/influence -H 'Content-Type: application/json'{auth} "
            f"-d {shlex.quote(data)}")


def banner(engine: Engine, settings: Settings, host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    base = f"http://{shown}:{port}"
    m = engine.index_dir.manifest
    kind = "approximate" if engine.approximate else "exact"
    lines = [
        f"tracin-service ready: {engine.index_dir.path} ({engine.count} training examples, "
        f"{m['faiss']['factory']} {kind} index, task {m['task']['ref']}; loaded in {engine.load_seconds:.1f}s)",
        f"  API      {base}/",
        f"  docs     {base}/docs",
        f"  top self-influence  {base}/self-influence/top?k=10",
        "  try it:",
        f"    {curl_example(engine, base, settings.api_key is not None)}",
        "  (Ctrl-C stops the server)",
    ]
    return "\n".join(lines)


class _Server(uvicorn.Server):
    """uvicorn.Server that prints the banner once it accepts connections."""

    def __init__(self, config: uvicorn.Config, on_started):
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(index_dir: str | Path | None, host: str = "127.0.0.1", port: int = 8000,
          settings: Settings | None = None) -> int:
    """Load `index_dir` (refusing with a clear message), then serve it until interrupted. Returns the
    exit status: 0 after a clean shutdown, 2 when the index or the address cannot be used."""
    from pydantic import ValidationError

    overrides: dict[str, Any] = {"host": host, "port": port}
    if index_dir is not None:
        overrides["index_dir"] = Path(index_dir)
    try:
        settings = settings.model_copy(update=overrides) if settings is not None else Settings(**overrides)
    except ValidationError as exc:
        errors = "; ".join(f"TRACIN_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        print(f"tracin serve: error: invalid settings: {errors}", file=sys.stderr)
        return 2
    configure_threads(settings)
    try:
        engine = load_engine(settings)
    except ServiceStartupError as exc:
        print(f"tracin serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        sock = _bind(settings.host, settings.port)
    except OSError as exc:
        print(f"tracin serve: error: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    bound_port = sock.getsockname()[1]
    _log_to_stderr(settings.log_level)

    from service.app import create_app

    app = create_app(settings, engine=engine)
    from service.protocol import guarded_protocol

    config = uvicorn.Config(app, host=settings.host, port=bound_port, log_level=settings.log_level,
                            access_log=settings.access_log, lifespan="on", timeout_graceful_shutdown=5,
                            server_header=False, http=guarded_protocol(settings))
    server = _Server(config, lambda: print(banner(engine, settings, settings.host, bound_port), flush=True))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1


def _log_to_stderr(level: str) -> None:
    """From here on, the service's own log lines (reloads by SIGHUP or POST /admin/reload, refused versions,
    warnings) go to stderr at TRACIN_LOG_LEVEL, formatted like uvicorn's. Set once the index is loaded, so that
    a refused start stays the one line printed above."""
    logger = logging.getLogger("service")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper() if level.upper() in logging.getLevelNamesMapping() else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.server", description="serve a tracin index directory")
    parser.add_argument("dir", nargs="?", default=None, help="index directory (default: TRACIN_INDEX_DIR)")
    parser.add_argument("--host", default=None, help="default: TRACIN_HOST or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: TRACIN_PORT or 8000; 0 = any free port")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except Exception as exc:  # noqa: BLE001 - invalid environment variables
        print(f"tracin serve: error: invalid settings: {exc}", file=sys.stderr)
        return 2
    return serve(args.dir if args.dir is not None else settings.index_dir,
                 host=args.host if args.host is not None else settings.host,
                 port=args.port if args.port is not None else settings.port, settings=settings)


if __name__ == "__main__":
    sys.exit(main())
