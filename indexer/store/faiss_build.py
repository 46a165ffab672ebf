"""The FAISS stage of a build: writing the index file from row-chunked vectors, in bounded memory.

The vectors come from one `.npy` file (a single-process build) or from the shards of a distributed
build, read in row blocks (`RowSource`), never as one array:

- **Flat** (exact inner product): the FAISS file is streamed, header then rows, so writing it holds one
  block (`write_flat`). Its layout (FAISS `write_index` of an `IndexFlatIP`: fourcc "IxFI", d int32,
  ntotal int64, two int64 placeholders, is_trained byte, metric int32, then a uint64 count of floats and
  the float32 rows) is checked against FAISS itself on every write (`_flat_header`), so a FAISS that
  changed it makes the build fail, never write a file FAISS would misread.
- **IVF** (`IVFn,Flat`, `IVFn,PQm`, `IVFn,SQ8`, with or without a pre-transform such as `OPQ`): trained on a
  sample of `index.train_sample` rows, filled block by block into block files of `block_rows` rows that
  are then merged into FAISS on-disk inverted lists (`_fill_ondisk`, as `faiss.contrib.ondisk` does): the codes go to
  `<index>.ivfdata` beside the index file, which only holds the quantizer. The service memory-maps that
  file (page cache, shared by replicas on one machine); `IO_FLAG_ONDISK_SAME_DIR` makes FAISS read it
  from the index's own directory, never from the path recorded at build time.
- **A low-dimensional exhaustive scan with a refine stage** (`PCA32,Flat,RFlat`, the scale default:
  every row is scanned in 32 numbers, the best k x k_factor are re-scored with the stored float32
  vectors): streamed like Flat, in two passes (the projected rows, then the full rows), the file
  FAISS writes for an `IndexRefineFlat`, checked against FAISS's own serialisation of the same trained
  index holding a few rows on every write. No clustering: unlike IVF's probes (which miss proponents of
  large gradient norm in clusters of other directions), nothing is skipped.
- Anything else (HNSW, PQ without IVF, other refine stages): built in memory as FAISS does, which holds
  every code in memory: `storage` = "in-memory" says so.

PCA directly in front of an exhaustive Flat (`PCA32,Flat,RFlat`, `PCA64,Flat`) is applied without its
centring (x -> A x, not A (x - mean)): a mean offset adds -<A x, A mean> to each row's score and changes
the ranking (`_uncentre`). (A PCA in front of an IVF keeps FAISS's centring: the IVF was trained on
centred vectors.)

Peak memory of the stage: one block of rows ([block, D] float32), the training sample
([train_sample, D] float32), the trained index, and for in-memory factories the whole index.
"""
from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import faiss
import numpy as np

from indexer.store.search import build_faiss_index, index_stages, is_approximate, pca_transforms, top_k

BLOCK_ROWS = 65536  # rows read (and added) at a time


class _Blocks:
    """`blocks()` for a row source that slices: (start, float32 rows) of every block, in order."""

    shape: tuple[int, int]

    def blocks(self, size: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.shape[0], size):
            yield start, self[start:min(start + size, self.shape[0])]


