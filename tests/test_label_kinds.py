"""Labels that are not class ids, end to end over HTTP: regression targets and multi-label vectors in
listings (never truncated), label filters where they make sense, query labels of the task's form."""
from __future__ import annotations

import httpx
import pytest

from tests import zoo
from tests.service_support import start_server, zoo_index as index_of


@pytest.fixture(scope="module")
def servers():
    started = {name: start_server(index_of(name)) for name in ("Regression", "MultiOutputRegression", "MultiLabel")}
    yield {name: s.base_url for name, s in started.items()}
    for s in started.values():
        s.stop()


def test_regression_targets_are_listed_as_floats_and_filters_are_refused(servers):
    url = servers["Regression"]
    labels = zoo.Regression().training_set().labels
    page = httpx.get(url + "/self-influence/top", params={"k": 12}).json()
    for item in page["items"]:
        row = int(item["id"][1:])
        assert isinstance(item["label"], float) and item["label"] == pytest.approx(float(labels[row]), rel=1e-12)
        assert item["label_name"] == f"{float(labels[row]):.6g}"
    held = zoo.Regression().held_out_set()
    ok = httpx.post(url + "/influence", json={"example": held.example_of(0), "label": 0.25, "k": 3}).json()
    assert ok["label_used"] == 0.25 and isinstance(ok["prediction"]["label"], float)
    as_int = httpx.post(url + "/influence", json={"example": held.example_of(0), "label": 2, "k": 3})
    assert as_int.status_code == 200 and as_int.json()["label_used"] == 2.0
    bad = httpx.post(url + "/influence", json={"example": held.example_of(0), "filter_label": 1})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "filter_label"
    nan = httpx.post(url + "/influence", json={"example": held.example_of(0), "label": "x"})
    assert nan.status_code == 422 and nan.json()["detail"][0]["field"] == "label"
    info = httpx.get(url + "/index").json()
    assert info["label_kind"] == "regression" and [m["name"] for m in info["metrics"]] == ["loss"]
    logit = httpx.post(url + "/influence", json={"example": held.example_of(0), "metric": "logit"})
    assert logit.status_code == 422 and logit.json()["detail"][0]["field"].startswith("metric")


def test_multi_output_regression_takes_a_list_of_the_right_width(servers):
    url = servers["MultiOutputRegression"]
    held = zoo.MultiOutputRegression().held_out_set()
    ok = httpx.post(url + "/influence", json={"example": held.example_of(0), "label": [0.5, -1.0], "k": 3})
    assert ok.status_code == 200 and ok.json()["label_used"] == [0.5, -1.0]
    wrong = httpx.post(url + "/influence", json={"example": held.example_of(0), "label": [0.5], "k": 3})
    assert wrong.status_code == 422 and wrong.json()["detail"][0]["field"] == "label"
    item = httpx.get(url + "/self-influence/top", params={"k": 1}).json()["items"][0]
    assert isinstance(item["label"], list) and len(item["label"]) == 2


def test_multi_label_vectors_filters_and_class_names(servers):
    url = servers["MultiLabel"]
    task = zoo.MultiLabel()
    labels = task.training_set().labels
    page = httpx.get(url + "/self-influence/top", params={"k": 12}).json()
    for item in page["items"]:
        row = int(item["id"][1:])
        assert item["label"] == [int(v) for v in labels[row].tolist()]
        names = [n for n, v in zip(task.class_names, item["label"]) if v] or ["(none)"]
        assert item["label_name"] == ", ".join(names)
    held = task.held_out_set()
    body = httpx.post(url + "/influence", json={"example": held.example_of(0), "k": 12, "filter_label": "blue",
                                                 "rerank": 12}).json()
    hits = body["proponents"] + body["opponents"]
    assert hits and all(h["label"][2] == 1 for h in hits)
    by_names = httpx.post(url + "/influence", json={"example": held.example_of(0), "label": ["red", "round"], "k": 3})
    assert by_names.status_code == 200 and by_names.json()["label_used"] == [1, 0, 0, 1]
    wrong = httpx.post(url + "/influence", json={"example": held.example_of(0), "label": ["purple"]})
    assert wrong.status_code == 422 and wrong.json()["detail"][0]["field"] == "label"
    filtered = httpx.get(url + "/self-influence/top", params={"k": 20, "label": "green"}).json()
    assert filtered["items"] and all(i["label"][1] == 1 for i in filtered["items"])
