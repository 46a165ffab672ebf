"""What keeps a build honest on disk: the output lock, resumable state, vector files, disk figures.

Resume state. After checkpoint c the accumulated state is one directory, committed by one rename:

    <parent>/.<name>.partial-<config hash>/state-<c>/
        vectors.npy          float32 [rows, D]: the embedding accumulated over checkpoints 0..c
        self_influence.npy   float64 [rows]: sum over checkpoints 0..c
        review.npy           float64 [rows, F]: per-example label-review numbers of checkpoints 0..c
                             (`indexer.build.review.ReviewAccumulator`; any `extras` a build names)
        state.json           config hash, checkpoint c, rows, dim, sha256 of every file (written last)

It is written as ``state-<c>.tmp`` and renamed to ``state-<c>``; the previous state is removed only
after that rename. A resumed build takes the newest ``state-<c>`` that verifies (config hash, shapes,
digests); anything else there (a ``.tmp`` of a killed run, a damaged state) is removed with one printed
line, and the build restarts from the last good state (or from the beginning).

Vectors are written with plain file writes (`RowFile`: pread/pwrite of row blocks into a file whose
blocks were allocated by writing zeros), never through a writable memory map, so a full disk is an
`OSError` (ENOSPC) instead of a SIGBUS.

`TRACIN_TEST_KILL_AT=<step>[:<n>]` (tests only) SIGKILLs the process the n-th time (default first) a
build reaches `<step>`; the steps are listed in KILL_STEPS. With `TRACIN_TEST_KILL_ONCE_FILE=<path>` as
well, the kill fires only in the one process that creates `<path>` (it holds that pid): of several
processes (shard tasks, and a task's retries) given the same environment, exactly one is killed.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

from indexer.checkpoints import sha256_file
from indexer.store.directory import fsync_path

KILL_ENV = "TRACIN_TEST_KILL_AT"
KILL_ONCE_ENV = "TRACIN_TEST_KILL_ONCE_FILE"
KILL_STEPS = ("prepared", "state-started", "batch", "checkpoint-embedded", "state-written", "state-committed",
              "index-staged", "manifest-written", "index-committed")
_kill_counts: dict[str, int] = {}

STATE_FORMAT = "tracin-resume/1"
VECTORS = "vectors.npy"
SELF_INFLUENCE = "self_influence.npy"
STATE_JSON = "state.json"


def kill_point(step: str) -> None:
    """Test hook: SIGKILL this process at `step` when TRACIN_TEST_KILL_AT names it."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != step:
        return
    _kill_counts[step] = _kill_counts.get(step, 0) + 1
    if _kill_counts[step] == int(nth or 1):
        once = os.environ.get(KILL_ONCE_ENV)
        if once:
            try:
                fd = os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return  # another process (or an earlier attempt) was killed already
            os.write(fd, f"{os.getpid()}\n".encode())
            os.close(fd)
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def say(message: str) -> None:
    """One line for the person running the build (stderr, so stdout keeps the result line)."""
    print(f"tracin index: {message}", file=sys.stderr, flush=True)


# -- the output lock -------------------------------------------------------------------------------

class OutputLock:
    """An exclusive `fcntl.flock` on `lock_path` (e.g. `.<name>.lock` beside the output), holding the
    owner's pid. A second holder is refused at once with IndexBuildError naming the pid. The file is
    removed on release; a killed holder's file stays, but the kernel released its lock."""

    def __init__(self, lock_path: Path, what: Path):
        self.path, self.what, self.fd = Path(lock_path), what, None

    def __enter__(self) -> "OutputLock":
        from indexer.store.directory import IndexBuildError

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise IndexBuildError(f"another build (pid {holder}) is writing {self.what} (lock {self.path}); "
                                      "wait for it to finish or stop it") from None
            try:  # the previous holder may have unlinked the file between our open and flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds without the pid
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


# -- vector files written without writable memory maps -------------------------------------------

