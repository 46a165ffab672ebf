"""A million-example index, built in shards and served (issue 13).

    .venv/bin/python bench/bench_million.py                          # everything (about an hour on 2 cores)
    .venv/bin/python bench/bench_million.py --size 100000 --workdir /tmp/m100k   # a smaller run
    .venv/bin/python bench/bench_million.py --factory IVF4096,Flat --search-params '{ nprobe = 64 }' \
        --sweep 16,32,64,128,256 --sweep-param nprobe --remerge                # the same shards, an IVF index

Data: real embeddings of real training examples. The Fashion-MNIST CNN is trained (1 epoch, SGD, 5
checkpoints) on an augmented set of `--size` rows: the 60k images, then shifted (-2..2 px) and
mirrored copies (`indexer.demo.fashion_mnist.augment_images`), so every row is an example the model
was trained on and the service can re-rank any of them exactly. Nothing is replicated with noise.

Steps, each timed (a finished step is reused on a re-run):
  1. train (skipped when <workdir>/run/fashion_mnist.toml exists);
  2. `tracin index --shard i/N` for N shards, `--parallel` at a time (1 torch thread each), as a job
     array would run them;
  3. `tracin index --merge N --keep-shards` into the `--factory` index (default `PCA32,Flat,RFlat`: every
     row scanned in 32 numbers, the best k x k_factor re-scored with the stored 512): wall time and the
     merge process's peak RSS (wait4 ru_maxrss) and sampled peaks of its anonymous and file-backed memory;
  4. two `tracin serve` replicas on the same index directory with TRACIN_MMAP=true: start-up time
     (process start to /readyz), POST /influence p50 / p99 for held-out images with `rerank: 0` and
     with the default re-ranking (K' = 50), requests alternating between the replicas; each replica's
     RSS (anonymous and file-backed) and PSS (what the shared page cache costs each);
  5. in process, with the service's own engine (the same code as a request): recall@10 of the first
     stage against exact inner-product search over all rows (the refine stage's Flat, or an IVF-Flat
     searched with nprobe = nlist);
     the final answer (first stage K' = 50 + exact TracIn re-ranking) at full size against Flat + the
     same re-ranking; and the final answer against exact TracIn on a random --subset of rows (the first
     stage searched inside the subset with an ID selector, gold = exact TracIn of every subset row).
Prints a markdown summary and writes every figure to <workdir>/million.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_service import _status_kb, percentiles, start  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_timed(cmd: list[str], env: dict, log_file: Path) -> tuple[float, dict, int]:
    """(wall seconds, memory, exit code) of a child process. memory: peak RSS (wait4 ru_maxrss: anonymous
    + file-backed pages, e.g. memory-mapped files being written) and the peaks of RssAnon (what the
    process holds) and RssFile (page cache it maps: reclaimable, shared) sampled every 0.1 s, bytes."""
    import threading

    peaks = {"rss_anon": 0, "rss_file": 0}
    t0 = time.perf_counter()
    with open(log_file, "wb") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                try:
                    for key, name in (("RssAnon", "rss_anon"), ("RssFile", "rss_file")):
                        peaks[name] = max(peaks[name], _status_kb(proc.pid, key) * 1024)
                except OSError:
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, {"peak_rss": int(usage.ru_maxrss) * 1024, **peaks}, proc.returncode


def set_index_table(config: Path, factory: str, search_params: str) -> None:
    """Rewrite the [index] table (the FAISS stage only: shards built under another factory still merge)."""
    text = config.read_text()
    head = text.split("[index]")[0]
    config.write_text(head + f'[index]\nfactory = "{factory}"\nbatch_size = 256\ntrain_sample = 200000\n'
                             f"search_params = {search_params}\n")


def flat_index(index):
    """(an index answering exact inner-product search over every row, its search params): the refine
    stage's Flat of full vectors, or an IVF-Flat probed everywhere."""
    import faiss

    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexRefine):
        return top.refine_index, {}
    return index, {"nprobe": int(faiss.extract_index_ivf(index).nlist)}


