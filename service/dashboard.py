"""The influence dashboard: static files in `service/static/`, served by the service itself.

    mount_dashboard(app)      # in create_app, after the routes

What is served (GET and HEAD only):

    /                  the dashboard page, for browsers (requests whose Accept header names text/html);
                       every other client still gets the JSON service links of the `/` API route
    /dashboard, /dashboard/           a redirect to / (the page's relative asset URLs need one place)
    /dashboard/<file>                 its assets (app.js, style.css, ...), a fixed list read at mount time
    /docs, /redoc                     the API docs pages (Swagger UI, ReDoc), offline: see service/docs.py
    /dashboard/vendor/<file>          their Swagger UI / ReDoc files (from the fastapi-offline package)

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
    __slots__ = ("body", "content_type", "etag", "csp")

    def __init__(self, body: bytes, content_type: str, csp: str = CSP):
        self.body = body
        self.content_type = content_type
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        self.csp = csp  # sent with HTML


def _type_of(name: str) -> str:
    return _TYPES.get(Path(name).suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


_DOCS_ASSETS: dict[str, _Asset] = {}  # the docs pages and vendored files, built on first request


def docs_asset(path: str, root: str) -> _Asset | None:
    """The /docs or /redoc page, or a vendored file (name after /dashboard/vendor/), or None."""
    from service import docs

    key = f"{root}|{path}"
    if key not in _DOCS_ASSETS:
        if path in docs.PAGES:
            body, csp = docs.page(docs.PAGES[path], root)
            _DOCS_ASSETS[key] = _Asset(body, _TYPES[".html"], csp)
        elif path.startswith(f"{PREFIX}/{docs.VENDOR}/"):
            body = docs.vendor_files().get(path.rsplit("/", 1)[1])
            if body is None:
                return None
            _DOCS_ASSETS[key] = _Asset(body, _type_of(path))
        else:
            return None
    return _DOCS_ASSETS[key]


def load_assets(directory: Path = STATIC_DIR) -> dict[str, _Asset]:
    """Every regular file directly in `directory` (no sub-directories, no dot files), read once."""
    assets: dict[str, _Asset] = {}
    if not directory.is_dir():
        raise RuntimeError(f"dashboard assets not found: {directory}")
    for path in sorted(directory.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            assets[path.name] = _Asset(path.read_bytes(), _type_of(path.name))
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

    def __init__(self, app, assets: dict[str, _Asset] | None = None, docs: bool = True):
        self.app = app
        self.assets = assets if assets is not None else load_assets()
        self.docs = docs

    def _asset_for(self, scope: dict[str, Any]) -> _Asset | None | bool:
        """The asset to serve; False: not a dashboard path; True: redirect to the page; None: unknown file."""
        path = scope.get("path", "")
        if path == "/":
            return self.assets["index.html"] if wants_html(scope) else False
        if path in (PREFIX, PREFIX + "/"):
            return True
        if self.docs and (path in ("/docs", "/redoc") or path.startswith(PREFIX + "/vendor/")):
            return docs_asset(path, scope.get("root_path") or "")
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
            headers.append((b"content-security-policy", asset.csp.encode()))
        if _header(scope, b"if-none-match") == asset.etag.encode():
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        headers.append((b"content-length", str(len(asset.body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else asset.body})


def mount_dashboard(app, directory: Path = STATIC_DIR, docs: bool = True) -> None:
    """Serve the dashboard from `app` (call before the app handles its first request; idempotent).
    With `docs`, also the offline /docs and /redoc pages (create the app with docs_url=None, redoc_url=None)."""
    from starlette.middleware import Middleware

    from service.errors import BearerAuth

    stack = app.user_middleware
    if any(getattr(m, "cls", None) is DashboardMiddleware for m in stack):
        return  # already mounted
    if getattr(app, "middleware_stack", None) is not None:
        raise RuntimeError("mount_dashboard must be called before the app starts")
    entry = Middleware(DashboardMiddleware, assets=load_assets(directory), docs=docs)
    at = next((i for i, m in enumerate(stack) if getattr(m, "cls", None) is BearerAuth), len(stack))
    stack.insert(at, entry)