class RowFile:
    """A float32 [rows, dim] `.npy` file read and written by row blocks with pread/pwrite.

    `create` allocates every block by writing zeros (no sparse file), so writes never need new space
    later on ordinary filesystems; a full disk shows as OSError(ENOSPC) from `create` or `write`."""

    def __init__(self, path: Path, rows: int, dim: int, offset: int):
        self.path, self.rows, self.dim, self.offset = Path(path), rows, dim, offset
        self.fd = os.open(self.path, os.O_RDWR)

    @classmethod
    def create(cls, path: Path, rows: int, dim: int, chunk_bytes: int = 16 << 20) -> "RowFile":
        header = _npy_header(rows, dim)
        with open(path, "wb") as handle:
            handle.write(header)
            left = rows * dim * 4
            zeros = bytes(min(chunk_bytes, max(left, 1)))
            while left > 0:
                n = min(left, len(zeros))
                handle.write(zeros[:n])
                left -= n
        return cls(path, rows, dim, len(header))

    @classmethod
    def copy(cls, source: Path, path: Path, rows: int, dim: int) -> "RowFile":
        """A copy of `source` (a RowFile of the same shape) at `path`."""
        with open(source, "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        return cls.open(path, rows, dim)

    @classmethod
    def open(cls, path: Path, rows: int, dim: int) -> "RowFile":
        header = _npy_header(rows, dim)
        with open(path, "rb") as handle:
            if handle.read(len(header)) != header:
                raise ValueError(f"{path} is not a float32 [{rows}, {dim}] array")
        if os.path.getsize(path) != len(header) + rows * dim * 4:
            raise ValueError(f"{path} has the wrong size")
        return cls(path, rows, dim, len(header))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop as a writable float32 [stop - start, dim] array."""
        size = (stop - start) * self.dim * 4
        data = os.pread(self.fd, size, self.offset + start * self.dim * 4)
        if len(data) != size:
            raise OSError(errno.EIO, f"short read from {self.path}")
        return np.frombuffer(bytearray(data), dtype=np.float32).reshape(stop - start, self.dim)

    def write(self, start: int, block: np.ndarray) -> None:
        """Write float32 rows [b, dim] at row `start`."""
        data = np.ascontiguousarray(block, dtype=np.float32).tobytes()
        position = self.offset + start * self.dim * 4
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, position)
            view, position = view[written:], position + written

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _npy_header(rows: int, dim: int) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})
    return buffer.getvalue()


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save through an ordinary file write, fsynced."""
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())


# -- resumable state ---------------------------------------------------------------------------------

