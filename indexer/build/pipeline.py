"""Build an index directory: checkpoints in the outer loop (each loaded once), batches inside.

A build holds an exclusive lock beside its output (`.<name>.lock`), refuses `--force` on anything that
is not recognisably an index directory, estimates its disk use before it starts, and commits its
progress once per checkpoint with one rename (`indexer.store.resume`): a build killed at any point resumes
from the last committed checkpoint when run again with the same config, and produces the same bytes as
an uninterrupted build. A build that *fails* (bad input, full disk, non-finite embeddings) removes its
partial files; an interrupted one (Ctrl-C, kill) keeps them for the next run.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import torch

from indexer.checkpoints import (
    CheckpointError, checkpoint_digest, load_checkpoint, load_state_into, recorded_lr, sha256_file,
)
from indexer.config import ConfigError, IndexConfig
from indexer.capture.blocks import check_model
from indexer.capture.routes import PROBE_ROWS, SUM_CHECK_EVERY
from indexer.score.exact import ROW_DIGEST_FORMAT, row_digests, training_set_digest
from indexer.store.faiss_build import Normalized, RowSource, measure_recall, write_index
from indexer.sketch.embedding import (
    DTYPES, Checkpoint, CheckpointEmbedder, ProjectionPlan, combine, plan_embedding,
)
from indexer.store.manifest import MANIFEST as MANIFEST_FILE, ManifestError, write_manifest
from indexer.store.resume import (
    OutputLock, ResumeState, RowFile, disk_error, gb, kill_point, save_npy, say,
)
from indexer.store.search import FAISS_MAX_DIM, build_faiss_index
from indexer.store.directory import (
    CHECKPOINT_DIR, EXAMPLES_FILE, INDEX_FILE, NORMALIZED_INDEX_FILE, QUERIES_FILE, ROW_DIGESTS_FILE, SCHEMA_VERSION,
    SELF_INFLUENCE_FILE, VECTORS_FILE, INDEX_KEY_ENV, IndexBuildError, StagingDirectory, check_replaceable, file_hashes,
    library_versions, sign_index, write_jsonl,
)
from indexer.store.versions import link_or_copy
from indexer.build.input_ranges import INPUT_RANGES_FILE, dumps as dump_input_ranges, record_input_ranges
from indexer.build.review import LABEL_REVIEW_FILE, ReviewAccumulator, ReviewError, review_entry
from indexer.capture.selfcheck import SelfCheckReport, check_query_path, self_check
from indexer.task import ExampleSet, Task, batch_size_of, infer_label_kind, label_width

CHECKPOINT_FORMAT = "tracin-checkpoint/1"


@dataclass
class BuildResult:
    path: Path
    count: int
    dim: int
    seconds: float
    embed_seconds: float


def _config_hash(config: IndexConfig, digests: list[str]) -> str:
    data = config.to_json()
    for name in ("max_disk_gb", "factory", "search_params", "train_sample"):  # the FAISS stage, or a limit:
        data["index"].pop(name, None)  # not inputs of the vectors (shards merge under another factory)
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
    #: adapter-only / partial checkpoints: the keys each lacks come from the model factory, with their digest
    #: (`indexer.checkpoints.LoadReport`), recorded in the manifest and checked by the service at load
    base_weights: list[dict] = field(default_factory=list)


def prepare(config: IndexConfig, log: Callable[[str], None] | None = None, strict: bool = True) -> Prepared:
    """Everything that can fail on a bad config or model, checked before any file is written: the task (a
    Task subclass), checkpoints (readable, fitting the model, lr finite > 0 and equal to the lr a file
    records), the training set, the capture routes (calibrated), the self-check against per-example
    autograd, the service's query path, the projection, FAISS factory and device. Raises ConfigError (one
    line); with `strict=False` a failed self-check is only reported."""
    task = config.task.build()
    model = task.build_model()
    check_model(model)  # before its checkpoints are read: a quantised model's would fail for another reason
    recorded_lrs: list[float | None] = []
    loads = []
    for i, spec in enumerate(config.checkpoints):
        where = f"checkpoints[{i}] ({spec.path.name})"
        if getattr(task, "model_name", None):  # the built-in tasks name the model they build
            where += f" for {task.model_name}"
        try:
            state, meta = load_checkpoint(spec.path, spec.prefix)
            recorded = recorded_lr(meta, where)
            loaded = load_state_into(model, state, where)
            if loaded.partial and i and not set(loaded.from_factory) <= set(loads[0].from_factory):
                loaded = load_state_into(task.build_model(), state, where)  # the factory's values, not a checkpoint's
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
        loads.append(loaded)
        if loaded.partial:
            (log or say)(f"{where}: {'the PEFT adapter ' + repr(loaded.adapter) + ' only' if loaded.adapter else 'a partial state'}"
                         f": {len(loaded.from_factory)} frozen parameters and buffers come from the task's model factory")
        if isinstance(spec.lr, float) and recorded is not None and not np.isclose(recorded, spec.lr, rtol=1e-9,
                                                                                  atol=0.0):
            raise ConfigError(f"checkpoints[{i}].lr: {spec.lr!r} in the config but {spec.path.name} records lr "
                              f"{recorded!r}; remove lr from the config (the file's is used) or re-save the file")
        recorded_lrs.append(recorded)
    checkpoints = [Checkpoint(spec.path, 1.0) for spec in config.checkpoints]  # weights only, until the plan
    if config.index.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"index.device: {config.index.device!r} requested but CUDA is not available")
    examples = task.training_set()
    if not isinstance(examples, ExampleSet):
        raise ConfigError(f"task: training_set() returned a {type(examples).__name__}, not an ExampleSet")
    if len(examples) == 0:
        raise ConfigError("task: training_set() is empty")
    try:
        task.label_kind = infer_label_kind(task, examples.labels)
    except ValueError as exc:
        raise ConfigError(f"task: {exc}") from None
    _check_loss_shape(task, checkpoints[0], config.checkpoints[0].prefix, examples)
    states = [load_checkpoint(c.path, s.prefix)[0] for c, s in ((checkpoints[0], config.checkpoints[0]),
                                                                  (checkpoints[-1], config.checkpoints[-1]))]
    plan = plan_embedding(task, checkpoints, config.layers, config.projection.kind, config.projection.dim,
                          config.projection.seed, examples.batch(0, min(len(examples), PROBE_ROWS)),
                          config.index.compute_dtype, config.index.device, state=states[0])
    checkpoints = checkpoint_steps(config, task, plan, recorded_lrs, log)
    if plan.total_dim > FAISS_MAX_DIM:
        raise ConfigError(f"projection: {config.projection.kind} mode gives {plan.total_dim:,} numbers per example "
                          f"({len(examples):,} examples x {plan.total_dim:,} numbers = "
                          f"{gb(4 * len(examples) * plan.total_dim)} of float32 vectors), more than the "
                          f"{FAISS_MAX_DIM:,} a FAISS index can hold; use kind = \"sketch\" (the service re-ranks "
                          "candidates by exact TracIn) or trace fewer layers")
    try:
        build_faiss_index(config.index.factory, plan.total_dim)  # fails early on a bad factory string
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _check_faiss_training(config, plan.total_dim, len(examples))
    last = CheckpointEmbedder(task, checkpoints[-1], len(checkpoints) - 1, plan, config.index.device, state=states[1])
    report = self_check(task, checkpoints, plan, examples, config.index.device,
                        embedders={len(checkpoints) - 1: last},
                        states={0: states[0], len(checkpoints) - 1: states[1]}, batch_size=config.index.batch_size)
    if log is not None:
        log(f"self-check: {len(plan.blocks)} traced blocks on {len(report.rows)} examples x "
            f"{len(report.checkpoints)} checkpoints, max relative error {report.to_json()['max_error']:.1e} "
            f"({report.seconds:.1f}s)")
    for note in report.notes:
        (log or say)(f"self-check: {note}")
    if not report.ok:
        if strict:
            raise ConfigError(report.refusal())
    else:
        check_query_path(task, last, examples)
    base_weights = [{"checkpoint": i, "keys": len(r.from_factory), "sha256": r.factory_sha256,
                     **({"adapter": r.adapter} if r.adapter else {})} for i, r in enumerate(loads) if r.partial]
    return Prepared(task, checkpoints, plan, examples, label_width(examples.labels), report, base_weights)


def checkpoint_steps(config: IndexConfig, task: Task, plan: ProjectionPlan, recorded_lrs: list[float | None],
                     log: Callable[[str], None] | None = None) -> list[Checkpoint]:
    """Each checkpoint of the config with its StepWeights for the plan's traced parameters: the formula and
    per-parameter weights from the optimizer state saved with it (`indexer.optimizer`), the config's lr
    (one number or a table) or the lr the file records. Warnings (e.g. Adam without its state) are said once
    per checkpoint. Raises ConfigError (one line) when a step cannot be weighed exactly."""
    from indexer.optimizer.state import read_saved_optimizer
    from indexer.optimizer.step import step_weights

    traced = [p for b in plan.blocks for p in b.params]
    model = task.build_model()
    dtype = DTYPES[plan.compute_dtype]
    out = []
    for i, (spec, recorded) in enumerate(zip(config.checkpoints, recorded_lrs)):
        where = f"checkpoints[{i}] ({spec.path.name})"
        try:
            weights = step_weights(read_saved_optimizer(spec.path), model, traced, config.step_options, spec.lr,
                                   recorded, where, dtype)
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
        for warning in weights.warnings:
            (log or say)(warning)
        out.append(Checkpoint(spec.path, weights.lr, weights))
    return out


def build_index(config: IndexConfig, out: str | Path, overwrite: bool = False,
                progress: Callable[[int, int], None] | None = None, show_progress: bool = False) -> BuildResult:
    """Embed every training example at every checkpoint and write the index directory `out`.

    Raises ConfigError / CheckpointError (bad input), FileExistsError (`out` exists, no `overwrite`),
    IndexBuildError (lock held, `out` not replaceable, not enough disk, a full disk while writing,
    non-finite embeddings, a loss of the wrong shape). Nothing of a failed build is left behind; an
    interrupted one (KeyboardInterrupt, a kill) leaves its resume state for the next run."""
    started = time.perf_counter()
    out = Path(out).resolve()
    with OutputLock(out.parent / f".{out.name}.lock", out):
        _remove_committed_resume(out)  # before the "already exists" refusal: a rerun without --force too
        _check_out(out, overwrite, config)
        job = _Job.prepare(config, out, overwrite)
        work = out.parent / f".{out.name}.partial-{job.config_hash}"
        _remove_stale(out, keep=work)
        state = ResumeState(work, job.config_hash, (0, job.count), job.plan.total_dim, len(job.checkpoints),
                            extras=(REVIEW_STATE,))
        _check_disk(job, out.parent, resumable=state)  # a refusal before starting keeps an earlier resume state
        with _failure_cleanup(job, [work]):
            kill_point("prepared")
            vectors_file, self_influence, review, seconds = _embed_rows(job, state, 0, progress, show_progress)
            vectors = RowSource([vectors_file], job.plan.total_dim)  # read by row blocks, never whole
            result = _finalize(job, vectors, self_influence, started, seconds, review, resume_dir=work)
        kill_point("index-committed")
        shutil.rmtree(work, ignore_errors=True)
    return result


def shard_dir(out: Path, shard: int, shards: int) -> Path:
    return Path(out).resolve().parent / f"{Path(out).name}.shards" / f"shard-{shard:05d}-of-{shards:05d}"


def shard_rows(count: int, shard: int, shards: int) -> tuple[int, int]:
    """Contiguous example range of one shard (sizes differ by at most one)."""
    return count * shard // shards, count * (shard + 1) // shards


def build_shard(config: IndexConfig, out: str | Path, shard: int, shards: int,
                show_progress: bool = False, progress: Callable[[int, int], None] | None = None) -> Path:
    """Embed one contiguous range of examples (run one per job-array task / torchrun rank), into
    `<out>.shards/shard-i-of-n/`; `merge_shards` then builds the index directory `out`. Each shard
    holds its own lock and resume state. `progress(done, total)` is called after each batch embedded by
    this run (batches of checkpoints resumed from the state are not counted)."""
    if not 0 <= shard < shards:
        raise ConfigError(f"--shard: expected i/n with 0 <= i < n, got {shard}/{shards}")
    out = Path(out).resolve()
    final = shard_dir(out, shard, shards)
    final.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(final.parent / f".{final.name}.lock", final):
        job = _Job.prepare(config, out, overwrite=True)
        start, stop = shard_rows(job.count, shard, shards)
        work = final.with_name(final.name + f".partial-{job.config_hash}")
        staging = final.with_name(final.name + ".tmp")
        state = ResumeState(work, job.config_hash, (start, stop), job.plan.total_dim, len(job.checkpoints),
                            extras=(REVIEW_STATE,))
        _check_disk(job, final.parent, resumable=state, rows=stop - start, final_index=False)
        with _failure_cleanup(job, [work, staging]):
            vectors_file, self_influence, review, seconds = _embed_rows(job, state, start, progress, show_progress)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            vectors_file.replace(staging / "vectors.npy")
            save_npy(staging / SELF_INFLUENCE_FILE, self_influence)
            save_npy(staging / f"{REVIEW_STATE}.npy", review.data)
            (staging / "shard.json").write_text(json.dumps({"config_hash": job.config_hash, "start": start,
                                                            "stop": stop, "embed_seconds": seconds,
                                                            "files": file_hashes(staging, list(SHARD_FILES))}))
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        shutil.rmtree(work, ignore_errors=True)
    return final


def merge_shards(config: IndexConfig, out: str | Path, shards: int, overwrite: bool = False,
                 keep_shards: bool = False) -> BuildResult:
    """Build the index directory from `shards` finished shards of the same config (the same embedding:
    `index.factory`, `search_params` and `train_sample` may differ from the shards' config). The shards'
    vectors are read in place by row blocks (`indexer.store.faiss_build`); they are removed afterwards unless
    `keep_shards` (to merge again, e.g. under another factory, without embedding again)."""
    started = time.perf_counter()
    out = Path(out).resolve()
    with OutputLock(out.parent / f".{out.name}.lock", out):
        _check_out(out, overwrite, config)
        job = _Job.prepare(config, out, overwrite)
        work = out.parent / f".{out.name}.merge-{job.config_hash}"
        _remove_stale(out, keep=work, resume_states=False)  # a killed merge's staging directory
        with _failure_cleanup(job, [work]):
            infos = [(shard_dir(out, shard, shards), _shard_info(job, out, shard, shards)) for shard in range(shards)]
            _check_disk(job, out.parent, resumable=None, merge=True)
            self_influence = np.zeros(job.count, dtype=np.float64)
            review = _review_accumulator(job, job.count)
            seconds = 0.0
            for directory, info in infos:
                start, stop = info["start"], info["stop"]
                part_influence = np.load(directory / SELF_INFLUENCE_FILE, allow_pickle=False)
                if part_influence.shape != (stop - start,) or part_influence.dtype != np.float64:
                    raise ConfigError(f"shard {directory.name}: {SELF_INFLUENCE_FILE} is {part_influence.dtype} "
                                      f"{part_influence.shape}, not float64 ({stop - start},); build that shard again")
                self_influence[start:stop] = part_influence
                part_review = _review_accumulator(job, stop - start)
                if not part_review.restore(_load_or_none(directory / f"{REVIEW_STATE}.npy")):
                    raise ConfigError(f"shard {directory.name} has no label-review data of this build; build "
                                      "that shard again")
                review.data[start:stop] = part_review.data
                seconds += info["embed_seconds"]
            try:  # the shards' vectors, read by row blocks: the merge never holds them all
                vectors = RowSource([directory / "vectors.npy" for directory, _ in infos], job.plan.total_dim)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"a shard's vectors.npy is unreadable or of the wrong shape: {exc}") from None
            for (directory, info), rows in zip(infos, vectors.part_rows()):
                if rows != info["stop"] - info["start"]:
                    raise ConfigError(f"shard {directory.name}: vectors.npy holds {rows} rows, its shard.json "
                                      f"{info['stop'] - info['start']} (rows {info['start']}..{info['stop']}); "
                                      "build that shard again")
            result = _finalize(job, vectors, self_influence, started, seconds, review)
        shutil.rmtree(work, ignore_errors=True)
        if not keep_shards:
            shutil.rmtree(out.parent / f"{out.name}.shards", ignore_errors=True)
    return result


def _shard_info(job: "_Job", out: Path, shard: int, shards: int) -> dict:
    """shard.json of a finished shard, checked: same config, its own row range, every file's sha256 (an
    edited or damaged shard would merge into wrong answers). ConfigError in one line otherwise."""
    directory = shard_dir(out, shard, shards)
    try:
        info = json.loads((directory / "shard.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"shard {shard}/{shards} is missing or unfinished ({directory})") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"shard {shard}/{shards}: shard.json is unreadable ({exc}); build that shard again") from None
    if not isinstance(info, dict) or not {"config_hash", "start", "stop", "embed_seconds", "files"} <= set(info):
        raise ConfigError(f"shard {shard}/{shards}: shard.json lacks the fields this version writes (config_hash, "
                          "start, stop, embed_seconds, files); build that shard again")
    if info["config_hash"] != job.config_hash:
        raise ConfigError(f"shard {shard}/{shards} was built from another config or other checkpoints")
    if (info["start"], info["stop"]) != shard_rows(job.count, shard, shards):
        raise ConfigError(f"shard {shard}/{shards} covers rows {info['start']}..{info['stop']}, not its own range")
    for name in SHARD_FILES:
        path = directory / name
        if not path.is_file() or not isinstance(info["files"], dict) or sha256_file(path) != info["files"].get(name):
            raise ConfigError(f"shard {shard}/{shards}: {name} is missing or does not match the sha256 its "
                              "shard.json recorded; build that shard again")
    return info


class _failure_cleanup:
    """On an Exception: remove `paths` (the partial files of a failed build) and turn a full disk into
    one IndexBuildError line. KeyboardInterrupt and other BaseExceptions keep them (resumable)."""

    def __init__(self, job: "_Job", paths: list[Path]):
        self.job, self.paths = job, paths

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        for path in self.paths:
            shutil.rmtree(path, ignore_errors=True)
        reason = disk_error(exc)
        if reason is not None:
            where = self.job.out.parent
            free = shutil.disk_usage(where).free if where.exists() else 0
            raise IndexBuildError(f"{reason} while writing the index for {self.job.out} ({gb(free)} free on its "
                                  f"filesystem, about {gb(self.job.estimate)} needed); the partial files were removed "
                                  "and nothing was left behind") from None
        return False


def _check_out(out: Path, overwrite: bool, config: IndexConfig) -> None:
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{out} already exists (use --force to replace it)")
        check_replaceable(out, _protected(config))


def _protected(config: IndexConfig) -> list[Path]:
    paths = [c.path for c in config.checkpoints]
    if config.source is not None:
        paths.append(Path(config.source))
    return paths


COMMITTING = "committing.sha256"  # in a resume directory: the sha256 of the manifest its build is committing


def _remove_committed_resume(out: Path) -> None:
    """Resume directories of the build that wrote the index `out` (killed after its commit, before the
    removal): each says, in COMMITTING, the sha256 of the manifest it committed; `out`'s must match."""
    manifest = out / MANIFEST_FILE
    if out.is_symlink() or not manifest.is_file():
        return
    digest = None
    for entry in out.parent.glob(f".{out.name}.partial-*"):
        marker = entry / COMMITTING
        if entry.is_symlink() or not marker.is_file():
            continue
        digest = digest or sha256_file(manifest)
        if marker.read_text(errors="replace").strip() == digest:
            say(f"removed {entry.name}: the resume state of the build that wrote {out.name} (it was interrupted "
                "after committing the index)")
            shutil.rmtree(entry, ignore_errors=True)


