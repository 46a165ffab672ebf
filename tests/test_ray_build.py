"""Distributed indexing on a real local Ray cluster (indexer.build.distributed, `tracin index --ray`).

One Ray session (2 CPUs, no dashboard) for the module; tiny seeded float64 tasks (tests.tasks).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.cli import main
from indexer.config import ConfigError, load_config
from indexer.build.pipeline import build_index
from indexer.store.resume import KILL_ENV, KILL_ONCE_ENV
from indexer.store.directory import IndexDirectory
from tests.conftest import make_checkpoints, write_config
from tests.tasks import MLPTask

REF = "tests.tasks:MLPTask"


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Checkpoints, the sketch config (batch 7: 3 batches per checkpoint in a 20-row shard) and the
    single-process reference index built from it."""
    tmp = tmp_path_factory.mktemp("ray")
    (tmp / "ckpts").mkdir()
    ckpts = make_checkpoints(MLPTask(), tmp / "ckpts")
    config = write_config(tmp, REF, ckpts, kind="sketch", dim=16)
    build_index(load_config(config), tmp / "reference")
    return tmp, ckpts, config


def _with_task(config: Path, ref: str, args: dict[str, str], name: str) -> Path:
    """A copy of `config` naming another task with arguments."""
    table = ", ".join(f"{k} = {json.dumps(v)}" for k, v in args.items())
    text = config.read_text().replace(f'task = "{REF}"', f'task = "{ref}"\ntask_args = {{ {table} }}')
    path = config.with_name(name)
    path.write_text(text)
    return path


def _assert_same_index(built: Path, reference: Path) -> None:
    a, b = IndexDirectory.open(built), IndexDirectory.open(reference)
    assert a.count == b.count == 40
    np.testing.assert_allclose(a.index.reconstruct_n(0, 40), b.index.reconstruct_n(0, 40), rtol=0, atol=1e-6)
    assert (built / "examples.jsonl").read_bytes() == (reference / "examples.jsonl").read_bytes()
    np.testing.assert_array_equal(np.load(built / "self_influence.npy"), np.load(reference / "self_influence.npy"))
    np.testing.assert_array_equal(np.load(built / "label_review.npy"), np.load(reference / "label_review.npy"))
    assert a.manifest["projection"] == b.manifest["projection"]
    assert a.manifest["label_review"] == b.manifest["label_review"]
    assert not (built.parent / f"{built.name}.shards").exists()


def test_ray_build_equals_single_process_build(ray_session, setup):
    from indexer.build.distributed import build_with_ray

    tmp, _, config = setup
    lines: list[str] = []
    result = build_with_ray(load_config(config), tmp / "ray3", shards=3, log=lines.append)
    _assert_same_index(tmp / "ray3", tmp / "reference")
    assert [r["rows"] for r in result.shards] == [13, 13, 14]
    assert all(r["batches_embedded"] == r["batches_total"] == 3 * 2 and not r["resumed_from"]
               for r in result.shards)
    done = [line for line in lines if " done (" in line]
    assert sorted(int(line.split("(")[1].split("/")[0]) for line in done) == [1, 2, 3]
    assert all("/3 shards)" in line for line in done)

    # the same through the CLI, on the Ray session already running (no --force: an existing index is refused)
    assert main(["index", str(config), "--out", str(tmp / "ray3"), "--ray", "--quiet"]) == 2
    assert main(["index", str(config), "--out", str(tmp / "ray3"), "--ray", "--shards", "2", "--force",
                 "--quiet"]) == 0
    _assert_same_index(tmp / "ray3", tmp / "reference")


def test_killed_shard_task_is_retried_and_resumes(ray_session, setup):
    from indexer.build.distributed import build_with_ray

    tmp, _, config = setup
    killed = tmp / "killed-once"
    # 20 rows per shard, batch 7: 3 batches per checkpoint; the 5th batch is the 2nd of checkpoint 1, so
    # checkpoint 0 was committed when the first task to get there is SIGKILLed (only that one: once-file)
    result = build_with_ray(load_config(config), tmp / "ray-killed", shards=2, max_retries=2, log=None,
                            env_vars={KILL_ENV: "batch:5", KILL_ONCE_ENV: str(killed)})
    assert killed.is_file(), "no task was killed"
    killed_pid = int(killed.read_text())
    resumed = [r for r in result.shards if r["resumed_from"]]
    assert len(resumed) == 1, result.shards
    (report,) = resumed
    assert report["resumed_from"] == ["state-0000"] and report["pid"] != killed_pid
    assert report["batches_total"] == 9 and report["batches_embedded"] == 6  # checkpoints 1 and 2 only
    other = next(r for r in result.shards if r is not report)
    assert other["batches_embedded"] == 9 and not other["resumed_from"]
    _assert_same_index(tmp / "ray-killed", tmp / "reference")


