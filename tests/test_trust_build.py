"""Issue 10, building side (and issue 8 item 10): a build never lies and never loses anything.

kill -9 at every step of a build, then a rerun whose files are byte-identical to an uninterrupted
build; damaged resume state detected and restarted; two builds into one --out; --force only on index
directories; a full disk (tmpfs mounts where this runs as root, else skipped); figures validated at
index time (lr 1e300, the loss shape, an IVF factory larger than the data); a server with
TRACIN_MMAP=true surviving a rebuild of its directory."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import torch

from indexer.config import ConfigError, load_config
from indexer.build.pipeline import build_index
from indexer.store.resume import KILL_ENV, KILL_STEPS, OutputLock
from indexer.store.directory import IndexBuildError, IndexDirectory
from tests.conftest import make_checkpoints, write_config
from tests.service_support import REPO, start_server
from tests.tasks import MLPTask

REF = "tests.tasks:MLPTask"
VOLATILE = ("created_at", "build")  # manifest keys that record when and how long


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(MLPTask(), tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ckpts):
    """An uninterrupted build (sketch 16, batch 7: 6 batches per checkpoint, 3 checkpoints)."""
    work = tmp_path_factory.mktemp("reference")
    config = write_config(work, REF, ckpts, kind="sketch", dim=16)
    build_index(load_config(config), work / "index")
    return work / "index"


def _files(path: Path) -> dict[str, bytes]:
    out = {}
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.name not in ("manifest.json", "manifest.sha256"):
            out[file.relative_to(path).as_posix()] = file.read_bytes()
    manifest = json.loads((path / "manifest.json").read_text())
    for key in VOLATILE:
        manifest.pop(key)
    for entry in manifest["checkpoints"]:
        entry.pop("source")
    out["manifest (without times and sources)"] = json.dumps(manifest, sort_keys=True).encode()
    return out


def _assert_same_index(path: Path, reference: Path) -> None:
    got, want = _files(path), _files(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted build"
    IndexDirectory.open(path)


def _tracin(*args, env=None, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO)}
    full.pop(KILL_ENV, None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "indexer.cli", *map(str, args), "--quiet"], capture_output=True,
                          text=True, cwd=cwd, env=full, timeout=timeout)


def _leftovers(directory: Path, name: str = "index") -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}."))


# -- 3. kill -9 at every step, then the same bytes -----------------------------------------------

KILLS = [*KILL_STEPS, "batch:8", "state-written:2", "state-committed:3", "checkpoint-embedded:3"]


@pytest.mark.parametrize("step", KILLS)
def test_kill_at_every_step_then_rerun_gives_the_same_bytes(tmp_path, ckpts, reference, step, capsys):
    config = write_config(tmp_path, REF, ckpts, kind="sketch", dim=16)
    killed = _tracin("index", config, "--out", tmp_path / "index", env={KILL_ENV: step})
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    if step == "index-committed":  # killed after the rename: the index is whole already
        _assert_same_index(tmp_path / "index", reference)
    else:
        assert not (tmp_path / "index").exists()
    build_index(load_config(config), tmp_path / "index", overwrite=True)  # --force always works
    _assert_same_index(tmp_path / "index", reference)
    assert _leftovers(tmp_path) == [], "no partial, staging, old or lock file may remain"
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if step in ("state-started", "batch", "batch:8", "checkpoint-embedded", "state-written", "state-written:2",
                "checkpoint-embedded:3"):
        assert "removed an unfinished resume step" in err, err
    if step in ("state-committed", "state-committed:3", "state-written:2", "batch:8", "checkpoint-embedded:3",
                "index-staged", "manifest-written"):
        assert "resuming: checkpoints 0.." in err, err


def test_a_rerun_removes_the_resume_state_of_a_build_killed_after_its_commit(tmp_path, ckpts, reference):
    """Killed between the commit of the index and the removal of its resume directory: the index is whole,
    and the next run (with or without --force) removes the hidden `.index.partial-*` leftover."""
    config = write_config(tmp_path, REF, ckpts, kind="sketch", dim=16)
    killed = _tracin("index", config, "--out", tmp_path / "index", env={KILL_ENV: "index-committed"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [n for n in _leftovers(tmp_path) if n.startswith(".index.partial-")], _leftovers(tmp_path)
    rerun = _tracin("index", config, "--out", tmp_path / "index")  # no --force: refused, and cleaned up
    assert rerun.returncode == 2 and "already exists" in rerun.stderr, rerun.stderr
    assert "removed .index.partial-" in rerun.stderr and "Traceback" not in rerun.stderr, rerun.stderr
    assert _leftovers(tmp_path) == []
    _assert_same_index(tmp_path / "index", reference)


def test_a_rerun_keeps_the_resume_state_of_a_rebuild_that_was_not_committed(tmp_path, ckpts, reference):
    """The resume state of an interrupted --force rebuild beside a whole index is not that index's leftover:
    a rerun without --force keeps it, and the next --force run resumes from it."""
    config = write_config(tmp_path, REF, ckpts, kind="sketch", dim=16)
    assert _tracin("index", config, "--out", tmp_path / "index").returncode == 0
    for step in ("state-committed:2", "manifest-written"):
        killed = _tracin("index", config, "--out", tmp_path / "index", "--force", env={KILL_ENV: step})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        partial = [n for n in _leftovers(tmp_path) if n.startswith(".index.partial-")]
        assert partial
        refused = _tracin("index", config, "--out", tmp_path / "index")
        assert refused.returncode == 2 and "already exists" in refused.stderr, refused.stderr
        assert [n for n in _leftovers(tmp_path) if n.startswith(".index.partial-")] == partial
        resumed = _tracin("index", config, "--out", tmp_path / "index", "--force")
        assert resumed.returncode == 0 and "resuming: checkpoints 0.." in resumed.stderr, resumed.stderr
        assert _leftovers(tmp_path) == []
        _assert_same_index(tmp_path / "index", reference)


def _read_only_dir(tmp_path: Path) -> Path:
    """A directory nobody may write into: a read-only tmpfs where this runs as root, else mode 0555."""
    point = tmp_path / "read-only"
    point.mkdir()
    if os.geteuid() == 0:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"root, and cannot mount a read-only tmpfs here: {proc.stderr.strip()}")
    else:
        point.chmod(0o555)
    return point


@pytest.mark.parametrize("command", ["index", "demo"])
def test_an_out_that_cannot_be_written_is_one_line(tmp_path, ckpts, command):
    """A read-only --out and an --out under a regular file: exit 2 and one line saying so, no traceback
    (issue 22: a 16-line traceback; "File exists")."""
    config = write_config(tmp_path, REF, ckpts, kind="sketch", dim=16)
    regular = tmp_path / "notes.txt"
    regular.write_text("a file, not a directory")
    read_only = _read_only_dir(tmp_path)
    try:
        not_writable = ("is not writable", "cannot create")  # demo's --out is a work directory it creates
        not_a_dir = ("notes.txt is a file, not a directory",)
        cases = [(read_only / "index", not_writable), (read_only / "sub" / "index", not_writable),
                 (regular / "index", not_a_dir), (regular / "deeper" / "index", not_a_dir)]
        if command == "demo":
            cases.append((regular, not_a_dir))
        for out, words in cases:
            args = ("index", config, "--out", out) if command == "index" else ("demo", "--out", out, "--no-serve")
            proc = _tracin(*args)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1, proc.stderr
            assert lines[0].startswith(f"tracin {command}: error: --out {out}"), lines
            assert any(w in lines[0] for w in words), lines
            assert "File exists" not in lines[0]
        assert regular.read_text() == "a file, not a directory"
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(read_only)], capture_output=True)


def test_damaged_resume_state_is_detected_and_restarted(tmp_path, ckpts, reference, capsys):
    config = write_config(tmp_path, REF, ckpts, kind="sketch", dim=16)
    for damage in ("truncate vectors", "garbage state.json", "flip a byte"):
        killed = _tracin("index", config, "--out", tmp_path / "index", "--force", env={KILL_ENV: "state-committed:2"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        state = next(tmp_path.glob(".index.partial-*/state-0001"))
        if damage == "truncate vectors":
            with open(state / "vectors.npy", "r+b") as handle:
                handle.truncate(200)
        elif damage == "garbage state.json":
            (state / "state.json").write_bytes(b"\x00{not json")
        else:
            data = bytearray((state / "vectors.npy").read_bytes())
            data[-5] ^= 0x40
            (state / "vectors.npy").write_bytes(bytes(data))
        rerun = _tracin("index", config, "--out", tmp_path / "index", "--force")
        assert rerun.returncode == 0, rerun.stderr
        assert "is damaged" in rerun.stderr and "Traceback" not in rerun.stderr, rerun.stderr
        _assert_same_index(tmp_path / "index", reference)
        assert _leftovers(tmp_path) == []


def test_a_failed_build_removes_its_partial_directory(tmp_path, ckpts, monkeypatch):
    import indexer.build.pipeline as pipeline

    real = pipeline.CheckpointEmbedder
    calls = {"n": 0}

    class Failing(real):
        def __init__(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("the task broke at checkpoint 1")
            super().__init__(*a, **k)

    monkeypatch.setattr(pipeline, "CheckpointEmbedder", Failing)
    config = load_config(write_config(tmp_path, REF, ckpts, kind="sketch", dim=16))
    with pytest.raises(RuntimeError, match="checkpoint 1"):
        build_index(config, tmp_path / "index")
    assert _leftovers(tmp_path) == [] and not (tmp_path / "index").exists()


# -- 4. two builds into one --out ---------------------------------------------------------------------

def test_a_second_build_is_refused_while_the_output_is_locked(tmp_path, ckpts):
    config = write_config(tmp_path, REF, ckpts, kind="sketch", dim=16)
    out = (tmp_path / "index").resolve()
    with OutputLock(out.parent / ".index.lock", out):
        proc = _tracin("index", config, "--out", out, "--force")
    assert proc.returncode == 2 and f"another build (pid {os.getpid()}) is writing" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and not out.exists()
    assert _tracin("index", config, "--out", out).returncode == 0  # released: the next build runs


class SlowMLPTask(MLPTask):
    """MLPTask whose training set is not ready until the file named by $TRACIN_TEST_RELEASE exists: a build
    that holds its lock until the test lets it go (a guard of 300 s only bounds a hung test)."""

    def training_set(self):
        import time

        release = os.environ.get("TRACIN_TEST_RELEASE")
        deadline = time.monotonic() + 300
        while release and not Path(release).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return super().training_set()


def test_two_concurrent_builds_never_mix(tmp_path, ckpts):
    """A second build (another config) started while the first runs is refused naming the first's pid;
    the output is the first build's, whole."""
    import time

    configs = []
    for seed, ref in ((3, "tests.test_trust_build:SlowMLPTask"), (4, REF)):
        directory = tmp_path / f"config-{seed}"
        directory.mkdir()
        config = write_config(directory, ref, ckpts, kind="sketch", dim=16)
        config.write_text(config.read_text().replace("seed = 3", f"seed = {seed}"))
        configs.append(config)
    out = tmp_path / "index"
    release = tmp_path / "release"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRACIN_TEST_RELEASE": str(release)}

    def start(config):
        return subprocess.Popen([sys.executable, "-m", "indexer.cli", "index", str(config), "--out", str(out),
                                 "--force", "--quiet"], stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)

    first = start(configs[0])
    deadline = time.monotonic() + 300  # a guard only: the first build waits for `release` holding its lock
    while not (tmp_path / ".index.lock").exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = start(configs[1])
    code2, err2 = second.wait(timeout=300), second.stderr.read()  # refused while the first holds the lock
    release.touch()
    code1, err1 = first.wait(timeout=300), first.stderr.read()
    assert code1 == 0, err1
    assert code2 == 2 and f"another build (pid {first.pid}) is writing" in err2 and "Traceback" not in err2, err2
    index = IndexDirectory.open(out)  # whole, verified, and the first build's
    assert index.manifest["projection"]["seed"] == 3
    assert _leftovers(tmp_path) == []


