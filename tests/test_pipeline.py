"""Index directories: contents, determinism, search, bad configs, resume."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.checkpoints import save_checkpoint
from indexer.config import ConfigError, load_config
from indexer.build.pipeline import build_index
from indexer.store.search import top_k
from indexer.store.directory import IndexDirectory, IndexDirectoryError
from tests.conftest import make_checkpoints, write_config
from tests.oracle import tracin_matrix
from tests.tasks import MLPTask

REF = "tests.tasks:MLPTask"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(MLPTask(), tmp_path_factory.mktemp("ckpts"))


def _build(tmp: Path, ckpts, name="index", **kw) -> IndexDirectory:
    config = load_config(write_config(tmp, REF, ckpts, **kw))
    build_index(config, tmp / name)
    return IndexDirectory.open(tmp / name)


def test_index_directory_contents_match_oracle(tmp_path, ckpts):
    index = _build(tmp_path, ckpts, kind="exact")
    m = index.manifest
    assert m["count"] == 40 and index.index.ntotal == 40 and m["faiss"]["approximate"] is False
    assert [c["lr"] for c in m["checkpoints"]] == [c.lr for c in ckpts]
    assert {p.name for p in (tmp_path / "index").iterdir()} >= {
        "manifest.json", "index.faiss", "self_influence.npy", "examples.jsonl", "queries.jsonl", "checkpoints"}
    assert index.examples[3] == {"id": "ex3", "label": int(MLPTask().training_set().labels[3]),
                                 "display": {"row": 3, "flipped": False}}
    task = MLPTask()
    x, y = task.training_set().batch(0, 40)
    oracle = tracin_matrix(task, ckpts, x, y, x, y).numpy()
    vectors = index.index.reconstruct_n(0, 40)
    np.testing.assert_allclose(vectors @ vectors.T, oracle, rtol=0, atol=1e-5 * np.abs(oracle).max())
    np.testing.assert_allclose(index.self_influence, np.diag(oracle), rtol=1e-10)
    assert not list(tmp_path.glob(".index.*")), "no staging or partial directory may remain"


def test_same_config_gives_byte_identical_files(tmp_path, ckpts):
    _build(tmp_path, ckpts, "a", kind="sketch", dim=16)
    _build(tmp_path, ckpts, "b", kind="sketch", dim=16)
    for name in ("index.faiss", "self_influence.npy", "examples.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    fa = json.loads((tmp_path / "a" / "manifest.json").read_text())["projection"]["fingerprint"]
    fb = json.loads((tmp_path / "b" / "manifest.json").read_text())["projection"]["fingerprint"]
    assert fa == fb


def test_flat_top_k_equals_bruteforce_argsort(tmp_path, ckpts):
    index = _build(tmp_path, ckpts, kind="sketch", dim=16)
    vectors = index.index.reconstruct_n(0, index.count)
    for row in range(0, 40, 5):
        scores = vectors @ vectors[row]
        for sign in (1, -1):
            hits = top_k(index.index, vectors[row], 5, sign)
            order = np.argsort(-sign * scores, kind="stable")[:5]
            expected = order[sign * scores[order] > 0]
            assert hits.rows.tolist() == expected.tolist()
            np.testing.assert_allclose(hits.scores, scores[expected], rtol=1e-5)
        labels = np.array([e["label"] for e in index.examples])
        subset = np.flatnonzero(labels == 1)
        hits = top_k(index.index, vectors[row], 4, 1, rows=subset)
        masked = np.where(labels == 1, scores, -np.inf)
        expected = np.argsort(-masked, kind="stable")[:4]
        assert hits.rows.tolist() == expected[masked[expected] > 0].tolist()


def test_approximate_index_records_measured_recall(tmp_path, ckpts):
    index = _build(tmp_path, ckpts, kind="sketch", dim=16, factory="IVF2,Flat",
                   extra="search_params = { nprobe = 2 }")
    faiss_info = index.manifest["faiss"]
    assert faiss_info["approximate"] is True
    assert faiss_info["recall_at_10"]["proponents"] == 1.0  # nprobe = nlist: exhaustive


@pytest.mark.parametrize("case, message", [
    ("missing", "checkpoint file not found"),
    ("layer", "'nope' matches no module"),
    ("lr", "lr must be a finite number > 0"),
    ("mismatch", "does not match the model"),
    ("factory", "index.factory"),
    ("kind", "projection.kind"),
])
def test_bad_config_names_the_problem_and_leaves_nothing(tmp_path, ckpts, case, message):
    kw = {}
    checkpoints = list(ckpts)
    if case == "missing":
        from indexer.sketch.embedding import Checkpoint
        checkpoints[1] = Checkpoint(tmp_path / "gone.pt", 0.1)
    elif case == "layer":
        kw["layers"] = ["0", "nope"]
    elif case == "lr":
        from indexer.sketch.embedding import Checkpoint
        checkpoints[0] = Checkpoint(checkpoints[0].path, 0.0)
    elif case == "mismatch":
        from indexer.sketch.embedding import Checkpoint
        other = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        checkpoints[2] = Checkpoint(save_checkpoint(tmp_path / "other.pt", other, lr=0.1), 0.1)
    elif case == "factory":
        kw["factory"] = "NotAFactory,xyz"
    elif case == "kind":
        kw["kind"] = "wavelet"
    config_path = write_config(tmp_path, REF, checkpoints, **kw)
    with pytest.raises(ConfigError, match=message):
        build_index(load_config(config_path), tmp_path / "index")
    assert not (tmp_path / "index").exists()
    assert not list(tmp_path.glob(".index*"))
    # the CLI says the same in one line, exit status 2, no traceback
    proc = subprocess.run([sys.executable, "-m", "indexer.cli", "index", str(config_path), "--out",
                           str(tmp_path / "index")], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2, proc.stderr
    assert message.split("'")[0] in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "index").exists()


def test_lr_is_read_from_checkpoint_files(tmp_path, ckpts):
    index = _build(tmp_path, ckpts, kind="exact", with_lr=False)
    assert [c["lr"] for c in index.manifest["checkpoints"]] == [c.lr for c in ckpts]


def test_existing_directory_is_not_replaced_without_force(tmp_path, ckpts):
    _build(tmp_path, ckpts, kind="sketch", dim=16)
    before = (tmp_path / "index" / "index.faiss").read_bytes()
    with pytest.raises(FileExistsError):
        build_index(load_config(tmp_path / "config.toml"), tmp_path / "index")
    assert (tmp_path / "index" / "index.faiss").read_bytes() == before
    build_index(load_config(tmp_path / "config.toml"), tmp_path / "index", overwrite=True)
    IndexDirectory.open(tmp_path / "index")


def test_interrupted_build_resumes_and_matches(tmp_path, ckpts, monkeypatch):
    import indexer.build.pipeline as pipeline

    config = load_config(write_config(tmp_path, REF, ckpts, kind="sketch", dim=16))
    build_index(config, tmp_path / "reference")
    calls = {"n": 0}
    real = pipeline.CheckpointEmbedder

    class Crashing(real):
        def __init__(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 4:  # prepare() builds one (self-check, query path), then checkpoints 0, 1, 2
                raise KeyboardInterrupt("simulated crash while embedding checkpoint 2")
            super().__init__(*a, **k)

    monkeypatch.setattr(pipeline, "CheckpointEmbedder", Crashing)
    with pytest.raises(KeyboardInterrupt):
        build_index(config, tmp_path / "index")
    assert not (tmp_path / "index").exists()
    states = sorted(p.name for p in next(tmp_path.glob(".index.partial-*")).iterdir())
    assert states == ["state-0001", "state-0002.tmp"], "checkpoints 0 and 1 committed as one state"
    assert json.loads(next(tmp_path.glob(".index.partial-*/state-0001/state.json")).read_text())["checkpoint"] == 1
    calls["n"] = 10  # no more crashes; count how many checkpoints are embedded again
    build_index(config, tmp_path / "index")
    assert calls["n"] == 12, "only the unfinished checkpoint is embedded again (+1 in prepare)"
    for name in ("index.faiss", "self_influence.npy"):
        assert (tmp_path / "index" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    assert not list(tmp_path.glob(".index*"))


def test_tampered_index_is_refused(tmp_path, ckpts):
    _build(tmp_path, ckpts, kind="sketch", dim=16)
    data = np.load(tmp_path / "index" / "self_influence.npy")
    data[0] += 1
    np.save(tmp_path / "index" / "self_influence.npy", data)
    with pytest.raises(IndexDirectoryError, match="self_influence.npy does not match the sha256"):
        IndexDirectory.open(tmp_path / "index")
    (tmp_path / "index" / "examples.jsonl").unlink()
    with pytest.raises(IndexDirectoryError, match="examples.jsonl is missing"):
        IndexDirectory.open(tmp_path / "index", verify=False)


def test_shards_merge_into_the_same_index(tmp_path, ckpts):
    reference = _build(tmp_path, ckpts, "reference", kind="sketch", dim=16)
    config = tmp_path / "config.toml"
    from tests.test_demo_cli import tracin

    # merging before every shard is done names the missing shard
    proc = tracin("index", str(config), "--out", str(tmp_path / "index"), "--merge", "3", check=False)
    assert proc.returncode == 2 and "shard 0/3 is missing" in proc.stderr
    for shard in (2, 0, 1):  # any order, as a job array would run them
        tracin("index", str(config), "--out", str(tmp_path / "index"), "--shard", f"{shard}/3", "--quiet")
    tracin("index", str(config), "--out", str(tmp_path / "index"), "--merge", "3")
    merged = IndexDirectory.open(tmp_path / "index")
    np.testing.assert_allclose(merged.index.reconstruct_n(0, 40), reference.index.reconstruct_n(0, 40),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(merged.self_influence, reference.self_influence, rtol=1e-12)
    assert merged.manifest["projection"] == reference.manifest["projection"]
    assert not (tmp_path / "index.shards").exists()
