"""Load-time consistency check: the numbers an index directory stores against what the index's own
embedding function computes from the task's training set now.

The digests (manifest.sha256, the manifest's files map) catch damage and inconsistent edits, but someone
who edits a file and rewrites both digests has written another index. This check compares what such an
edit changes with a recomputation, before anything is served (`service.loading.load_engine`):

  examples.jsonl       every row's id and label against the task's training set (`Task.label_to_json`)
  index.faiss          for a sample of rows spread over the index (first, last and between: `sample_rows`),
                       the stored vector (FAISS `reconstruct`) against the row re-embedded at every
                       checkpoint by `indexer.sketch.embedding.Embedder.embed`, the function that wrote it.
                       Codecs that store vectors exactly (Flat, IVF..,Flat, HNSW..Flat, a Flat refine
                       stage) must agree to float32 batch noise; lossy codecs (PQ, SQ, PCA) must put the
                       stored row as close to the recomputed vector as the codec's own encoding of it
                       (`index.sa_decode(index.sa_encode(v))`), else the vector check is skipped and said so
  index_normalized.faiss  approximate indexes: the same rows divided by sqrt(self-influence)
  self_influence.npy   the sampled rows' exact self-influence, recomputed; in exact-kind indexes also every
                       row's against its stored vector (||e||^2 is the self-influence there: `check_norms`)
  label_review.npy     the sampled rows' losses and margins at every checkpoint, prediction and
                       probabilities at the last (`indexer.build.review.ReviewAccumulator`, as the build)

Tolerances allow the float noise of another batch composition, machine or device (float32 capture on the
digits demo: at most 1.8e-6 of a row's norm, 1.4e-6 of a self-influence; `VECTOR_RTOL` = `FIGURE_RTOL` =
1e-3, over 500x that) and catch any edit that moves a number by more, e.g. rows reordered, a figure scaled,
columns permuted, a checkpoint file replaced by another. Cost: one embedding of the sampled rows at every
checkpoint, plus one pass over the examples table's ids and labels.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
import numpy as np
import torch

#: relative tolerance of a recomputed row against the stored one (float32 capture and storage noise
#: across batch compositions: <= 1.8e-6 of the row's norm measured on the digits demo; a GPU-built index
#: served on a CPU, docs/gpu.md: ~1e-5; an edit moves it by far more)
VECTOR_RTOL = 1e-3
FIGURE_RTOL = 1e-3  # self-influence, losses, margins, probabilities
DEFAULT_ROWS = 12


class InconsistentIndex(ValueError):
    """A stored number or label differs from its recomputation; one line naming the row and the file."""


@dataclass
class ConsistencyReport:
    rows: list[int]
    checkpoints: int
    vectors: str  # "exact", "codec" (lossy codec compared through its own encoding) or "skipped: why"
    seconds: float
    notes: list[str] = field(default_factory=list)


def sample_rows(count: int, wanted: int = DEFAULT_ROWS) -> list[int]:
    """`wanted` deterministic rows spread evenly over 0..count-1, first and last included."""
    if count <= wanted:
        return list(range(count))
    return sorted({round(i * (count - 1) / (wanted - 1)) for i in range(wanted)})


def check_examples_table(index_dir, task, examples) -> None:
    """Every row's id and label in examples.jsonl must be the training set's (`examples`, from the task)."""
    from indexer.store.directory import EXAMPLES_FILE

    table = index_dir.examples
    path = index_dir.path
    if len(examples) != len(table):
        raise InconsistentIndex(f"{path}: {EXAMPLES_FILE} has {len(table)} rows, the task's training set "
                                f"{len(examples)}; the index was built from another training set")
    ids = table.ids
    for row in range(len(table)):
        if ids[row] != examples.id_of(row):
            raise InconsistentIndex(f"{path}: row {row} of {EXAMPLES_FILE} has id {ids[row][:100]!r}, the task's "
                                    f"training set {examples.id_of(row)[:100]!r} at that row")
    stored = table.labels
    labels = examples.labels
    if task.kind == "class" and labels.dim() == 1 and all(type(v) is int for v in stored):
        bad = np.flatnonzero(np.asarray(stored, dtype=np.int64) != labels.detach().cpu().numpy().astype(np.int64))
        first = int(bad[0]) if bad.size else None
    else:
        first = next((row for row in range(len(table)) if stored[row] != task.label_to_json(labels[row])), None)
    if first is not None:
        raise InconsistentIndex(
            f"{path}: row {first} (id {ids[first][:100]!r}) of {EXAMPLES_FILE} has label "
            f"{str(stored[first])[:60]}, the task's training set {str(task.label_to_json(labels[first]))[:60]}; the "
            "examples table was edited, or the training set changed since indexing")


def check_rows(index_dir, task, embedder, examples, rows: list[int]) -> ConsistencyReport:
    """Re-embed `rows` of the training set at every checkpoint and compare with the stored vectors,
    normalised vectors, self-influence and label review. Raises InconsistentIndex (one line: the row,
    its id, the file and the two numbers)."""
    from indexer.build.review import LABEL_REVIEW_FILE, ReviewAccumulator
    from indexer.store.directory import NORMALIZED_INDEX_FILE, SELF_INFLUENCE_FILE

    started = time.perf_counter()
    path = index_dir.path
    ids = index_dir.examples.ids
    if not rows:
        return ConsistencyReport([], len(embedder.checkpoints), "skipped: no rows", 0.0)
    inputs, labels = examples.rows(rows)
    out = embedder.embed(inputs, labels)
    new = out.vectors.detach().to("cpu", torch.float64).numpy()
    new_si = out.self_influence.detach().to("cpu", torch.float64).numpy()

    def where(i: int) -> str:
        return f"row {rows[i]} (id {ids[rows[i]][:100]!r})"

    # vectors
    manifest = index_dir.manifest
    plan = embedder.plan
    vectors = _check_vectors(index_dir.index, rows, new, manifest["faiss"]["file"], where, path, plan)
    if index_dir.normalized_index is not None:
        scale = np.where(new_si > 0, 1.0 / np.sqrt(np.maximum(new_si, 1e-300)), 0.0)[:, None]
        _check_vectors(index_dir.normalized_index, rows, new * scale, NORMALIZED_INDEX_FILE, where, path, None)

    # self-influence
    stored_si = np.asarray(index_dir.self_influence[rows], dtype=np.float64)
    floor = 1e-9 * max(float(np.abs(new_si).max()), 1e-300)
    for i in range(len(rows)):
        if abs(stored_si[i] - new_si[i]) > FIGURE_RTOL * abs(new_si[i]) + floor:
            raise InconsistentIndex(
                f"{path}: {where(i)} of {SELF_INFLUENCE_FILE} holds {stored_si[i]:.9g}, its recomputation at every "
                f"checkpoint gives {new_si[i]:.9g}; {_ADVICE}")

    # label review
    table = index_dir.label_review
    if table is not None:
        review = ReviewAccumulator.for_task(task, len(rows), len(embedder.checkpoints),
                                            int(manifest["task"].get("label_width") or 0))
        for c, part in enumerate(out.per_checkpoint):
            review.add(c, 0, len(rows), labels, part.losses, part.outputs, task)
        fresh = review.table()
        stored = table[rows]
        with torch.no_grad():
            _, probabilities = task.predict(out.per_checkpoint[-1].outputs)
        for name in stored.dtype.names:
            _check_field(name, np.asarray(stored[name]), np.asarray(fresh[name]) if name in fresh.dtype.names
                         else None, where, path, LABEL_REVIEW_FILE, probabilities)
    notes = ["every row's squared vector norm equals its self-influence"] if check_norms(index_dir, plan) else []
    return ConsistencyReport(list(rows), len(embedder.checkpoints), vectors, time.perf_counter() - started, notes)


_ADVICE = ("the index directory was edited, or the task's model or checkpoints differ from those indexed "
           "(TRACIN_VERIFY_ROWS=0 skips this check)")


def _check_field(name: str, stored: np.ndarray, fresh: np.ndarray | None, where, path, file: str,
                 probabilities) -> None:
    if fresh is None:
        raise InconsistentIndex(f"{path}: {file} has a field {name!r} its recomputation does not give; {_ADVICE}")
    if name == "prediction" and stored.dtype.kind in "iu":  # class ids: equal, or a tie the float noise decided
        p = probabilities.detach().to("cpu", torch.float64).numpy() if isinstance(probabilities, torch.Tensor) \
            else None
        for i in np.flatnonzero(stored != fresh):
            near_tie = p is not None and p.ndim == 2 and 0 <= int(stored[i]) < p.shape[1] \
                and abs(p[i, int(stored[i])] - p[i, int(fresh[i])]) <= FIGURE_RTOL * p[i, int(fresh[i])]
            if not near_tie:
                raise InconsistentIndex(f"{path}: {where(int(i))} of {file} (field prediction) holds class "
                                        f"{int(stored[i])}, the model at the last checkpoint predicts "
                                        f"{int(fresh[i])}; {_ADVICE}")
        return
    stored = stored.astype(np.float64).reshape(stored.shape[0], -1)
    fresh = fresh.astype(np.float64).reshape(fresh.shape[0], -1)
    atol = 1e-6 * max(1.0, float(np.abs(fresh).max()) if fresh.size else 1.0)
    bad = np.argwhere(np.abs(stored - fresh) > FIGURE_RTOL * np.abs(fresh) + atol)
    if bad.size:
        i, j = (int(v) for v in bad[0])
        column = f", checkpoint {j}" if name in ("loss", "margin") else (f"[{j}]" if stored.shape[1] > 1 else "")
        raise InconsistentIndex(f"{path}: {where(i)} of {file} (field {name}{column}) holds {stored[i, j]:.9g}, its "
                                f"recomputation gives {fresh[i, j]:.9g}; {_ADVICE}")


def _reconstruct(index, row: int) -> np.ndarray:
    return np.asarray(index.reconstruct(int(row)), dtype=np.float64)


def _check_vectors(index, rows: list[int], new: np.ndarray, file: str, where, path, plan) -> str:
    """Stored rows against recomputed ones; returns how they were compared ("exact", "codec", "skipped: ...")."""
    import faiss

    from indexer.store.search import index_stages

    for stage in index_stages(index):
        if isinstance(stage, faiss.IndexIVF):
            try:
                stage.make_direct_map()
            except RuntimeError:
                pass
    try:
        stored = np.stack([_reconstruct(index, r) for r in rows])
    except RuntimeError as exc:
        return f"skipped: FAISS cannot reconstruct stored vectors of {file} ({str(exc).strip().splitlines()[-1]})"
    norms = np.linalg.norm(new, axis=1)
    tol = VECTOR_RTOL * norms + 1e-6 * max(float(norms.max()), 1e-30)
    dist = np.linalg.norm(stored - new, axis=1)
    if (dist <= tol).all():
        return "exact"
    try:  # a lossy codec: as close as the codec's own encoding of the recomputed vector, give or take
        coded = np.asarray(index.sa_decode(index.sa_encode(np.ascontiguousarray(new, dtype=np.float32))),
                           dtype=np.float64)
    except RuntimeError:
        coded = None
    if coded is not None:
        codec = np.linalg.norm(coded - new, axis=1)
        lossy = codec > tol
        if lossy.any():
            bad = np.flatnonzero(dist > 1.25 * codec + tol)
            if not bad.size:
                return "codec"
            i = int(bad[0])
            raise InconsistentIndex(
                f"{path}: {where(i)} of {file} is {dist[i] / max(norms[i], 1e-300):.3g} of its norm away from the row "
                f"re-embedded at every checkpoint, the codec's own encoding {codec[i] / max(norms[i], 1e-300):.3g}; "
                f"{_ADVICE}")
    i = int(np.flatnonzero(dist > tol)[0])
    columns = ""
    if plan is not None and not plan.summed:  # exact mode: each checkpoint has its own columns
        offset = 0
        for c in range(len(plan.projectors)):
            width = plan.checkpoint_dim(c)
            part = slice(offset, offset + width)
            if np.linalg.norm(stored[i, part] - new[i, part]) > VECTOR_RTOL * norms[i] + 1e-6 * float(norms.max()):
                columns = f" (the columns of checkpoint {c})"
                break
            offset += width
    raise InconsistentIndex(
        f"{path}: {where(i)} of {file}{columns} differs from the row re-embedded at every checkpoint by "
        f"{dist[i] / max(norms[i], 1e-300):.3g} of its norm (float noise is below {VECTOR_RTOL:g}); {_ADVICE}")


def check_norms(index_dir, plan, block_rows: int = 4096) -> bool:
    """Exact-kind indexes store e = concat_i sqrt(lr_i) g_i, so ||e||^2 is the exact self-influence: every
    row's stored vector against self_influence.npy (two files an edit must change together). Returns False
    (nothing checked) for projected kinds or a FAISS index that cannot return its vectors."""
    from indexer.store.directory import SELF_INFLUENCE_FILE

    if plan.summed:
        return False
    index, si = index_dir.index, np.asarray(index_dir.self_influence, dtype=np.float64)
    floor = 1e-9 * max(float(si.max()) if si.size else 0.0, 1e-300)
    for start in range(0, index_dir.count, block_rows):
        stop = min(start + block_rows, index_dir.count)
        try:
            vectors = np.asarray(index.reconstruct_n(start, stop - start), dtype=np.float64)
        except RuntimeError:
            return False
        norms = np.einsum("ij,ij->i", vectors, vectors)
        bad = np.flatnonzero(np.abs(norms - si[start:stop]) > FIGURE_RTOL * si[start:stop] + floor)
        if bad.size:
            row = start + int(bad[0])
            raise InconsistentIndex(
                f"{index_dir.path}: row {row} (id {index_dir.examples.ids[row][:100]!r}) of {SELF_INFLUENCE_FILE} holds "
                f"{si[row]:.9g}, but its stored vector in {index_dir.manifest['faiss']['file']} has squared norm "
                f"{norms[row - start]:.9g} (equal in an exact index); {_ADVICE}")
    return True


def describe(report: ConsistencyReport) -> str:
    """One line for the start-up log."""
    extra = "".join(f"; {note}" for note in report.notes)
    return (f"consistency: {len(report.rows)} rows re-embedded at {report.checkpoints} checkpoints agree with the "
            f"stored vectors ({report.vectors}), self-influence and label review{extra} ({report.seconds:.2f}s)")

