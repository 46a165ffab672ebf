"""The embedding function against brute-force TracIn (one autograd.grad per example, float64)."""
from __future__ import annotations

import pytest
import torch

from indexer.sketch.embedding import CheckpointEmbedder, Embedder, plan_embedding
from indexer.sketch.projection import make_projector
from tests.conftest import make_checkpoints
from tests.oracle import tracin_matrix
from tests.tasks import CNNTask, MLPTask, TokenTask

TASKS = [MLPTask, CNNTask, TokenTask]


def _embed(task, ckpts, kind, dim, seed=0, batch=None, layers=None):
    """(vectors, self-influence) in the compute dtype (float64 here), before the float32 of the index."""
    ts = task.training_set()
    plan = plan_embedding(task, ckpts, layers, kind, dim, seed, ts.batch(0, 3))
    embedder = Embedder(task, ckpts, plan)
    batch = batch or len(ts)
    vecs, sis = [], []
    for start in range(0, len(ts), batch):
        x, y = ts.batch(start, min(len(ts), start + batch))
        out = embedder.embed(x, y)
        parts = [p.vectors for p in out.per_checkpoint]
        vecs.append(torch.cat(parts, dim=1) if kind == "exact" else sum(parts))
        sis.append(out.self_influence)
    return torch.cat(vecs), torch.cat(sis)


@pytest.fixture(scope="module", params=TASKS, ids=lambda t: t.__name__)
def setup(request, tmp_path_factory):
    task = request.param()
    ckpts = make_checkpoints(task, tmp_path_factory.mktemp(request.param.__name__))
    ts = task.training_set()
    x, y = ts.batch(0, len(ts))
    return task, ckpts, tracin_matrix(task, ckpts, x, y, x, y)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_exact_mode_equals_bruteforce(setup):
    task, ckpts, oracle = setup
    vectors, self_influence = _embed(task, ckpts, "exact", 1)
    assert vectors.dtype == torch.float64
    assert _rel(vectors @ vectors.T, oracle) < 1e-10
    assert _rel(self_influence, oracle.diagonal()) < 1e-10


@pytest.mark.parametrize("kind", ["exact", "sketch", "kronecker", "gaussian"])
def test_self_influence_is_exact_diagonal_in_every_mode(setup, kind):
    task, ckpts, oracle = setup
    _, self_influence = _embed(task, ckpts, kind, 8)
    assert _rel(self_influence, oracle.diagonal()) < 1e-10


@pytest.mark.parametrize("kind", ["exact", "sketch", "kronecker"])
def test_batch_size_does_not_change_results(setup, kind):
    task, ckpts, _ = setup
    full = _embed(task, ckpts, kind, 16)
    for batch in (1, 7):
        other = _embed(task, ckpts, kind, 16, batch=batch)
        assert torch.allclose(full[0], other[0], rtol=1e-12, atol=1e-12)
        assert torch.allclose(full[1], other[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["sketch", "kronecker", "gaussian"])
def test_projected_inner_products_are_unbiased(setup, kind):
    """The mean over many seeds converges to exact TracIn: its error shrinks like 1/sqrt(seeds),
    which a biased estimator's error would not. Gradients are captured once; each seed redraws the
    projections (the same `make_projector` the embedder uses)."""
    task, ckpts, oracle = setup
    ts = task.training_set()
    x, y = ts.batch(0, len(ts))
    plan = plan_embedding(task, ckpts, None, "exact", 1, 0, ts.batch(0, 3))
    captured = [(c.lr, CheckpointEmbedder(task, c, i, plan).grads(x, y).grads) for i, c in enumerate(ckpts)]
    seeds = 150
    estimates = []
    for seed in range(seeds):
        v = sum(lr ** 0.5 * make_projector(g.block, kind, 8, seed, i).project(g)
                for i, (lr, grads) in enumerate(captured) for g in grads)
        estimates.append(v @ v.T)
    stack = torch.stack(estimates)
    single_error = (stack - oracle).pow(2).mean().sqrt()
    mean_error = (stack.mean(0) - oracle).pow(2).mean().sqrt()
    assert single_error > 1e-6 * oracle.abs().max()  # projection really was lossy at dim 8
    assert mean_error < 3.0 * single_error / seeds ** 0.5


def test_projection_is_deterministic_and_seeded(setup):
    task, ckpts, _ = setup
    a, _ = _embed(task, ckpts, "sketch", 8, seed=5)
    b, _ = _embed(task, ckpts, "sketch", 8, seed=5)
    c, _ = _embed(task, ckpts, "sketch", 8, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_layer_subset_matches_bruteforce_on_those_parameters(tmp_path):
    task = TokenTask()
    ckpts = make_checkpoints(task, tmp_path)
    ts = task.training_set()
    x, y = ts.batch(0, len(ts))
    names = {"emb.weight", "norm.weight", "norm.bias"}
    oracle = tracin_matrix(task, ckpts, x, y, x, y, param_names=names)
    vectors, self_influence = _embed(task, ckpts, "exact", 1, layers=["emb", "norm"])
    assert _rel(vectors @ vectors.T, oracle) < 1e-10
    assert _rel(self_influence, oracle.diagonal()) < 1e-10