def _remove_stale(out: Path, keep: Path, resume_states: bool = True) -> None:
    """Leftovers of killed builds into `out` (we hold its lock): staging and old directories, FAISS block
    files, and (`resume_states`) the resume state of another config (it can never be resumed)."""
    for entry in out.parent.glob(f".{out.name}.*"):
        name = entry.name[len(out.name) + 2:]
        if entry == keep or not entry.is_dir() or entry.is_symlink():
            continue
        if name.startswith(("tmp-", "old-", "merge-", "faiss-")):  # faiss-: IVF block files of a killed build
            shutil.rmtree(entry, ignore_errors=True)
        elif resume_states and name.startswith("partial-"):
            say(f"removed {entry.name}: the resume state of a build with another config or other checkpoints")
            shutil.rmtree(entry, ignore_errors=True)


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
    estimate: int = 0
    label_width: int = 0
    check: SelfCheckReport | None = None
    base_weights: list[dict] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.examples)

    @classmethod
    def prepare(cls, config: IndexConfig, out: str | Path, overwrite: bool) -> "_Job":
        out = Path(out).resolve()
        ready = prepare(config)
        digests = [checkpoint_digest(c.path) for c in ready.checkpoints]
        return cls(config, out, overwrite, ready.task, ready.checkpoints, digests, ready.plan, ready.examples,
                   _config_hash(config, digests), label_width=ready.label_width, check=ready.check,
                   base_weights=ready.base_weights)


