"""Activation (gradient) checkpointing run as a plain forward while gradients are captured.

`torch.utils.checkpoint.checkpoint(fn, *args)` only trades memory for recomputation: its value and its
gradients are those of `fn(*args)`. Its two implementations do not fit per-example capture, though:

  reentrant      runs `fn` under no_grad and re-runs it inside backward. Parameters inside `fn` get a
                 gradient only when an *input* of the checkpoint requires grad, and `torch.autograd.grad`
                 refuses it outright. Capture freezes the parameters and feeds inputs that do not require
                 grad, so without care the block's output is a constant: an all-zero index.
  non-reentrant  re-runs `fn` during backward: forward hooks fire twice per call.

`run_checkpoints_plainly()` makes both run `fn(*args, **kwargs)` once, as the plain forward the checkpoint
stands for (gradients identical by definition). It replaces, while any capture is in progress, the two
module-level names `checkpoint()` looks up on every call (`CheckpointFunction` for reentrant,
`_checkpoint_without_reentrant_generator` otherwise), so it works however the model reaches
`checkpoint`: `torch.utils.checkpoint.checkpoint(...)`, a name imported from it, a `functools.partial`
of it (Hugging Face's `_gradient_checkpointing_func`), or `checkpoint_sequential`.

The replacement is process-wide while in force (reference-counted across threads): a training loop
running in another thread of the same process at that moment would also run its checkpoints plainly
(same values and gradients, more memory). On first use a self-test checks that the replacement takes
effect on this torch version; if it does not, checkpointed models are caught by the capture's
zero-gradient checks instead (`indexer.capture.selfcheck`) and refused, never indexed as zeros.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
import torch.utils.checkpoint as _checkpoint

_NAMES = ("CheckpointFunction", "_checkpoint_without_reentrant_generator")
_lock = threading.Lock()
_depth = 0
_saved: dict[str, Any] = {}
_works: bool | None = None  # the self-test's verdict (None: not run yet)


class _PlainFunction:
    """Stands in for `CheckpointFunction`: `checkpoint()` calls `CheckpointFunction.apply(fn, preserve, *args)`."""

    @staticmethod
    def apply(function, preserve_rng_state, *args):
        return function(*args)


def _plain_generator(*args, **kwargs):
    """Stands in for `_checkpoint_without_reentrant_generator`: `checkpoint()` advances it once before calling
    `fn(*args, **kwargs)` itself and once after (StopIteration = return fn's value)."""
    yield


def _install() -> bool:
    if not all(hasattr(_checkpoint, name) for name in _NAMES):
        return False
    for name in _NAMES:
        _saved[name] = getattr(_checkpoint, name)
    _checkpoint.CheckpointFunction = _PlainFunction
    _checkpoint._checkpoint_without_reentrant_generator = _plain_generator
    return True


def _restore() -> None:
    for name, value in _saved.items():
        setattr(_checkpoint, name, value)
    _saved.clear()


def _self_test() -> bool:
    """Both kinds of checkpoint, under the replacement, call the function once and give the gradient of a
    parameter used inside it even though the checkpoint's input does not require grad."""
    weight = torch.ones(2, requires_grad=True)
    calls: list[int] = []

    def fn(x):
        calls.append(1)
        return x * weight

    x = torch.full((2,), 3.0)
    try:
        for reentrant in (True, False):
            out = _checkpoint.checkpoint(fn, x, use_reentrant=reentrant)
            (grad,) = torch.autograd.grad(out.sum(), [weight])
            if not torch.equal(grad, x):
                return False
    except Exception:  # noqa: BLE001 - any failure means the replacement does not work on this torch
        return False
    return len(calls) == 2


@contextlib.contextmanager
def run_checkpoints_plainly() -> Iterator[bool]:
    """Within the block, every `torch.utils.checkpoint` call of any thread runs its function plainly (once,
    with ordinary autograd). Re-entrant and thread-safe (reference-counted). Yields whether the
    replacement is in force (False on a torch version whose checkpoint internals differ)."""
    global _depth, _works
    with _lock:
        if _depth == 0:
            active = _install()
            if active and _works is None:
                _works = _self_test()
            if active and not _works:
                _restore()
                active = False
        else:
            active = bool(_saved)
        _depth += 1
    try:
        yield active
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _restore()


def plainly(fn):
    """Decorator: run `fn` inside `run_checkpoints_plainly()`."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with run_checkpoints_plainly():
            return fn(*args, **kwargs)
    return wrapper
