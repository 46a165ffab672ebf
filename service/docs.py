"""The API docs pages, `/docs` (Swagger UI) and `/redoc` (ReDoc), that work offline.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so they are blank without internet. Here the
same pages (FastAPI's `get_swagger_ui_html` / `get_redoc_html`) point at the files that the PyPI package
`fastapi-offline` ships (Swagger UI 5, ReDoc 2; MIT licensed, like the bundles it vendors), served by the
dashboard middleware under `/dashboard/vendor/`.

Like the dashboard's files, the pages and their assets hold no data, so they are served without the API
key: they must load before a user can type one. The OpenAPI document itself (`/openapi.json`, it holds a
held-out example of the task) stays behind the key; `docs-auth.js` adds the key that the dashboard stored
in this browser (`localStorage["tracin.apiKey"]`) to the docs pages' own same-origin requests, and says
where to enter one when the service answers 401.

Each page gets a Content-Security-Policy like the dashboard's: scripts from this origin only, plus the one
inline script of FastAPI's Swagger page, allowed by its sha256. Styles may be inline (Swagger UI and ReDoc
inject them); ReDoc runs its search in a worker made from a blob: URL.
"""
from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from pathlib import Path

VENDOR = "vendor"  # /dashboard/vendor/<file>
VENDOR_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
PAGES = {"/docs": "swagger", "/redoc": "redoc"}
TITLE = "tracin-service"
OPENAPI_URL = "/openapi.json"

_CSP = ("default-src 'self'; script-src 'self'{hashes}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; object-src 'none'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'")
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def vendor_dir() -> Path:
    """The directory of the Swagger UI / ReDoc files (from the `fastapi-offline` package)."""
    try:
        import fastapi_offline
    except ImportError as exc:  # a core dependency: only a broken install gets here
        raise RuntimeError("the API docs need the package fastapi-offline (pip install fastapi-offline)") from exc
    directory = Path(fastapi_offline.__file__).with_name("static")
    missing = [name for name in VENDOR_FILES if not (directory / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline in {directory} lacks {', '.join(missing)}")
    return directory


#: resources a vendored file would fetch from the internet -> what it gets instead (ReDoc's footer shows
#: "API docs by Redocly" with a logo from its CDN: an empty inline SVG keeps /redoc fully offline)
OFFLINE_REPLACEMENTS = {
    "redoc.standalone.js": [(b'"https://cdn.redoc.ly/redoc/logo-mini.svg"',
                             b'"data:image/svg+xml,%3Csvg xmlns=%27http://www.w3.org/2000/svg%27/%3E"')],
}
#: hosts no served file may load anything from (checked on the replaced bytes)
CDN_HOSTS = (b"cdn.redoc.ly", b"cdn.jsdelivr.net", b"unpkg.com", b"fonts.googleapis.com")


@lru_cache(maxsize=1)
def vendor_files() -> dict[str, bytes]:
    """The vendored files, read once per process (about 2.8 MB), with the internet resources of
    OFFLINE_REPLACEMENTS replaced. Raises RuntimeError when a file still names a CDN host (a new
    fastapi-offline version: add its replacement) so that the docs never load anything from outside."""
    directory = vendor_dir()
    files = {name: (directory / name).read_bytes() for name in VENDOR_FILES}
    for name, replacements in OFFLINE_REPLACEMENTS.items():
        for old, new in replacements:
            files[name] = files[name].replace(old, new)
    for name, data in files.items():
        named = [host.decode() for host in CDN_HOSTS if host in data]
        if named:
            raise RuntimeError(f"{directory / name} loads from {', '.join(named)}: the API docs would not be offline "
                               "(service/docs.py OFFLINE_REPLACEMENTS)")
    return files


@lru_cache(maxsize=16)
def page(kind: str, root: str = "") -> tuple[bytes, str]:
    """(HTML, Content-Security-Policy) of the docs page `kind` ("swagger" or "redoc") under `root_path`."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

    static = f"{root}/dashboard"
    assets = f"{static}/{VENDOR}"
    if kind == "swagger":
        html = get_swagger_ui_html(openapi_url=root + OPENAPI_URL, title=f"{TITLE} - Swagger UI",
                                   swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{assets}/swagger-ui.css",
                                   swagger_favicon_url=f"{assets}/favicon.png",
                                   swagger_ui_parameters={"persistAuthorization": True}).body.decode()
    elif kind == "redoc":
        html = get_redoc_html(openapi_url=root + OPENAPI_URL, title=f"{TITLE} - ReDoc",
                              redoc_js_url=f"{assets}/redoc.standalone.js", redoc_favicon_url=f"{assets}/favicon.png",
                              with_google_fonts=False).body.decode()
    else:
        raise ValueError(f"unknown docs page {kind!r}")
    # First thing in <head>: the key helper, so that it wraps fetch before Swagger UI / ReDoc start.
    helper = f'<script src="{static}/docs-auth.js"></script>'
    html = html.replace("<head>", "<head>\n    " + helper, 1) if "<head>" in html else helper + html
    if "http://" in html.replace("http://www.w3.org", "") or "https://" in html:
        raise RuntimeError(f"the {kind} docs page names an external URL")  # FastAPI changed its template
    hashes = "".join(f" 'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                     for s in _INLINE_SCRIPT.findall(html))
    return html.encode(), _CSP.format(hashes=hashes)