def _check_faiss_training(config: IndexConfig, dim: int, count: int) -> None:
    """Refuse before the embedding work, not after it: an IVF / PQ factory needs at least as many training
    vectors as it has lists / centroids, a PCA at most as many outputs as the embedding has numbers and
    the sample has vectors, and every `index.search_params` must be one this index takes (`k_factor` >= 1)."""
    from indexer.store.search import check_search_params, index_stages, pca_transforms

    factory = config.index.factory
    index = build_faiss_index(factory, dim)
    sample = min(count, config.index.train_sample)
    problem = check_search_params(index, config.index.search_params, repr(factory))
    if problem:
        raise ConfigError(f"index.search_params{problem}")
    needs = []
    for stage in index_stages(index):
        if isinstance(stage, faiss.IndexPreTransform):
            for transform in pca_transforms(stage):
                if transform.d_out > min(transform.d_in, sample):
                    raise ConfigError(f"index.factory: {factory!r} asks a PCA for {transform.d_out} numbers from "
                                      f"{transform.d_in}-number embeddings and {sample} training vectors; use at "
                                      f"most {min(transform.d_in, sample)}")
    if isinstance(stage, faiss.IndexIVF):
        needs.append(("lists", int(stage.nlist)))
    pq = getattr(stage, "pq", None)
    if pq is not None:
        needs.append(("PQ centroids per sub-quantizer", int(pq.ksub)))
    for what, n in needs:
        if n > sample:
            raise ConfigError(f"index.factory: {factory!r} has {n} {what} but only {sample} vectors "
                              f"to train on ({count} examples, index.train_sample {config.index.train_sample}); use "
                              f"at most {sample} (e.g. IVF{max(1, int(sample ** 0.5))},Flat) or \"Flat\"")


