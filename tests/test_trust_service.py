"""Issue 10, serving side: an index directory runs no foreign code, every figure in it is checked, and
the smaller HTTP points (echo, paths, bearer scheme, body timeout, disconnects, body encoding, strict
numbers, CORS preflight). Real `tracin serve` subprocesses where the network matters."""
from __future__ import annotations

import functools
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
from tests.service_support import (
    REPO, ServiceMLPTask, build_mlp_index, copy_index, mlp_index, resign_manifest, start_server,
)


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
    ("reordered FAISS rows (sha256 updated)", _reorder_faiss_rows, r"row 0 \(id 'ex0'\) of index.faiss"),
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
    resign_manifest(path)
    pattern = message if message.startswith("row ") else message.replace("(", r"\(").replace("[", r"\[")
    with pytest.raises(ServiceStartupError, match=pattern):
        load_engine(_settings(path))


def test_the_untouched_index_still_serves():
    engine = load_engine(_settings(copy_index(mlp_index(), "untouched")))
    assert engine.count == 40


# -- 2b. consistent edits: a file changed and both digests rewritten (issue 22) -----------------------------
# Each edit below rewrites the file's sha256 in the manifest and manifest.sha256, so the digests pass; the
# load-time consistency check (indexer.store.consistency, TRACIN_VERIFY_ROWS) must refuse it in one line
# naming the row and the file. docs/service.md "Trust model" lists these cases.

def _rehash(p, name: str) -> None:
    m = json.loads((p / "manifest.json").read_text())
    m["files"][name] = sha256_file(p / name)
    (p / "manifest.json").write_text(json.dumps(m))
    resign_manifest(p)


def _reversed_faiss_rows(p, name: str = "index.faiss"):
    m = json.loads((p / "manifest.json").read_text())
    if not m["faiss"]["approximate"]:
        _reorder_faiss_rows(p)
        resign_manifest(p)
        return
    import faiss

    from indexer.store.faiss_build import read_index

    index = read_index(p / name)  # IVF lists on disk beside it: re-quantise the rows reversed
    ivf = faiss.extract_index_ivf(index)
    ivf.make_direct_map()
    vectors = np.ascontiguousarray(index.reconstruct_n(0, index.ntotal)[::-1])
    fresh = faiss.index_factory(index.d, m["faiss"]["factory"], faiss.METRIC_INNER_PRODUCT)
    fresh.train(vectors)
    fresh.add(vectors)
    faiss.write_index(fresh, str(p / name))
    _rehash(p, name)


def _reversed_normalized_rows(p):
    _reversed_faiss_rows(p, "index_normalized.faiss")


def _self_influence_times_2(p):
    np.save(p / "self_influence.npy", np.load(p / "self_influence.npy") * 2)
    _rehash(p, "self_influence.npy")


def _label_review_columns_reordered(p):
    table = np.load(p / "label_review.npy")
    table["loss"] = table["loss"][:, ::-1].copy()  # the checkpoints' losses in reverse order
    table["margin"] = table["margin"][:, ::-1].copy()
    np.save(p / "label_review.npy", table)
    _rehash(p, "label_review.npy")


def _label_review_rows_reordered(p):
    np.save(p / "label_review.npy", np.load(p / "label_review.npy")[::-1].copy())
    _rehash(p, "label_review.npy")


def _relabelled_example(p, row: int = 17):
    lines = (p / "examples.jsonl").read_text().splitlines()
    entry = json.loads(lines[row])
    entry["label"] = 1 - entry["label"]
    lines[row] = json.dumps(entry, separators=(",", ":"))
    (p / "examples.jsonl").write_text("\n".join(lines) + "\n")
    _rehash(p, "examples.jsonl")


def _duplicated_checkpoint(p):
    """checkpoints[1] replaced by a copy of checkpoints[0] (its sha256 rewritten too): the same lr, so the
    lr check cannot tell."""
    m = json.loads((p / "manifest.json").read_text())
    a, b = m["checkpoints"][0], m["checkpoints"][1]
    assert a["lr"] == b["lr"]
    (p / b["file"]).write_bytes((p / a["file"]).read_bytes())
    b["sha256"] = a["sha256"]
    (p / "manifest.json").write_text(json.dumps(m))
    resign_manifest(p)


@functools.lru_cache(maxsize=None)
def _equal_lr_index():
    return build_mlp_index("mlp-equal-lr", lrs=(0.3, 0.3, 0.3))


@functools.lru_cache(maxsize=None)
def _pq_index():
    """Sketch kind, IVF with a product-quantised (lossy) codec: the stored rows are not the vectors."""
    return build_mlp_index("mlp-ivfpq", kind="sketch", factory="IVF2,PQ4x4", batch_size=7)


