"""Exact TracIn scores of a query against chosen training examples: the second stage of retrieval.

The compact index only proposes candidates; their exact scores

    TracInCP(q, z_c) = sum_i sum_l <G_{i,l}(q), w_{i,l} (.) G_{i,l}(z_c)>_F

(w_{i,l}: the optimizer's step weights of block l at checkpoint i, `indexer.optimizer.step`: the lr of its
parameter group, or lr * Gamma for Adam-type optimizers) are recomputed here from the training examples
themselves (read through the task, only the candidates' rows), at every checkpoint, in batches, with the
capture plan that built the index. Inner products use the factored identity where it is cheaper than
explicit gradients (`indexer.capture.grads.BlockGrad.inner`; a tensor weight is applied to the query's
explicit gradient once), and are accumulated in float64. The per-checkpoint and per-block terms are
returned too: each set sums to the score and says where it comes from.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from indexer.capture.grads import BlockGrad, Dense
from indexer.sketch.embedding import Embedder
from indexer.task import ExampleSet, Inputs, input_tensors


@dataclass
class ExactScores:
    """Exact scores of one query against `rows`: total [K], per checkpoint [C, K] and per traced block
    [C, L, K] (float64, weighted by the step weights; both sum to `total`), and each row's training loss at
    each checkpoint [C, K]. `blocks` names the L blocks (the capture plan's order)."""

    rows: np.ndarray
    total: np.ndarray
    per_checkpoint: np.ndarray
    losses: np.ndarray
    per_block: np.ndarray | None = None
    blocks: tuple[str, ...] = ()

class ExactScorer:
    """Recomputes candidates' per-example gradients at every checkpoint and scores them exactly.

    `rows_of(rows) -> (inputs, labels)` reads training examples (default: `ExampleSet.rows`). `threads` > 1
    scores checkpoints in parallel (each checkpoint's model has its own lock)."""

    def __init__(self, embedder: Embedder, rows_of: Callable[[np.ndarray], tuple[Inputs, torch.Tensor]],
                 batch_size: int = 256, threads: int = 1):
        self.embedder, self.rows_of, self.batch_size = embedder, rows_of, batch_size
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="tracin-exact") if threads > 1 else None

    @classmethod
    def for_examples(cls, embedder: Embedder, examples: ExampleSet, **kwargs) -> "ExactScorer":
        return cls(embedder, lambda rows: examples.rows(rows), **kwargs)

    def scores(self, query: Sequence[Sequence[BlockGrad]], rows: np.ndarray) -> ExactScores:
        """`query[c]` = the query's block gradients at checkpoint c (one example: `Embedder.embed(...,
        keep_grads=True).per_checkpoint[c].grads`); `rows` = training rows to score."""
        rows = np.asarray(rows, dtype=np.int64)
        C = len(self.embedder.per_checkpoint)
        names = tuple(b.name for b in self.embedder.plan.blocks)
        if rows.size == 0:
            return ExactScores(rows, np.zeros(0), np.zeros((C, 0)), np.zeros((C, 0)),
                               np.zeros((C, len(names), 0)), names)
        terms, losses = self._terms(query, rows)
        per_block = terms[:, :, 0, :]
        per_checkpoint = per_block.sum(axis=1)
        return ExactScores(rows, per_checkpoint.sum(axis=0), per_checkpoint, losses, per_block, names)

    def scores_each(self, query: Sequence[Sequence[BlockGrad]], rows: np.ndarray) -> list[ExactScores]:
        """Exact scores of each of Q queries (block gradients with Q rows at each checkpoint: a batch of
        queries) against the same training `rows`, one `ExactScores` per query, with each row's gradients
        computed once for all of them (`scores` is the case Q = 1)."""
        rows = np.asarray(rows, dtype=np.int64)
        C = len(self.embedder.per_checkpoint)
        names = tuple(b.name for b in self.embedder.plan.blocks)
        Q = query[0][0].batch
        if rows.size == 0:
            return [ExactScores(rows, np.zeros(0), np.zeros((C, 0)), np.zeros((C, 0)),
                                np.zeros((C, len(names), 0)), names) for _ in range(Q)]
        terms, losses = self._terms(query, rows)
        out = []
        for q in range(Q):
            per_block = terms[:, :, q, :]
            per_checkpoint = per_block.sum(axis=1)
            out.append(ExactScores(rows, per_checkpoint.sum(axis=0), per_checkpoint, losses, per_block, names))
        return out

    def matrix(self, query: Sequence[Sequence[BlockGrad]], rows: np.ndarray) -> np.ndarray:
        """Exact TracIn float64 [Q, K] of Q queries (block gradients with Q rows at each checkpoint)
        against training `rows`: each row's gradients are computed once for every query."""
        rows = np.asarray(rows, dtype=np.int64)
        return self._terms(query, rows)[0].sum(axis=(0, 1))

    def _terms(self, query: Sequence[Sequence[BlockGrad]], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(weighted inner products per checkpoint and block [C, L, Q, K] float64, the rows' losses [C, K])."""
        batches = [rows[s:s + self.batch_size] for s in range(0, rows.size, self.batch_size)]
        data = [self.rows_of(b) for b in batches]

        def one_checkpoint(c: int) -> tuple[np.ndarray, np.ndarray]:
            embedder = self.embedder.per_checkpoint[c]
            weighted = [weigh(q, w) for q, w in zip(query[c], embedder.weights)]
            parts, losses = [], []
            for inputs, labels in data:
                captured = embedder.grads(inputs, labels)
                blocks = [scale * q.inner(g) for (q, scale), g in zip(weighted, captured.grads)]
                parts.append(torch.stack(blocks).to("cpu", torch.float64).numpy())
                losses.append(captured.losses.detach().to("cpu", torch.float64).numpy())
            return np.concatenate(parts, axis=2), np.concatenate(losses)

        C = len(self.embedder.per_checkpoint)
        if self.pool is not None and C > 1:
            per = list(self.pool.map(one_checkpoint, range(C)))
        else:
            per = [one_checkpoint(c) for c in range(C)]
        return np.stack([p[0] for p in per]), np.stack([p[1] for p in per])

    def losses(self, rows: np.ndarray) -> np.ndarray:
        """The training loss of `rows` at every checkpoint [C, K] (a forward pass only)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = []
        for embedder in self.embedder.per_checkpoint:
            parts = []
            for s in range(0, rows.size, self.batch_size):
                inputs, labels = self.rows_of(rows[s:s + self.batch_size])
                inputs, labels = embedder.prepare(inputs, labels)
                with torch.no_grad(), embedder._lock:
                    parts.append(self.embedder.task.loss(self.embedder.task.forward(embedder.model, inputs), labels)
                                 .detach().to("cpu", torch.float64).numpy())
            out.append(np.concatenate(parts) if parts else np.zeros(0))
        return np.stack(out)


def sum_queries(parts: Sequence[Sequence[Sequence[BlockGrad]]], scale: float = 1.0) -> list[list[BlockGrad]]:
    """One query from many: `parts[p][c][l]` = block l's gradients at checkpoint c of a batch p of queries (any
    number of rows each); returns per checkpoint and block `scale * sum over every row of every part` as one
    explicit row (float64 [1, m, n], `BlockGrad.batch_sum`). TracIn is linear in the query's gradient, so
    scores against it equal `scale` times the sum of the rows' own scores (a set query: scale 1 = sum,
    1/n = mean). Raises ValueError for no parts."""
    if not parts:
        raise ValueError("sum_queries: no query gradients")
    out = []
    for c, per_block in enumerate(parts[0]):
        blocks = []
        for b, first in enumerate(per_block):
            total = None
            for part in parts:
                g = part[c][b].batch_sum().to(torch.float64)
                total = g if total is None else total + g
            blocks.append(BlockGrad(first.block, [Dense((total * scale).unsqueeze(0))]))
        out.append(blocks)
    return out


def query_self_influence(embedder: Embedder, query: Sequence[Sequence[BlockGrad]]) -> np.ndarray:
    """sum_i sum_l <G_{i,l}(q), w_{i,l} (.) G_{i,l}(q)>_F per query row: [Q] float64, the squared norm of each
    query's gradient in the TracIn metric (w: `embedder`'s step weights). For a set's summed gradient
    (`sum_queries`) it is the set's exact squared norm, cross terms between members included: not the sum of
    the members' squared norms."""
    total = None
    for part, per_block in zip(embedder.per_checkpoint, query):
        for q, w in zip(per_block, part.weights):
            weighted, scale = weigh(q, w)
            value = torch.diagonal(scale * weighted.inner(q)).to("cpu", torch.float64)
            total = value if total is None else total + value
    return total.numpy()


