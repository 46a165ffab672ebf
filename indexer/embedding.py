"""The shared embedding function: the indexer and the service both call it.

For checkpoint i with learning rate lr_i and traced layers l:
    e_i(z)  = sqrt(lr_i) * concat_l P_{i,l} G_{i,l}(z)          (float, [B, D_i])
    s_i(z)  = lr_i * sum_l ||G_{i,l}(z)||^2                      (exact self-influence part)
and over checkpoints e(z) = concat_i e_i(z), self_influence(z) = sum_i s_i(z), so that
    e(z) . e(z') ~= TracInCP(z, z') = sum_i lr_i grad l(w_i, z) . grad l(w_i, z').
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from indexer.capture import GradientCapture, TracedLayer, select_layers
from indexer.checkpoints import CheckpointError, checked_lr, load_checkpoint, load_state_into
from indexer.projection import LayerProjector, fingerprint, make_projector
from indexer.task import Inputs, Task, move_inputs


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file and the learning rate to weigh it with."""

    path: Path
    lr: float


def resolve_checkpoints(specs: list[tuple[Path, float | None]]) -> list[Checkpoint]:
    """Fill missing learning rates from the files (saved by save_checkpoint); validate them."""
    out = []
    for i, (path, lr) in enumerate(specs):
        if lr is None:
            _, meta = load_checkpoint(path)
            if "lr" not in meta:
                raise CheckpointError(f"checkpoints[{i}]: {path} records no lr; give lr in the config")
            lr = meta["lr"]
        out.append(Checkpoint(Path(path), checked_lr(lr, f"checkpoints[{i}].lr")))
    return out


GAUSSIAN_MAX_ENTRIES = 1 << 26  # 512 MiB of float64 per layer and checkpoint


@dataclass
class ProjectionPlan:
    """Traced layers and the drawn projectors for every checkpoint (CPU, float64)."""

    kind: str
    dim: int
    seed: int
    layers: list[TracedLayer]
    projectors: list[list[LayerProjector]]

    @classmethod
    def build(cls, model: nn.Module, layer_patterns: list[str] | None, kind: str, dim: int, seed: int,
              checkpoints: int) -> "ProjectionPlan":
        layers = select_layers(model, layer_patterns)
        if kind == "gaussian":
            from indexer.config import ConfigError

            for layer in layers:
                if layer.size > dim and layer.size * dim > GAUSSIAN_MAX_ENTRIES:
                    raise ConfigError(
                        f"projection.kind: a dense gaussian for layer {layer.name!r} ({layer.m}x{layer.n}) needs "
                        f"{layer.size * dim:,} entries per checkpoint; use kind = \"sketch\" for layers this large"
                    )
        projectors = [[make_projector(layer, kind, dim, seed, c) for layer in layers] for c in range(checkpoints)]
        return cls(kind, dim, seed, layers, projectors)

    @property
    def checkpoint_dim(self) -> int:
        return sum(p.dim for p in self.projectors[0])

    @property
    def total_dim(self) -> int:
        return sum(p.dim for per in self.projectors for p in per)

    def fingerprint(self) -> str:
        return fingerprint(self.projectors, self.kind, self.seed, self.dim)

    def describe(self) -> list[dict]:
        return [
            {"name": p.layer.name, "kind": p.layer.kind, "shape": [p.layer.m, p.layer.n],
             "params": list(p.layer.params), "projection": p.kind, "dim": p.dim}
            for p in self.projectors[0]
        ]


