"""The index directory: the contract between the indexer and the service.

    manifest.json        schema version, task, checkpoints (lr, sha256), layers, projection
                         (kind, dim, seed, fingerprint), embedding dim, count, FAISS settings, files'
                         sha256, library versions, build figures
    index.faiss          FAISS inner-product index over the embeddings (row r = training example r)
    self_influence.npy   exact sum_i lr_i ||g_i(z)||^2 per row (float64)
    examples.jsonl       one line per row: {"id", "label", "display"}
    queries.jsonl        optional held-out examples: {"id", "label", "example"}
    checkpoints/         copies of the checkpoint files, so the directory is self-contained

Written into a sibling temporary directory and renamed into place: a crash never leaves a directory
that looks whole. `IndexDirectory.open` verifies files against the manifest before anything is served.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import faiss
import numpy as np

from indexer.checkpoints import sha256_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
SELF_INFLUENCE_FILE = "self_influence.npy"
EXAMPLES_FILE = "examples.jsonl"
QUERIES_FILE = "queries.jsonl"
CHECKPOINT_DIR = "checkpoints"


class IndexDirectoryError(RuntimeError):
    """The index directory is missing, incomplete or does not match its manifest."""


def library_versions() -> dict[str, str]:
    import torch

    from indexer import __version__

    return {"tracin": __version__, "torch": torch.__version__, "faiss": faiss.__version__, "numpy": np.__version__}


class StagingDirectory:
    """A temporary sibling of `target` that becomes `target` on commit() (atomic rename)."""

    def __init__(self, target: Path, overwrite: bool = False):
        self.target = Path(target).resolve()
        if self.target.exists() and not overwrite:
            raise FileExistsError(f"{self.target} already exists (use --force to replace it)")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.target.parent / f".{self.target.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        self.overwrite = overwrite

    def commit(self) -> Path:
        _fsync_dir(self.path)
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        _fsync_dir(self.target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
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


def file_hashes(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(directory / name) for name in names}


def _read_faiss(file: Path, mmap: bool) -> faiss.Index:
    """Read the FAISS file; with mmap the vectors stay in the (shared, read-only) page cache.

    IO_FLAG_MMAP_IFC maps Flat and IVF storage in place (IO_FLAG_MMAP alone still copies Flat vectors
    into process memory in FAISS 1.15); formats it cannot map fall back to IO_FLAG_MMAP."""
    if not mmap:
        return faiss.read_index(str(file))
    try:
        return faiss.read_index(str(file), faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError:
        return faiss.read_index(str(file), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)


@dataclass
class IndexDirectory:
    """An opened, verified index directory (what the service serves)."""

    path: Path
    manifest: dict[str, Any]
    index: faiss.Index
    self_influence: np.ndarray
    examples: list[dict[str, Any]]
    queries: list[dict[str, Any]]

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def approximate(self) -> bool:
        return bool(self.manifest["faiss"]["approximate"])

    def checkpoint_paths(self) -> list[tuple[Path, float]]:
        return [(self.path / c["file"], float(c["lr"])) for c in self.manifest["checkpoints"]]

    @classmethod
    def open(cls, path: str | Path, mmap: bool = False, verify: bool = True) -> "IndexDirectory":
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise IndexDirectoryError(f"{path} is not an index directory: {MANIFEST} is missing")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise IndexDirectoryError(f"{manifest_path} is not valid JSON: {exc}") from exc
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise IndexDirectoryError(
                f"{path}: index schema version {manifest.get('schema_version')} is not {SCHEMA_VERSION}"
            )
        expected = dict(manifest.get("files", {}))
        for c in manifest["checkpoints"]:
            expected[c["file"]] = c["sha256"]
        for name, digest in expected.items():
            file = path / name
            if not file.is_file():
                raise IndexDirectoryError(f"{path} is incomplete: {name} is missing")
            if verify and sha256_file(file) != digest:
                raise IndexDirectoryError(f"{path}: {name} does not match the sha256 in the manifest")
        index = _read_faiss(path / INDEX_FILE, mmap)
        self_influence = np.load(path / SELF_INFLUENCE_FILE)
        examples = read_jsonl(path / EXAMPLES_FILE)
        queries = read_jsonl(path / QUERIES_FILE) if (path / QUERIES_FILE).is_file() else []
        count = int(manifest["count"])
        if index.ntotal != count or len(examples) != count or self_influence.shape != (count,):
            raise IndexDirectoryError(
                f"{path}: row counts disagree (manifest {count}, index {index.ntotal}, "
                f"examples {len(examples)}, self-influence {self_influence.shape[0]})"
            )
        if index.d != int(manifest["embedding_dim"]):
            raise IndexDirectoryError(f"{path}: index dim {index.d} != manifest {manifest['embedding_dim']}")
        return cls(path, manifest, index, self_influence, examples, queries)
