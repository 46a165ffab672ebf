"""Exact re-ranking scores (indexer.score.exact) against the brute-force float64 oracle, on zoo models whose
blocks take every route (hook, vmap, loop, one example at a time)."""
from __future__ import annotations

import numpy as np
import pytest

from indexer.sketch.embedding import Embedder, plan_embedding
from indexer.score.exact import ExactScorer, training_set_digest
from tests import zoo
from tests.conftest import make_checkpoints
from tests.oracle import tracin_matrix


@pytest.mark.parametrize("name", ["CNN", "TiedLMHead", "LSTM", "TransformerSeqFirst", "BatchStatsNorm", "MultiLabel",
                                  "BFloat16", "TupleInputs"])
def test_exact_scores_equal_bruteforce(tmp_path, name):
    task = zoo.EXACT[name]()
    ckpts = make_checkpoints(task, tmp_path, count=3)
    ts, held = task.training_set(), task.held_out_set()
    plan = plan_embedding(task, ckpts, None, "sketch", 8, 0, ts.batch(0, 3))
    embedder = Embedder(task, ckpts, plan)
    qx, qy = held.batch(0, 1)
    query = embedder.embed(qx, qy, keep_grads=True)
    rows = np.array([5, 0, 11, 3, 3])
    for threads, batch in ((1, 2), (2, 256)):
        got = ExactScorer.for_examples(embedder, ts, batch_size=batch, threads=threads).scores(
            [p.grads for p in query.per_checkpoint], rows)
        x, y = ts.rows(rows)
        oracle = tracin_matrix(task, ckpts, qx, qy, x, y)[0].numpy()
        assert np.abs(got.total - oracle).max() <= 1e-6 * np.abs(oracle).max()
        assert np.allclose(got.per_checkpoint.sum(axis=0), got.total, rtol=1e-12)
        assert got.per_checkpoint.shape == (3, rows.size)
    single = tracin_matrix(task, [ckpts[1]], qx, qy, *ts.rows(rows))[0].numpy()
    assert np.abs(got.per_checkpoint[1] - single).max() <= 1e-6 * np.abs(single).max()


@pytest.mark.parametrize("name", ["CNN", "LSTM", "BatchStatsNorm"])
def test_exact_matrix_of_several_queries_equals_bruteforce(tmp_path, name):
    """ExactScorer.matrix: Q queries against K rows at once (each row's gradients computed once)."""
    task = zoo.EXACT[name]()
    ckpts = make_checkpoints(task, tmp_path, count=3)
    ts, held = task.training_set(), task.held_out_set()
    plan = plan_embedding(task, ckpts, None, "sketch", 8, 0, ts.batch(0, 3))
    embedder = Embedder(task, ckpts, plan)
    qx, qy = held.batch(0, 3)
    query = embedder.embed(qx, qy, keep_grads=True)
    rows = np.array([5, 0, 11, 3])
    got = ExactScorer.for_examples(embedder, ts, batch_size=3, threads=2).matrix(
        [p.grads for p in query.per_checkpoint], rows)
    oracle = tracin_matrix(task, ckpts, qx, qy, *ts.rows(rows)).numpy()
    assert got.shape == (3, rows.size)
    assert np.abs(got - oracle).max() <= 1e-6 * np.abs(oracle).max()


def test_training_set_digest_sees_order_and_content():
    task = zoo.MLP()
    ts = task.training_set()
    a = training_set_digest(ts)
    assert a == training_set_digest(task.training_set()) and a["inputs_rows"] == "all"
    swapped = zoo.MLP().training_set()
    swapped.inputs[[0, 1]] = swapped.inputs[[1, 0]]
    assert training_set_digest(swapped)["inputs_sha256"] != a["inputs_sha256"]
    sampled = training_set_digest(ts, max_bytes=16, sample=4)
    assert sampled["inputs_rows"] == 4 and sampled["labels_sha256"] == a["labels_sha256"]
    assert training_set_digest(zoo.BFloat16().training_set())["count"] == zoo.N
    assert training_set_digest(zoo.TupleInputs().training_set())["inputs_rows"] == "all"