class RowSource(_Blocks):
    """Float32 [count, dim] vectors stored in one or more `.npy` row files ("parts", each a contiguous
    range of rows in order), read by blocks with pread: nothing is memory-mapped, so reading all of it
    keeps only a block in process memory. Slicing (`source[a:b]`, `source[sorted int rows]`) returns a
    float32 array; `blocks()` iterates (start, rows) over everything."""

    def __init__(self, parts: Sequence[Path | str], dim: int):
        self.dim = int(dim)
        self.parts: list[tuple[int, int, Path, int]] = []  # (first row, end row, file, byte offset of row 0)
        start = 0
        for part in parts:
            rows, offset = _npy_rows(Path(part), self.dim)
            self.parts.append((start, start + rows, Path(part), offset))
            start += rows
        self.shape = (start, self.dim)

    def __len__(self) -> int:
        return self.shape[0]

    def part_rows(self) -> list[int]:
        """Rows of each part, in order."""
        return [hi - lo for lo, hi, _, _ in self.parts]

    def _read_into(self, out: np.ndarray, part: tuple, first: int, rows: np.ndarray | None, at: int,
                   count: int) -> None:
        """Rows first..first+count of `part` (or its sorted `rows`) into out[at:], read-only (O_RDONLY)."""
        lo, _, path, offset = part
        row_bytes = self.dim * 4
        fd = os.open(path, os.O_RDONLY)
        try:
            if rows is None:
                data = os.pread(fd, count * row_bytes, offset + (first - lo) * row_bytes)
                if len(data) != count * row_bytes:
                    raise OSError(errno.EIO, f"short read from {path}")
                out[at:at + count] = np.frombuffer(data, dtype="<f4").reshape(count, self.dim)
            else:
                for i, row in enumerate(rows):
                    data = os.pread(fd, row_bytes, offset + (int(row) - lo) * row_bytes)
                    if len(data) != row_bytes:
                        raise OSError(errno.EIO, f"short read from {path}")
                    out[at + i] = np.frombuffer(data, dtype="<f4")
        finally:
            os.close(fd)

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(0, stop - start), self.dim), dtype=np.float32)
        for part in self.parts:
            a, b = max(start, part[0]), min(stop, part[1])
            if a < b:
                self._read_into(out, part, a, None, a - start, b - a)
        return out

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.shape[0])
            if step != 1:
                raise IndexError("RowSource: slices must have step 1")
            return self._read(start, stop)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"RowSource: rows must be in 0..{self.shape[0] - 1}")
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        gathered = np.empty_like(out)
        for part in self.parts:
            a, b = np.searchsorted(sorted_rows, [part[0], part[1]])
            if a < b:
                self._read_into(gathered, part, 0, sorted_rows[a:b], int(a), int(b - a))
        out[order] = gathered
        return out


class Normalized(_Blocks):
    """Vectors / sqrt(self-influence) by row (rows with zero self-influence stay zero): the rows of the
    normalised twin index, sliced like the `RowSource` it wraps, without a second copy."""

    def __init__(self, vectors, self_influence: np.ndarray):
        self.vectors = vectors
        norms = np.sqrt(np.asarray(self_influence, dtype=np.float64))
        self.inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0).astype(np.float32)
        self.shape = vectors.shape

    def __getitem__(self, rows):
        return np.asarray(self.vectors[rows], dtype=np.float32) * self.inverse[rows][:, None]


