"""The service in-process: start-up refusals, settings, API key, CORS, mmap, approximate indexes, body
limits (TestClient; the HTTP behaviour over a real server is in test_service_http.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from indexer.checkpoints import sha256_file
from service.app import create_app
from service.client import InfluenceAPIError, InfluenceClient
from service.loading import ServiceStartupError, load_engine
from service.server import serve
from service.settings import Settings
from tests.service_support import REPO, build_mlp_index, copy_index, mlp_index, resign_manifest


def _settings(path, **kw) -> Settings:
    return Settings(index_dir=path, access_log=False, **kw)


def _edit_manifest(path, fn, resign: bool = True) -> None:
    """Edit manifest.json; with `resign`, also update manifest.sha256 (an edit made consistently, so the
    checks behind the digest are exercised)."""
    manifest = json.loads((path / "manifest.json").read_text())
    fn(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    if resign:
        resign_manifest(path)


# -- start-up refusals ---------------------------------------------------------------------------

def _missing_file(p):
    (p / "self_influence.npy").unlink()


def _corrupt_examples(p):
    with open(p / "examples.jsonl", "a") as handle:
        handle.write("\n")


def _corrupt_checkpoint(p):
    ckpt = sorted((p / "checkpoints").iterdir())[1]
    data = bytearray(ckpt.read_bytes())
    data[-20] ^= 0xFF
    ckpt.write_bytes(bytes(data))


def _wrong_projection(p):
    _edit_manifest(p, lambda m: m["projection"].update(seed=1))


def _bad_task_ref(p):
    _edit_manifest(p, lambda m: m["task"].update(ref="tests.no_such_module:Task"))


def _bad_task_args(p):
    _edit_manifest(p, lambda m: m["task"].update(args={"bogus": 1}))


def _checkpoint_of_another_model(p):
    entry = json.loads((p / "manifest.json").read_text())["checkpoints"][0]
    torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict(), "lr": entry["lr"]}, p / entry["file"])
    digest = sha256_file(p / entry["file"])
    _edit_manifest(p, lambda m: m["checkpoints"][0].update(sha256=digest))


def _fewer_rows(p):
    lines = (p / "examples.jsonl").read_text().splitlines(keepends=True)
    (p / "examples.jsonl").write_text("".join(lines[:-1]))
    digest = sha256_file(p / "examples.jsonl")
    _edit_manifest(p, lambda m: m["files"].update({"examples.jsonl": digest}))


def _broken_manifest(p):
    (p / "manifest.json").write_text("{not json")
    resign_manifest(p)


REFUSALS = [
    ("missing file", _missing_file, "incomplete: self_influence.npy is missing"),
    ("examples checksum", _corrupt_examples, "examples.jsonl does not match the sha256"),
    ("checkpoint checksum", _corrupt_checkpoint, "01-ckpt-1.pt does not match the sha256"),
    ("projection fingerprint", _wrong_projection, "does not match the manifest"),
    ("task not importable", _bad_task_ref, "cannot import module 'tests.no_such_module'"),
    ("task arguments", _bad_task_args, "cannot rebuild the task/model: task: .*TypeError"),
    ("checkpoint of another model", _checkpoint_of_another_model, "does not match the model"),
    ("row counts", _fewer_rows, "row counts disagree"),
    ("manifest not json", _broken_manifest, "is not valid JSON"),
]


@pytest.mark.parametrize("name,damage,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refuses_to_start_on_a_bad_index(name, damage, message):
    path = copy_index(mlp_index(), name.replace(" ", "-"))
    damage(path)
    pattern = message.replace("(", r"\(").replace(".", r"\.").replace(r"\.*", ".*")
    with pytest.raises(ServiceStartupError, match=pattern):
        load_engine(_settings(path))


def test_serve_prints_one_line_and_exits_2(capsys, tmp_path):
    assert serve(tmp_path / "nowhere", port=0) == 2
    err = capsys.readouterr().err
    assert err.startswith("tracin serve: error: ") and "no such index directory" in err
    assert "Traceback" not in err
    path = copy_index(mlp_index(), "serve-checksum")
    _corrupt_examples(path)
    assert serve(path, port=0) == 2
    assert "examples.jsonl does not match the sha256" in capsys.readouterr().err


def test_tracin_serve_command_refuses_with_exit_status_2():
    path = copy_index(mlp_index(), "cli-fingerprint")
    _wrong_projection(path)
    proc = subprocess.run([sys.executable, "-m", "indexer.cli", "serve", str(path), "--port", "0"],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert "tracin serve: error:" in proc.stderr and "projection" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_faiss_parameters_are_refused():
    with pytest.raises(ServiceStartupError, match=r"nprobe.*do not apply"):
        load_engine(_settings(mlp_index(), faiss_params={"nprobe": 4}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_unavailable_device_is_refused():
    with pytest.raises(ServiceStartupError, match="CUDA is not available"):
        load_engine(_settings(mlp_index(), device="cuda"))
    with pytest.raises(ServiceStartupError, match="not a torch device"):
        load_engine(_settings(mlp_index(), device="gpu-please"))


def test_create_app_refuses_a_missing_index(tmp_path):
    with pytest.raises(ServiceStartupError, match="no such index directory"):
        create_app(_settings(tmp_path / "nowhere"))
    with pytest.raises(ServiceStartupError, match="TRACIN_INDEX_DIR"):
        create_app(Settings(index_dir=None))


# -- settings ------------------------------------------------------------------------------------

def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("TRACIN_INDEX_DIR", "/some/index")
    monkeypatch.setenv("TRACIN_CORS_ORIGINS", "http://a.example, http://b.example")
    monkeypatch.setenv("TRACIN_FAISS_PARAMS", '{"nprobe": 8}')
    monkeypatch.setenv("TRACIN_API_KEY", "")
    monkeypatch.setenv("TRACIN_MAX_K", "25")
    monkeypatch.setenv("TRACIN_MMAP", "true")
    s = Settings()
    assert str(s.index_dir) == "/some/index" and s.cors_origins == ["http://a.example", "http://b.example"]
    assert s.faiss_params == {"nprobe": 8} and s.api_key is None and s.max_k == 25 and s.default_k == 10
    assert s.mmap is True and s.effective_torch_threads >= 1 and s.effective_compute_threads >= 1
    monkeypatch.setenv("TRACIN_CORS_ORIGINS", '["http://c.example"]')
    monkeypatch.setenv("TRACIN_API_KEY", "s3cret")
    s = Settings()
    assert s.cors_origins == ["http://c.example"] and s.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)


# -- in-process app ------------------------------------------------------------------------------

def _first_query(client) -> dict:
    return client.get("/queries").json()["items"][0]["example"]


def test_asgi_factory_reads_the_environment(monkeypatch):
    from service.app import app_from_env

    monkeypatch.setenv("TRACIN_INDEX_DIR", str(mlp_index()))
    monkeypatch.setenv("TRACIN_MAX_K", "7")
    with TestClient(app_from_env()) as client:  # the lifespan loads the index
        assert client.get("/readyz").json()["status"] == "ready"
        assert client.post("/influence", json={"train_id": "ex1", "k": 8}).status_code == 422
        assert len(client.post("/influence", json={"train_id": "ex1", "k": 7}).json()["proponents"]) <= 7
        assert client.get("/index").json()["max_k"] == 7


def test_not_ready_without_lifespan():
    client = TestClient(create_app(_settings(mlp_index())))  # no `with`: the lifespan has not run
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    assert client.get("/healthz").status_code == 200
    r = client.get("/self-influence/top")
    assert r.status_code == 503 and r.json()["error"] == "not_ready"


def test_api_key():
    app = create_app(_settings(mlp_index(), api_key="s3cret"))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        for path in ("/index", "/self-influence/top", "/queries", "/metrics", "/openapi.json", "/"):
            r = client.get(path)
            assert r.status_code == 401, path
            assert r.json()["detail"][0]["field"] == "authorization" and r.headers["www-authenticate"] == "Bearer"
        for path in ("/docs", "/redoc"):  # the docs pages hold no data (like the dashboard's): the spec needs the key
            r = client.get(path)
            assert r.status_code == 200 and "/openapi.json" in r.text and "content-security-policy" in r.headers
        assert client.get("/index", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/index", headers={"Authorization": "s3cret"}).status_code == 401
        r = client.post("/influence", json={"train_id": "ex1"})
        assert r.status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert client.post("/influence", json={"train_id": "ex1"}, headers=auth).status_code == 200
        spec = client.get("/openapi.json", headers=auth).json()
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        with InfluenceClient(client=client) as api:
            with pytest.raises(InfluenceAPIError) as err:
                api.index_info()
            assert err.value.status == 401 and err.value.fields == ["authorization"]
        client.headers.update(auth)
        with InfluenceClient(client=client) as api:
            assert api.index_info().count == 40


def test_cors_closed_by_default_and_open_for_configured_origins():
    preflight = {"Origin": "http://dash.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with TestClient(create_app(_settings(mlp_index()))) as client:
        r = client.get("/index", headers={"Origin": "http://dash.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in client.options("/influence", headers=preflight).headers
    app = create_app(_settings(mlp_index(), cors_origins=["http://dash.example"], api_key="k"))
    with TestClient(app) as client:
        r = client.options("/influence", headers=preflight)  # preflight carries no credentials
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://dash.example"
        r = client.get("/index", headers={"Origin": "http://dash.example", "Authorization": "Bearer k"})
        assert r.headers["access-control-allow-origin"] == "http://dash.example"
        r = client.get("/index", headers={"Origin": "http://evil.example", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in r.headers


def _answers(settings: Settings, k: int = 5) -> list[dict]:
    with TestClient(create_app(settings)) as client:
        queries = client.get("/queries").json()["items"]
        out = []
        for body in [{"example": q["example"], "k": k} for q in queries] + [{"train_id": "ex3", "k": k}]:
            r = client.post("/influence", json=body)
            assert r.status_code == 200, r.text
            data = r.json()
            out.append({"proponents": data["proponents"], "opponents": data["opponents"],
                        "approximate": data["index"]["approximate"]})
        return out


def test_mmap_serves_the_same_answers():
    plain = _answers(_settings(mlp_index()))
    mapped = _answers(_settings(mlp_index(), mmap=True))
    assert plain == mapped


@pytest.mark.parametrize("blocks", [1, 3])
def test_one_pass_flat_search_equals_two_faiss_searches(monkeypatch, blocks):
    if blocks > 1:  # scan even this tiny index in 3 parallel row blocks; FAISS: q and -q at once
        monkeypatch.setattr("service.first_stage.PARALLEL_SCAN_FLOATS", 1)
    one_pass = _answers(_settings(mlp_index(), search_threads=blocks), k=40)  # every training example
    faiss_only = _answers(_settings(mlp_index(), search="faiss", search_threads=blocks), k=40)
    assert len(one_pass) == 6
    for a, b in zip(one_pass, faiss_only):
        for name in ("proponents", "opponents"):
            assert [h["id"] for h in a[name]] == [h["id"] for h in b[name]]
            assert [h["score"] for h in a[name]] == pytest.approx([h["score"] for h in b[name]], rel=1e-6)


def test_approximate_ivf_index_with_search_parameters():
    path = build_mlp_index("ivf", factory="IVF4,Flat", search_params={"nprobe": 4})
    exact = _answers(_settings(mlp_index()))
    ivf = _answers(_settings(path))  # nprobe = nlist: every list is searched
    assert all(a["approximate"] for a in ivf)
    for e, a in zip(exact, ivf):
        assert [h["id"] for h in e["proponents"]] == [h["id"] for h in a["proponents"]]
        assert [h["score"] for h in e["proponents"]] == pytest.approx([h["score"] for h in a["proponents"]], rel=1e-5)
    with TestClient(create_app(_settings(path, faiss_params={"nprobe": 1}))) as client:
        info = client.get("/index").json()
        assert info["faiss"]["search_params_in_use"] == {"nprobe": 1} and info["approximate"] is True
        assert client.post("/influence", json={"train_id": "ex0", "k": 3}).status_code == 200


def test_streamed_body_over_the_limit_is_413():
    with TestClient(create_app(_settings(mlp_index(), max_body_bytes=4096))) as client:
        def chunks():
            yield b'{"example": {"x": [0, 0, 0, 0, 0, 0]}, "pad": "'
            for _ in range(20):
                yield b"x" * 1024
            yield b'"}'

        r = client.post("/influence", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["detail"][0]["field"] == "body"
        r = client.post("/influence", content=b"x" * 5000, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        ok = client.post("/influence", json={"example": {"x": [0.5] * 6}})
        assert ok.status_code == 200


def test_metrics_count_by_route_template():
    with TestClient(create_app(_settings(mlp_index()))) as client:
        client.get("/examples/ex1")
        client.get("/examples/ex2")
        client.get("/examples/nope")
        text = client.get("/metrics").text
    assert 'route="/examples/{id:path}",status="200"} 2.0' in text
    assert 'route="/examples/{id:path}",status="404"} 1.0' in text


def test_engine_has_no_state_leaking_between_queries():
    """The same query before and after other queries (other labels, filters) gives the same answer."""
    engine = load_engine(_settings(mlp_index()))
    from types import SimpleNamespace

    from tests.tasks import VectorExample

    def ask(x, label=None, filter_label=None):
        req = SimpleNamespace(example=VectorExample(x=x), train_id=None, label=label, filter_label=filter_label,
                              k=5, exclude_self=False, include_embedding=True)
        out = engine.influence(req)
        out.pop("took_ms")
        return out

    x = [0.3, -1.0, 0.2, 0.0, 1.5, -0.7]
    first = ask(x)
    for i in range(5):
        ask(list(np.roll(x, i + 1)), label=i % 3, filter_label=i % 2)
    assert ask(x) == first


def test_faiss_gpu_true_without_gpu_faiss_is_refused():
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("this FAISS has GPU support")
    with pytest.raises(ServiceStartupError, match="no GPU support"):
        load_engine(_settings(mlp_index(), faiss_gpu="true"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_search_answers_like_cpu_search():
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("needs faiss-gpu")
    cpu = load_engine(_settings(mlp_index(), device="cpu"))
    gpu = load_engine(_settings(mlp_index(), device="cuda"))
    assert gpu.gpu_index is not None
    for row in range(0, cpu.count, 7):
        vector = cpu.index_dir.index.reconstruct(row)
        (a_rows, a_scores), (b_rows, b_scores) = cpu.search(vector, 5, 5)
        (c_rows, c_scores), (d_rows, d_scores) = gpu.search(vector, 5, 5)
        np.testing.assert_allclose(a_scores, c_scores, rtol=1e-4)
        np.testing.assert_allclose(b_scores, d_scores, rtol=1e-4)