class ResumeState:
    """The resume directory of one build (see the module docstring). `rows` = (start, stop)."""

    def __init__(self, work: Path, config_hash: str, rows: tuple[int, int], dim: int, checkpoints: int,
                 extras: tuple[str, ...] = ()):
        self.work, self.config_hash, self.rows = Path(work), config_hash, rows
        self.dim, self.checkpoints = dim, checkpoints
        self.count = rows[1] - rows[0]
        self.extras = tuple(extras)  # names of further float64 [rows, ...] arrays every state holds
        self.loaded: dict[str, np.ndarray] = {}  # those arrays of the state `load` resumed from

    def state_dir(self, c: int) -> Path:
        return self.work / f"state-{c:04d}"

    def load(self) -> tuple[int, np.ndarray | None]:
        """(last finished checkpoint, its self-influence) from the newest state that verifies, else
        (-1, None). Removes everything else in the directory, saying so in one line when it was not a
        mere older state."""
        self.work.mkdir(parents=True, exist_ok=True)
        entries = sorted(self.work.iterdir(), key=lambda p: p.name, reverse=True)
        found: tuple[int, np.ndarray] | None = None
        for entry in entries:
            c = _state_index(entry.name)
            if found is not None:
                _remove(entry)  # older than the state in use (or foreign): not needed any more
                continue
            if c is None or entry.name.endswith(".tmp"):
                say(f"removed an unfinished resume step {entry.name} in {self.work.name} (a build was "
                    "interrupted while writing it)")
                _remove(entry)
                continue
            problem = self._verify(entry, c)
            if problem is None:
                found = (c, np.load(entry / SELF_INFLUENCE, allow_pickle=False))
                self.loaded = {name: np.load(entry / f"{name}.npy", allow_pickle=False) for name in self.extras}
            else:
                say(f"resume state {entry.name} in {self.work.name} is damaged ({problem}); removed it, restarting "
                    "from the previous good state")
                _remove(entry)
        if found is None:
            return -1, None
        say(f"resuming: checkpoints 0..{found[0]} of {self.checkpoints} were already embedded ({self.work.name})")
        return found

    def _verify(self, directory: Path, c: int) -> str | None:
        try:
            info = json.loads((directory / STATE_JSON).read_text())
        except (OSError, ValueError) as exc:
            return f"{STATE_JSON}: {exc.__class__.__name__}"
        if not isinstance(info, dict) or info.get("format") != STATE_FORMAT:
            return f"{STATE_JSON} is not a resume state"
        expected = {"config_hash": self.config_hash, "checkpoint": c, "rows": list(self.rows), "dim": self.dim}
        for key, value in expected.items():
            if info.get(key) != value:
                return f"{key} is {info.get(key)!r}, expected {value!r}"
        for name, key in ((VECTORS, "vectors_sha256"), (SELF_INFLUENCE, "self_influence_sha256")):
            file = directory / name
            if not file.is_file():
                return f"{name} is missing"
            if sha256_file(file) != info.get(key):
                return f"{name} does not match its sha256"
        extras = info.get("extras_sha256")
        if sorted(extras or {}) != sorted(self.extras):
            return f"it holds {sorted(extras or {})}, this build keeps {sorted(self.extras)}"
        for name in self.extras:
            file = directory / f"{name}.npy"
            if not file.is_file():
                return f"{file.name} is missing"
            if sha256_file(file) != extras.get(name):
                return f"{file.name} does not match its sha256"
            try:
                array = np.load(file, allow_pickle=False)
            except (OSError, ValueError) as exc:
                return f"{file.name}: {exc}"
            if array.dtype != np.float64 or array.shape[:1] != (self.count,):
                return f"{file.name} has shape {array.shape} {array.dtype}"
        try:
            RowFile.open(directory / VECTORS, self.count, self.dim).close()
            si = np.load(directory / SELF_INFLUENCE, allow_pickle=False)
        except (OSError, ValueError) as exc:
            return str(exc)
        if si.shape != (self.count,) or si.dtype != np.float64:
            return f"{SELF_INFLUENCE} has shape {si.shape} {si.dtype}"
        return None

    def begin(self, c: int) -> RowFile:
        """`state-<c>.tmp` with the vectors of state c-1 (or zeros): the file checkpoint c writes into."""
        tmp = self.work / f"state-{c:04d}.tmp"
        _remove(tmp)
        tmp.mkdir(parents=True)
        previous = self.state_dir(c - 1)
        if c > 0 and previous.is_dir():
            return RowFile.copy(previous / VECTORS, tmp / VECTORS, self.count, self.dim)
        return RowFile.create(tmp / VECTORS, self.count, self.dim)

    def commit(self, c: int, vectors: RowFile, self_influence: np.ndarray,
               extras: dict[str, np.ndarray] | None = None) -> Path:
        """Write self-influence, the `extras` arrays (one per name the state keeps) and state.json into
        `state-<c>.tmp`, rename it to `state-<c>` (the one commit of checkpoint c), then remove the previous
        state."""
        tmp = self.work / f"state-{c:04d}.tmp"
        extras = dict(extras or {})
        if sorted(extras) != sorted(self.extras):
            raise ValueError(f"resume state: got arrays {sorted(extras)}, expected {sorted(self.extras)}")
        vectors.sync()
        vectors.close()
        save_npy(tmp / SELF_INFLUENCE, self_influence)
        for name, array in extras.items():
            save_npy(tmp / f"{name}.npy", np.asarray(array, dtype=np.float64))
        info = {"format": STATE_FORMAT, "config_hash": self.config_hash, "checkpoint": c, "rows": list(self.rows),
                "dim": self.dim, "vectors_sha256": sha256_file(tmp / VECTORS),
                "self_influence_sha256": sha256_file(tmp / SELF_INFLUENCE),
                "extras_sha256": {name: sha256_file(tmp / f"{name}.npy") for name in sorted(extras)}}
        with open(tmp / STATE_JSON, "w") as handle:
            json.dump(info, handle)
            handle.flush()
            os.fsync(handle.fileno())
        kill_point("state-written")
        final = self.state_dir(c)
        _remove(final)
        os.replace(tmp, final)
        fsync_path(self.work)
        kill_point("state-committed")
        for entry in self.work.iterdir():
            if entry != final:
                _remove(entry)
        return final

    def vectors_file(self, c: int) -> Path:
        return self.state_dir(c) / VECTORS


def _state_index(name: str) -> int | None:
    stem = name[:-4] if name.endswith(".tmp") else name
    if stem.startswith("state-") and stem[6:].isdigit():
        return int(stem[6:])
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        try:
            path.unlink()
        except OSError:
            pass


# -- disk ----------------------------------------------------------------------------------------------

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DISK_MESSAGES = ("No space left on device", "Disk quota exceeded", "File too large")


def disk_error(exc: BaseException) -> str | None:
    """The reason when `exc` (an OSError, or a FAISS / torch writer's RuntimeError) is a full disk."""
    for current in (exc, exc.__cause__, exc.__context__):
        if isinstance(current, OSError) and current.errno in DISK_ERRNOS:
            return os.strerror(current.errno)
        if isinstance(current, (OSError, RuntimeError)):
            text = str(current)
            for message in DISK_MESSAGES:
                if message in text:
                    return message
    return None


def gb(n: float) -> str:
    """Bytes for people: GB, MB or kB (powers of 1000)."""
    if n >= 1e8:
        return f"{n / 1e9:,.1f} GB"
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"
