"""Updating an index directory: new rows and new checkpoints without a rebuild, removal, versions.

TracIn is a sum over checkpoints, and each stored vector is a sum (exact mode: a concatenation) of
per-checkpoint terms, accumulated in checkpoint order in float32 (self-influence in float64):

    e(z) = sum_i sqrt(w_i) P_i g_i(z)          self-influence(z) = sum_i ||sqrt(w_i) g_i(z)||^2

so a new checkpoint C adds its term to every stored row (the same float additions, in the same order, as a
build with every checkpoint), and a new training row is embedded alone at every checkpoint. The
projections are seeded per (checkpoint index, block) (`indexer.sketch.projection`), so the new checkpoints
get the projections a full build would give them. `tracin index CONFIG --out DIR --update`:

1. opens the version of DIR that is served (`indexer.store.versions`), with its files' sha256 verified;
2. compares it with the config (`plan_update`): the checkpoints it holds must be the config's first ones
   (sha256, lr, step formula and weights), the projection (kind, dim, seed, layers, fingerprint of their
   projections), the capture plan and the task's labels unchanged, and its rows the first rows of the task's
   training set (the same ids and the same content digest, `indexer.score.exact.row_digests`). Anything
   else is refused in one line that says a rebuild is needed. An index without row digests (built before
   updates existed) is refused the same way;
3. embeds the missing work in two pieces, each with its own resumable state (`indexer.store.resume`): the
   stored rows at the new checkpoints ("old", starting from their stored vectors, self-influence and label
   review), and the new rows at every checkpoint ("new");
4. writes version n + 1 (`pipeline.stage_index` over the stored rows followed by the new ones; the files it
   shares with version n are hard links) and switches CURRENT to it. The first update also gives version 1
   (the build at the top of DIR) a folder of its own, DIR/versions/v0001 (hard links), so every version stays
   servable by its path.

The label review's prediction is the model's at the LAST checkpoint: when checkpoints are added it is
recomputed for every row at the new last one. An approximate FAISS index is filled into the structure
trained for version n unless the recall@10 measured on the held-out queries falls below the figure recorded
when it was trained (then it is trained again, `pipeline._faiss_stage`).

`--remove-ids FILE` (alone, or with --update) writes a version whose removed.json lists the rows of those
ids: nothing is re-embedded, the service keeps them out of every answer, listing and export. A later
rebuild of a training set without them drops them for good.

Shards (`update_shard`, `merge_update`): each piece is split into contiguous ranges, one per shard; a shard
writes the final vectors, self-influence and label review of its ranges into
``<out>.shards/update-<hash>/shard-i-of-n/``, and the merge writes the version from them (`--ray` runs the
shards as Ray tasks). Kill -9 at any step leaves the previous version served; running the same command
again resumes and writes the same bytes (`UPDATE_KILL_STEPS`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from indexer.build.pipeline import (
    REVIEW_STATE, _embed_checkpoint, _Job, _progress_bar, _review_accumulator, shard_rows, stage_index,
)
from indexer.checkpoints import load_checkpoint
from indexer.config import ConfigError, IndexConfig
from indexer.score.exact import ROW_DIGEST_BYTES, row_digests
from indexer.sketch.embedding import CheckpointEmbedder
from indexer.sketch.projection import fingerprint
from indexer.store import versions
from indexer.store.directory import (
    EXAMPLES_FILE, INDEX_KEY_ENV, REMOVED_FILE, REMOVED_FORMAT, ROW_DIGESTS_FILE, VECTORS_FILE, IndexBuildError,
    IndexDirectory, IndexDirectoryError, file_hashes, fsync_path, library_versions, sign_index,
)
from indexer.store.faiss_build import ConcatRows, FlatRows, RowSource
from indexer.store.manifest import MANIFEST, ManifestError, write_manifest
from indexer.store.resume import OutputLock, ResumeState, gb, kill_point, save_npy, say

#: where `TRACIN_TEST_KILL_AT` can stop an update (tests: kill -9 at each, then a rerun gives the same bytes)
UPDATE_KILL_STEPS = ("update-prepared", "state-started", "batch", "checkpoint-embedded", "state-written",
                     "state-committed", "index-staged", "manifest-written", "version-committed", "pointer-written",
                     "index-committed")
REBUILD = "rebuild the index (tracin index CONFIG --out DIR --force)"


@dataclass
class UpdateResult:
    """What an update did: the version served now (`path`, `version`), whether it wrote one (`changed`), the
    rows and checkpoints added, the rows removed in total, and timings."""

    path: Path
    version: int
    changed: bool
    count: int
    rows_added: int = 0
    checkpoints_added: int = 0
    removed: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0
    retrained: bool = False

    def describe(self, root: Path) -> str:
        if not self.changed:
            return f"{root} is up to date (version {self.version}, {self.count} examples): nothing to add or remove"
        parts = [f"+{self.rows_added} rows", f"+{self.checkpoints_added} checkpoints", f"{self.removed} removed"]
        return (f"updated {root} to version {self.version} ({self.count} examples; {', '.join(parts)}) in "
                f"{self.seconds:.1f}s" + ("; the approximate first stage was trained again" if self.retrained else ""))


# -- the served version ----------------------------------------------------------------------------------

class Base:
    """The version of an index directory an update extends: its verified files, manifest and figures."""

    def __init__(self, root: Path, index: IndexDirectory):
        self.root, self.index = Path(root), index
        self.version = index.version
        self.manifest = index.manifest
        self.manifest_sha256 = hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()
        self.reuse_trained = False  # set once the config's factory and dim are known to be the same

    @classmethod
    def open(cls, root: Path) -> "Base":
        """Open and verify (every file's sha256) the version of `root` that is served. IndexBuildError (one
        line) when it cannot be read or holds no row digests (built before updates were possible)."""
        try:
            index = IndexDirectory.open(root, mmap=True, verify=True)
        except IndexDirectoryError as exc:
            raise IndexBuildError(f"--update: {exc}") from None
        base = cls(root, index)
        if ROW_DIGESTS_FILE not in base.manifest["files"] or index.label_review is None:
            raise IndexBuildError(f"--update: {root} holds no per-row content digests (built by a tracin version "
                                  f"before updates), so new rows cannot be told from changed ones; {REBUILD} once")
        return base

    @property
    def path(self) -> Path:
        return self.version.directory

    @property
    def number(self) -> int:
        return self.version.number

    @property
    def count(self) -> int:
        return self.index.count

    @property
    def checkpoints(self) -> list[dict]:
        return self.manifest["checkpoints"]

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    def digests(self) -> np.ndarray:
        try:
            array = np.load(self.path / ROW_DIGESTS_FILE, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise IndexBuildError(f"--update: {self.path}: cannot read {ROW_DIGESTS_FILE}: {exc}") from None
        if array.dtype != np.uint8 or array.shape != (self.count, ROW_DIGEST_BYTES):
            raise IndexBuildError(f"--update: {self.path}: {ROW_DIGESTS_FILE} is {array.dtype} {array.shape}, not "
                                  f"uint8 ({self.count}, {ROW_DIGEST_BYTES}); {REBUILD}")
        return array

    def stored_vectors(self):
        """The stored float32 vectors [count, D] as a row source: vectors.npy where the index keeps it, else
        the FAISS file's own exact storage (Flat, or the refine stage of PCA..,RFlat)."""
        import faiss

        if VECTORS_FILE in self.manifest["files"]:
            return RowSource([self.path / VECTORS_FILE], self.dim)
        index = faiss.downcast_index(self.index.index)
        if isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.refine_index)
        if isinstance(index, faiss.IndexFlat) and index.ntotal == self.count:
            return FlatRows(index)
        raise IndexBuildError(f"--update: {self.path}: {self.manifest['faiss']['factory']!r} does not keep the stored "
                              f"vectors exactly and the index has no {VECTORS_FILE}; {REBUILD}")

    def trained(self, name: str) -> bytes | None:
        """The trained, empty FAISS structure this version kept for `name` (index.faiss or its normalised twin),
        when the update keeps the factory and the dim."""
        from indexer.build.pipeline import TRAINED_FILES

        file = TRAINED_FILES.get(name)
        if not self.reuse_trained or file is None or file not in self.manifest["files"]:
            return None
        return (self.path / file).read_bytes()

    def trained_recall(self) -> dict | None:
        info = self.manifest["faiss"]
        figure = info.get("trained_recall_at_10") or info.get("recall_at_10")
        if not isinstance(figure, dict):
            return None
        return {k: v for k, v in figure.items() if k in ("proponents", "opponents")}

    def trained_in_version(self) -> int:
        number = self.manifest["faiss"].get("trained_in_version")
        return number if type(number) is int else self.number

    def review_rows(self, start: int, stop: int, checkpoints: int, width: int) -> np.ndarray:
        """Label-review numbers of stored rows start..stop in the matrix layout of an accumulator with
        `checkpoints` checkpoints (`indexer.build.review.ReviewAccumulator`): the stored losses and margins in
        their checkpoints' columns; the prediction and its probabilities only while the last checkpoint is
        the same (else NaN: recomputed at the new last checkpoint)."""
        table = self.index.label_review[start:stop]
        names = table.dtype.names or ()
        C, n = len(self.checkpoints), stop - start
        data = np.full((n, 2 * checkpoints + width + 2), np.nan, dtype=np.float64)
        data[:, :C] = np.asarray(table["loss"], dtype=np.float64).reshape(n, C)
        if "margin" in names:
            data[:, checkpoints:checkpoints + C] = np.asarray(table["margin"], dtype=np.float64).reshape(n, C)
        if checkpoints == C:
            at = 2 * checkpoints
            if "prediction" in names:
                data[:, at:at + width] = np.asarray(table["prediction"], dtype=np.float64).reshape(n, width)
            if "probability" in names:
                data[:, at + width] = table["probability"]
                data[:, at + width + 1] = table["label_probability"]
        return data


