"""The FAISS stage in bounded memory (issue 13): streamed Flat files, IVF indexes filled block by block into
on-disk inverted lists, merges that read the shards in place, and the examples table read on demand."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.store import faiss_build
from indexer.config import load_config
from indexer.store.faiss_build import ArrayRows, RowSource, exact_ends, read_index, write_index
from indexer.build.pipeline import build_index, build_shard, merge_shards
from indexer.store.search import top_k
from indexer.store.directory import IndexDirectory, IndexDirectoryError, JsonlRows, read_jsonl
from tests.conftest import make_checkpoints, write_config
from tests.tasks import MLPTask

REF = "tests.tasks:MLPTask"
IVF_FACTORIES = ["IVF8,Flat", "IVF8,PQ4", "OPQ4,IVF8,PQ4", "IVF8,SQ8"]


@pytest.fixture(scope="module")
def vectors():
    return np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)


@pytest.fixture
def parts(tmp_path, vectors):
    """The vectors as three row files of unequal length (as shards hold them)."""
    paths = []
    for i, (a, b) in enumerate([(0, 1234), (1234, 1900), (1900, 3000)]):
        paths.append(tmp_path / f"part{i}.npy")
        np.save(paths[-1], vectors[a:b])
    return paths


def _reference(factory: str, vectors: np.ndarray, train_sample: int) -> faiss.Index:
    """What FAISS builds in memory from all vectors at once, with the sample `write_index` draws."""
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = np.sort(np.random.default_rng(0).choice(len(vectors), size=min(len(vectors), train_sample), replace=False))
        index.train(vectors[sample])
    index.add(vectors)
    return index


def test_row_source_reads_across_parts(parts, vectors):
    source = RowSource(parts, 16)
    assert source.shape == (3000, 16)
    np.testing.assert_array_equal(source[1200:1950], vectors[1200:1950])
    rows = np.array([2999, 0, 1233, 1234, 1899, 1900, 5, 5])
    np.testing.assert_array_equal(source[rows], vectors[rows])
    np.testing.assert_array_equal(np.concatenate([b for _, b in source.blocks(701)]), vectors)
    with pytest.raises(ValueError, match="float32"):
        np.save(parts[0], vectors[:10].astype(np.float64))
        RowSource(parts, 16)


def test_flat_is_streamed_byte_identical_to_faiss(tmp_path, parts, vectors):
    written = write_index("Flat", RowSource(parts, 16), tmp_path / "index.faiss", 1000, tmp_path / "work", block_rows=333)
    reference = faiss.IndexFlatIP(16)
    reference.add(vectors)
    assert written.storage == "stream" and written.files == ["index.faiss"] and not written.approximate
    assert (tmp_path / "index.faiss").read_bytes() == bytes(faiss.serialize_index(reference))
    assert read_index(tmp_path / "index.faiss", mmap=True).ntotal == 3000


@pytest.mark.parametrize("factory", IVF_FACTORIES)
def test_ivf_on_disk_equals_the_in_memory_index_after_a_move(tmp_path, parts, vectors, factory):
    out = tmp_path / "built"
    out.mkdir()
    written = write_index(factory, RowSource(parts, 16), out / "index.faiss", 2000, tmp_path / "work", block_rows=500)
    assert written.storage == "on-disk" and written.files == ["index.faiss", "index.ivfdata"]
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").iterdir()), "block files are removed"
    assert "block-" not in Path("/proc/self/maps").read_text(), "the block files stay mapped after the merge"
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(out, moved)
    shutil.rmtree(out)  # the recorded build path is gone: the .ivfdata beside the index is read
    index = read_index(moved / "index.faiss", mmap=True)
    reference = _reference(factory, vectors, 2000)
    faiss.extract_index_ivf(index).nprobe = faiss.extract_index_ivf(reference).nprobe = 4
    queries = np.random.default_rng(1).standard_normal((25, 16)).astype(np.float32)
    d1, i1 = index.search(queries, 10)
    d2, i2 = reference.search(queries, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


@pytest.mark.parametrize("factory", ["PCA4,Flat,RFlat", "Flat,RFlat"])
def test_refine_flat_is_streamed_equal_to_faiss(tmp_path, parts, vectors, factory):
    """The scale default: an exhaustive scan of a few projected numbers, the best k x k_factor re-scored
    with the stored vectors; streamed in two passes, searched as FAISS's own index (PCA uncentred)."""
    from indexer.store.faiss_build import _uncentre

    written = write_index(factory, RowSource(parts, 16), tmp_path / "index.faiss", 2000, tmp_path / "work",
                          block_rows=333)
    assert written.storage == "stream" and written.files == ["index.faiss"] and written.approximate
    reference = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    sample = np.sort(np.random.default_rng(0).choice(3000, size=2000, replace=False))
    reference.train(vectors[sample])
    _uncentre(reference)
    reference.add(vectors)
    index = read_index(tmp_path / "index.faiss", mmap=True)
    assert index.ntotal == 3000
    np.testing.assert_array_equal(index.reconstruct_n(0, 3000), vectors)
    queries = np.random.default_rng(1).standard_normal((10, 16)).astype(np.float32)
    subset = np.arange(0, 3000, 7)
    for q in queries:
        for sign in (1, -1):
            for params in ({"k_factor": 1.0}, {"k_factor": 8.0}):
                a = top_k(index, q, 10, sign, params=params)
                b = top_k(reference, q, 10, sign, params=params)
                assert a.rows.tolist() == b.rows.tolist()
                np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
            hits = top_k(index, q, 5, sign, rows=subset, params={"k_factor": 600.0})  # every subset row refined
            exact = np.argsort(-sign * (vectors[subset] @ q), kind="stable")[:5]
            assert hits.rows.tolist() == subset[exact].tolist()


