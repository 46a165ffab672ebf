"""README's "Index your own model" section is executed as written, so the walkthrough cannot rot.

Code fences carry an info string:  ```python file=NAME  /  ```toml file=NAME  (written to an empty
directory),  ```bash run  (run there with bash -euo pipefail),  ```bash serve  (started in the
background; the test swaps in a free port) and  ```bash query  (run once the server is ready).
The serve + query part is skipped when the service package is not importable.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "README.md"
SECTION = "## Index your own model"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)


def blocks() -> list[tuple[str, dict[str, str], str]]:
    out = []
    text = DOC.read_text()
    section = text[text.index(SECTION):]
    section = section[:section.find("\n## ", len(SECTION))]
    for lang, info, body in FENCE.findall(section):
        words = info.split()
        attrs = dict(w.split("=", 1) if "=" in w else (w, "") for w in words)
        out.append((lang, attrs, body))
    return out


def _env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # this venv's tracin/python
    env["PYTHONPATH"] = os.pathsep.join([str(workdir), str(ROOT)])
    for name in [k for k in env if k.startswith("TRACIN_")]:
        env.pop(name)
    return env


def _bash(script: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"script failed ({proc.returncode}):\n{script}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_doc_has_the_expected_blocks():
    found = blocks()
    files = [a["file"] for lang, a, _ in found if "file" in a]
    assert files == ["mytask.py", "train.py", "config.toml"]
    kinds = [next(iter(a)) for lang, a, _ in found if lang == "bash"]
    assert kinds == ["run", "serve", "query"]
    assert "save_checkpoint(" in next(body for _, a, body in found if a.get("file") == "train.py")


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("own-model")
    env = _env(workdir)
    outputs = []
    for lang, attrs, body in blocks():
        if "file" in attrs:
            (workdir / attrs["file"]).write_text(body)
        elif lang == "bash" and "run" in attrs:
            outputs.append(_bash(body, workdir, env).stdout)
    return workdir, env, "\n".join(outputs)


def test_walkthrough_trains_indexes_and_inspects(walkthrough):
    from indexer.store import IndexDirectory

    workdir, _, out = walkthrough
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["epoch-10.pt", "epoch-20.pt", "epoch-30.pt"]
    accuracy = float(re.search(r"training accuracy ([0-9.]+)", out).group(1))
    assert accuracy > 0.9
    assert "indexed 150 examples" in out
    assert "top 5 self-influence" in out and "lr=0.1" in out and "lr=0.025" in out
    index = IndexDirectory.open(workdir / "index")
    assert index.count == 150 and index.manifest["projection"]["kind"] == "exact"
    assert [c["lr"] for c in index.manifest["checkpoints"]] == [0.1, 0.05, 0.025]
    assert index.examples[0]["id"] == "wine-0" and set(index.examples[0]["display"]) == {"alcohol", "color_intensity"}
    assert len(index.queries) == 28


def test_walkthrough_serves_and_answers_the_curl_query(walkthrough):
    if importlib.util.find_spec("service") is None or importlib.util.find_spec("service.server") is None:
        pytest.skip("the service package is not importable: serve + query part not run")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the query block cannot run")
    workdir, env, _ = walkthrough
    found = blocks()
    serve = next(body for lang, a, body in found if lang == "bash" and "serve" in a)
    query = next(body for lang, a, body in found if lang == "bash" and "query" in a)
    assert "8000" in serve and "8000" in query
    port = str(_free_port())
    serve, query = serve.replace("8000", port), query.replace("8000", port)
    log = workdir / "serve.log"
    with open(log, "w") as handle:
        server = subprocess.Popen(["bash", "-c", "exec " + serve.strip()], cwd=workdir, env=env, stdout=handle,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"tracin serve exited {server.returncode}:\n{log.read_text()}")
            ready = subprocess.run(["bash", "-c", f"curl -sf http://127.0.0.1:{port}/readyz"], capture_output=True)
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"tracin serve was not ready in 120 s:\n{log.read_text()}")
            time.sleep(0.5)
        body = json.loads(_bash(query, workdir, env, timeout=60).stdout)
        assert body["prediction"]["label"] == 0  # the first wine of load_wine is cultivar 1
        assert 0 < len(body["proponents"]) <= 3 and all(h["score"] > 0 for h in body["proponents"])
        assert all(h["score"] < 0 for h in body["opponents"])
        assert body["proponents"][0]["id"].startswith("wine-")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
