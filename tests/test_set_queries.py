"""Set and batch queries on POST /influence, and per-layer terms (issue 20), against brute-force float64 oracles.

A set answer's scores equal the sum (mean) of the members' exact single-query scores for every returned hit
(sets of 1, 2 and 50 members, with labels and metrics, posted examples and training ids), its top-k is the
oracle's top-k (exact-mode Flat index, every candidate re-ranked), cosine divides by the exact norm of the
set's summed gradient; a batch answer equals the single answers member by member; per-layer terms and
per-member scores sum to each score and match the oracle per parameter block. One index is trained with
AdamW, so the optimizer-weighted formula (w = lr / (sqrt(v_hat) + eps)) is covered. Bad input is a 4xx
naming the member, never a 500."""
from __future__ import annotations

import functools
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from indexer.build.pipeline import build_index
from indexer.checkpoints import load_checkpoint, save_checkpoint
from indexer.config import parse_config
from service.app import create_app
from service.settings import Settings
from tests.conftest import make_checkpoints
from tests.oracle import per_example_gradients, step_weights_bruteforce
from tests.zoo import MLP

N = 30  # training examples
TMP = Path(tempfile.mkdtemp(prefix="tracin-set-tests-"))


def teardown_module(module):
    shutil.rmtree(TMP, ignore_errors=True)


def _task() -> MLP:
    return MLP(seed=0, n=N)


@functools.lru_cache(maxsize=None)
def sgd_index() -> tuple[Path, list[dict]]:
    """Exact-mode Flat index of the zoo MLP (float64) over 3 checkpoints saved with their lr (plain SGD formula);
    returns (index dir, [{"path", "lr", "weights": None}])."""
    work = TMP / "sgd"
    ckpts = make_checkpoints(_task(), work)
    return _build(work, [{"path": str(c.path), "lr": c.lr} for c in ckpts]), \
        [{"path": c.path, "lr": c.lr, "weights": None} for c in ckpts]


@functools.lru_cache(maxsize=None)
def adamw_index() -> tuple[Path, list[dict]]:
    """The same model trained with AdamW, 3 checkpoints saved with the optimizer's state: the index weighs each
    coordinate by lr / (sqrt(v_hat) + eps). The oracle's weights come from `step_weights_bruteforce`."""
    work = TMP / "adamw"
    task = _task()
    train = task.training_set()
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    out = []
    for i in range(3):
        for _ in range(4):
            loss = task.loss(model(train.inputs), train.labels).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        path = save_checkpoint(work / f"adamw-{i}.pt", model, optimizer, step=4 * (i + 1))
        payload = torch.load(path, weights_only=True)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        weights = step_weights_bruteforce(payload["optimizer_state_dict"], payload["optimizer_param_names"], shapes)
        out.append({"path": path, "lr": payload["lr"], "weights": weights})
    return _build(work, [{"path": str(c["path"])} for c in out]), out


def _build(work: Path, checkpoints: list[dict]) -> Path:
    data = {"task": "tests.zoo:MLP", "task_args": {"seed": 0, "n": N}, "checkpoints": checkpoints,
            "projection": {"kind": "exact", "dim": 16, "seed": 0}, "index": {"factory": "Flat", "batch_size": 7}}
    return build_index(parse_config(data, work), work / "index").path


_CLIENTS: dict = {}


def client_for(kind: str, **settings) -> TestClient:
    """An in-process app (the real FastAPI stack) serving one of the indexes, kept for the module."""
    key = (kind, tuple(sorted(settings.items())))
    if key not in _CLIENTS:
        path = (sgd_index if kind == "sgd" else adamw_index)()[0]
        client = TestClient(create_app(Settings(index_dir=path, access_log=False, **settings)))
        client.__enter__()
        _CLIENTS[key] = client
    return _CLIENTS[key]


@pytest.fixture(scope="module", autouse=True)
def _close_clients():
    yield
    while _CLIENTS:
        _CLIENTS.popitem()[1].__exit__(None, None, None)


