"""The service over real HTTP: `tracin serve` in a subprocess (uvicorn), queried with httpx.

Two servers: an exact-mode float64 MLP index (compared with the brute-force TracIn oracle) and the
digits demo task (sketch projection; the example schema of the issue; error cases; concurrency).
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from indexer.sketch.embedding import load_embedder
from indexer.store.directory import IndexDirectory
from service.client import AsyncInfluenceClient, InfluenceAPIError, InfluenceClient
from tests.oracle import tracin_matrix
from tests.service_support import ServiceMLPTask, checkpoints_of, digits_index, mlp_index, start_server

K = 10


@pytest.fixture(scope="module")
def mlp_server():
    server = start_server(mlp_index())
    yield server
    server.stop()


@pytest.fixture(scope="module")
def digits_server():
    server = start_server(digits_index(), env={"TRACIN_COMPUTE_THREADS": "4", "TRACIN_MAX_K": "50"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mlp(mlp_server):
    with httpx.Client(base_url=mlp_server.base_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def digits(digits_server):
    with httpx.Client(base_url=digits_server.base_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def mlp_data():
    """Training and held-out sets, stored index, and the indexer's own embedder for the MLP index."""
    path = mlp_index()
    task = ServiceMLPTask()
    index = IndexDirectory.open(path)
    _, embedder = load_embedder(index)
    return {"task": task, "train": task.training_set(), "held": task.held_out_set(), "index": index,
            "embedder": embedder, "checkpoints": checkpoints_of(path),
            "vectors": np.stack([index.index.reconstruct(r) for r in range(index.count)]).astype(np.float64)}


def _post(client: httpx.Client, body) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return client.post("/influence", content=body, headers={"Content-Type": "application/json"})
    return client.post("/influence", json=body)


def _ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def _check_top(hits: list[dict], truth: dict[str, float], sign: int, k: int, tol: float) -> None:
    """Scores match the truth per id, are ordered, have the right sign, and are the true top-k."""
    got = [h["id"] for h in hits]
    scores = [h["score"] for h in hits]
    assert len(set(got)) == len(got)
    for h in hits:
        assert h["score"] == pytest.approx(truth[h["id"]], abs=tol)
        assert sign * h["score"] > 0
    assert scores == sorted(scores, reverse=sign > 0)
    clearly_signed = [s for s in truth.values() if sign * s > tol]  # near-zero scores may go either way
    assert min(k, len(clearly_signed)) <= len(hits) <= k
    left = [sign * s for i, s in truth.items() if i not in set(got)]
    if hits and left:
        assert max(left) <= sign * scores[-1] + tol  # nothing better was left out


# -- exact mode: the oracle --------------------------------------------------------------------