# -- 5. --force replaces index directories only ---------------------------------------------------------

def test_force_refuses_what_is_not_an_index_directory(tmp_path, ckpts, reference):
    config = write_config(tmp_path, REF, ckpts, kind="sketch", dim=16)
    user = tmp_path / "my-files"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    proc = _tracin("index", config, "--out", user, "--force")
    assert proc.returncode == 2 and "is not an index directory" in proc.stderr and proc.stderr.count("\n") == 1
    assert (user / "thesis.tex").read_text() == "years of work"

    # the directory holding the config and the checkpoints (even one that looks like an index)
    project = tmp_path / "project"
    shutil.copytree(reference, project)
    for c in ckpts:
        shutil.copy(c.path, project / c.path.name)
    from indexer.sketch.embedding import Checkpoint
    inner = write_config(project, REF, [Checkpoint(project / c.path.name, c.lr) for c in ckpts], kind="sketch", dim=16)
    proc = _tracin("index", inner, "--out", project, "--force")
    assert proc.returncode == 2 and "contains" in proc.stderr, proc.stderr
    assert (project / "config.toml").is_file() and all((project / c.path.name).is_file() for c in ckpts)

    # an index directory with a file of the user's in it
    mixed = tmp_path / "mixed"
    shutil.copytree(reference, mixed)
    (mixed / "notes.txt").write_text("mine")
    proc = _tracin("index", config, "--out", mixed, "--force")
    assert proc.returncode == 2 and "notes.txt" in proc.stderr
    assert (mixed / "notes.txt").read_text() == "mine"

    # a file
    (tmp_path / "a-file").write_text("x")
    proc = _tracin("index", config, "--out", tmp_path / "a-file", "--force")
    assert proc.returncode == 2 and "is not a directory" in proc.stderr

    # an index directory of ours and an empty directory are replaced
    ours = tmp_path / "ours"
    shutil.copytree(reference, ours)
    (tmp_path / "empty").mkdir()
    for out in (ours, tmp_path / "empty"):
        proc = _tracin("index", config, "--out", out, "--force")
        assert proc.returncode == 0, proc.stderr
        IndexDirectory.open(out)