# -- the oracle -------------------------------------------------------------------------------------------
class _Objective:
    """The task with its loss replaced by a query objective (the oracle's query side)."""

    def __init__(self, task, fn):
        self.task, self.fn = task, fn

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, outputs, labels):
        return self.fn(outputs, labels)


def neg_margin(outputs, labels):
    """-(z_y - max_{j != y} z_j), row by row: the query side of metric = margin (higher is better)."""
    rows = []
    for i in range(outputs.shape[0]):
        y = int(labels[i])
        others = torch.stack([outputs[i, j] for j in range(outputs.shape[1]) if j != y])
        rows.append(-(outputs[i, y] - others.max()))
    return torch.stack(rows)


OBJECTIVES = {"loss": None, "margin": neg_margin}


def oracle(checkpoints: list[dict], qx, qy, tx, ty, objective=None, params=None) -> np.ndarray:
    """sum_i sum_p g_i,p(q) (.) w_i,p (.) g_i,p(z) [Q, T] float64, one autograd.grad per example; the query side
    is the gradient of `objective` (default the loss); `params` restricts to those parameters (a block)."""
    task = _task()
    total = None
    for ck in checkpoints:
        state, _ = load_checkpoint(ck["path"])
        q_task = _Objective(task, objective) if objective is not None else task
        gq = per_example_gradients(q_task, state, qx, qy, params)
        gt = per_example_gradients(task, state, tx, ty, params)
        if ck["weights"] is None:
            w = torch.full((gq.shape[1],), float(ck["lr"]), dtype=torch.float64)
        else:
            names = [n for n, p in task.build_model().named_parameters() if params is None or n in params]
            w = torch.cat([ck["weights"][n].reshape(-1) for n in names])
        term = (gq * w) @ gt.T
        total = term if total is None else total + term
    return total.numpy()


def _training():
    ts = _task().training_set()
    x, y = ts.batch(0, len(ts))
    return ts, x, y


def _members(count: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(6, generator=g, dtype=torch.float64).tolist()} for _ in range(count)]


