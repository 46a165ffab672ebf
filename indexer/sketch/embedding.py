"""The shared embedding function: the indexer and the service both call it.

For checkpoint i with step weights w_{i,l} per traced block l (`indexer.optimizer.step`: the lr of each
parameter's group, or lr * Gamma for Adam-type optimizers) and per-example block gradients G_{i,l}(z):
    e_i(z)  = sum_l P_{i,l} (sqrt(w_{i,l}) (.) G_{i,l}(z))      (projected kinds, [B, dim])
            = concat_l vec(sqrt(w_{i,l}) (.) G_{i,l}(z))         (exact kind)
    s_i(z)  = sum_l ||sqrt(w_{i,l}) (.) G_{i,l}(z)||^2          (exact self-influence part)
and over checkpoints e(z) = sum_i e_i(z) (projected; added in float32 in checkpoint order, exactly as
the indexer accumulates its vectors) or concat_i e_i(z) (exact), self_influence(z) = sum_i s_i(z), so
    e(z) . e(z') ~= TracIn(z, z') = sum_i <grad l(w_i, z), w_i (.) grad l(w_i, z')>   (unbiased; = for exact)
With one lr for every parameter (plain SGD) w_i is the number lr_i and the vectors are scaled once.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from indexer.capture.blocks import TracedBlock, select_blocks
from indexer.capture.routes import (
    CaptureError, CapturePlan, Captured, GradientCapture, calibrate, check_losses, compute_dtype_for,
)
from indexer.checkpoints import CheckpointError, checked_lr, load_checkpoint, load_state_into
from indexer.capture.grads import BlockGrad
from indexer.sketch.projection import BlockProjector, fingerprint, make_projector
from indexer.task import Inputs, Task, move_inputs


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file and how to weigh its gradients: `step` (indexer.optimizer.step.StepWeights: per
    traced parameter w = lr_g, or lr_g * Gamma for Adam-type optimizers), or, without it, one learning rate
    `lr` for every parameter (plain SGD). `lr` is always the first group's learning rate (a summary)."""

    path: Path
    lr: float
    step: Any = None

    def block_weight(self, block: TracedBlock) -> float | torch.Tensor:
        """w of a traced block at this checkpoint: a float, or a tensor [m, n] in the block's layout."""
        return self.lr if self.step is None else self.step.block_weight(block)

    @property
    def formula(self) -> str:
        return "sgd" if self.step is None else self.step.formula


def resolve_checkpoints(specs: list[tuple[Path, float | None]]) -> list[Checkpoint]:
    """Fill missing learning rates from the files (saved by save_checkpoint); validate them."""
    out = []
    for i, (path, lr) in enumerate(specs):
        if lr is None:
            _, meta = load_checkpoint(path)
            lr = meta.get("lr", meta.get("learning_rate"))
            if lr is None:
                raise CheckpointError(f"checkpoints[{i}]: {path} records no lr; give lr in the config")
        out.append(Checkpoint(Path(path), checked_lr(lr, f"checkpoints[{i}].lr")))
    return out