def _check_loss_shape(task: Task, checkpoint: Checkpoint, prefix: str | None, examples: ExampleSet) -> None:
    """The task's loss must be one finite-shaped value per example ([B]); checked on two examples."""
    model = task.build_model()
    state, _ = load_checkpoint(checkpoint.path, prefix)
    load_state_into(model, state, str(checkpoint.path))
    model.eval()
    inputs, labels = examples.batch(0, min(2, len(examples)))
    batch = batch_size_of(inputs)
    try:
        with torch.no_grad():
            loss = task.loss(task.forward(model, inputs), labels)
    except Exception as exc:  # noqa: BLE001 - the user's task code on its own training examples
        raise IndexBuildError(f"task: forward + loss failed on training rows 0..{batch - 1}: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from None
    if not isinstance(loss, torch.Tensor) or tuple(loss.shape) != (batch,):
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise IndexBuildError(f"task.loss must return one loss per example (shape [{batch}] for {batch} examples), "
                              f"got {shape}; compute it with reduction=\"none\" (the indexer sums it)")


def _estimate_bytes(job: _Job, rows: int, final_index: bool = True) -> dict[str, int]:
    """Disk figures of a build, in bytes: vectors [rows, D] float32 twice for the resume state (the state
    in use and the one being written), the FAISS index (at most the vectors), self-influence, the
    examples table (from a sample of rows), the checkpoint copies."""
    vectors = rows * job.plan.total_dim * 4
    self_influence = rows * 8
    figures = {"resume state": 2 * (vectors + self_influence)}
    if final_index:
        sample = range(0, job.count, max(1, job.count // 16))
        labels = job.examples.labels
        sizes = [len(json.dumps({"id": job.examples.id_of(r), "label": labels[r].tolist(),
                                 "display": job.examples.display_of(r)}, separators=(",", ":"))) + 1 for r in sample]
        index = vectors + rows * 16 + (1 << 20)
        approximate = job.config.index.factory.strip() != "Flat"  # + its normalised twin and IVF block files
        figures["FAISS index"] = 3 * index if approximate else index
        figures["self-influence"] = self_influence
        figures["examples table"] = int(np.mean(sizes) * job.count * 1.1) if sizes else 0
        figures["checkpoint copies"] = sum(_size(c.path) for c in job.checkpoints)
    return figures


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _check_disk(job: _Job, where: Path, resumable: ResumeState | None, rows: int | None = None,
                final_index: bool = True, merge: bool = False) -> None:
    """Refuse (IndexBuildError, with the figures) when the estimated size exceeds the free space of the
    output's filesystem (less what a resumable state already holds) or `index.max_disk_gb`."""
    rows = job.count if rows is None else rows
    figures = _estimate_bytes(job, rows, final_index)
    if merge:  # the shards' vectors are read in place: no resume state, no merged copy
        figures["resume state"] = 0
    total = sum(figures.values())
    job.estimate = total
    detail = ", ".join(f"{name} {gb(n)}" for name, n in figures.items() if n)
    dims = f"{rows:,} examples x {job.plan.total_dim:,} numbers"
    limit = job.config.index.max_disk_gb
    if limit is not None and total > limit * 1e9:
        raise IndexBuildError(f"this build needs about {gb(total)} of disk ({dims}: {detail}), over "
                              f"index.max_disk_gb = {limit:g}; use a smaller projection dim or fewer layers")
    present = 0
    if resumable is not None and resumable.work.is_dir():
        present = sum(p.stat().st_size for p in resumable.work.rglob("*") if p.is_file())
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if total - present > free:
        raise IndexBuildError(f"this build needs about {gb(total)} of disk ({dims}: {detail}) but {where} has "
                              f"{gb(free)} free; free some space, write elsewhere (--out), or use a smaller "
                              "projection dim or fewer layers")


def _embed_rows(job: _Job, state: ResumeState, start_row: int,
                progress: Callable[[int, int], None] | None, show_progress: bool) -> tuple[Path, np.ndarray, float]:
    """Embed rows state.rows at every checkpoint not yet committed in `state`; returns (the committed
    vectors file [rows, D] float32, exact self-influence [rows] float64, embedding seconds)."""
    count, plan = state.count, job.plan
    last_done, self_influence = state.load()
    if self_influence is None:
        self_influence = np.zeros(count, dtype=np.float64)
    review = _review_accumulator(job, count)
    if last_done >= 0 and not review.restore(state.loaded.get(REVIEW_STATE)):
        raise IndexBuildError(f"the resume state in {state.work} does not fit this build; remove it and run again")
    batch_size = job.config.index.batch_size
    batches = (count + batch_size - 1) // batch_size
    total = len(job.checkpoints) * batches
    bar = _progress_bar(total, show_progress)
    embed_seconds, offset = 0.0, 0
    for c, ckpt in enumerate(job.checkpoints):
        width = plan.checkpoint_dim(c)
        if c <= last_done:
            offset += width
            bar.update(batches)
            continue
        t0 = time.perf_counter()
        vectors = state.begin(c)
        kill_point("state-started")
        state_dict, _ = load_checkpoint(ckpt.path, job.config.checkpoints[c].prefix)
        embedder = CheckpointEmbedder(job.task, ckpt, c, plan, job.config.index.device, state=state_dict)
        del state_dict

        def on_batch(b: int) -> None:
            bar.update(1)
            if progress:
                progress(c * batches + b + 1, total)

        _embed_checkpoint(job, embedder, c, vectors, self_influence, start_row, offset, width, on_batch, review)
        kill_point("checkpoint-embedded")
        embed_seconds += time.perf_counter() - t0
        state.commit(c, vectors, self_influence, {REVIEW_STATE: review.data})
        offset += width
        del embedder
    bar.close()
    return state.vectors_file(len(job.checkpoints) - 1), self_influence, review, embed_seconds


#: the name of the label-review matrix in the resume state and in a shard (`indexer.build.review`)
REVIEW_STATE = "review"
#: the files of a finished shard, with their sha256 in its shard.json
SHARD_FILES = ("vectors.npy", SELF_INFLUENCE_FILE, f"{REVIEW_STATE}.npy")


def _review_accumulator(job: _Job, rows: int) -> ReviewAccumulator:
    return ReviewAccumulator.for_task(job.task, rows, len(job.checkpoints), job.label_width)


def _load_or_none(path: Path) -> np.ndarray | None:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None


def _embed_checkpoint(job: _Job, embedder: CheckpointEmbedder, c: int, vectors: RowFile, self_influence: np.ndarray,
                      start_row: int, offset: int, width: int, on_batch: Callable[[int], None],
                      review: ReviewAccumulator) -> None:
    """The per-batch inner loop of checkpoint `c`: embed a batch, check it is finite, add it into the
    accumulated vectors [rows, D] (projected kinds; exact mode writes this checkpoint's columns
    offset..offset+width) and add its exact self-influence; record its losses and outputs for label
    review (`indexer.build.review`). The first batch and every SUM_CHECK_EVERY-th are sum-checked (hook
    gradients vs the batch gradient: `indexer.capture.routes`)."""
    batch_size = job.config.index.batch_size
    for b, start in enumerate(range(0, vectors.rows, batch_size)):
        stop = min(start + batch_size, vectors.rows)
        inputs, labels = job.examples.batch(start_row + start, start_row + stop)
        part = embedder.embed(inputs, labels, check=(b % SUM_CHECK_EVERY == 0))
        vec = part.vectors.detach().to("cpu", torch.float32).numpy()
        sq = part.self_influence.detach().to("cpu", torch.float64).numpy()
        _check_finite(job, c, start_row + start, start_row + stop, vec, sq)
        block = vectors.read(start, stop)
        if job.plan.summed:
            block += vec  # every checkpoint adds into the same D columns, in checkpoint order
        else:
            block[:, offset:offset + width] = vec  # exact mode: this checkpoint's own columns
        vectors.write(start, block)
        self_influence[start:stop] += sq
        try:
            review.add(c, start, stop, labels, part.losses, part.outputs, job.task)
        except ReviewError as exc:
            raise IndexBuildError(f"checkpoints[{c}], training rows {start_row + start}..{start_row + stop - 1}: "
                                  f"{exc}") from None
        on_batch(b)
        kill_point("batch")


def _check_finite(job: _Job, c: int, start: int, stop: int, vec: np.ndarray, sq: np.ndarray) -> None:
    if np.isfinite(vec).all() and np.isfinite(sq).all():
        return
    ckpt = job.checkpoints[c]
    raise IndexBuildError(f"checkpoints[{c}] ({ckpt.path.name}, lr {ckpt.lr!r}): the embeddings of training rows "
                          f"{start}..{stop - 1} are not finite (inf or NaN in float32); check this checkpoint's lr "
                          "and the model's loss at it. No index was written")


def _finalize(job: _Job, vectors: np.ndarray, self_influence: np.ndarray, started: float,
              embed_seconds: float, review: ReviewAccumulator, resume_dir: Path | None = None) -> BuildResult:
    """Write FAISS index, self-influence, label review, examples, checkpoints and manifest; rename into place.
    `resume_dir` (the build's resume state) is marked with the manifest's sha256 just before the commit, so
    that a rerun knows it for the leftover of this index (`_remove_committed_resume`)."""
    staging = StagingDirectory(job.out, overwrite=job.overwrite, protected=_protected(job.config))
    try:
        stage_index(job, staging.path, vectors, self_influence, review, started, embed_seconds)
        kill_point("manifest-written")
        if resume_dir is not None and resume_dir.is_dir():
            (resume_dir / COMMITTING).write_text(sha256_file(staging.path / MANIFEST_FILE) + "\n")
        staging.commit()
    except ManifestError as exc:  # a figure the service would refuse: never write such an index
        staging.abort()
        raise IndexBuildError(str(exc)) from None
    except BaseException:
        staging.abort()
        raise
    return BuildResult(job.out, job.count, job.plan.total_dim, time.perf_counter() - started, embed_seconds)


def stage_index(job: _Job, directory: Path, vectors, self_influence: np.ndarray, review: ReviewAccumulator,
                started: float, embed_seconds: float, base=None, digests: np.ndarray | None = None,
                extra: dict | None = None) -> dict:
    """Write every file of the index directory into the (empty, staging) `directory`: the FAISS index of
    `vectors` (a row source [count, D] float32), its normalised twin (approximate factories), self-influence
    [count] float64, the label review, input ranges, the examples table, row digests, the checkpoints with
    their step weights, then manifest.json (and manifest.hmac with TRACIN_INDEX_KEY). Returns the manifest.

    `base` (`indexer.build.update.Base`, an update) is the version this one extends: the files it shares with it
    (its checkpoints, the examples table's first rows) are hard links or copies of its files, and an
    approximate FAISS index starts from its trained structure unless the measured recall@10 falls below the
    figure recorded when that structure was trained (then it is trained again). `digests` are the rows'
    content digests when the caller computed them already; `extra` adds manifest keys (version, removal).
    Raises ManifestError, IndexBuildError, OSError."""
    config, plan = job.config, job.plan
    try:
        review_table = review.table()
    except ReviewError as exc:
        raise IndexBuildError(f"label review: {exc}; no index was written") from None
    work = job.out.parent / f".{job.out.name}.faiss-{job.config_hash}"
    faiss_info = _faiss_stage(job, vectors, self_influence, directory, work, base)
    extra_files = faiss_info.pop("extra_files")
    if faiss_info.get("storage") != "stream":  # the FAISS file does not hold the vectors exactly: keep them
        write_rows(vectors, directory / VECTORS_FILE)
        extra_files.append(VECTORS_FILE)
    save_npy(directory / SELF_INFLUENCE_FILE, self_influence)
    save_npy(directory / LABEL_REVIEW_FILE, review_table)
    save_npy(directory / ROW_DIGESTS_FILE, row_digests(job.examples) if digests is None else digests)
    (directory / INPUT_RANGES_FILE).write_text(dump_input_ranges(record_input_ranges(job.task, job.examples)))
    _write_examples(job.task, job.examples, directory, base)
    ckpt_entries, step_files = _copy_checkpoints(job, directory, base)
    names = [INDEX_FILE, *extra_files, SELF_INFLUENCE_FILE, LABEL_REVIEW_FILE, ROW_DIGESTS_FILE, INPUT_RANGES_FILE,
             EXAMPLES_FILE, *step_files]
    if (directory / NORMALIZED_INDEX_FILE).is_file():
        names.append(NORMALIZED_INDEX_FILE)
    if (directory / QUERIES_FILE).is_file():
        names.append(QUERIES_FILE)
    extra = dict(extra or {})
    names += extra.pop("files", [])
    kill_point("index-staged")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "task": {"ref": config.task.ref, "args": config.task.args, "class_names": _class_names(job.task),
                 "label_kind": job.task.kind, "label_width": job.label_width},
        "checkpoints": ckpt_entries,
        "optimizer": optimizer_summary(job.checkpoints, config),
        "layers": plan.describe(),
        "capture": {**plan.capture.to_json(), "compute_dtype": plan.compute_dtype,
                    "self_check": job.check.to_json() if job.check is not None else None},
        "projection": {"kind": plan.kind, "dim": plan.dim, "seed": plan.seed, "layer_patterns": config.layers,
                       "fingerprint": plan.fingerprint()},
        "embedding_dim": plan.total_dim,
        "count": job.count,
        "training_set": training_set_digest(job.examples),
        "row_digests": {"file": ROW_DIGESTS_FILE, "format": ROW_DIGEST_FORMAT},
        "label_review": review_entry(review_table),
        "faiss": faiss_info,
        "files": file_hashes(directory, names),
        **({"base_weights": job.base_weights} if job.base_weights else {}),
        "index_version": {"number": 1},
        "versions": library_versions(),
        "build": {"seconds": round(time.perf_counter() - started, 3), "embed_seconds": round(embed_seconds, 3),
                  "batch_size": config.index.batch_size, "device": config.index.device,
                  "self_check_seconds": round(job.check.seconds, 3) if job.check is not None else None},
        **extra,
    }
    write_manifest(directory, manifest)
    key = os.environ.get(INDEX_KEY_ENV, "")
    if key.strip():  # a keyed signature for indexes shared between machines (verified by tracin serve)
        sign_index(directory, key)
    return manifest


def _faiss_stage(job: _Job, vectors, self_influence: np.ndarray, directory: Path, work: Path, base) -> dict:
    """Write index.faiss (and, approximate, index_normalized.faiss and the trained structures of both, so an
    update can add to them); the manifest's `faiss` entry with `extra_files` (the files written besides
    index.faiss). With a `base` whose trained structure fits, that structure is filled instead of training
    a new one, unless the recall@10 measured then is below the figure recorded when it was trained."""
    config = job.config
    reuse = base.trained(INDEX_FILE) if base is not None else None
    info = _write_faiss(config, vectors, directory / INDEX_FILE, work=work, queries=lambda: _held_out_queries(job),
                        trained=reuse)
    retrained = False
    if reuse is not None and info["approximate"]:
        figure = base.trained_recall()
        if _recall_below(info.get("recall_at_10"), figure):
            say(f"recall@10 of the first stage fell below {figure} with the structure trained earlier: training "
                f"{config.index.factory} again")
            for name in info["files"]:
                (directory / name).unlink(missing_ok=True)
            info = _write_faiss(config, vectors, directory / INDEX_FILE, work=work,
                                queries=lambda: _held_out_queries(job))
            reuse, retrained = None, True
        else:
            info["trained_recall_at_10"] = figure
            info["trained_in_version"] = base.trained_in_version()
    if info["approximate"] and "trained_recall_at_10" not in info:
        info["trained_recall_at_10"] = {k: v for k, v in (info.get("recall_at_10") or {}).items()
                                        if k in ("proponents", "opponents")}
        info["trained_in_version"] = base.number + 1 if base is not None else 1
    if retrained:
        info["retrained"] = True
    extra_files = [name for name in info.pop("files") if name != INDEX_FILE]
    trained = info.pop("trained")
    if trained is not None and info["approximate"]:
        (directory / TRAINED_FILES[INDEX_FILE]).write_bytes(trained)
        extra_files.append(TRAINED_FILES[INDEX_FILE])
    if info["approximate"]:  # normalised queries need their own first stage (a Flat one divides on the fly)
        twin_reuse = base.trained(NORMALIZED_INDEX_FILE) if base is not None and reuse is not None else None
        normalized = _write_faiss(config, Normalized(vectors, self_influence), directory / NORMALIZED_INDEX_FILE,
                                  work=work, measure=False, trained=twin_reuse)
        extra_files += [name for name in normalized["files"] if name != NORMALIZED_INDEX_FILE]
        if normalized["trained"] is not None:
            (directory / TRAINED_FILES[NORMALIZED_INDEX_FILE]).write_bytes(normalized["trained"])
            extra_files.append(TRAINED_FILES[NORMALIZED_INDEX_FILE])
    info["extra_files"] = extra_files
    return info


#: the trained, empty FAISS structure of an approximate index (PCA, IVF centroids ...), kept so an update can
#: fill it with the new vectors instead of training again
TRAINED_FILES = {INDEX_FILE: "index.trained.faiss", NORMALIZED_INDEX_FILE: "index_normalized.trained.faiss"}


def _recall_below(measured: dict | None, figure: dict | None) -> bool:
    """True when either end's measured recall@10 is below the recorded figure for that end."""
    if not measured or not figure:
        return False
    return any(isinstance(figure.get(end), (int, float)) and isinstance(measured.get(end), (int, float))
               and measured[end] < figure[end] for end in ("proponents", "opponents"))


def write_rows(vectors, path: Path) -> None:
    """Write a row source [N, D] as a float32 .npy file, one block at a time, fsynced."""
    count, dim = vectors.shape
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (count, dim)})
        for _, block in vectors.blocks():
            handle.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
        handle.flush()
        os.fsync(handle.fileno())


