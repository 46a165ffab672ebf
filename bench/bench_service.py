"""Benchmark the influence service over real HTTP.

    .venv/bin/python bench/bench_service.py INDEX_DIR [--requests 200] [--clients 8] [--k 10] [--mmap]

Starts `tracin serve INDEX_DIR` as a subprocess (a fresh process: nothing warm but what the service
warms itself), and measures
  * time from launching `tracin serve` to GET /readyz = 200 (imports, sha256 verification, loading);
  * p50 / p90 / p99 latency of POST /influence with k=10 (proponents + opponents) for single
    sequential requests, client side (httpx, keep-alive) and server side (`took_ms`), for posted
    held-out examples (gradient work) and for `train_id` queries (stored vector, search only);
  * throughput and latency with N concurrent clients (threads, one keep-alive connection each);
  * the server's resident memory (VmRSS, peak VmHWM from /proc/PID/status) against the index size.
Prints a markdown table (and --json FILE writes the figures).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _status_kb(pid: int, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else -1


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def derive_index(src: Path, factory: str, search_params: dict, out: Path) -> Path:
    """A copy of the index directory whose FAISS file is rebuilt with another factory from the stored
    vectors (what `tracin index` with that `index.factory` would write: same embeddings, recall@10
    measured against exact search and recorded in the manifest). For benchmarking approximate search."""
    import hashlib
    import shutil
    from types import SimpleNamespace

    import faiss

    from indexer.store.manifest import write_manifest
    from indexer.build.pipeline import _write_faiss
    from indexer.store.directory import INDEX_FILE, MANIFEST

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns(INDEX_FILE))
    index = faiss.read_index(str(src / INDEX_FILE))
    vectors = index.reconstruct_n(0, index.ntotal)
    del index
    config = SimpleNamespace(index=SimpleNamespace(factory=factory, train_sample=50_000, search_params=search_params))
    info = _write_faiss(config, vectors, out / INDEX_FILE, work=out.parent / f".{out.name}-blocks")
    manifest = json.loads((out / MANIFEST).read_text())
    for name in info.pop("files"):  # index.faiss, and an on-disk IVF's .ivfdata
        manifest["files"][name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    manifest["faiss"] = info
    write_manifest(out, manifest)  # manifest.json and its digest manifest.sha256
    print(f"derived {factory} index at {out}: recall {info.get('recall_at_10')}", file=sys.stderr)
    return out


def baseline_rss_mb() -> float:
    """RSS of a Python process that only imports what the server imports (no index loaded)."""
    code = ("import torch, faiss, numpy, fastapi, uvicorn, indexer.sketch.embedding, service.app, re, pathlib; "
            "print(re.search(r'VmRSS:\\s+(\\d+)', pathlib.Path('/proc/self/status').read_text()).group(1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    return int(out.stdout.strip()) / 1024


def start(index_dir: Path, env_extra: dict[str, str], timeout: float) -> tuple[subprocess.Popen, str, float, Path]:
    log = Path(tempfile.mkstemp(prefix="bench-serve-", suffix=".log")[1])
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO), "TRACIN_ACCESS_LOG": "false", "PYTHONUNBUFFERED": "1"})
    env.update(env_extra)
    t0 = time.perf_counter()
    with open(log, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "indexer.cli", "serve", str(index_dir), "--port", "0"],
                                stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    base = None
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"tracin serve exited with {proc.returncode}:\n{log.read_text()}")
        if base is None:
            match = re.search(r"API\s+(http://[^\s/]+)/", log.read_text(errors="replace"))
            base = match.group(1) if match else None
        if base is not None:
            try:
                if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                    return proc, base, time.perf_counter() - t0, log
            except httpx.TransportError:
                pass
        time.sleep(0.02)
    proc.terminate()
    raise SystemExit(f"not ready within {timeout}s:\n{log.read_text()}")


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def run_sequential(base: str, bodies: list[dict], n: int) -> tuple[list[float], list[float]]:
    client_ms, server_ms = [], []
    with httpx.Client(base_url=base, timeout=60) as client:
        for i in range(n):
            t0 = time.perf_counter()
            r = client.post("/influence", json=bodies[i % len(bodies)])
            client_ms.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                raise SystemExit(f"POST /influence -> {r.status_code}: {r.text[:300]}")
            server_ms.append(r.json()["took_ms"])
    return client_ms, server_ms


def run_concurrent(base: str, bodies: list[dict], n: int, clients: int) -> tuple[float, list[float]]:
    local = threading.local()
    latencies: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=base, timeout=120)
        t0 = time.perf_counter()
        r = local.client.post("/influence", json=bodies[i % len(bodies)])
        ms = (time.perf_counter() - t0) * 1000
        if r.status_code != 200:
            raise RuntimeError(f"POST /influence -> {r.status_code}: {r.text[:300]}")
        with lock:
            latencies.append(ms)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, range(clients)))  # one connection per worker before the clock starts
        latencies.clear()
        t0 = time.perf_counter()
        list(pool.map(one, range(n)))
        wall = time.perf_counter() - t0
    return n / wall, latencies


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index_dir", type=Path)
    ap.add_argument("--requests", type=int, default=200, help="sequential requests per mode")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients")
    ap.add_argument("--concurrent-requests", type=int, default=400)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--mmap", action="store_true", help="serve with TRACIN_MMAP=true")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra TRACIN_* settings")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--derive-factory", default=None, metavar="FACTORY",
                    help="first rebuild the FAISS file with this factory (e.g. 'IVF1024,Flat') from the stored "
                         "vectors into a copy of the index directory, and benchmark that copy")
    ap.add_argument("--derive-params", default="{}", help="JSON search parameters for the derived index")
    ap.add_argument("--derive-out", type=Path, default=None, help="where the derived copy goes")
    args = ap.parse_args(argv)

    env = dict(e.split("=", 1) for e in args.env)
    if args.mmap:
        env["TRACIN_MMAP"] = "true"
    if args.derive_factory:
        target = args.derive_out or args.index_dir.with_name(
            args.index_dir.name + "-" + re.sub(r"[^A-Za-z0-9]+", "_", args.derive_factory))
        args.index_dir = derive_index(args.index_dir, args.derive_factory, json.loads(args.derive_params), target)
    proc, base, ready_s, log = start(args.index_dir, env, args.timeout)
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            info = client.get("/index").json()
            queries = client.get("/queries", params={"limit": 1000}).json()["items"]
            ready = client.get("/readyz").json()
            train_ids = [it["id"] for it in
                         client.get("/self-influence/top", params={"k": 1000, "offset": 0}).json()["items"]]
        rss_loaded = _status_kb(proc.pid, "VmRSS")
        example_bodies = [{"example": q["example"], "k": args.k} for q in queries if q.get("example") is not None]
        rng = np.random.default_rng(0)
        train_bodies = [{"train_id": i, "k": args.k} for i in rng.permutation(train_ids)]
        results: dict = {"index": str(args.index_dir), "count": info["count"], "dim": info["embedding_dim"],
                         "checkpoints": len(info["checkpoints"]), "factory": info["faiss"]["factory"],
                         "approximate": info["approximate"], "projection": info["projection"]["kind"],
                         "recall_at_10": info["faiss"].get("recall_at_10"),
                         "search_params": info["faiss"].get("search_params_in_use"),
                         "time_to_ready_s": ready_s, "load_seconds": ready.get("load_seconds"),
                         "mmap": args.mmap, "k": args.k, "env": env}
        modes = []
        if example_bodies:
            modes.append(("example", example_bodies))
        modes.append(("train_id", train_bodies))
        for name, bodies in modes:
            run_sequential(base, bodies, 10)  # connection + any lazy init
            client_ms, server_ms = run_sequential(base, bodies, args.requests)
            rps, loaded_ms = run_concurrent(base, bodies, args.concurrent_requests, args.clients)
            results[name] = {"sequential_client_ms": percentiles(client_ms),
                             "sequential_server_ms": percentiles(server_ms),
                             "concurrent_rps": rps, "concurrent_client_ms": percentiles(loaded_ms),
                             "requests": args.requests, "concurrent_requests": args.concurrent_requests,
                             "clients": args.clients}
        results["rss_loaded_mb"] = rss_loaded / 1024
        results["rss_mb"] = _status_kb(proc.pid, "VmRSS") / 1024
        results["rss_peak_mb"] = _status_kb(proc.pid, "VmHWM") / 1024
        results["rss_anon_mb"] = _status_kb(proc.pid, "RssAnon") / 1024
        results["rss_file_mb"] = _status_kb(proc.pid, "RssFile") / 1024
        results["rss_imports_only_mb"] = baseline_rss_mb()
        index_dir = Path(args.index_dir)
        results["index_dir_mb"] = _dir_size(index_dir) / (1 << 20)
        results["faiss_file_mb"] = (index_dir / "index.faiss").stat().st_size / (1 << 20)
        results["checkpoints_mb"] = _dir_size(index_dir / "checkpoints") / (1 << 20)
        results["machine"] = {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                              "cpu": _cpu_model(), "python": platform.python_version()}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _cpu_model() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return match.group(1).strip() if match else platform.processor()
    except OSError:
        return platform.processor()


def _recall(r: dict) -> str:
    recall = r.get("recall_at_10")
    return f", recall@10 {recall}" if recall else ""


def table(r: dict) -> str:
    lines = [f"Index: `{r['index']}`: {r['count']} examples, {r['checkpoints']} checkpoints, dim {r['dim']}, "
             f"{r['projection']} projection, FAISS `{r['factory']}` ({'approximate' if r['approximate'] else 'exact'})"
             f"{', mmap' if r['mmap'] else ''}{_recall(r)}; k={r['k']}; machine: {r['machine']['affinity']} CPUs "
             f"({r['machine']['cpu']})", "",
             "| measure | value |", "|---|---|",
             f"| `tracin serve` to ready | {r['time_to_ready_s']:.2f} s (index load + verify + warm-up "
             f"{r['load_seconds']:.2f} s) |"]
    for name, label in (("example", "posted example (gradients + search)"), ("train_id", "train_id (search only)")):
        m = r.get(name)
        if not m:
            continue
        s, sv, c = m["sequential_client_ms"], m["sequential_server_ms"], m["concurrent_client_ms"]
        lines += [
            f"| {label}: p50 / p90 / p99, sequential ({m['requests']} requests) | {s['p50']:.1f} / {s['p90']:.1f} / "
            f"{s['p99']:.1f} ms (server `took_ms` p50 {sv['p50']:.1f}, p99 {sv['p99']:.1f}) |",
            f"| {label}: throughput, {m['clients']} concurrent clients | {m['concurrent_rps']:.0f} req/s "
            f"(p50 {c['p50']:.1f} ms, p99 {c['p99']:.1f} ms) |",
        ]
    lines += [f"| server RSS after load / after the runs / peak | {r['rss_loaded_mb']:.0f} / {r['rss_mb']:.0f} / "
              f"{r['rss_peak_mb']:.0f} MiB (anonymous {r['rss_anon_mb']:.0f} + file-backed {r['rss_file_mb']:.0f}; "
              f"a process that only imports the same libraries: {r['rss_imports_only_mb']:.0f} MiB) |",
              f"| index directory on disk (FAISS file, checkpoints) | {r['index_dir_mb']:.0f} MiB "
              f"({r['faiss_file_mb']:.0f} MiB, {r['checkpoints_mb']:.1f} MiB) |"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
