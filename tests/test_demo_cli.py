"""The embedded digits demo through the real `tracin` command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.store.directory import IndexDirectory

ROOT = Path(__file__).parents[1]


def tracin(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "indexer.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    proc = tracin("demo", "--out", str(out), "--no-serve", "--quiet")
    return out, proc.stdout


def test_demo_builds_the_whole_index(demo):
    """Outcomes only: how long the demo takes belongs in bench/, never in a test (a busy machine is slow)."""
    out, stdout = demo
    assert "indexed 1500 examples" in stdout and str(out / "index") in stdout
    index = IndexDirectory.open(out / "index")
    assert index.count == 1500 and len(index.manifest["checkpoints"]) == 5
    lrs = [c["lr"] for c in index.manifest["checkpoints"]]
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == 5  # decaying lr, recorded per checkpoint
    assert len(index.queries) == 297 and len(index.queries[0]["example"]["pixels"]) == 64


def test_self_influence_finds_the_flipped_labels(demo):
    index = IndexDirectory.open(demo[0] / "index")
    flipped = np.array([e["display"]["flipped"] for e in index.examples])
    assert 0.09 < flipped.mean() < 0.11
    for e in index.examples:
        assert (e["label"] != e["display"]["original_label"]) == e["display"]["flipped"]
    top = np.argsort(-index.self_influence)[: int(0.1 * index.count)]
    assert flipped[top].mean() > 0.6  # random ranking would find ~0.1


def test_raw_answers_dominated_by_high_self_influence_say_so(demo):
    """Issue 22, item 8: train-17's raw proponents and opponents are all flipped labels, most among the
    top 10% by self-influence: the answer carries the `high_self_influence` hint, with the normalised
    ranking as its suggestion; that ranking, asked for, carries none (and shows fewer flipped labels)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.hints import top_ranks
    from service.settings import Settings

    with TestClient(create_app(Settings(index_dir=demo[0] / "index", access_log=False))) as client:
        count = client.get("/index").json()["count"]
        queries = [{"train_id": "train-17"}] + [{"example": q["example"]} for q in
                                                 client.get("/queries", params={"limit": 5}).json()["items"]]
        for query in queries:
            answers = {norm: client.post("/influence", json={**query, "normalize": norm}).json()
                       for norm in ("none", "train")}
            for norm, answer in answers.items():
                hits = answer["proponents"] + answer["opponents"]
                share = sum(h["self_influence_rank"] <= top_ranks(count) for h in hits) / len(hits)
                assert bool(answer["hints"]) == (norm == "none" and share > 0.5), (query, norm, share)
                if answer["hints"]:
                    hint, = answer["hints"]
                    assert hint["code"] == "high_self_influence" and hint["fraction"] == share
                    assert hint["suggestion"] == {"normalize": "train"} and answer["normalize"] == "none"
        t17 = {norm: client.post("/influence", json={"train_id": "train-17", "normalize": norm}).json()
               for norm in ("none", "train")}
        raw_hits = t17["none"]["proponents"] + t17["none"]["opponents"]
        assert all(h["display"]["flipped"] for h in raw_hits)  # the observation
        assert t17["none"]["hints"] and t17["none"]["hints"][0]["fraction"] == 1.0
        assert t17["train"]["hints"] == []
        flipped_normalised = sum(h["display"]["flipped"] for h in t17["train"]["proponents"] + t17["train"]["opponents"])
        assert flipped_normalised < len(raw_hits)


def test_inspect_prints_summary_and_json(demo):
    text = tracin("inspect", str(demo[0] / "index"), "--top", "3").stdout
    assert "sketch dim=512" in text and "fc1" in text and "top 3 self-influence" in text
    data = json.loads(tracin("inspect", str(demo[0] / "index"), "--json").stdout)
    assert data["manifest"]["count"] == 1500 and data["sizes"]["index.faiss"] > 0


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    proc = tracin("inspect", str(tmp_path), check=False)
    assert proc.returncode == 2 and "manifest.json is missing" in proc.stderr and "Traceback" not in proc.stderr
    proc = tracin("index", str(tmp_path / "none.toml"), "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "config file not found" in proc.stderr
    (tmp_path / "bad.toml").write_text("task = 'x:y'\n[projection]\ndim = 'big'\n")
    proc = tracin("index", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "checkpoints" in proc.stderr


def test_version_and_help_show_defaults():
    from indexer import __version__

    assert tracin("--version").stdout.strip() == f"tracin {__version__}"
    for command in ("serve", "demo"):
        text = " ".join(tracin(command, "--help").stdout.split())  # argparse wraps lines
        assert "address to listen on" in text and "(default: 127.0.0.1)" in text, command
        assert "TCP port to listen on" in text and "(default: 8000)" in text, command
    assert "(default: .tracin/demo)" in text and "(default: 30)" in text  # demo's own options
    proc = tracin("demo", "--epochs", "0", "--no-serve", check=False)
    assert proc.returncode == 2 and "--epochs must be at least 1" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_training_reports_progress(tmp_path):
    from indexer.demo.digits import train_digits

    lines: list[str] = []
    train_digits(tmp_path, epochs=10, checkpoints=5, progress=lines.append)
    assert len(lines) == 5 and lines[0].startswith("epoch   2/10: mean loss ") and "lr 0.093," in lines[0]
    assert all("saved checkpoint epoch-" in line for line in lines) and lines[-1].startswith("epoch  10/10")


def _make_n(*args: str) -> list[str]:
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under `make test`
    proc = subprocess.run(["make", "--no-print-directory", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_make_demo_installs_no_extras_and_takes_port_and_host():
    lines = _make_n("demo", "PORT=8001", "HOST=0.0.0.0")
    installs = [line for line in lines if "pip install" in line and "constraints.txt -e" in line]
    assert installs == [".venv/bin/pip install -q -c constraints.txt -e '.'"], installs  # no test/text extras
    assert lines[-1] == ".venv/bin/tracin demo --out .tracin/demo --host 0.0.0.0 --port 8001"
    assert _make_n("demo")[-1].endswith("--host 127.0.0.1 --port 8000")
    test = _make_n("test")
    installs = [line for line in test if "constraints.txt -e" in line]
    assert installs == [".venv/bin/pip install -q -c constraints.txt -e '.[test,text,huggingface,lightning,ray,data]'"]
    # the torchvision venv: only from wheels on local disk (file: links), never with the project's torch pin
    vision = next(i for i, line in enumerate(test) if ".venv-vision/bin/pip install -q torch==2.14.1" in line)
    assert "download_info']['url'].startswith('file:')" in "\n".join(test[:vision])
    assert test[-1] == ".venv/bin/python -m pytest -q "


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["index", "--help"], ["serve", "--help"]])
def test_version_and_help_do_not_import_torch(argv):
    """`tracin --version` / `--help` stay instant: nothing heavy is imported before a command runs."""
    code = ("import sys, contextlib, io\n"
            "from indexer.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n"
            f"        main({argv!r})\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code == 0, exc.code\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'faiss', 'fastapi') if m in sys.modules)\n"
            "print(repr(heavy), out.getvalue()[:40].replace(chr(10), ' '))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    heavy, printed = proc.stdout.split(" ", 1)
    assert heavy == "[]", proc.stdout
    assert ("tracin 0.1.0" if argv == ["--version"] else "usage: tracin") in printed