def test_ready_health_index_docs(mlp):
    assert mlp.get("/healthz").json() == {"status": "ok"}
    ready = mlp.get("/readyz").json()
    assert ready["status"] == "ready" and ready["count"] == 40
    info = mlp.get("/index").json()
    assert info["count"] == 40 and info["approximate"] is False and info["projection"]["kind"] == "exact"
    assert info["class_names"] == ["a", "b", "c"] and info["queries"] == 5
    assert info["example_schema"]["properties"]["x"]["maxItems"] == 6
    spec = mlp.get("/openapi.json").json()
    body_ref = spec["paths"]["/influence"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request_schema = spec["components"]["schemas"][body_ref.rsplit("/", 1)[-1]]
    assert {"example", "train_id", "label", "k", "filter_label"} <= set(request_schema["properties"])
    assert "VectorExample" in spec["components"]["schemas"]  # the task's example schema is documented
    assert mlp.get("/docs").status_code == 200


@pytest.mark.parametrize("with_label", [False, True])
def test_influence_equals_embedding_products_and_oracle(mlp, mlp_data, with_label):
    task, held, train = mlp_data["task"], mlp_data["held"], mlp_data["train"]
    for q in range(len(held)):
        x = held.inputs[q:q + 1]
        body = {"example": {"x": x[0].tolist()}, "k": K}
        if with_label:
            body["label"] = ["a", "b", "c"][int(held.labels[q])]
        out = _ok(_post(mlp, body))
        # label: given, or the prediction at the last checkpoint
        predicted, probs = mlp_data["embedder"].predict(x)
        assert out["prediction"]["label"] == int(predicted[0])
        assert out["prediction"]["probabilities"] == pytest.approx(probs[0].tolist(), abs=1e-12)
        label = int(held.labels[q]) if with_label else int(predicted[0])
        assert out["label_used"] == label
        # (1) inner products of the indexer's own embeddings
        emb = mlp_data["embedder"].embed(x, torch.tensor([label]))
        products = mlp_data["vectors"] @ emb.vectors[0].numpy()
        # (2) brute-force TracIn, float64
        oracle = tracin_matrix(task, mlp_data["checkpoints"], train.inputs, train.labels, x,
                               torch.tensor([label]))[:, 0].numpy()
        np.testing.assert_allclose(products, oracle, rtol=1e-6, atol=1e-6 * np.abs(oracle).max())
        tol = 2e-6 * np.abs(oracle).max()
        ids = [train.id_of(r) for r in range(len(train))]
        _check_top(out["proponents"], dict(zip(ids, oracle.tolist())), +1, K, tol)
        _check_top(out["opponents"], dict(zip(ids, oracle.tolist())), -1, K, tol)
        assert out["query"]["self_influence"] == pytest.approx(float(emb.self_influence[0]), rel=1e-12)
        assert out["index"] == {"approximate": False, "count": 40, "candidates": 40}
        assert out["took_ms"] > 0
        for hit in out["proponents"] + out["opponents"]:
            row = ids.index(hit["id"])
            assert hit["label"] == int(train.labels[row])
            assert hit["display"] == {"row": row, "flipped": row % 7 == 0}


def test_label_filter_is_the_top_k_of_the_subset(mlp, mlp_data):
    train, held = mlp_data["train"], mlp_data["held"]
    x = held.inputs[0:1]
    out = _ok(_post(mlp, {"example": {"x": x[0].tolist()}, "k": 5, "filter_label": "b"}))
    label = out["label_used"]
    oracle = tracin_matrix(mlp_data["task"], mlp_data["checkpoints"], train.inputs, train.labels, x,
                           torch.tensor([label]))[:, 0].numpy()
    subset = {train.id_of(r): float(oracle[r]) for r in range(len(train)) if int(train.labels[r]) == 1}
    tol = 2e-6 * np.abs(oracle).max()
    assert all(h["label"] == 1 for h in out["proponents"] + out["opponents"])
    _check_top(out["proponents"], subset, +1, 5, tol)
    _check_top(out["opponents"], subset, -1, 5, tol)
    assert out["index"]["candidates"] == len(subset)


def test_service_embedding_is_the_indexers(mlp, mlp_data):
    """The MLP index was built with batch_size=1, the service's batch: vectors are bit-identical."""
    train = mlp_data["train"]
    for row in range(len(train)):
        out = _ok(_post(mlp, {"example": {"x": train.inputs[row].tolist()}, "label": int(train.labels[row]),
                              "include_embedding": True, "k": 1}))
        stored = mlp_data["index"].index.reconstruct(row)
        assert np.array_equal(np.asarray(out["query"]["embedding"], dtype=np.float32), stored), row
        assert out["query"]["self_influence"] == pytest.approx(float(mlp_data["index"].self_influence[row]),
                                                               rel=1e-12)


def test_train_id_agrees_with_posting_the_training_example(mlp, mlp_data):
    train = mlp_data["train"]
    for row in (0, 7, 23):
        by_id = _ok(_post(mlp, {"train_id": train.id_of(row), "k": K, "include_embedding": True}))
        posted = _ok(_post(mlp, {"example": {"x": train.inputs[row].tolist()}, "label": int(train.labels[row]),
                                 "k": K, "include_embedding": True}))
        assert by_id["prediction"] == posted["prediction"] and by_id["query"]["train_id"] == train.id_of(row)
        assert by_id["label_used"] == posted["label_used"] == int(train.labels[row])
        assert by_id["query"]["embedding"] == posted["query"]["embedding"]
        for name in ("proponents", "opponents"):
            assert [h["id"] for h in by_id[name]] == [h["id"] for h in posted[name]]
            assert [h["score"] for h in by_id[name]] == pytest.approx([h["score"] for h in posted[name]], rel=1e-6)
        # in exact mode an example's score with itself is its exact self-influence
        wider = _ok(_post(mlp, {"train_id": train.id_of(row), "k": 40}))
        itself = [h for h in wider["proponents"] if h["id"] == train.id_of(row)]
        assert itself and itself[0]["score"] == pytest.approx(by_id["query"]["self_influence"], rel=1e-6)
        excluded = _ok(_post(mlp, {"train_id": train.id_of(row), "k": K, "exclude_self": True}))
        assert [h["id"] for h in excluded["proponents"]] == \
            [h["id"] for h in wider["proponents"] if h["id"] != train.id_of(row)][:K]


def test_self_influence_endpoint_equals_stored_exact_values(mlp, mlp_data):
    index, train = mlp_data["index"], mlp_data["train"]
    si = index.self_influence
    page = mlp.get("/self-influence/top", params={"k": 1000}).json()
    assert page["total"] == 40 and len(page["items"]) == 40
    order = np.argsort(-si, kind="stable")
    assert [it["id"] for it in page["items"]] == [train.id_of(r) for r in order]
    assert [it["score"] for it in page["items"]] == [float(si[r]) for r in order]  # exact, not float32
    assert [it["rank"] for it in page["items"]] == list(range(1, 41))
    # the stored values are the exact TracIn self-influence (oracle diagonal)
    diag = torch.diagonal(tracin_matrix(mlp_data["task"], mlp_data["checkpoints"], train.inputs, train.labels,
                                        train.inputs, train.labels)).numpy()
    np.testing.assert_allclose(si, diag, rtol=1e-10)
    # paging and the label filter
    second = mlp.get("/self-influence/top", params={"k": 5, "offset": 5}).json()
    assert second["items"] == page["items"][5:10]
    only_a = mlp.get("/self-influence/top", params={"k": 100, "label": "a"}).json()
    assert only_a["total"] == int((train.labels == 0).sum()) and only_a["label"] == 0
    assert [it["id"] for it in only_a["items"]] == [it["id"] for it in page["items"] if it["label"] == 0]
    assert mlp.get("/self-influence/top", params={"offset": 100}).json()["items"] == []
    # one example
    top = page["items"][0]
    info = mlp.get(f"/examples/{top['id']}").json()
    assert info["rank"] == 1 and info["self_influence"] == top["score"] and info["label"] == top["label"]
    assert info["label_name"] == ["a", "b", "c"][top["label"]]


def test_queries_listing(mlp, mlp_data):
    page = mlp.get("/queries").json()
    assert page["total"] == 5 and [q["id"] for q in page["items"]] == [f"q{i}" for i in range(5)]
    held = mlp_data["held"]
    assert page["items"][2]["example"] == {"x": held.inputs[2].tolist()}
    out = _ok(_post(mlp, {"example": page["items"][2]["example"]}))  # k defaults to 10
    assert len(out["proponents"]) <= 10


def test_mlp_specific_errors(mlp, mlp_data):
    x = mlp_data["held"].inputs[0].tolist()
    # a label filter that matches no training example (class "c" has none)
    r = _post(mlp, {"example": {"x": x}, "filter_label": "c"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "filter_label"
    r = mlp.get("/self-influence/top", params={"label": "c"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "label"
    # NaN / Infinity tokens in a schema without its own range check
    for token in ("NaN", "Infinity", "-Infinity"):
        raw = '{"example": {"x": [0.1, %s, 0, 0, 0, 0]}}' % token
        r = _post(mlp, raw)
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["field"] == "example.x.1"
    # finite but absurd inputs: a 4xx or an answer, never a 500
    r = _post(mlp, {"example": {"x": [1e308, -1e308, 1e308, 0, 0, 0]}})
    assert r.status_code in (200, 422), r.text
    if r.status_code == 422:
        assert r.json()["detail"][0]["field"] == "example"


# -- digits: the example schema ------------------------------------------------------

def _digit(digits) -> dict:
    return digits.get("/queries", params={"limit": 1}).json()["items"][0]["example"]


def test_digits_influence_and_train_id(digits):
    example = _digit(digits)
    assert len(example["pixels"]) == 64
    out = _ok(_post(digits, {"example": example, "k": K}))
    assert 0 <= out["prediction"]["label"] <= 9 and len(out["prediction"]["probabilities"]) == 10
    assert math.isclose(sum(out["prediction"]["probabilities"]), 1.0, rel_tol=1e-6)
    assert len(out["proponents"]) == K and len(out["opponents"]) == K
    assert all(h["score"] > 0 for h in out["proponents"]) and all(h["score"] < 0 for h in out["opponents"])
    assert out["proponents"][0]["display"]["image"].startswith("data:image/png;base64,")
    # a training example posted vs. by id (the index was built in batches of 256: equal to float32 rounding)
    first = digits.get("/self-influence/top", params={"k": 1}).json()["items"][0]
    info = digits.get(f"/examples/{first['id']}").json()
    assert info["rank"] == 1
    by_id = _ok(_post(digits, {"train_id": first["id"], "k": K, "include_embedding": True}))
    row = info["row"]
    pixels = _digits_training_pixels(row)
    posted = _ok(_post(digits, {"example": {"pixels": pixels}, "label": info["label"], "k": K,
                                "include_embedding": True}))
    np.testing.assert_allclose(posted["query"]["embedding"], by_id["query"]["embedding"], rtol=1e-4, atol=1e-6)
    assert posted["query"]["self_influence"] == pytest.approx(info["self_influence"], rel=1e-5)
    wide = _ok(_post(digits, {"train_id": first["id"], "k": 50}))
    for name in ("proponents", "opponents"):
        # the same hits up to float32 rounding: equal scores rank by rank, and every posted hit has the
        # score the stored vector gives it (robust to near-ties swapping places)
        assert [h["score"] for h in posted[name]] == pytest.approx([h["score"] for h in by_id[name]], rel=1e-4)
        stored = {h["id"]: h["score"] for h in wide[name]}
        for hit in posted[name]:
            assert stored[hit["id"]] == pytest.approx(hit["score"], rel=1e-4)


def _digits_training_pixels(row: int) -> list[float]:
    from indexer.demo.digits import DigitsTask

    return DigitsTask(0).training_set().example_of(row)["pixels"]


EX = {"pixels": [0.0] * 64}


def _raw(pixels_token: str = "0", k_token: str = "10") -> str:
    pixels = ", ".join([pixels_token] + ["0"] * 63)
    return '{"example": {"pixels": [%s]}, "k": %s}' % (pixels, k_token)


BAD_INFLUENCE = [
    ("malformed json", "{\"example\": ", "body"),
    ("json array", [1, 2, 3], "body"),
    ("empty object", {}, "example"),
    ("neither example nor train_id", {"k": 5}, "example"),
    ("both example and train_id", {"example": EX, "train_id": "train-0"}, "example"),
    ("example is a string", {"example": "abc"}, "example"),
    ("pixels is a string", {"example": {"pixels": "abc"}}, "example.pixels"),
    ("pixels of strings", {"example": {"pixels": ["a"] * 64}}, "example.pixels"),
    ("pixels nested", {"example": {"pixels": [[0]] * 64}}, "example.pixels"),
    ("63 pixels", {"example": {"pixels": [0] * 63}}, "example.pixels"),
    ("65 pixels", {"example": {"pixels": [0] * 65}}, "example.pixels"),
    ("no pixels", {"example": {}}, "example.pixels"),
    ("pixel above 16", {"example": {"pixels": [17] + [0] * 63}}, "example.pixels"),
    ("negative pixel", {"example": {"pixels": [0] * 63 + [-1]}}, "example.pixels"),
    ("NaN token", _raw("NaN"), "example.pixels"),
    ("Infinity token", _raw("Infinity"), "example.pixels"),
    ("-Infinity token", _raw("-Infinity"), "example.pixels"),
    ("huge number token", _raw("1e999"), "example.pixels"),
    ("NaN k", _raw(k_token="NaN"), "k"),
    ("misspelt field", {"example": EX, "lable": 3}, "lable"),
    ("k zero", {"example": EX, "k": 0}, "k"),
    ("k negative", {"example": EX, "k": -1}, "k"),
    ("k over max_k", {"example": EX, "k": 51}, "k"),
    ("k huge", {"example": EX, "k": 10 ** 9}, "k"),
    ("k beyond int64", {"example": EX, "k": 10 ** 30}, "k"),
    ("k string", {"example": EX, "k": "ten"}, "k"),
    ("k float", {"example": EX, "k": 2.5}, "k"),
    ("k null", {"example": EX, "k": None}, "k"),
    ("unknown train_id", {"train_id": "no-such-example"}, "train_id"),
    ("train_id number", {"train_id": 5}, "train_id"),
    ("unknown label name", {"example": EX, "label": "dog"}, "label"),
    ("label out of range", {"example": EX, "label": 10}, "label"),
    ("negative label", {"example": EX, "label": -1}, "label"),
    ("label float", {"example": EX, "label": 1.5}, "label"),
    ("label bool", {"example": EX, "label": True}, "label"),
    ("label with train_id", {"train_id": "train-0", "label": 1}, "label"),
    ("unknown filter label", {"example": EX, "filter_label": "dog"}, "filter_label"),
    ("filter label out of range", {"train_id": "train-0", "filter_label": 12}, "filter_label"),
    ("exclude_self list", {"train_id": "train-0", "exclude_self": [1]}, "exclude_self"),
]


@pytest.mark.parametrize("name,body,field", BAD_INFLUENCE, ids=[b[0] for b in BAD_INFLUENCE])
def test_bad_influence_requests_are_4xx_naming_the_field(digits, name, body, field):
    r = _post(digits, body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    data = r.json()
    assert data["error"] and data["message"] and "Traceback" not in r.text
    fields = [d["field"] for d in data["detail"]]
    assert any(f == field or f.startswith(field + ".") for f in fields), (fields, data)


BAD_GETS = [
    ("/self-influence/top", {"k": 0}, 422, "k"),
    ("/self-influence/top", {"k": 1001}, 422, "k"),
    ("/self-influence/top", {"k": "abc"}, 422, "k"),
    ("/self-influence/top", {"offset": -1}, 422, "offset"),
    ("/self-influence/top", {"label": "dog"}, 422, "label"),
    ("/self-influence/top", {"label": "99"}, 422, "label"),
    ("/queries", {"limit": 0}, 422, "limit"),
    ("/queries", {"offset": -5}, 422, "offset"),
    ("/examples/no-such-id", {}, 404, "id"),
    ("/no/such/route", {}, 404, "path"),
]


@pytest.mark.parametrize("path,params,status,field", BAD_GETS, ids=[f"{b[0]}-{b[1]}" for b in BAD_GETS])
def test_bad_get_requests_are_4xx_naming_the_field(digits, path, params, status, field):
    r = digits.get(path, params=params)
    assert r.status_code == status, r.text
    assert [d["field"] for d in r.json()["detail"]][0] == field


def test_json_without_json_content_type_says_so(digits):
    r = digits.post("/influence", content=b'{"train_id": "train-1"}',
                    headers={"Content-Type": "application/x-www-form-urlencoded"})  # curl -d without -H
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "body" and "Content-Type: application/json" in r.json()["message"]


def test_wrong_method_and_oversized_body(digits):
    r = digits.get("/influence")
    assert r.status_code == 405 and r.json()["detail"][0]["field"] == "path"
    big = json.dumps({"example": {"pixels": [0] * 64}, "padding": "x" * (2 << 20)})
    r = digits.post("/influence", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["detail"][0]["field"] == "body"
    # the server is still fine
    assert digits.get("/readyz").status_code == 200


def test_concurrent_requests_match_sequential(digits):
    queries = digits.get("/queries", params={"limit": 24}).json()["items"]
    bodies = []
    for i, q in enumerate(queries):
        body = {"example": q["example"], "k": 5 + i % 3}
        if i % 3 == 1:
            body["label"] = (q["label"] + 1) % 10  # a different loss than the prediction's
        if i % 4 == 2:
            body["filter_label"] = i % 10
        bodies.append(body)
    bodies += [{"train_id": f"train-{7 * i}", "k": 6} for i in range(8)]

    def strip(out: dict) -> dict:
        out = dict(out)
        out.pop("took_ms")
        return out

    sequential = [strip(_ok(_post(digits, b))) for b in bodies]
    local = threading.local()
    base_url = str(digits.base_url)

    def one(i: int) -> dict:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=base_url, timeout=60)
        return strip(_ok(_post(local.client, bodies[i])))

    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(one, list(range(len(bodies))) * 2))
    for i, out in enumerate(concurrent):
        assert out == sequential[i % len(bodies)], i


def test_metrics_endpoint(digits):
    _ok(_post(digits, {"train_id": "train-1"}))
    text = digits.get("/metrics").text
    assert 'tracin_http_requests_total{method="POST",route="/influence",status="200"}' in text
    assert "tracin_influence_stage_seconds_bucket" in text and "tracin_ready 1.0" in text
    assert "tracin_index_examples 1500.0" in text


def test_python_clients(digits_server):
    with InfluenceClient(digits_server.base_url) as client:
        assert client.ready()
        query = client.queries(limit=2).items[1]
        result = client.influence(query.example, k=3)
        assert len(result.proponents) == 3 and result.prediction is not None
        assert result.proponents[0].score >= result.proponents[-1].score
        page = client.self_influence_top(k=4, label=3)
        assert page.total > 0 and all(item.label == 3 for item in page.items)
        assert client.example(page.items[0].id).rank == page.items[0].rank
        assert client.index_info().count == 1500
        with pytest.raises(InfluenceAPIError) as err:
            client.influence({"pixels": [1, 2]})
        assert err.value.status == 422 and err.value.fields == ["example.pixels"]
        with pytest.raises(InfluenceAPIError) as err:
            client.example("nope")
        assert err.value.status == 404

    async def run():
        async with AsyncInfluenceClient(digits_server.base_url) as client:
            results = await asyncio.gather(*(client.influence(train_id=f"train-{i}", k=2) for i in range(6)))
            return results, await client.self_influence_top(k=2)

    results, page = asyncio.run(run())
    assert [r.query.train_id for r in results] == [f"train-{i}" for i in range(6)]
    assert len(page.items) == 2
    with InfluenceClient(digits_server.base_url) as client:
        again = client.influence(train_id="train-4", k=2)
    assert again.proponents == results[4].proponents and again.opponents == results[4].opponents


def test_self_influence_histogram_counts_every_example_and_flag(digits):
    index = IndexDirectory.open(digits_index(), verify=False)
    si = np.asarray(index.self_influence)
    flipped = np.array([e["display"]["flipped"] for e in index.examples])
    for scale in ("log", "linear"):
        h = _ok(digits.get("/self-influence/histogram", params={"bins": 25, "scale": scale}))
        assert h["scale"] == scale and len(h["edges"]) == 26 and len(h["counts"]) == 25
        assert sum(h["counts"]) == h["total"] == si.size
        assert sum(h["flagged"]["flipped"]) == int(flipped.sum())
        assert h["edges"][-1] == pytest.approx(si.max()) and h["counts"][-1] >= 1
        # bins i.. hold exactly the first sum(counts[i:]) rows of /self-influence/top (a dashboard's offset)
        above = sum(h["counts"][10:])
        ranked = np.sort(si)[::-1]
        assert ranked[above - 1] >= h["edges"][10] * (1 - 1e-9) and ranked[above] <= h["edges"][10] * (1 + 1e-9)
    labels = np.array([e["label"] for e in index.examples])
    h = _ok(digits.get("/self-influence/histogram", params={"label": "7"}))
    assert h["label"] == 7 and sum(h["counts"]) == h["total"] == int((labels == 7).sum())
    for params, field in (({"bins": 0}, "bins"), ({"scale": "cubic"}, "scale"), ({"label": "11"}, "label")):
        r = digits.get("/self-influence/histogram", params=params)
        assert r.status_code == 422 and field in r.text