# -- what changed ----------------------------------------------------------------------------------------

@dataclass
class Piece:
    """Rows start..stop (of the new training set) and the checkpoints each of them still needs. "old": stored
    rows at the new checkpoints (starting from their stored numbers); "new": new rows at every checkpoint."""

    name: str
    start: int
    stop: int
    checkpoints: list[int]

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def split(self, shard: int, shards: int) -> "Piece":
        lo, hi = shard_rows(self.rows, shard, shards)
        return Piece(self.name, self.start + lo, self.start + hi, self.checkpoints)


@dataclass
class Changes:
    """Stored rows and checkpoints (`rows`, `checkpoints`) against the config's (`count`, `total_checkpoints`),
    and the content digests of every row of the task's training set."""

    rows: int
    count: int
    checkpoints: int
    total_checkpoints: int
    digests: np.ndarray

    @property
    def any(self) -> bool:
        return self.count > self.rows or self.total_checkpoints > self.checkpoints

    def pieces(self) -> list[Piece]:
        out = []
        new_checkpoints = list(range(self.checkpoints, self.total_checkpoints))
        if new_checkpoints:
            out.append(Piece("old", 0, self.rows, new_checkpoints))
        if self.count > self.rows:
            out.append(Piece("new", self.rows, self.count, list(range(self.total_checkpoints))))
        return out


