"""Out-of-distribution warnings for POST /influence: a query whose inputs fall far outside the ranges of
the training inputs recorded at index time (`indexer.build.input_ranges`) is answered as usual, with a
`warnings` list that says in words what is off (another scale, a background unlike the training data,
ids never seen in training). Advisory: a warning never turns an answer into an error."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("service")


def input_warnings(engine: Any, req: Any) -> list[str]:
    """Warnings for the request's `example` (none for train_id queries, which are training examples, and
    none for an index built before input ranges were recorded)."""
    return example_warnings(engine, getattr(req, "example", None))


def example_warnings(engine: Any, example: Any) -> list[str]:
    """Warnings for one validated example (none for None, and none without recorded input ranges)."""
    ranges = getattr(engine, "input_ranges", None)
    if ranges is None or example is None:
        return []
    try:
        inputs = engine.task.encode([example])  # the task's own encoding, as the query was embedded
        return ranges.check(inputs)
    except Exception as exc:  # noqa: BLE001 - advisory only; the answer itself was computed already
        log.warning("input range check skipped: %s: %s", type(exc).__name__, exc)
        return []