def weigh(query: BlockGrad, weight: float | torch.Tensor) -> tuple[BlockGrad, float]:
    """(the query's side of <G_q, w (.) G_z>, the scalar left to multiply by): a float weight stays a factor
    (the query keeps its factored form); a tensor [m, n] is applied once to the query's explicit gradient."""
    if isinstance(weight, float):
        return query, weight
    return BlockGrad(query.block, [Dense(query.full() * weight.to(query.dtype))]), 1.0


def training_set_digest(examples: ExampleSet, max_bytes: int = 1 << 30, sample: int = 4096,
                        rows_hashed: str | int | None = None) -> dict:
    """What the index records about its training set, so the service can check that the task still reads
    the same examples in the same order before it re-ranks with them: the row count, sha256 of the labels
    and sha256 of the inputs (all rows up to `max_bytes` of inputs, else `sample` evenly spaced rows;
    `rows_hashed` = "all" or a count repeats a recorded choice)."""
    n = len(examples)
    labels = examples.labels.detach().cpu().contiguous()
    digest = {"count": n, "labels_sha256": hashlib.sha256(_bytes(labels)).hexdigest()}
    tensors = input_tensors(examples.inputs)
    size = sum(t.numel() * t.element_size() for t in tensors)
    if rows_hashed is not None:
        sample = n if rows_hashed == "all" else int(rows_hashed)
    if (rows_hashed is None and size <= max_bytes) or rows_hashed == "all":
        rows = None
    else:
        rows = torch.as_tensor(np.unique(np.linspace(0, n - 1, num=min(sample, n)).round().astype(np.int64)))
    h = hashlib.sha256()
    for t in tensors:
        part = t if rows is None else t[rows]
        h.update(str(tuple(part.shape)).encode() + str(part.dtype).encode())
        h.update(_bytes(part))
    digest["inputs_sha256"] = h.hexdigest()
    digest["inputs_rows"] = "all" if rows is None else int(rows.numel())
    return digest


