"""Issue 21, service side: a real `tracin serve` (tests/service_support.start_server) switching index versions.

- Under load (several clients posting the same /influence query in a loop) while `tracin index --update` writes
  version 2 (new rows; a new checkpoint) and the server is switched by POST /admin/reload or by SIGHUP: every
  response is 200, every answer is the answer of version 1 or that of version 2 (the latter computed by a
  second server serving DIR/versions/v0002 alone), each client's answers switch exactly once (never version 1
  after version 2), requests that start after the switch returned all get version 2, requests that ended
  before the reload was asked for all got version 1, and /index reports version 2.
- Removed ids (`--remove-ids`, then a reload) appear in no answer, listing or export: the answers are those
  of version 1 with the removed rows left out (the same exact scores), ranks renumbered, totals and histogram
  counts without them, and a removed train_id is a 422 naming the field.
- A damaged new version (a tampered file, a damaged CURRENT pointer) is refused by the reload with a JSON 422
  naming the file, and the old version keeps serving the same answers; the route needs the API key (401 JSON)
  and, without a key on the server, answers 403 JSON.
"""
from __future__ import annotations

import csv
import io
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from indexer.build.pipeline import build_index
from indexer.config import load_config
from indexer.store.resume import KILL_ENV
from tests.conftest import make_checkpoints
from tests.service_support import REPO, start_server
from tests.tasks import GrowingTask

KEY = "reload-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FIRST, FULL = 30, 60
CLIENTS = 4


def _held_out(i: int) -> dict:
    return GrowingTask().held_out_set().examples(i)


QUERY = {"example": _held_out(0), "k": 8}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(GrowingTask(), tmp_path_factory.mktemp("ckpts"), count=4)


def write_config(directory: Path, ckpts, n: int, checkpoints: int, name: str) -> Path:
    lines = ['task = "tests.tasks:GrowingTask"', f"task_args = {{ n = {n} }}"]
    for c in ckpts[:checkpoints]:
        lines += ["[[checkpoints]]", f'path = "{c.path}"', f"lr = {c.lr!r}"]
    lines += ["[projection]", 'kind = "sketch"', "dim = 16", "seed = 3", "[index]", 'factory = "Flat"', "batch_size = 7"]
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def build(directory: Path, ckpts, n: int = FIRST, checkpoints: int = 3) -> Path:
    root = directory / "index"
    build_index(load_config(write_config(directory, ckpts, n, checkpoints, "first")), root)
    return root


def tracin(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(KILL_ENV, None)
    return subprocess.run([sys.executable, "-m", "indexer.cli", *map(str, args), "--quiet"], check=False,
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def update(directory: Path, ckpts, n: int, checkpoints: int) -> None:
    run = tracin("index", write_config(directory, ckpts, n, checkpoints, "update"), "--out", directory / "index",
                 "--update")
    assert run.returncode == 0 and "version 2" in run.stdout, run.stderr


def post(url: str, body: dict, headers: dict | None = None, path: str = "/influence") -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers or {}, timeout=300)


def get(url: str, path: str, headers: dict | None = None, **params) -> httpx.Response:
    return httpx.get(url + path, params=params, headers=headers or {}, timeout=300)


def hits(answer: dict) -> tuple[list, list]:
    """(proponents, opponents) as [(id, score)] lists."""
    return ([(h["id"], h["score"]) for h in answer["proponents"]], [(h["id"], h["score"]) for h in answer["opponents"]])


def same_hits(a: list, b: list) -> bool:
    """Same ids in the same order, scores equal to 1e-9 relative (the exact re-ranked scores, float64)."""
    return [i for i, _ in a] == [i for i, _ in b] and all(
        math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-300) for (_, x), (_, y) in zip(a, b))


def same_answer(a: dict, b: dict) -> bool:
    (ap, ao), (bp, bo) = hits(a), hits(b)
    return same_hits(ap, bp) and same_hits(ao, bo)


def answer_of_version(root: Path, number: int, body: dict) -> dict:
    """The answer of one version alone: a second server started on DIR/versions/v<number>."""
    server = start_server(root / "versions" / f"v{number:04d}")
    try:
        response = post(server.base_url, body)
        assert response.status_code == 200, response.text
        return response.json()
    finally:
        server.stop()


