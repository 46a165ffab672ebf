"""README's "Index your own model" section is executed as written, so the walkthrough cannot rot.

It runs as a reader would run it: in a clean shell (no venv on PATH, no PYTHONPATH, HOME a temporary
directory), starting at the repository root where `make setup` created `.venv/`. Code fences carry an
info string:  ```bash setup  (the reader's first commands: activate the venv, make and enter a working
directory; every later bash block runs after it, as in the reader's one terminal),  ```python file=NAME
/  ```toml file=NAME  (saved in that working directory),  ```bash run  (run with bash -euo pipefail),
```bash serve  (started in the background; the test swaps in a free port) and  ```bash query  (run once
the server is ready, from a shell of its own, as from a second terminal).
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


VENV = ROOT / ".venv"


def _clean_env(home: Path) -> dict[str, str]:
    """A new terminal's environment: system PATH only (no venv), no PYTHONPATH, no TRACIN_* settings."""
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home),
            "LANG": "C.UTF-8", "TMPDIR": os.environ.get("TMPDIR", "/tmp"), "OMP_NUM_THREADS": "2"}


def _after_setup(block: str, setup: str) -> str:
    """A bash block as the reader runs it: in the terminal where the setup block already ran."""
    return f"{setup}\n{block}"


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
    assert kinds == ["setup", "run", "serve", "query"]
    assert "save_checkpoint(" in next(body for _, a, body in found if a.get("file") == "train.py")
    assert "source .venv/bin/activate" in _setup_block(found)


def _setup_block(found) -> str:
    """The reader's first commands (none in a README that forgets them: then the blocks run without)."""
    return next((body for lang, a, body in found if lang == "bash" and "setup" in a), "")


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    if not (VENV / "bin" / "activate").is_file():
        pytest.skip(f"{VENV} does not exist: the walkthrough starts after `make setup`")
    home = tmp_path_factory.mktemp("home")
    env = _clean_env(home)
    found = blocks()
    setup = _setup_block(found)
    clean = _bash("command -v tracin python || true; python3 -c 'import torch' 2>&1 | tail -1 || true",
                  ROOT, env).stdout
    assert "tracin" not in clean and "No module named 'torch'" in clean, f"not a clean shell: {clean}"
    if setup:  # where the reader is after the setup block: the file blocks are saved there
        start = ROOT
        workdir = Path(_bash(_after_setup("pwd", setup), start, env).stdout.strip().splitlines()[-1])
        assert workdir != ROOT and home in workdir.parents, f"work outside the checkout, not in {workdir}"
    else:  # no setup block: the reader saves the files in an empty directory and runs the blocks there
        start = workdir = home / "walkthrough"
        workdir.mkdir()
    outputs = []
    for lang, attrs, body in found:
        if "file" in attrs:
            (workdir / attrs["file"]).write_text(body)
        elif lang == "bash" and "run" in attrs:
            outputs.append(_bash(_after_setup(body, setup), start, env).stdout)
    return workdir, start, env, setup, "\n".join(outputs)


def test_walkthrough_trains_indexes_and_inspects(walkthrough):
    from indexer.store.directory import IndexDirectory

    workdir, _, _, _, out = walkthrough
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["epoch-10.pt", "epoch-20.pt", "epoch-30.pt"]
    accuracy = float(re.search(r"training accuracy ([0-9.]+)", out).group(1))
    assert accuracy > 0.9
    assert "indexed 150 examples" in out
    assert "top 5 self-influence" in out and "lr=0.1" in out and "lr=0.025" in out
    # exact mode says what its dimension is (the gradient size: 13x16+16 + 16x3+3 = 275), not the unused `dim`
    assert "projection exact (none: whole gradients, 275 numbers per checkpoint)" in out and "dim=256" not in out
    assert re.search(r"label=\d \(cultivar \d\)", out), "class names from the manifest"
    index = IndexDirectory.open(workdir / "index")
    assert index.count == 150 and index.manifest["projection"]["kind"] == "exact"
    assert [c["lr"] for c in index.manifest["checkpoints"]] == [0.1, 0.05, 0.025]
    assert index.examples[0]["id"] == "wine-0" and set(index.examples[0]["display"]) == {"alcohol", "color_intensity"}
    assert len(index.queries) == 28
    # the numbers people read (examples for POST /influence, display fields) are load_wine's own, without
    # float32 noise such as 12.079999923706055 for 12.08 (issue 22, item 9)
    from sklearn.datasets import load_wine

    dataset = set(load_wine().data.ravel().tolist())
    shown = [v for q in index.queries for v in q["example"]["measurements"]]
    shown += [v for e in index.examples for v in e["display"].values()]
    noisy = [v for v in shown if v not in dataset]
    assert len(shown) == 28 * 13 + 150 * 2 and not noisy, noisy[:5]


def test_walkthrough_serves_and_answers_the_curl_query(walkthrough):
    if importlib.util.find_spec("service") is None or importlib.util.find_spec("service.server") is None:
        pytest.skip("the service package is not importable: serve + query part not run")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the query block cannot run")
    workdir, start, env, setup, _ = walkthrough
    found = blocks()
    serve = next(body for lang, a, body in found if lang == "bash" and "serve" in a)
    query = next(body for lang, a, body in found if lang == "bash" and "query" in a)
    assert "8000" in serve and "8000" in query
    port = str(_free_port())
    serve, query = serve.replace("8000", port), query.replace("8000", port)
    log = workdir / "serve.log"
    with open(log, "w") as handle:
        server = subprocess.Popen(["bash", "-c", _after_setup("exec " + serve.strip(), setup)], cwd=start, env=env,
                                  stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
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
        body = json.loads(_bash(query, workdir, env, timeout=60).stdout)  # a second terminal: no setup needed
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