def _class_names(task: Task) -> list[str] | None:
    return list(task.class_names) if task.class_names is not None else None


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="embedding", unit="batch", disable=not enabled, leave=False)


def _write_faiss(config: IndexConfig, vectors, path: Path, work: Path | None = None,
                 queries: Callable[[], tuple[np.ndarray, str]] | None = None, measure: bool = True,
                 log: Callable[[str], None] | None = None, trained: bytes | None = None) -> dict:
    """Build and write the FAISS index of `vectors` (a row source, `indexer.store.faiss_build`) in bounded
    memory; an approximate one records its recall@10 against exact search (unless not `measure`),
    measured with `queries()` -> (query vectors [Q, D], what they are). `trained`: a serialised trained,
    empty index of the same factory to fill instead of training one. The manifest entry, whose `files` are
    every file written (an on-disk IVF adds its .ivfdata), and `trained` (the trained structure, or None)."""
    work = work if work is not None else path.parent / f".{path.stem}-blocks"
    try:
        written = write_index(config.index.factory, vectors, path, config.index.train_sample, work, log=log,
                              trained=trained)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = {"factory": config.index.factory, "metric": "inner_product", "file": path.name,
            "approximate": written.approximate, "search_params": config.index.search_params,
            "storage": written.storage, "files": written.files, "trained": written.trained}
    if written.approximate and measure:
        if queries is not None:
            q, source = queries()
        else:
            count = vectors.shape[0]
            rows = np.random.default_rng(1).choice(count, size=min(100, count), replace=False)
            q, source = np.asarray(vectors[np.sort(rows)], dtype=np.float32), "training vectors"
        info["recall_at_10"] = measure_recall(written.index, vectors, q, config.index.search_params) | {
            "queries_from": source}
    return info