# -- 6. disk space --------------------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs mount (root only); yields a function mount(size) -> path."""
    mounts = []

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not root'}); the full-disk path is "
                        "covered only where mounting works")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_not_enough_disk_is_refused_before_starting(tmp_path, ckpts, tmpfs):
    small = tmpfs("256k")
    config = write_config(tmp_path, REF, ckpts, kind="exact", dim=16)
    proc = _tracin("index", config, "--out", small / "index")
    assert proc.returncode == 2, proc.stderr
    assert "this build needs about" in proc.stderr and "free" in proc.stderr and proc.stderr.count("\n") == 1
    assert list(small.iterdir()) == []


def test_a_disk_that_fills_up_while_writing_is_one_line_and_leaves_nothing(tmp_path, ckpts, tmpfs, monkeypatch):
    import shutil as shutil_module

    disk = tmpfs("64k")  # the estimate is made to pass: the writes then meet the real ENOSPC
    real = shutil_module.disk_usage
    monkeypatch.setattr("indexer.build.pipeline.shutil.disk_usage",
                        lambda p: real(p)._replace(free=1 << 40) if str(p).startswith(str(disk)) else real(p))
    config = load_config(write_config(tmp_path, REF, ckpts, kind="exact", dim=16))
    with pytest.raises(IndexBuildError, match="No space left on device while writing") as err:
        build_index(config, disk / "index")
    assert "\n" not in str(err.value)
    assert list(disk.iterdir()) == [], "a failed build leaves nothing behind"


