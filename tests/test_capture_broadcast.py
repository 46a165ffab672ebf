"""Modules whose output is one row shared by the batch (position ids [1, T] broadcast downstream, as in BERT's and
GPT-2's position embeddings) take the hook route (`indexer.capture.routes.BROADCAST`) instead of torch.func: the
hooks hand the model the output expanded to the batch, so the gradient reaching it has one row per example.

Oracle: per-example gradients by a plain loop of torch.autograd.grad (tests/oracle.py), float64. A model that uses
the shared row in a way that the expansion would misattribute (it reads row 0 only, or averages the rows) must
leave the hook route, proven by calibrate's comparison with the per-example loop."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from indexer.capture.routes import BROADCAST
from indexer.sketch.embedding import CheckpointEmbedder, plan_embedding
from tests import zoo
from tests.conftest import make_checkpoints
from tests.oracle import tracin_matrix


def _plan(task, tmp_path):
    ckpts = make_checkpoints(task, tmp_path, count=2)
    ts = task.training_set()
    return ckpts, ts, plan_embedding(task, ckpts, None, "exact", 1, 0, ts.batch(0, 3))


def _exact_tracin(task, ckpts, plan, ts):
    """TracIn matrix [N, N] from the index's exact embeddings (e . e' summed over checkpoints)."""
    x, y = ts.batch(0, len(ts))
    total = 0
    for c, ckpt in enumerate(ckpts):
        vectors = CheckpointEmbedder(task, ckpt, c, plan).embed(x, y).vectors.double()
        total = total + vectors @ vectors.T
    return total


@pytest.mark.parametrize("cls, module", [(zoo.BroadcastPositions, "pos"),
                                         (zoo.HFBertCheckpointedEval, "bert.embeddings.position_embeddings")])
def test_a_shared_position_embedding_takes_the_hook_route_and_equals_the_oracle(tmp_path, cls, module):
    task = cls()
    ckpts, ts, plan = _plan(task, tmp_path)
    capture = plan.capture
    assert capture.axes.get(module) == BROADCAST
    owners = [b.name for b in capture.blocks if any(u.module == module for u in b.uses)]
    assert owners and all(capture.routes[name] == "hook" for name in owners), capture.reasons
    x, y = ts.batch(0, len(ts))
    expected = tracin_matrix(task, ckpts, x, y, x, y)
    got = _exact_tracin(task, ckpts, plan, ts)
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-9, atol=1e-12)


class _ReadsRowZero(nn.Module):
    """Uses the position embedding's row 0 explicitly: an expanded output would send every example's gradient
    to row 0 (the sum stays right, each example's share would not)."""

    def __init__(self, vocab=9, dim=4):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(vocab, dim), nn.Embedding(zoo.SEQ, dim), nn.Linear(dim, 3)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        h = torch.tanh(self.tok(ids) + self.pos(positions)[0])
        return self.head(h.mean(1))


class _AveragesRows(_ReadsRowZero):
    """Averages the shared output over its first axis (a no-op on one row, a mix of examples once expanded)."""

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        h = torch.tanh(self.tok(ids) + self.pos(positions).mean(0, keepdim=True))
        return self.head(h.mean(1))


class ReadsRowZero(zoo.BroadcastPositions):
    def make_model(self):
        return _ReadsRowZero()


class AveragesRows(zoo.BroadcastPositions):
    def make_model(self):
        return _AveragesRows()


@pytest.mark.parametrize("cls", [ReadsRowZero, AveragesRows])
def test_a_shared_output_the_expansion_would_misattribute_leaves_the_hook_route(tmp_path, cls):
    task = cls()
    ckpts, ts, plan = _plan(task, tmp_path)
    capture = plan.capture
    assert capture.routes["pos"] != "hook"
    assert "pos" in capture.reasons["pos"] and ("loop" in capture.reasons["pos"] or "expand" in capture.reasons["pos"])
    x, y = ts.batch(0, len(ts))
    expected = tracin_matrix(task, ckpts, x, y, x, y)
    got = _exact_tracin(task, ckpts, plan, ts)
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-9, atol=1e-12)