def test_pca_in_an_inner_product_index_is_not_centred(tmp_path, vectors):
    """With a large mean, a centred PCA would shift each row's score by -<A x, A mean> and change the
    ranking: the written index ranks by (A x) . (A q), as read back from its file."""
    shifted = vectors + 3.0
    write_index("PCA4,Flat,RFlat", ArrayRows(shifted), tmp_path / "index.faiss", 2000, tmp_path / "work")
    index = read_index(tmp_path / "index.faiss", mmap=True)
    top = faiss.downcast_index(index)
    base = faiss.downcast_index(top.base_index)
    pca = faiss.downcast_VectorTransform(base.chain.at(0))
    assert pca.have_bias is False
    matrix = faiss.vector_to_array(pca.A).reshape(4, 16)
    q = np.random.default_rng(3).standard_normal(16).astype(np.float32)
    hits = top_k(index, q, 10, 1, params={"k_factor": 1.0})  # the base stage's order, re-scored exactly
    base_top = np.argsort(-((shifted @ matrix.T) @ (matrix @ q)), kind="stable")[:10]
    exact = shifted[base_top] @ q
    expected = base_top[np.argsort(-exact, kind="stable")]
    assert hits.rows.tolist() == expected[shifted[expected] @ q > 0].tolist()
    np.testing.assert_allclose(hits.scores, shifted[hits.rows] @ q, rtol=1e-5)