def smaps(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    out = {}
    for key in ("Rss", "Pss", "Pss_Anon", "Pss_File"):
        match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        out[key] = int(match.group(1)) * 1024 if match else -1
    return out


def serve_replicas(index: Path, bodies: list[dict], requests: int) -> dict:
    import httpx

    env = {"TRACIN_MMAP": "true"}
    replicas, out = [], {"replicas": []}
    try:
        for _ in range(2):
            proc, base, seconds, _log = start(index, env, timeout=900)
            replicas.append((proc, base))
            out["replicas"].append({"startup_s": round(seconds, 2)})
            log(f"replica at {base} ready in {seconds:.1f} s")
        clients = [httpx.Client(base_url=base, timeout=120) for _, base in replicas]
        for name, extra in (("rerank off", {"rerank": 0}), ("rerank K'=50", {})):
            for c in clients:  # warm each replica
                c.post("/influence", json={**bodies[0], **extra}).raise_for_status()
            client_ms, server_ms = [], []
            for i in range(requests):
                t0 = time.perf_counter()
                r = clients[i % 2].post("/influence", json={**bodies[i % len(bodies)], **extra})
                client_ms.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
                server_ms.append(r.json()["took_ms"])
            out[name] = {"client": percentiles(client_ms), "server": percentiles(server_ms), "n": requests}
            log(f"{name}: p50 {out[name]['client']['p50']:.1f} ms, p99 {out[name]['client']['p99']:.1f} ms")
        for (proc, _), info in zip(replicas, out["replicas"]):
            info.update({"rss": _status_kb(proc.pid, "VmRSS") * 1024, "rss_anon": _status_kb(proc.pid, "RssAnon") * 1024,
                         "rss_file": _status_kb(proc.pid, "RssFile") * 1024, "peak_rss": _status_kb(proc.pid, "VmHWM") * 1024,
                         **{k.lower(): v for k, v in smaps(proc.pid).items()}})
        for c in clients:
            c.close()
    finally:
        for proc, _ in replicas:
            proc.terminate()
            proc.wait(timeout=60)
    return out


def recall_in_process(index: Path, examples: list[dict], subset: int, depth: int = 50, k: int = 10,
                      sweep: list[float] = (), sweep_param: str = "nprobe", subset_depths: list[int] = ()) -> dict:
    """First-stage and final recall with the service's engine (see the module docstring, step 5)."""

    from indexer.store.search import top_k
    from service.loading import load_engine
    from service.settings import Settings

    engine = load_engine(Settings(index_dir=index, mmap=True))
    exact_index, exhaustive = flat_index(engine.first_stage.index)
    rows_subset = np.sort(np.random.default_rng(7).choice(engine.count, size=min(subset, engine.count), replace=False))
    swept = {n: {"proponents": [], "opponents": [], "ms": []} for n in sweep}
    deeper = {n: {"proponents": [], "opponents": []} for n in subset_depths}
    figures = {"first_stage_vs_flat": {"proponents": [], "opponents": []},
               "first_stage_candidates_hold_flat_top10": {"proponents": [], "opponents": []},
               "final_vs_flat_rerank": {"proponents": [], "opponents": []},
               "final_vs_exact_on_subset": {"proponents": [], "opponents": []}}
    schema = engine.task.example_schema
    t0 = time.perf_counter()
    batch = engine.embed_examples([schema(**e) for e in examples], None, keep_grads=True)
    gold_subset = engine.scorer.matrix(batch["grads"], rows_subset)  # [Q, subset] exact TracIn
    t_exact = time.perf_counter() - t0
    log(f"exact TracIn of {len(examples)} queries x {rows_subset.size:,} subset rows in {t_exact:.0f} s")
    for n, example in enumerate(examples):
        out = engine.embed_examples([schema(**example)], None, keep_grads=True)
        q = out["vectors"][0].float().numpy()
        grads = out["grads"]
        (pr, _), (orow, _) = engine.first_stage.search(q, depth, depth)
        for side, cand, sign in (("proponents", pr, 1), ("opponents", orow, -1)):
            flat = top_k(exact_index, q, depth, sign, params=exhaustive).rows
            figures["first_stage_vs_flat"][side].append(len(set(cand[:k]) & set(flat[:k])) / max(1, min(k, flat.size)))
            figures["first_stage_candidates_hold_flat_top10"][side].append(
                len(set(cand) & set(flat[:k])) / max(1, min(k, flat.size)))
            ours = engine.scorer.scores(grads, cand)
            ref = engine.scorer.scores(grads, flat)
            mine = set(ours.rows[_top(ours.total, k, sign)].tolist())
            gold = set(ref.rows[_top(ref.total, k, sign)].tolist())
            figures["final_vs_flat_rerank"][side].append(len(mine & gold) / max(1, len(gold)))
            # inside the subset: the first stage with an ID selector, then exact re-ranking of its K'
            sub = top_k(engine.first_stage.index, q, depth, sign, rows=rows_subset, params=engine.first_stage.params).rows
            ours_sub = engine.scorer.scores(grads, sub)
            mine_sub = set(ours_sub.rows[_top(ours_sub.total, k, sign)].tolist())
            gold_sub = set(rows_subset[_top(gold_subset[n], k, sign)].tolist())
            figures["final_vs_exact_on_subset"][side].append(len(mine_sub & gold_sub) / max(1, len(gold_sub)))
            for n_deep, got in deeper.items():  # the same inside the subset with K' = n_deep
                rows = top_k(engine.first_stage.index, q, n_deep, sign, rows=rows_subset,
                             params=engine.first_stage.params).rows
                scored = engine.scorer.scores(grads, rows)
                got[side].append(len(set(scored.rows[_top(scored.total, k, sign)].tolist()) & gold_sub)
                                 / max(1, len(gold_sub)))
            for value, got in swept.items():  # the K' candidates at another setting hold the Flat top-10?
                t0 = time.perf_counter()
                rows = top_k(engine.first_stage.index, q, depth, sign, params={sweep_param: value}).rows
                got["ms"].append((time.perf_counter() - t0) * 1000)
                got[side].append(len(set(rows) & set(flat[:k])) / max(1, min(k, flat.size)))
        if n % 10 == 9:
            log(f"recall: {n + 1}/{len(examples)} queries; " + ", ".join(
                f"{name} {np.mean(v['proponents']):.3f}/{np.mean(v['opponents']):.3f}" for name, v in figures.items()))
    result = {name: {side: round(float(np.mean(v)), 4) for side, v in sides.items()} for name, sides in figures.items()}
    result.update({"queries": len(examples), "depth": depth, "subset_rows": int(rows_subset.size),
                   "search_params": engine.first_stage.params, "sweep_param": sweep_param,
                   "exact_subset_seconds": round(t_exact, 1),
                   "final_vs_exact_on_subset_by_depth": {n: {side: round(float(np.mean(v[side])), 4) for side in v}
                                                         for n, v in deeper.items()},
                   "sweep": {n: {"candidates_hold_flat_top10": {side: round(float(np.mean(v[side])), 4)
                                                                       for side in ("proponents", "opponents")},
                                        "search_ms_per_end_p50": round(float(np.median(v["ms"])), 2)}
                                    for n, v in swept.items()}})
    return result


def _top(scores: np.ndarray, k: int, sign: int) -> np.ndarray:
    signed = sign * np.asarray(scores)
    order = np.argsort(-signed, kind="stable")[:k]
    return order[signed[order] > 0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".tracin/bench/million")
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--parallel", type=int, default=2, help="shards embedded at once (1 torch thread each)")
    parser.add_argument("--factory", default="PCA32,Flat,RFlat",
                        help="index.factory of the merge (e.g. IVF4096,Flat with --search-params '{ nprobe = 64 }')")
    parser.add_argument("--search-params", default="{ k_factor = 20 }", help="index.search_params (a TOML table)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--recall-queries", type=int, default=100)
    parser.add_argument("--subset", type=int, default=10_000)
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--remerge", action="store_true", help="merge the kept shards again (replaces the index)")
    parser.add_argument("--sweep", default="5,10,20,40",
                        help="values of --sweep-param whose K' candidates are checked against Flat (comma-separated)")
    parser.add_argument("--sweep-param", default="k_factor")
    parser.add_argument("--subset-depths", default="100,200", help="more K' for the recall inside the subset")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "million.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    config = work / "run" / "fashion_mnist.toml"
    index = work / "idx"
    factory = args.factory

    if not config.is_file():
        log(f"training on {args.size:,} augmented rows")
        wall, _, rc = run_timed([sys.executable, "-m", "indexer.demo.fashion_mnist", "train", "--out", str(work / "run"),
                                   "--epochs", "1", "--size", str(args.size), "--threads", str(os.cpu_count())],
                                  env, work / "train.log")
        if rc:
            raise SystemExit(f"training failed: {(work / 'train.log').read_text()[-2000:]}")
        results["train"] = {"seconds": round(wall, 1), "log": (work / "train.log").read_text().strip().splitlines()[-1]}
    set_index_table(config, factory, args.search_params)

    if args.remerge and (index / "manifest.json").is_file():
        shutil.rmtree(index)
    if not (index / "manifest.json").is_file():
        shard_root = work / "idx.shards"
        todo = [i for i in range(args.shards)
                if not (shard_root / f"shard-{i:05d}-of-{args.shards:05d}" / "shard.json").is_file()]
        if todo:
            log(f"embedding shards {todo} of {args.shards}, {args.parallel} at a time")
            shard_env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            t0 = time.perf_counter()
            for batch in range(0, len(todo), args.parallel):
                procs = [subprocess.Popen([sys.executable, "-m", "indexer.cli", "index", str(config), "--out", str(index),
                                           "--shard", f"{i}/{args.shards}", "--quiet"], env=shard_env, cwd=REPO,
                                          stdout=subprocess.DEVNULL, stderr=open(work / f"shard{i}.log", "wb"))
                         for i in todo[batch:batch + args.parallel]]
                if any(p.wait() for p in procs):
                    raise SystemExit("a shard failed: see shard*.log in " + str(work))
            results["shards"] = {"count": args.shards, "parallel": args.parallel,
                                 "wall_seconds": round(time.perf_counter() - t0, 1)}
        infos = [json.loads((shard_root / f"shard-{i:05d}-of-{args.shards:05d}" / "shard.json").read_text())
                 for i in range(args.shards)]
        results.setdefault("shards", {})["embed_seconds"] = [round(i["embed_seconds"], 1) for i in infos]
        shard_bytes = sum(p.stat().st_size for p in shard_root.rglob("vectors.npy"))
        log(f"merging {args.shards} shards ({shard_bytes / 1e9:.2f} GB of vectors) into {factory}")
        wall, memory, rc = run_timed([sys.executable, "-m", "indexer.cli", "index", str(config), "--out", str(index),
                                      "--merge", str(args.shards), "--keep-shards"], env, work / "merge.log")
        if rc:
            raise SystemExit(f"merge failed: {(work / 'merge.log').read_text()[-3000:]}")
        results["merge"] = {"seconds": round(wall, 1), **memory, "shard_vector_bytes": shard_bytes}
        log(f"merged in {wall:.0f} s, peak RSS {memory['peak_rss'] / 2**30:.2f} GiB (anonymous "
            f"{memory['rss_anon'] / 2**30:.2f}, file-backed {memory['rss_file'] / 2**30:.2f}; the shards' vectors: "
            f"{shard_bytes / 2**30:.2f} GiB)")
        results_file.write_text(json.dumps(results, indent=2))
    manifest = json.loads((index / "manifest.json").read_text())
    results["index"] = {"count": manifest["count"], "embedding_dim": manifest["embedding_dim"],
                        "faiss": manifest["faiss"], "bytes": {name: (index / name).stat().st_size for name in manifest["files"]}}
    queries = [json.loads(line) for line in (index / "queries.jsonl").read_text().splitlines()]
    bodies = [{"example": q["example"], "k": 10} for q in queries]

    if not args.skip_serve:
        results["serve"] = serve_replicas(index, bodies, args.requests)
        results_file.write_text(json.dumps(results, indent=2))
    sweep = [float(n) if args.sweep_param == "k_factor" else int(n) for n in args.sweep.split(",") if n.strip()]
    results["recall"] = recall_in_process(index, [q["example"] for q in queries[:args.recall_queries]], args.subset,
                                          sweep=sweep, sweep_param=args.sweep_param,
                                          subset_depths=[int(n) for n in args.subset_depths.split(",") if n.strip()])
    results_file.write_text(json.dumps(results, indent=2))
    print(summary(results))
    return 0


def summary(r: dict) -> str:
    gib = 2 ** 30
    lines = [f"## {r['index']['count']:,} rows x {r['index']['embedding_dim']} ({r['index']['faiss']['factory']}, "
             f"{r['recall']['search_params']})", ""]
    if "train" in r:
        lines.append(f"- train: {r['train']['seconds']} s ({r['train']['log']})")
    if "shards" in r:
        lines.append(f"- shards: {r['shards']}")
    if "merge" in r:
        m = r["merge"]
        lines.append(f"- merge: {m['seconds']} s, peak RSS {m['peak_rss'] / gib:.2f} GiB (peak anonymous "
                     f"{m['rss_anon'] / gib:.2f} GiB, peak file-backed {m['rss_file'] / gib:.2f} GiB) for "
                     f"{m['shard_vector_bytes'] / gib:.2f} GiB of shard vectors")
    lines.append("- files: " + ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in r["index"]["bytes"].items() if v > 2**24))
    if "serve" in r:
        s = r["serve"]
        for name in ("rerank off", "rerank K'=50"):
            c = s[name]["client"]
            lines.append(f"- POST /influence {name}: p50 {c['p50']:.1f} ms, p99 {c['p99']:.1f} ms "
                         f"(server p50 {s[name]['server']['p50']:.1f} ms), {s[name]['n']} requests over 2 replicas")
        for i, rep in enumerate(s["replicas"]):
            lines.append(f"- replica {i}: ready in {rep['startup_s']} s, RSS {rep['rss'] / gib:.2f} GiB (anon "
                         f"{rep['rss_anon'] / gib:.2f}, file {rep['rss_file'] / gib:.2f}), PSS {rep['pss'] / gib:.2f} GiB, "
                         f"peak RSS {rep['peak_rss'] / gib:.2f} GiB")
    rc = r["recall"]
    for name in ("first_stage_vs_flat", "first_stage_candidates_hold_flat_top10", "final_vs_flat_rerank",
                 "final_vs_exact_on_subset"):
        lines.append(f"- recall@10 {name}: proponents {rc[name]['proponents']}, opponents {rc[name]['opponents']}")
    lines.append(f"- ({rc['queries']} held-out queries, K' = {rc['depth']}, subset {rc['subset_rows']:,} rows)")
    for depth, v in rc.get("final_vs_exact_on_subset_by_depth", {}).items():
        lines.append(f"- recall@10 final_vs_exact_on_subset with K' = {depth}: proponents {v['proponents']}, "
                     f"opponents {v['opponents']}")
    for value, v in rc.get("sweep", {}).items():
        hold = v["candidates_hold_flat_top10"]
        lines.append(f"- {rc['sweep_param']} {value}: K' candidates hold the Flat top-10 {hold['proponents']} / {hold['opponents']}, "
                     f"search {v['search_ms_per_end_p50']} ms per end (in process)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
