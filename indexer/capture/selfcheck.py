"""Checks on the user's own model before the long work (`tracin index` runs them; `tracin check` alone).

`self_check` compares every traced block's per-example gradients, as the capture plan computes them in
one batch, with the definition: `torch.autograd.grad` of each example's own loss, one example at a time.
It runs on a handful of training examples at the first and last checkpoints (the guard against model
kinds no test foresaw: a wrong route shows as a disagreement, named by block) and costs a few
per-example backward passes.

`check_query_path` runs what the service will do for one query (JSON example -> schema -> encode ->
prediction -> default target -> embedding at a batch of one) so an index that could not be served is
refused before it is built.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from indexer.capture.routes import CaptureError, per_example_loop
from indexer.config import ConfigError
from indexer.sketch.embedding import Checkpoint, CheckpointEmbedder, ProjectionPlan
from indexer.task import ExampleSet, Task

#: largest relative disagreement accepted between the plan's gradients and the per-example definition
THRESHOLDS = {"float64": 1e-8, "float32": 1e-3}


@dataclass
class BlockCheck:
    name: str
    kind: str
    shape: tuple[int, int]
    route: str
    error: float  # max over examples and checkpoints of ||G - G_ref|| / ||G_ref||
    ok: bool
    captured_zero: bool = False  # the capture gave exactly 0 on every checked example while autograd did not


@dataclass
class SelfCheckReport:
    blocks: list[BlockCheck]
    rows: list[int]
    checkpoints: list[int]
    threshold: float
    seconds: float
    per_example: bool = False
    notes: list[str] = field(default_factory=list)

    zero: list[str] = field(default_factory=list)  # blocks whose gradient is exactly 0 on every checked example

    @property
    def all_zero(self) -> bool:
        """Every traced block's gradient is exactly zero on every checked example and checkpoint (per-example
        autograd and the capture agree on it): the loss does not depend on the traced parameters."""
        return bool(self.blocks) and len(self.zero) == len(self.blocks)

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.blocks) and not self.all_zero

    def failures(self) -> list[BlockCheck]:
        return [b for b in self.blocks if not b.ok]

    def table(self) -> str:
        lines = [f"{'block':<36} {'kind':<9} {'shape':<14} {'route':<5} {'max rel. error':>14}  agree"]
        for b in self.blocks:
            lines.append(f"{b.name:<36} {b.kind:<9} {f'{b.shape[0]}x{b.shape[1]}':<14} {b.route:<5} "
                         f"{b.error:>14.2e}  {'yes' if b.ok else 'NO'}")
        return "\n".join(lines)

    def refusal(self) -> str:
        bad = self.failures()
        if not bad and self.all_zero:
            return (f"self-check: every traced block's gradient is exactly zero on the {len(self.rows)} checked "
                    f"examples at checkpoints {self.checkpoints}: the task's loss does not depend on the traced "
                    "parameters (a torch.no_grad() region, a .detach(), or layers the forward does not use); check "
                    "`layers` and Task.forward / Task.loss")
        worst = max(bad, key=lambda b: b.error)
        names = ", ".join(repr(b.name) for b in bad[:5])
        silent = [b for b in bad if b.captured_zero]
        if silent:
            names = ", ".join(repr(b.name) for b in silent[:5])
            return (f"self-check: the per-example gradients of {names} ({silent[0].route} route) are all zero while "
                    f"torch.autograd.grad on each example alone is not; this model is not indexed rather than indexed "
                    "as zeros (`tracin check CONFIG` prints every block)")
        return (f"self-check: the per-example gradients of {names} ({worst.route} route) disagree with "
                f"torch.autograd.grad on each example alone (relative error {worst.error:.2e} > "
                f"{self.threshold:.0e}); this model is not indexed rather than indexed wrongly "
                "(`tracin check CONFIG` prints every block)")

    def to_json(self) -> dict[str, Any]:
        out = {"rows": self.rows, "checkpoints": self.checkpoints, "threshold": self.threshold,
               "max_error": max((b.error for b in self.blocks), default=0.0), "ok": self.ok}
        if self.zero:
            out["zero_blocks"] = list(self.zero)
        return out


def check_rows(count: int, wanted: int = 4) -> list[int]:
    """A handful of deterministic rows spread over the training set (first, last and between)."""
    if count <= wanted:
        return list(range(count))
    return sorted({round(i * (count - 1) / (wanted - 1)) for i in range(wanted)})


def self_check(task: Task, checkpoints: list[Checkpoint], plan: ProjectionPlan, examples: ExampleSet,
               device: str | torch.device = "cpu", rows: list[int] | None = None,
               embedders: dict[int, CheckpointEmbedder] | None = None,
               states: dict[int, dict] | None = None, batch_size: int | None = None) -> SelfCheckReport:
    """Compare each block's per-example gradients (plan routes, one batch) with autograd per example, at
    the first and last checkpoints (`embedders` / `states`: already built models or loaded state dicts).

    The checked rows are captured inside a batch of `batch_size` rows (the index's: the checked rows first,
    then the next other rows), so that a model whose computation changes with the batch size is checked as
    the build will run it; only the checked rows are compared with the per-example loop."""
    started = time.perf_counter()
    rows = rows if rows is not None else check_rows(len(examples))
    taken = set(rows)
    filler = [r for r in range(len(examples)) if r not in taken][:max(0, (batch_size or 0) - len(rows))]
    which = sorted({0, len(checkpoints) - 1})
    threshold = THRESHOLDS[plan.compute_dtype]
    errors = {b.name: 0.0 for b in plan.blocks}
    nonzero_ref = {b.name: False for b in plan.blocks}
    nonzero_got = {b.name: False for b in plan.blocks}
    for c in which:
        embedder = (embedders or {}).get(c) or CheckpointEmbedder(task, checkpoints[c], c, plan, device,
                                                                  state=(states or {}).get(c))
        inputs, labels = embedder.prepare(*examples.rows(rows))
        with embedder._lock:
            captured = embedder.capture.capture(*embedder.prepare(*examples.rows(rows + filler))) if filler \
                else embedder.capture.capture(inputs, labels)
            params = dict(embedder.model.named_parameters())
            names = [p for b in plan.blocks for p in b.params]
            reference = per_example_loop(embedder.model, task.forward, task.loss, [params[n] for n in names],
                                         inputs, labels)
        by_name = dict(zip(names, reference))
        for block, grad in zip(plan.blocks, captured.grads):
            ref = block.assemble([by_name[p] for p in block.params]).to(torch.float64)
            got = (grad.select(slice(0, len(rows))) if filler else grad).full().to(torch.float64)
            errors[block.name] = max(errors[block.name], _relative_error(got, ref))
            nonzero_ref[block.name] |= bool(ref.ne(0).any())
            nonzero_got[block.name] |= bool(got.ne(0).any())
    checks = [BlockCheck(b.name, b.kind, (b.m, b.n), plan.capture.routes[b.name], errors[b.name],
                         errors[b.name] <= threshold, nonzero_ref[b.name] and not nonzero_got[b.name])
              for b in plan.blocks]
    zero = [b.name for b in plan.blocks if not nonzero_ref[b.name] and not nonzero_got[b.name]]
    notes = [f"block {name!r} has an exactly zero gradient on every checked example (a layer the loss does not "
             "use?); its part of every embedding is zero" for name in zero] if len(zero) < len(plan.blocks) else []
    return SelfCheckReport(checks, rows, which, threshold, time.perf_counter() - started, plan.capture.per_example,
                           notes, zero)


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    B = ref.shape[0]
    diff = torch.linalg.vector_norm((got - ref).reshape(B, -1), dim=1)
    norm = torch.linalg.vector_norm(ref.reshape(B, -1), dim=1)
    floor = max(float(norm.max()) * 1e-3, 1e-300)
    value = float((diff / norm.clamp(min=floor)).max())
    return value if math.isfinite(value) else math.inf


def query_example(task: Task, training: ExampleSet) -> tuple[dict | None, str]:
    """A JSON example the service could be sent: a held-out example, else a training example's JSON."""
    held_out = task.held_out_set()
    for source, name in ((held_out, "held-out"), (training, "training")):
        if source is not None and len(source) and source.example_of(0) is not None:
            return source.example_of(0), f"{name} example {source.id_of(0)!r}"
    return None, "training row 0"