class HugeEmbeddingTask(MLPTask):
    """Issue 8 item 10: exact mode on a 200,000 x 64 embedding table."""

    rows, width = 200_000, 64

    def build_model(self):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(self.rows, self.width), torch.nn.Flatten(),
                                   torch.nn.Linear(self.width, 3))

    def training_set(self):
        from indexer.task import ExampleSet

        g = torch.Generator().manual_seed(1)
        return ExampleSet(torch.randint(0, self.rows, (2000, 1), generator=g), torch.randint(0, 3, (2000,), generator=g))

    def held_out_set(self):
        return None


class LargeEmbeddingTask(HugeEmbeddingTask):
    """200,000 x 4: 800,000 numbers per example in exact mode (FAISS can hold them, the disk limit cannot)."""

    width = 4


def test_exact_mode_on_a_large_embedding_table_is_refused_with_the_figure(tmp_path):
    from indexer.checkpoints import save_checkpoint
    from indexer.sketch.embedding import Checkpoint

    path = save_checkpoint(tmp_path / "big.pt", HugeEmbeddingTask().build_model(), lr=0.1)
    config = write_config(tmp_path, "tests.test_trust_build:HugeEmbeddingTask", [Checkpoint(path, 0.1)], kind="exact",
                          layers=["0"], extra="max_disk_gb = 50")
    proc = _tracin("index", config, "--out", tmp_path / "index")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "2,000 examples x 12,800,000 numbers = 102.4 GB of float32 vectors" in proc.stderr, proc.stderr
    assert _leftovers(tmp_path) == [] and not (tmp_path / "index").exists()

    path = save_checkpoint(tmp_path / "large.pt", LargeEmbeddingTask().build_model(), lr=0.1)
    config = write_config(tmp_path, "tests.test_trust_build:LargeEmbeddingTask", [Checkpoint(path, 0.1)],
                          kind="exact", layers=["0"], extra="max_disk_gb = 5")
    proc = _tracin("index", config, "--out", tmp_path / "index")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "this build needs about 19.2 GB" in proc.stderr, proc.stderr
    assert "2,000 examples x 800,000 numbers" in proc.stderr and "resume state 12.8 GB" in proc.stderr
    assert "index.max_disk_gb = 5" in proc.stderr
    assert _leftovers(tmp_path) == [] and not (tmp_path / "index").exists()


# -- 2 / 8 / issue 8 item 10: figures validated at index time -------------------------------------------