GAUSSIAN_MAX_ENTRIES = 1 << 26  # 512 MiB of float64 per block and checkpoint
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class ProjectionPlan:
    """Traced blocks, how each is captured (routes) and projected at every checkpoint (CPU, float64)."""

    kind: str
    dim: int
    seed: int
    blocks: list[TracedBlock]
    capture: CapturePlan
    projectors: list[list[BlockProjector]]
    compute_dtype: str = "float32"
    layer_patterns: list[str] | None = None

    @classmethod
    def build(cls, blocks: list[TracedBlock], capture: CapturePlan, kind: str, dim: int, seed: int,
              checkpoints: int, compute_dtype: str = "float32",
              layer_patterns: list[str] | None = None) -> "ProjectionPlan":
        if kind == "gaussian":
            from indexer.config import ConfigError

            for block in blocks:
                if block.size > dim and block.size * dim > GAUSSIAN_MAX_ENTRIES:
                    raise ConfigError(
                        f"projection.kind: a dense gaussian for block {block.name!r} ({block.m}x{block.n}) needs "
                        f"{block.size * dim:,} entries per checkpoint; use kind = \"sketch\" for blocks this large")
        projectors = [[make_projector(b, kind, dim, seed, c) for b in blocks] for c in range(checkpoints)]
        return cls(kind, dim, seed, blocks, capture, projectors, compute_dtype, layer_patterns)

    @property
    def summed(self) -> bool:
        """True when checkpoints and blocks add into one `dim`-wide embedding (every kind but exact)."""
        return self.kind != "exact"

    def checkpoint_dim(self, checkpoint: int = 0) -> int:
        return self.dim if self.summed else sum(p.dim for p in self.projectors[checkpoint])

    @property
    def total_dim(self) -> int:
        return self.dim if self.summed else sum(p.dim for per in self.projectors for p in per)

    def fingerprint(self) -> str:
        return fingerprint(self.projectors, self.kind, self.seed, self.dim)

    def describe(self) -> list[dict]:
        out = []
        for p in self.projectors[0]:
            entry = p.block.describe()
            entry.update(route=self.capture.routes[p.block.name], projection=p.kind, dim=p.dim)
            if self.capture.reasons.get(p.block.name):
                entry["reason"] = self.capture.reasons[p.block.name]
            out.append(entry)
        return out


def load_model(task: Task, checkpoint: Checkpoint, device: str | torch.device, dtype: torch.dtype,
               state: dict | None = None) -> nn.Module:
    """The task's model with a checkpoint's weights, in eval mode, on `device`, floating tensors in `dtype`."""
    model = task.build_model()
    if state is None:
        state, _ = load_checkpoint(checkpoint.path)
    load_state_into(model, state, f"checkpoint {checkpoint.path}")
    return model.to(device=torch.device(device), dtype=dtype).eval()


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def plan_embedding(task: Task, checkpoints: list[Checkpoint], layer_patterns: list[str] | None, kind: str,
                   dim: int, seed: int, probe: tuple[Inputs, torch.Tensor], compute_dtype: str = "auto",
                   device: str | torch.device = "cpu", state: dict | None = None) -> ProjectionPlan:
    """Select the traced blocks, calibrate their capture routes on `probe` (a few training examples) at the
    first checkpoint (`state`: its state dict, when already loaded), and draw the projections. Raises
    ConfigError / CaptureError naming the problem."""
    model = task.build_model()
    dtype = compute_dtype_for(model_dtype(model), compute_dtype)
    blocks = select_blocks(model, layer_patterns)
    model = load_model(task, checkpoints[0], device, dtype, state)
    inputs, labels = probe
    inputs = move_inputs(inputs, device, dtype)
    labels = _labels_to(labels, device, dtype)
    capture = calibrate(model, blocks, task.forward, task.loss, inputs, labels, dtype)
    return ProjectionPlan.build(blocks, capture, kind, dim, seed, len(checkpoints), _dtype_name(dtype), layer_patterns)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float64: "float64"}[dtype]