class ArrayRows(_Blocks):
    """An in-memory (or memory-mapped) [N, D] array seen as a row source."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape = array, array.shape

    def __getitem__(self, rows) -> np.ndarray:
        return np.ascontiguousarray(self.array[rows], dtype=np.float32)


class ConcatRows(_Blocks):
    """Row sources of one width stacked in order (an update: the stored rows it keeps, then the rows it
    embedded), sliced like one `RowSource` without a copy of the whole."""

    def __init__(self, parts: Sequence):
        self.parts = [as_rows(p) for p in parts if p.shape[0]]
        dims = {p.shape[1] for p in self.parts}
        if len(dims) > 1:
            raise ValueError(f"ConcatRows: parts of different widths {sorted(dims)}")
        self.starts = np.cumsum([0] + [p.shape[0] for p in self.parts])
        self.shape = (int(self.starts[-1]), dims.pop() if dims else 0)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.shape[0])
            if step != 1:
                raise IndexError("ConcatRows: slices must have step 1")
            out = [p[max(start, lo) - lo:min(stop, hi) - lo] for p, lo, hi in
                   zip(self.parts, self.starts[:-1], self.starts[1:]) if max(start, lo) < min(stop, hi)]
            return np.concatenate(out).astype(np.float32, copy=False) if out else \
                np.empty((0, self.shape[1]), np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, self.shape[1]), dtype=np.float32)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        for i, (p, lo) in enumerate(zip(self.parts, self.starts[:-1])):
            at = np.flatnonzero(part == i)
            if at.size:
                out[at] = p[rows[at] - lo]
        return out


class FlatRows(_Blocks):
    """The float32 rows an IndexFlat holds (a Flat index, or the refine stage of a `PCA..,RFlat` one), read back
    exactly (a view of FAISS's storage, memory-mapped where the index was read so)."""

    def __init__(self, flat):
        self.flat = flat  # keeps the storage alive
        count, dim = int(flat.ntotal), int(flat.d)
        self.view = faiss.rev_swig_ptr(flat.get_xb(), count * dim).reshape(count, dim) if count else \
            np.empty((0, dim), np.float32)
        self.shape = (count, dim)

    def __getitem__(self, rows) -> np.ndarray:
        return np.array(self.view[rows], dtype=np.float32)


def as_rows(vectors):
    """A row source (`blocks()` and row slicing) for `vectors`: returned as is when it is one, else an
    `ArrayRows` of the array."""
    return vectors if hasattr(vectors, "blocks") else ArrayRows(np.asarray(vectors))


@dataclass
class WrittenIndex:
    """What `write_index` wrote: the files (names in the index's directory), the index (read back from
    disk for an on-disk IVF), whether it is approximate, and how it holds its codes: "stream" (Flat),
    "on-disk" (IVF lists in the .ivfdata file) or "in-memory"."""

    files: list[str]
    index: faiss.Index
    approximate: bool
    storage: str
    #: the serialised trained, empty index this one was filled from (None for Flat, which trains nothing)
    trained: bytes | None = None


def write_index(factory: str, vectors, path: Path, train_sample: int, work: Path,
                block_rows: int | None = None, log: Callable[[str], None] | None = None,
                trained: bytes | None = None) -> WrittenIndex:
    """Write the FAISS index (inner product) of `vectors` (a `RowSource` or `Normalized`) to `path`.

    `work` holds the temporary block files of an IVF build (removed here). `trained` (an update): the
    serialised trained, empty index of an earlier build of the same factory and dim, filled instead of
    training a new one (ValueError when it is not one). Raises ValueError naming index.factory for a
    factory FAISS cannot build, OSError for a full disk, RuntimeError for a FAISS layout this writer does
    not recognise (Flat)."""
    block_rows = block_rows or BLOCK_ROWS
    vectors = as_rows(vectors)
    count, dim = vectors.shape
    index = build_faiss_index(factory, dim)
    if isinstance(faiss.downcast_index(index), faiss.IndexFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT:
        write_flat(vectors, path, block_rows)
        return WrittenIndex([path.name], read_index(path, mmap=True), False, "stream")
    if trained is not None:
        earlier = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
        if type(faiss.downcast_index(earlier)) is not type(faiss.downcast_index(index)) or earlier.d != dim \
                or not earlier.is_trained or earlier.ntotal != 0:
            raise ValueError(f"index.factory: the trained structure kept for {factory!r} is not a trained, empty "
                             f"index of that factory and dim {dim}")
        index = earlier
    elif not index.is_trained:
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(count, size=min(count, train_sample), replace=False))
        if log:
            log(f"training {factory} on {sample.size:,} of {count:,} vectors")
        index.train(np.ascontiguousarray(vectors[sample]))
        del sample
    _uncentre(index)
    blob = bytes(faiss.serialize_index(index))  # trained and still empty
    if _streamable_refine(index) is not None:
        write_refine_flat(index, vectors, path, block_rows)
        return WrittenIndex([path.name], read_index(path, mmap=True), True, "stream", blob)
    if _ondisk_ivf(index) is not None and count:
        data = path.with_suffix(".ivfdata")
        _fill_ondisk(index, vectors, data, work, block_rows, log)
        faiss.write_index(index, str(path))
        del index
        written = read_index(path)
        return WrittenIndex([path.name, data.name], written, is_approximate(written), "on-disk", blob)
    for start, block in vectors.blocks(block_rows):
        index.add(block)
    faiss.write_index(index, str(path))
    return WrittenIndex([path.name], index, is_approximate(index), "in-memory", blob)


def _ondisk_ivf(index) -> faiss.IndexIVF | None:
    """The IndexIVF whose inverted lists can go on disk: the index itself, or the last stage of a
    pre-transform chain (OPQ, PCA). None for a refine stage, HNSW, PQ alone and others."""
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexPreTransform):
        base = faiss.downcast_index(base.index)
    if isinstance(base, faiss.IndexIVF) and not isinstance(base, faiss.IndexIVFPQR):
        return base
    return None