class Load:
    """CLIENTS threads, each with its own keep-alive client, posting `body` to /influence in a loop; every
    request recorded as (client, start, end, status, json or error text)."""

    def __init__(self, url: str, body: dict, headers: dict | None = None):
        self.url, self.body, self.headers = url, body, headers or {}
        self.records: list[tuple[int, float, float, int | None, object]] = []
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _run(self, client: int) -> None:
        with httpx.Client(timeout=300, headers=self.headers) as http:
            while not self.stop_event.is_set():
                started = time.monotonic()
                try:
                    response = http.post(self.url + "/influence", json=self.body)
                    status = response.status_code
                    payload = response.json() if status == 200 else response.text
                except httpx.HTTPError as exc:  # a dropped connection is a failed request
                    status, payload = None, f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.records.append((client, started, time.monotonic(), status, payload))

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        self.wait(lambda r: True, 2)
        return self

    def wait(self, which, per_client: int, timeout: float = 300) -> None:
        """Until every client has `per_client` records for which `which(record)` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                counts = [sum(1 for r in self.records if r[0] == c and which(r)) for c in range(CLIENTS)]
            if min(counts) >= per_client:
                return
            assert all(t.is_alive() for t in self.threads)
            time.sleep(0.05)
        raise AssertionError(f"the clients did not make {per_client} requests each within {timeout}s: {counts}")

    def finish(self) -> list:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=300)
        return sorted(self.records, key=lambda r: r[1])


def check_switch(records: list, old: dict, new: dict, asked: float, switched: float) -> None:
    """Zero failed requests; each answer old's or new's; per client old* then new*; requests ended before the
    reload was asked for: old; requests started after the switch was seen: new; both seen under load."""
    failed = [r for r in records if r[3] != 200]
    assert not failed, f"{len(failed)} of {len(records)} requests failed, e.g. {failed[0][3]}: {str(failed[0][4])[:300]}"
    assert not same_answer(old, new), "the update must change the answer, else the test proves nothing"
    kinds = []
    for client, started, ended, _, payload in records:
        kind = "old" if same_answer(payload, old) else "new" if same_answer(payload, new) else None
        assert kind is not None, f"an answer that is neither version's: {hits(payload)}"
        kinds.append((client, started, ended, kind))
    for client in range(CLIENTS):
        sequence = [k for c, _, _, k in kinds if c == client]
        first_new = sequence.index("new") if "new" in sequence else len(sequence)
        assert "old" not in sequence[first_new:], f"client {client} got version 1 after version 2: {sequence}"
    assert all(k == "old" for _, _, ended, k in kinds if ended < asked)
    assert all(k == "new" for _, started, _, k in kinds if started > switched)
    assert sum(1 for *_, k in kinds if k == "old") >= CLIENTS and sum(1 for *_, k in kinds if k == "new") >= CLIENTS


def index_version(url: str, headers: dict | None = None) -> dict:
    response = get(url, "/index", headers)
    assert response.status_code == 200, response.text
    return response.json()


# -- (a) under load ---------------------------------------------------------------------------------------

def test_post_reload_under_load_switches_to_the_new_rows_once_without_a_failed_request(tmp_path, ckpts):
    root = build(tmp_path, ckpts, FIRST, 3)
    server = start_server(root, env={"TRACIN_API_KEY": KEY})
    try:
        url = server.base_url
        info = index_version(url, AUTH)
        assert info["version"]["number"] == 1 and info["count"] == FIRST
        old = post(url, QUERY, AUTH).json()
        load = Load(url, QUERY, AUTH).start()
        update(tmp_path, ckpts, FULL, 3)  # written while the clients run; nothing served changes yet
        load.wait(lambda r: r[1] > time.monotonic() - 0.5, 1)
        new = answer_of_version(root, 2, QUERY)
        assert any(int(i[2:]) >= FIRST for i, _ in hits(new)[0] + hits(new)[1])  # new rows among the hits
        asked = time.monotonic()
        response = post(url, {}, AUTH, "/admin/reload")
        switched = time.monotonic()
        assert response.status_code == 200, response.text
        out = response.json()
        assert out["reloaded"] and out["changed"] and out["trigger"] == "POST /admin/reload"
        assert out["version"]["number"] == 2 and out["previous"]["number"] == 1
        assert out["version"]["rows_added"] == FULL - FIRST and out["version"]["parent"] == 1
        load.wait(lambda r: r[1] > switched, 3)
        check_switch(load.finish(), old, new, asked, switched)
        info = index_version(url, AUTH)
        assert info["version"]["number"] == 2 and info["count"] == FULL
        assert info["version"]["manifest_sha256"] == out["version"]["manifest_sha256"]
        assert same_answer(post(url, QUERY, AUTH).json(), new)
        last = get(url, "/admin/reload", AUTH).json()
        assert last["reloaded"] and last["version"]["number"] == 2 and last["running"] is False
    finally:
        server.stop()


def test_sighup_under_load_switches_to_the_new_checkpoint_once_without_a_failed_request(tmp_path, ckpts):
    root = build(tmp_path, ckpts, FIRST, 3)
    server = start_server(root)  # no API key: SIGHUP is the way to reload
    try:
        url = server.base_url
        refused = post(url, {}, None, "/admin/reload")  # no key on the server: no HTTP reload at all
        assert refused.status_code == 403 and refused.json()["detail"][0]["field"] == "authorization", refused.text
        old = post(url, QUERY).json()
        load = Load(url, QUERY).start()
        update(tmp_path, ckpts, FIRST, 4)
        new = answer_of_version(root, 2, QUERY)
        asked = time.monotonic()
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 300
        while index_version(url)["version"]["number"] != 2:
            assert time.monotonic() < deadline and server.proc.poll() is None, server.output()
            time.sleep(0.05)
        switched = time.monotonic()  # /index reported version 2: the switch is done
        load.wait(lambda r: r[1] > switched, 3)
        check_switch(load.finish(), old, new, asked, switched)
        info = index_version(url)
        assert info["version"]["checkpoints_added"] == 1 and len(info["checkpoints"]) == 4
        assert "reload (SIGHUP): now serving version 2" in server.output()
    finally:
        server.stop()


# -- (b) removed ids ------------------------------------------------------------------------------------

def _without(answer: dict, removed: set) -> tuple[list, list]:
    pro, opp = hits(answer)
    return [h for h in pro if h[0] not in removed], [h for h in opp if h[0] not in removed]


def test_removed_ids_appear_in_no_answer_listing_or_export(tmp_path, ckpts):
    root = build(tmp_path, ckpts, FIRST, 3)
    server = start_server(root, env={"TRACIN_API_KEY": KEY})
    try:
        url = server.base_url
        everything = {"k": FIRST}
        questions = {
            "example": {"example": _held_out(0), **everything},
            "set": {"examples": [_held_out(0), _held_out(1)], "aggregate": "sum", **everything},
            "batch": {"examples": [_held_out(2), _held_out(3)], **everything},
            "train_id": {"train_id": "ex1", **everything},
            "train_id set": {"train_ids": ["ex1", "ex2"], "aggregate": "mean", **everything},
        }
        before = {name: post(url, body, AUTH).json() for name, body in questions.items()}
        si_before = get(url, "/self-influence/top", AUTH, k=FIRST).json()
        review_before = get(url, "/label-review", AUTH, k=FIRST).json()
        pro, opp = hits(before["example"])
        removed = {pro[0][0], pro[1][0], opp[0][0], si_before["items"][0]["id"],
                   review_before["items"][0]["id"]} - {"ex1", "ex2"}
        assert len(removed) >= 3
        file = tmp_path / "remove.txt"
        file.write_text("\n".join(sorted(removed)) + "\n")
        run = tracin("index", "--out", root, "--remove-ids", file)
        assert run.returncode == 0 and f"{len(removed)} removed" in run.stdout, run.stderr
        response = post(url, {}, AUTH, "/admin/reload")
        assert response.status_code == 200 and response.json()["version"]["removed"] == len(removed), response.text
        kept = FIRST - len(removed)

        # influence: the answers of version 1 without the removed rows (same exact scores)
        for name, body in questions.items():
            answer = post(url, body, AUTH).json()
            for got, want in zip(answer.get("results", [answer]), before[name].get("results", [before[name]])):
                gp, go = hits(got)
                assert not {i for i, _ in gp + go} & removed, name
                wp, wo = _without(want, removed)
                assert same_hits(gp, wp) and same_hits(go, wo), name
        victim = min(removed)
        for body, field in [({"train_id": victim}, "train_id"),
                            ({"train_ids": ["ex1", victim], "aggregate": "sum"}, "train_ids.1"),
                            ({"train_ids": [victim, "ex1"]}, "train_ids.0"),
                            ({"example": _held_out(0), "exclude": ["ex1", victim]}, "exclude.1")]:
            response = post(url, body, AUTH)
            assert response.status_code == 422, (body, response.text)
            error = response.json()
            assert error["detail"][0]["field"] == field and "removed" in error["message"], error

        # listings, ranks renumbered
        top = get(url, "/self-influence/top", AUTH, k=FIRST).json()
        assert top["total"] == kept and [i["id"] for i in top["items"]] == \
            [i["id"] for i in si_before["items"] if i["id"] not in removed]
        histogram = get(url, "/self-influence/histogram", AUTH).json()
        assert histogram["total"] == kept and sum(histogram["counts"]) == kept
        review = get(url, "/label-review", AUTH, k=FIRST).json()
        assert review["total"] == kept and [i["rank"] for i in review["items"]] == list(range(1, kept + 1))
        assert [i["id"] for i in review["items"]] == [i["id"] for i in review_before["items"] if i["id"] not in removed]
        rh = get(url, "/label-review/histogram", AUTH).json()
        assert sum(rh["counts"]) == kept
        export = get(url, "/label-review/export", AUTH, format="json").json()
        assert export["total"] == kept and not {i["id"] for i in export["items"]} & removed
        rows = list(csv.DictReader(io.StringIO(get(url, "/label-review/export", AUTH, format="csv").text)))
        assert len(rows) == kept and not {r["id"] for r in rows} & removed
        for label in (0, 1):
            page = get(url, "/self-influence/top", AUTH, k=FIRST, label=label).json()
            assert page["total"] and not {i["id"] for i in page["items"]} & removed
            page = get(url, "/label-review", AUTH, k=FIRST, label=label).json()
            assert page["total"] and not {i["id"] for i in page["items"]} & removed
        response = get(url, f"/examples/{victim}", AUTH)
        assert response.status_code == 404 and response.json()["detail"][0]["field"] == "id", response.text
        assert "removed" in response.json()["message"]
        kept_id = next(i["id"] for i in top["items"])
        assert get(url, f"/examples/{kept_id}", AUTH).json()["rank"] == 1
        queries = get(url, "/queries", AUTH).json()
        assert queries["total"] == 5 and not {q["id"] for q in queries["items"]} & removed
        assert index_version(url, AUTH)["version"]["removed"] == len(removed)
    finally:
        server.stop()


# -- (c) a damaged version, (d) the key --------------------------------------------------------------------

def test_a_damaged_new_version_is_refused_and_the_old_one_keeps_serving(tmp_path, ckpts):
    root = build(tmp_path, ckpts, FIRST, 3)
    server = start_server(root, env={"TRACIN_API_KEY": KEY})
    try:
        url = server.base_url
        old = post(url, QUERY, AUTH).json()
        update(tmp_path, ckpts, FULL, 3)
        # (d) the key: none, or a wrong one -> 401 JSON, nothing reloaded
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            response = post(url, {}, headers, "/admin/reload")
            assert response.status_code == 401 and response.json()["error"] == "unauthorized", response.text
            assert response.json()["detail"][0]["field"] == "authorization"
        assert index_version(url, AUTH)["version"]["number"] == 1

        # a tampered file of version 2 (its own file, not one it shares with version 1)
        faiss_file = root / "versions" / "v0002" / "index.faiss"
        assert os.stat(faiss_file).st_ino != os.stat(root / "index.faiss").st_ino
        good = faiss_file.read_bytes()
        tampered = faiss_file.with_name("tampered")
        tampered.write_bytes(good[:-8] + bytes(8))
        tampered.replace(faiss_file)
        damaged_pointer = b'{"format": "tracin-current/1", "version": 2'
        pointer = (root / "CURRENT").read_bytes()
        for damage, names in (("file", "index.faiss"), ("pointer", "CURRENT")):
            if damage == "pointer":
                faiss_file.write_bytes(good)
                (root / "CURRENT").write_bytes(damaged_pointer)
            response = post(url, {}, AUTH, "/admin/reload")
            assert response.status_code == 422, response.text
            error = response.json()
            assert error["error"] == "reload_failed" and names in error["message"], error
            assert "still serving version 1" in error["message"]
            assert index_version(url, AUTH)["version"]["number"] == 1
            assert same_answer(post(url, QUERY, AUTH).json(), old)
            last = get(url, "/admin/reload", AUTH).json()
            assert last["reloaded"] is False and names in last["error"]
        # the same through SIGHUP: refused, logged, version 1 served
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 120
        while "reload (SIGHUP) refused, still serving version 1" not in server.output():
            assert time.monotonic() < deadline and server.proc.poll() is None, server.output()
            time.sleep(0.05)
        assert same_answer(post(url, QUERY, AUTH).json(), old)
        # repaired: the reload goes through
        (root / "CURRENT").write_bytes(pointer)
        response = post(url, {}, AUTH, "/admin/reload")
        assert response.status_code == 200 and response.json()["version"]["number"] == 2, response.text
        assert index_version(url, AUTH)["count"] == FULL
        assert not same_answer(post(url, QUERY, AUTH).json(), old)
    finally:
        server.stop()