def _labels_to(labels: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    labels = labels.to(device)
    return labels.to(dtype) if labels.is_floating_point() else labels


@dataclass
class CheckpointEmbedding:
    """One checkpoint's part for a batch: sqrt(lr)-scaled vectors [B, width] (compute dtype), exact
    lr * ||g||^2 [B] (float64), the per-example losses [B], the outputs, and (when kept) the gradients."""

    vectors: torch.Tensor
    self_influence: torch.Tensor
    losses: torch.Tensor
    outputs: Any
    grads: list[BlockGrad] | None = None


class CheckpointEmbedder:
    """One model at one checkpoint, with its projectors: the per-checkpoint embedding function."""

    def __init__(self, task: Task, checkpoint: Checkpoint, index: int, plan: ProjectionPlan,
                 device: str | torch.device = "cpu", state: dict | None = None):
        self.task, self.checkpoint, self.index, self.plan = task, checkpoint, index, plan
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # TF32 would change float32 results by ~1e-3 against the CPU; embeddings must agree.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.dtype = DTYPES[plan.compute_dtype]
        self.model = load_model(task, checkpoint, self.device, self.dtype, state)
        self.projectors = [p.to(self.device, self.dtype) for p in plan.projectors[index]]
        self.capture = GradientCapture(self.model, plan.capture, task.forward, task.loss, self.dtype)
        weights = [checkpoint.block_weight(b) for b in plan.blocks]
        #: w per block (float, or a tensor [m, n] on the device in the compute dtype), as exact scores use it
        self.weights = [w if isinstance(w, float) else w.to(self.device, self.dtype) for w in weights]
        floats = {w for w in weights if isinstance(w, float)}
        #: the one weight of every block (plain SGD, one lr): the vectors are scaled once, not per block
        self.uniform = floats.pop() if len(floats) == 1 and len(weights) == sum(isinstance(w, float) for w in weights) \
            else None
        self.scales = [w ** 0.5 if isinstance(w, float) else w.sqrt() for w in self.weights]
        self._lock = threading.Lock()  # hooks live on the shared model: one batch at a time

    def prepare(self, inputs: Inputs, labels: torch.Tensor | None = None):
        inputs = move_inputs(inputs, self.device, self.dtype)
        return inputs if labels is None else (inputs, _labels_to(labels, self.device, self.dtype))

    @torch.no_grad()
    def outputs(self, inputs: Inputs) -> Any:
        with self._lock:
            return self.task.forward(self.model, self.prepare(inputs))

    def grads(self, inputs: Inputs, labels: torch.Tensor, check: bool = False,
              objective: Callable | None = None) -> Captured:
        """Per-example block gradients (exact), losses and outputs of a batch at this checkpoint.
        `objective(outputs, labels) -> [B]` replaces the task's loss (query metrics, `indexer.score.metrics`)."""
        inputs, labels = self.prepare(inputs, labels)
        with self._lock:
            return self.capture.capture(inputs, labels, check=check, loss=objective)

    def embed(self, inputs: Inputs, labels: torch.Tensor, check: bool = False,
              keep_grads: bool = False, objective: Callable | None = None) -> CheckpointEmbedding:
        """Projected sqrt(w) (.) G per block [B, width] (w: the checkpoint's step weights), exact
        sum_l ||sqrt(w_l) (.) G_l||^2 [B] float64, losses (the objective's values), outputs. The kept
        gradients are the unweighted G (exact scores weigh one side by w)."""
        captured = self.grads(inputs, labels, check, objective)
        with torch.no_grad():
            sq = None
            parts = []
            total = torch.zeros(captured.losses.shape[0], self.plan.dim, dtype=self.dtype, device=self.device) \
                if self.plan.summed else None
            for projector, grad, scale in zip(self.projectors, captured.grads, self.scales):
                tensor = None
                if self.uniform is None:
                    if isinstance(scale, torch.Tensor):
                        tensor = scale  # applied to the explicit gradient, chunk by chunk
                    else:
                        grad = grad.weighted(scale)
                part, norm = projector.embed(grad, total, tensor)  # every block adds into the same dim numbers
                if part is not None:
                    parts.append(part)
                norm = norm.to(torch.float64)
                sq = norm if sq is None else sq + norm
            vectors = total if self.plan.summed else torch.cat(parts, dim=1)
            if self.uniform is not None:
                vectors, sq = vectors * self.uniform ** 0.5, sq * self.uniform
            return CheckpointEmbedding(vectors, sq, captured.losses, captured.outputs,
                                       captured.grads if keep_grads else None)


@dataclass
class Embedding:
    vectors: torch.Tensor  # float32 [B, D], exactly what the index stores
    self_influence: torch.Tensor  # float64 [B]
    per_checkpoint: list[CheckpointEmbedding] = field(default_factory=list)


def combine(plan: ProjectionPlan, parts: list[torch.Tensor]) -> torch.Tensor:
    """Checkpoint parts -> the stored float32 embedding: added in checkpoint order (projected kinds) or
    concatenated (exact). The indexer's accumulation into its vector file follows the same order."""
    if not plan.summed:
        return torch.cat([p.to(torch.float32) for p in parts], dim=1)
    total = parts[0].to(torch.float32).clone()
    for p in parts[1:]:
        total += p.to(torch.float32)
    return total


#: below this many examples a checkpoint's work is mostly Python dispatch under the GIL: threads only add
#: contention (measured: one query, 5 checkpoints, 11.4 ms sequential vs 12.2 ms on 2 threads)
PARALLEL_MIN_BATCH = 8


class Embedder:
    """All checkpoints at once (each model kept in memory): what the service uses for a query.

    With `threads` > 1 the checkpoints are embedded in parallel (each has its own model and lock; the
    parts are combined in checkpoint order, so the result does not depend on the thread count)."""

    def __init__(self, task: Task, checkpoints: list[Checkpoint], plan: ProjectionPlan,
                 device: str | torch.device = "cpu", threads: int = 1):
        self.task, self.checkpoints, self.plan = task, checkpoints, plan
        self.per_checkpoint = [CheckpointEmbedder(task, c, i, plan, device) for i, c in enumerate(checkpoints)]
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="tracin-embed") \
            if threads > 1 and len(checkpoints) > 1 else None

    def embed(self, inputs: Inputs, labels: torch.Tensor, keep_grads: bool = False,
              objective: Callable | None = None) -> Embedding:
        """The stored form of the embedding of a batch at every checkpoint (and, with `keep_grads`, the
        per-checkpoint gradients). `objective` replaces the task's loss (query metrics)."""
        def one(e: CheckpointEmbedder) -> CheckpointEmbedding:
            return e.embed(inputs, labels, keep_grads=keep_grads, objective=objective)

        if self.pool is not None and labels.shape[0] >= PARALLEL_MIN_BATCH:
            parts = list(self.pool.map(one, self.per_checkpoint))
        else:
            parts = [one(e) for e in self.per_checkpoint]
        total = None
        for part in parts:
            total = part.self_influence if total is None else total + part.self_influence
        return Embedding(combine(self.plan, [p.vectors for p in parts]), total, parts)

    def predict(self, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, probabilities or None) of the model at the last checkpoint (see Task.predict)."""
        return self.task.predict(self.per_checkpoint[-1].outputs(inputs))


def load_embedder(index_dir, device: str | torch.device = "cpu", threads: int = 1) -> tuple[Task, Embedder]:
    """Rebuild the task, the capture and projection plan and every checkpoint's model from an opened
    `indexer.store.directory.IndexDirectory`, refusing on a projection fingerprint or capture-plan mismatch."""
    from indexer.config import TaskRef
    from indexer.store.directory import IndexDirectoryError

    manifest = index_dir.manifest
    task = TaskRef(manifest["task"]["ref"], dict(manifest["task"].get("args") or {})).build()
    if manifest["task"].get("label_kind"):
        task.label_kind = manifest["task"]["label_kind"]
    proj = manifest["projection"]
    blocks = select_blocks(task.build_model(), proj.get("layer_patterns"))
    checkpoints = index_dir.checkpoints(blocks)
    try:
        capture = CapturePlan.from_json(blocks, manifest["capture"])
    except CaptureError as exc:
        raise IndexDirectoryError(f"{index_dir.path}: {exc}") from None
    plan = ProjectionPlan.build(blocks, capture, proj["kind"], proj["dim"], proj["seed"], len(checkpoints),
                                manifest["capture"].get("compute_dtype", "float32"), proj.get("layer_patterns"))
    if plan.fingerprint() != proj["fingerprint"]:
        raise IndexDirectoryError(
            f"{index_dir.path}: the projection rebuilt here (fingerprint {plan.fingerprint()[:16]}) does not match "
            f"the manifest ({proj['fingerprint'][:16]}); torch or the task's model changed since indexing")
    if plan.total_dim != int(manifest["embedding_dim"]):
        raise IndexDirectoryError(f"{index_dir.path}: rebuilt embedding dim {plan.total_dim} != manifest")
    return task, Embedder(task, checkpoints, plan, device, threads)


__all__ = ["Checkpoint", "CheckpointEmbedder", "CheckpointEmbedding", "Embedder", "Embedding", "ProjectionPlan",
           "check_losses", "combine", "load_embedder", "load_model", "plan_embedding", "resolve_checkpoints"]