def test_on_disk_ivf_is_read_from_a_read_only_directory(tmp_path, parts, vectors):
    """A service replica mounts the index read-only: FAISS must map the .ivfdata without write access
    (as root, the read runs as `nobody`, for whom the files are read-only)."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="tracin-ro-"))  # under /tmp: traversable by another user
    os.chmod(base, 0o755)
    out = base / "ro"
    out.mkdir()
    write_index("IVF8,Flat", RowSource(parts, 16), out / "index.faiss", 2000, tmp_path / "work")
    for name in os.listdir(out):
        os.chmod(out / name, 0o444)
    os.chmod(out, 0o555)
    code = ("import os, sys, numpy as np; from indexer.store.faiss_build import read_index\n"
            "if os.getuid() == 0: os.setgid(65534); os.setuid(65534)\n"
            "index = read_index(sys.argv[1] + '/index.faiss', mmap=True)\n"
            "d, i = index.search(np.ones((1, 16), np.float32), 3); print(index.ntotal, i.min() >= 0)")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    os.chmod(out, 0o755)
    shutil.rmtree(base)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["3000", "True"]


def test_the_faiss_stage_reads_one_block_at_a_time(tmp_path, parts, monkeypatch):
    """Bounded memory: besides the training sample (gathered row by row), no read holds more than a block."""
    largest = []
    original = RowSource._read_into

    def spy(self, out, part, first, rows, at, count):
        if rows is None:
            largest.append(count)
        return original(self, out, part, first, rows, at, count)

    monkeypatch.setattr(RowSource, "_read_into", spy)
    for factory in ("Flat", "IVF8,Flat", "PCA4,Flat,RFlat"):
        out = tmp_path / factory.replace(",", "_")
        out.mkdir()
        write_index(factory, RowSource(parts, 16), out / "index.faiss", 2000, tmp_path / "work", block_rows=256)
    assert largest and max(largest) <= 256


def test_row_source_refuses_a_truncated_file_and_reads_read_only_files(tmp_path, parts, vectors):
    """Shards on a read-only mount or owned by another user are read in place: never opened for writing
    (as root the file is made immutable, which stops root's writable open too; else it is made 0444)."""
    os.chmod(parts[1], 0o444)
    immutable = os.getuid() == 0 and subprocess.run(["chattr", "+i", str(parts[1])], capture_output=True).returncode == 0
    try:
        np.testing.assert_array_equal(RowSource(parts, 16)[0:3000], vectors)
        np.testing.assert_array_equal(RowSource(parts, 16)[np.array([2999, 1300, 0])], vectors[[2999, 1300, 0]])
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(parts[1])], check=True)
        os.chmod(parts[1], 0o644)
    # (as root without chattr support the reads above prove nothing about the open mode; the rest still runs)
    with open(parts[1], "r+b") as handle:
        handle.truncate(os.path.getsize(parts[1]) - 40)
    with pytest.raises(ValueError, match="truncated or appended"):
        RowSource(parts, 16)
    with pytest.raises(IndexError):
        RowSource(parts[:1], 16)[np.array([5, 1234])]


def test_exact_ends_equal_argsort(vectors):
    queries = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    pro, opp = exact_ends(ArrayRows(vectors), queries, 7, block_rows=400)
    scores = vectors @ queries.T
    for i in range(4):
        assert pro[i].tolist() == np.argsort(-scores[:, i], kind="stable")[:7].tolist()
        assert opp[i].tolist() == np.argsort(scores[:, i], kind="stable")[:7].tolist()


# -- through the pipeline: shards merged into an on-disk IVF = one build ---------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(MLPTask(), tmp_path_factory.mktemp("ckpts"))


@pytest.mark.parametrize("factory, factory_line, files, storage", [
    ("IVF4,Flat", "search_params = { nprobe = 2 }", {"index.ivfdata", "index_normalized.ivfdata"}, "on-disk"),
    ("PCA4,Flat,RFlat", "search_params = { k_factor = 4 }", set(), "stream")])
def test_shards_merge_into_an_approximate_index_equal_to_one_build(tmp_path, ckpts, monkeypatch, factory,
                                                                   factory_line, files, storage):
    monkeypatch.setattr(faiss_build, "BLOCK_ROWS", 9)  # several blocks even for 40 rows
    config = load_config(write_config(tmp_path, REF, ckpts, kind="sketch", dim=16, factory=factory,
                                      extra=factory_line))
    build_index(config, tmp_path / "single")
    # the shards were embedded under a Flat config: the FAISS stage is not an input of the vectors
    flat = load_config(write_config(tmp_path, REF, ckpts, kind="sketch", dim=16, factory="Flat"))
    for shard in (2, 0, 1):
        build_shard(flat, tmp_path / "merged", shard, 3)
    config = load_config(write_config(tmp_path, REF, ckpts, kind="sketch", dim=16, factory=factory,
                                      extra=factory_line))
    merge_shards(config, tmp_path / "merged", 3)
    assert not (tmp_path / "merged.shards").exists()
    shutil.move(tmp_path / "merged", tmp_path / "moved")  # directories move (replicas copy them)
    single, merged = IndexDirectory.open(tmp_path / "single"), IndexDirectory.open(tmp_path / "moved")
    for directory in (single, merged):
        assert files <= set(directory.manifest["files"])
        assert directory.manifest["faiss"]["storage"] == storage
    same_bytes = ["index.faiss"] if storage == "stream" else []  # an on-disk IVF records its build path
    for name in (*files, *same_bytes, "self_influence.npy", "examples.jsonl", "label_review.npy"):
        assert (tmp_path / "single" / name).read_bytes() == (tmp_path / "moved" / name).read_bytes(), name
    for index in (single.index, merged.index):
        if storage == "on-disk":
            faiss.extract_index_ivf(index).make_direct_map()
    np.testing.assert_allclose(merged.index.reconstruct_n(0, 40), single.index.reconstruct_n(0, 40), rtol=0, atol=0)
    assert merged.manifest["faiss"]["recall_at_10"] == single.manifest["faiss"]["recall_at_10"]