def _held_out_queries(job: "_Job", count: int = 100) -> tuple[np.ndarray, str]:
    """Embeddings of up to `count` held-out examples as the service embeds a query by default (the
    prediction at the last checkpoint as the label), or of training rows when the task has none."""
    held = job.task.held_out_set()
    source = "held-out examples"
    if held is None or len(held) == 0:
        held, source = job.examples, "training examples (the task has no held-out set)"
    n = min(count, len(held))
    inputs, _ = held.batch(0, n)
    device = job.config.index.device
    parts = []
    for c in reversed(range(len(job.checkpoints))):  # the last first: its predictions are the labels
        embedder = CheckpointEmbedder(job.task, job.checkpoints[c], c, job.plan, device,
                                      state=load_checkpoint(job.checkpoints[c].path, job.config.checkpoints[c].prefix)[0])
        if c == len(job.checkpoints) - 1:
            labels, _ = job.task.predict(embedder.outputs(inputs))
        parts.append(embedder.embed(inputs, labels).vectors)
    vectors = combine(job.plan, parts[::-1]).numpy()
    return vectors, f"{n} {source}"


def _write_examples(task: Task, examples: ExampleSet, directory: Path, base=None) -> None:
    """examples.jsonl (one line per row) and queries.jsonl (the task's held-out set). With `base` (an update),
    its table's lines are kept as they are (a hard link when no row is new, else a copy) and the new rows'
    lines appended."""
    def rows(start: int):
        for row in range(start, len(examples)):
            yield {"id": examples.id_of(row), "label": task.label_to_json(examples.labels[row]),
                   "display": examples.display_of(row)}

    target = directory / EXAMPLES_FILE
    if base is None:
        write_jsonl(target, rows(0))
    elif base.count == len(examples):
        link_or_copy(base.path / EXAMPLES_FILE, target)
    else:
        shutil.copyfile(base.path / EXAMPLES_FILE, target)
        with open(target, "a", encoding="utf-8") as handle:
            for row in rows(base.count):
                handle.write(json.dumps(row, separators=(",", ":"), allow_nan=False) + "\n")
    held_out = task.held_out_set()
    if held_out is not None:
        write_jsonl(directory / QUERIES_FILE, (
            {"id": held_out.id_of(r), "label": task.label_to_json(held_out.labels[r]), "example": held_out.example_of(r),
             "display": held_out.display_of(r)}
            for r in range(len(held_out))
        ))


