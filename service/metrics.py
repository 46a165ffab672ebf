"""Prometheus metrics (one registry per app, so several apps can live in one process, e.g. tests)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tracin_http_requests_total", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("tracin_http_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("tracin_http_requests_in_flight", "HTTP requests being served", registry=r)
        self.stage = Histogram("tracin_influence_stage_seconds", "POST /influence time by stage "
                               "(predict, embed, search, lookup)", ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.index_examples = Gauge("tracin_index_examples", "training examples in the served index", registry=r)
        self.index_dim = Gauge("tracin_index_embedding_dim", "embedding dimension of the served index", registry=r)
        self.ready = Gauge("tracin_ready", "1 when the index is loaded and the service answers queries", registry=r)
        self.load_seconds = Gauge("tracin_index_load_seconds", "time to load and verify the index", registry=r)
        self.compute = Counter("tracin_compute_requests_total", "requests for a compute slot (service.compute) by "
                               "route and outcome: queued (entered the queue), computed (got a slot and ran), "
                               "finished, refused (503: queue full), abandoned (client gone while queued: never "
                               "computed)", ["route", "outcome"], registry=r)
        self.compute_queued = Gauge("tracin_compute_queued", "requests waiting for a compute slot", registry=r)
        self.compute_running = Gauge("tracin_compute_running", "requests computing in a slot", registry=r)


DISCONNECTED = "499"  # the client went away before the response was complete (nginx's code)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (not the raw path). A request whose
    client disconnected before the response was complete is counted with status "499", not with the
    status of the answer nobody received."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        started = time.perf_counter()
        complete = disconnected = False

        async def tracking_receive():
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect" and not complete:
                disconnected = True
            return message

        async def tracking_send(message):
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, tracking_receive, tracking_send)
        except OSError:  # the connection went away while answering
            disconnected = True
            raise
        finally:
            if disconnected:
                status = DISCONNECTED
            self.metrics.in_flight.dec()
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            method = "HEAD" if scope.get("tracin.head") else scope.get("method", "")  # service.protocol.HeadAsGet
            self.metrics.requests.labels(name, method, str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)