def plan_update(base: Base, job: _Job) -> Changes:
    """Compare the served version with the config and its training set; ConfigError (one line, naming what
    changed and saying a rebuild is needed) unless the version's checkpoints are the config's first ones and
    its rows the training set's first ones, with the same projection, capture plan and labels."""
    m, plan, config = base.manifest, job.plan, job.config
    where = f"--update: {base.root}"
    task = m["task"]
    if task["ref"] != config.task.ref:
        raise ConfigError(f"{where} indexes task {task['ref']!r}, the config names {config.task.ref!r}; {REBUILD}")
    for key, mine in (("class_names", list(job.task.class_names) if job.task.class_names is not None else None),
                      ("label_kind", job.task.kind), ("label_width", job.label_width)):
        if task.get(key) != mine:
            raise ConfigError(f"{where}: the task's {key} is {mine!r}, the index was built with {task.get(key)!r}; "
                              f"{REBUILD}")
    proj = m["projection"]
    for key, mine in (("kind", plan.kind), ("dim", plan.dim), ("seed", plan.seed),
                      ("layer_patterns", config.layers)):
        if proj.get(key) != mine:
            raise ConfigError(f"{where}: projection.{key} is {mine!r} in the config, {proj.get(key)!r} in the index "
                              f"(the stored vectors were projected otherwise); {REBUILD}")
    capture = {k: v for k, v in m.get("capture", {}).items() if k != "self_check"}
    mine = {**plan.capture.to_json(), "compute_dtype": plan.compute_dtype}
    if json.loads(json.dumps(capture)) != json.loads(json.dumps(mine)):
        changed = sorted(k for k in set(capture) | set(mine) if capture.get(k) != mine.get(k))
        raise ConfigError(f"{where}: the capture plan changed ({', '.join(changed)}: the model's layers or the "
                          f"routes that capture them); {REBUILD}")
    if json.loads(json.dumps(plan.describe())) != m.get("layers"):
        raise ConfigError(f"{where}: the traced layers changed (names, shapes or their projections); {REBUILD}")
    C = len(base.checkpoints)
    if len(job.checkpoints) < C:
        raise ConfigError(f"{where} holds {C} checkpoints, the config names {len(job.checkpoints)}: a checkpoint was "
                          f"removed (an update only adds checkpoints after the ones indexed); {REBUILD}")
    for i, entry in enumerate(base.checkpoints):
        _check_checkpoint(base, job, i, entry, where)
    if fingerprint(plan.projectors[:C], plan.kind, plan.seed, plan.dim) != proj["fingerprint"]:
        raise ConfigError(f"{where}: the projections of the indexed checkpoints rebuilt here differ from the index's "
                          f"(fingerprint; torch or the model changed); {REBUILD}")
    N, count = base.count, job.count
    if count < N:
        raise ConfigError(f"{where} holds {N} rows but the task's training set has {count}: rows were removed from "
                          f"it (mark them with --remove-ids while the training set still has them); {REBUILD}")
    ids = base.index.examples.ids
    for row in range(N):
        if job.examples.id_of(row) != ids[row]:
            raise ConfigError(f"{where}: training row {row} is {job.examples.id_of(row)[:100]!r}, the index has "
                              f"{ids[row][:100]!r} there (rows inserted, reordered or removed; new rows must come "
                              f"after the indexed ones); {REBUILD}")
    digests = row_digests(job.examples)
    changed = np.flatnonzero((digests[:N] != base.digests()).any(axis=1))
    if changed.size:
        row = int(changed[0])
        raise ConfigError(f"{where}: the content of training row {row} (id {ids[row][:100]!r}) changed since it was "
                          f"indexed ({changed.size} rows changed); {REBUILD}")
    return Changes(N, count, C, len(job.checkpoints), digests)


