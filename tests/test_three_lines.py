"""README's "Your model in three lines" is executed as written, one stack (### subsection) at a time, as a reader
would run it: in a clean shell (no venv on PATH, HOME a temporary directory) from the repository root. Per stack:
the ```bash setup block (activate a venv, make and enter a working directory), the ```python / ```toml file=NAME
blocks saved there, the ```bash prep blocks (the training run the reader already has), then the ```bash three
block: its first line in that shell, its second (tracin serve) in the background on a free port, its third (the
query) from a second shell once the server is ready. The answer must be a real influence answer.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_own_model_walkthrough import FENCE, ROOT, _bash, _clean_env, _free_port

DOC = ROOT / "README.md"
SECTION = "## Your model in three lines"


def stacks() -> dict[str, list[tuple[str, dict[str, str], str]]]:
    text = DOC.read_text()
    section = text[text.index(SECTION):]
    section = section[:section.find("\n## ", len(SECTION))]
    out = {}
    for part in section.split("\n### ")[1:]:
        title, _, body = part.partition("\n")
        blocks = []
        for lang, info, code in FENCE.findall(body):
            words = info.split()
            blocks.append((lang, dict(w.split("=", 1) if "=" in w else (w, "") for w in words), code))
        out[title.strip()] = blocks
    return out


def test_every_stack_has_its_blocks():
    found = stacks()
    assert list(found) == ["Hugging Face Trainer", "torchvision image classifier", "A table and an MLP"]
    for title, blocks in found.items():
        kinds = [next(iter(a)) for lang, a, _ in blocks if lang == "bash"]
        assert sorted(kinds) == ["prep", "setup", "three"], title
        three = next(code for lang, a, code in blocks if "three" in a)
        assert len(three.strip().splitlines()) == 3, title
        assert "source .venv" in next(code for lang, a, code in blocks if "setup" in a)


@pytest.mark.parametrize("title", ["Hugging Face Trainer", "torchvision image classifier", "A table and an MLP"])
def test_three_lines_run_as_written(title, tmp_path):
    blocks = stacks()[title]
    setup = next(code for lang, a, code in blocks if lang == "bash" and "setup" in a)
    venv = ROOT / re.search(r"source (\S+)/bin/activate", setup).group(1)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip(f"{venv.name} does not exist ({'make vision-venv' if 'vision' in venv.name else 'make setup'}): "
                    f"the {title} lines were not run")
    if "torchvision" in title:
        from indexer.demo.fashion_mnist import data_available

        if not data_available():
            pytest.skip("Debian's dataset-fashion-mnist is not installed")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    env = _clean_env(tmp_path)
    workdir = Path(_bash(f"{setup}\npwd", ROOT, env).stdout.strip().splitlines()[-1])
    assert tmp_path in workdir.parents
    for _, attrs, code in blocks:
        if "file" in attrs:
            (workdir / attrs["file"]).write_text(code)
    for lang, attrs, code in blocks:
        if lang == "bash" and "prep" in attrs:
            _bash(f"{setup}\n{code}", ROOT, env, timeout=600)
    index_line, serve_line, query_line = next(code for _, a, code in blocks if "three" in a).strip().splitlines()
    built = _bash(f"{setup}\n{index_line}", ROOT, env, timeout=600)
    assert "indexed" in built.stdout
    port = str(_free_port())
    assert "8000" in serve_line and "8000" in query_line
    log = workdir / "serve.log"
    with open(log, "w") as handle:
        server = subprocess.Popen(["bash", "-c", f"{setup}\nexec {serve_line.replace('8000', port)}"], cwd=ROOT,
                                  env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/readyz"], capture_output=True).returncode:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tracin serve did not come up:\n{log.read_text()}")
            time.sleep(0.5)
        # a second terminal: no venv, in the working directory (the query may read a file there)
        answer = json.loads(_bash(query_line.replace("8000", port), workdir, env, timeout=120).stdout)
        assert answer["proponents"] and all(h["score"] > 0 for h in answer["proponents"]), answer
        assert answer["exact"] is True and len(answer["proponents"]) <= 3
        assert answer["prediction"]["label_name"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
