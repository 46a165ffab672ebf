"""Errors as JSON: every 4xx names the field at fault; bodies over the limit get 413.

Every error response has the same shape (also for FastAPI's own validation errors and for 404/405):

    {"error": "validation_error", "message": "example.pixels: List should have at least 64 items ...",
     "detail": [{"loc": ["body", "example", "pixels"], "field": "example.pixels", "msg": "...", "type": "..."}]}

The offending input is not echoed back (it may be huge, or a NaN that JSON cannot carry): an unknown
id, label or path is quoted at most once (in `detail[].msg`), cut to ECHO_CHARS characters; no
traceback ever reaches a client.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("service")

_LOC_ROOTS = ("body", "query", "path", "header", "cookie")
ECHO_CHARS = 100


def short(value: Any, limit: int = ECHO_CHARS) -> str:
    """repr(value) cut to `limit` characters (with the full length), for quoting user input."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class ServiceStartupError(RuntimeError):
    """The index directory cannot be served; the message says why (one line, for the operator)."""


class ApiError(Exception):
    """An error for the client: status code, machine-readable code, the field at fault, a message, and
    optionally the offending value (`echo`), quoted once and cut to ECHO_CHARS characters."""

    def __init__(self, status: int, code: str, field: str, message: str, loc: Sequence[str | int] | None = None,
                 echo: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.field, self.message, self.echo = status, code, field, message, echo
        self.loc = list(loc) if loc is not None else \
            ["body", *(int(p) if p.isdigit() else p for p in field.split("."))] if field else ["body"]
        self.headers = dict(headers or {})


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes")
        self.limit = limit


class BodyTimeout(StarletteHTTPException):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request body did not arrive within {seconds:g} s (TRACIN_BODY_TIMEOUT_S)",
                         headers={"Connection": "close"})
        self.seconds = seconds


