"""The smaller serving points of issue 22, item 4: symlinks in an index directory are refused as symlinks
(not reported "missing"), HEAD is answered on every GET route, and the OpenAPI document states what the
API enforces (exactly one of `example` / `train_id`; the 401 of every keyed route)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import httpx
import pytest
from fastapi.testclient import TestClient

from indexer.store.directory import IndexDirectory, IndexDirectoryError
from service.app import create_app
from service.loading import ServiceStartupError, load_engine
from service.settings import Settings
from tests.service_support import REPO, copy_index, mlp_index, start_server


def _settings(path, **kw) -> Settings:
    return Settings(index_dir=path, access_log=False, **kw)


# -- symlinks --------------------------------------------------------------------------------------

def _link_to_copy(index, name: str, outside) -> None:
    """Replace `name` (a file or a folder of the index) with a symlink to an identical copy elsewhere."""
    target = outside / name.replace("/", "_")
    source = index / name
    (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    shutil.rmtree(source) if source.is_dir() else source.unlink()
    source.symlink_to(target)


def _members():
    index = IndexDirectory.open(mlp_index(), verify=False)
    checkpoint = index.manifest["checkpoints"][0]["file"]
    return ["manifest.json", "manifest.sha256", "index.faiss", "self_influence.npy", "examples.jsonl", checkpoint,
            checkpoint.split("/")[0]]


@pytest.mark.parametrize("name", _members())
def test_a_symlinked_file_is_refused_as_a_symlink(tmp_path, name):
    """Even a link to an identical copy (the digests match): the directory must not read outside itself,
    and the message says what is wrong instead of "missing"."""
    index = copy_index(mlp_index(), "symlinked")
    _link_to_copy(index, name, tmp_path)
    with pytest.raises(IndexDirectoryError, match="is a symlink") as err:
        IndexDirectory.open(index)
    message = str(err.value)
    assert "missing" not in message and "\n" not in message and name.split("/")[0] in message
    assert "replace the link by a copy" in message
    with pytest.raises(ServiceStartupError, match="is a symlink"):
        load_engine(_settings(index))


def test_a_link_inside_the_directory_is_refused_too(tmp_path):
    index = copy_index(mlp_index(), "symlinked-inside")
    (index / "self_influence.npy").rename(index / "si-copy.npy")
    (index / "self_influence.npy").symlink_to("si-copy.npy")
    with pytest.raises(IndexDirectoryError, match="self_influence.npy is a symlink"):
        IndexDirectory.open(index)


def test_the_served_command_says_symlink_in_one_line(tmp_path):
    index = copy_index(mlp_index(), "symlinked-serve")
    _link_to_copy(index, "index.faiss", tmp_path)
    proc = subprocess.run([sys.executable, "-m", "indexer.cli", "serve", str(index), "--port", "0"],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "index.faiss is a symlink" in proc.stderr


def test_an_index_directory_reached_through_a_symlink_still_serves(tmp_path):
    """Only links inside the directory are refused: the directory itself may be a link (a deployment's
    `current -> index-v3`)."""
    link = tmp_path / "current"
    link.symlink_to(mlp_index(), target_is_directory=True)
    assert load_engine(_settings(link)).count == 40


# -- HEAD ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_server():
    server = start_server(mlp_index(), env={"TRACIN_API_KEY": "edge-key"})
    yield server
    server.stop()


GETS = ["/", "/healthz", "/readyz", "/index", "/metrics", "/queries", "/self-influence/top",
        "/self-influence/histogram", "/label-review", "/label-review/histogram", "/label-review/export",
        "/examples/ex1", "/examples/no-such-id", "/openapi.json", "/docs", "/redoc", "/dashboard/app.js"]


@pytest.mark.parametrize("path", GETS)
def test_head_answers_like_get_without_a_body(keyed_server, path):
    headers = {"Authorization": "Bearer edge-key"}
    get = httpx.get(keyed_server.base_url + path, headers=headers)
    head = httpx.head(keyed_server.base_url + path, headers=headers)
    assert head.status_code == get.status_code != 405, (path, head.status_code, get.status_code)
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    if path != "/metrics":  # the counts move between the two requests
        assert head.headers.get("content-length") == get.headers.get("content-length")
    assert httpx.head(keyed_server.base_url + "/index").status_code == 401  # HEAD needs the key like GET
    text = httpx.get(keyed_server.base_url + "/metrics", headers=headers).text
    assert 'method="HEAD"' in text


def test_head_of_a_post_only_route_is_405(keyed_server):
    r = httpx.head(keyed_server.base_url + "/influence", headers={"Authorization": "Bearer edge-key"})
    assert r.status_code == 405


# -- the OpenAPI document --------------------------------------------------------------------------

def _spec(**kw) -> dict:
    with TestClient(create_app(_settings(mlp_index(), **kw))) as client:
        headers = {"Authorization": f"Bearer {kw['api_key']}"} if "api_key" in kw else {}
        return client.get("/openapi.json", headers=headers).json()


def test_openapi_states_exactly_one_kind_of_question():
    spec = _spec()
    ref = spec["paths"]["/influence"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    assert "exactly one kind of question" in schema["description"]
    assert [s["title"] for s in schema["oneOf"]] == ["by example", "by train_id", "by members"]
    # the oneOf alone (fields' own schemas aside) accepts exactly the bodies the service accepts
    jsonschema = pytest.importorskip("jsonschema")
    shape = {"oneOf": schema["oneOf"]}
    ok = [{"example": {}}, {"train_id": "a"}, {"examples": [{}]}, {"train_ids": ["a"]},
          {"examples": [{}], "train_ids": ["a"]}, {"example": {}, "train_id": None}]
    bad = [{}, {"example": {}, "train_id": "a"}, {"example": {}, "examples": [{}]},
           {"train_id": "a", "train_ids": ["b"]}, {"example": None, "train_id": None}]
    for body in ok:
        jsonschema.validate(body, shape)
    for body in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(body, shape)
    post = spec["paths"]["/influence"]["post"]
    assert "exactly one of" in post["description"]


def test_openapi_documents_the_401_of_every_keyed_route():
    spec = _spec(api_key="edge-key")
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            open_route = path in ("/healthz", "/readyz")
            assert ("401" in op["responses"]) != open_route, (method, path)
            assert (op.get("security") == []) == open_route, (method, path)
    assert spec["security"] == [{"bearer": []}]
    assert "TRACIN_API_KEY" in spec["paths"]["/"]["get"]["responses"]["401"]["description"]
    without_key = _spec()
    assert "security" not in without_key and "401" not in without_key["paths"]["/"]["get"]["responses"]
    assert "401" not in without_key["paths"]["/influence"]["post"]["responses"]


def test_openapi_does_not_claim_train_id_queries_do_no_gradient_work():
    """Re-ranking recomputes a train_id query's gradients: the document says so (issue 22, item 9)."""
    import json

    spec = _spec()
    text = json.dumps(spec)
    assert "no gradient work" not in text
    request = next(v for k, v in spec["components"]["schemas"].items() if k.startswith("InfluenceRequest"))
    assert "recomputed" in request["properties"]["train_id"]["description"]


def test_the_api_docs_files_load_nothing_from_a_cdn():
    """/redoc is fully offline: ReDoc's footer logo no longer comes from cdn.redoc.ly (issue 22, item 9)."""
    from service.docs import CDN_HOSTS, vendor_files

    with TestClient(create_app(_settings(mlp_index()))) as client:
        for name in ("redoc.standalone.js", "swagger-ui-bundle.js", "swagger-ui.css"):
            body = client.get(f"/dashboard/vendor/{name}").content
            assert body == vendor_files()[name] and len(body) > 10_000
            assert not [host for host in CDN_HOSTS if host in body], name
        assert b"https://" not in client.get("/redoc").content
