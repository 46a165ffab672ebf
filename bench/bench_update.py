"""Updating an index (issue 21): `tracin index --update` against a full rebuild, at Fashion-MNIST scale.

    .venv/bin/python bench/bench_update.py                                   # 60k rows, 5 checkpoints
    .venv/bin/python bench/bench_update.py --rows 600 --checkpoints 3        # a smoke run (~1 min)

Needs the Debian package `dataset-fashion-mnist`. The CNN of `indexer/demo/fashion_mnist.py` is trained once
(1 epoch on the first --rows images, --checkpoints checkpoints with their lrs) into --run-dir (reused when
there). Then, in one process, each into a fresh directory (torch threads = --threads, default all cores):

  full         `build_index` of every row at every checkpoint: the rebuild an update replaces
  +1% rows     an index of the first rows - rows // 100 rows (built first, not timed), then `update_index` to
               every row: the new rows embedded at every checkpoint, the FAISS stage rewritten
  +1 ckpt      an index of every row at the first checkpoints - 1 (built first, not timed), then
               `update_index` with the last checkpoint: its term added to every stored row

Wall seconds of each timed call (the update's: opening and verifying the served version, the config's
validation and self-check, the content digests of every row, the embedding, the new version's files and the
switch), its embedding seconds, and the ratio update / full rebuild. Each updated index is compared with the
full build (vectors: max relative difference; self-influence: max relative difference), so the figures are of
an update that gives the same index. --repeats N repeats each timed call N times (fresh directories, medians).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.build.pipeline import build_index  # noqa: E402
from indexer.build.update import update_index  # noqa: E402
from indexer.config import TaskRef, load_config  # noqa: E402
from indexer.store.directory import IndexDirectory  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_run(run_dir: Path, rows: int, checkpoints: int) -> Path:
    config = run_dir / "fashion_mnist.toml"
    if config.is_file():
        log(f"reusing the trained run in {run_dir}")
        return config
    from indexer.demo.fashion_mnist import data_available, train_fashion_mnist

    if not data_available():
        sys.exit("bench_update: needs the Debian package dataset-fashion-mnist")
    log(f"training the Fashion-MNIST CNN on {rows} rows ({checkpoints} checkpoints) into {run_dir}")
    return train_fashion_mnist(run_dir, epochs=1, checkpoints=checkpoints, limit=rows, log=log)


def with_rows(config, rows: int):
    args = dict(config.task.args)
    args["limit"] = rows
    return dataclasses.replace(config, task=TaskRef(config.task.ref, args))


def with_checkpoints(config, count: int):
    return dataclasses.replace(config, checkpoints=list(config.checkpoints[:count]))


def stored(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = IndexDirectory.open(path, verify=False)
    base = faiss.downcast_index(index.index)
    if isinstance(base, faiss.IndexRefine):
        base = faiss.downcast_index(base.refine_index)
    if (index.path / "vectors.npy").is_file():
        vectors = np.load(index.path / "vectors.npy")
    else:
        vectors = base.reconstruct_n(0, base.ntotal)
    return np.asarray(vectors, dtype=np.float64), np.asarray(index.self_influence, dtype=np.float64)


def difference(path: Path, reference: Path) -> dict:
    (a, sa), (b, sb) = stored(path), stored(reference)
    return {"vectors_max_rel": float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)),
            "self_influence_max_rel": float(np.abs(sa - sb).max() / max(np.abs(sb).max(), 1e-300)),
            "rows": int(a.shape[0])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--checkpoints", type=int, default=5, help="checkpoints of the full index (>= 2)")
    parser.add_argument("--factory", default=None, help="index.factory (default: the trained run's config, Flat)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / ".tracin/bench/update")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.checkpoints < 2:
        parser.error("--checkpoints must be at least 2 (the update adds the last one)")
    if args.rows < 200:
        parser.error("--rows must be at least 200 (+1% is rows // 100 new rows)")
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    run_dir = args.run_dir or REPO / f".tracin/bench/update-fmnist-{args.rows}-{args.checkpoints}"
    config = load_config(ensure_run(run_dir, args.rows, args.checkpoints))
    if args.factory:
        config = dataclasses.replace(config, index=dataclasses.replace(config.index, factory=args.factory))
    config = with_rows(config, args.rows)
    if len(config.checkpoints) != args.checkpoints:
        sys.exit(f"bench_update: {run_dir} holds {len(config.checkpoints)} checkpoints, not {args.checkpoints}; "
                 "use another --run-dir")
    fewer_rows = args.rows - args.rows // 100
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    times: dict[str, list[dict]] = {"full": [], "rows": [], "checkpoint": []}
    checks = {}
    for repeat in range(args.repeats):
        log(f"repeat {repeat + 1}/{args.repeats}: full build of {args.rows} rows x {args.checkpoints} checkpoints")
        full = out / f"full-{repeat}"
        t0 = time.perf_counter()
        result = build_index(config, full)
        times["full"].append({"seconds": time.perf_counter() - t0, "embed_seconds": result.embed_seconds})

        log(f"+1% rows: index of {fewer_rows} rows (not timed), then the update to {args.rows}")
        rows_dir = out / f"rows-{repeat}"
        build_index(with_rows(config, fewer_rows), rows_dir)
        t0 = time.perf_counter()
        update = update_index(config, rows_dir)
        times["rows"].append({"seconds": time.perf_counter() - t0, "embed_seconds": update.embed_seconds})
        assert update.rows_added == args.rows - fewer_rows and update.checkpoints_added == 0

        log(f"+1 checkpoint: index at {args.checkpoints - 1} checkpoints (not timed), then the update with the last")
        ckpt_dir = out / f"checkpoint-{repeat}"
        build_index(with_checkpoints(config, args.checkpoints - 1), ckpt_dir)
        t0 = time.perf_counter()
        update = update_index(config, ckpt_dir)
        times["checkpoint"].append({"seconds": time.perf_counter() - t0, "embed_seconds": update.embed_seconds})
        assert update.rows_added == 0 and update.checkpoints_added == 1
        if repeat == 0:
            checks = {"rows": difference(rows_dir, full), "checkpoint": difference(ckpt_dir, full)}
        for path in (full, rows_dir, ckpt_dir):
            shutil.rmtree(path, ignore_errors=True)

    def median(name: str, key: str) -> float:
        return statistics.median(t[key] for t in times[name])

    full_s = median("full", "seconds")
    report = {
        "rows": args.rows, "checkpoints": args.checkpoints, "factory": config.index.factory,
        "threads": torch.get_num_threads(), "repeats": args.repeats, "cpus": len(os.sched_getaffinity(0)),
        "full": {"seconds": round(full_s, 2), "embed_seconds": round(median("full", "embed_seconds"), 2)},
        "plus_1pct_rows": {"new_rows": args.rows - fewer_rows, "seconds": round(median("rows", "seconds"), 2),
                           "embed_seconds": round(median("rows", "embed_seconds"), 2),
                           "ratio_to_full": round(median("rows", "seconds") / full_s, 4), **checks.get("rows", {})},
        "plus_1_checkpoint": {"seconds": round(median("checkpoint", "seconds"), 2),
                              "embed_seconds": round(median("checkpoint", "embed_seconds"), 2),
                              "ratio_to_full": round(median("checkpoint", "seconds") / full_s, 4),
                              **checks.get("checkpoint", {})},
        "runs": times,
    }
    print(f"full rebuild   {args.rows} rows x {args.checkpoints} checkpoints: {full_s:8.1f} s")
    for name, key in (("+1% rows", "plus_1pct_rows"), ("+1 checkpoint", "plus_1_checkpoint")):
        r = report[key]
        print(f"{name:<14} update: {r['seconds']:8.1f} s  = {r['ratio_to_full']:.3f} x the rebuild "
              f"(embedding {r['embed_seconds']:.1f} s; vectors max rel diff to the full build {r['vectors_max_rel']:.1e})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