CONSISTENT_EDITS = [
    ("reversed FAISS rows", mlp_index, _reversed_faiss_rows, r"row 0 \(id 'ex0'\) of index.faiss"),
    ("reversed FAISS rows, IVF-PQ sketch", _pq_index, _reversed_faiss_rows, r"row 0 \(id 'ex0'\) of index.faiss"),
    ("reversed normalised FAISS rows, IVF-PQ sketch", _pq_index, _reversed_normalized_rows,
     r"row 0 \(id 'ex0'\) of index_normalized.faiss"),
    ("self-influence x2", mlp_index, _self_influence_times_2, r"row 0 \(id 'ex0'\) of self_influence.npy"),
    ("self-influence x2, IVF-PQ sketch", _pq_index, _self_influence_times_2, r"of self_influence.npy holds"),
    ("label-review columns reordered", mlp_index, _label_review_columns_reordered,
     r"row 0 \(id 'ex0'\) of label_review.npy \(field loss, checkpoint 0\)"),
    ("label-review rows reordered", mlp_index, _label_review_rows_reordered, r"of label_review.npy \(field loss"),
    ("relabelled example", mlp_index, _relabelled_example, r"row 17 \(id 'ex17'\) of examples.jsonl has label"),
    ("duplicated checkpoint, equal learning rates", _equal_lr_index, _duplicated_checkpoint,
     r"of index.faiss \(the columns of checkpoint 1\)"),
]


@pytest.mark.parametrize("name,index,edit,message", CONSISTENT_EDITS, ids=[c[0] for c in CONSISTENT_EDITS])
def test_consistent_edits_are_refused_naming_the_row_and_the_file(name, index, edit, message):
    path = copy_index(index(), "consistent-edit")
    load_engine(_settings(path, warmup=False))  # untouched: served
    edit(path)
    IndexDirectory.open(path)  # both digests were rewritten: the integrity check passes
    with pytest.raises(ServiceStartupError, match=message) as err:
        load_engine(_settings(path, warmup=False))
    assert "\n" not in str(err.value)
    proc = _tracin_serve(path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_an_edit_of_one_unsampled_row_is_caught_only_where_a_second_file_holds_it():
    """The recomputation covers a sample of rows (TRACIN_VERIFY_ROWS, default 12, spread over the index):
    in an exact-kind index self-influence is also ||stored vector||^2 for every row, so editing one row is
    caught there; in a projected (sketch) index an edit of one row the sample misses is served. The keyed
    signature (next tests) covers every byte."""
    from indexer.store.consistency import sample_rows

    row = next(r for r in range(40) if r not in sample_rows(40))
    for index, caught in ((mlp_index, True), (_pq_index, False)):
        path = copy_index(index(), "one-row")
        si = np.load(path / "self_influence.npy")
        si[row] *= 2
        np.save(path / "self_influence.npy", si)
        _rehash(path, "self_influence.npy")
        if caught:
            with pytest.raises(ServiceStartupError, match=rf"row {row} \(id 'ex{row}'\) of self_influence.npy"):
                load_engine(_settings(path, warmup=False))
        else:
            assert load_engine(_settings(path, warmup=False)).index_dir.self_influence[row] == si[row]


def test_display_fields_are_not_recomputed():
    path = copy_index(mlp_index(), "display-edit")
    lines = (path / "examples.jsonl").read_text().splitlines()
    entry = json.loads(lines[0])
    entry["display"] = {"note": "edited"}
    lines[0] = json.dumps(entry, separators=(",", ":"))
    (path / "examples.jsonl").write_text("\n".join(lines) + "\n")
    _rehash(path, "examples.jsonl")
    assert load_engine(_settings(path, warmup=False)).index_dir.examples[0]["display"] == {"note": "edited"}


def test_without_a_training_set_the_check_is_skipped_with_a_warning(caplog):
    path = copy_index(mlp_index(), "no-training-set")
    _edit(path, lambda m: m["task"].update(ref="tests.test_rerank:NoTrainingSetTask"))
    _self_influence_times_2(path)
    with caplog.at_level("WARNING", logger="service"):
        engine = load_engine(_settings(path, warmup=False))
    assert engine.index_dir.self_influence[0] == np.load(path / "self_influence.npy")[0]  # served unchecked
    assert any("not checked against a recomputation: the task provides no training_set()" in r.getMessage()
               for r in caplog.records)


def test_an_index_faiss_cannot_reconstruct_is_not_compared_and_says_so():
    import faiss

    from indexer.store.consistency import _check_vectors

    vectors = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(16))  # ids mapped: FAISS does not reconstruct by row
    index.add_with_ids(vectors, np.arange(8, dtype=np.int64))
    how = _check_vectors(index, [0, 7], vectors[[7, 0]].astype(np.float64), "index.faiss", str, "dir", None)
    assert how.startswith("skipped: FAISS cannot reconstruct stored vectors of index.faiss")


