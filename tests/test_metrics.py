"""Influence on any differentiable function of the query's output, normalised influence, and where a
score comes from (issue 11), against a brute-force float64 oracle over real HTTP.

Oracle: score(z, q) = sum_i lr_i grad l(w_i, z) . grad o(w_i, q), o = the query's loss, or minus a
higher-is-better metric; one torch.autograd.grad per example."""
from __future__ import annotations

import functools

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from indexer.checkpoints import load_checkpoint
from indexer.config import parse_config
from indexer.score.metrics import Metric
from indexer.build.pipeline import build_index
from tests.oracle import per_example_gradients, tracin_matrix
from tests.service_support import _TMP, ServiceMLPTask, checkpoints_of, start_server, train_checkpoints

QUERY = [0.3, -1.2, 0.5, 2.0, -0.7, 0.1]


class ClassMass(BaseModel):
    classes: list[int] = Field(min_length=1, description="classes whose total probability is measured")


class MetricTask(ServiceMLPTask):
    """ServiceMLPTask with a task-defined metric: the total probability of some classes."""

    def metrics(self):
        def mass(outputs, labels, params):
            return torch.softmax(outputs, dim=1)[:, params.classes].sum(dim=1)

        return [Metric("class_mass", "total probability of the given classes", mass, params=ClassMass)]


@functools.lru_cache(maxsize=None)
def built(factory: str = "Flat", kind: str = "sketch"):
    work = _TMP / f"metrics-{factory.replace(',', '_')}-{kind}"
    work.mkdir(parents=True, exist_ok=True)
    task = MetricTask()
    ckpts = train_checkpoints(task, work / "run")
    data = {"task": "tests.test_metrics:MetricTask", "checkpoints": [{"path": str(p)} for p in ckpts],
            "projection": {"kind": kind, "dim": 16, "seed": 0},
            "index": {"factory": factory, "batch_size": 7, "train_sample": 40}}
    return build_index(parse_config(data, work), work / "index").path


@pytest.fixture(scope="module")
def server():
    s = start_server(built())
    yield s
    s.stop()


def _post(server, **body):
    res = httpx.post(server.base_url + "/influence", json=body, timeout=60)
    assert res.status_code == 200, res.text
    return res.json()


def _function_gradients(task, state, x, fn) -> torch.Tensor:
    """[B, P] float64 gradients of fn(outputs) (one value per example) w.r.t. every trainable parameter."""
    model = task.build_model()
    model.load_state_dict(state)
    model = model.double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        value = fn(task.forward(model, x[i:i + 1].double())).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)


def _oracle(index, fn, per_checkpoint=False):
    """Exact scores of the query's objective `fn` against every training example: [N] (or [C, N])."""
    task = MetricTask()
    ts = task.training_set()
    x, y = ts.batch(0, len(ts))
    q = torch.tensor([QUERY], dtype=torch.float64)
    parts = []
    for ckpt in checkpoints_of(index):
        state, _ = load_checkpoint(ckpt.path)
        gq = _function_gradients(task, state, q, fn)
        gz = per_example_gradients(task, state, x, y)
        parts.append(ckpt.lr * (gz @ gq.T)[:, 0].numpy())
    stacked = np.stack(parts)
    return stacked if per_checkpoint else stacked.sum(axis=0)


OBJECTIVES = {  # o(outputs): what the query side differentiates, for label 1
    "loss": lambda out: F.cross_entropy(out, torch.tensor([1]), reduction="none"),
    "logit": lambda out: -out[:, 1],
    "log_probability": lambda out: -F.log_softmax(out, dim=1)[:, 1],
    "margin": lambda out: -(out[:, 1] - torch.cat([out[:, :1], out[:, 2:]], dim=1).max(dim=1).values),
}


@pytest.mark.parametrize("metric", sorted(OBJECTIVES))
def test_builtin_metrics_equal_the_oracle(server, metric):
    body = _post(server, example={"x": QUERY}, label=1, metric=metric, k=40, rerank=40)
    assert body["metric"]["name"] == metric and body["exact"] is True
    oracle = _oracle(built(), OBJECTIVES[metric])
    ids = [MetricTask().training_set().id_of(i) for i in range(40)]
    hits = body["proponents"] + body["opponents"]
    assert len(hits) == int((oracle != 0).sum())
    for hit in hits:
        assert hit["score"] == pytest.approx(oracle[ids.index(hit["id"])], rel=1e-9, abs=1e-12)
        assert sum(hit["checkpoints"]) == pytest.approx(hit["score"], rel=1e-12, abs=1e-15)
    assert [h["score"] for h in body["proponents"]] == pytest.approx(sorted((s for s in oracle if s > 0), reverse=True),
                                                                    rel=1e-9)
    per = _oracle(built(), OBJECTIVES[metric], per_checkpoint=True)
    top = body["proponents"][0]
    assert top["checkpoints"] == pytest.approx(per[:, ids.index(top["id"])].tolist(), rel=1e-9, abs=1e-12)