def _fill_ondisk(index, vectors, data: Path, work: Path, block_rows: int, log) -> None:
    """Add `vectors` block by block (each block into a copy of the trained index, written to `work`),
    then merge the blocks' inverted lists into FAISS OnDiskInvertedLists in `data` (what
    `faiss.contrib.ondisk.merge_ondisk` does, but the block indexes stay owned here and are freed after
    the merge, so their memory maps are not kept for the life of the process)."""
    work.mkdir(parents=True, exist_ok=True)
    trained = faiss.serialize_index(index)
    names: list[str] = []
    opened: list = []
    try:
        for start, block in vectors.blocks(block_rows):
            part = faiss.deserialize_index(trained)
            part.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
            names.append(str(work / f"block-{len(names):05d}.index"))
            faiss.write_index(part, names[-1])
            del part
        if log:
            log(f"merging {len(names)} blocks into on-disk inverted lists ({data.name})")
        if data.exists():
            data.unlink()
        opened = [faiss.read_index(name, faiss.IO_FLAG_MMAP) for name in names]  # mapped, not loaded
        lists = faiss.InvertedListsPtrVector()
        for block_index in opened:
            lists.push_back(faiss.extract_index_ivf(block_index).invlists)
        target = faiss.extract_index_ivf(index)
        ondisk = faiss.OnDiskInvertedLists(target.nlist, target.code_size, str(data))
        ntotal = ondisk.merge_from_multiple(lists.data(), lists.size(), False)
        index.ntotal = target.ntotal = ntotal
        target.replace_invlists(ondisk, True)
        ondisk.this.disown()  # owned by the index now
        del lists
    finally:
        opened.clear()  # frees the block indexes and unmaps their files
        for name in names:
            Path(name).unlink(missing_ok=True)


def _uncentre(index) -> None:
    """PCA without its mean offset (x -> A x, see the module docstring) in every pre-transform chain that
    feeds an exhaustive Flat directly (nothing behind it was trained on centred vectors)."""
    for stage in index_stages(index):
        if isinstance(stage, faiss.IndexPreTransform) and isinstance(faiss.downcast_index(stage.index), faiss.IndexFlat):
            for transform in pca_transforms(stage):
                transform.have_bias = False


def _streamable_refine(index):
    """(base pre-transform chain or None, base Flat dim) when `index` is an IndexRefineFlat whose base is an
    exhaustive inner-product Flat (maybe behind pre-transforms) and whose refine index is a Flat; else None."""
    top = faiss.downcast_index(index)
    if not isinstance(top, faiss.IndexRefineFlat):
        return None
    refine = faiss.downcast_index(top.refine_index)
    base = faiss.downcast_index(top.base_index)
    chain = None
    if isinstance(base, faiss.IndexPreTransform):
        chain, base = base, faiss.downcast_index(base.index)
    flat = (faiss.IndexFlat,)
    if not (isinstance(base, flat) and isinstance(refine, flat) and base.metric_type == faiss.METRIC_INNER_PRODUCT
            and refine.metric_type == faiss.METRIC_INNER_PRODUCT):
        return None
    return chain, base.d