class CheckpointEmbedder:
    """One model at one checkpoint, with its projectors: the per-checkpoint embedding function."""

    def __init__(self, task: Task, checkpoint: Checkpoint, index: int, plan: ProjectionPlan,
                 device: str | torch.device = "cpu", state: dict | None = None):
        self.task, self.checkpoint, self.index = task, checkpoint, index
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # TF32 would change float32 results by ~1e-3 against the CPU; embeddings must agree.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.model = task.build_model()
        if state is None:
            state, _ = load_checkpoint(checkpoint.path)
        load_state_into(self.model, state, f"checkpoint {checkpoint.path}")
        self.model.to(self.device).eval()
        self.dtype = next(self.model.parameters()).dtype
        self.projectors = [p.to(self.device, self.dtype) for p in plan.projectors[index]]
        self.capture = GradientCapture(self.model, plan.layers, self._loss)
        self.scale = checkpoint.lr ** 0.5
        self._lock = threading.Lock()  # hooks live on the shared model: one batch at a time

    def _loss(self, model: nn.Module, inputs: Inputs, labels: torch.Tensor) -> torch.Tensor:
        return self.task.loss(self.task.forward(model, inputs), labels)

    @torch.no_grad()
    def outputs(self, inputs: Inputs) -> torch.Tensor:
        with self._lock:
            return self.task.forward(self.model, move_inputs(inputs, self.device))

    def embed(self, inputs: Inputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(lr) * concat_l P_l G_l  [B, D_i],  lr * sum_l ||G_l||^2  [B]) in the model's dtype."""
        inputs, labels = move_inputs(inputs, self.device), labels.to(self.device)
        with self._lock:
            grads = self.capture.capture(inputs, labels)
        with torch.no_grad():
            parts, sq = [], None
            for projector, grad in zip(self.projectors, grads):
                vec, norm = projector.project(grad)
                parts.append(vec)
                sq = norm if sq is None else sq + norm
            vectors = torch.cat(parts, dim=1) * self.scale
            return vectors, sq * self.checkpoint.lr


@dataclass
class Embedding:
    vectors: torch.Tensor  # [B, D]
    self_influence: torch.Tensor  # [B]


class Embedder:
    """All checkpoints at once (each model kept in memory): what the service uses for a query."""

    def __init__(self, task: Task, checkpoints: list[Checkpoint], plan: ProjectionPlan,
                 device: str | torch.device = "cpu"):
        self.task, self.checkpoints, self.plan = task, checkpoints, plan
        self.per_checkpoint = [CheckpointEmbedder(task, c, i, plan, device) for i, c in enumerate(checkpoints)]

    def embed(self, inputs: Inputs, labels: torch.Tensor) -> Embedding:
        vectors, total = [], None
        for embedder in self.per_checkpoint:
            vec, sq = embedder.embed(inputs, labels)
            vectors.append(vec)
            total = sq if total is None else total + sq
        return Embedding(torch.cat(vectors, dim=1), total)

    def predict(self, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted labels, probabilities) of the model at the last checkpoint."""
        return self.task.predict(self.per_checkpoint[-1].outputs(inputs))


def load_embedder(index_dir, device: str | torch.device = "cpu") -> tuple[Task, Embedder]:
    """Rebuild the task, the projection plan and every checkpoint's model from an opened
    `indexer.store.IndexDirectory`, refusing on a projection fingerprint mismatch."""
    from indexer.config import TaskRef
    from indexer.store import IndexDirectoryError

    manifest = index_dir.manifest
    task = TaskRef(manifest["task"]["ref"], dict(manifest["task"].get("args") or {})).build()
    proj = manifest["projection"]
    checkpoints = [Checkpoint(path, lr) for path, lr in index_dir.checkpoint_paths()]
    plan = ProjectionPlan.build(task.build_model(), proj.get("layer_patterns"), proj["kind"], proj["dim"],
                                proj["seed"], len(checkpoints))
    if plan.fingerprint() != proj["fingerprint"]:
        raise IndexDirectoryError(
            f"{index_dir.path}: the projection rebuilt here (fingerprint {plan.fingerprint()[:16]}) does not match "
            f"the manifest ({proj['fingerprint'][:16]}); torch or the task's model changed since indexing"
        )
    if plan.total_dim != int(manifest["embedding_dim"]):
        raise IndexDirectoryError(f"{index_dir.path}: rebuilt embedding dim {plan.total_dim} != manifest")
    return task, Embedder(task, checkpoints, plan, device)
