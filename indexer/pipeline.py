"""Build an index directory: checkpoints in the outer loop (each loaded once), batches inside.

Vectors stream into a float32 memory map [N, D] column block by column block, so memory stays at one
model + one batch (+ the FAISS index itself at the end). Progress is saved after every checkpoint: an
interrupted build resumes from the last finished checkpoint when run again with the same config.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import torch

from indexer.checkpoints import load_checkpoint, load_state_into, sha256_file
from indexer.config import ConfigError, IndexConfig
from indexer.capture import SUM_CHECK_EVERY
from indexer.embedding import Checkpoint, CheckpointEmbedder, ProjectionPlan, plan_embedding, resolve_checkpoints
from indexer.search import build_faiss_index, is_approximate
from indexer.store import (
    CHECKPOINT_DIR, EXAMPLES_FILE, INDEX_FILE, MANIFEST, QUERIES_FILE, SCHEMA_VERSION, SELF_INFLUENCE_FILE,
    StagingDirectory, file_hashes, library_versions, write_jsonl,
)
from indexer.selfcheck import SelfCheckReport, check_query_path, self_check
from indexer.task import ExampleSet, Task, infer_label_kind, label_width

PROGRESS_FILE = "progress.json"


@dataclass
class BuildResult:
    path: Path
    count: int
    dim: int
    seconds: float
    embed_seconds: float


def _config_hash(config: IndexConfig, digests: list[str]) -> str:
    data = config.to_json()
    data["checkpoint_sha256"] = digests
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Prepared:
    """A validated build: everything that can fail on a bad config or model, checked before any file is written."""

    task: Task
    checkpoints: list[Checkpoint]
    plan: ProjectionPlan
    examples: ExampleSet
    label_width: int
    check: SelfCheckReport


def prepare(config: IndexConfig, log: Callable[[str], None] | None = None, strict: bool = True) -> Prepared:
    """Load the task, checkpoints and training set; calibrate the capture routes; run the self-check and
    the service's query path once. Raises ConfigError (one line) on anything that would give a wrong
    number or an index that cannot be served (with `strict=False` a failed self-check is only reported)."""
    from indexer.checkpoints import CheckpointError

    task = config.task.build()
    try:
        checkpoints = resolve_checkpoints([(c.path, c.lr) for c in config.checkpoints])
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    model = task.build_model()
    for i, ckpt in enumerate(checkpoints):
        try:
            state, _ = load_checkpoint(ckpt.path)
            load_state_into(model, state, f"checkpoints[{i}] ({ckpt.path.name})")
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
    if config.index.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"index.device: {config.index.device!r} requested but CUDA is not available")
    examples = task.training_set()
    if len(examples) == 0:
        raise ConfigError("task: training_set() is empty")
    try:
        task.label_kind = infer_label_kind(task, examples.labels)
    except ValueError as exc:
        raise ConfigError(f"task: {exc}") from None
    plan = plan_embedding(task, checkpoints, config.layers, config.projection.kind, config.projection.dim,
                          config.projection.seed, examples.batch(0, min(len(examples), 3)),
                          config.index.compute_dtype, config.index.device)
    try:
        build_faiss_index(config.index.factory, plan.total_dim)  # fails early on a bad factory string
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    last = CheckpointEmbedder(task, checkpoints[-1], len(checkpoints) - 1, plan, config.index.device)
    report = self_check(task, checkpoints, plan, examples, config.index.device,
                        embedders={len(checkpoints) - 1: last})
    if log is not None:
        log(f"self-check: {len(plan.blocks)} traced blocks on {len(report.rows)} examples x "
            f"{len(report.checkpoints)} checkpoints, max relative error {report.to_json()['max_error']:.1e} "
            f"({report.seconds:.1f}s)")
    if not report.ok:
        if strict:
            raise ConfigError(report.refusal())
    else:
        check_query_path(task, last, examples)
    return Prepared(task, checkpoints, plan, examples, label_width(examples.labels), report)


def build_index(config: IndexConfig, out: str | Path, overwrite: bool = False,
                progress: Callable[[int, int], None] | None = None, show_progress: bool = False) -> BuildResult:
    """Embed every training example at every checkpoint and write the index directory `out`."""
    started = time.perf_counter()
    job = _Job.prepare(config, out, overwrite)
    work = job.out.parent / f".{job.out.name}.partial-{job.config_hash}"
    vectors, self_influence, seconds = _embed_rows(job, 0, job.count, work, progress, show_progress)
    result = _finalize(job, vectors, self_influence, started, seconds)
    del vectors
    shutil.rmtree(work, ignore_errors=True)
    return result


def shard_dir(out: Path, shard: int, shards: int) -> Path:
    return Path(out).resolve().parent / f"{Path(out).name}.shards" / f"shard-{shard:05d}-of-{shards:05d}"


def shard_rows(count: int, shard: int, shards: int) -> tuple[int, int]:
    """Contiguous example range of one shard (sizes differ by at most one)."""
    return count * shard // shards, count * (shard + 1) // shards


def build_shard(config: IndexConfig, out: str | Path, shard: int, shards: int,
                show_progress: bool = False) -> Path:
    """Embed one contiguous range of examples (run one per job-array task / torchrun rank), into
    `<out>.shards/shard-i-of-n/`; `merge_shards` then builds the index directory `out`."""
    if not 0 <= shard < shards:
        raise ConfigError(f"--shard: expected i/n with 0 <= i < n, got {shard}/{shards}")
    job = _Job.prepare(config, out, overwrite=True)
    start, stop = shard_rows(job.count, shard, shards)
    final = shard_dir(job.out, shard, shards)
    work = final.with_name(final.name + f".partial-{job.config_hash}")
    vectors, self_influence, seconds = _embed_rows(job, start, stop, work, None, show_progress)
    np.save(work / SELF_INFLUENCE_FILE, self_influence)
    (work / "shard.json").write_text(json.dumps({"config_hash": job.config_hash, "start": start, "stop": stop,
                                                 "embed_seconds": seconds}))
    del vectors
    if final.exists():
        shutil.rmtree(final)
    work.rename(final)
    return final


def merge_shards(config: IndexConfig, out: str | Path, shards: int, overwrite: bool = False) -> BuildResult:
    """Build the index directory from `shards` finished shards of the same config."""
    started = time.perf_counter()
    job = _Job.prepare(config, out, overwrite)
    work = job.out.parent / f".{job.out.name}.merge-{job.config_hash}"
    work.mkdir(parents=True, exist_ok=True)
    vectors = np.lib.format.open_memmap(work / "vectors.npy", mode="w+", dtype=np.float32,
                                        shape=(job.count, job.plan.total_dim))
    self_influence = np.zeros(job.count, dtype=np.float64)
    seconds = 0.0
    for shard in range(shards):
        directory = shard_dir(job.out, shard, shards)
        info_file = directory / "shard.json"
        if not info_file.is_file():
            raise ConfigError(f"shard {shard}/{shards} is missing or unfinished ({directory})")
        info = json.loads(info_file.read_text())
        if info["config_hash"] != job.config_hash:
            raise ConfigError(f"shard {shard}/{shards} was built from another config or other checkpoints")
        start, stop = info["start"], info["stop"]
        if (start, stop) != shard_rows(job.count, shard, shards):
            raise ConfigError(f"shard {shard}/{shards} covers rows {start}..{stop}, not its own range")
        part = np.load(directory / "vectors.npy", mmap_mode="r")
        for s in range(0, stop - start, 65536):
            vectors[start + s:start + min(s + 65536, stop - start)] = part[s:s + 65536]
        self_influence[start:stop] = np.load(directory / SELF_INFLUENCE_FILE)
        seconds += info["embed_seconds"]
    vectors.flush()
    result = _finalize(job, vectors, self_influence, started, seconds)
    del vectors
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(job.out.parent / f"{job.out.name}.shards", ignore_errors=True)
    return result


@dataclass
class _Job:
    """A validated build: config, task, checkpoints (+ sha256), projection plan, training set."""

    config: IndexConfig
    out: Path
    overwrite: bool
    task: Task
    checkpoints: list[Checkpoint]
    digests: list[str]
    plan: ProjectionPlan
    examples: ExampleSet
    config_hash: str
    label_width: int = 0
    check: SelfCheckReport | None = None

    @property
    def count(self) -> int:
        return len(self.examples)

    @classmethod
    def prepare(cls, config: IndexConfig, out: str | Path, overwrite: bool) -> "_Job":
        out = Path(out).resolve()
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists (use --force to replace it)")
        ready = prepare(config)
        digests = [sha256_file(c.path) for c in ready.checkpoints]
        return cls(config, out, overwrite, ready.task, ready.checkpoints, digests, ready.plan, ready.examples,
                   _config_hash(config, digests), ready.label_width, ready.check)


def _embed_rows(job: _Job, start_row: int, stop_row: int, work: Path,
                progress: Callable[[int, int], None] | None, show_progress: bool):
    """Vectors [rows, D] (float32 memmap in `work`) and exact self-influence for rows
    start_row..stop_row; checkpoints outside, batches inside; resumable per checkpoint."""
    count, dim, plan = stop_row - start_row, job.plan.total_dim, job.plan
    work.mkdir(parents=True, exist_ok=True)
    state_file = work / PROGRESS_FILE
    done = json.loads(state_file.read_text())["done"] if state_file.is_file() else []
    vectors = np.lib.format.open_memmap(work / "vectors.npy", mode="r+" if done else "w+",
                                        dtype=np.float32, shape=(count, dim))
    if not done:
        vectors[:] = 0
    si_file = work / "self_influence.partial.npy"
    self_influence = np.load(si_file) if done else np.zeros(count, dtype=np.float64)

    batch_size = job.config.index.batch_size
    batches = (count + batch_size - 1) // batch_size
    total = len(job.checkpoints) * batches
    bar = _progress_bar(total, show_progress)
    embed_seconds, offset = 0.0, 0
    for c, ckpt in enumerate(job.checkpoints):
        width = plan.checkpoint_dim(c)
        if c in done:
            offset += width
            bar.update(batches)
            continue
        t0 = time.perf_counter()
        embedder = CheckpointEmbedder(job.task, ckpt, c, plan, job.config.index.device)
        for b, start in enumerate(range(0, count, batch_size)):
            stop = min(start + batch_size, count)
            inputs, labels = job.examples.batch(start_row + start, start_row + stop)
            part = embedder.embed(inputs, labels, check=(b % SUM_CHECK_EVERY == 0))
            vec = part.vectors.detach().to("cpu", torch.float32).numpy()
            if plan.summed:
                vectors[start:stop] += vec
            else:
                vectors[start:stop, offset:offset + width] = vec
            self_influence[start:stop] += part.self_influence.detach().to("cpu", torch.float64).numpy()
            bar.update(1)
            if progress:
                progress(c * batches + b + 1, total)
        embed_seconds += time.perf_counter() - t0
        vectors.flush()
        np.save(si_file, self_influence)
        done.append(c)
        state_file.write_text(json.dumps({"done": done}))
        offset += width
        del embedder
    bar.close()
    return vectors, self_influence, embed_seconds


def _finalize(job: _Job, vectors: np.ndarray, self_influence: np.ndarray, started: float,
              embed_seconds: float) -> BuildResult:
    """Write FAISS index, self-influence, examples, checkpoints and manifest; rename into place."""
    config, plan = job.config, job.plan
    staging = StagingDirectory(job.out, overwrite=job.overwrite)
    try:
        faiss_info = _write_faiss(config, vectors, staging.path / INDEX_FILE)
        np.save(staging.path / SELF_INFLUENCE_FILE, self_influence)
        _write_examples(job.task, job.examples, staging.path)
        ckpt_entries = _copy_checkpoints(job.checkpoints, job.digests, staging.path)
        names = [INDEX_FILE, SELF_INFLUENCE_FILE, EXAMPLES_FILE]
        if (staging.path / QUERIES_FILE).is_file():
            names.append(QUERIES_FILE)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "task": {"ref": config.task.ref, "args": config.task.args, "class_names": _class_names(job.task),
                     "label_kind": job.task.kind, "label_width": job.label_width},
            "checkpoints": ckpt_entries,
            "layers": plan.describe(),
            "capture": {**plan.capture.to_json(), "compute_dtype": plan.compute_dtype,
                        "self_check": job.check.to_json() if job.check is not None else None},
            "projection": {"kind": plan.kind, "dim": plan.dim, "seed": plan.seed, "layer_patterns": config.layers,
                           "fingerprint": plan.fingerprint()},
            "embedding_dim": plan.total_dim,
            "count": job.count,
            "faiss": faiss_info,
            "files": file_hashes(staging.path, names),
            "versions": library_versions(),
            "build": {"seconds": round(time.perf_counter() - started, 3), "embed_seconds": round(embed_seconds, 3),
                      "batch_size": config.index.batch_size, "device": config.index.device},
        }
        (staging.path / MANIFEST).write_text(json.dumps(manifest, indent=2))
        staging.commit()
    except BaseException:
        staging.abort()
        raise
    return BuildResult(job.out, job.count, plan.total_dim, time.perf_counter() - started, embed_seconds)


def _class_names(task: Task) -> list[str] | None:
    return list(task.class_names) if task.class_names is not None else None


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="embedding", unit="batch", disable=not enabled, leave=False)


def _write_faiss(config: IndexConfig, vectors: np.ndarray, path: Path, chunk: int = 16384) -> dict:
    count, dim = vectors.shape
    index = build_faiss_index(config.index.factory, dim)
    if not index.is_trained:
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(count, size=min(count, config.index.train_sample), replace=False))
        index.train(np.ascontiguousarray(vectors[sample]))
    for start in range(0, count, chunk):
        index.add(np.ascontiguousarray(vectors[start:start + chunk]))
    approximate = is_approximate(index)
    info = {"factory": config.index.factory, "metric": "inner_product", "file": INDEX_FILE,
            "approximate": approximate, "search_params": config.index.search_params}
    if approximate:
        info["recall_at_10"] = measure_recall(index, vectors, config.index.search_params)
    faiss.write_index(index, str(path))
    return info


def measure_recall(index: faiss.Index, vectors: np.ndarray, params: dict, queries: int = 100, k: int = 10) -> dict:
    """Recall@k of the approximate index against exact inner-product search, for proponents (q) and
    opponents (-q), with training vectors as queries."""
    from indexer.search import top_k

    rng = np.random.default_rng(1)
    rows = rng.choice(vectors.shape[0], size=min(queries, vectors.shape[0]), replace=False)
    recalls = {"proponents": [], "opponents": []}
    for row in rows:
        q = np.asarray(vectors[row], dtype=np.float32)
        scores = _blockwise_scores(vectors, q)
        for name, sign in (("proponents", 1), ("opponents", -1)):
            signed = sign * scores
            truth = np.argsort(-signed)[:k]
            truth = set(truth[signed[truth] > 0].tolist())
            if not truth:
                continue
            got = set(top_k(index, q, k, sign, params=params).rows.tolist())
            recalls[name].append(len(truth & got) / len(truth))
    return {name: round(float(np.mean(v)), 4) if v else None for name, v in recalls.items()} | {"k": k, "queries": len(rows)}


def _blockwise_scores(vectors: np.ndarray, q: np.ndarray, chunk: int = 65536) -> np.ndarray:
    return np.concatenate([vectors[s:s + chunk] @ q for s in range(0, vectors.shape[0], chunk)])


def _write_examples(task: Task, examples: ExampleSet, directory: Path) -> None:
    def rows():
        for row in range(len(examples)):
            yield {"id": examples.id_of(row), "label": task.label_to_json(examples.labels[row]),
                   "display": examples.display_of(row)}

    write_jsonl(directory / EXAMPLES_FILE, rows())
    held_out = task.held_out_set()
    if held_out is not None:
        write_jsonl(directory / QUERIES_FILE, (
            {"id": held_out.id_of(r), "label": task.label_to_json(held_out.labels[r]), "example": held_out.example_of(r),
             "display": held_out.display_of(r)}
            for r in range(len(held_out))
        ))


def _copy_checkpoints(checkpoints: list[Checkpoint], digests: list[str], directory: Path) -> list[dict]:
    (directory / CHECKPOINT_DIR).mkdir()
    entries = []
    for i, (ckpt, digest) in enumerate(zip(checkpoints, digests)):
        name = f"{CHECKPOINT_DIR}/{i:02d}-{ckpt.path.name}"
        shutil.copyfile(ckpt.path, directory / name)
        entries.append({"file": name, "source": str(ckpt.path), "lr": ckpt.lr, "sha256": digest})
    return entries