def test_a_tampered_ivfdata_file_is_refused(tmp_path, ckpts):
    config = load_config(write_config(tmp_path, REF, ckpts, kind="sketch", dim=16, factory="IVF4,Flat"))
    build_index(config, tmp_path / "index")
    data = tmp_path / "index" / "index.ivfdata"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(IndexDirectoryError, match="index.ivfdata does not match the sha256"):
        IndexDirectory.open(tmp_path / "index")
    data.unlink()
    with pytest.raises(IndexDirectoryError, match="index.ivfdata"):
        IndexDirectory.open(tmp_path / "index")


@pytest.mark.parametrize("factory, extra", [("IVF4,Flat", "search_params = { nprobe = 4 }"),
                                            ("PCA4,Flat,RFlat", "search_params = { k_factor = 10 }")])
def test_served_answers_from_a_merged_approximate_index_equal_one_build(tmp_path, ckpts, factory, extra):
    from types import SimpleNamespace

    from service.loading import load_engine
    from service.settings import Settings

    config = load_config(write_config(tmp_path, REF, ckpts, kind="sketch", dim=16, factory=factory, extra=extra))
    build_index(config, tmp_path / "single")
    for shard in range(2):
        build_shard(config, tmp_path / "merged", shard, 2)
    merge_shards(config, tmp_path / "merged", 2)
    answers = []
    for name in ("single", "merged"):
        engine = load_engine(Settings(index_dir=tmp_path / name, mmap=True))
        req = SimpleNamespace(example=None, train_id="ex5", label=None, filter_label=None, k=5, exclude_self=False,
                              include_embedding=False, rerank=10, metric=None, normalize=None)
        body = engine.influence(req)
        answers.append([(h["id"], round(h["score"], 9)) for side in ("proponents", "opponents") for h in body[side]])
        for normalize in ("train", "cosine"):  # the normalised twin answers too
            req.normalize = normalize
            assert engine.influence(req)["proponents"]
        req.normalize = None
    assert answers[0] == answers[1] and answers[0]


# -- the examples table, read on demand -----------------------------------------------------------------
def test_jsonl_rows_equal_the_parsed_file(tmp_path):
    rows = [{"id": f"r{i}", "label": i % 3, "display": {"flipped": i % 2 == 0, "text": "é" * i}} for i in range(50)]
    path = tmp_path / "examples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    table = JsonlRows(path)
    assert len(table) == 50 and table[7] == rows[7] and table[-1] == rows[-1] and table[3:6] == rows[3:6]
    assert list(table) == read_jsonl(path) == rows
    assert table.ids == [r["id"] for r in rows] and table.labels == [r["label"] for r in rows]
    np.testing.assert_array_equal(table.flags["flipped"], [r["display"]["flipped"] for r in rows])
    assert "text" not in table.flags
    with pytest.raises(IndexError):
        table[50]


@pytest.mark.parametrize("bad, message", [("\n", "row 1 is empty"), ("[1, 2]\n", "row 1 is not an object"),
                                          ('{"id": 1}\n', "row 1 is not an object with an id and a label"),
                                          ("{nope\n", "not valid JSON lines: row 1")])
def test_jsonl_rows_refuse_a_bad_row_naming_it(tmp_path, bad, message):
    path = tmp_path / "examples.jsonl"
    path.write_text('{"id": "a", "label": 0}\n' + bad)
    with pytest.raises(IndexDirectoryError, match=message):
        JsonlRows(path)


