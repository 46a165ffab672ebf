"""HTTP below the app: uvicorn's httptools protocol with JSON errors, bounded request heads and a head
deadline; and HEAD answered like GET.

`guarded_protocol(settings)` is the protocol class `tracin serve` gives uvicorn. Compared with uvicorn's own:

- a request head (request line + headers) that has not arrived TRACIN_HEADER_TIMEOUT_S seconds after its
  first byte gets 408 and the connection is closed; a connection that sends nothing for that long is
  closed (slowloris: headers that never finish are timed out like bodies, see service.errors.BodySizeLimit);
- a request target (path + query) over TRACIN_MAX_URL_BYTES gets 414, a head over TRACIN_MAX_HEADER_BYTES
  431, and any other request the parser refuses 400, each with the service's JSON error shape
  (service.errors) instead of uvicorn's plain-text "Invalid HTTP request received.".

These answers are written before any route runs, so they are not in the Prometheus request counts.
`HeadAsGet` (an ASGI middleware, in every app) runs a HEAD request as the GET of the same route; uvicorn
sends the status and headers without the body.
"""
from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import error_body


def json_error_response(status: int, code: str, field: str, message: str) -> bytes:
    """A whole HTTP/1.1 response in the service's JSON error shape, closing the connection."""
    detail = [{"loc": [field], "field": field, "msg": message, "type": code}]
    body = json.dumps(error_body(code, detail, f"{field}: {message}")).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; the response is in `GuardedHttpProtocol._refusal`."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HttpToolsProtocol with the limits of the module docstring (class attributes, set by
    `guarded_protocol`). After an error answer the connection is closed for writing and what the client
    still sends is read and dropped for `linger_s` seconds, so that it reads the answer instead of a
    connection reset."""

    header_timeout_s: float = 10.0
    max_url_bytes: int = 16 << 10
    max_header_bytes: int = 64 << 10
    linger_s: float = 2.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._refusal: bytes | None = None
        self._in_head = False  # a request head has begun and is not complete
        self._head_data = 0  # bytes received while in the head (a bound on a header that never ends)
        self._header_bytes = 0  # bytes of the complete headers so far
        self._lingering = False  # an error answer was sent: input is dropped until the close
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:  # an answer is on its way: not idle
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)
            return
        if self._in_head:
            self._answer_and_close(json_error_response(
                408, "header_timeout", "headers", f"the request line and headers did not arrive within "
                f"{self.header_timeout_s:g} s (TRACIN_HEADER_TIMEOUT_S)"))
        else:
            self.transport.close()

    def _answer_and_close(self, response: bytes) -> None:
        """Write `response`, close the writing side, drop further input, close after `linger_s`."""
        self._cancel_head_timer()
        self._lingering = True
        self.transport.write(response)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._head_timer = self.loop.call_later(self.linger_s, self.transport.close)

    def _refuse(self, status: int, code: str, field: str, message: str) -> None:
        self._refusal = json_error_response(status, code, field, message)
        raise _Refused(message)

    # -- the parser's callbacks and input -----------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._head_data += len(data)
            if self._head_data > self.max_header_bytes + self.max_url_bytes:  # a header that goes on and on
                self._refusal = json_error_response(431, "headers_too_large", "headers", f"the request head is "
                                                    f"larger than {self.max_header_bytes} bytes (TRACIN_MAX_HEADER_BYTES)")
                self.send_400_response("")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_data, self._header_bytes = True, 0, 0
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.max_url_bytes:
            self._refuse(414, "url_too_long", "url", f"the request target (path and query) is longer than "
                                                     f"{self.max_url_bytes} bytes (TRACIN_MAX_URL_BYTES)")

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.max_header_bytes:
            self._refuse(431, "headers_too_large", "headers", f"the request headers are larger than "
                                                              f"{self.max_header_bytes} bytes (TRACIN_MAX_HEADER_BYTES)")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        """The refusal prepared by a callback (414, 431), else 400 in the JSON error shape."""
        response = self._refusal or json_error_response(
            400, "bad_request", "request", "the request is not valid HTTP/1.1 (request line, header names or "
                                           "values, or framing)")
        self._refusal = None
        self._answer_and_close(response)


def guarded_protocol(settings: Any) -> type[GuardedHttpProtocol]:
    """GuardedHttpProtocol with `settings`' limits (service.settings.Settings), for uvicorn.Config(http=...)."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {
        "header_timeout_s": float(settings.header_timeout_s), "max_url_bytes": int(settings.max_url_bytes),
        "max_header_bytes": int(settings.max_header_bytes)})


class HeadAsGet:
    """HEAD runs as the GET of the same route (RFC 9110: same status and headers, no body); the server
    leaves out the body because its own scope still says HEAD. Metrics count it as HEAD."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            return await self.app(scope, receive, send)
        await self.app({**scope, "method": "GET", "tracin.head": True}, receive, send)
