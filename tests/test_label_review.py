"""Label review over HTTP (real `tracin serve`) and out-of-distribution warnings on real examples.

* GET /label-review serves every ranking of the index (indexer.build.review, checked against a float64 brute force
  in tests/test_zoo.py) in its order, with the prediction, probability and suggested label per row; the
  export carries the same rows; bad or unsupported rankings are 422 naming the field; an index built before
  label review still serves self-influence.
* label_review.npy and input_ranges.json are covered by the manifest's sha256 and validated on open.
* POST /influence answers `warnings` for an image on another scale or with a white background (the digits
  demo over HTTP; Fashion-MNIST images through the recorded ranges when the data is installed), none for
  held-out examples.
"""
from __future__ import annotations

import csv
import io
import json
import re

import httpx
import numpy as np
import pytest

from indexer.build.review import RANKINGS, ranking_scores, suspicious_first
from indexer.store.directory import IndexDirectory, IndexDirectoryError
from service.app import create_app
from service.loading import ServiceStartupError, load_engine
from service.settings import Settings
from tests.service_support import copy_index, digits_index, mlp_index, resign_manifest, start_server


@pytest.fixture(scope="module")
def digits():
    path = digits_index()
    server = start_server(path, env={"TRACIN_TORCH_THREADS": "1"})
    try:
        yield path, server.base_url
    finally:
        server.stop()


