"""Loading an index directory for serving: everything checked once, before the first request.

`load_engine(settings)` opens and verifies the index directory (manifest digest and figures, files'
sha256, checkpoints, projection fingerprint, capture plan), rebuilds the task (a Task subclass, type-checked
before it is called) and every checkpoint's model, prepares the first-stage search, and, when exact
re-ranking is on, reads the training set through the task and checks it against the digest the index
recorded (a different training set would re-score other examples: refused). Any problem is a
`ServiceStartupError` naming it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from service.engine import Engine
from service.errors import ServiceStartupError
from service.first_stage import FirstStage
from service.labels import Labels
from service.settings import Settings

log = logging.getLogger("service")

TASK_FIELD = "manifest task.ref"

__all__ = ["ServiceStartupError", "configure_threads", "load_engine", "open_task"]


def configure_threads(settings: Settings) -> None:
    """torch intra-op threads for the machine (one request's backward is small: more threads than CPUs
    only add contention); FAISS OpenMP threads when configured."""
    import torch

    torch.set_num_threads(settings.effective_torch_threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass
    if settings.faiss_threads:
        import faiss

        faiss.omp_set_num_threads(settings.faiss_threads)


def open_task(settings: Settings):
    """Rebuild only the Task from the manifest (light: for the request schema at app creation).

    The manifest is checked against manifest.sha256 and validated (`indexer.store.manifest`) before its task
    reference is used; the reference must resolve to a Task subclass (type-checked before the one call
    that constructs it) from a module outside the index directory."""
    from indexer.config import ConfigError, TaskRef
    from indexer.store.manifest import ManifestError, read_manifest

    path = _index_path(settings)
    _check_signature(settings, path)
    try:
        manifest, _ = read_manifest(path)
    except (ManifestError, OSError) as exc:
        raise ServiceStartupError(str(exc)) from None
    try:
        task = TaskRef(manifest.task.ref, dict(manifest.task.args)).build(TASK_FIELD, forbidden_dir=path)
    except ConfigError as exc:
        raise ServiceStartupError(f"{path}: cannot rebuild the task: {exc}") from None
    _check_schema(task, path)
    kind = getattr(manifest.task, "label_kind", None)
    if kind:
        task.label_kind = kind  # the request schema (query metrics) depends on it
    return task


def _index_path(settings: Settings) -> Path:
    """The directory of the version to serve: TRACIN_INDEX_DIR itself, or (an index directory that was updated)
    the version its CURRENT pointer names now (`indexer.store.versions.resolve`, resolved once per load, so
    every check of a load reads the same version)."""
    return _resolve(settings).directory


def _resolve(settings: Settings):
    from indexer.store.versions import VersionError, resolve

    if settings.index_dir is None:
        raise ServiceStartupError("no index directory: set TRACIN_INDEX_DIR or run `tracin serve DIR`")
    path = Path(settings.index_dir).expanduser()
    if not path.is_dir():
        raise ServiceStartupError(f"{path}: no such index directory")
    try:
        return resolve(path)
    except (VersionError, OSError) as exc:
        raise ServiceStartupError(str(exc)) from None


def _check_schema(task, path: Path) -> None:
    from pydantic import BaseModel

    schema = getattr(task, "example_schema", None)
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        raise ServiceStartupError(f"{path}: task {type(task).__name__} has no example_schema (a pydantic model of "
                                  "one JSON example); the service cannot accept queries for it")


def load_engine(settings: Settings) -> Engine:
    """Open, verify and load the index directory; refuse with ServiceStartupError on any problem."""
    from indexer.checkpoints import CheckpointError
    from indexer.config import ConfigError, TaskRef
    from indexer.sketch.embedding import load_embedder
    from indexer.store.directory import IndexDirectory, IndexDirectoryError

    t0 = time.perf_counter()
    version = _resolve(settings)
    path = version.directory
    _check_device(settings.device)
    _check_signature(settings, path)
    try:  # a signed index is only as covered as its files' digests are checked: always, with a key
        index_dir = IndexDirectory.open(path, mmap=settings.mmap,
                                        verify=settings.verify_checksums or settings.index_key is not None)
    except IndexDirectoryError as exc:
        raise ServiceStartupError(str(exc)) from None
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
        raise ServiceStartupError(f"{path}: cannot read the index directory: {type(exc).__name__}: {exc}") from None
    index_dir.version = version  # with the sha256 its pointer recorded, and the directory's root

    try:  # resolved and type-checked (nothing called) before load_embedder constructs it
        TaskRef(index_dir.model.task.ref, dict(index_dir.model.task.args)).check(TASK_FIELD, forbidden_dir=path)
    except ConfigError as exc:
        raise ServiceStartupError(f"{path}: cannot rebuild the task/model: {exc}") from None
    try:
        task, embedder = load_embedder(index_dir, device=settings.device, threads=settings.effective_rerank_threads)
    except IndexDirectoryError as exc:
        raise ServiceStartupError(str(exc)) from None
    except (ConfigError, CheckpointError) as exc:
        raise ServiceStartupError(f"{path}: cannot rebuild the task/model: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - user task code; the message must reach the operator
        raise ServiceStartupError(f"{path}: cannot rebuild the task/model: {type(exc).__name__}: {exc}") from None
    _check_schema(task, path)
    _check_base_weights(task, index_dir)

    manifest = index_dir.manifest
    class_names = list(task.class_names) if task.class_names is not None else None
    indexed_names = manifest["task"].get("class_names")
    if indexed_names is not None and class_names is not None and list(indexed_names) != class_names:
        raise ServiceStartupError(f"{path}: the task's class names {class_names[:10]} differ from those recorded at "
                                  f"indexing {list(indexed_names)[:10]}")

    removed = index_dir.removed  # rows marked removed (tracin index --remove-ids): in no answer, listing or export
    live = np.ones(index_dir.count, dtype=bool)
    live[removed] = False
    id_to_row: dict[str, int] = {}
    for row, example_id in enumerate(index_dir.examples.ids):
        if live[row]:
            id_to_row.setdefault(example_id, row)
    duplicates = int(live.sum()) - len(id_to_row)
    if duplicates:
        log.warning("%s: %d duplicate example ids; GET /examples and train_id use the first row of each",
                    path, duplicates)
    si = np.asarray(index_dir.self_influence, dtype=np.float64)
    si_order = np.argsort(-si, kind="stable")
    si_order = si_order[live[si_order]]  # ranks over the rows served, renumbered without the removed ones
    si_rank = np.zeros(si.size, dtype=np.int64)
    si_rank[si_order] = np.arange(1, si_order.size + 1)
    labels = Labels.build(task, manifest["task"].get("label_kind") or task.kind,
                          int(manifest["task"].get("label_width") or 0), index_dir.examples.labels, si_order, path,
                          live=live)
    examples, no_examples = _training_set(task, settings, path)
    _check_training_digest(examples, manifest, settings, path)
    _check_consistency(settings, index_dir, task, embedder, examples, no_examples)
    scorer, rerank_error = _exact_scorer(task, embedder, manifest, settings, path, examples, no_examples)
    from indexer.score.metrics import task_metrics

    try:
        metrics = task_metrics(task)
    except (TypeError, ValueError) as exc:
        raise ServiceStartupError(f"{path}: the task's metrics: {exc}") from None
    engine = Engine(settings=settings, index_dir=index_dir, task=task, embedder=embedder, labels=labels,
                    metrics=metrics,
                    first_stage=FirstStage.open(index_dir.index, manifest, settings, path, index_dir.self_influence,
                                                index_dir.normalized_index, removed=removed), scorer=scorer,
                    rerank_error=rerank_error, id_to_row=id_to_row, si_order=si_order, si_rank=si_rank)
    engine.removed_ids = {index_dir.examples.ids[int(r)] for r in removed} - set(id_to_row)
    engine.live = live
    from service.review import LabelReview

    engine.review = LabelReview.build(index_dir, labels.kind, labels.width, live=live)
    engine.input_ranges = index_dir.input_ranges
    if settings.warmup:
        engine.warm_up()
    engine.load_seconds = time.perf_counter() - t0
    return engine


def _check_base_weights(task, index_dir) -> None:
    """Adapter-only (partial) checkpoints take the weights they lack from the task's model factory: the index
    records a digest of those values per checkpoint (`indexer.checkpoints.LoadReport`); the factory on this
    server must build the same base, else the served models are not the indexed ones. ServiceStartupError."""
    from indexer.checkpoints import CheckpointError, load_checkpoint, load_state_into

    entries = index_dir.manifest.get("base_weights")
    if entries is None:
        return
    path = index_dir.path
    count = len(index_dir.manifest["checkpoints"])
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and type(e.get("checkpoint")) is int and 0 <= e["checkpoint"] < count
            and isinstance(e.get("sha256"), str) for e in entries):
        raise ServiceStartupError(f"{path}: manifest base_weights must be a list of {{checkpoint: 0..{count - 1}, "
                                  "sha256}} entries")
    for entry in entries:
        c = entry["checkpoint"]
        file = path / index_dir.manifest["checkpoints"][c]["file"]
        try:
            report = load_state_into(task.build_model(), load_checkpoint(file)[0], f"checkpoints[{c}]")
        except CheckpointError as exc:
            raise ServiceStartupError(f"{path}: {exc}") from None
        if report.factory_sha256 != entry["sha256"]:
            raise ServiceStartupError(
                f"{path}: checkpoints[{c}] holds only part of the model ({len(report.from_factory)} keys come from the "
                "task's model factory), and the factory on this server builds them with other values than at "
                "indexing (digest of the base differs): seed or load the base the same way, or rebuild the index")


def _check_signature(settings: Settings, path: Path) -> None:
    """With TRACIN_INDEX_KEY set, the index must carry manifest.hmac under that key (checked before anything
    of the manifest is used)."""
    if settings.index_key is None:
        return
    from indexer.store.directory import IndexDirectoryError, verify_signature

    try:
        verify_signature(path, settings.index_key.get_secret_value())
    except (IndexDirectoryError, OSError) as exc:
        raise ServiceStartupError(str(exc)) from None


def _training_set(task, settings: Settings, path: Path):
    """(the task's training set, None) when the consistency check or exact re-ranking needs it, else (None,
    why not). A training_set() that fails (other than NotImplementedError) is refused."""
    if settings.verify_rows == 0 and settings.max_rerank == 0:
        return None, "not needed"
    try:
        return task.training_set(), None
    except NotImplementedError:
        return None, "the task provides no training_set() on this server"
    except Exception as exc:  # noqa: BLE001 - user task code
        raise ServiceStartupError(f"{path}: the task's training_set() fails ({type(exc).__name__}: {exc}); exact "
                                  "re-ranking and the consistency check need it (or serve with "
                                  "TRACIN_MAX_RERANK=0 TRACIN_VERIFY_ROWS=0)") from None


def _check_consistency(settings: Settings, index_dir, task, embedder, examples, no_examples: str | None) -> None:
    """TRACIN_VERIFY_ROWS > 0: every row's id and label against the task's training set, and a sample of rows
    re-embedded at every checkpoint against the stored numbers (`indexer.store.consistency`); a mismatch is
    a ServiceStartupError naming the row and the file."""
    from indexer.store.consistency import (
        InconsistentIndex, check_examples_table, check_rows, describe, sample_rows,
    )

    if settings.verify_rows == 0:
        return
    if examples is None:
        log.warning("%s: the index's stored numbers are not checked against a recomputation: %s",
                    index_dir.path, no_examples)
        return
    try:
        check_examples_table(index_dir, task, examples)
        report = check_rows(index_dir, task, embedder, examples, sample_rows(index_dir.count, settings.verify_rows))
    except InconsistentIndex as exc:
        raise ServiceStartupError(str(exc)) from None
    if report.vectors.startswith("skipped"):
        log.warning("%s: vectors not compared: %s", index_dir.path, report.vectors)
    log.info("%s", describe(report))


def _exact_scorer(task, embedder, manifest: dict, settings: Settings, path, examples, no_examples: str | None):
    """(ExactScorer, None) when re-ranking is on and the task reads the indexed training set (`examples`),
    else (None, why not). A training set that differs from the recorded digest is refused."""
    from indexer.score.exact import ExactScorer

    if settings.max_rerank == 0:
        return None, "exact re-ranking is off on this server (TRACIN_MAX_RERANK=0)"
    recorded = manifest.get("training_set")
    if not recorded:
        return None, "the index records no training-set digest (built by an older version): rebuild it to re-rank"
    if examples is None:
        return None, f"{no_examples}, so candidates cannot be re-scored"
    return ExactScorer.for_examples(embedder, examples, threads=settings.effective_rerank_threads), None


def _check_training_digest(examples, manifest: dict, settings: Settings, path) -> None:
    """The task's training set (read for re-ranking or the consistency check) must be the one indexed: row
    count, labels and inputs against the digest the manifest records."""
    from indexer.score.exact import training_set_digest

    recorded = manifest.get("training_set")
    if examples is None or not recorded:
        return
    digest = training_set_digest(examples, rows_hashed=recorded.get("inputs_rows"))
    for key in ("count", "labels_sha256", "inputs_sha256"):
        if digest.get(key) != recorded.get(key):
            what = {"count": "row count", "labels_sha256": "labels", "inputs_sha256": "inputs"}[key]
            why = ("exact re-ranking would score other examples. Rebuild the index, or serve with "
                   "TRACIN_MAX_RERANK=0" + (" TRACIN_VERIFY_ROWS=0" if settings.verify_rows else "")) \
                if settings.max_rerank else ("the index's numbers are not this training set's. Rebuild the index, or "
                                             "serve with TRACIN_VERIFY_ROWS=0")
            raise ServiceStartupError(
                f"{path}: the task's training set differs from the one indexed ({what}: "
                f"{str(digest.get(key))[:16]} here, {str(recorded.get(key))[:16]} recorded); {why}")


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ServiceStartupError(f"TRACIN_DEVICE: {device!r} is not a torch device: {exc}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ServiceStartupError(f"TRACIN_DEVICE: {device!r} requested but CUDA is not available on this machine")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ServiceStartupError(f"TRACIN_DEVICE: {device!r} but only {torch.cuda.device_count()} CUDA devices")
