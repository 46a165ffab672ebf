"""The influence dashboard: static files in `service/static/`, served by the service itself.

    mount_dashboard(app)      # in create_app, after the routes

What is served (GET and HEAD only):

    /                  the dashboard page, for browsers (requests whose Accept header names text/html);
                       every other client still gets the JSON service links of the `/` API route
    /dashboard, /dashboard/           a redirect to / (the page's relative asset URLs need one place)
    /dashboard/<file>                 its assets (app.js, style.css, ...), a fixed list read at mount time

The page is a plain client of the public REST API (same origin, no build step, nothing loaded from
the internet; a Content-Security-Policy header enforces the last point in the browser). Its files hold
no data, so they are served *outside* the bearer-key check: the page must load before a user can type
the key into it. Every API call the page makes is still checked. This is an ASGI middleware placed just
outside `BearerAuth` (inside metrics and CORS) rather than a route, because the key check is a
middleware and would answer 401 before any route ran.
"""
from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path
from typing import Any

STATIC_DIR = Path(__file__).with_name("static")
PREFIX = "/dashboard"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
          ".json": "application/json"}


class _Asset:
    __slots__ = ("body", "content_type", "etag")

    def __init__(self, body: bytes, content_type: str):
        self.body = body
        self.content_type = content_type
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def load_assets(directory: Path = STATIC_DIR) -> dict[str, _Asset]:
    """Every regular file directly in `directory` (no sub-directories, no dot files), read once."""
    assets: dict[str, _Asset] = {}
    if not directory.is_dir():
        raise RuntimeError(f"dashboard assets not found: {directory}")
    for path in sorted(directory.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            ctype = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            assets[path.name] = _Asset(path.read_bytes(), ctype)
    if "index.html" not in assets:
        raise RuntimeError(f"dashboard assets not found: {directory / 'index.html'}")
    return assets


def _header(scope: dict[str, Any], name: bytes) -> bytes:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return b""


def wants_html(scope: dict[str, Any]) -> bool:
    return b"text/html" in _header(scope, b"accept").lower()


class DashboardMiddleware:
    """Answers the dashboard's paths; passes everything else to the app unchanged."""

    def __init__(self, app, assets: dict[str, _Asset] | None = None):
        self.app = app
        self.assets = assets if assets is not None else load_assets()

    def _asset_for(self, scope: dict[str, Any]) -> _Asset | None | bool:
        """The asset to serve; False: not a dashboard path; True: redirect to the page; None: unknown file."""
        path = scope.get("path", "")
        if path == "/":
            return self.assets["index.html"] if wants_html(scope) else False
        if path in (PREFIX, PREFIX + "/"):
            return True
        if path.startswith(PREFIX + "/"):
            return self.assets.get(path[len(PREFIX) + 1:])
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        asset = self._asset_for(scope)
        if asset is False:
            return await self.app(scope, receive, send)
        if asset is True:
            root = (scope.get("root_path") or "") + "/"
            await send({"type": "http.response.start", "status": 307,
                        "headers": [(b"location", root.encode()), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        if asset is None:
            from service.errors import error_body, send_json

            msg = f"GET {scope.get('path')}: no such dashboard file"
            return await send_json(send, 404, error_body("not_found", [
                {"loc": ["path"], "field": "path", "msg": msg, "type": "not_found"}], f"path: {msg}"))
        headers = [(b"content-type", asset.content_type.encode()), (b"etag", asset.etag.encode()),
                   (b"cache-control", b"no-cache"), (b"x-content-type-options", b"nosniff"),
                   (b"referrer-policy", b"no-referrer"), (b"vary", b"Accept")]
        if asset.content_type.startswith("text/html"):
            headers.append((b"content-security-policy", CSP.encode()))
        if _header(scope, b"if-none-match") == asset.etag.encode():
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        headers.append((b"content-length", str(len(asset.body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else asset.body})


def mount_dashboard(app, directory: Path = STATIC_DIR) -> None:
    """Serve the dashboard from `app` (call before the app handles its first request; idempotent)."""
    from starlette.middleware import Middleware

    from service.errors import BearerAuth

    stack = app.user_middleware
    if any(getattr(m, "cls", None) is DashboardMiddleware for m in stack):
        return  # already mounted
    if getattr(app, "middleware_stack", None) is not None:
        raise RuntimeError("mount_dashboard must be called before the app starts")
    entry = Middleware(DashboardMiddleware, assets=load_assets(directory))
    at = next((i for i, m in enumerate(stack) if getattr(m, "cls", None) is BearerAuth), len(stack))
    stack.insert(at, entry)
