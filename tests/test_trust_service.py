"""Issue 10, serving side: an index directory runs no foreign code, every figure in it is checked, and
the smaller HTTP points (echo, paths, bearer scheme, body timeout, disconnects, body encoding, strict
numbers, CORS preflight). Real `tracin serve` subprocesses where the network matters."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from indexer.checkpoints import sha256_file
from indexer.store.directory import IndexDirectory, IndexDirectoryError
from service.app import create_app
from service.loading import ServiceStartupError, load_engine
from service.settings import Settings
from tests.service_support import REPO, copy_index, mlp_index, resign_manifest, start_server


def _settings(path, **kw) -> Settings:
    return Settings(index_dir=path, access_log=False, **kw)


def _edit(path, fn, resign=True) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest = fn(manifest) or manifest
    (path / "manifest.json").write_text(json.dumps(manifest))
    if resign:
        resign_manifest(path)


def _tracin_serve(path, cwd=REPO, extra_path: str = "") -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": f"{REPO}{extra_path}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "indexer.cli", "serve", str(path), "--port", "0"],
                          capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


# -- 1. no foreign code: only a Task subclass is ever called ----------------------------------------

def _malicious_refs(marker):
    return [
        ("os:system", {"command": f"touch {marker}"}),
        ("subprocess:Popen", {"args": ["touch", str(marker)]}),
        ("pathlib:Path.write_text", {"self": str(marker), "data": "owned"}),
        ("builtins:open", {"file": str(marker), "mode": "w"}),
    ]


@pytest.mark.parametrize("resign", [True, False], ids=["manifest-digest-updated", "digest-not-updated"])
def test_a_manifest_naming_any_other_callable_is_refused_before_calling_it(tmp_path, resign):
    marker = tmp_path / "marker"
    for i, (ref, args) in enumerate(_malicious_refs(marker)):
        path = copy_index(mlp_index(), f"malicious-{resign}-{i}")
        _edit(path, lambda m: m["task"].update(ref=ref, args=args), resign=resign)
        expected = "not an indexer.Task subclass" if resign else "does not match manifest.sha256"
        with pytest.raises(ServiceStartupError, match=expected) as err:
            load_engine(_settings(path))
        if resign:
            assert "manifest task.ref" in str(err.value) and ref in str(err.value)
        with pytest.raises(ServiceStartupError, match=expected):
            create_app(_settings(path))  # the factory path (open_task) checks the same way
        assert not marker.exists(), ref
    proc = _tracin_serve(path)  # the command: one line, exit 2, and still no marker
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists()


def test_a_task_module_inside_the_index_directory_is_never_imported(tmp_path):
    marker = tmp_path / "marker"
    path = copy_index(mlp_index(), "module-inside")
    (path / "evil_task.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
        "from tests.service_support import ServiceMLPTask as EvilTask\n")
    _edit(path, lambda m: m["task"].update(ref="evil_task:EvilTask"))
    proc = _tracin_serve(path, cwd=path, extra_path=f":{path}")  # on the Python path, even: still refused
    assert proc.returncode == 2, proc.stderr
    assert "inside the index directory" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_a_missing_task_module_says_what_to_put_on_pythonpath():
    path = copy_index(mlp_index(), "missing-module")
    _edit(path, lambda m: m["task"].update(ref="mypkg.tasks:WineTask"))
    with pytest.raises(ServiceStartupError, match=r"no module named 'mypkg'.*must be on PYTHONPATH"):
        load_engine(_settings(path))


@pytest.mark.parametrize("content", ["[]", "null", '"index"', "3", "{}"])
def test_a_manifest_that_is_not_an_object_is_one_line(content):
    path = copy_index(mlp_index(), f"manifest-{len(content)}")
    (path / "manifest.json").write_text(content)
    resign_manifest(path)
    with pytest.raises(ServiceStartupError, match="manifest.json: "):
        load_engine(_settings(path))
    with pytest.raises(IndexDirectoryError):
        IndexDirectory.open(path)


def test_the_served_command_refuses_a_null_manifest_in_one_line():
    path = copy_index(mlp_index(), "manifest-null-cli")
    (path / "manifest.json").write_text("null")
    resign_manifest(path)
    proc = _tracin_serve(path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "expected a JSON object" in proc.stderr


# -- 2. every figure of the manifest is validated ---------------------------------------------------

def _lr(factor=None, value=None):
    def edit(m):
        c = m["checkpoints"][1]
        c["lr"] = value if value is not None else c["lr"] * factor
    return edit


def _swap_checkpoints(p):
    m = json.loads((p / "manifest.json").read_text())
    a, b = m["checkpoints"][0], m["checkpoints"][1]
    data_a, data_b = (p / a["file"]).read_bytes(), (p / b["file"]).read_bytes()
    (p / a["file"]).write_bytes(data_b)
    (p / b["file"]).write_bytes(data_a)
    a["sha256"], b["sha256"] = b["sha256"], a["sha256"]
    (p / "manifest.json").write_text(json.dumps(m))


def _reorder_faiss_rows(p):
    import faiss

    index = faiss.read_index(str(p / "index.faiss"))
    vectors = index.reconstruct_n(0, index.ntotal)
    flipped = faiss.IndexFlatIP(index.d)
    flipped.add(np.ascontiguousarray(vectors[::-1]))
    faiss.write_index(flipped, str(p / "index.faiss"))
    m = json.loads((p / "manifest.json").read_text())
    m["files"]["index.faiss"] = sha256_file(p / "index.faiss")
    (p / "manifest.json").write_text(json.dumps(m))


def _negative_self_influence(p):
    si = np.load(p / "self_influence.npy")
    si[3] = -0.1
    np.save(p / "self_influence.npy", si)
    m = json.loads((p / "manifest.json").read_text())
    m["files"]["self_influence.npy"] = sha256_file(p / "self_influence.npy")
    (p / "manifest.json").write_text(json.dumps(m))


def _in_manifest(fn):
    def damage(p):
        m = json.loads((p / "manifest.json").read_text())
        fn(m)
        (p / "manifest.json").write_text(json.dumps(m))
    return damage


TAMPERED = [
    ("lr x10", _in_manifest(_lr(factor=10)), "records lr"),
    ("lr 0", _in_manifest(_lr(value=0.0)), "checkpoints.1.lr: Value error, must be a finite number > 0"),
    ("lr -0.1", _in_manifest(_lr(value=-0.1)), "must be a finite number > 0"),
    ("lr 1e300", _in_manifest(_lr(value=1e300)), "records lr"),
    ("lr as a string", _in_manifest(_lr(value="0.3")), "checkpoints.1.lr"),
    ("lr as a boolean", _in_manifest(_lr(value=True)), "checkpoints.1.lr"),
    ("count + 1", _in_manifest(lambda m: m.update(count=m["count"] + 1)), "row counts disagree"),
    ("count - 1", _in_manifest(lambda m: m.update(count=m["count"] - 1)), "row counts disagree"),
    ("count as float", _in_manifest(lambda m: m.update(count=40.0)), "count: Input should be a valid integer"),
    ("count 0", _in_manifest(lambda m: m.update(count=0)), "count: Input should be greater than or equal to 1"),
    ("embedding_dim + 1", _in_manifest(lambda m: m.update(embedding_dim=m["embedding_dim"] + 1)), "index dim"),
    ("embedding_dim as string", _in_manifest(lambda m: m.update(embedding_dim="57")), "embedding_dim"),
    ("no checkpoints", _in_manifest(lambda m: m.update(checkpoints=[])), "checkpoints: List should have at least 1"),
    ("checkpoint outside the directory", _in_manifest(lambda m: m["checkpoints"][0].update(file="../x.pt")),
     "must be a relative path inside the index directory"),
    ("files map without the index", _in_manifest(lambda m: m["files"].pop("index.faiss")), "files: ['index.faiss']"),
    ("schema version", _in_manifest(lambda m: m.update(schema_version=2)), "schema_version"),
    ("task ref syntax", _in_manifest(lambda m: m["task"].update(ref="os.system('x')")), "task.ref"),
    ("swapped checkpoints (sha256 swapped too)", _swap_checkpoints, "records lr"),
    ("reordered FAISS rows (sha256 updated)", _reorder_faiss_rows, None),
    ("negative self-influence (sha256 updated)", _negative_self_influence, "self-influence is finite and >= 0"),
]


@pytest.mark.parametrize("name,damage,message", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_every_tampered_figure_is_refused(name, damage, message):
    """Each edit is tried as made (the manifest digest refuses it) and made consistently, with
    manifest.sha256 rewritten too (then the figure checks behind the digest refuse it)."""
    path = copy_index(mlp_index(), "tampered")
    damage(path)
    with pytest.raises(ServiceStartupError, match="manifest.json does not match manifest.sha256"):
        load_engine(_settings(path))
    if message is None:  # the digest is what catches this one: rows reordered consistently are data
        return
    resign_manifest(path)
    with pytest.raises(ServiceStartupError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_engine(_settings(path))


def test_the_untouched_index_still_serves():
    engine = load_engine(_settings(copy_index(mlp_index(), "untouched")))
    assert engine.count == 40


# -- 8. the smaller HTTP points ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    proc = start_server(mlp_index(), env={"TRACIN_BODY_TIMEOUT_S": "1"})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield client


def _raw(server, data: bytes, wait: float = 0.0, read: bool = True) -> bytes:
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        if wait:
            time.sleep(wait)
        if not read:
            return b""
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_unknown_ids_labels_and_paths_are_echoed_once_and_cut(http):
    long = "z" * 1_000_00
    for r in (http.post("/influence", json={"train_id": long}),
              http.post("/influence", json={"example": {"x": [0.0] * 6}, "label": long}),
              http.post("/influence", json={"train_id": "ex1", long: 1}),
              http.get("/examples/" + long[:5000]),
              http.get("/no/such/" + long[:5000])):
        assert 400 <= r.status_code < 500 and len(r.text) < 700, (r.status_code, len(r.text))
        runs = [run for run in r.text.split('"') if "zzzz" in run]
        assert len(runs) <= 1 and all(run.count("z") <= 101 for run in runs), r.text


def test_root_and_index_show_the_directory_name_only(http):
    path = str(mlp_index().resolve())
    for route in ("/", "/index"):
        r = http.get(route)
        assert r.status_code == 200 and path not in r.text and str(mlp_index().parent) not in r.text
    assert http.get("/").json()["index"] == mlp_index().name == http.get("/index").json()["path"]


def test_a_slow_body_gets_408_json(server):
    head = (b"POST /influence HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            b'{"train_id": ')
    answer = _raw(server, head)  # the socket's 10 s timeout only guards the test; the outcome is the 408
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 408 " in status_line, answer[:300]
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "body_timeout" and body["detail"][0]["field"] == "body"


def test_client_disconnects_are_not_counted_as_400(server, http):
    head = (b"POST /influence HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
            b'{"train_id": "ex')
    for _ in range(2):
        _raw(server, head, read=False)  # the client sends part of its body and goes away
    time.sleep(0.5)
    text = http.get("/metrics").text
    influence = [line for line in text.splitlines()
                 if line.startswith("tracin_http_requests_total") and 'route="/influence"' in line]
    assert not [line for line in influence if 'status="400"' in line], influence
    assert any('status="499"' in line and line.endswith(" 2.0") for line in influence), influence


@pytest.mark.parametrize("body,message", [
    (b'{"train_id": "\xff\xfe"}', "not valid UTF-8"),
    (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
])
def test_unreadable_bodies_are_422_naming_body(http, body, message):
    r = http.post("/influence", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "body", r.text
    assert message in r.json()["message"]


@pytest.mark.parametrize("x,field", [
    ([True, 0, 0, 0, 0, 0], "example.x.0"),
    ([0, 0, "0.5", 0, 0, 0], "example.x.2"),
    ([0, 0, 0, 0, 0, "1e3"], "example.x.5"),
])
def test_booleans_and_numeric_strings_are_not_numbers(http, x, field):
    r = http.post("/influence", json={"example": {"x": x}})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == field, r.text
    assert http.post("/influence", json={"example": {"x": [1, 0, 0, 0, 0, 2.5]}}).status_code == 200  # ints are numbers
    r = http.post("/influence", json={"train_id": "ex1", "exclude_self": 1})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "exclude_self"


def test_bearer_scheme_is_case_insensitive():
    with TestClient(create_app(_settings(mlp_index(), api_key="s3cret"))) as client:
        for header in ("Bearer s3cret", "bearer s3cret", "BEARER s3cret", "  bearer   s3cret "):
            assert client.get("/index", headers={"Authorization": header}).status_code == 200, header
        for header in ("bearer S3CRET", "Basic s3cret", "s3cret", "bearer"):
            assert client.get("/index", headers={"Authorization": header}).status_code == 401, header


def test_rejected_cors_preflight_is_json():
    app = create_app(_settings(mlp_index(), cors_origins=["http://dash.example"]))
    with TestClient(app) as client:
        r = client.options("/influence", headers={"Origin": "http://evil.example",
                                                  "Access-Control-Request-Method": "POST"})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        assert r.json()["error"] == "cors_rejected" and r.json()["detail"][0]["field"] == "origin"
        r = client.options("/influence", headers={"Origin": "http://dash.example",
                                                  "Access-Control-Request-Method": "DELETE"})
        assert r.status_code == 400 and r.json()["detail"][0]["field"] == "access-control-request-method"
        ok = client.options("/influence", headers={"Origin": "http://dash.example",
                                                   "Access-Control-Request-Method": "POST"})
        assert ok.status_code == 200
