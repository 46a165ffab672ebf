"""Back-pressure and slow clients against a real `tracin serve` (issue 22, item 3), and the HTTP layer's own
answers (item 4): a bounded queue in front of the compute slots answers 503 with Retry-After beyond it, a
client that leaves while queued is counted as 499 and its work never runs, request heads that never finish
are timed out, and requests the HTTP parser refuses get the JSON error shape.

No assertion here is on a duration: outcomes and the counters of GET /metrics only. The socket timeouts and
polling deadlines only guard against a hung test.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import pytest

from tests.service_support import digits_index, start_server

GUARD = 120.0  # seconds: only a bound on a hung test


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until(predicate, what: str):
    deadline = time.monotonic() + GUARD
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def raw(base_url: str, data: bytes, timeout: float = 30.0) -> bytes:
    """Send `data` on a new connection and read until the server closes it."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return int(head.split(b" ")[1]), json.loads(body)


@pytest.fixture(scope="module")
def max_cost(digits_server):
    """The most expensive request the defaults allow: k = TRACIN_MAX_K, rerank = TRACIN_MAX_RERANK."""
    example = httpx.get(digits_server.base_url + "/queries", params={"limit": 1}).json()["items"][0]["example"]
    return {"example": example, "k": 100, "rerank": 1000}


@pytest.fixture(scope="module")
def digits_server():
    """One compute slot and a queue of 2; 1 s for a request head."""
    server = start_server(digits_index(), env={"TRACIN_COMPUTE_THREADS": "1", "TRACIN_MAX_QUEUE": "2",
                                               "TRACIN_HEADER_TIMEOUT_S": "1"})
    yield server
    server.stop()


def test_beyond_the_queue_requests_get_503_with_retry_after(digits_server, max_cost):
    """24 max-cost requests at once on 1 slot + a queue of 2: at most 3 are taken, the others are refused
    at once with 503 + Retry-After (none waits, none is a 500), and the server answers normally after."""
    clients = 24
    barrier = threading.Barrier(clients)
    answers: list[httpx.Response | None] = [None] * clients

    def one(i: int) -> None:
        with httpx.Client(base_url=digits_server.base_url, timeout=GUARD) as client:
            client.get("/healthz")  # connected before the barrier: the posts arrive together
            barrier.wait()
            answers[i] = client.post("/influence", json=max_cost)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GUARD)
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 503}, statuses
    refused = [a for a in answers if a.status_code == 503]
    assert refused and statuses.count(200) >= 1, statuses
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        body = r.json()
        assert body["error"] == "overloaded" and body["detail"][0]["field"] == "request", body
        assert "TRACIN_MAX_QUEUE=2" in body["message"]
    text = httpx.get(digits_server.base_url + "/metrics").text
    assert metric(text, "tracin_compute_requests_total", route="/influence", outcome="refused") == len(refused)
    assert metric(text, "tracin_compute_requests_total", route="/influence", outcome="computed") == \
        statuses.count(200)
    assert metric(text, "tracin_http_requests_total", route="/influence", status="503") == len(refused)
    # healthy after the burst
    assert httpx.get(digits_server.base_url + "/readyz").status_code == 200
    assert httpx.post(digits_server.base_url + "/influence", json=max_cost, timeout=GUARD).status_code == 200


def test_a_client_that_leaves_while_queued_is_499_and_never_computed(max_cost):
    """One slot, a long queue: 16 max-cost requests, then one more sent on a raw socket that is closed while
    the request waits. It is counted as 499 and as abandoned, and only the 16 were computed."""
    server = start_server(digits_index(), env={"TRACIN_COMPUTE_THREADS": "1", "TRACIN_MAX_QUEUE": "64"})
    try:
        url = server.base_url

        def counts() -> dict[str, float]:
            text = httpx.get(url + "/metrics").text
            out = {o: metric(text, "tracin_compute_requests_total", route="/influence", outcome=o)
                   for o in ("queued", "computed", "finished", "abandoned", "refused")}
            out["499"] = metric(text, "tracin_http_requests_total", route="/influence", status="499")
            return out

        ahead = 16
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(
            httpx.post(url + "/influence", json=max_cost, timeout=GUARD).status_code)) for _ in range(ahead)]
        for t in threads:
            t.start()
        wait_until(lambda: counts()["queued"] == ahead, "the 16 requests queued")
        body = json.dumps({**max_cost, "k": 7}).encode()
        host, port = url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.sendall(b"POST /influence HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_until(lambda: counts()["queued"] == ahead + 1, "the 17th request queued")
        sock.close()  # the client goes away while its request waits
        for t in threads:
            t.join(GUARD)
        final = wait_until(lambda: (c := counts())["finished"] == ahead and c["abandoned"] == 1 and c, "the queue empty")
        assert results == [200] * ahead
        assert final["computed"] == ahead, final  # the abandoned request never ran
        assert final["499"] == 1 and final["refused"] == 0, final
        text = httpx.get(url + "/metrics").text
        assert metric(text, "tracin_compute_queued") == 0 and metric(text, "tracin_compute_running") == 0
    finally:
        server.stop()


def test_a_request_head_that_never_finishes_is_timed_out(digits_server):
    """Slowloris: a head trickled one header line at a time past TRACIN_HEADER_TIMEOUT_S gets 408 JSON and
    the connection is closed while the client is still sending."""
    host, port = digits_server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /index HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for i in range(400):  # at most 400 lines (the guard); the server ends it long before
            try:
                sock.sendall(b"X-Slow-%d: 1\r\n" % i)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sock.settimeout(0.05)
            try:
                answer = sock.recv(65536)
            except socket.timeout:
                continue
            finally:
                sock.settimeout(30)
            closed = True
            break
        assert closed, "the server never ended the trickled head"
        answer += b"".join(iter(lambda: sock.recv(65536), b""))
    status, body = status_and_json(answer)
    assert status == 408 and body["error"] == "header_timeout" and body["detail"][0]["field"] == "headers"
    assert "TRACIN_HEADER_TIMEOUT_S" in body["message"]


def test_an_idle_connection_is_closed(digits_server):
    assert raw(digits_server.base_url, b"") == b""  # nothing sent: closed without an answer
    status, body = status_and_json(raw(digits_server.base_url, b"GET /healthz HTTP/1.1\r\nHost: x"))
    assert status == 408 and body["error"] == "header_timeout"


@pytest.mark.parametrize("request_bytes,status,code,field", [
    (b"GET /examples/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "url_too_long", "url"),
    (b"GET /index?label=" + b"9" * 300_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "url_too_long", "url"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "headers_too_large",
     "headers"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(1000))
     + b"\r\n", 431, "headers_too_large", "headers"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: \x7f\r\n\r\n", 400, "bad_request", "request"),
    (b"NOT HTTP AT ALL\r\n\r\n", 400, "bad_request", "request"),
], ids=["url-20k", "query-300k", "header-70k", "1000-headers", "control-char", "garbage"])
def test_requests_the_parser_refuses_get_the_json_error_shape(digits_server, request_bytes, status, code, field):
    got, body = status_and_json(raw(digits_server.base_url, request_bytes))
    assert got == status and body["error"] == code and body["detail"][0]["field"] == field, body
    assert httpx.get(digits_server.base_url + "/healthz").status_code == 200
