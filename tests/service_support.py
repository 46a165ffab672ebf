"""Helpers for the service tests: small index directories and a real `tracin serve` subprocess.

Indexes are built once per test process (cached) in temporary directories removed at exit.
"""
from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from indexer.checkpoints import save_checkpoint
from indexer.config import parse_config
from indexer.sketch.embedding import Checkpoint
from indexer.build.pipeline import build_index
from indexer.store.directory import IndexDirectory
from indexer.task import ExampleSet
from tests.tasks import MLPTask

REPO = Path(__file__).resolve().parents[1]
_TMP = Path(tempfile.mkdtemp(prefix="tracin-service-tests-"))
atexit.register(shutil.rmtree, _TMP, True)


class ServiceMLPTask(MLPTask):
    """MLPTask (float64) whose training labels never use class "c" (2), so that a label filter can match
    no training example. Held-out examples are those of MLPTask."""

    def training_set(self) -> ExampleSet:
        base = super().training_set()
        return ExampleSet(base.inputs, base.labels % 2, ids=base.ids, display=base.display, examples=base.examples)


def train_checkpoints(task, out: Path, lrs=(0.5, 0.3, 0.1), steps: int = 5) -> list[Path]:
    """A few plain SGD steps between checkpoints, each saved with the lr in force."""
    train = task.training_set()
    model = task.build_model()
    paths = []
    for i, lr in enumerate(lrs):
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(steps):
            loss = task.loss(model(train.inputs), train.labels).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        paths.append(save_checkpoint(out / f"ckpt-{i}.pt", model, optimizer, step=(i + 1) * steps))
    return paths


def build_mlp_index(name: str = "mlp", factory: str = "Flat", kind: str = "exact", batch_size: int = 1,
                    search_params: dict | None = None, lrs=(0.5, 0.3, 0.1)) -> Path:
    """Exact-mode float64 index of ServiceMLPTask (40 training examples, 3 checkpoints)."""
    work = _TMP / name
    work.mkdir(parents=True, exist_ok=True)
    task = ServiceMLPTask()
    ckpts = train_checkpoints(task, work / "run", lrs=lrs)
    data = {"task": "tests.service_support:ServiceMLPTask",
            "checkpoints": [{"path": str(p)} for p in ckpts],
            "projection": {"kind": kind, "dim": 16, "seed": 0},
            "index": {"factory": factory, "batch_size": batch_size, "search_params": search_params or {}}}
    return build_index(parse_config(data, work), work / "index").path


@functools.lru_cache(maxsize=None)
def mlp_index() -> Path:
    return build_mlp_index()


@functools.lru_cache(maxsize=None)
def digits_index() -> Path:
    """The digits demo task, trained briefly (2 checkpoints), sketch projection, batch 256."""
    from indexer.config import load_config
    from indexer.demo.digits import train_digits

    work = _TMP / "digits"
    config = train_digits(work / "run", epochs=4, checkpoints=2)
    return build_index(load_config(config), work / "index").path


@functools.lru_cache(maxsize=None)
def zoo_index(name: str) -> Path:
    """Exact-mode index of a model-zoo task (tests/zoo.py, 2 seeded checkpoints), built once per process."""
    from tests import zoo
    from tests.conftest import make_checkpoints

    work = _TMP / f"zoo-{name}"
    work.mkdir(parents=True, exist_ok=True)
    ckpts = make_checkpoints(zoo.EXACT[name](), work, count=2)
    data = {"task": f"tests.zoo:{name}", "checkpoints": [{"path": str(c.path), "lr": c.lr} for c in ckpts]}
    return build_index(parse_config(data, work), work / "index").path


def copy_index(src: Path, name: str) -> Path:
    dst = _TMP / "copies" / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def resign_manifest(path: Path) -> None:
    """Rewrite manifest.sha256 for the current manifest.json (what a consistent edit of the manifest
    would do): the checks behind the digest must still refuse a tampered figure."""
    import hashlib

    digest = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    (path / "manifest.sha256").write_text(f"{digest}  manifest.json\n")


def checkpoints_of(index_path: Path) -> list[Checkpoint]:
    return [Checkpoint(p, lr) for p, lr in IndexDirectory.open(index_path, verify=False).checkpoint_paths()]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    base_url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_server(index_dir: Path, env: dict[str, str] | None = None, timeout: float = 90.0) -> ServerProcess:
    """`tracin serve DIR --port 0` in a subprocess; returns once /readyz answers 200."""
    log = Path(tempfile.mkstemp(prefix="serve-", suffix=".log", dir=_TMP)[1])
    full_env = dict(os.environ)
    full_env.update({"PYTHONPATH": str(REPO), "TRACIN_ACCESS_LOG": "false", "PYTHONUNBUFFERED": "1"})
    full_env.update(env or {})
    with open(log, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "indexer.cli", "serve", str(index_dir), "--host", "127.0.0.1",
                                 "--port", "0"], stdout=handle, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
    server = ServerProcess(proc, "", log)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"tracin serve exited with {proc.returncode}:\n{server.output()}")
            match = re.search(r"API\s+(http://127\.0\.0\.1:\d+)/", server.output())
            if match:
                server.base_url = match.group(1)
                try:
                    if httpx.get(server.base_url + "/readyz", timeout=5).status_code == 200:
                        return server
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"tracin serve was not ready within {timeout}s:\n{server.output()}")
    except BaseException:
        server.stop()
        raise