def _check_checkpoint(base: Base, job: _Job, i: int, entry: dict, where: str) -> None:
    """The config's checkpoint i must be the one the index holds: file sha256, lr, step formula and weights."""
    from safetensors.torch import load_file

    ckpt = job.checkpoints[i]
    name = f"checkpoints[{i}] ({ckpt.path.name})"
    if job.digests[i] not in (entry.get("source_sha256"), entry["sha256"]):
        raise ConfigError(f"{where}: {name} is not the file indexed as {entry['file']} (sha256 differs): an indexed "
                          f"checkpoint changed or was removed; {REBUILD}")
    if not np.isclose(float(ckpt.lr), float(entry["lr"]), rtol=1e-12, atol=0.0):
        raise ConfigError(f"{where}: {name} has lr {ckpt.lr!r}, the index {entry['lr']!r}; {REBUILD}")
    step = entry.get("step")
    mine = ckpt.step.to_json(step.get("file") if step else None) if ckpt.step is not None else None
    if json.loads(json.dumps(mine)) != step:
        raise ConfigError(f"{where}: {name}: the optimizer step formula or groups differ from the index's "
                          f"([optimizer] options, or the saved optimizer state); {REBUILD}")
    if step and step.get("file"):
        stored = load_file(str(base.path / step["file"]))
        tensors = ckpt.step.tensors()
        if sorted(stored) != sorted(tensors) or any(not torch.equal(stored[k], tensors[k].to(stored[k].dtype))
                                                    for k in stored):
            raise ConfigError(f"{where}: {name}: the step weights (lr x preconditioner) differ from "
                              f"{step['file']}; {REBUILD}")


# -- removal -------------------------------------------------------------------------------------------

