"""The model zoo against brute-force float64 TracIn: the index, self-influence and a query over HTTP.

Every model of tests/zoo.py is indexed in exact mode (batch size 4 = the sequence length, so T == B for
the sequence models) and served by a real `tracin serve`; the float64 oracle is one torch.autograd.grad
per example (tests/oracle.py). Models that cannot be captured exactly are refused in one line."""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from indexer.config import parse_config
from indexer.sketch.embedding import Embedder, plan_embedding
from indexer.build.pipeline import build_index
from indexer.store.directory import IndexDirectory
from tests import zoo
from tests.conftest import make_checkpoints
from tests.oracle import label_review_bruteforce, percentile_ranks_bruteforce, tracin_matrix
from tests.service_support import REPO, start_server

NAMES = sorted(zoo.EXACT)
TOL = 1e-6  # of the largest |score|


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (task, checkpoints, index path, oracle train x train) for every exact zoo model."""
    out = {}
    for name in NAMES:
        task = zoo.EXACT[name]()
        work = tmp_path_factory.mktemp(name)
        ckpts = make_checkpoints(task, work, count=2)
        data = {"task": f"tests.zoo:{name}", "checkpoints": [{"path": str(c.path), "lr": c.lr} for c in ckpts],
                "projection": {"kind": "exact"}, "index": {"batch_size": zoo.SEQ}}
        path = build_index(parse_config(data, work), work / "index").path
        ts = task.training_set()
        x, y = ts.batch(0, len(ts))
        out[name] = (task, ckpts, path, tracin_matrix(task, ckpts, x, y, x, y))
    return out


@pytest.fixture(scope="module")
def servers(built):
    with ThreadPoolExecutor(4) as pool:
        started = dict(zip(NAMES, pool.map(lambda n: start_server(built[n][2]), NAMES)))
    yield started
    for server in started.values():
        server.stop()


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max()
                 / np.abs(np.asarray(b, dtype=np.float64)).max())


@pytest.mark.parametrize("name", NAMES)
def test_exact_index_and_self_influence_equal_bruteforce(built, name):
    task, ckpts, path, oracle = built[name]
    index = IndexDirectory.open(path)
    vectors = index.index.reconstruct_n(0, index.count).astype(np.float64)
    assert _rel(vectors @ vectors.T, oracle.numpy()) < TOL
    assert float(np.abs(index.self_influence - oracle.diagonal().numpy()).max() / oracle.abs().max()) < TOL
    assert index.manifest["capture"]["self_check"]["ok"] is True


@pytest.mark.parametrize("name", NAMES)
def test_label_review_rankings_equal_bruteforce(built, name):
    """label_review.npy and every ranking derived from it equal one float64 forward pass per example and
    checkpoint (tests/oracle.py), for class, regression and multi-label tasks."""
    from indexer.build.review import RANKINGS, ranking_scores, suspicious_first

    task, ckpts, path, oracle = built[name]
    index = IndexDirectory.open(path)
    table = index.label_review
    ts = task.training_set()
    want = label_review_bruteforce(task, ckpts, *ts.batch(0, len(ts)))
    tol = 1e-3 if name == "BFloat16" else 1e-9  # bf16 weights run in float32 in the index, float64 here
    assert np.allclose(table["loss"], want["loss"], rtol=tol, atol=tol)
    if want["margin"] is None and task.kind == "class":  # a class per position: the loss alone
        assert set(table.dtype.names) == {"loss"}
    elif task.kind == "regression":
        assert set(table.dtype.names) == {"loss", "prediction"}
        # Task.predict gives regression predictions as float32 (what the service answers for a query too)
        assert np.allclose(table["prediction"], want["prediction"], rtol=1e-6, atol=1e-6)
    else:
        assert set(table.dtype.names) == {"loss", "margin", "prediction", "probability", "label_probability"}
        assert np.allclose(table["margin"], want["margin"], rtol=tol, atol=tol)
        assert np.allclose(table["probability"], want["probability"], rtol=tol, atol=tol)
        assert np.allclose(table["label_probability"], want["label_probability"], rtol=tol, atol=tol)
        assert np.array_equal(table["prediction"], np.asarray(want["prediction"]))
    scores = ranking_scores(table, index.self_influence)
    loss_last = [row[-1] for row in want["loss"]]
    expected = {"self_influence": oracle.diagonal().numpy(), "loss": loss_last}
    mean_loss = [sum(row) / len(row) for row in want["loss"]]
    if want["margin"] is not None:
        expected["margin"] = [row[-1] for row in want["margin"]]
        expected["aum"] = [sum(row) / len(row) for row in want["margin"]]
        aum_suspicion = [-v for v in expected["aum"]]
        expected["combined"] = [(a + b) / 2 for a, b in zip(percentile_ranks_bruteforce(mean_loss),
                                                            percentile_ranks_bruteforce(aum_suspicion))]
    else:
        expected["combined"] = percentile_ranks_bruteforce(mean_loss)
    assert sorted(scores) == sorted(expected) and set(scores) <= set(RANKINGS)
    for ranking, values in expected.items():
        values = np.asarray(values, dtype=np.float64)
        assert np.allclose(scores[ranking], values, rtol=max(tol, TOL), atol=max(tol, TOL) * np.abs(values).max()), ranking
        if tol < 1e-6 and ranking != "combined":  # the same order as the oracle's values (no near-ties here)
            descending = RANKINGS[ranking][0] == "descending"
            oracle_order = sorted(range(len(values)), key=lambda i: (-values[i] if descending else values[i], i))
            assert suspicious_first(ranking, scores[ranking]).tolist() == oracle_order, ranking


@pytest.mark.parametrize("name", NAMES)
def test_embeddings_do_not_depend_on_batch_size_or_composition(built, name):
    task, ckpts, path, _ = built[name]
    ts = task.training_set()
    plan = plan_embedding(task, ckpts, None, "exact", 1, 0, ts.batch(0, 3))
    embedder = Embedder(task, ckpts, plan)

    def embed(order, batch):
        parts, sis = [], []
        for start in range(0, len(order), batch):
            x, y = ts.rows(order[start:start + batch])
            out = embedder.embed(x, y)
            parts.append(torch.cat([p.vectors.double() for p in out.per_checkpoint], dim=1))
            sis.append(out.self_influence)
        return torch.cat(parts), torch.cat(sis)

    rows = list(range(len(ts)))
    reference, ref_si = embed(rows, len(rows))
    tol = 1e-10 if plan.compute_dtype == "float64" else 1e-5
    scale = float(reference.abs().max())
    for batch in (1, zoo.SEQ):
        vec, si = embed(rows, batch)
        assert float((vec - reference).abs().max()) <= tol * scale, f"batch size {batch}"
        assert torch.allclose(si, ref_si, rtol=tol * 10)
    shuffled = list(np.random.default_rng(0).permutation(len(rows)))
    vec, si = embed(shuffled, 5)  # other batch mates for every example
    back = torch.empty_like(vec)
    back[torch.as_tensor(shuffled)] = vec
    assert float((back - reference).abs().max()) <= tol * scale, "batch composition"


@pytest.mark.parametrize("name", NAMES)
def test_query_over_http_equals_bruteforce(built, servers, name):
    task, ckpts, path, _ = built[name]
    held = task.held_out_set()
    ts = task.training_set()
    qx, qy = held.batch(0, 1)
    label = task.label_to_json(qy[0])
    body = {"example": held.example_of(0), "label": label, "k": 5}
    res = httpx.post(servers[name].base_url + "/influence", json=body, timeout=60)
    assert res.status_code == 200, res.text
    answer = res.json()
    x, y = ts.batch(0, len(ts))
    oracle = tracin_matrix(task, ckpts, qx, qy, x, y)[0].numpy()
    scale = np.abs(oracle).max()
    ids = [ts.id_of(i) for i in range(len(ts))]
    for side, sign in (("proponents", 1), ("opponents", -1)):
        hits = answer[side]
        expected = [oracle[i] for i in np.argsort(-sign * oracle) if sign * oracle[i] > 0][:5]
        assert len(hits) == len(expected), side
        for h, want in zip(hits, expected):  # the top-k values, in order (ties may swap ids)
            assert abs(h["score"] - oracle[ids.index(h["id"])]) <= TOL * scale
            assert abs(h["score"] - want) <= TOL * scale, side
    self_oracle = tracin_matrix(task, ckpts, qx, qy, qx, qy)[0, 0].item()
    assert abs(answer["query"]["self_influence"] - self_oracle) <= TOL * abs(self_oracle)
    assert answer["label_used"] == label
    if task.kind == "class":
        assert isinstance(answer["prediction"]["label"], int if qy.dim() == 1 else list)
    elif task.kind == "multilabel":
        assert set(answer["prediction"]["label"]) <= {0, 1} and len(answer["prediction"]["probabilities"]) == 4
    else:
        assert answer["prediction"]["probabilities"] is None
    default = httpx.post(servers[name].base_url + "/influence", json={"example": held.example_of(0)}, timeout=60)
    assert default.status_code == 200 and default.json()["label_used"] == default.json()["prediction"]["label"]


@pytest.mark.parametrize("name", sorted(zoo.REFUSED))
def test_what_cannot_be_captured_is_refused_in_one_line(tmp_path, name):
    cls, words = zoo.REFUSED[name]
    ckpts = make_checkpoints(cls(), tmp_path, count=2)
    config = tmp_path / "config.toml"
    lines = [f'task = "tests.zoo:{name}"'] + [f'[[checkpoints]]\npath = "{c.path}"\nlr = {c.lr}' for c in ckpts]
    config.write_text("\n".join(lines + ['[projection]\nkind = "exact"']) + "\n")
    proc = subprocess.run([sys.executable, "-m", "indexer.cli", "index", str(config), "--out", str(tmp_path / "index"),
                           "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert words in lines[0]
    assert not (tmp_path / "index").exists() and not list(tmp_path.glob(".index*"))


@pytest.mark.parametrize("name", NAMES)
def test_adamw_trained_index_equals_weighted_bruteforce(tmp_path, name):
    """Every zoo model trained with AdamW (two parameter groups): the exact index and self-influence equal
    TracIn of the step AdamW took, lr_g / (sqrt(v_hat) + eps) per coordinate, brute-forced in float64."""
    from tests.conftest import make_adamw_checkpoints
    from tests.oracle import step_weights_bruteforce, weighted_tracin_matrix
    from indexer.sketch.embedding import Checkpoint

    task = zoo.EXACT[name]()
    runs = make_adamw_checkpoints(task, tmp_path)
    shapes = {n: tuple(p.shape) for n, p in task.build_model().named_parameters()}
    weights = [step_weights_bruteforce(state, names, shapes) for _, state, names in runs]
    data = {"task": f"tests.zoo:{name}", "checkpoints": [{"path": str(p)} for p, _, _ in runs],
            "projection": {"kind": "exact"}, "index": {"batch_size": zoo.SEQ}}
    index = IndexDirectory.open(build_index(parse_config(data, tmp_path), tmp_path / "index").path)
    assert index.manifest["optimizer"]["formula"] == "adam"
    ts = task.training_set()
    x, y = ts.batch(0, len(ts))
    oracle = weighted_tracin_matrix(task, [Checkpoint(p, 1.0) for p, _, _ in runs], weights, x, y, x, y)
    vectors = index.index.reconstruct_n(0, index.count).astype(np.float64)
    tol = 1e-3 if name == "BFloat16" else TOL
    assert _rel(vectors @ vectors.T, oracle.numpy()) < tol
    assert float(np.abs(index.self_influence - oracle.diagonal().numpy()).max() / oracle.abs().max()) < tol