def field_name(loc: Iterable[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in _LOC_ROOTS:
        parts = parts[1:] or parts
    return ".".join(parts) if parts else "body"


def error_body(status_code: str, detail: list[dict[str, Any]], message: str | None = None) -> dict[str, Any]:
    if message is None:
        message = "; ".join(f"{d['field']}: {d['msg']}" for d in detail[:5]) or status_code
    return {"error": status_code, "message": message, "detail": detail}


def error_response(status: int, code: str, field: str, message: str, loc: Sequence[str | int] | None = None,
                   headers: dict[str, str] | None = None, echo: Any = None) -> JSONResponse:
    """The JSON error shape for one field. `echo` (the offending value) is quoted once, in detail.msg,
    cut to ECHO_CHARS characters; `message` is `field: message` without it."""
    loc = list(loc) if loc is not None else [field]
    msg = message if echo is None else f"{message} (got {short(echo)})"
    detail = [{"loc": loc, "field": field, "msg": msg, "type": code}]
    return JSONResponse(error_body(code, detail, f"{field}: {message}"), status_code=status, headers=headers)


def _clean_msg(msg: Any) -> str:
    text = str(msg)
    return text[:500]


def _loc_part(part: Any) -> str | int:
    if isinstance(part, int) and not isinstance(part, bool):
        return part
    text = str(part)
    return text if len(text) <= ECHO_CHARS else f"<a key of {len(text)} characters>"  # e.g. a huge unknown key


def validation_detail(errors: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for err in errors[:20]:
        loc = [_loc_part(p) for p in err.get("loc", ())]
        msg = _clean_msg(err.get("msg", "invalid"))
        if err.get("type") == "json_invalid":  # loc is ("body", character offset)
            reason = (err.get("ctx") or {}).get("error")
            where = f" at character {loc[1]}" if len(loc) > 1 else ""
            msg = f"invalid JSON{where}" + (f": {_clean_msg(reason)}" if reason else "")
            loc = ["body"]
        out.append({"loc": loc, "field": field_name(loc), "msg": msg, "type": str(err.get("type", "value_error"))})
    return out


def non_finite_paths(value: Any, loc: tuple = (), limit: int = 5) -> list[tuple]:
    """Paths of NaN / +-Infinity floats inside a (validated, dumped) JSON-like value."""
    found: list[tuple] = []

    def walk(v: Any, path: tuple) -> None:
        if len(found) >= limit:
            return
        if isinstance(v, float):
            if not math.isfinite(v):
                found.append(path)
        elif isinstance(v, dict):
            for k, item in v.items():
                walk(item, path + (k,))
        elif isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                walk(item, path + (i,))

    walk(value, loc)
    return found


def reject_non_finite(value: Any, loc: tuple) -> None:
    paths = non_finite_paths(value, loc)
    if paths:
        detail = [{"loc": ["body", *p], "field": field_name(p), "msg": "must be a finite number (NaN and Infinity "
                   "are not allowed)", "type": "finite_number"} for p in paths]
        raise RequestValidationError([{"loc": d["loc"], "msg": d["msg"], "type": d["type"]} for d in detail])


def coerced_number_paths(raw: Any, validated: Any, loc: tuple = (), limit: int = 5) -> list[tuple]:
    """Paths where the raw JSON had a boolean or a string but the validated example holds a number:
    a lax coercion (`true` -> 1.0, `"3"` -> 3) that the service refuses. Walks both trees in parallel
    (dict keys, list positions) and ignores branches whose shapes differ (custom validators)."""
    found: list[tuple] = []

    def walk(r: Any, v: Any, path: tuple) -> None:
        if len(found) >= limit:
            return
        if isinstance(r, (bool, str)):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                found.append(path)
        elif isinstance(r, dict) and isinstance(v, dict):
            for key, item in r.items():
                if key in v:
                    walk(item, v[key], path + (key,))
        elif isinstance(r, list) and isinstance(v, (list, tuple)) and len(r) == len(v):
            for i, (a, b) in enumerate(zip(r, v)):
                walk(a, b, path + (i,))

    walk(raw, validated, loc)
    return found


def reject_coerced_numbers(raw: Any, validated: Any, loc: tuple) -> None:
    """422 naming each number field given as a boolean or a string (strict numbers)."""
    paths = coerced_number_paths(raw, validated, loc)
    if paths:
        raise RequestValidationError([{"loc": ["body", *p], "msg": "must be a JSON number (booleans and numeric "
                                       "strings are not numbers)", "type": "strict_number"} for p in paths])


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = validation_detail(list(exc.errors()))
    content_type = request.headers.get("content-type", "")
    if request.method == "POST" and "json" not in content_type.lower():
        for d in detail:
            if d["field"] == "body":
                d["msg"] += f" (the body must be JSON sent with Content-Type: application/json, got " \
                            f"{content_type or 'no Content-Type'!r})"
    return JSONResponse(error_body("validation_error", detail), status_code=422)


async def _api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    headers = {**({"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}), **exc.headers}
    return error_response(exc.status, exc.code, exc.field, exc.message, exc.loc, headers or None, exc.echo)


async def _client_gone(request: Request, exc: Exception) -> Response:
    """Nobody is left to read an answer (service.compute.ClientGone): the metrics count it as 499."""
    return Response(status_code=499)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "body_timeout", 413: "body_too_large", 414: "url_too_long",
               415: "unsupported_media_type", 422: "invalid", 431: "headers_too_large", 503: "overloaded"}


def _unreadable_body(cause: BaseException | None) -> str | None:
    """Why FastAPI could not parse a JSON body it read (its 400 names no reason)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 (byte {cause.start}: {cause.reason}); send JSON encoded as UTF-8"
    if isinstance(cause, RecursionError):
        return "the JSON body is nested too deeply"
    if isinstance(cause, ValueError):
        return f"the body is not valid JSON: {_clean_msg(cause)[:200]}"
    return None


async def _http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    if exc.status_code in (404, 405):
        return error_response(exc.status_code, code, "path", str(exc.detail), ["path"],
                              getattr(exc, "headers", None), echo=f"{request.method} {request.url.path}")
    if exc.status_code == 400:
        reason = _unreadable_body(exc.__cause__)
        if reason is not None:  # documented as a validation error of the body, like malformed JSON
            detail = [{"loc": ["body"], "field": "body", "msg": reason, "type": "json_invalid"}]
            return JSONResponse(error_body("validation_error", detail), status_code=422)
    return error_response(exc.status_code, code, "body", str(exc.detail), ["body"], getattr(exc, "headers", None))


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("internal_error", [], "internal server error (logged on the server)"),
                        status_code=500)


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(ApiError, _api_error_handler)
    from service.compute import ClientGone

    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unhandled)


# -- ASGI middlewares ----------------------------------------------------------------------------

async def send_json(send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None) -> None:
    import json

    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


def _too_large_body(limit: int) -> dict[str, Any]:
    msg = f"request body is larger than {limit} bytes"
    return error_body("body_too_large", [{"loc": ["body"], "field": "body", "msg": msg, "type": "body_too_large"}],
                      f"body: {msg}")


def _body_timeout(seconds: float) -> dict[str, Any]:
    msg = f"the request body did not arrive within {seconds:g} s (TRACIN_BODY_TIMEOUT_S)"
    return error_body("body_timeout", [{"loc": ["body"], "field": "body", "msg": msg, "type": "body_timeout"}],
                      f"body: {msg}")


class BodySizeLimit:
    """413 for request bodies over `max_bytes`: at once from Content-Length, or while streaming; 408
    when the whole body has not arrived `timeout_s` seconds after the request started (slow clients).

    The rest of an oversized body is read and dropped (up to `drain_bytes`, within the timeout) before
    answering, so the client gets the 413 instead of a connection reset in the middle of its upload."""

    def __init__(self, app, max_bytes: int, drain_bytes: int = 64 << 20, timeout_s: float | None = None):
        self.app, self.max_bytes, self.drain_bytes, self.timeout_s = app, max_bytes, drain_bytes, timeout_s

    async def _drain(self, receive, already: int) -> None:
        import anyio

        seen = already
        with anyio.move_on_after(self.timeout_s if self.timeout_s else None):
            while seen <= self.drain_bytes:
                message = await receive()
                if message["type"] != "http.request":
                    return
                seen += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                length = value
                break
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await send_json(send, 400, error_body("bad_request", [
                    {"loc": ["header", "content-length"], "field": "content-length",
                     "msg": "not an integer", "type": "bad_request"}], "content-length: not an integer"))
            if declared > self.max_bytes:
                if declared <= self.drain_bytes:
                    await self._drain(receive, 0)
                return await send_json(send, 413, _too_large_body(self.max_bytes), [(b"connection", b"close")])

        import anyio

        received = 0
        limit = self.max_bytes
        timeout = self.timeout_s
        deadline = anyio.current_time() + timeout if timeout else None
        body_done = False

        async def limited_receive():
            nonlocal received, body_done
            if body_done or deadline is None:
                message = await receive()
            else:
                try:
                    with anyio.fail_after(max(deadline - anyio.current_time(), 0.0)):
                        message = await receive()
                except TimeoutError:
                    raise BodyTimeout(timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    body_done = True
                if received > limit:
                    if message.get("more_body", False):
                        await self._drain(receive, received)
                    raise BodyTooLarge(limit)
            else:
                body_done = True
            return message

        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await send_json(send, 413, _too_large_body(limit), [(b"connection", b"close")])
        except BodyTimeout:
            if not started:
                await send_json(send, 408, _body_timeout(timeout), [(b"connection", b"close")])


class BearerAuth:
    """Every route but the health probes needs `Authorization: Bearer <key>` when a key is set."""

    OPEN = frozenset({"/healthz", "/readyz"})

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.OPEN or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        import hmac

        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.strip().partition(b" ")
        valid = scheme.lower() == b"bearer"  # the scheme is case-insensitive (RFC 9110); the key is not
        if not (hmac.compare_digest(token.strip(), self.expected) and valid):
            msg = "missing bearer token" if not given else "invalid bearer token"
            body = error_body("unauthorized", [{"loc": ["header", "authorization"], "field": "authorization",
                                                 "msg": msg, "type": "unauthorized"}], f"authorization: {msg}")
            return await send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware, but a rejected preflight answers the JSON error shape (400) naming
    what was refused (origin, method, headers) instead of plain text."""

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        text = bytes(response.body).decode(errors="replace")
        failures = [f.strip() for f in text.replace("Disallowed CORS", "").split(",") if f.strip()]
        fields = {"origin": "origin", "method": "access-control-request-method",
                  "headers": "access-control-request-headers",
                  "private-network": "access-control-request-private-network"}
        detail = [{"loc": ["header", fields.get(f, f)], "field": fields.get(f, f),
                   "msg": f"this {f} is not allowed by TRACIN_CORS_ORIGINS / the service's CORS policy",
                   "type": "cors_rejected"} for f in failures]
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse(error_body("cors_rejected", detail), status_code=400, headers=headers)