#: bytes of each row digest (a truncated sha256: 128 bits)
ROW_DIGEST_BYTES = 16
ROW_DIGEST_FORMAT = "tracin-row-sha256-128/1"


def row_digests(examples: ExampleSet, start: int = 0, stop: int | None = None, chunk: int = 8192) -> np.ndarray:
    """A digest of each training row's content, uint8 [stop - start, ROW_DIGEST_BYTES]: sha256 (truncated to
    128 bits) of every input tensor's row and the row's label, after a header of their names, dtypes and
    per-row shapes. What `tracin index --update` compares to tell new rows from changed ones (the id is
    compared separately, from examples.jsonl). Rows are hashed `chunk` at a time (one contiguous copy of a
    chunk in memory, never of the whole set)."""
    stop = len(examples) if stop is None else stop
    inputs = examples.inputs
    names = list(inputs.keys()) if isinstance(inputs, dict) else list(range(len(input_tensors(inputs))))
    tensors = [*input_tensors(inputs), examples.labels]
    header = hashlib.sha256()
    for name, t in zip([*names, "label"], tensors):
        header.update(f"{name}|{t.dtype}|{tuple(t.shape[1:])};".encode())
    out = np.empty((max(0, stop - start), ROW_DIGEST_BYTES), dtype=np.uint8)
    for lo in range(start, stop, chunk):
        hi = min(lo + chunk, stop)
        parts = []
        for t in tensors:
            flat = t[lo:hi].detach().cpu().contiguous().reshape(hi - lo, -1)
            parts.append(flat.view(torch.uint8).numpy() if flat.numel() else np.zeros((hi - lo, 0), np.uint8))
        for i in range(hi - lo):
            h = header.copy()
            for part in parts:
                h.update(part[i].tobytes())
            out[lo - start + i] = np.frombuffer(h.digest()[:ROW_DIGEST_BYTES], dtype=np.uint8)
    return out


def _bytes(t: torch.Tensor) -> memoryview | bytes:
    """The raw bytes of a tensor of any dtype (bfloat16 and bool included), as a view (no copy of a
    contiguous CPU tensor: hashing a large training set does not double it in memory)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b""