def test_the_consistency_check_is_a_setting():
    path = copy_index(mlp_index(), "verify-off")
    _self_influence_times_2(path)
    with pytest.raises(ServiceStartupError, match="TRACIN_VERIFY_ROWS=0 skips this check"):
        load_engine(_settings(path, warmup=False))
    engine = load_engine(_settings(path, warmup=False, verify_rows=0))  # off: the edit is served
    assert engine.index_dir.self_influence[0] == np.load(path / "self_influence.npy")[0]


# -- 2c. the keyed signature: TRACIN_INDEX_KEY, manifest.hmac --------------------------------------------------

KEY = "shared-secret-for-tests"


def _signed_copy(name: str):
    from indexer.store.directory import sign_index

    path = copy_index(mlp_index(), name)
    sign_index(path, KEY)
    return path


def test_a_signed_index_is_served_with_its_key():
    engine = load_engine(_settings(_signed_copy("signed"), warmup=False, index_key=KEY))
    assert engine.count == 40


@pytest.mark.parametrize("case,message", [
    ("unsigned", "TRACIN_INDEX_KEY is set but the index is not signed"),
    ("another key", "manifest.hmac does not match manifest.json under TRACIN_INDEX_KEY"),
    ("manifest edited, manifest.sha256 rewritten", "manifest.hmac does not match manifest.json"),
    ("a file edited, both digests rewritten", "manifest.hmac does not match manifest.json"),
    ("malformed signature", "manifest.hmac is malformed"),
])
def test_with_a_key_an_unsigned_or_mismatched_index_is_refused_in_one_line(case, message):
    from indexer.store.directory import sign_index

    path = _signed_copy(f"signed-{case.split()[0]}")
    if case == "unsigned":
        (path / "manifest.hmac").unlink()
    elif case == "another key":
        sign_index(path, "another key")
    elif case.startswith("manifest edited"):
        _edit(path, lambda m: m["checkpoints"][1].update(lr=m["checkpoints"][1]["lr"]))  # same figures, new bytes
        (path / "manifest.json").write_text((path / "manifest.json").read_text() + " ")
        resign_manifest(path)
    elif case.startswith("a file edited"):
        _self_influence_times_2(path)
    else:
        (path / "manifest.hmac").write_text("not a signature\n")
        assert load_engine(_settings(path, warmup=False)).count == 40  # no key on this server: not checked
    for make in (load_engine, create_app):  # create_app reads the manifest's task first: checked before that too
        with pytest.raises(ServiceStartupError, match=message):
            make(_settings(path, warmup=False, index_key=KEY))
    env = {"TRACIN_INDEX_KEY": KEY}
    proc = subprocess.run([sys.executable, "-m", "indexer.cli", "serve", str(path), "--port", "0"],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", **env})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_tracin_index_signs_when_the_key_is_set_and_force_replaces_a_signed_index(tmp_path):
    from tests.service_support import train_checkpoints

    ckpts = train_checkpoints(ServiceMLPTask(), tmp_path / "run")
    config = tmp_path / "config.toml"
    config.write_text('task = "tests.service_support:ServiceMLPTask"\n'
                      + "".join(f'[[checkpoints]]\npath = "{c}"\n' for c in ckpts)
                      + '[projection]\nkind = "exact"\n')
    out = tmp_path / "index"
    base_env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    for extra in (["--quiet"], ["--quiet", "--force"]):
        proc = subprocess.run([sys.executable, "-m", "indexer.cli", "index", str(config), "--out", str(out), *extra],
                              capture_output=True, text=True, timeout=300, cwd=REPO,
                              env={**base_env, "TRACIN_INDEX_KEY": KEY})
        assert proc.returncode == 0, proc.stderr
        assert (out / "manifest.hmac").is_file()
        load_engine(_settings(out, warmup=False, index_key=KEY))
    with pytest.raises(ServiceStartupError, match="does not match"):
        load_engine(_settings(out, warmup=False, index_key=KEY + "x"))
    proc = subprocess.run([sys.executable, "-m", "indexer.cli", "index", str(config), "--out", str(out), "--quiet",
                           "--force"], capture_output=True, text=True, timeout=300, cwd=REPO, env=base_env)
    assert proc.returncode == 0 and not (out / "manifest.hmac").exists(), proc.stderr  # no key: not signed
    load_engine(_settings(out, warmup=False))


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