def write_refine_flat(index, vectors, path: Path, block_rows: int | None = None) -> None:
    """Stream the FAISS file of the trained, empty IndexRefineFlat `index` holding `vectors` [N, D]: its
    serialisation with both Flat parts spliced in (the base's rows through its pre-transforms, then the
    full rows), one block in memory at a time. The bytes are checked against FAISS's serialisation of
    the same index holding the first rows (RuntimeError if they differ)."""
    block_rows = block_rows or BLOCK_ROWS
    count = vectors.shape[0]

    def pieces(rows) -> Iterator[bytes]:
        yield from _refine_bytes(index, rows, count_of=lambda: rows.shape[0], block_rows=block_rows)

    probe = ArrayRows(np.asarray(vectors[0:min(3, count)], dtype=np.float32))
    reference = faiss.deserialize_index(faiss.serialize_index(index))
    reference.add(probe.array)
    if b"".join(pieces(probe)) != bytes(faiss.serialize_index(reference)):
        raise RuntimeError("this FAISS writes IndexRefineFlat files in a layout the streaming writer does not know")
    with open(path, "wb") as handle:
        for piece in pieces(vectors):
            handle.write(piece)
        handle.flush()
        os.fsync(handle.fileno())


def _refine_bytes(index, rows, count_of, block_rows: int) -> Iterator[bytes]:
    chain, base_dim = _streamable_refine(index)
    dim = index.d
    blob = bytes(faiss.serialize_index(index))
    empty_base = bytes(faiss.serialize_index(faiss.IndexFlatIP(base_dim)))
    empty_refine = bytes(faiss.serialize_index(faiss.IndexFlatIP(dim)))
    tail = len(empty_base) + len(empty_refine) + 4  # the two empty Flats, then k_factor (float32)
    if blob[-tail:-4] != empty_base + empty_refine or blob[:4] != b"IxRF":
        raise RuntimeError("this FAISS writes IndexRefineFlat files in a layout the streaming writer does not know")
    count = count_of()
    prefix = bytearray(blob[:-tail])
    prefix[8:16] = struct.pack("<q", count)  # IndexRefineFlat's header: fourcc, d int32, ntotal int64
    if chain is not None:
        at = 4 + 4 + 8 + 8 + 8 + 1 + 4  # the base's header follows the refine index's (no metric_arg for IP)
        if prefix[at:at + 4] != b"IxPT":
            raise RuntimeError("unexpected IndexRefineFlat layout: no IndexPreTransform after its header")
        prefix[at + 8:at + 16] = struct.pack("<q", count)
    yield bytes(prefix)
    yield _flat_header(base_dim, count)
    for _, block in rows.blocks(block_rows):
        if chain is not None:
            for i in range(chain.chain.size()):
                block = faiss.downcast_VectorTransform(chain.chain.at(i)).apply_py(np.ascontiguousarray(block))
        yield np.ascontiguousarray(block, dtype="<f4").tobytes()
    yield _flat_header(dim, count)
    for _, block in rows.blocks(block_rows):
        yield np.ascontiguousarray(block, dtype="<f4").tobytes()
    yield blob[-4:]


