"""Issue 21, indexer side: an index that grows with training.

An index built on rows 0..N/2 (or checkpoints 1..3) and updated to N rows (checkpoints 1..5) equals a full build:
same ids and order, vectors within 1e-6 relative (here: bit-identical in float64), self-influence and label
review equal, through Flat, PCA+refine and exact mode; every refusal names its cause and says rebuild; removal
marks rows without re-embedding; kill -9 at every step of an update leaves the previous version served and a
rerun writes the same bytes; update shards merge into the same version; the old version stays servable."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.build.pipeline import build_index, merge_shards
from indexer.build.update import UPDATE_KILL_STEPS, merge_update, update_index, update_shard
from indexer.config import ConfigError, load_config
from indexer.store.directory import (
    MANIFEST, ROW_DIGESTS_FILE, IndexBuildError, IndexDirectory, IndexDirectoryError, check_replaceable,
)
from indexer.store.manifest import write_manifest
from indexer.store.resume import KILL_ENV
from indexer.store.versions import CURRENT, resolve
from tests.conftest import make_checkpoints
from tests.service_support import REPO
from tests.tasks import GrowingTask

FULL, HALF = 60, 30
PCA = "PCA8,Flat,RFlat"
VOLATILE = ("created_at", "build", "update", "index_version")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(GrowingTask(), tmp_path_factory.mktemp("ckpts"), count=5)


def config(directory: Path, ckpts, n: int = FULL, checkpoints: int = 5, kind: str = "sketch", factory: str = "Flat",
           seed: int = 3, name: str = "config", changed: int | None = None, layers: list[str] | None = None) -> Path:
    lines = ['task = "tests.tasks:GrowingTask"',
             f"task_args = {{ n = {n}" + (f", changed = {changed}" if changed is not None else "") + " }"]
    if layers is not None:
        lines.append("layers = [" + ", ".join(f'"{x}"' for x in layers) + "]")
    for c in ckpts[:checkpoints]:
        lines += ["[[checkpoints]]", f'path = "{c.path}"', f"lr = {c.lr!r}"]
    lines += ["[projection]", f'kind = "{kind}"', "dim = 16", f"seed = {seed}",
              "[index]", f'factory = "{factory}"', "batch_size = 7"]
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def stored_vectors(index: IndexDirectory) -> np.ndarray:
    import faiss

    if (index.path / "vectors.npy").is_file():  # factories whose FAISS file does not keep them (IVF, PQ ...)
        return np.load(index.path / "vectors.npy").astype(np.float64)
    base = faiss.downcast_index(index.index)
    if isinstance(base, faiss.IndexRefine):
        base = faiss.downcast_index(base.refine_index)
    return np.asarray(base.reconstruct_n(0, base.ntotal), dtype=np.float64)


def assert_same_index(got: IndexDirectory, want: IndexDirectory) -> None:
    """Same ids and order, examples table, vectors (1e-6 relative), self-influence and label review."""
    assert got.examples.ids == want.examples.ids
    assert got.examples.labels == want.examples.labels
    assert (got.path / "examples.jsonl").read_bytes() == (want.path / "examples.jsonl").read_bytes()
    a, b = stored_vectors(got), stored_vectors(want)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()
    np.testing.assert_allclose(got.self_influence, want.self_influence, rtol=1e-12, atol=0)
    assert got.label_review.dtype == want.label_review.dtype
    for name in want.label_review.dtype.names:
        np.testing.assert_allclose(np.asarray(got.label_review[name], dtype=np.float64),
                                   np.asarray(want.label_review[name], dtype=np.float64), rtol=1e-12, atol=0)
    assert got.manifest["training_set"] == want.manifest["training_set"]
    m, w = got.manifest, want.manifest
    assert [{k: v for k, v in c.items() if k != "source"} for c in m["checkpoints"]] == \
        [{k: v for k, v in c.items() if k != "source"} for c in w["checkpoints"]]
    assert m["projection"] == w["projection"] and m["embedding_dim"] == w["embedding_dim"]
    assert m["layers"] == w["layers"] and m["count"] == w["count"]
    assert np.array_equal(np.load(got.path / ROW_DIGESTS_FILE), np.load(want.path / ROW_DIGESTS_FILE))


# -- 1. updates equal full builds ----------------------------------------------------------------------

CASES = [("rows", "sketch", "Flat"), ("checkpoints", "sketch", "Flat"), ("both", "sketch", "Flat"),
         ("rows", "sketch", PCA), ("checkpoints", "sketch", PCA), ("checkpoints", "exact", "Flat")]


@pytest.fixture(scope="module")
def full_builds(tmp_path_factory, ckpts):
    cache = {}

    def get(kind: str, factory: str) -> IndexDirectory:
        if (kind, factory) not in cache:
            work = tmp_path_factory.mktemp("full")
            build_index(load_config(config(work, ckpts, kind=kind, factory=factory)), work / "index")
            cache[kind, factory] = IndexDirectory.open(work / "index")
        return cache[kind, factory]

    return get


@pytest.mark.parametrize("what,kind,factory", CASES)
def test_an_update_equals_a_full_build(tmp_path, ckpts, full_builds, what, kind, factory):
    n = HALF if what in ("rows", "both") else FULL
    checkpoints = 3 if what in ("checkpoints", "both") else 5
    first = config(tmp_path, ckpts, n, checkpoints, kind, factory, name="first")
    build_index(load_config(first), tmp_path / "index")
    before = {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir() if p.is_file()}
    result = update_index(load_config(config(tmp_path, ckpts, kind=kind, factory=factory)), tmp_path / "index")
    assert result.changed and result.version == 2
    assert (result.rows_added, result.checkpoints_added) == (FULL - n, 5 - checkpoints)
    updated = IndexDirectory.open(tmp_path / "index")
    assert updated.version.number == 2 and updated.path == tmp_path / "index" / "versions" / "v0002"
    assert_same_index(updated, full_builds(kind, factory))
    if what == "checkpoints":  # the prediction of the label review moved to the new last checkpoint
        assert updated.label_review.dtype.fields["loss"][0].shape == (5,)
    # version 1 (the build, at the top of the directory) is intact and still servable
    assert {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir() if p.is_file() and p.name != CURRENT} \
        == before
    old = IndexDirectory.open(tmp_path / "index" / "versions" / "v0001")
    assert old.version.number == 1 and old.count == n and len(old.manifest["checkpoints"]) == checkpoints
    assert (old.path / MANIFEST).read_bytes() == before[MANIFEST]
    assert IndexDirectory.open(tmp_path / "index" / "versions" / "v0002").count == FULL
    # ... and the files version 2 shares with version 1 are hard links
    for c in updated.manifest["checkpoints"][:checkpoints]:
        assert os.stat(updated.path / c["file"]).st_ino == os.stat(tmp_path / "index" / c["file"]).st_ino
    if factory == PCA:
        info = updated.manifest["faiss"]
        assert info["approximate"] and "trained_recall_at_10" in info and "recall_at_10" in info
    # nothing new: nothing written
    again = update_index(load_config(config(tmp_path, ckpts, kind=kind, factory=factory)), tmp_path / "index")
    assert not again.changed and again.version == 2
    assert sorted(p.name for p in (tmp_path / "index" / "versions").iterdir()) == ["v0001", "v0002"]


def test_a_second_update_chains_versions_and_keep_versions_prunes(tmp_path, ckpts, full_builds):
    build_index(load_config(config(tmp_path, ckpts, 20, 3, name="a")), tmp_path / "index")
    assert update_index(load_config(config(tmp_path, ckpts, 40, 4, name="b")), tmp_path / "index").version == 2
    result = update_index(load_config(config(tmp_path, ckpts, name="c")), tmp_path / "index", keep_versions=1)
    assert result.version == 3
    index = IndexDirectory.open(tmp_path / "index")
    assert index.manifest["index_version"]["parent"] == 2
    assert sorted(p.name for p in (tmp_path / "index" / "versions").iterdir()) == ["v0003"]
    assert_same_index(index, full_builds("sketch", "Flat"))
    check_replaceable(tmp_path / "index")  # --force may replace a directory with versions
    build_index(load_config(config(tmp_path, ckpts, name="c")), tmp_path / "index", overwrite=True)
    rebuilt = IndexDirectory.open(tmp_path / "index")
    assert rebuilt.version.number == 1 and not (tmp_path / "index" / "versions").exists()


def test_ivf_is_filled_into_its_trained_structure_unless_recall_drops(tmp_path, ckpts, full_builds):
    """IVF: the update adds every vector to the structure trained for version 1 (its centroids), measures
    recall@10 on the held-out queries, and trains again only when that falls below the figure recorded when
    the structure was trained."""
    factory = "IVF2,Flat"
    build_index(load_config(config(tmp_path, ckpts, HALF, 3, factory=factory, name="first")), tmp_path / "index")
    first = IndexDirectory.open(tmp_path / "index")
    assert first.manifest["faiss"]["trained_in_version"] == 1
    figure = first.manifest["faiss"]["trained_recall_at_10"]
    result = update_index(load_config(config(tmp_path, ckpts, factory=factory)), tmp_path / "index")
    updated = IndexDirectory.open(tmp_path / "index")
    info = updated.manifest["faiss"]
    assert_same_index(updated, full_builds("sketch", factory))
    measured = {k: info["recall_at_10"][k] for k in ("proponents", "opponents")}
    if result.retrained:  # recall fell: trained again, and the new figure is the one to keep
        assert info["trained_in_version"] == 2 and any(measured[k] < figure[k] for k in figure)
    else:
        assert info["trained_in_version"] == 1 and info["trained_recall_at_10"] == figure
        assert all(measured[k] >= figure[k] for k in figure)
        trained = (tmp_path / "index" / "index.trained.faiss").read_bytes()
        assert (updated.path / "index.trained.faiss").read_bytes() == trained
    # a figure no structure can reach forces a new training
    root = tmp_path / "forced"
    build_index(load_config(config(tmp_path, ckpts, HALF, 3, factory=factory, name="first")), root)
    raw_first = json.loads((root / MANIFEST).read_text())
    raw_first["faiss"]["trained_recall_at_10"] = {"proponents": 1.5, "opponents": 1.5}
    write_manifest(root, raw_first)
    forced = update_index(load_config(config(tmp_path, ckpts, factory=factory)), root)
    assert forced.retrained and IndexDirectory.open(root).manifest["faiss"]["trained_in_version"] == 2


# -- 2. refusals: one line, naming the cause, saying rebuild ----------------------------------------------

def _tracin(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO)}
    full.pop(KILL_ENV, None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "indexer.cli", *map(str, args), "--quiet"], capture_output=True,
                          text=True, cwd=REPO, env=full, timeout=timeout)


@pytest.fixture(scope="module")
def small(tmp_path_factory, ckpts):
    """A 30-row, 3-checkpoint index (version 1) the refusal tests try to update."""
    work = tmp_path_factory.mktemp("small")
    build_index(load_config(config(work, ckpts, HALF, 3, name="first")), work / "index")
    return work / "index"


REFUSALS = {
    "changed row": (dict(changed=4), "content of training row 4 (id 'ex4') changed"),
    "projection seed": (dict(seed=5), "projection.seed is 5 in the config, 3 in the index"),
    "projection kind": (dict(kind="gaussian"), "projection.kind is 'gaussian'"),
    "layers": (dict(layers=["0"]), "projection.layer_patterns"),
    "removed checkpoint": (dict(checkpoints=2), "a checkpoint was removed"),
    "fewer rows": (dict(n=20), "rows were removed"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_what_cannot_be_updated_is_refused_in_one_line(tmp_path, ckpts, small, case):
    changes, expected = REFUSALS[case]
    args = dict(n=FULL, checkpoints=5) | changes
    path = config(tmp_path, ckpts, **args)
    with pytest.raises(ConfigError) as caught:
        update_index(load_config(path), small)
    message = str(caught.value)
    assert expected in message and "rebuild" in message and "\n" not in message, message
    assert not (small / "versions").exists() and not (small / CURRENT).exists()


def test_a_changed_checkpoint_and_an_index_without_digests_are_refused(tmp_path, ckpts, small):
    moved = make_checkpoints(GrowingTask(), tmp_path, count=3, prefix="other")  # other weights at position 1
    swapped = [ckpts[0], moved[1], ckpts[2]]
    run = _tracin("index", config(tmp_path, swapped, FULL, 3), "--out", small, "--update")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoints[1] (other-1.pt) is not the file indexed" in lines[0] \
        and "rebuild" in lines[0], lines
    old = tmp_path / "old"
    build_index(load_config(config(tmp_path, ckpts, HALF, 3, name="old")), old)
    raw = json.loads((old / MANIFEST).read_text())  # an index as versions before this one wrote it
    raw["files"].pop(ROW_DIGESTS_FILE)
    raw.pop("row_digests")
    (old / ROW_DIGESTS_FILE).unlink()
    write_manifest(old, raw)
    with pytest.raises(IndexBuildError, match="holds no per-row content digests.*rebuild"):
        update_index(load_config(config(tmp_path, ckpts)), old)
    IndexDirectory.open(old)  # and it is still served as it is


# -- 3. removal ---------------------------------------------------------------------------------------

def test_remove_ids_marks_rows_without_reembedding(tmp_path, ckpts, small):
    root = tmp_path / "index"
    build_index(load_config(config(tmp_path, ckpts, HALF, 3, name="first")), root)
    ids = tmp_path / "remove.txt"
    ids.write_text("# mislabeled\nex3\n\nex11\n")
    run = _tracin("index", "--out", root, "--remove-ids", ids)  # no config needed
    assert run.returncode == 0, run.stderr
    assert "version 2" in run.stdout and "2 removed" in run.stdout
    index = IndexDirectory.open(root)
    assert index.removed.tolist() == [3, 11] and index.count == HALF
    base = IndexDirectory.open(root / "versions" / "v0001")
    assert base.removed.size == 0 and np.array_equal(base.self_influence, index.self_influence)
    for name in ("index.faiss", "self_influence.npy", "examples.jsonl"):  # nothing re-embedded: shared files
        assert os.stat(index.path / name).st_ino == os.stat(root / name).st_ino
    ids.write_text("ex5\nnot-an-id\n")
    run = _tracin("index", "--out", root, "--remove-ids", ids)
    assert run.returncode == 2 and "line 2: 'not-an-id' is not the id of a training example" in run.stderr, run.stderr
    # removal and an update in one version; the removed rows stay removed
    ids.write_text("ex40\n")
    result = update_index(load_config(config(tmp_path, ckpts, name="all")), root, remove_ids=ids)
    index = IndexDirectory.open(root)
    assert result.version == 3 and index.removed.tolist() == [3, 11, 40] and index.count == FULL
    assert json.loads((index.path / "removed.json").read_text())["ids"] == ["ex3", "ex11", "ex40"]


# -- 4. kill -9 at every step of an update, then a rerun: the same bytes -----------------------------------

def _version_files(path: Path) -> dict[str, bytes]:
    """Every file of one version (without what records when and how long), versions/ and CURRENT left out."""
    out = {}
    for file in sorted(path.rglob("*")):
        name = file.relative_to(path).as_posix()
        if name.startswith("versions/") or name == CURRENT:
            continue
        if file.is_file() and file.name not in (MANIFEST, "manifest.sha256"):
            out[file.relative_to(path).as_posix()] = file.read_bytes()
    manifest = json.loads((path / MANIFEST).read_text())
    for key in VOLATILE:
        manifest.pop(key, None)
    out["manifest"] = json.dumps(manifest, sort_keys=True).encode()
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ckpts):
    work = tmp_path_factory.mktemp("uninterrupted")
    build_index(load_config(config(work, ckpts, HALF, 3, name="first")), work / "index")
    update_index(load_config(config(work, ckpts)), work / "index")
    return work


KILLS = [*UPDATE_KILL_STEPS, "batch:6", "state-committed:2", "checkpoint-embedded:4"]


@pytest.mark.parametrize("step", KILLS)
def test_kill_at_every_update_step_then_rerun_gives_the_same_bytes(tmp_path, ckpts, uninterrupted, step):
    root = tmp_path / "index"
    build_index(load_config(config(tmp_path, ckpts, HALF, 3, name="first")), root)
    base_files = _version_files(root)
    killed = _tracin("index", config(tmp_path, ckpts), "--out", root, "--update", env={KILL_ENV: step})
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    served = resolve(root)
    if step == "index-committed":  # killed after the switch: version 2 is whole and served
        assert served.number == 2
    else:
        assert served.number == 1 and not (root / CURRENT).exists()
        assert IndexDirectory.open(root).count == HALF  # the previous version, served as it was
    rerun = _tracin("index", config(tmp_path, ckpts), "--out", root, "--update")
    assert rerun.returncode == 0 and "Traceback" not in rerun.stderr, rerun.stderr
    position = UPDATE_KILL_STEPS.index(step.split(":")[0])
    if step in ("state-started", "batch", "checkpoint-embedded", "state-written"):
        assert "removed an unfinished resume step" in rerun.stderr, rerun.stderr
    elif UPDATE_KILL_STEPS.index("state-committed") <= position < UPDATE_KILL_STEPS.index("index-committed") \
            or ":" in step:
        assert "resuming: checkpoints 0.." in rerun.stderr, rerun.stderr  # embedded work is not redone
    assert resolve(root).number == 2
    assert _version_files(root / "versions" / "v0002") == _version_files(uninterrupted / "index" / "versions" / "v0002")
    assert _version_files(root) == base_files  # version 1 untouched
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v0001", "v0002"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".index.")) == []
    IndexDirectory.open(root)


def test_a_damaged_pointer_or_version_is_refused_in_one_line(tmp_path, uninterrupted):
    import shutil

    root = tmp_path / "index"
    shutil.copytree(uninterrupted / "index", root)
    (root / "versions" / "v0002" / "manifest.sha256").write_text("0" * 64 + "  manifest.json\n")
    manifest = root / "versions" / "v0002" / MANIFEST
    manifest.write_text(manifest.read_text().replace('"count": 60', '"count": 61'))
    with pytest.raises(IndexDirectoryError, match="not the manifest CURRENT switched to"):
        IndexDirectory.open(root)
    (root / CURRENT).write_text('{"format": "tracin-current/1", "version": 2, "directory": "../elsewhere", '
                                '"manifest_sha256": "' + "0" * 64 + '"}')
    with pytest.raises(IndexDirectoryError, match="directory must be versions/v0002"):
        IndexDirectory.open(root)


# -- 5. update shards ------------------------------------------------------------------------------------

def test_update_shards_merge_into_the_same_version(tmp_path, ckpts, uninterrupted):
    root = tmp_path / "index"
    build_index(load_config(config(tmp_path, ckpts, HALF, 3, name="first")), root)
    cfg = load_config(config(tmp_path, ckpts))
    for shard in range(3):
        update_shard(cfg, root, shard, 3)
    assert resolve(root).number == 1  # shards change nothing served
    one = next((tmp_path / "index.shards").glob("update-*/shard-00001-of-00003"))
    one.rename(one.with_name("elsewhere"))
    with pytest.raises(ConfigError, match="update shard 1/3 is missing"):
        merge_update(cfg, root, 3)
    one.with_name("elsewhere").rename(one)
    (one / "new.vectors.npy").write_bytes((one / "new.vectors.npy").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ConfigError, match="update shard 1/3: new.vectors.npy .* does not match the sha256"):
        merge_update(cfg, root, 3)
    update_shard(cfg, root, 1, 3)  # built again
    result = merge_update(cfg, root, 3)
    assert result.version == 2 and not (tmp_path / "index.shards").exists()
    merged, single = IndexDirectory.open(root), IndexDirectory.open(uninterrupted / "index")
    assert_same_index(merged, single)
    # through the command line: new rows as new shards of a sharded build, then the merge
    sharded = tmp_path / "sharded"
    for shard in range(2):
        assert _tracin("index", config(tmp_path, ckpts, HALF, 3, name="first"), "--out", sharded,
                       "--shard", f"{shard}/2").returncode == 0
    merge_shards(load_config(config(tmp_path, ckpts, HALF, 3, name="first")), sharded, 2)
    for shard in range(2):
        run = _tracin("index", config(tmp_path, ckpts), "--out", sharded, "--update", "--shard", f"{shard}/2")
        assert run.returncode == 0, run.stderr
    run = _tracin("index", config(tmp_path, ckpts), "--out", sharded, "--update", "--merge", "2")
    assert run.returncode == 0 and "version 2" in run.stdout, run.stderr
    assert_same_index(IndexDirectory.open(sharded), single)