def test_a_task_defined_metric_with_parameters(server):
    body = _post(server, example={"x": QUERY}, metric={"name": "class_mass", "classes": [0, 2]}, k=40, rerank=40)
    assert body["metric"] == {"name": "class_mass", "params": {"classes": [0, 2]}, "higher_is_better": True}
    oracle = _oracle(built(), lambda out: -torch.softmax(out, dim=1)[:, [0, 2]].sum(dim=1))
    ids = [MetricTask().training_set().id_of(i) for i in range(40)]
    for hit in body["proponents"] + body["opponents"]:
        assert hit["score"] == pytest.approx(oracle[ids.index(hit["id"])], rel=1e-9, abs=1e-12)
    bad = httpx.post(server.base_url + "/influence", timeout=30,
                     json={"example": {"x": QUERY}, "metric": {"name": "class_mass", "classes": []}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"].startswith("metric")
    unknown = httpx.post(server.base_url + "/influence", timeout=30, json={"example": {"x": QUERY}, "metric": "nope"})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["field"].startswith("metric")
    schema = httpx.get(server.base_url + "/openapi.json", timeout=30).json()
    assert "Metric_class_mass" in schema["components"]["schemas"]
    assert "classes" in schema["components"]["schemas"]["Metric_class_mass"]["properties"]


@pytest.mark.parametrize("normalize", ["cosine", "train"])
def test_normalised_influence_ranks_the_whole_index_by_the_normalised_score(server, normalize):
    task = MetricTask()
    ts = task.training_set()
    x, y = ts.batch(0, len(ts))
    q = torch.tensor([QUERY], dtype=torch.float64)
    ckpts = checkpoints_of(built())
    raw = tracin_matrix(task, ckpts, q, torch.tensor([1]), x, y)[0].numpy()
    train_norm = np.sqrt(np.diag(tracin_matrix(task, ckpts, x, y, x, y).numpy()))
    query_norm = np.sqrt(tracin_matrix(task, ckpts, q, torch.tensor([1]), q, torch.tensor([1]))[0, 0].item())
    expected = raw / train_norm / (query_norm if normalize == "cosine" else 1.0)
    body = _post(server, example={"x": QUERY}, label=1, normalize=normalize, k=5, rerank=40)
    ids = [ts.id_of(i) for i in range(40)]
    assert body["normalize"] == normalize
    assert [h["id"] for h in body["proponents"]] == [ids[i] for i in np.argsort(-expected)[:5]]
    assert [h["id"] for h in body["opponents"]] == [ids[i] for i in np.argsort(expected)[:5]]
    for hit in body["proponents"] + body["opponents"]:
        i = ids.index(hit["id"])
        assert hit["score"] == pytest.approx(expected[i], rel=1e-9)
        assert hit["raw_score"] == pytest.approx(raw[i], rel=1e-9)
        assert sum(hit["checkpoints"]) == pytest.approx(hit["score"], rel=1e-12)
    if normalize == "cosine":
        assert all(-1 - 1e-9 <= h["score"] <= 1 + 1e-9 for h in body["proponents"] + body["opponents"])


def test_first_stage_normalisation_without_reranking_and_on_an_approximate_index():
    """The first stage alone ranks by the normalised estimate; an approximate index has a normalised twin."""
    flat = start_server(built("Flat", "exact"))
    ivf = start_server(built("IVF2,Flat", "exact"), env={"TRACIN_FAISS_PARAMS": '{"nprobe": 2}'})
    try:
        a = _post(flat, example={"x": QUERY}, label=1, normalize="train", k=5, rerank=0)
        b = _post(ivf, example={"x": QUERY}, label=1, normalize="train", k=5, rerank=0)
        c = _post(flat, example={"x": QUERY}, label=1, normalize="train", k=5, rerank=40)
        assert [h["id"] for h in a["proponents"]] == [h["id"] for h in c["proponents"]]  # exact index: exact estimates
        assert [h["id"] for h in b["proponents"]] == [h["id"] for h in c["proponents"]]
        assert a["exact"] is False and c["exact"] is True
    finally:
        flat.stop()
        ivf.stop()
    from indexer.store.directory import IndexDirectory

    assert IndexDirectory.open(built("IVF2,Flat", "exact")).normalized_index is not None
    assert IndexDirectory.open(built("Flat", "exact")).normalized_index is None


def test_losses_at_each_checkpoint_and_train_id_predictions(server):
    body = _post(server, example={"x": QUERY}, label=1, k=3, rerank=40)
    task = MetricTask()
    ts = task.training_set()
    ckpts = checkpoints_of(built())
    states = [load_checkpoint(c.path)[0] for c in ckpts]

    def losses(x, y):
        out = []
        for state in states:
            model = task.build_model()
            model.load_state_dict(state)
            out.append(float(task.loss(model.double()(x.double()), y)[0]))
        return out

    q = torch.tensor([QUERY], dtype=torch.float64)
    assert [c["loss"] for c in body["query"]["checkpoints"]] == pytest.approx(losses(q, torch.tensor([1])), rel=1e-9)
    assert [c["lr"] for c in body["query"]["checkpoints"]] == [c.lr for c in ckpts]
    for hit in body["proponents"]:
        row = [ts.id_of(i) for i in range(40)].index(hit["id"])
        x, y = ts.batch(row, row + 1)
        assert hit["losses"] == pytest.approx(losses(x, y), rel=1e-9)
        assert hit["self_influence_rank"] >= 1
    plain = _post(server, example={"x": QUERY}, label=1, k=3, rerank=0)
    assert plain["proponents"][0].get("checkpoints") is None
    for hit in plain["proponents"] + plain["opponents"]:  # from label_review.npy, recorded at index time
        row = [ts.id_of(i) for i in range(40)].index(hit["id"])
        x, y = ts.batch(row, row + 1)
        assert hit["losses"] == pytest.approx(losses(x, y), rel=1e-9)
    by_id = _post(server, train_id="ex5", k=3)
    x, _ = ts.batch(5, 6)
    model = task.build_model()
    model.load_state_dict(states[-1])
    assert by_id["prediction"]["label"] == int(model.double()(x.double()).argmax())
    logit = _post(server, train_id="ex5", metric="logit", k=3, rerank=0)
    assert logit["metric"]["name"] == "logit" and logit["query"]["checkpoints"][0]["metric"] != \
        logit["query"]["checkpoints"][0]["loss"]
