"""Back-pressure in front of the compute slots: a bounded queue, 503 beyond it, queued work cancelled when
its client goes away.

A request that needs gradient or search work (POST /influence, GET /label-review/export) takes one of
TRACIN_COMPUTE_THREADS slots; while all are busy it waits in a queue of at most TRACIN_MAX_QUEUE requests.
Beyond that it is answered at once with 503 and a `Retry-After` header (seconds, estimated from the mean
time of recent work), instead of piling up behind the others. A client that disconnects while its request
waits is noticed (the ASGI `http.disconnect` message), its request leaves the queue and is never computed;
the metrics middleware counts it as status 499. Work already running in a thread finishes (a thread cannot
be interrupted); its answer is dropped.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import anyio
from starlette.requests import Request

from service.errors import ApiError


class ClientGone(Exception):
    """The client disconnected while its request waited for a compute slot (never computed)."""


class ComputeQueue:
    """`slots` requests compute at once, at most `max_queue` wait; see the module docstring.

    `metrics` (service.metrics.Metrics, optional) gets the queue length, the running count, and one count
    per request computed, refused (503) or abandoned while queued (client gone)."""

    def __init__(self, slots: int, max_queue: int, metrics: Any = None):
        if slots < 1 or max_queue < 0:
            raise ValueError(f"compute slots must be >= 1 and the queue >= 0, got {slots} and {max_queue}")
        self.slots, self.max_queue, self.metrics = slots, max_queue, metrics
        self._slots = anyio.CapacityLimiter(slots)
        self._threads = anyio.CapacityLimiter(slots)  # the worker threads (anyio's default pool has 40)
        self.queued = 0
        self.running = 0
        self._mean_seconds = 0.0  # exponentially weighted mean of recent work, for Retry-After

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the work ahead of it spread over the slots (1..60)."""
        ahead = (self.queued + self.running) / self.slots
        return int(min(60, max(1, math.ceil(ahead * max(self._mean_seconds, 0.05)))))

    def _count(self, what: str, route: str) -> None:
        if self.metrics is not None:
            self.metrics.compute.labels(route, what).inc()
            self.metrics.compute_queued.set(self.queued)
            self.metrics.compute_running.set(self.running)

    async def run(self, request: Request, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a worker thread once a slot is free. Raises ApiError 503 (with Retry-After) when
        the queue is full, ClientGone when the client disconnected while waiting."""
        route = getattr(request.scope.get("route"), "path", None) or request.url.path
        if self.queued >= self.max_queue and self._slots.available_tokens == 0:
            self._count("refused", route)
            seconds = self.retry_after()
            raise ApiError(503, "overloaded", "request",
                           f"the service is busy: {self.running} requests computing and {self.queued} waiting "
                           f"(TRACIN_MAX_QUEUE={self.max_queue}); retry in {seconds} s", ["request"],
                           headers={"Retry-After": str(seconds)})
        self.queued += 1
        self._count("queued", route)
        gone = acquired = False
        try:
            async with anyio.create_task_group() as group:
                async def watch() -> None:  # the request body is read already: the next message is a disconnect
                    nonlocal gone
                    while (await request.receive())["type"] != "http.disconnect":
                        pass
                    gone = True
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                await self._slots.acquire()
                acquired = True
                group.cancel_scope.cancel()  # stop watching: the slot is ours
        finally:
            self.queued -= 1
        if gone:
            if acquired:  # the slot came in the same step as the disconnect
                self._slots.release()
            self._count("abandoned", route)
            raise ClientGone()
        self.running += 1
        self._count("computed", route)
        started = anyio.current_time()
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._threads)
        finally:
            self.running -= 1
            took = anyio.current_time() - started
            self._mean_seconds = took if self._mean_seconds == 0 else 0.8 * self._mean_seconds + 0.2 * took
            self._slots.release()
            self._count("finished", route)