def test_an_lr_that_overflows_the_index_is_refused_naming_the_checkpoint(tmp_path, ckpts):
    from indexer.sketch.embedding import Checkpoint
    from indexer.checkpoints import save_checkpoint

    huge = save_checkpoint(tmp_path / "huge.pt", MLPTask().build_model(), lr=1e300)
    config = write_config(tmp_path, REF, [ckpts[0], Checkpoint(huge, 1e300)], kind="exact")
    proc = _tracin("index", config, "--out", tmp_path / "index")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "checkpoints[1] (huge.pt, lr 1e+300)" in proc.stderr and "not finite" in proc.stderr
    assert not (tmp_path / "index").exists() and _leftovers(tmp_path) == []


def test_a_config_lr_that_disagrees_with_the_file_is_refused(tmp_path, ckpts):
    from indexer.sketch.embedding import Checkpoint

    config = load_config(write_config(tmp_path, REF, [Checkpoint(ckpts[0].path, ckpts[0].lr * 10)], kind="exact"))
    with pytest.raises(ConfigError, match=r"checkpoints\[0\].lr: 5.0 in the config but ckpt-0.pt records lr 0.5"):
        build_index(config, tmp_path / "index")


class MeanLossTask(MLPTask):
    def loss(self, outputs, labels):
        return torch.nn.functional.cross_entropy(outputs, labels)  # averaged: one number, not one per example


def test_a_loss_of_the_wrong_shape_is_one_line(tmp_path, ckpts):
    config = write_config(tmp_path, "tests.test_trust_build:MeanLossTask", ckpts, kind="exact")
    proc = _tracin("index", config, "--out", tmp_path / "index")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "task.loss must return one loss per example (shape [2]" in proc.stderr and "got []" in proc.stderr
    assert _leftovers(tmp_path) == []


def test_an_ivf_factory_with_more_lists_than_rows_fails_before_embedding(tmp_path, ckpts, monkeypatch):
    import indexer.build.pipeline as pipeline

    def never(*a, **k):
        raise AssertionError("no embedding work may start")

    monkeypatch.setattr(pipeline, "CheckpointEmbedder", never)
    config = load_config(write_config(tmp_path, REF, ckpts, kind="sketch", dim=16, factory="IVF64,Flat"))
    with pytest.raises(ConfigError, match="has 64 lists but only 40 vectors to train on"):
        build_index(config, tmp_path / "index")
    config = load_config(write_config(tmp_path, REF, ckpts, kind="sketch", dim=16, factory="PQ4"))
    with pytest.raises(ConfigError, match="256 PQ centroids"):
        build_index(config, tmp_path / "index")
    assert _leftovers(tmp_path) == []


def test_task_reference_must_name_a_task_subclass(tmp_path, ckpts):
    marker = tmp_path / "marker"
    for ref, args in (("os:system", f'{{ command = "touch {marker}" }}'), ("tests.tasks:VectorExample", "{}")):
        text = write_config(tmp_path, REF, ckpts).read_text().replace(f'task = "{REF}"',
                                                                       f'task = "{ref}"\ntask_args = {args}')
        (tmp_path / "config.toml").write_text(text)
        proc = _tracin("index", tmp_path / "config.toml", "--out", tmp_path / "index")
        assert proc.returncode == 2 and "not an indexer.Task subclass" in proc.stderr, proc.stderr
    assert not marker.exists()


# -- 7. a served directory is never rewritten in place ------------------------------------------------------

def test_mmap_server_survives_a_rebuild_of_its_directory(tmp_path, ckpts):
    config = write_config(tmp_path, REF, ckpts, kind="exact", batch_size=5)
    out = tmp_path / "index"
    build_index(load_config(config), out)
    server = start_server(out, env={"TRACIN_MMAP": "true"})
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            body = {"train_id": "ex3", "k": 5}
            before = client.post("/influence", json=body).json()
            old_inode = (out / "index.faiss").stat().st_ino
            rebuilt = write_config(tmp_path, REF, list(reversed(ckpts)), kind="exact", batch_size=5)
            build_index(load_config(rebuilt), out, overwrite=True)  # tracin index --force into the same --out
            assert (out / "index.faiss").stat().st_ino != old_inode, "a new file, not the old one rewritten"
            maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
            assert "index.faiss (deleted)" in maps, "the server still maps the old, unlinked file"
            for _ in range(3):
                after = client.post("/influence", json=body)
                assert after.status_code == 200 and after.json()["proponents"] == before["proponents"]
            assert server.proc.poll() is None
    finally:
        server.stop()
    assert server.proc.returncode in (0, -signal.SIGTERM), server.output()[-2000:]