def read_remove_ids(path: str | Path) -> list[tuple[int, str]]:
    """(line number, id) of each id in a --remove-ids file: one id per line; blank lines and lines starting
    with # are skipped. ConfigError naming the file when it cannot be read or holds no id."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--remove-ids: cannot read {path}: {exc}") from None
    out = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
           if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        raise ConfigError(f"--remove-ids: {path} lists no id (one id per line)")
    return out


def removal(base: Base, ids: list[str], asked: list[tuple[int, str]] | None, source: str = "") -> np.ndarray:
    """Rows marked removed in the new version (int64, sorted): the base's, plus every row whose id is
    `asked`. ConfigError naming the file and line of an id that is no training example, or when every row
    would be removed."""
    rows = set(base.index.removed.tolist())
    if asked:
        by_id: dict[str, list[int]] = {}
        for row, example_id in enumerate(ids):
            by_id.setdefault(example_id, []).append(row)
        for line, example_id in asked:
            if example_id not in by_id:
                raise ConfigError(f"--remove-ids: {source} line {line}: {example_id[:100]!r} is not the id of a "
                                  f"training example in {base.root}")
            rows.update(by_id[example_id])
    if len(rows) >= len(ids):
        raise ConfigError(f"--remove-ids: {source} would remove every training example of {base.root}; build "
                          "another index instead")
    return np.asarray(sorted(rows), dtype=np.int64)


def _write_removed(directory: Path, rows: np.ndarray, ids: list[str]) -> None:
    data = {"format": REMOVED_FORMAT, "rows": [int(r) for r in rows], "ids": [ids[int(r)] for r in rows]}
    (directory / REMOVED_FILE).write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")


# -- the update ------------------------------------------------------------------------------------------

def update_index(config: IndexConfig | None, out: str | Path, remove_ids: str | Path | None = None,
                 keep_versions: int | None = None, show_progress: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> UpdateResult:
    """Write version n + 1 of the index directory `out` with what the config adds (new training rows, new
    checkpoints; `config` None: nothing) and the rows whose ids `remove_ids` lists marked removed, then
    switch `out`'s CURRENT to it. Nothing new: nothing written (`changed` False).

    Holds `out`'s build lock; resumable (kill -9 anywhere, then the same call: the same bytes); `keep_versions`
    removes the versions older than the K newest afterwards. Raises ConfigError (the config does not extend
    the index: one line saying a rebuild is needed; a bad --remove-ids file), IndexBuildError (no index, no row
    digests, lock held, full disk)."""
    started = time.perf_counter()
    out = _check_root(out)
    with OutputLock(out.parent / f".{out.name}.lock", out):
        base = Base.open(out)
        versions.remove_unserved(out, base.number)
        job = _Job.prepare(config, out, overwrite=True) if config is not None else None
        changes = plan_update(base, job) if job is not None else None
        ids = base.index.examples.ids + ([job.examples.id_of(r) for r in range(base.count, job.count)]
                                         if job is not None else [])
        asked = read_remove_ids(remove_ids) if remove_ids is not None else None
        removed = removal(base, ids, asked, str(remove_ids or ""))
        removal_changed = not np.array_equal(removed, base.index.removed)
        if (changes is None or not changes.any) and not removal_changed:
            _remove_update_work(out, keep=None)
            return UpdateResult(base.path, base.number, False, base.count, removed=int(removed.size),
                                seconds=time.perf_counter() - started)
        kill_point("update-prepared")
        keep_base_servable(base)
        if changes is None or not changes.any:
            _commit(out, base.number + 1, lambda d: _stage_removal(base, d, removed, ids))
            result = UpdateResult(versions.version_dir(out, base.number + 1), base.number + 1, True, base.count,
                                  removed=int(removed.size), seconds=time.perf_counter() - started)
        else:
            tag = update_hash(job, base, changes)
            work = out.parent / f".{out.name}.update-{tag}"
            _remove_update_work(out, keep=work)
            _check_update_disk(job, base, changes, work)
            outputs, seconds = {}, 0.0
            bar = _progress_bar(sum(p.rows for p in changes.pieces()), show_progress)
            for piece in changes.pieces():
                state = ResumeState(work / piece.name, tag, (piece.start, piece.stop), job.plan.total_dim,
                                    len(piece.checkpoints), extras=(REVIEW_STATE,))
                done = embed_piece(job, base, piece, state, progress)
                outputs[piece.name] = [done]
                seconds += done.seconds
                bar.update(piece.rows)
            bar.close()
            result = _write_version(job, base, changes, outputs, removed, ids, started, seconds)
            shutil.rmtree(work, ignore_errors=True)
        if keep_versions is not None:
            versions.remove_unserved(out, result.version, keep_versions)
    return result


def _check_root(out: str | Path) -> Path:
    out = Path(out).resolve()
    if not out.is_dir():
        raise ConfigError(f"--update: {out} is not an index directory (build it first: tracin index CONFIG --out "
                          f"{out})")
    return out


def update_hash(job: _Job, base: Base, changes: Changes) -> str:
    """What an update's resume states and shards belong to: the config, the version it extends, the pieces."""
    data = {"config": job.config_hash, "base": base.manifest_sha256, "count": changes.count,
            "pieces": [(p.name, p.start, p.stop, p.checkpoints) for p in changes.pieces()]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PieceOutput:
    """The final numbers of rows start..stop: vectors file [rows, D] float32, self-influence, review matrix."""

    start: int
    stop: int
    vectors: Path
    self_influence: np.ndarray
    review: np.ndarray
    seconds: float = 0.0


def embed_piece(job: _Job, base: Base, piece: Piece, state: ResumeState,
                progress: Callable[[int, int], None] | None = None) -> PieceOutput:
    """Embed `piece` at its checkpoints, one committed resume step per checkpoint: the "old" piece starts from
    the stored vectors (in the first D_old columns), self-influence and label review of its rows, the "new"
    piece from zeros. Each checkpoint's term is added in checkpoint order (`pipeline._embed_checkpoint`)."""
    plan = job.plan
    last_done, self_influence = state.load()
    review = _review_accumulator(job, piece.rows)
    if last_done >= 0:
        if not review.restore(state.loaded.get(REVIEW_STATE)):
            raise IndexBuildError(f"the resume state in {state.work} does not fit this update; remove it and run "
                                  "again")
    elif piece.name == "old":
        self_influence = np.array(base.index.self_influence[piece.start:piece.stop], dtype=np.float64)
        review.data = base.review_rows(piece.start, piece.stop, len(job.checkpoints), review.width)
    else:
        self_influence = np.zeros(piece.rows, dtype=np.float64)
    batches = -(-piece.rows // job.config.index.batch_size)
    seconds = 0.0
    for s, c in enumerate(piece.checkpoints):
        if s <= last_done:
            continue
        t0 = time.perf_counter()
        vectors = state.begin(s)
        kill_point("state-started")
        if s == 0 and piece.name == "old":
            stored = base.stored_vectors()
            for lo in range(piece.start, piece.stop, 65536):
                hi = min(lo + 65536, piece.stop)
                block = vectors.read(lo - piece.start, hi - piece.start)
                block[:, :stored.shape[1]] = stored[lo:hi]
                vectors.write(lo - piece.start, block)
        state_dict, _ = load_checkpoint(job.checkpoints[c].path, job.config.checkpoints[c].prefix)
        embedder = CheckpointEmbedder(job.task, job.checkpoints[c], c, plan, job.config.index.device,
                                      state=state_dict)
        del state_dict
        offset = sum(plan.checkpoint_dim(i) for i in range(c))

        def on_batch(b: int, s=s) -> None:
            if progress:
                progress(s * batches + b + 1, len(piece.checkpoints) * batches)

        _embed_checkpoint(job, embedder, c, vectors, self_influence, piece.start, offset, plan.checkpoint_dim(c),
                          on_batch, review)
        kill_point("checkpoint-embedded")
        seconds += time.perf_counter() - t0
        state.commit(s, vectors, self_influence, {REVIEW_STATE: review.data})
        del embedder
    return PieceOutput(piece.start, piece.stop, state.vectors_file(len(piece.checkpoints) - 1), self_influence,
                       review.data, seconds)


def _assemble(job: _Job, base: Base, changes: Changes, outputs: dict[str, list[PieceOutput]]):
    """(vectors row source [count, D], self-influence [count], label-review accumulator) of the new version:
    the stored rows (as stored, or the "old" piece's outputs) followed by the "new" piece's outputs."""
    review = _review_accumulator(job, changes.count)
    si = np.zeros(changes.count, dtype=np.float64)
    parts = []
    if "old" not in outputs:
        parts.append(base.stored_vectors())
        si[:base.count] = base.index.self_influence
        review.data[:base.count] = base.review_rows(0, base.count, len(job.checkpoints), review.width)
    for name in ("old", "new"):
        for out in outputs.get(name, []):
            parts.append(RowSource([out.vectors], job.plan.total_dim))
            si[out.start:out.stop] = out.self_influence
            review.data[out.start:out.stop] = out.review
    vectors = ConcatRows(parts)
    if vectors.shape != (changes.count, job.plan.total_dim):
        raise IndexBuildError(f"the update's pieces hold {vectors.shape[0]} rows of {vectors.shape[1]} numbers, not "
                              f"{changes.count} of {job.plan.total_dim}; run it again")
    return vectors, si, review


def _write_version(job: _Job, base: Base, changes: Changes, outputs: dict[str, list[PieceOutput]],
                   removed: np.ndarray, ids: list[str], started: float, embed_seconds: float) -> UpdateResult:
    vectors, si, review = _assemble(job, base, changes, outputs)
    number = base.number + 1
    base.reuse_trained = base.manifest["faiss"]["factory"] == job.config.index.factory and \
        base.dim == job.plan.total_dim
    figures = {"rows_added": changes.count - changes.rows, "checkpoints_added": changes.total_checkpoints -
               changes.checkpoints, "removed": int(removed.size)}
    written: dict = {}

    def fill(directory: Path) -> None:
        extra = {"index_version": _version_entry(base, number, figures),
                 "update": {"seconds": round(time.perf_counter() - started, 3),
                            "embed_seconds": round(embed_seconds, 3),
                            "rows_embedded": {p.name: p.rows for p in changes.pieces()}}}
        if removed.size:
            _write_removed(directory, removed, ids)
            extra["removed"] = {"file": REMOVED_FILE, "count": int(removed.size)}
            extra["files"] = [REMOVED_FILE]
        written["manifest"] = stage_index(job, directory, vectors, si, review, started, embed_seconds, base=base,
                                          digests=changes.digests, extra=extra)

    _commit(base.root, number, fill)
    return UpdateResult(versions.version_dir(base.root, number), number, True, changes.count, **figures,
                        seconds=time.perf_counter() - started, embed_seconds=embed_seconds,
                        retrained=bool(written["manifest"]["faiss"].get("retrained")))


def _version_entry(base: Base, number: int, figures: dict) -> dict:
    return {"number": number, "parent": base.number, "parent_manifest_sha256": base.manifest_sha256, **figures}


def _stage_removal(base: Base, directory: Path, removed: np.ndarray, ids: list[str]) -> None:
    """A version that only marks rows removed: every file of the base shared (hard links), removed.json and
    a manifest that lists it."""
    manifest = json.loads((base.path / MANIFEST).read_text(encoding="utf-8"))
    names = [n for n in manifest["files"] if n != REMOVED_FILE] + [c["file"] for c in manifest["checkpoints"]]
    for name in names:
        versions.link_or_copy(base.path / name, directory / name)
    _write_removed(directory, removed, ids)
    kill_point("index-staged")
    files = {n: h for n, h in manifest["files"].items() if n != REMOVED_FILE}
    manifest["files"] = {**files, **file_hashes(directory, [REMOVED_FILE])}
    manifest["removed"] = {"file": REMOVED_FILE, "count": int(removed.size)}
    manifest["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest["versions"] = library_versions()
    number = base.number + 1
    manifest["index_version"] = _version_entry(base, number, {"rows_added": 0, "checkpoints_added": 0,
                                                              "removed": int(removed.size)})
    manifest.pop("update", None)
    try:
        write_manifest(directory, manifest)
    except ManifestError as exc:
        raise IndexBuildError(str(exc)) from None
    key = os.environ.get(INDEX_KEY_ENV, "")
    if key.strip():
        sign_index(directory, key)


def keep_base_servable(base: Base) -> None:
    """Before the first update of a directory, version 1 (the build, at the top of DIR) gets its own folder too,
    DIR/versions/v0001 (hard links of its files, the same bytes), so that every version, the first included,
    can be served by its path while CURRENT names another. Staged and renamed like any version."""
    from indexer.store.directory import SIGNATURE_FILE

    target = versions.version_dir(base.root, base.number)
    if base.path != base.root or target.exists():
        return
    names = [MANIFEST, "manifest.sha256", *base.manifest["files"], *[c["file"] for c in base.checkpoints]]
    if (base.root / SIGNATURE_FILE).is_file():
        names.append(SIGNATURE_FILE)
    folder = base.root / versions.VERSIONS_DIR
    folder.mkdir(exist_ok=True)
    staging = folder / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for name in names:
            versions.link_or_copy(base.root / name, staging / name)
        fsync_path(staging)
        os.replace(staging, target)
        fsync_path(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _commit(root: Path, number: int, fill: Callable[[Path], None]) -> Path:
    """Stage version `number` in DIR/versions/.v<n>.tmp-*, fsync it, rename it to v<n> (replacing an orphan of
    an interrupted update, which CURRENT never named), then switch CURRENT to it."""
    folder = root / versions.VERSIONS_DIR
    folder.mkdir(exist_ok=True)
    staging = folder / f".{versions.version_name(number)}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    target = versions.version_dir(root, number)
    try:
        fill(staging)
        kill_point("manifest-written")
        for file in sorted(staging.rglob("*")):
            if file.is_file():
                fsync_path(file)
        fsync_path(staging / "checkpoints")
        fsync_path(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        fsync_path(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    kill_point("version-committed")
    versions.write_pointer(root, number, kill=kill_point)
    kill_point("index-committed")
    return target


def _remove_update_work(out: Path, keep: Path | None) -> None:
    """Resume states of other updates of `out` (another config or base version: never resumable) and FAISS
    block files of killed ones. The caller holds the lock."""
    for entry in out.parent.glob(f".{out.name}.*"):
        name = entry.name[len(out.name) + 2:]
        if entry == keep or not entry.is_dir() or entry.is_symlink():
            continue
        if name.startswith(("update-", "faiss-")):
            if name.startswith("update-"):
                say(f"removed {entry.name}: the resume state of an update that no longer applies")
            shutil.rmtree(entry, ignore_errors=True)


def _check_update_disk(job: _Job, base: Base, changes: Changes, work: Path) -> None:
    """Refuse (IndexBuildError, with the figures) an update whose files would not fit on the filesystem: two
    copies of each piece's vectors (the resume state), the new FAISS index (x3 when approximate: its
    normalised twin and the IVF block files), self-influence, the examples table's copy, new checkpoints."""
    D = job.plan.total_dim
    pieces = sum(2 * p.rows * D * 4 for p in changes.pieces())
    index = changes.count * D * 4 * (3 if base.manifest["faiss"]["approximate"] else 1)
    examples = (base.path / EXAMPLES_FILE).stat().st_size * changes.count // max(1, base.count)
    new = sum(_size(job.checkpoints[c].path) for c in range(changes.checkpoints, changes.total_checkpoints))
    need = pieces + index + examples + new + changes.count * 8
    present = sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) if work.is_dir() else 0
    limit = job.config.index.max_disk_gb
    if limit is not None and need > limit * 1e9:
        raise IndexBuildError(f"this update needs about {gb(need)} of disk, over index.max_disk_gb = {limit:g}")
    free = shutil.disk_usage(base.root).free
    if need - present > free:
        raise IndexBuildError(f"this update needs about {gb(need)} of disk (vectors {gb(pieces)}, index {gb(index)}) "
                              f"but {base.root} has {gb(free)} free; free some space, or prune old versions "
                              "(--keep-versions)")


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# -- shards ----------------------------------------------------------------------------------------------

def update_shard_dir(out: Path, tag: str, shard: int, shards: int) -> Path:
    out = Path(out).resolve()
    return out.parent / f"{out.name}.shards" / f"update-{tag}" / f"shard-{shard:05d}-of-{shards:05d}"


def update_shard(config: IndexConfig, out: str | Path, shard: int, shards: int, show_progress: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """One shard of an update (a job-array task, a Ray task): the shard-th range of each piece, embedded with
    its own lock and resume state, written to ``<out>.shards/update-<hash>/shard-i-of-n/`` (per piece:
    <piece>.vectors.npy, .self_influence.npy, .review.npy, and shard.json with their sha256). The served
    version is only read; `merge_update` writes the new version. Returns the shard directory (nothing to do:
    a shard with empty ranges still writes its shard.json)."""
    if not 0 <= shard < shards:
        raise ConfigError(f"--shard: expected i/n with 0 <= i < n, got {shard}/{shards}")
    out = _check_root(out)
    base = Base.open(out)
    job = _Job.prepare(config, out, overwrite=True)
    changes = plan_update(base, job)
    if not changes.any:
        raise ConfigError(f"--update --shard: {out} has no new rows or checkpoints in this config (version "
                          f"{base.number}); nothing to embed")
    tag = update_hash(job, base, changes)
    final = update_shard_dir(out, tag, shard, shards)
    final.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(final.parent / f".{final.name}.lock", final):
        staging = final.with_name(final.name + ".tmp")
        info = {"update_hash": tag, "base_manifest_sha256": base.manifest_sha256, "pieces": [], "files": {}}
        outputs = []
        for piece in changes.pieces():
            part = piece.split(shard, shards)
            if not part.rows:
                continue
            state = ResumeState(final.with_name(f"{final.name}.partial-{piece.name}"), tag, (part.start, part.stop),
                                job.plan.total_dim, len(part.checkpoints), extras=(REVIEW_STATE,))
            outputs.append((part, state, embed_piece(job, base, part, state, progress)))
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for part, state, done in outputs:
            done.vectors.replace(staging / f"{part.name}.vectors.npy")
            save_npy(staging / f"{part.name}.self_influence.npy", done.self_influence)
            save_npy(staging / f"{part.name}.review.npy", done.review)
            info["pieces"].append({"name": part.name, "start": part.start, "stop": part.stop,
                                   "embed_seconds": done.seconds})
        names = sorted(p.name for p in staging.iterdir())
        info["files"] = file_hashes(staging, names)
        (staging / "shard.json").write_text(json.dumps(info))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        for _, state, _ in outputs:
            shutil.rmtree(state.work, ignore_errors=True)
    return final


def merge_update(config: IndexConfig, out: str | Path, shards: int, keep_shards: bool = False,
                 remove_ids: str | Path | None = None, keep_versions: int | None = None) -> UpdateResult:
    """Write the new version from `shards` finished update shards of the same config and served version (each
    checked: its hash, its ranges, every file's sha256), then switch CURRENT to it; the shards are removed
    unless `keep_shards`. ConfigError (one line) for a missing, foreign or damaged shard."""
    started = time.perf_counter()
    out = _check_root(out)
    with OutputLock(out.parent / f".{out.name}.lock", out):
        base = Base.open(out)
        versions.remove_unserved(out, base.number)
        job = _Job.prepare(config, out, overwrite=True)
        changes = plan_update(base, job)
        if not changes.any:
            raise ConfigError(f"--update --merge: {out} has no new rows or checkpoints in this config (version "
                              f"{base.number}): nothing to merge")
        tag = update_hash(job, base, changes)
        outputs: dict[str, list[PieceOutput]] = {}
        seconds = 0.0
        for shard in range(shards):
            directory = update_shard_dir(out, tag, shard, shards)
            info = _update_shard_info(directory, tag, shard, shards)
            for entry in info["pieces"]:
                name = entry["name"]
                part = next(p for p in changes.pieces() if p.name == name).split(shard, shards)
                if (entry["start"], entry["stop"]) != (part.start, part.stop):
                    raise ConfigError(f"update shard {shard}/{shards} covers rows {entry['start']}..{entry['stop']} "
                                      f"of {name}, not its own range; build that shard again")
                si = np.load(directory / f"{name}.self_influence.npy", allow_pickle=False)
                review = np.load(directory / f"{name}.review.npy", allow_pickle=False)
                if si.shape != (part.rows,) or review.shape[0] != part.rows:
                    raise ConfigError(f"update shard {shard}/{shards}: {name} files do not hold {part.rows} rows; "
                                      "build that shard again")
                outputs.setdefault(name, []).append(PieceOutput(part.start, part.stop,
                                                                directory / f"{name}.vectors.npy", si, review))
                seconds += float(entry.get("embed_seconds") or 0.0)
        for piece in changes.pieces():
            got = sum(o.stop - o.start for o in outputs.get(piece.name, []))
            if got != piece.rows:
                raise ConfigError(f"the update shards hold {got} of the {piece.rows} rows of piece {piece.name}; "
                                  "build the missing shards")
        ids = base.index.examples.ids + [job.examples.id_of(r) for r in range(base.count, job.count)]
        asked = read_remove_ids(remove_ids) if remove_ids is not None else None
        removed = removal(base, ids, asked, str(remove_ids or ""))
        keep_base_servable(base)
        result = _write_version(job, base, changes, outputs, removed, ids, started, seconds)
        if not keep_shards:
            shutil.rmtree(out.parent / f"{out.name}.shards" / f"update-{tag}", ignore_errors=True)
            try:
                (out.parent / f"{out.name}.shards").rmdir()
            except OSError:
                pass
        if keep_versions is not None:
            versions.remove_unserved(out, result.version, keep_versions)
    return result


def _update_shard_info(directory: Path, tag: str, shard: int, shards: int) -> dict:
    from indexer.checkpoints import sha256_file

    try:
        info = json.loads((directory / "shard.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"update shard {shard}/{shards} is missing or unfinished ({directory})") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"update shard {shard}/{shards}: shard.json is unreadable ({exc}); build it again") from None
    if not isinstance(info, dict) or info.get("update_hash") != tag or not isinstance(info.get("pieces"), list) \
            or not isinstance(info.get("files"), dict):
        raise ConfigError(f"update shard {shard}/{shards} was built for another config or version; build it again")
    for name, digest in info["files"].items():
        path = directory / name
        if "/" in name or not path.is_file() or sha256_file(path) != digest:
            raise ConfigError(f"update shard {shard}/{shards}: {name} is missing or does not match the sha256 its "
                              "shard.json recorded; build that shard again")
    return info


__all__ = ["Base", "Changes", "Piece", "UPDATE_KILL_STEPS", "UpdateResult", "embed_piece", "merge_update",
           "plan_update", "read_remove_ids", "update_index", "update_shard"]