def check_query_path(task: Task, embedder: CheckpointEmbedder, training: ExampleSet) -> None:
    """Run the service's query path once (at the checkpoint of `embedder`, normally the last); raise
    ConfigError in one line when the index could not be served."""
    from pydantic import BaseModel, ValidationError

    schema = getattr(task, "example_schema", None)
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        raise ConfigError(f"task {type(task).__name__} has no example_schema (a pydantic model of one JSON "
                          "example): the service could not accept queries")
    example, where = query_example(task, training)
    try:
        if example is not None:
            inputs = task.encode([schema.model_validate(example)])
        else:
            inputs, _ = training.batch(0, 1)
    except ValidationError as exc:
        raise ConfigError(f"query check: the {where} does not fit the task's example_schema: "
                          f"{exc.errors()[0].get('msg')} at {exc.errors()[0].get('loc')}") from None
    except Exception as exc:  # noqa: BLE001 - user code
        raise ConfigError(f"query check: Task.encode fails on the {where}: {type(exc).__name__}: {exc}") from None
    try:
        outputs = embedder.outputs(inputs)
        predicted, _ = task.predict(outputs)
        part = embedder.embed(inputs, predicted)
    except CaptureError as exc:
        raise ConfigError(f"query check ({where}, a batch of one as the service embeds it): {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"query check: the service's path fails on the {where} (a batch of one): "
                          f"{type(exc).__name__}: {exc}") from None
    if part.vectors.shape[0] != 1 or not bool(torch.isfinite(part.vectors).all()) \
            or not bool(torch.isfinite(part.self_influence).all()):
        raise ConfigError(f"query check: the {where} gives a non-finite or misshapen embedding "
                          f"{tuple(part.vectors.shape)}")