@pytest.mark.parametrize("factory, extra, message", [
    ("PCA32,Flat,RFlat", "", "asks a PCA for 32 numbers from 16-number embeddings"),
    ("IVF4,Flat", "search_params = { k_factor = 4 }", "\\['k_factor'\\] do not apply to 'IVF4,Flat'"),
    ("PCA4,Flat,RFlat", "search_params = { nprobe = 4 }", "\\['nprobe'\\] do not apply"),
    ("PCA4,Flat,RFlat", "search_params = { k_factor = 0.5 }", "k_factor: must be >= 1"),
    ("IVF64,Flat,RFlat", "", "has 64 lists but only 40 vectors"),
])
def test_faiss_settings_that_cannot_work_are_refused_before_embedding(tmp_path, ckpts, factory, extra, message):
    from indexer.config import ConfigError

    config = load_config(write_config(tmp_path, REF, ckpts, kind="sketch", dim=16, factory=factory, extra=extra))
    with pytest.raises(ConfigError, match=message):
        build_index(config, tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_merge_refuses_a_shard_whose_rows_do_not_match_its_range(tmp_path, ckpts):
    from indexer.config import ConfigError

    config = load_config(write_config(tmp_path, REF, ckpts, kind="sketch", dim=16))
    for shard in range(2):
        build_shard(config, tmp_path / "index", shard, 2)
    first = tmp_path / "index.shards" / "shard-00000-of-00002" / "vectors.npy"
    second = tmp_path / "index.shards" / "shard-00001-of-00002" / "vectors.npy"
    a, b = np.load(first), np.load(second)
    np.save(first, np.concatenate([a, b[:1]]))  # one row moved across the boundary: same total
    np.save(second, b[1:])
    from indexer.checkpoints import sha256_file

    for path in (first, second):  # digests that match the moved rows: only the row count can tell
        info_file = path.parent / "shard.json"
        info = json.loads(info_file.read_text())
        info["files"]["vectors.npy"] = sha256_file(path)
        info_file.write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="shard-00000-of-00002: vectors.npy holds 21 rows, its shard.json 20"):
        merge_shards(config, tmp_path / "index", 2)
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize("damage", ["vectors", "self_influence", "review", "shard_json", "no_digests"])
def test_merge_refuses_a_damaged_or_edited_shard_in_one_line(tmp_path, ckpts, damage):
    from tests.test_demo_cli import tracin

    config_path = write_config(tmp_path, REF, ckpts, kind="sketch", dim=16)
    config = load_config(config_path)
    for shard in range(2):
        build_shard(config, tmp_path / "index", shard, 2)
    directory = tmp_path / "index.shards" / "shard-00001-of-00002"
    target = {"vectors": "vectors.npy", "self_influence": "self_influence.npy", "review": "review.npy"}.get(damage)
    if target is not None:  # one byte of the values flipped
        blob = bytearray((directory / target).read_bytes())
        blob[-3] ^= 0x40
        (directory / target).write_bytes(bytes(blob))
    elif damage == "shard_json":
        (directory / "shard.json").write_text("{bad")
    else:
        info = json.loads((directory / "shard.json").read_text())
        del info["files"]
        (directory / "shard.json").write_text(json.dumps(info))
    proc = tracin("index", str(config_path), "--out", str(tmp_path / "index"), "--merge", "2", check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "shard 1/2" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "index").exists()


def test_merge_argument_must_be_a_shard_count(tmp_path, ckpts):
    from tests.test_demo_cli import tracin

    config_path = write_config(tmp_path, REF, ckpts, kind="sketch", dim=16)
    for n in ("0", "-1"):
        proc = tracin("index", str(config_path), "--out", str(tmp_path / "index"), "--merge", n, check=False)
        assert proc.returncode == 2 and "--merge N" in proc.stderr and not (tmp_path / "index").exists()


def test_a_killed_merge_leaves_nothing_after_the_rerun(tmp_path, ckpts, monkeypatch):
    from tests.test_demo_cli import tracin

    config_path = write_config(tmp_path, REF, ckpts, kind="sketch", dim=16, factory="IVF4,Flat")
    config = load_config(config_path)
    for shard in range(2):
        build_shard(config, tmp_path / "index", shard, 2)
    monkeypatch.setenv("TRACIN_TEST_KILL_AT", "index-staged")
    killed = tracin("index", str(config_path), "--out", str(tmp_path / "index"), "--merge", "2", "--keep-shards",
                    check=False)
    monkeypatch.delenv("TRACIN_TEST_KILL_AT")
    assert killed.returncode != 0 and list(tmp_path.glob(".index.tmp-*"))
    tracin("index", str(config_path), "--out", str(tmp_path / "index"), "--merge", "2")
    assert sorted(p.name for p in tmp_path.glob(".index.*") if p.is_dir()) == []
    assert (tmp_path / "index" / "manifest.json").is_file()
