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
from indexer.embedding import Checkpoint, CheckpointEmbedder, ProjectionPlan, resolve_checkpoints
from indexer.search import build_faiss_index, is_approximate
from indexer.store import (
    CHECKPOINT_DIR, EXAMPLES_FILE, INDEX_FILE, MANIFEST, QUERIES_FILE, SCHEMA_VERSION, SELF_INFLUENCE_FILE,
    StagingDirectory, file_hashes, library_versions, write_jsonl,
)
from indexer.task import ExampleSet, Task

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


def prepare(config: IndexConfig) -> tuple[Task, list[Checkpoint], ProjectionPlan]:
    """Everything that can fail on a bad config, checked before any file is written."""
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
    plan = ProjectionPlan.build(model, config.layers, config.projection.kind, config.projection.dim,
                                config.projection.seed, len(checkpoints))
    try:
        build_faiss_index(config.index.factory, plan.total_dim)  # fails early on a bad factory string
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if config.index.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"index.device: {config.index.device!r} requested but CUDA is not available")
    return task, checkpoints, plan


def build_index(config: IndexConfig, out: str | Path, overwrite: bool = False,
                progress: Callable[[int, int], None] | None = None, show_progress: bool = False) -> BuildResult:
    started = time.perf_counter()
    task, checkpoints, plan = prepare(config)
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (use --force to replace it)")
    examples = task.training_set()
    count, dim = len(examples), plan.total_dim
    if count == 0:
        raise ConfigError("task: training_set() is empty")

    digests = [sha256_file(c.path) for c in checkpoints]
    work = out.parent / f".{out.name}.partial-{_config_hash(config, digests)}"
    work.mkdir(parents=True, exist_ok=True)
    state_file = work / PROGRESS_FILE
    done = json.loads(state_file.read_text())["done"] if state_file.is_file() else []
    vectors = np.lib.format.open_memmap(work / "vectors.npy", mode="r+" if done else "w+",
                                        dtype=np.float32, shape=(count, dim))
    si_file = work / "self_influence.partial.npy"
    self_influence = np.load(si_file) if done else np.zeros(count, dtype=np.float64)

    batch_size = config.index.batch_size
    batches = (count + batch_size - 1) // batch_size
    bar = _progress_bar(len(checkpoints) * batches, show_progress)
    embed_seconds, offset = 0.0, 0
    for c, ckpt in enumerate(checkpoints):
        width = sum(p.dim for p in plan.projectors[c])
        if c in done:
            offset += width
            bar.update(batches)
            continue
        t0 = time.perf_counter()
        embedder = CheckpointEmbedder(task, ckpt, c, plan, config.index.device)
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            inputs, labels = examples.batch(start, stop)
            vec, sq = embedder.embed(inputs, labels)
            vectors[start:stop, offset:offset + width] = vec.detach().to("cpu", torch.float32).numpy()
            self_influence[start:stop] += sq.detach().to("cpu", torch.float64).numpy()
            bar.update(1)
            if progress:
                progress(c * batches + start // batch_size + 1, len(checkpoints) * batches)
        embed_seconds += time.perf_counter() - t0
        vectors.flush()
        np.save(si_file, self_influence)
        done.append(c)
        state_file.write_text(json.dumps({"done": done}))
        offset += width
        del embedder
    bar.close()

    staging = StagingDirectory(out, overwrite=overwrite)
    try:
        faiss_info = _write_faiss(config, vectors, staging.path / INDEX_FILE)
        np.save(staging.path / SELF_INFLUENCE_FILE, self_influence)
        _write_examples(task, examples, staging.path)
        ckpt_entries = _copy_checkpoints(checkpoints, digests, staging.path)
        names = [INDEX_FILE, SELF_INFLUENCE_FILE, EXAMPLES_FILE]
        if (staging.path / QUERIES_FILE).is_file():
            names.append(QUERIES_FILE)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "task": {"ref": config.task.ref, "args": config.task.args, "class_names": _class_names(task)},
            "checkpoints": ckpt_entries,
            "layers": plan.describe(),
            "projection": {"kind": plan.kind, "dim": plan.dim, "seed": plan.seed, "layer_patterns": config.layers,
                           "dim_per_checkpoint": plan.checkpoint_dim, "fingerprint": plan.fingerprint()},
            "embedding_dim": dim,
            "count": count,
            "faiss": faiss_info,
            "files": file_hashes(staging.path, names),
            "versions": library_versions(),
            "build": {"seconds": round(time.perf_counter() - started, 3), "embed_seconds": round(embed_seconds, 3),
                      "batch_size": batch_size, "device": config.index.device},
        }
        (staging.path / MANIFEST).write_text(json.dumps(manifest, indent=2))
        del vectors
        staging.commit()
    except BaseException:
        staging.abort()
        raise
    shutil.rmtree(work, ignore_errors=True)
    return BuildResult(out, count, dim, time.perf_counter() - started, embed_seconds)


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
    labels = examples.labels.tolist()

    def rows():
        for row in range(len(examples)):
            yield {"id": examples.id_of(row), "label": labels[row], "display": examples.display_of(row)}

    write_jsonl(directory / EXAMPLES_FILE, rows())
    held_out = task.held_out_set()
    if held_out is not None:
        held_labels = held_out.labels.tolist()
        write_jsonl(directory / QUERIES_FILE, (
            {"id": held_out.id_of(r), "label": held_labels[r], "example": held_out.example_of(r),
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
