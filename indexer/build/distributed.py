"""Distributed indexing on Ray: one Ray task per shard (`pipeline.build_shard`), then `merge_shards`.

    tracin index CONFIG --out /shared/idx --ray auto --shards 8     # a running cluster (`ray start --head`)
    tracin index CONFIG --out DIR --ray                              # a local cluster on this machine

`build_with_ray` is the `tracin index --shard I/N` + `--merge N` pair run by Ray instead of a job array:
each task embeds one contiguous range of examples with its own lock and per-checkpoint resume state, and
the driver merges the finished shards into the index directory. Nothing here re-implements a build step.

What every worker must see (shared storage, e.g. NFS, at the same path on every node): the directory
holding `out` (the shards are written to `<out>.shards/` beside it, and the merge reads them from
there), the config file, the checkpoint files and whatever the task reads (its training set). The
driver writes a marker file into `<out>.shards/` and every task checks it sees that file and every
checkpoint before it starts: a worker on storage of its own is refused in one line naming the shard and
the node, instead of writing shards the driver never sees.

What every worker must be able to import: `indexer` (tracin-service installed in the workers' Python)
and the config's task module. On a cluster whose nodes are all this machine (the local cluster started
here, or `--ray auto` on a `ray start --head` of this host) the tasks get the driver's import path as
PYTHONPATH. On a multi-node cluster install the same code on every node (same paths, or a package), or
pass a `runtime_env` (e.g. ``{"working_dir": ".", "env_vars": {"PYTHONPATH": "."}}``) that Ray ships to
the workers.

Failures. A killed task (SIGKILL, out of memory, a lost node) is retried by Ray up to `max_retries`
times; the retry resumes from the last checkpoint its shard had committed. A transient I/O error
(`OSError` with errno EIO, ESTALE, ETIMEDOUT, ...: a network file system hiccup) is retried the same
way. Anything else, a `ConfigError` first of all, is not retried: the build stops (the other tasks are
cancelled; their resume state stays for the next run) and raises one line naming the shard.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from indexer.checkpoints import CheckpointError
from indexer.config import ConfigError, IndexConfig
from indexer.build.pipeline import BuildResult, build_shard, merge_shards, shard_dir
from indexer.store.resume import say
from indexer.store.directory import IndexBuildError

RAY_MISSING = "--ray needs Ray, which is not installed here: pip install 'tracin-service[ray]'"

#: errno values of an OSError that a retry may cure (network file systems, interrupted calls)
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR,
                              errno.ECONNRESET, errno.ECONNABORTED, errno.ENETDOWN, errno.ENETUNREACH,
                              errno.EHOSTUNREACH, errno.ENOLCK})


class ShardError(RuntimeError):
    """A shard task failed for a reason a retry cannot cure. `kind`: "config" (ConfigError, CheckpointError,
    FileExistsError), "build" (IndexBuildError) or "error" (anything else). Never retried by Ray."""

    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message, kind)

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def kind(self) -> str:
        return str(self.args[1])


class TransientShardError(RuntimeError):
    """A shard task failed on an I/O error that may pass (see TRANSIENT_ERRNOS): Ray retries it."""


@dataclass
class RayBuildResult(BuildResult):
    """`merge_shards`' result plus one report per shard task (its last, successful attempt): shard, rows,
    batches_embedded (by that attempt), batches_total, resumed_from (resume states it found), seconds,
    node, pid."""

    shards: list[dict[str, Any]] = field(default_factory=list)
    embed_wall_seconds: float = 0.0  # from the first task submitted to the last shard finished
    merge_seconds: float = 0.0  # `seconds` is the whole call: connecting, the tasks, the merge


def build_with_ray(config: IndexConfig, out: str | Path, shards: int | None = None, address: str | None = None,
                   overwrite: bool = False, max_retries: int = 3, gpus_per_task: float | None = None,
                   cpus_per_task: float = 1, runtime_env: dict[str, Any] | None = None,
                   env_vars: dict[str, str] | None = None,
                   log: Callable[[str], None] | None = say) -> RayBuildResult:
    """Build the index directory `out` with one Ray task per shard, then merge the shards.

    Connects to Ray: an already initialised Ray is reused; else `ray.init(address=address)`
    (`"auto"`, `"ray://host:10001"`, a GCS address), or a local cluster on this machine when `address`
    is None (shut down again at the end). Runs `shards` tasks (default: the cluster's GPUs when tasks
    use GPUs, else its CPUs // `cpus_per_task`), task i calling `build_shard(config, out, i, shards)`
    with `num_cpus=cpus_per_task` (and as many torch threads) and `num_gpus=gpus_per_task`. GPUs are
    used (1 per task) when `gpus_per_task` is None, `config.index.device` is "cuda" and the cluster has
    GPUs; Ray then gives each task its own GPU as "cuda". Then `merge_shards` on the driver (or, when the
    driver has no CUDA for a "cuda" config, in one more Ray task on a GPU).

    Written: `<out>.shards/shard-<i>-of-<n>/` per task (vectors.npy float32 [rows_i, D], self_influence.npy
    float64 [rows_i], review.npy, shard.json), each with its lock `.shard-...lock` and, while it runs, its
    resume state `shard-...partial-<hash>/state-<c>/`; then `out` itself, the same index directory (same
    vectors, ids, self-influence, label review) as `build_index(config, out)`, and `<out>.shards/` is
    removed. `<out>.shards/`, the config, the checkpoints and the task's data must be on storage that
    every worker sees at the same path (checked by each task, see the module docstring).

    Raises ConfigError (bad input in any shard, Ray not installed, no GPU for a "cuda" config, a worker
    that cannot see the shared files: one line naming the shard), FileExistsError (`out` exists and not
    `overwrite`), IndexBuildError (a shard whose worker died more than `max_retries` times, a lock held,
    a full disk: one line naming the shard; its resume state is kept, so running again resumes it).
    `runtime_env` is passed to every task (multi-node clusters: how the workers get the code);
    `env_vars` are extra environment variables of the tasks. `log` gets one line per event (None: silent)."""
    ray = _import_ray()
    started = time.perf_counter()
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (use --force to replace it)")
    if shards is not None and shards < 1:
        raise ConfigError(f"--shards: must be at least 1, got {shards}")
    if cpus_per_task <= 0:
        raise ConfigError(f"cpus_per_task: must be > 0, got {cpus_per_task}")
    device = config.index.device
    if device.startswith("cuda:"):
        raise ConfigError(f"index.device: {device!r} names one GPU, but under --ray every shard task is given a GPU "
                          "of its own: use device = \"cuda\"")
    emit = log or (lambda _line: None)
    started_ray = _connect(ray, address)
    try:
        resources = ray.cluster_resources()
        cluster_gpus, cluster_cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        if gpus_per_task is None:
            gpus_per_task = 1 if device == "cuda" and cluster_gpus > 0 else 0
        if device == "cuda" and gpus_per_task <= 0:
            raise ConfigError("index.device: \"cuda\" but the Ray cluster has no GPU (resources: "
                              f"{cluster_cpus} CPU); use device = \"cpu\" or add GPU nodes")
        if shards is None:
            shards = cluster_gpus // max(1, int(gpus_per_task)) if gpus_per_task else \
                int(cluster_cpus // cpus_per_task)
            shards = max(1, shards)
        env = _task_runtime_env(ray, runtime_env, env_vars)
        where = address or ("this Ray session" if not started_ray else "a local Ray cluster")
        emit(f"ray: {shards} shard tasks on {where} ({cluster_cpus} CPU, {cluster_gpus} GPU; per task "
             f"{cpus_per_task:g} CPU" + (f", {gpus_per_task:g} GPU" if gpus_per_task else "") + ")")
        shards_root = shard_dir(out, 0, shards).parent
        shards_root.mkdir(parents=True, exist_ok=True)
        marker = shards_root / f".ray-driver-{secrets.token_hex(8)}"
        marker.write_text(f"{socket.gethostname()} {os.getpid()}\n")
        try:
            reports, wall = _run_shards(ray, config, out, shards, marker, max_retries, cpus_per_task,
                                        gpus_per_task, env, emit)
        finally:
            marker.unlink(missing_ok=True)
        emit(f"ray: merging {shards} shards into {out}")
        result = _merge(ray, config, out, shards, overwrite, env, gpus_per_task)
    finally:
        if started_ray:
            ray.shutdown()
    base = {f.name: getattr(result, f.name) for f in fields(BuildResult)}
    base["seconds"] = time.perf_counter() - started
    return RayBuildResult(**base, shards=reports, embed_wall_seconds=wall, merge_seconds=result.seconds)


def update_with_ray(config: IndexConfig, out: str | Path, shards: int | None = None, address: str | None = None,
                    remove_ids: str | Path | None = None, keep_versions: int | None = None, max_retries: int = 3,
                    cpus_per_task: float = 1, runtime_env: dict[str, Any] | None = None,
                    env_vars: dict[str, str] | None = None, log: Callable[[str], None] | None = say):
    """`tracin index CONFIG --out DIR --update --ray`: the update shards (`indexer.build.update.update_shard`: the
    stored rows at the new checkpoints and the new rows at every checkpoint, split into `shards` ranges) as Ray
    tasks, then `merge_update` on the driver, which writes the new version and switches DIR to it. Connection,
    retries, shared storage and failures as in `build_with_ray` (CPU tasks). Returns the `UpdateResult`."""
    from indexer.build.update import merge_update

    ray = _import_ray()
    out = Path(out).resolve()
    if not out.is_dir():
        raise ConfigError(f"--update: {out} is not an index directory (build it first: tracin index CONFIG --out {out})")
    if shards is not None and shards < 1:
        raise ConfigError(f"--shards: must be at least 1, got {shards}")
    if config.index.device.startswith("cuda"):
        raise ConfigError("--update --ray runs its shards on CPUs: use device = \"cpu\" (or update without --ray)")
    emit = log or (lambda _line: None)
    started_ray = _connect(ray, address)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        shards = shards or max(1, int(cpus // cpus_per_task))
        env = _task_runtime_env(ray, runtime_env, env_vars)
        emit(f"ray: {shards} update shard tasks ({cpus} CPU)")
        shards_root = shard_dir(out, 0, shards).parent
        shards_root.mkdir(parents=True, exist_ok=True)
        marker = shards_root / f".ray-driver-{secrets.token_hex(8)}"
        marker.write_text(f"{socket.gethostname()} {os.getpid()}\n")
        try:
            _run_shards(ray, config, out, shards, marker, max_retries, cpus_per_task, 0, env, emit, update=True)
        finally:
            marker.unlink(missing_ok=True)
        emit(f"ray: merging {shards} update shards into a new version of {out}")
        return merge_update(config, out, shards, remove_ids=remove_ids, keep_versions=keep_versions)
    finally:
        if started_ray:
            ray.shutdown()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Reuse an initialised Ray, or connect / start one; True when this call started it."""
    if ray.is_initialized():
        return False
    try:
        if address is None:
            ray.init(include_dashboard=False, configure_logging=False)
        else:
            ray.init(address=address, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--ray {address or ''}: cannot connect to Ray: {text[:300]}".replace(" :", ":")) from None
    return True


def _driver_import_path() -> list[str]:
    """The driver's import path less the interpreter's own directories (the workers have those)."""
    system = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    paths = []
    for entry in sys.path:
        path = Path(entry or os.getcwd()).resolve()
        if not path.is_dir() or any(path == s or s in path.parents for s in system):
            continue
        if str(path) not in paths:
            paths.append(str(path))
    return paths


def _single_host(ray) -> bool:
    """Every alive node of the cluster is this machine (its workers see the driver's files and paths)."""
    try:
        here = ray.util.get_node_ip_address()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    except Exception:  # noqa: BLE001 - an old or remote-client Ray: assume nodes of their own
        return False
    return bool(nodes) and all(n.get("NodeManagerAddress") == here for n in nodes)


def _task_runtime_env(ray, runtime_env: dict[str, Any] | None, env_vars: dict[str, str] | None) -> dict[str, Any]:
    env = dict(runtime_env or {})
    variables = dict(env.get("env_vars") or {})
    if _single_host(ray) and "PYTHONPATH" not in variables:
        paths = _driver_import_path() + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        variables["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    variables.update(env_vars or {})
    if variables:
        env["env_vars"] = {str(k): str(v) for k, v in variables.items()}
    return env


def _run_shards(ray, config: IndexConfig, out: Path, shards: int, marker: Path, max_retries: int,
                cpus: float, gpus: float, env: dict[str, Any], emit: Callable[[str], None], update: bool = False):
    remote = ray.remote(_shard_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries,
                                             retry_exceptions=[TransientShardError], runtime_env=env or None)
    threads = max(1, int(cpus))
    started = time.perf_counter()
    refs = {remote.remote(config, str(out), i, shards, str(marker), threads, update): i for i in range(shards)}
    reports: list[dict[str, Any]] = [{} for _ in range(shards)]
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            shard = refs[done[0]]
            try:
                report = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - every Ray failure becomes one line naming the shard
                _cancel(ray, pending)
                raise _shard_failure(ray, exc, out, shard, shards, max_retries) from None
            reports[shard] = report
            finished = shards - len(pending)
            resumed = f", resumed after checkpoint {report['resumed_from'][-1][-4:].lstrip('0') or '0'}" \
                if report["resumed_from"] else ""
            emit(f"ray: shard {shard}/{shards} done ({finished}/{shards} shards): {report['rows']} rows in "
                 f"{report['seconds']:.1f}s on {report['node']}{resumed}")
    except KeyboardInterrupt:
        _cancel(ray, pending)  # the tasks stop as interrupted builds: their resume state stays
        raise
    return reports, time.perf_counter() - started


def _cancel(ray, refs: list) -> None:
    for ref in refs:
        try:
            ray.cancel(ref)
        except Exception:  # noqa: BLE001, S110 - already finished or gone: nothing to stop
            pass


def _shard_failure(ray, exc: BaseException, out: Path, shard: int, shards: int, retries: int) -> Exception:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ShardError):
        return ConfigError(str(cause)) if cause.kind == "config" else IndexBuildError(str(cause))
    if isinstance(cause, TransientShardError):
        return IndexBuildError(f"{cause} (still failing after {retries} retries)")
    directory = shard_dir(out, shard, shards)
    if isinstance(exc, ray.exceptions.RayTaskError) and cause is not None:
        return IndexBuildError(f"shard {shard}/{shards}: {type(cause).__name__}: {_first_line(cause)}")
    return IndexBuildError(f"shard {shard}/{shards}: its Ray task failed {retries + 1} times "
                           f"({type(exc).__name__}: {_first_line(exc)}); the checkpoints it finished are kept "
                           f"in {directory.name}.partial-*: run the same command again to resume")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:300]


def _shard_task(config: IndexConfig, out: str, shard: int, shards: int, marker: str, threads: int,
                update: bool = False) -> dict[str, Any]:
    """The Ray task of one shard: check the shared files are visible here, then `build_shard` (or, `update`,
    `indexer.build.update.update_shard`)."""
    import torch

    from indexer.build.update import update_shard

    node = socket.gethostname()
    where = f"shard {shard}/{shards} (on {node})"
    torch.set_num_threads(threads)
    _check_visible(config, Path(out), Path(marker), where)
    final = shard_dir(Path(out), shard, shards)
    pattern = f"update-*/{final.name}.partial-*/state-*" if update else f"{final.name}.partial-*/state-*"
    resumed = sorted(p.name for p in final.parent.glob(pattern) if p.is_dir() and not p.name.endswith(".tmp"))
    batches = {"done": 0, "total": 0}

    def progress(done: int, total: int) -> None:
        batches["done"] += 1
        batches["total"] = total

    started = time.perf_counter()
    try:
        path = (update_shard if update else build_shard)(config, out, shard, shards, progress=progress)
    except (ConfigError, CheckpointError, FileExistsError) as exc:
        raise ShardError(f"shard {shard}/{shards}: {exc}", "config") from None
    except IndexBuildError as exc:
        raise ShardError(f"shard {shard}/{shards}: {exc}", "build") from None
    except OSError as exc:
        if exc.errno in TRANSIENT_ERRNOS:
            raise TransientShardError(f"{where}: {exc}") from None
        raise ShardError(f"{where}: {type(exc).__name__}: {_first_line(exc)}", "build") from None
    except Exception as exc:  # noqa: BLE001 - the user's task code, or a bug: one line, not retried
        raise ShardError(f"{where}: {type(exc).__name__}: {_first_line(exc)}") from None
    info = json.loads((path / "shard.json").read_text())
    rows = sum(p["stop"] - p["start"] for p in info["pieces"]) if update else info["stop"] - info["start"]
    return {"shard": shard, "rows": rows, "batches_embedded": batches["done"],
            "batches_total": batches["total"], "resumed_from": resumed,
            "seconds": time.perf_counter() - started, "node": node, "pid": os.getpid()}


def _check_visible(config: IndexConfig, out: Path, marker: Path, where: str) -> None:
    """Refuse (ShardError "config") when this worker cannot see the driver's shard directory, the config or
    a checkpoint: they must be on storage every worker sees at the same path."""
    shared = "must be on storage that every Ray worker sees at the same path"
    if not marker.is_file():
        raise ShardError(f"{where}: cannot see {marker.parent} as the driver wrote it (no {marker.name}); "
                         f"<out>.shards/ {shared}", "config")
    if config.source is not None and not Path(config.source).is_file():
        raise ShardError(f"{where}: cannot see the config {config.source}; it {shared}", "config")
    for i, spec in enumerate(config.checkpoints):
        if not Path(spec.path).exists():
            raise ShardError(f"{where}: checkpoints[{i}]: cannot see {spec.path}; checkpoints {shared}", "config")


def _merge_task(config: IndexConfig, out: str, shards: int, overwrite: bool) -> BuildResult:
    try:
        return merge_shards(config, out, shards, overwrite=overwrite)
    except (ConfigError, CheckpointError, FileExistsError) as exc:
        raise ShardError(f"merge: {exc}", "config") from None
    except IndexBuildError as exc:
        raise ShardError(f"merge: {exc}", "build") from None


def _merge(ray, config: IndexConfig, out: Path, shards: int, overwrite: bool, env: dict[str, Any],
           gpus: float) -> BuildResult:
    """`merge_shards` on the driver; in a Ray task on a GPU when the config needs CUDA the driver lacks
    (merge_shards validates the config, which loads the model on `index.device`)."""
    import torch

    if not config.index.device.startswith("cuda") or torch.cuda.is_available():
        return merge_shards(config, out, shards, overwrite=overwrite)
    remote = ray.remote(_merge_task).options(num_cpus=1, num_gpus=max(1, gpus), max_retries=0,
                                             runtime_env=env or None)
    try:
        return ray.get(remote.remote(config, str(out), shards, overwrite))
    except Exception as exc:  # noqa: BLE001
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ShardError):
            raise (ConfigError(str(cause)) if cause.kind == "config" else IndexBuildError(str(cause))) from None
        raise IndexBuildError(f"merge: {type(exc).__name__}: {_first_line(cause or exc)}") from None
