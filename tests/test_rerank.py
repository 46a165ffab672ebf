"""Exact re-ranking in the service (issue 9): compact sketch index + exact second stage, over real HTTP.

With K' >= N the answer equals the exact-mode index's answer; the `exact` flags say where scores come
from; per-checkpoint terms sum to the score; K' above the server's limit is a 422 naming the field;
a task that no longer reads the indexed training set is refused at start."""
from __future__ import annotations

import functools

import httpx
import numpy as np
import pytest
import torch

from indexer.store.directory import IndexDirectory
from service.loading import ServiceStartupError, load_engine
from service.settings import Settings
from tests.oracle import tracin_matrix
from tests.service_support import (
    ServiceMLPTask, build_mlp_index, checkpoints_of, copy_index, mlp_index, resign_manifest, start_server,
)


@functools.lru_cache(maxsize=None)
def sketch_index():
    return build_mlp_index("mlp-sketch-4", kind="sketch", batch_size=7)  # dim 16: a lossy first stage


@pytest.fixture(scope="module")
def servers():
    started = {"exact": start_server(mlp_index()), "sketch": start_server(sketch_index(), env={"TRACIN_MAX_RERANK": "50"})}
    yield started
    for s in started.values():
        s.stop()


def _post(server, **body):
    res = httpx.post(server.base_url + "/influence", json=body, timeout=60)
    return res.status_code, res.json()


def _example():
    return {"x": [0.3, -1.2, 0.5, 2.0, -0.7, 0.1]}


def test_full_depth_rerank_equals_the_exact_index_and_the_oracle(servers):
    status, exact = _post(servers["exact"], example=_example(), label=1, k=8, rerank=0)
    assert status == 200 and exact["exact"] is True and exact["rerank"] is None
    status, reranked = _post(servers["sketch"], example=_example(), label=1, k=8, rerank=40)
    assert status == 200 and reranked["exact"] is True and reranked["rerank"] == {"depth": 40, "candidates": 40}
    for side in ("proponents", "opponents"):
        assert [h["id"] for h in reranked[side]] == [h["id"] for h in exact[side]]
        for a, b in zip(reranked[side], exact[side]):
            assert a["score"] == pytest.approx(b["score"], rel=1e-5)
    task = ServiceMLPTask()
    ts = task.training_set()
    x, y = ts.batch(0, len(ts))
    q = torch.tensor([_example()["x"]], dtype=torch.float64)
    oracle = tracin_matrix(task, checkpoints_of(sketch_index()), q, torch.tensor([1]), x, y)[0].numpy()
    ids = [ts.id_of(i) for i in range(len(ts))]
    for hit in reranked["proponents"] + reranked["opponents"]:
        assert hit["score"] == pytest.approx(oracle[ids.index(hit["id"])], rel=1e-9, abs=1e-12)
        assert sum(hit["checkpoints"]) == pytest.approx(hit["score"], rel=1e-12, abs=1e-15)
        assert len(hit["checkpoints"]) == 3


def test_rerank_off_gives_the_index_estimates_flagged_approximate(servers):
    status, body = _post(servers["sketch"], example=_example(), label=1, k=5, rerank=0)
    assert status == 200 and body["exact"] is False and body["rerank"] is None
    assert all("checkpoints" not in h or h["checkpoints"] is None for h in body["proponents"])
    status, default = _post(servers["sketch"], example=_example(), label=1, k=5)
    assert status == 200 and default["exact"] is True and default["rerank"]["depth"] == 50  # server default, capped


def test_rerank_above_the_server_limit_is_a_422_naming_the_field(servers):
    status, body = _post(servers["sketch"], example=_example(), k=5, rerank=51)
    assert status == 422 and body["detail"][0]["field"] == "rerank"
    status, body = _post(servers["sketch"], example=_example(), k=5, rerank=-1)
    assert status == 422 and body["detail"][0]["field"] == "rerank"


def test_train_id_and_label_filter_queries_are_reranked(servers):
    status, body = _post(servers["sketch"], train_id="ex3", k=5, rerank=40, exclude_self=True)
    assert status == 200 and body["exact"] is True and "ex3" not in [h["id"] for h in body["proponents"]]
    status, exact = _post(servers["exact"], train_id="ex3", k=5, rerank=0, exclude_self=True)
    assert [h["id"] for h in body["proponents"]] == [h["id"] for h in exact["proponents"]]
    status, filtered = _post(servers["sketch"], train_id="ex3", k=5, rerank=40, filter_label=1)
    labels = ServiceMLPTask().training_set().labels
    assert status == 200 and all(int(labels[int(h["id"][2:])]) == 1 for h in filtered["proponents"] + filtered["opponents"])


def test_index_info_says_what_reranking_does(servers):
    info = httpx.get(servers["sketch"].base_url + "/index", timeout=30).json()
    assert info["rerank"] == {"available": True, "default": 50, "max": 50, "reason": None}
    assert IndexDirectory.open(sketch_index()).manifest["training_set"]["count"] == 40


def test_reranking_can_be_switched_off_and_then_a_request_for_it_is_refused():
    server = start_server(sketch_index(), env={"TRACIN_MAX_RERANK": "0"})
    try:
        status, body = _post(server, example=_example(), k=5)
        assert status == 200 and body["exact"] is False
        status, body = _post(server, example=_example(), k=5, rerank=1)
        assert status == 422 and body["detail"][0]["field"] == "rerank"
    finally:
        server.stop()


class ShuffledMLPTask(ServiceMLPTask):
    """The same task, but its training set comes back in another order (a changed dataset)."""

    def training_set(self):
        from indexer.task import ExampleSet

        base = super().training_set()
        order = torch.arange(len(base)).flip(0)
        return ExampleSet(base.inputs[order], base.labels[order], ids=base.ids, display=base.display)


class NoTrainingSetTask(ServiceMLPTask):
    def training_set(self):
        raise NotImplementedError("served without its training data")


def test_a_different_training_set_is_refused_and_a_missing_one_disables_reranking():
    import json

    for cls, refused in ((ShuffledMLPTask, True), (NoTrainingSetTask, False)):
        path = copy_index(sketch_index(), f"rerank-{cls.__name__}")
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["task"]["ref"] = f"tests.test_rerank:{cls.__name__}"
        (path / "manifest.json").write_text(json.dumps(manifest))
        resign_manifest(path)
        settings = Settings(index_dir=path, warmup=True)
        if refused:
            with pytest.raises(ServiceStartupError, match="training set differs from the one indexed"):
                load_engine(settings)
        else:
            engine = load_engine(settings)
            assert engine.scorer is None and "no training_set()" in engine.rerank_error
            assert engine.index_info()["rerank"]["available"] is False


def test_reranked_scores_match_the_embedding_of_each_candidate():
    """Second-stage scores are exact inner products of the same embeddings the index approximates:
    with kind=exact they agree with the stored vectors to float32 precision."""
    engine = load_engine(Settings(index_dir=mlp_index(), warmup=False))
    from types import SimpleNamespace

    example = engine.task.example_schema.model_validate(_example())
    req = SimpleNamespace(example=example, train_id=None, label=2, filter_label=None, k=10, exclude_self=False,
                          include_embedding=True, rerank=40)
    body = engine.influence(req)
    q = np.asarray(body["query"]["embedding"], dtype=np.float64)
    vectors = engine.index_dir.index.reconstruct_n(0, engine.count).astype(np.float64)
    for hit in body["proponents"]:
        row = engine.id_to_row[hit["id"]]
        assert hit["score"] == pytest.approx(float(vectors[row] @ q), rel=1e-5)
