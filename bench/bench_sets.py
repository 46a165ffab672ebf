"""Benchmark set and batch queries over real HTTP (issue 20).

    .venv/bin/python bench/bench_sets.py INDEX_DIR [--batch 100] [--set-size 1000] [--repeats 3] [--json FILE]

Starts `tracin serve INDEX_DIR` (bench/bench_service.py's launcher, with TRACIN_MAX_SET / TRACIN_MAX_BATCH /
TRACIN_MAX_BODY_BYTES raised to fit) and measures, in the same run and on the same server:
  * a batch of `--batch` queries (POST /influence with `examples`, no `aggregate`: one capture pass, the
    candidates' gradients computed once for all members) against the same `--batch` queries sent as single
    requests one after the other: wall time of each, and the throughput ratio (singles' time / batch's time);
    the batch's answers are checked against the singles' (same ids per member);
  * the latency of one set query of `--set-size` members (`aggregate: "sum"`), members posted as examples
    (the held-out examples, cycled) and members given as `train_ids` (random training rows, seeded).
Each figure is the median of `--repeats` runs after one warm-up. Members are the index's held-out examples
(GET /queries), cycled when there are fewer. Prints a markdown table; --json FILE writes the figures.
Timings are only meaningful on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_service import start  # noqa: E402


def timed(client: httpx.Client, body: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = client.post("/influence", json=body)
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        raise SystemExit(f"POST /influence -> {r.status_code}: {r.text[:400]}")
    return seconds, r.json()


def batch_vs_singles(client: httpx.Client, examples: list[dict], k: int, repeats: int) -> dict:
    batch_body = {"examples": examples, "k": k}
    timed(client, batch_body)  # warm-up
    timed(client, {"example": examples[0], "k": k})
    batch_s, singles_s = [], []
    batch_answer, singles = None, None
    for _ in range(repeats):
        seconds, batch_answer = timed(client, batch_body)
        batch_s.append(seconds)
        t0 = time.perf_counter()
        singles = [timed(client, {"example": e, "k": k})[1] for e in examples]
        singles_s.append(time.perf_counter() - t0)
    same = all([h["id"] for h in a["proponents"]] == [h["id"] for h in b["proponents"]]
               and [h["id"] for h in a["opponents"]] == [h["id"] for h in b["opponents"]]
               for a, b in zip(batch_answer["results"], singles))
    t_batch, t_singles = statistics.median(batch_s), statistics.median(singles_s)
    return {"queries": len(examples), "k": k, "batch_s": t_batch, "singles_s": t_singles,
            "batch_queries_per_s": len(examples) / t_batch, "singles_queries_per_s": len(examples) / t_singles,
            "throughput_ratio": t_singles / t_batch, "same_answers": same, "batch_runs_s": batch_s,
            "singles_runs_s": singles_s, "rerank": batch_answer["results"][0]["rerank"]}


def set_latency(client: httpx.Client, body: dict, repeats: int) -> dict:
    timed(client, body)  # warm-up
    runs, took = [], []
    for _ in range(repeats):
        seconds, answer = timed(client, body)
        runs.append(seconds)
        took.append(answer["took_ms"])
    return {"members": answer["set"]["size"], "client_s": statistics.median(runs), "server_ms": statistics.median(took),
            "runs_s": runs, "rerank": answer["rerank"], "exact": answer["exact"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index_dir", type=Path)
    ap.add_argument("--batch", type=int, default=100, help="queries in the batch (and single requests)")
    ap.add_argument("--set-size", type=int, default=1000, help="members of the set query")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra TRACIN_* settings")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    env = {"TRACIN_MAX_BATCH": str(max(args.batch, 1)), "TRACIN_MAX_SET": str(max(args.set_size, 1)),
           "TRACIN_MAX_BODY_BYTES": str(1 << 30), "TRACIN_BODY_TIMEOUT_S": "600"}
    env.update(dict(e.split("=", 1) for e in args.env))
    proc, base, ready_s, log = start(args.index_dir, env, args.timeout)
    try:
        with httpx.Client(base_url=base, timeout=args.timeout) as client:
            info = client.get("/index").json()
            queries = [q["example"] for q in client.get("/queries", params={"limit": 1000}).json()["items"]
                       if q.get("example") is not None]
            if not queries:
                raise SystemExit("the index ships no held-out examples to use as queries")
            cycle = lambda n: [queries[i % len(queries)] for i in range(n)]  # noqa: E731
            batch = batch_vs_singles(client, cycle(args.batch), args.k, args.repeats)
            posted = set_latency(client, {"examples": cycle(args.set_size), "aggregate": "sum", "k": args.k},
                                 args.repeats)
            train_ids = _train_ids(client, info["count"], min(args.set_size, info["count"]))
            stored = set_latency(client, {"train_ids": train_ids, "aggregate": "sum", "k": args.k}, args.repeats)
    finally:
        proc.terminate()
        proc.wait(30)
    figures = {"index": str(args.index_dir), "count": info["count"], "checkpoints": len(info["checkpoints"]),
               "embedding_dim": info["embedding_dim"], "ready_s": ready_s, "batch": batch, "set_posted": posted,
               "set_train_ids": stored, "machine": f"{platform.machine()} {platform.processor()}".strip(),
               "command": "bench/bench_sets.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(table(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if batch["same_answers"] else 1


def _train_ids(client: httpx.Client, count: int, n: int) -> list[str]:
    """n training ids, a seeded random sample of the rows (read from GET /self-influence/top pages)."""
    ids: list[str] = []
    page = 1000
    for offset in range(0, count, page):
        ids += [x["id"] for x in client.get("/self-influence/top", params={"k": page, "offset": offset}).json()["items"]]
    order = np.random.default_rng(0).permutation(len(ids))[:n]
    return [ids[i] for i in sorted(order)]


def table(f: dict) -> str:
    b, p, s = f["batch"], f["set_posted"], f["set_train_ids"]
    return "\n".join([
        f"index: {f['count']:,} training examples, {f['checkpoints']} checkpoints, dim {f['embedding_dim']}",
        "",
        "| measurement | wall time | per query | throughput |",
        "|---|---|---|---|",
        f"| {b['queries']} single requests, one after the other | {b['singles_s']:.2f} s | "
        f"{1000 * b['singles_s'] / b['queries']:.1f} ms | {b['singles_queries_per_s']:.1f} queries/s |",
        f"| one batch of {b['queries']} | {b['batch_s']:.2f} s | {1000 * b['batch_s'] / b['queries']:.1f} ms | "
        f"{b['batch_queries_per_s']:.1f} queries/s (x{b['throughput_ratio']:.2f}; same answers: {b['same_answers']}) |",
        f"| set of {p['members']} posted examples (aggregate sum) | {p['client_s']:.2f} s (server {p['server_ms']:.0f} ms) "
        f"| - | - |",
        f"| set of {s['members']} train_ids (aggregate sum) | {s['client_s']:.2f} s (server {s['server_ms']:.0f} ms) "
        f"| - | - |",
    ])


if __name__ == "__main__":
    sys.exit(main())
