"""Distributed build on Ray (issue 13): throughput of `build_with_ray` on 2 workers against 1.

    .venv/bin/python bench/bench_ray.py                    # Fashion-MNIST 10k rows, 3 checkpoints (~4 min)
    .venv/bin/python bench/bench_ray.py --rows 20000 --repeats 3

Needs the Debian package `dataset-fashion-mnist` and the `ray` extra. The CNN of
`indexer/demo/fashion_mnist.py` is trained once (1 epoch on the first --rows images, 3 checkpoints) into
--run-dir. Then, on one local Ray cluster (num_cpus = the machine's cores, started once and reused; its
start-up is timed apart), interleaved --repeats times in rotating order, all into a fresh index
directory with the same config:

  plain   `build_index` in this process with torch threads = all cores (the reference)
  ray 1   `build_with_ray`, 1 shard task x all cores (torch threads = cores)
  ray N   `build_with_ray`, N = cores shard tasks x 1 core each

rows/s = rows / wall seconds of the whole call (for Ray: submitting the tasks, every shard's own
validation and self-check, the embedding, the merge into the index on the driver). Medians over repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.config import load_config  # noqa: E402
from indexer.build.pipeline import build_index  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_run(run_dir: Path, rows: int, checkpoints: int) -> Path:
    config = run_dir / "fashion_mnist.toml"
    if config.is_file():
        log(f"reusing the trained run in {run_dir}")
        return config
    from indexer.demo.fashion_mnist import data_available, train_fashion_mnist

    if not data_available():
        sys.exit("bench_ray: needs the Debian package dataset-fashion-mnist")
    log(f"training the Fashion-MNIST CNN on {rows} rows into {run_dir}")
    torch.set_num_threads(os.cpu_count() or 1)
    return train_fashion_mnist(run_dir, epochs=1, checkpoints=checkpoints, limit=rows, log=log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / ".tracin/bench/ray-index")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        import ray
    except ImportError:
        sys.exit("bench_ray: needs Ray: pip install 'tracin-service[ray]'")
    from indexer.build.distributed import build_with_ray

    cores = os.cpu_count() or 1
    run_dir = args.run_dir or REPO / f".tracin/bench/ray-fmnist-{args.rows}"
    config = load_config(ensure_run(run_dir, args.rows, args.checkpoints))
    rows = args.rows
    args.out.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start = time.perf_counter() - t0
    log(f"local Ray cluster with {cores} CPUs started in {ray_start:.1f}s")

    def plain() -> dict:
        torch.set_num_threads(cores)
        started = time.perf_counter()
        build_index(config, args.out, overwrite=True)
        return {"seconds": time.perf_counter() - started}

    def on_ray(shards: int, cpus: int):
        def run() -> dict:
            torch.set_num_threads(cores)  # the driver's merge
            result = build_with_ray(config, args.out, shards=shards, cpus_per_task=cpus, overwrite=True, log=None)
            return {"seconds": result.seconds, "embed_wall": result.embed_wall_seconds, "merge": result.merge_seconds,
                    "task_seconds": [round(r["seconds"], 2) for r in result.shards]}
        return run

    variants = {
        f"plain build_index, 1 process x {cores} threads": plain,
        f"Ray, 1 worker x {cores} threads": on_ray(1, cores),
        f"Ray, {cores} workers x 1 thread": on_ray(cores, 1),
    }
    names = list(variants)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            figures = variants[name]()
            runs[name].append(figures)
            log(f"repeat {repeat + 1}: {name}: {figures['seconds']:.1f}s ({rows / figures['seconds']:.0f} rows/s) "
                f"{ {k: v for k, v in figures.items() if k != 'seconds'} or ''}  load {os.getloadavg()[0]:.2f}")
    ray.shutdown()

    median = {name: statistics.median(r["seconds"] for r in runs[name]) for name in names}
    one, many = names[1], names[2]
    print(f"Distributed build (Ray), Fashion-MNIST CNN, {rows:,} rows x {len(config.checkpoints)} checkpoints, "
          f"projection {config.projection.kind} {config.projection.dim}, batch {config.index.batch_size}")
    print(f"machine: {cores} CPU cores shared with other jobs (load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}); torch {torch.__version__}, ray {ray.__version__}")
    print(f"NOTE: only {cores} cores: '{cores} workers x 1 thread' competes with '1 worker x {cores} threads' "
          "for the same cores; it measures how well shards use a machine, not scaling across machines")
    print(f"local Ray cluster start-up (once, not in the figures below): {ray_start:.1f}s")
    print()
    print("| build | wall s (median) | each run | rows/s |")
    print("|---|---:|---|---:|")
    for name in names:
        each = ", ".join(f"{r['seconds']:.1f}" for r in runs[name])
        print(f"| {name} | {median[name]:.1f} | {each} | {rows / median[name]:.0f} |")
    print()
    print(f"ratio {cores} workers / 1 worker (rows/s): {median[one] / median[many]:.2f}")
    print(f"ratio {cores} workers / plain build_index (rows/s): {median[names[0]] / median[many]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cores": cores, "ray_start": ray_start, "runs": runs,
                                         "median_seconds": median}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