def _post(client: TestClient, body: dict) -> dict:
    response = client.post("/influence", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _query_side(answer_set: dict, examples: list[dict], train_ids: list[str]):
    """Inputs and labels of the set's members as the service used them (labels: answer's label_used)."""
    ts, x, _ = _training()
    rows = [int(t[1:]) for t in train_ids]
    qx = torch.cat([torch.tensor([e["x"] for e in examples], dtype=torch.float64).reshape(-1, 6), x[rows]])
    qy = torch.tensor([m["label_used"] for m in answer_set["members"]])
    return qx, qy


# -- sets equal the sum (mean) of their members ------------------------------------------------------------
CASES = [  # (index, members posted, train_ids, labels pattern, metric, aggregate)
    ("sgd", 1, 0, "given", "loss", "sum"),
    ("sgd", 2, 0, "mixed", "margin", "mean"),
    ("sgd", 45, 5, "mixed", "loss", "sum"),
    ("sgd", 50, 0, "none", "margin", "sum"),
    ("adamw", 2, 0, "given", "loss", "sum"),
    ("adamw", 40, 10, "mixed", "margin", "mean"),
]


@pytest.mark.parametrize("kind,posted,stored,labels,metric,aggregate", CASES)
def test_a_set_answer_is_the_sum_of_its_members_exact_scores(kind, posted, stored, labels, metric, aggregate):
    checkpoints = (sgd_index if kind == "sgd" else adamw_index)()[1]
    client = client_for(kind)
    examples = _members(posted, seed=posted + stored)
    train_ids = [f"t{i}" for i in range(0, 2 * stored, 2)]
    given = [None if labels == "none" or (labels == "mixed" and i % 2) else i % 3 for i in range(posted)]
    body = {"examples": examples, "aggregate": aggregate, "k": N, "rerank": N, "metric": metric,
            "member_scores": True}
    if train_ids:
        body["train_ids"] = train_ids
    if labels != "none":
        body["labels"] = given
    answer = _post(client, body)
    n = posted + stored
    assert answer["exact"] is True and answer["set"]["size"] == n and answer["set"]["aggregate"] == aggregate
    assert [m["field"] for m in answer["set"]["members"]] == \
        [f"examples.{i}" for i in range(posted)] + [f"train_ids.{i}" for i in range(stored)]
    ts, tx, ty = _training()
    qx, qy = _query_side(answer["set"], examples, train_ids)
    for i, label in enumerate(given):  # a member without a label is explained with the model's prediction
        assert qy[i] == (label if label is not None else answer["set"]["members"][i]["prediction"]["label"])
    for j, t in enumerate(train_ids):  # training members: their training label
        assert int(qy[posted + j]) == int(ty[int(t[1:])])
    matrix = oracle(checkpoints, qx, qy, tx, ty, OBJECTIVES[metric])  # [n, N]
    scale = 1.0 / n if aggregate == "mean" else 1.0
    expected = matrix.sum(axis=0) * scale
    hits = answer["proponents"] + answer["opponents"]
    assert hits
    for hit in hits:
        row = int(hit["id"][1:])
        assert hit["score"] == pytest.approx(expected[row], rel=1e-9, abs=1e-12)
        assert hit["raw_score"] == pytest.approx(expected[row], rel=1e-9, abs=1e-12)
        assert sum(hit["checkpoints"]) == pytest.approx(hit["score"], rel=1e-9, abs=1e-12)
        assert sum(hit["blocks"].values()) == pytest.approx(hit["score"], rel=1e-9, abs=1e-12)
        assert len(hit["member_scores"]) == n
        assert sum(hit["member_scores"]) == pytest.approx(hit["score"], rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(hit["member_scores"], matrix[:, row] * scale, rtol=1e-9, atol=1e-12)
    # every candidate re-ranked from an exact index: the oracle's own top-k, in order
    top = [i for i in np.argsort(-expected, kind="stable") if expected[i] > 0][:N]
    bottom = [i for i in np.argsort(expected, kind="stable") if expected[i] < 0][:N]
    assert [h["id"] for h in answer["proponents"]] == [f"t{i}" for i in top]
    assert [h["id"] for h in answer["opponents"]] == [f"t{i}" for i in bottom]
    # the set's metric at each checkpoint: the sum (mean) of its members'
    for c, ck in enumerate(answer["query"]["checkpoints"]):
        assert ck["loss"] == pytest.approx(scale * sum(m["checkpoints"][c]["loss"] for m in answer["set"]["members"]))


def test_per_layer_terms_match_the_oracle_block_by_block():
    for kind in ("sgd", "adamw"):
        checkpoints = (sgd_index if kind == "sgd" else adamw_index)()[1]
        client = client_for(kind)
        layers = {layer["name"]: set(layer["params"]) for layer in client.get("/index").json()["layers"]}
        assert layers == {"0": {"0.weight", "0.bias"}, "2": {"2.weight", "2.bias"}}
        examples = _members(3, seed=7)
        answer = _post(client, {"examples": examples, "aggregate": "sum", "labels": [0, 1, 2], "k": 5, "rerank": N})
        ts, tx, ty = _training()
        qx, qy = _query_side(answer["set"], examples, [])
        per_block = {name: oracle(checkpoints, qx, qy, tx, ty, params=params).sum(axis=0)
                     for name, params in layers.items()}
        for hit in answer["proponents"] + answer["opponents"]:
            row = int(hit["id"][1:])
            assert set(hit["blocks"]) == set(layers)
            for name in layers:
                assert hit["blocks"][name] == pytest.approx(per_block[name][row], rel=1e-9, abs=1e-12)


def test_single_and_batch_hits_carry_per_layer_terms_summing_to_the_score():
    client = client_for("adamw")
    answer = _post(client, {"example": _members(1, seed=3)[0], "label": 1, "k": 4, "rerank": N})
    for hit in answer["proponents"] + answer["opponents"]:
        assert set(hit["blocks"]) == {"0", "2"}
        assert sum(hit["blocks"].values()) == pytest.approx(hit["score"], rel=1e-9, abs=1e-12)
    answer = _post(client, {"train_id": "t4", "k": 4, "rerank": N, "normalize": "cosine"})
    for hit in answer["proponents"] + answer["opponents"]:
        assert sum(hit["blocks"].values()) == pytest.approx(hit["score"], rel=1e-9, abs=1e-12)
    off = _post(client, {"example": _members(1, seed=3)[0], "k": 4, "rerank": 0})
    assert all(h.get("blocks") is None for h in off["proponents"])  # estimates only: no exact terms


def test_a_set_of_one_is_the_single_query():
    client = client_for("sgd")
    example = _members(1, seed=11)[0]
    single = _post(client, {"example": example, "label": 2, "k": 6, "metric": "margin"})
    one = _post(client, {"examples": [example], "labels": [2], "aggregate": "sum", "k": 6, "metric": "margin"})
    for side in ("proponents", "opponents"):
        assert [h["id"] for h in one[side]] == [h["id"] for h in single[side]]
        for a, b in zip(one[side], single[side]):
            assert a["score"] == pytest.approx(b["score"], rel=1e-12, abs=1e-15)
    assert one["query"]["self_influence"] == pytest.approx(single["query"]["self_influence"], rel=1e-12)
    assert one["set"]["members"][0]["prediction"] == single["prediction"]


@pytest.mark.parametrize("normalize", ["cosine", "train"])
def test_a_normalised_set_divides_by_the_exact_norm_of_its_summed_gradient(normalize):
    checkpoints = sgd_index()[1]
    client = client_for("sgd")
    examples = _members(4, seed=5)
    train_ids = ["t3", "t8"]
    body = {"examples": examples, "train_ids": train_ids, "labels": [0, 1, None, 2], "k": 8, "rerank": N,
            "normalize": normalize}
    summed = _post(client, {**body, "aggregate": "sum"})
    mean = _post(client, {**body, "aggregate": "mean"})
    ts, tx, ty = _training()
    qx, qy = _query_side(summed["set"], examples, train_ids)
    cross = oracle(checkpoints, qx, qy, tx, ty).sum(axis=0)
    self_train = np.diag(oracle(checkpoints, tx, ty, tx, ty))
    set_norm2 = oracle(checkpoints, qx, qy, qx, qy).sum()  # ||sum_q g(q)||^2: cross terms included
    assert summed["query"]["self_influence"] == pytest.approx(set_norm2, rel=1e-9)
    assert set_norm2 != pytest.approx(sum(m["self_influence"] for m in summed["set"]["members"]), rel=1e-3)
    for hit in summed["proponents"] + summed["opponents"]:
        row = int(hit["id"][1:])
        want = cross[row] / math.sqrt(self_train[row])
        if normalize == "cosine":
            want /= math.sqrt(set_norm2)
        assert hit["score"] == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert hit["raw_score"] == pytest.approx(cross[row], rel=1e-9, abs=1e-12)
    if normalize == "cosine":  # the mean's norm is the sum's / n: the same cosine
        assert mean["query"]["self_influence"] == pytest.approx(set_norm2 / 36, rel=1e-9)
        assert [h["id"] for h in mean["proponents"]] == [h["id"] for h in summed["proponents"]]
        for a, b in zip(mean["proponents"], summed["proponents"]):
            assert a["score"] == pytest.approx(b["score"], rel=1e-9)
    # the first stage alone (rerank 0) on an exact index: the same scores up to float32
    first = _post(client, {**body, "aggregate": "sum", "rerank": 0})
    expected = {h["id"]: h["score"] for h in summed["proponents"] + summed["opponents"]}
    assert first["exact"] is False
    for hit in first["proponents"][:3]:
        assert hit["score"] == pytest.approx(expected[hit["id"]], rel=1e-4)


def test_a_batch_answer_equals_the_single_answers_member_by_member():
    for kind in ("sgd", "adamw"):
        client = client_for(kind)
        examples = _members(5, seed=21)
        labels = [0, None, 2, 1, None]
        common = {"k": 7, "rerank": 12, "metric": "margin", "exclude_self": True}
        batch = _post(client, {"examples": examples, "labels": labels, "train_ids": ["t5", "t6"], **common})
        assert batch["size"] == 7 and len(batch["results"]) == 7
        singles = [_post(client, {"example": e, **({"label": y} if y is not None else {}), **common})
                   for e, y in zip(examples, labels)]
        singles += [_post(client, {"train_id": t, **common}) for t in ("t5", "t6")]
        for got, want in zip(batch["results"], singles):
            assert got["label_used"] == want["label_used"]
            assert got["prediction"]["label"] == want["prediction"]["label"]
            assert got["prediction"]["probabilities"] == pytest.approx(want["prediction"]["probabilities"], rel=1e-12)
            assert got["query"]["train_id"] == want["query"]["train_id"]
            assert got["rerank"] == want["rerank"]
            for side in ("proponents", "opponents"):
                assert [h["id"] for h in got[side]] == [h["id"] for h in want[side]]
                for a, b in zip(got[side], want[side]):
                    assert a["score"] == pytest.approx(b["score"], rel=1e-12, abs=1e-15)
                    assert a["blocks"] == pytest.approx(b["blocks"], rel=1e-12, abs=1e-15)
                    assert a["checkpoints"] == pytest.approx(b["checkpoints"], rel=1e-12, abs=1e-15)
        for result, train_id in zip(batch["results"][5:], ("t5", "t6")):  # exclude_self, per member
            assert train_id not in [h["id"] for h in result["proponents"] + result["opponents"]]


def test_exclude_leaves_a_sets_own_training_members_out():
    client = client_for("sgd")
    members = ["t1", "t2", "t7"]
    plain = _post(client, {"train_ids": members, "aggregate": "sum", "k": 10, "rerank": N})
    assert set(members) & {h["id"] for h in plain["proponents"]}  # a training set explains itself first
    for body in ({"exclude_self": True}, {"exclude": members}):
        answer = _post(client, {"train_ids": members, "aggregate": "sum", "k": 10, "rerank": N, **body})
        ids = [h["id"] for h in answer["proponents"] + answer["opponents"]]
        assert not set(members) & set(ids) and len(answer["proponents"]) + len(answer["opponents"]) > 0
        kept = [h for h in plain["proponents"] if h["id"] not in members]
        shown = [h["id"] for h in answer["proponents"]]
        assert shown[:len(kept)] == [h["id"] for h in kept][:len(shown)]


# -- bad input: a 4xx naming the member, never a 500 -----------------------------------------------------
def _refused(client, body, status, field):
    response = client.post("/influence", json=body)
    assert response.status_code == status, response.text
    assert response.json()["detail"][0]["field"] == field, response.json()


def test_bad_set_and_batch_input_is_refused_naming_the_member():
    client = client_for("sgd", max_set=6, max_batch=3)
    good = _members(8, seed=1)
    _refused(client, {"examples": [], "aggregate": "sum"}, 422, "examples")
    _refused(client, {"train_ids": [], "aggregate": "mean"}, 422, "examples")
    _refused(client, {"examples": [], "train_ids": []}, 422, "examples")
    _refused(client, {"examples": good[:5] + [{"x": [1, 2]}], "aggregate": "sum"}, 422, "examples.5")
    _refused(client, {"examples": good[:1] + [{"x": "no"}], "train_ids": ["t1"]}, 422, "examples.1.x")
    _refused(client, {"examples": good[:1] + [{"x": [1, 2, "3", 4, 5, 6]}], "train_ids": ["t1"]}, 422, "examples.1")
    _refused(client, {"examples": good[:2] + [{"y": [1] * 6}], "aggregate": "sum"}, 422, "examples.2.x")
    _refused(client, {"examples": good[:7], "aggregate": "sum"}, 413, "examples.6")
    _refused(client, {"examples": good[:4], "train_ids": ["t1", "t2", "t3"], "aggregate": "sum"}, 413, "train_ids.2")
    _refused(client, {"examples": good[:4]}, 413, "examples.3")
    _refused(client, {"train_ids": ["t1", "nope"], "aggregate": "sum"}, 422, "train_ids.1")
    _refused(client, {"examples": good[:2], "labels": [0], "aggregate": "sum"}, 422, "labels")
    _refused(client, {"examples": good[:2], "labels": [0, 7], "aggregate": "sum"}, 422, "labels.1")
    _refused(client, {"examples": good[:2], "labels": [0, "x"], "aggregate": "sum"}, 422, "labels.1")
    _refused(client, {"examples": good[:2], "label": 0, "aggregate": "sum"}, 422, "label")
    _refused(client, {"example": good[0], "aggregate": "sum"}, 422, "aggregate")
    _refused(client, {"example": good[0], "examples": good[:2]}, 422, "example")
    _refused(client, {"examples": good[:2], "aggregate": "total"}, 422, "aggregate")
    _refused(client, {"examples": good[:2], "member_scores": True}, 422, "member_scores")
    _refused(client, {"examples": good[:2], "aggregate": "sum", "member_scores": True, "rerank": 0}, 422,
             "member_scores")
    _refused(client, {"examples": good[:2], "aggregate": "sum", "exclude": ["t1", "zz"]}, 422, "exclude.1")
    _refused(client, {"examples": [good[0], {"x": [1, 2, 3, 4, 5, "6"]}], "aggregate": "sum"}, 422, "examples.1")
    response = client.post("/influence", content=b'{"examples": [{"x": [1,2,3,4,5,6]}, {"x": [1,2,NaN,4,5,6]}], '
                                                  b'"aggregate": "sum"}', headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"][0]["field"].startswith("examples.1")


# -- the Python client over a real server (tracin serve) ---------------------------------------------------
def test_the_client_asks_sets_and_batches_sync_and_async():
    import asyncio

    from service.client import AsyncInfluenceClient, InfluenceAPIError, InfluenceClient
    from tests.service_support import mlp_index, start_server

    server = start_server(mlp_index(), env={"TRACIN_MAX_SET": "4", "TRACIN_MAX_BATCH": "3"})
    try:
        with InfluenceClient(server.base_url) as client:
            examples = [q.example for q in client.queries(limit=3).items]
            answer = client.influence_set(examples[:2], train_ids=["ex3"], labels=[1, None], k=5, member_scores=True,
                                          exclude_self=True)
            assert answer.set.size == 3 and [m.field for m in answer.set.members] == \
                ["examples.0", "examples.1", "train_ids.0"]
            assert "ex3" not in [h.id for h in answer.proponents + answer.opponents]
            for hit in answer.proponents + answer.opponents:
                assert sum(hit.member_scores) == pytest.approx(hit.score, rel=1e-9, abs=1e-12)
                assert sum(hit.blocks.values()) == pytest.approx(hit.score, rel=1e-9, abs=1e-12)
            batch = client.influence_batch(examples, labels=[0, None, 1], k=4)
            singles = [client.influence(e, label=y, k=4) for e, y in zip(examples, [0, None, 1])]
            assert [[h.id for h in r.proponents] for r in batch.results] == \
                [[h.id for h in r.proponents] for r in singles]
            with pytest.raises(InfluenceAPIError) as err:
                client.influence_set([examples[0], {"x": [1.0, 2.0]}], k=3)
            assert err.value.status == 422 and err.value.fields == ["examples.1.x"]
            with pytest.raises(InfluenceAPIError) as err:
                client.influence_set(examples, train_ids=["ex1", "ex2"], k=3)
            assert err.value.status == 413 and err.value.fields == ["train_ids.1"]
            with pytest.raises(InfluenceAPIError) as err:
                client.influence_batch(examples, train_ids=["ex1"], k=3)
            assert err.value.status == 413 and err.value.fields == ["train_ids.0"]

        async def ask():
            async with AsyncInfluenceClient(server.base_url) as client:
                one = await client.influence_set(examples[:2], train_ids=["ex3"], labels=[1, None], k=5,
                                                 member_scores=True, exclude_self=True)
                many = await client.influence_batch(examples, labels=[0, None, 1], k=4)
                return one, many

        one, many = asyncio.run(ask())
        assert [h.id for h in one.proponents] == [h.id for h in answer.proponents]
        assert [h.score for h in one.opponents] == pytest.approx([h.score for h in answer.opponents], rel=1e-12)
        assert [[h.id for h in r.opponents] for r in many.results] == [[h.id for h in r.opponents] for r in singles]
    finally:
        server.stop()


def test_a_batch_scans_a_flat_index_once_with_the_single_scans_answers():
    engine = client_for("sgd").app.state.engine
    stage = engine.first_stage
    assert stage.flat_vectors is not None
    dim = stage.flat_vectors.shape[1]
    vectors = np.random.default_rng(3).standard_normal((5, dim)).astype(np.float32)
    for normalized in (False, True):
        together = stage.search_many(vectors, 7, 9, None, normalized)
        for v, ((pr, ps), (orows, os_)) in zip(vectors, together):
            (pr1, ps1), (or1, os1) = stage.search(v, 7, 9, None, normalized)
            assert pr.tolist() == pr1.tolist() and orows.tolist() == or1.tolist()
            np.testing.assert_allclose(ps, ps1, rtol=1e-5)
            np.testing.assert_allclose(os_, os1, rtol=1e-5)
            assert len(pr) <= 7 and len(orows) <= 9


# -- the indexer functions and the service's stages, alone -------------------------------------------------
def test_sum_queries_scores_each_and_query_self_influence_equal_the_oracle():
    from indexer.score.exact import query_self_influence, sum_queries

    checkpoints = adamw_index()[1]
    engine = client_for("adamw").app.state.engine
    ts, tx, ty = _training()
    qx = torch.tensor([e["x"] for e in _members(5, seed=40)], dtype=torch.float64)
    qy = torch.tensor([0, 2, 1, 1, 0])
    grads = [p.grads for p in engine.embedder.embed(qx, qy, keep_grads=True).per_checkpoint]
    first = [[g.select([0, 1]) for g in per] for per in grads]
    rest = [[g.select([2, 3, 4]) for g in per] for per in grads]
    matrix = oracle(checkpoints, qx, qy, tx, ty)  # [5, N]
    rows = np.arange(N)
    for scale in (1.0, 0.2):
        summed = sum_queries([first, rest], scale)
        assert all(g.batch == 1 for per in summed for g in per)
        np.testing.assert_allclose(engine.scorer.scores(summed, rows).total, scale * matrix.sum(axis=0),
                                   rtol=1e-9, atol=1e-12)
        gram = oracle(checkpoints, qx, qy, qx, qy)
        assert query_self_influence(engine.embedder, summed)[0] == pytest.approx(scale ** 2 * gram.sum(), rel=1e-9)
    np.testing.assert_allclose(query_self_influence(engine.embedder, grads), np.diag(gram), rtol=1e-9)
    each = engine.scorer.scores_each(grads, rows[::3])
    for q, scores in enumerate(each):
        np.testing.assert_allclose(scores.total, matrix[q, ::3], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(scores.per_block.sum(axis=(0, 1)), scores.total, rtol=1e-12)
    with pytest.raises(ValueError):
        sum_queries([])


def test_the_stages_alone_parse_embed_search_rerank_assemble():
    from types import SimpleNamespace

    from service import query as stages
    from service.errors import ApiError

    engine = client_for("sgd").app.state.engine
    schema = engine.task.example_schema
    examples = [schema.model_validate(e) for e in _members(3, seed=50)]
    req = SimpleNamespace(examples=examples, train_ids=["t2"], labels=[1, None, 0], aggregate="mean", k=4, rerank=N,
                          normalize="none", metric=None, member_scores=True, exclude_self=True, exclude=None)
    plan = stages.parse(engine, req)
    assert plan.kind == "set" and [m.field for m in plan.members] == ["examples.0", "examples.1", "examples.2",
                                                                      "train_ids.0"]
    assert plan.members[0].label == 1 and plan.members[1].label is None and plan.members[3].row == 2
    embedded = stages.embed(engine, plan)
    (query,) = embedded.queries
    batch = stages.embed(engine, stages.parse(engine, SimpleNamespace(**{**vars(req), "aggregate": None,
                                                                         "member_scores": False})))
    assert len(batch.queries) == 4 and batch.stacked is not None
    np.testing.assert_allclose(query.vector, np.mean([q.vector for q in batch.queries], axis=0), rtol=1e-5, atol=1e-6)
    assert query.exclude.tolist() == [2] and query.scale == 0.25
    candidates = stages.first_stage(engine, plan, query)
    assert 2 not in candidates.for_rerank(plan.depth, 1, query.exclude)
    (exact,) = stages.rerank(engine, plan, embedded, [candidates])
    answer = stages.assemble(engine, plan, query, candidates, exact, 0.0)
    assert answer["set"]["size"] == 4 and "t2" not in [h["id"] for h in answer["proponents"] + answer["opponents"]]
    with pytest.raises(ApiError) as err:
        stages.parse(engine, SimpleNamespace(**{**vars(req), "train_ids": ["t2", "nope"]}))
    assert err.value.field == "train_ids.1" and err.value.status == 422


@pytest.mark.parametrize("name,labels,bad", [
    ("Regression", [0.25, -1.5, 2], "x"),
    ("MultiOutputRegression", [[0.5, -1.0], [1.0, 0.0], [-0.25, 2.0]], [1.0]),
    ("MultiLabel", [[1, 0, 1, 0], [0, 1, 0, 1], ["red", "round"]], [1, 0]),
])
def test_sets_take_labels_of_every_kind_and_equal_the_sum_of_single_answers(name, labels, bad):
    from tests import zoo
    from tests.test_label_kinds import index_of

    with TestClient(create_app(Settings(index_dir=index_of(name), access_log=False))) as client:
        held = getattr(zoo, name)().held_out_set()
        examples = [held.example_of(i) for i in range(3)]
        n = client.get("/index").json()["count"]
        answer = _post(client, {"examples": examples, "labels": labels, "aggregate": "sum", "k": n, "rerank": n})
        singles = []
        for example, label in zip(examples, labels):
            single = _post(client, {"example": example, "label": label, "k": n, "rerank": n})
            singles.append({h["id"]: h["score"] for h in single["proponents"] + single["opponents"]})
        assert [m["label_used"] for m in answer["set"]["members"]] == \
            [_post(client, {"example": e, "label": y, "k": 1})["label_used"] for e, y in zip(examples, labels)]
        for hit in answer["proponents"] + answer["opponents"]:
            assert hit["score"] == pytest.approx(sum(s.get(hit["id"], 0.0) for s in singles), rel=1e-9, abs=1e-12)
            assert sum(hit["blocks"].values()) == pytest.approx(hit["score"], rel=1e-9, abs=1e-12)
        response = client.post("/influence", json={"examples": examples, "labels": [labels[0], bad, None],
                                                   "aggregate": "sum"})
        assert response.status_code == 422 and response.json()["detail"][0]["field"] == "labels.1"
