"""The index directory: the contract between the indexer and the service.

    manifest.json        schema version, task, checkpoints (lr, sha256), layers, projection
                         (kind, dim, seed, fingerprint), embedding dim, count, FAISS settings, files'
                         sha256, library versions, build figures (shape: `indexer.store.manifest.Manifest`)
    manifest.sha256      sha256 of manifest.json, so the manifest is covered by the integrity check too
    index.faiss          FAISS inner-product index over the embeddings (row r = training example r)
    self_influence.npy   exact sum_i lr_i ||g_i(z)||^2 per row (float64)
    label_review.npy     per row: the loss (and margin) at each checkpoint, the prediction and its
                         probability at the last one (structured; `indexer.build.review`); absent in older indexes
    input_ranges.json    per-feature ranges of the training inputs, for out-of-distribution warnings
                         (`indexer.build.input_ranges`); absent in older indexes
    examples.jsonl       one line per row: {"id", "label", "display"}
    queries.jsonl        optional held-out examples: {"id", "label", "example"}
    checkpoints/         copies of the checkpoint files, so the directory is self-contained
    row_digests.npy      a digest of each row's content (what `tracin index --update` compares); absent in older
                         indexes, which cannot be updated
    vectors.npy          the stored vectors, only where the FAISS file does not hold them exactly (IVF, PQ, ...)
    removed.json         rows marked removed by `tracin index --remove-ids` (kept out of every answer)
    CURRENT, versions/   an index that was updated: `indexer.store.versions` (CURRENT names the version served)

Written into a sibling temporary directory and renamed into place: a crash never leaves a directory
that looks whole, and a file a server may have memory-mapped is never rewritten in place (the old
directory is renamed away and its files unlinked, which leaves existing mappings intact on Linux).
`IndexDirectory.open` verifies the manifest's digest and shape, every file's sha256 and every figure
(counts, dims, learning rates against the checkpoint files) before anything is served.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import faiss
import numpy as np

from indexer.checkpoints import sha256_file
from indexer.store.manifest import (
    MANIFEST, MANIFEST_DIGEST, SCHEMA_VERSION, Manifest, ManifestError, is_index_directory, read_manifest,
)

#: HMAC-SHA256 of manifest.json under the key in TRACIN_INDEX_KEY (`sign_index`, `verify_signature`)
SIGNATURE_FILE = "manifest.hmac"
INDEX_KEY_ENV = "TRACIN_INDEX_KEY"
INDEX_FILE = "index.faiss"
#: approximate indexes only: the same vectors divided by the exact gradient norm sqrt(self-influence), so
#: normalised queries (cosine, train) rank by the normalised score over the whole index
NORMALIZED_INDEX_FILE = "index_normalized.faiss"
SELF_INFLUENCE_FILE = "self_influence.npy"
EXAMPLES_FILE = "examples.jsonl"
QUERIES_FILE = "queries.jsonl"
INPUT_RANGES_FILE = "input_ranges.json"
CHECKPOINT_DIR = "checkpoints"
#: uint8 [count, 16]: a digest of each row's content (`indexer.score.exact.row_digests`), what an update compares
ROW_DIGESTS_FILE = "row_digests.npy"
#: float32 [count, D]: the stored vectors, for factories whose FAISS file does not hold them exactly (IVF, PQ,
#: HNSW ...): what an update adds a new checkpoint's terms to
VECTORS_FILE = "vectors.npy"
#: the training rows marked removed (`tracin index --remove-ids`): {"format", "rows", "ids"}
REMOVED_FILE = "removed.json"
REMOVED_FORMAT = "tracin-removed/1"

__all__ = ["SCHEMA_VERSION", "MANIFEST", "MANIFEST_DIGEST", "IndexDirectory", "IndexDirectoryError", "IndexBuildError",
           "StagingDirectory", "check_replaceable"]


class IndexDirectoryError(RuntimeError):
    """The index directory is missing, incomplete or does not match its manifest."""


def manifest_hmac(directory: str | Path, key: str) -> str:
    """HMAC-SHA256 (hex) of `directory`/manifest.json under `key` (UTF-8). The manifest records every other
    file's sha256 (the files map, each checkpoint's sha256), so a valid signature with the files' digests
    verified covers the whole index directory."""
    import hashlib
    import hmac

    data = (Path(directory) / MANIFEST).read_bytes()
    return hmac.new(key.encode("utf-8"), data, hashlib.sha256).hexdigest()


def sign_index(directory: str | Path, key: str) -> Path:
    """Write manifest.hmac (`<hex>  manifest.json`, the sha256sum layout) for `directory` under `key`
    (`tracin index` does it when TRACIN_INDEX_KEY is set). ValueError on an empty key."""
    if not key or not key.strip():
        raise ValueError(f"{INDEX_KEY_ENV} is empty")
    out = Path(directory) / SIGNATURE_FILE
    out.write_text(f"{manifest_hmac(directory, key)}  {MANIFEST}\n")
    return out


def verify_signature(directory: str | Path, key: str) -> None:
    """Refuse (IndexDirectoryError, one line) an index directory whose manifest.hmac is missing, malformed or
    not the HMAC-SHA256 of its manifest.json under `key` (compared in constant time)."""
    import hmac

    directory = Path(directory)
    file = directory / SIGNATURE_FILE
    if not (directory / MANIFEST).is_file():
        raise IndexDirectoryError(f"{directory} is not an index directory: {MANIFEST} is missing")
    if not file.is_file() or file.is_symlink():
        raise IndexDirectoryError(f"{directory}: {INDEX_KEY_ENV} is set but the index is not signed (no "
                                  f"{SIGNATURE_FILE}); build it with {INDEX_KEY_ENV} set, or sign it where it was "
                                  "built (indexer.store.directory.sign_index)")
    parts = file.read_text(errors="replace").split()
    if len(parts) != 2 or parts[1] != MANIFEST or len(parts[0]) != 64:
        raise IndexDirectoryError(f"{directory}: {SIGNATURE_FILE} is malformed (expected '<64 hex digits>  "
                                  f"{MANIFEST}')")
    if not hmac.compare_digest(parts[0], manifest_hmac(directory, key)):
        raise IndexDirectoryError(f"{directory}: {SIGNATURE_FILE} does not match {MANIFEST} under {INDEX_KEY_ENV} "
                                  "(signed with another key, or the manifest was edited)")


class IndexBuildError(RuntimeError):
    """A build cannot start or cannot go on (lock held, --force refused, disk space, non-finite
    embeddings, a task breaking its contract); the message is one line for the user."""


def library_versions() -> dict[str, str]:
    import torch

    from indexer import __version__

    return {"tracin": __version__, "torch": torch.__version__, "faiss": faiss.__version__, "numpy": np.__version__}


class StagingDirectory:
    """A temporary sibling of `target` that becomes `target` on commit() (atomic rename).

    With `overwrite`, an existing `target` must pass `check_replaceable` (an index directory and
    nothing else); it is renamed away at commit and its files unlinked, never rewritten in place, so a
    server that memory-mapped them keeps its mapping. Raises FileExistsError (exists, no overwrite)
    or IndexBuildError (not replaceable)."""

    def __init__(self, target: Path, overwrite: bool = False, protected: Iterable[Path] = ()):
        self.target = Path(target).resolve()
        self.protected = [Path(p) for p in protected]
        if self.target.exists() or self.target.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{self.target} already exists (use --force to replace it)")
            check_replaceable(self.target, self.protected)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.target.parent / f".{self.target.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        self.overwrite = overwrite

    def commit(self) -> Path:
        """fsync the staged files, rename the old target away, rename the staging directory into place,
        then unlink the old files."""
        for file in sorted(self.path.rglob("*")):
            if file.is_file():
                fsync_path(file)
        fsync_path(self.path)
        old = None
        if self.target.exists():
            check_replaceable(self.target, self.protected)  # still ours (checked again just before)
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        fsync_path(self.target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _inside(path: Path, directory: Path) -> bool:
    try:
        Path(path).resolve().relative_to(directory)
        return True
    except ValueError:
        return False


def check_replaceable(target: Path, protected: Iterable[Path] = ()) -> None:
    """Refuse (IndexBuildError, one line) to replace `target` unless it is an empty directory or an
    index directory written by tracin holding only the files its manifest lists, and none of
    `protected` (the config, the checkpoints, the working directory) lies inside it."""
    target = Path(target)
    if target.is_symlink() or not target.is_dir():
        raise IndexBuildError(f"--force: {target} is not a directory; it is left as it is")
    resolved = target.resolve()
    for path in [*protected, Path.cwd()]:
        if _inside(path, resolved):
            what = "the current directory" if path == Path.cwd() else str(path)
            raise IndexBuildError(f"--force: {target} contains {what}; it is not replaced (choose another --out)")
    entries = list(target.iterdir())
    if not entries:
        return
    if not is_index_directory(target):
        raise IndexBuildError(f"--force: {target} is not an index directory (no tracin {MANIFEST}); --force only "
                              "replaces index directories, so it is left as it is (choose another --out)")
    unknown = _unknown_files(target)
    if unknown:
        raise IndexBuildError(f"--force: {target} holds files that are not part of its index ({', '.join(unknown[:3])}"
                              f"{', ...' if len(unknown) > 3 else ''}); it is left as it is (move them or choose "
                              "another --out)")


def _unknown_files(target: Path, top: bool = True) -> list[str]:
    """Paths inside the index directory `target` that are not part of it: not listed in its manifest, links,
    or (at the top) anything under versions/ but whole versions (each checked the same way), an update's
    staging folders and the CURRENT pointer (`indexer.store.versions`)."""
    from indexer.store import versions as v

    try:
        raw = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [MANIFEST]
    raw = raw if isinstance(raw, dict) else {}
    known = {MANIFEST, MANIFEST_DIGEST, SIGNATURE_FILE, *[str(k) for k in raw.get("files", {}) or {}]}
    for entry in raw.get("checkpoints") or []:
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            known.add(entry["file"])
    folders = {str(Path(name).parent) for name in known} - {"."}
    unknown = []
    versions_dir = target / v.VERSIONS_DIR
    for path in sorted(target.rglob("*")):
        name = path.relative_to(target).as_posix()
        if top and (path == versions_dir or versions_dir in path.parents):
            continue
        if top and (name == v.CURRENT or v.POINTER_TMP_NAME.match(name)) and path.is_file() \
                and not path.is_symlink():
            continue
        if path.is_dir() and not path.is_symlink() and name in folders:
            continue
        if name not in known or path.is_symlink() or not path.is_file():
            unknown.append(name)
    if top and versions_dir.exists():
        if versions_dir.is_symlink() or not versions_dir.is_dir():
            return unknown + [v.VERSIONS_DIR]
        for entry in sorted(versions_dir.iterdir()):
            name = f"{v.VERSIONS_DIR}/{entry.name}"
            if entry.is_symlink() or not entry.is_dir():
                unknown.append(name)
            elif v.STAGING_NAME.match(entry.name):
                continue  # an interrupted update's staging folder
            elif not v.VERSION_NAME.match(entry.name) or not is_index_directory(entry):
                unknown.append(name)
            else:
                unknown += [f"{name}/{n}" for n in _unknown_files(entry, top=False)]
    return unknown


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (best effort: some filesystems refuse either)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_jsonl(path: Path, rows: Iterator[dict[str, Any]]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, separators=(",", ":"), allow_nan=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


class JsonlRows:
    """The rows of examples.jsonl read on demand: `rows[i]` parses line i (pread of its byte range), so a
    million-row table costs its offsets ([N + 1] int64), ids and labels in memory, not every display
    field. One sequential pass at open checks that every line is a JSON object with an id and a label
    and collects `ids` (str), `labels` (JSON values) and `flags` (boolean display fields present on
    every row -> bool [N]). Raises IndexDirectoryError naming the file and row."""

    def __init__(self, path: Path):
        self.path = Path(path)
        # one descriptor for the table's life: a rebuild that replaces the file (tracin index --force) leaves
        # this server reading the file it verified, never new bytes through old offsets
        self._fd: int | None = os.open(self.path, os.O_RDONLY)
        offsets, ids, labels = [0], [], []
        flag_values: dict[str, list] | None = None
        position = 0
        with os.fdopen(os.dup(self._fd), "rb") as handle:
            for row, line in enumerate(handle):
                position += len(line)
                if not line.strip():
                    raise IndexDirectoryError(f"{self.path.parent}: {self.path.name} row {row} is empty")
                try:
                    ex = json.loads(line)
                except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                    raise IndexDirectoryError(f"{self.path.parent}: {self.path.name} is not valid JSON lines: "
                                              f"row {row}: {exc}") from None
                if not isinstance(ex, dict) or "id" not in ex or "label" not in ex:
                    raise IndexDirectoryError(f"{self.path.parent}: {self.path.name} row {row} is not an object "
                                              "with an id and a label")
                offsets.append(position)
                ids.append(str(ex["id"]))
                labels.append(ex["label"])
                display = ex.get("display") if isinstance(ex.get("display"), dict) else {}
                if flag_values is None:
                    flag_values = {k: [] for k, v in display.items() if isinstance(v, bool)}
                for name in list(flag_values):
                    value = display.get(name)
                    if isinstance(value, bool):
                        flag_values[name].append(value)
                    else:
                        del flag_values[name]
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.ids, self.labels = ids, labels
        self.flags = {name: np.asarray(v, dtype=bool) for name, v in sorted((flag_values or {}).items())}

    def __len__(self) -> int:
        return len(self.ids)

    def __bool__(self) -> bool:
        return len(self.ids) > 0

    def _line(self, row: int) -> bytes:
        start, stop = int(self.offsets[row]), int(self.offsets[row + 1])
        return os.pread(self._fd, stop - start, start)

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        row = int(row)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range 0..{len(self) - 1}")
        return json.loads(self._line(row))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for row in range(len(self)):
            yield self[row]

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


def file_hashes(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(directory / name) for name in names}


def _read_faiss(file: Path, mmap: bool) -> faiss.Index:
    """Read the FAISS file (`indexer.store.faiss_build.read_index`): an on-disk IVF's .ivfdata is read from this
    directory only; with mmap the vectors stay in the (shared, read-only) page cache (IO_FLAG_MMAP_IFC maps
    Flat, refine and IVF storage in place; formats it cannot map, e.g. HNSW or PQ, are read into memory)."""
    from indexer.store.faiss_build import read_index

    return read_index(file, mmap)


@dataclass
class IndexDirectory:
    """An opened, verified index directory (what the service serves).

    `manifest` is the raw manifest dict (validated: `model` is its `indexer.store.manifest.Manifest`)."""

    path: Path
    manifest: dict[str, Any]
    index: faiss.Index
    self_influence: np.ndarray
    examples: "JsonlRows"  # rows parsed on demand; .ids, .labels, .flags collected at open
    queries: list[dict[str, Any]]
    model: Manifest | None = None
    label_review: np.ndarray | None = None  # label_review.npy (None: an index built before it existed)
    input_ranges: Any = None  # indexer.build.input_ranges.InputRanges (None: an index built before them)
    normalized_index: faiss.Index | None = None
    #: which version of its index directory this is (`indexer.store.versions.Version`)
    version: Any = None
    #: int64 [r], sorted: rows marked removed (`tracin index --remove-ids`), kept out of every answer
    removed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def approximate(self) -> bool:
        return bool(self.manifest["faiss"]["approximate"])

    def checkpoint_paths(self) -> list[tuple[Path, float]]:
        return [(self.path / c["file"], float(c["lr"])) for c in self.manifest["checkpoints"]]

    def checkpoints(self, blocks) -> list:
        """The index's checkpoints (`indexer.sketch.embedding.Checkpoint`) with the step weights of the traced
        `blocks` (`indexer.capture.blocks.TracedBlock`), read from each checkpoint's `step` entry and its
        weights file (an index without `step` entries weighs every parameter by the checkpoint's lr). Raises
        IndexDirectoryError (one line naming the checkpoint and file) when they do not fit the blocks."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from indexer.optimizer.state import OptimizerError
        from indexer.optimizer.step import StepWeights
        from indexer.sketch.embedding import Checkpoint

        shapes = {p: tuple(s) for b in blocks for p, s in zip(b.params, b.shapes)}
        out = []
        for i, entry in enumerate(self.model.checkpoints):
            step = None
            if entry.step is not None:
                where = f"{self.path}: checkpoints[{i}].step"
                listed = [p for g in entry.step.groups for p in g.params]
                if set(listed) != set(shapes):
                    raise IndexDirectoryError(f"{where}: its groups list {sorted(set(listed) ^ set(shapes))[:5]} "
                                              "differently from the traced parameters")
                try:
                    tensors = load_file(str(self.path / entry.step.file)) if entry.step.file else {}
                except (OSError, SafetensorError) as exc:
                    raise IndexDirectoryError(f"{where}: cannot read {entry.step.file}: {exc}") from None
                for name, tensor in tensors.items():
                    if tuple(tensor.shape) != shapes.get(name):
                        raise IndexDirectoryError(f"{where}: {entry.step.file} holds {name!r} {tuple(tensor.shape)}, "
                                                  "not a traced parameter of that shape")
                try:
                    step = StepWeights.from_json(entry.step.model_dump(), tensors, list(shapes), where)
                except OptimizerError as exc:
                    raise IndexDirectoryError(str(exc)) from None
            out.append(Checkpoint(self.path / entry.file, float(entry.lr), step))
        return out

    @classmethod
    def open(cls, path: str | Path, mmap: bool = False, verify: bool = True) -> "IndexDirectory":
        """Open `path`, refusing with IndexDirectoryError (one line) unless: manifest.json matches
        manifest.sha256 and has the shape of `indexer.store.manifest.Manifest`; every file it lists exists (and,
        with `verify`, matches its sha256); the FAISS index has `count` rows of `embedding_dim`
        inner-product vectors; self_influence.npy is float64 [count], finite and >= 0; examples.jsonl has
        `count` rows with an id and a label; each checkpoint's lr equals the lr its file records (when it
        records one). The manifest digest is checked even without `verify` (it is small)."""
        from indexer.store.versions import VersionError, resolve

        try:  # an updated index directory: the version its CURRENT pointer names (indexer.store.versions)
            version = resolve(path)
        except (VersionError, OSError) as exc:
            raise IndexDirectoryError(str(exc)) from None
        path = version.directory
        for name in (MANIFEST, MANIFEST_DIGEST):
            if (path / name).is_symlink():
                _check_member(path, name)
        try:
            model, manifest = read_manifest(path)
        except ManifestError as exc:
            raise IndexDirectoryError(str(exc)) from None
        for name, digest in model.required_files().items():
            file = path / name
            _check_member(path, name)
            if verify and sha256_file(file) != digest:
                raise IndexDirectoryError(f"{path}: {name} does not match the sha256 in the manifest")
        try:
            index = _read_faiss(path / model.faiss.file, mmap)
        except RuntimeError as exc:
            raise IndexDirectoryError(f"{path}: cannot read {model.faiss.file}: {_last_line(exc)}") from None
        try:
            self_influence = np.load(path / SELF_INFLUENCE_FILE, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise IndexDirectoryError(f"{path}: cannot read {SELF_INFLUENCE_FILE}: {exc}") from None
        examples = JsonlRows(path / EXAMPLES_FILE)
        queries = _read_rows(path, QUERIES_FILE) if QUERIES_FILE in model.files else []  # only a covered file
        count, dim = model.count, model.embedding_dim
        if index.ntotal != count or len(examples) != count or self_influence.shape != (count,):
            raise IndexDirectoryError(
                f"{path}: row counts disagree (manifest {count}, index {index.ntotal}, "
                f"examples {len(examples)}, self-influence {self_influence.shape[0] if self_influence.ndim else 0})"
            )
        if index.d != dim:
            raise IndexDirectoryError(f"{path}: index dim {index.d} != manifest embedding_dim {dim}")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexDirectoryError(f"{path}: {model.faiss.file} is not an inner-product index")
        if self_influence.dtype != np.float64:
            raise IndexDirectoryError(f"{path}: {SELF_INFLUENCE_FILE} is {self_influence.dtype}, not float64")
        bad = np.flatnonzero(~np.isfinite(self_influence) | (self_influence < 0))
        if bad.size:
            raise IndexDirectoryError(f"{path}: {SELF_INFLUENCE_FILE} row {int(bad[0])} is "
                                      f"{self_influence[bad[0]]!r} (self-influence is finite and >= 0)")
        _check_recorded_lrs(path, model)
        review = _read_label_review(path, model) if model.label_review is not None else None
        ranges = _read_input_ranges(path) if INPUT_RANGES_FILE in model.files else None  # only a covered file
        normalized = None
        if NORMALIZED_INDEX_FILE in model.files:
            try:
                normalized = _read_faiss(path / NORMALIZED_INDEX_FILE, mmap)
            except RuntimeError as exc:
                raise IndexDirectoryError(f"{path}: cannot read {NORMALIZED_INDEX_FILE}: {_last_line(exc)}") from None
            if normalized.ntotal != count or normalized.d != dim:
                raise IndexDirectoryError(f"{path}: {NORMALIZED_INDEX_FILE} has {normalized.ntotal} x {normalized.d} "
                                          f"vectors, not {count} x {dim}")
        removed = _read_removed(path, examples) if REMOVED_FILE in model.files else np.zeros(0, dtype=np.int64)
        return cls(path, manifest, index, self_influence, examples, queries, model, review, ranges,
                   normalized_index=normalized, version=version, removed=removed)


def read_removed_file(file: Path, ids: list[str]) -> np.ndarray:
    """The rows of removed.json, int64 [r] sorted, checked against the examples table's `ids` (each listed
    row's id must be the id recorded beside it). ValueError (one line) otherwise."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{Path(file).name} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != REMOVED_FORMAT:
        raise ValueError(f"{Path(file).name} is not a {REMOVED_FORMAT} file")
    rows, listed = data.get("rows"), data.get("ids")
    if not isinstance(rows, list) or not isinstance(listed, list) or len(rows) != len(listed) \
            or not all(type(r) is int for r in rows) or not all(isinstance(i, str) for i in listed):
        raise ValueError(f"{Path(file).name}: rows (integers) and ids (strings) must be lists of one length")
    array = np.asarray(rows, dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() >= len(ids) or (np.diff(array) <= 0).any()):
        raise ValueError(f"{Path(file).name}: rows must be increasing row numbers in 0..{len(ids) - 1}")
    if array.size >= len(ids):
        raise ValueError(f"{Path(file).name}: every row is marked removed")
    for row, example_id in zip(rows, listed):
        if ids[row] != example_id:
            raise ValueError(f"{Path(file).name}: row {row} is {ids[row][:100]!r} in the examples table, "
                             f"{example_id[:100]!r} here")
    return array


def _read_removed(path: Path, examples: "JsonlRows") -> np.ndarray:
    try:
        return read_removed_file(path / REMOVED_FILE, examples.ids)
    except ValueError as exc:
        raise IndexDirectoryError(f"{path}: {exc}") from None


def _check_member(path: Path, name: str) -> None:
    """Refuse (IndexDirectoryError, one line) a file of the index directory `path` that is not a regular file
    inside it: missing, a symlink or under a symlinked folder (never followed, even to a file inside: an
    index directory reads nothing outside itself), another kind of file, or outside the directory."""
    current = path
    for part in Path(name).parts:
        current = current / part
        if current.is_symlink():
            link = current.relative_to(path).as_posix()
            where = "" if link == name else f" (under the symlinked folder {link})"
            raise IndexDirectoryError(f"{path}: {name} is a symlink{where}, refused: an index directory holds its "
                                      "files itself (replace the link by a copy of the file it points to)")
    file = path / name
    if not file.exists():
        raise IndexDirectoryError(f"{path} is incomplete: {name} is missing")
    if not file.is_file():
        raise IndexDirectoryError(f"{path}: {name} is not a regular file")
    if not _inside(file, path.resolve()):
        raise IndexDirectoryError(f"{path}: {name} lies outside the index directory")


def _read_input_ranges(path: Path):
    from indexer.build.input_ranges import InputRanges, InputRangesError

    try:
        return InputRanges.from_json(json.loads((path / INPUT_RANGES_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:  # JSON, decoding and InputRangesError are ValueErrors
        raise IndexDirectoryError(f"{path}: {INPUT_RANGES_FILE} {exc}") from None


def _read_label_review(path: Path, model: Manifest) -> np.ndarray:
    """label_review.npy, validated against the manifest (`indexer.build.review.check_table`)."""
    from indexer.build.review import ReviewError, available_rankings, check_table

    name = model.label_review.file
    try:
        table = np.load(path / name, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise IndexDirectoryError(f"{path}: cannot read {name}: {exc}") from None
    task = model.task
    kind = task.label_kind or "class"
    width = task.label_width or 0
    classes = len(task.class_names) if task.class_names else None
    try:
        check_table(table, kind, model.count, len(model.checkpoints), int(width), classes)
    except ReviewError as exc:
        raise IndexDirectoryError(f"{path}: {name} {exc}") from None
    if list(table.dtype.names) != list(model.label_review.fields) or \
            available_rankings(table) != list(model.label_review.rankings):
        raise IndexDirectoryError(f"{path}: {name} has fields {list(table.dtype.names)}, the manifest says "
                                  f"{list(model.label_review.fields)}")
    return table


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _read_rows(path: Path, name: str) -> list[dict[str, Any]]:
    try:
        return read_jsonl(path / name)
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise IndexDirectoryError(f"{path}: {name} is not valid JSON lines: {exc}") from None


def _check_recorded_lrs(path: Path, model: Manifest) -> None:
    """Each checkpoint's manifest lr must equal the lr its file records (when it records one)."""
    from indexer.checkpoints import CheckpointError, load_checkpoint, recorded_lr

    for i, entry in enumerate(model.checkpoints):
        try:
            _, meta = load_checkpoint(path / entry.file)
            recorded = recorded_lr(meta, f"{entry.file}")
        except CheckpointError as exc:
            raise IndexDirectoryError(f"{path}: checkpoints[{i}]: {exc}") from None
        if recorded is not None and not math.isclose(recorded, entry.lr, rel_tol=1e-9, abs_tol=0.0):
            raise IndexDirectoryError(f"{path}: checkpoints[{i}].lr is {entry.lr!r} in the manifest but "
                                      f"{entry.file} records lr {recorded!r}")