def _copy_checkpoints(job: _Job, directory: Path, base=None) -> tuple[list[dict], list[str]]:
    """checkpoints/NN-name: a byte copy of a checkpoint file the service reads as it is; a normalised
    tracin checkpoint (weights under the model's own names, the lr) for a folder, a prefixed file or a file
    that also holds optimizer state (the index keeps the weights, not the state); checkpoints/NN.step.safetensors:
    the step weights lr * Gamma per traced parameter where they are tensors (`indexer.optimizer.step`). With
    `base` (an update), the checkpoints it holds already are hard links (or copies) of its files, with its entries.
    Returns (the manifest's checkpoint entries, the step files written)."""
    from safetensors.torch import save_file

    from indexer.optimizer.state import read_saved_optimizer

    (directory / CHECKPOINT_DIR).mkdir()
    entries, step_files = [], []
    for i, (ckpt, digest, spec) in enumerate(zip(job.checkpoints, job.digests, job.config.checkpoints)):
        if base is not None and i < len(base.checkpoints):  # an update: the checkpoints it had, shared
            entry = dict(base.checkpoints[i])
            link_or_copy(base.path / entry["file"], directory / entry["file"])
            if (entry.get("step") or {}).get("file"):
                link_or_copy(base.path / entry["step"]["file"], directory / entry["step"]["file"])
                step_files.append(entry["step"]["file"])
            entries.append(entry)
            continue
        if ckpt.path.is_file() and not spec.prefix and read_saved_optimizer(ckpt.path) is None:
            name = f"{CHECKPOINT_DIR}/{i:02d}-{ckpt.path.name}"
            shutil.copyfile(ckpt.path, directory / name)
            sha = digest
        else:
            name = f"{CHECKPOINT_DIR}/{i:02d}-{ckpt.path.stem if ckpt.path.is_file() else ckpt.path.name}.pt"
            state, _ = load_checkpoint(ckpt.path, spec.prefix)
            torch.save({"format": CHECKPOINT_FORMAT, "state_dict": {k: v.contiguous() for k, v in state.items()},
                        "lr": float(ckpt.lr)}, directory / name)
            sha = checkpoint_digest(directory / name)
        entry = {"file": name, "source": str(ckpt.path), "lr": ckpt.lr, "sha256": sha}
        if sha != digest:
            entry["source_sha256"] = digest
        if ckpt.step is not None:
            tensors = ckpt.step.tensors()
            step_file = None
            if tensors:
                step_file = f"{CHECKPOINT_DIR}/{i:02d}.step.safetensors"
                save_file(tensors, str(directory / step_file), metadata={"format": "tracin-step/1"})
                step_files.append(step_file)
            entry["step"] = ckpt.step.to_json(step_file)
        entries.append(entry)
    return entries, step_files


def optimizer_summary(checkpoints: list[Checkpoint], config: IndexConfig) -> dict:
    """The manifest's `optimizer`: which formula the index uses and why (per checkpoint details are in
    each checkpoint's `step`)."""
    formulas = [c.formula for c in checkpoints]
    first = checkpoints[0].step
    return {"formula": formulas[0] if len(set(formulas)) == 1 else "mixed", "per_checkpoint": formulas,
            "why": first.why if first is not None else "one lr per checkpoint",
            "forced": config.step_options.formula == "sgd", "momentum": config.step_options.momentum,
            "bounded": sum(c.step.bounded for c in checkpoints if c.step is not None)}