def test_every_ranking_over_http_in_the_index_order(digits):
    path, url = digits
    index = IndexDirectory.open(path)
    scores = ranking_scores(index.label_review, index.self_influence)
    assert sorted(scores) == sorted(RANKINGS)
    default = httpx.get(url + "/label-review", params={"k": 20}).json()
    assert default["ranking"] == default["default_ranking"] == "combined" and sorted(default["rankings"]) == sorted(RANKINGS)
    labels = np.array([e["label"] for e in index.examples])
    for ranking in RANKINGS:
        page = httpx.get(url + "/label-review", params={"k": 30, "offset": 5, "ranking": ranking}).json()
        order = suspicious_first(ranking, scores[ranking])[5:35]
        assert [x["id"] for x in page["items"]] == [index.examples[r]["id"] for r in order], ranking
        assert [x["score"] for x in page["items"]] == pytest.approx(scores[ranking][order].tolist(), rel=1e-12)
        assert [x["rank"] for x in page["items"]] == list(range(6, 36)) and page["order"] == RANKINGS[ranking][0]
        for x, r in zip(page["items"], order):
            assert x["prediction"] == int(index.label_review["prediction"][r])
            assert x["probability"] == pytest.approx(float(index.label_review["probability"][r]), rel=1e-12)
            assert x["suggested_label"] == (None if x["prediction"] == labels[r] else x["prediction"])
            assert x["self_influence"] == pytest.approx(float(index.self_influence[r]), rel=1e-12)
    from service.client import InfluenceClient

    with InfluenceClient(url) as client:  # the Python client's typed page
        typed = client.label_review("margin", k=5)
        assert typed.order == "ascending" and [x.id for x in typed.items] == [
            index.examples[r]["id"] for r in suspicious_first("margin", scores["margin"])[:5]]
    # self_influence ranking = GET /self-influence/top
    top = httpx.get(url + "/self-influence/top", params={"k": 50, "label": 3}).json()
    mine = httpx.get(url + "/label-review", params={"k": 50, "label": 3, "ranking": "self_influence"}).json()
    assert [x["id"] for x in mine["items"]] == [x["id"] for x in top["items"]] and mine["total"] == top["total"]
    assert all(x["label"] == 3 for x in mine["items"])
    # the flipped labels of the digits demo are found: most of the top 10% by the default ranking
    flipped = np.array([bool(e["display"]["flipped"]) for e in index.examples])
    first = suspicious_first("combined", scores["combined"])[: len(flipped) // 10]
    assert flipped[first].mean() > 0.6, flipped[first].mean()


def test_export_csv_and_json(digits):
    path, url = digits
    page = httpx.get(url + "/label-review", params={"k": 100, "ranking": "aum", "label": 7}).json()
    r = httpx.get(url + "/label-review/export", params={"format": "csv", "ranking": "aum", "label": 7, "limit": 100})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"] == 'attachment; filename="label-review-aum.csv"'
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [row["id"] for row in rows] == [x["id"] for x in page["items"]]
    assert [float(row["score"]) for row in rows] == [x["score"] for x in page["items"]]  # repr: no digit lost
    assert {row["ranking"] for row in rows} == {"aum"} and "display.image" not in rows[0]
    assert [row["prediction_name"] for row in rows] == [x["prediction_name"] for x in page["items"]]
    data = httpx.get(url + "/label-review/export", params={"format": "json"}).json()
    assert data["ranking"] == "combined" and data["total"] == IndexDirectory.open(path).count == len(data["items"])
    assert all(not str(v).startswith("data:") for x in data["items"] for v in x["display"].values())


def test_bad_rankings_are_422_naming_the_field(digits):
    _, url = digits
    for params in ({"ranking": "nope"}, {"ranking": ""}, {"k": 0}, {"label": "not-a-class"}):
        r = httpx.get(url + "/label-review", params=params)
        assert r.status_code == 422, params
        assert r.json()["detail"][0]["field"] in ("ranking", "k", "label"), r.json()
    r = httpx.get(url + "/label-review/export", params={"format": "xlsx"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "format"
    r = httpx.get(url + "/label-review/histogram", params={"ranking": "margin", "bins": 10, "scale": "log"}).json()
    assert r["scale"] == "linear" and r["order"] == "ascending" and sum(r["counts"]) == r["total"]  # margins < 0


def test_regression_has_no_margins_and_an_old_index_still_serves_self_influence(tmp_path):
    from fastapi.testclient import TestClient

    from indexer.config import parse_config
    from indexer.build.pipeline import build_index
    from tests import zoo
    from tests.conftest import make_checkpoints

    ckpts = make_checkpoints(zoo.Regression(), tmp_path, count=2)
    data = {"task": "tests.zoo:Regression", "checkpoints": [{"path": str(c.path), "lr": c.lr} for c in ckpts],
            "projection": {"kind": "exact"}}
    path = build_index(parse_config(data, tmp_path), tmp_path / "index").path
    with TestClient(create_app(Settings(index_dir=path, access_log=False))) as client:
        page = client.get("/label-review", params={"k": 3}).json()
        assert page["rankings"] == ["combined", "self_influence", "loss"]
        assert page["items"][0]["suggested_label"] is None and page["items"][0]["probability"] is None
        assert isinstance(page["items"][0]["prediction"], float)
        r = client.get("/label-review", params={"ranking": "aum"})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "ranking" and "margins" in r.json()["message"]
    # An index built before label review (no label_review.npy, no input_ranges.json): self-influence only.
    old = copy_index(mlp_index(), "before-label-review")
    manifest = json.loads((old / "manifest.json").read_text())
    for name in ("label_review.npy", "input_ranges.json"):
        (old / name).unlink()
        del manifest["files"][name]
    del manifest["label_review"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    resign_manifest(old)
    with TestClient(create_app(Settings(index_dir=old, access_log=False))) as client:
        page = client.get("/label-review").json()
        assert page["ranking"] == "self_influence" and page["rankings"] == ["self_influence"]
        assert page["items"][0]["prediction"] is None
        r = client.get("/label-review", params={"ranking": "loss"})
        assert r.status_code == 422 and "rebuild" in r.json()["message"]
        answer = client.post("/influence", json={"example": {"x": [0.1] * 6}, "k": 2}).json()
        assert answer["warnings"] == []


def test_tampered_review_and_ranges_files_are_refused(tmp_path):
    for name in ("label_review.npy", "input_ranges.json"):
        bad = copy_index(mlp_index(), f"tampered-{name}")
        data = bytearray((bad / name).read_bytes())
        data[-3] ^= 0x01
        (bad / name).write_bytes(bytes(data))
        with pytest.raises(ServiceStartupError, match=f"{name} does not match the sha256"):
            load_engine(Settings(index_dir=bad, access_log=False))
    # consistent edits (sha256 updated) are refused by the checks behind it
    for field, change in (("probability", lambda v: v * 3), ("prediction", lambda v: v + 7)):
        bad = copy_index(mlp_index(), "edited")
        table = np.load(bad / "label_review.npy")
        table[field] = change(table[field])
        np.save(bad / "label_review.npy", table)
        _rehash(bad, "label_review.npy")
        with pytest.raises(IndexDirectoryError, match="label_review.npy field (probability|prediction)"):
            IndexDirectory.open(bad)
    bad = copy_index(mlp_index(), "edited-ranges")
    doc = json.loads((bad / "input_ranges.json").read_text())
    doc["tensors"][0]["mean"] = doc["tensors"][0]["mean"][:-1]
    (bad / "input_ranges.json").write_text(json.dumps(doc))
    _rehash(bad, "input_ranges.json")
    with pytest.raises(IndexDirectoryError, match="input_ranges.json tensors\\[0\\].mean must be 6 finite numbers"):
        IndexDirectory.open(bad)


def _rehash(path, name):
    from indexer.checkpoints import sha256_file

    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(path / name)
    (path / "manifest.json").write_text(json.dumps(manifest))
    resign_manifest(path)


# -- out-of-distribution warnings ------------------------------------------------------------------

def test_influence_warns_about_inputs_unlike_the_training_data(digits):
    _, url = digits
    queries = httpx.get(url + "/queries", params={"limit": 20}).json()["items"]
    for q in queries:
        answer = httpx.post(url + "/influence", json={"example": q["example"], "k": 3}).json()
        assert answer["warnings"] == [], (q["id"], answer["warnings"])
    pixels = np.asarray(queries[0]["example"]["pixels"], dtype=float)
    scaled = httpx.post(url + "/influence", json={"example": {"pixels": (pixels / 16).tolist()}, "k": 3}).json()
    assert len(scaled["proponents"]) == 3  # answered all the same
    assert any("times less than a typical training example" in w and "another scale" in w for w in scaled["warnings"])
    white = np.where(pixels < 1, 16.0, pixels)  # the paper of a scan left white: digits are light on dark
    answer = httpx.post(url + "/influence", json={"example": {"pixels": white.tolist()}, "k": 3}).json()
    assert any("far from anything training examples have at the same position" in w for w in answer["warnings"]), \
        answer["warnings"]
    assert httpx.post(url + "/influence", json={"train_id": "train-0", "k": 3}).json()["warnings"] == []


def _fashion_available() -> bool:
    from indexer.demo.fashion_mnist import data_available

    return data_available()


@pytest.mark.skipif(not _fashion_available(), reason="Fashion-MNIST data not installed (dataset-fashion-mnist)")
def test_fashion_mnist_scaled_and_white_background_images():
    """Ranges recorded from the Fashion-MNIST training set (uint8 0..255 stored, floats 0..1 encoded: mapped
    by x / 255); real test images pass, the same images scaled to 0..1 or on a white background do not."""
    from indexer.demo.fashion_mnist import FashionMNISTExample, FashionMNISTTask, load_split
    from indexer.build.input_ranges import InputRanges, dumps, record_input_ranges

    task = FashionMNISTTask(limit=10000)
    doc = json.loads(dumps(record_input_ranges(task, task.training_set())))
    assert doc["source"].startswith("training inputs as stored, mapped to the encoded form (x 0.00392157 + 0")
    ranges = InputRanges.from_json(doc)
    images, _ = load_split("test")

    def warnings(image):
        return ranges.check(task.encode([FashionMNISTExample(image=np.asarray(image, dtype=float).tolist())]))

    assert sum(bool(warnings(images[i])) for i in range(0, 2000, 4)) == 0
    for i in range(5):
        scaled = warnings(images[i] / 255.0)
        assert len(scaled) == 1 and re.search(r"about 2[45]\d times less", scaled[0]), scaled  # 255 / max pixel
        white = warnings(np.where(images[i] < 13, 255, images[i]))
        assert white and "mostly above it" in white[0] and "a background or border" in white[0], white


def test_sharded_build_gives_the_same_label_review_and_ranges(tmp_path):
    """Shards carry their rows' label-review numbers; the merged index has the same bytes as one build."""
    from indexer.config import parse_config
    from indexer.build.pipeline import build_index, build_shard, merge_shards
    from tests.service_support import ServiceMLPTask, train_checkpoints

    ckpts = train_checkpoints(ServiceMLPTask(), tmp_path / "run")
    data = {"task": "tests.service_support:ServiceMLPTask", "checkpoints": [{"path": str(p)} for p in ckpts],
            "projection": {"kind": "sketch", "dim": 16, "seed": 0}, "index": {"batch_size": 7}}
    config = parse_config(data, tmp_path)
    whole = build_index(config, tmp_path / "whole").path
    for shard in range(3):
        build_shard(config, tmp_path / "merged", shard, 3)
    merged = merge_shards(config, tmp_path / "merged", 3).path
    for name in ("label_review.npy", "input_ranges.json", "self_influence.npy"):
        assert (whole / name).read_bytes() == (merged / name).read_bytes(), name
    assert IndexDirectory.open(merged).label_review is not None