def read_index(path: Path, mmap: bool = False) -> faiss.Index:
    """Read an index written by `write_index`: an on-disk IVF's .ivfdata is taken from `path`'s directory
    (FAISS maps that file itself); with `mmap`, Flat / IVF storage is mapped in place (IO_FLAG_MMAP_IFC)
    where FAISS can, and other formats are read into memory."""
    base = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY  # .ivfdata mapped read-only
    if mmap:
        try:
            return faiss.read_index(str(path), base | faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError:  # on-disk IVF lists, HNSW, PQ... (IO_FLAG_MMAP on on-disk lists crashes FAISS 1.15)
            pass
    return faiss.read_index(str(path), base)


def write_flat(vectors, path: Path, block_rows: int = BLOCK_ROWS) -> None:
    """Stream an IndexFlatIP file of `vectors` [N, D] to `path`, one block of rows in memory at a time."""
    count, dim = vectors.shape
    with open(path, "wb") as handle:
        handle.write(_flat_header(dim, count))
        for _, block in vectors.blocks(block_rows):
            handle.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
        handle.flush()
        os.fsync(handle.fileno())


def _flat_header(dim: int, count: int) -> bytes:
    """The bytes FAISS writes before the rows of an IndexFlatIP of `count` x `dim`, checked against
    FAISS's own serialisation of a 2-row index (RuntimeError if the layout differs)."""
    def header(d: int, n: int) -> bytes:
        empty = bytes(faiss.serialize_index(faiss.IndexFlatIP(d)))
        if len(empty) < 16 or empty[:4] != b"IxFI" or empty[-8:] != bytes(8):
            raise RuntimeError("this FAISS writes IndexFlatIP files in a layout the streaming writer does not know")
        return empty[:8] + struct.pack("<q", n) + empty[16:-8] + struct.pack("<Q", n * d)

    probe = np.arange(6, dtype=np.float32).reshape(2, 3)
    reference = faiss.IndexFlatIP(3)
    reference.add(probe)
    if bytes(faiss.serialize_index(reference)) != header(3, 2) + probe.tobytes():
        raise RuntimeError("this FAISS writes IndexFlatIP files in a layout the streaming writer does not know")
    return header(dim, count)


def exact_ends(vectors, queries: np.ndarray, k: int, block_rows: int = BLOCK_ROWS) -> tuple[list, list]:
    """Exact top-k rows of every query [Q, D] by e . q (proponents) and by -e . q (opponents), rows with
    score <= 0 left out, in one pass over `vectors` (a `RowSource`): ([Q] arrays of rows, [Q] arrays)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best = [np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.float32)]
    rows = [np.empty((len(q), 0), np.int64), np.empty((len(q), 0), np.int64)]
    for start, block in vectors.blocks(block_rows):
        scores = block @ q.T  # [b, Q]
        ids = np.arange(start, start + len(block), dtype=np.int64)
        for end, sign in enumerate((1.0, -1.0)):
            s = np.concatenate([best[end], sign * scores.T], axis=1)
            r = np.concatenate([rows[end], np.broadcast_to(ids, (len(q), len(ids)))], axis=1)
            keep = np.argsort(-s, axis=1, kind="stable")[:, :k]
            best[end], rows[end] = np.take_along_axis(s, keep, 1), np.take_along_axis(r, keep, 1)
    out = ([], [])
    for end in range(2):
        for i in range(len(q)):
            out[end].append(rows[end][i][best[end][i] > 0])
    return out


def measure_recall(index: faiss.Index, vectors, queries: np.ndarray, params: dict, k: int = 10) -> dict:
    """Recall@k of the approximate `index` against exact inner-product search over `vectors` (one pass),
    for proponents (q) and opponents (-q) of each query vector [Q, D]."""
    queries = np.asarray(queries, dtype=np.float32)
    truth = exact_ends(as_rows(vectors), queries, k)
    recalls = {"proponents": [], "opponents": []}
    for i, q in enumerate(queries):
        for end, (name, sign) in enumerate((("proponents", 1), ("opponents", -1))):
            gold = set(truth[end][i].tolist())
            if not gold:
                continue
            got = set(top_k(index, q, k, sign, params=params).rows.tolist())
            recalls[name].append(len(gold & got) / len(gold))
    return {name: round(float(np.mean(v)), 4) if v else None for name, v in recalls.items()} | {
        "k": k, "queries": int(len(queries))}


def _npy_rows(path: Path, dim: int) -> tuple[int, int]:
    """(rows, byte offset of row 0) of a float32 [rows, dim] .npy file; ValueError naming the file when
    it is another array or shorter / longer than its header says."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(handle)
        offset = handle.tell()
    if dtype != np.dtype("<f4") or fortran or len(shape) != 2 or shape[1] != dim:
        raise ValueError(f"{path} is not a float32 [rows, {dim}] array (found {dtype} {shape})")
    size = os.path.getsize(path)
    if size != offset + int(shape[0]) * dim * 4:
        raise ValueError(f"{path} holds {size} bytes, not the {offset + int(shape[0]) * dim * 4} its header says "
                         "(truncated or appended to)")
    return int(shape[0]), offset