def test_config_error_in_a_shard_is_one_line_and_not_retried(ray_session, setup, tmp_path, capsys):
    _, _, config = setup
    attempts = tmp_path / "attempts"
    broken = _with_task(config, "tests.tasks:BrokenTask", {"attempts": str(attempts)}, "broken.toml")
    rc = main(["index", str(broken), "--out", str(tmp_path / "index"), "--ray", "--shards", "2", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    assert err[0].startswith(("tracin index: error: shard 0/2: task: ", "tracin index: error: shard 1/2: task: "))
    assert "ValueError: no training data on this worker" in err[0]
    # max_retries is 3: a retried shard would have run 4 times before the error came back
    assert 1 <= len(attempts.read_text().split()) <= 2
    assert not (tmp_path / "index").exists()


def test_transient_io_error_is_retried(ray_session, setup, tmp_path):
    from indexer.build.distributed import build_with_ray

    tmp, _, config = setup
    flaky = tmp_path / "flaky"
    path = _with_task(config, "tests.tasks:FlakyTask", {"flaky": str(flaky)}, "flaky.toml")
    result = build_with_ray(load_config(path), tmp_path / "index", shards=2, log=None)
    assert flaky.is_file() and result.count == 40
    reference = IndexDirectory.open(tmp / "reference")
    np.testing.assert_allclose(IndexDirectory.open(tmp_path / "index").index.reconstruct_n(0, 40),
                               reference.index.reconstruct_n(0, 40), rtol=0, atol=1e-6)


def test_worker_that_cannot_see_the_shared_files_is_refused(setup, tmp_path):
    from indexer.build.distributed import ShardError, _check_visible

    _, _, config = setup
    cfg = load_config(config)
    with pytest.raises(ShardError, match=r"^shard 1/4 \(on .*\): cannot see .* \(no \.ray-driver-x\); "
                                         r"<out>\.shards/ must be on storage that every Ray worker sees"):
        _check_visible(cfg, tmp_path / "idx", tmp_path / "idx.shards" / ".ray-driver-x", "shard 1/4 (on n1)")
    marker = tmp_path / ".ray-driver-y"
    marker.write_text("")
    from dataclasses import replace

    gone = replace(cfg, checkpoints=[replace(cfg.checkpoints[0], path=tmp_path / "nowhere.pt")])
    with pytest.raises(ShardError, match=r"checkpoints\[0\]: cannot see .*nowhere\.pt; checkpoints must be on"):
        _check_visible(gone, tmp_path / "idx", marker, "shard 0/4 (on n1)")


def test_cli_ray_usage_errors(setup, tmp_path, monkeypatch, capsys):
    _, _, config = setup
    out = str(tmp_path / "index")
    for extra, message in ((["--ray", "--shard", "0/2"], "--ray runs every shard and the merge itself"),
                           (["--ray", "auto", "--merge", "2"], "--ray runs every shard and the merge itself"),
                           (["--shards", "2"], "--shards goes with --ray")):
        assert main(["index", str(config), "--out", out, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError: Ray not installed
    assert main(["index", str(config), "--out", out, "--ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("tracin index: error: --ray needs Ray, which is not installed here: "
                    "pip install 'tracin-service[ray]'")]
    with pytest.raises(ConfigError, match=r"pip install 'tracin-service\[ray\]'"):
        from indexer.build.distributed import build_with_ray

        build_with_ray(load_config(config), out)
    assert not Path(out).exists()


def test_ray_update_equals_a_single_process_update(ray_session, tmp_path, capsys):
    """tracin index CONFIG --out DIR --update --ray: the update's shards as Ray tasks, then the merge writes
    version 2, equal to the update made in one process (and to a full build: tests/test_update.py)."""
    from indexer.build.update import update_index
    from tests.tasks import GrowingTask
    from tests.test_update import assert_same_index, config

    ckpts = make_checkpoints(GrowingTask(), tmp_path, count=4)
    first = config(tmp_path, ckpts, 30, 3, name="first")
    for name in ("ray", "single"):
        build_index(load_config(first), tmp_path / name)
    full = config(tmp_path, ckpts, 60, 4)
    update_index(load_config(full), tmp_path / "single")
    assert main(["index", str(full), "--out", str(tmp_path / "ray"), "--update", "--ray", "--shards", "2",
                 "--quiet"]) == 0
    assert "updated" in capsys.readouterr().out
    ray_index, single = IndexDirectory.open(tmp_path / "ray"), IndexDirectory.open(tmp_path / "single")
    assert ray_index.version.number == 2
    assert_same_index(ray_index, single)
    assert not (tmp_path / "ray.shards").exists()
