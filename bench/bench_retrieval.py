"""Retrieval benchmark (issue 9): compact embeddings + exact re-ranking against exact TracIn.

    .venv/bin/python bench/bench_retrieval.py                      # Fashion-MNIST 60k (needs dataset-fashion-mnist)
    .venv/bin/python bench/bench_retrieval.py --dataset digits     # the embedded digits demo
    .venv/bin/python bench/bench_retrieval.py --quick              # a reduced run (minutes)
    .venv/bin/python bench/bench_retrieval.py --optimizer adamw --limit 10000   # an AdamW-trained CNN (issue 18)

In one run, side by side:
  (a) the reference: exact TracIn of --queries held-out examples (the model's prediction at the last
      checkpoint as the query label, as the service does by default) against EVERY training example,
      sum_i sum_l <w_{i,l} (.) G_{i,l}(q), G_{i,l}(z)> with the step weights the index uses (w = lr for SGD;
      lr * Gamma for a run trained with --optimizer adamw, from the Adam state saved with each checkpoint,
      `indexer.optimizer.step`), from the same per-example gradients the index uses (factored inner products
      for scalar weights, explicit gradients for a preconditioner; float64 accumulation); in the same pass,
      the compact embeddings sqrt(w) (.) G at every --dims;
  (b) recall@10 of the proponents (largest) and opponents (most negative) for every dim x K': the first
      stage proposes K' candidates per end, exact TracIn re-ranks them (K' = 0: the index's estimates);
  (c) the index the default config builds: `tracin index` timed against a plain batched forward +
      loss.sum().backward() over the same examples and checkpoints (interleaved: plain, build, plain),
      its size per example;
  (d) that index served by `tracin serve` (real uvicorn): POST /influence for every query, default
      settings and `rerank: 0`, p50 / p95 latency, recall@10 of the answers against (a) and the largest
      relative difference between the returned scores and exact TracIn.
Prints markdown tables and writes every figure to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.config import load_config  # noqa: E402
from indexer.score.exact import weigh  # noqa: E402
from indexer.sketch.embedding import CheckpointEmbedder, plan_embedding  # noqa: E402
from indexer.sketch.projection import make_projector  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- set-up ---------------------------------------------------------------------------------------------
def ensure_run(dataset: str, run_dir: Path, quick: bool, optimizer: str = "sgd", limit: int | None = None) -> Path:
    """Train once (or reuse): checkpoints (with the optimizer's state) + the default config under run_dir."""
    config = run_dir / ("fashion_mnist.toml" if dataset == "fmnist" else "digits.toml")
    if config.is_file():
        log(f"reusing the trained run in {run_dir}")
        return config
    log(f"training {dataset} ({optimizer}) into {run_dir}")
    if dataset == "fmnist":
        from indexer.demo.fashion_mnist import train_fashion_mnist

        return train_fashion_mnist(run_dir, epochs=1 if quick else 3, checkpoints=5, limit=limit, log=log,
                                   optimizer=optimizer)
    from indexer.demo.digits import train_digits

    return train_digits(run_dir, epochs=30, checkpoints=5, optimizer=optimizer)


def task_and_checkpoints(config_path: Path, limit: int | None):
    """(config, task, checkpoints with the step weights `tracin index` gives them) — the build's own
    preparation (`indexer.build.pipeline.prepare`: optimizer state read, formula chosen, self-check)."""
    from dataclasses import replace

    from indexer.build.pipeline import prepare
    from indexer.config import TaskRef

    config = load_config(config_path)
    if limit is not None:
        config = replace(config, task=TaskRef(config.task.ref, {**config.task.args, "limit": limit}))
    prepared = prepare(config, log=log)
    return config, prepared.task, prepared.checkpoints


# -- (a) exact reference and compact embeddings at every dim, in one pass -------------------------------------
def reference_pass(task, checkpoints, queries, dims: list[int], batch_size: int, threads: int) -> dict:
    """exact [N, Q] float64, and per dim: train embeddings [N, D] float32, query embeddings [Q, D]."""
    torch.set_num_threads(threads)
    train = task.training_set()
    N = len(train)
    qx, qy = queries
    plan = plan_embedding(task, checkpoints, None, "exact", 1, 0, train.batch(0, 3))
    exact = np.zeros((N, qy.shape[0]), dtype=np.float64)
    emb = {d: np.zeros((N, d), dtype=np.float32) for d in dims}
    qemb = {d: np.zeros((qy.shape[0], d), dtype=np.float32) for d in dims}
    t0 = time.perf_counter()
    for c, ckpt in enumerate(checkpoints):
        embedder = CheckpointEmbedder(task, ckpt, c, plan)  # weights / scales: the checkpoint's step weights
        projectors = {d: [make_projector(b, "sketch", d, 0, c).to("cpu", embedder.dtype) for b in plan.blocks]
                      for d in dims}
        q_grads = embedder.grads(qx, qy).grads
        # the query's side of <w (.) G_q, G_z>: a scalar weight keeps the factored form (factored inner
        # products); a preconditioner is applied to the query's explicit gradient once, and the training side
        # is taken explicit too (one matrix product for all queries)
        q_sides = [weigh(q, w) for q, w in zip(q_grads, embedder.weights)]
        q_dense = [side.full().reshape(qy.shape[0], -1).to(torch.float64) if isinstance(w, torch.Tensor) else None
                   for (side, _), w in zip(q_sides, embedder.weights)]
        with torch.no_grad():
            for d, ps in projectors.items():
                qemb[d] += sum(p.project(g.weighted(s))
                               for p, g, s in zip(ps, q_grads, embedder.scales)).float().numpy()
        for start in range(0, N, batch_size):
            stop = min(start + batch_size, N)
            grads = embedder.grads(*train.batch(start, stop)).grads
            with torch.no_grad():
                block = sum(g.inner(side) * scale if dense is None
                            else g.full().reshape(g.batch, -1).to(torch.float64) @ dense.T
                            for g, (side, scale), dense in zip(grads, q_sides, q_dense))
                exact[start:stop] += block.numpy()
                for d, ps in projectors.items():
                    emb[d][start:stop] += sum(p.project(g.weighted(s)) for p, g, s
                                              in zip(ps, grads, embedder.scales)).float().numpy()
        log(f"reference: checkpoint {c + 1}/{len(checkpoints)} ({time.perf_counter() - t0:.0f}s)")
    return {"exact": exact, "emb": emb, "qemb": qemb, "seconds": time.perf_counter() - t0}


# -- (b) recall@10 for dim x K' ----------------------------------------------------------------------------
def top(scores: np.ndarray, k: int, sign: int) -> np.ndarray:
    signed = sign * scores
    k = min(k, scores.size)
    part = np.argpartition(-signed, k - 1)[:k]
    part = part[signed[part] > 0]
    return part[np.argsort(-signed[part], kind="stable")]


def recall_table(ref: dict, depths: list[int], k: int = 10) -> dict:
    exact = ref["exact"]
    out = {}
    for d, emb in ref["emb"].items():
        approx = emb @ ref["qemb"][d].T  # [N, Q]
        for depth in depths:
            rec = {"proponents": [], "opponents": []}
            for q in range(exact.shape[1]):
                for name, sign in (("proponents", 1), ("opponents", -1)):
                    truth = top(exact[:, q], k, sign)
                    if truth.size == 0:
                        continue
                    if depth == 0:
                        got = top(approx[:, q], k, sign)
                    else:
                        cand = np.unique(np.concatenate([top(approx[:, q], depth, 1), top(approx[:, q], depth, -1)]))
                        got = cand[top(exact[cand, q], k, sign)]
                    rec[name].append(len(set(truth.tolist()) & set(got.tolist())) / truth.size)
            out[(d, depth)] = {n: float(np.mean(v)) for n, v in rec.items()}
    return out


# -- (c) build vs plain -------------------------------------------------------------------------------------
def plain_pass(task, checkpoints, batch_size: int, threads: int) -> float:
    """Seconds of a plain batched forward + loss.sum().backward() over the training set at every checkpoint."""
    from indexer.sketch.embedding import load_model

    torch.set_num_threads(threads)
    train = task.training_set()
    t0 = time.perf_counter()
    for ckpt in checkpoints:
        model = load_model(task, ckpt, "cpu", torch.float32)
        model.requires_grad_(True)
        for start in range(0, len(train), batch_size):
            x, y = train.batch(start, min(start + batch_size, len(train)))
            model.zero_grad(set_to_none=True)
            task.loss(task.forward(model, x), y).sum().backward()
    return time.perf_counter() - t0


def build(config_path: Path, out: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "TRACIN_THREADS": str(threads)}
    cmd = [sys.executable, "-c", f"import torch; torch.set_num_threads({threads}); from indexer.cli import main; "
           f"raise SystemExit(main(['index', {str(config_path)!r}, '--out', {str(out)!r}, '--force', '--quiet']))"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"tracin index failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = {p.name: p.stat().st_size for p in out.rglob("*") if p.is_file()}
    return {"seconds": seconds, "manifest_build": manifest["build"], "dim": manifest["embedding_dim"],
            "index_bytes": sizes.get("index.faiss", 0), "dir_bytes": sum(sizes.values()),
            "count": manifest["count"]}


# -- (d) served -----------------------------------------------------------------------------------------------
def serve_and_query(index: Path, examples: list[dict], exact: np.ndarray, ids: list[str], settings: dict,
                    k: int = 10) -> dict:
    import httpx

    env = {**os.environ, "PYTHONPATH": str(REPO), "TRACIN_ACCESS_LOG": "false", "PYTHONUNBUFFERED": "1",
           **{f"TRACIN_{key.upper()}": str(value) for key, value in settings.items()}}
    proc = subprocess.Popen([sys.executable, "-m", "indexer.cli", "serve", str(index), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    base = None
    deadline = time.time() + 300
    lines = []
    while time.time() < deadline and base is None:
        line = proc.stdout.readline()
        lines.append(line)
        match = re.search(r"API\s+(http://127\.0\.0\.1:\d+)/", line)
        if match:
            base = match.group(1)
        if proc.poll() is not None:
            raise RuntimeError("tracin serve exited:\n" + "".join(lines))
    row_of = {i: r for r, i in enumerate(ids)}
    out = {"hits": []}
    hits_of = out["hits"]
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            for name, extra in (("default", {}), ("rerank off", {"rerank": 0})):
                client.post("/influence", json={"example": examples[0], "k": k, **extra})  # warm
                times, recalls, errors, scale_errors = [], {"proponents": [], "opponents": []}, [], []
                for q, example in enumerate(examples):
                    t0 = time.perf_counter()
                    res = client.post("/influence", json={"example": example, "k": k, **extra})
                    times.append(time.perf_counter() - t0)
                    body = res.json()
                    for side, sign in (("proponents", 1), ("opponents", -1)):
                        truth = set(top(exact[:, q], k, sign).tolist())
                        got = {row_of[h["id"]] for h in body[side]}
                        if truth:
                            recalls[side].append(len(truth & got) / len(truth))
                        if body["exact"]:
                            errors += [abs(h["score"] - exact[row_of[h["id"]], q]) / abs(exact[row_of[h["id"]], q])
                                       for h in body[side]]
                            top_score = np.abs(exact[:, q]).max()
                            scale_errors += [abs(h["score"] - exact[row_of[h["id"]], q]) / top_score for h in body[side]]
                    if name == "default":
                        hits_of.append([(row_of[h["id"]], h["score"]) for side in ("proponents", "opponents")
                                        for h in body[side]])
                t = np.asarray(times) * 1000
                out[name] = {"p50_ms": float(np.median(t)), "p95_ms": float(np.percentile(t, 95)),
                             "mean_ms": float(t.mean()), "recall": {s: float(np.mean(v)) for s, v in recalls.items()},
                             "max_rel_score_error": float(max(errors)) if errors else None,
                             "max_score_error_of_top": float(max(scale_errors)) if scale_errors else None,
                             "exact": body["exact"], "rerank": body.get("rerank")}
                log(f"served ({name}): p50 {out[name]['p50_ms']:.1f} ms, recall {out[name]['recall']}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def float64_check(task, checkpoints, queries, hits: list[list[tuple[int, float]]], count: int) -> dict:
    """Served (re-ranked, float32 model) scores against exact TracIn of the same pairs computed with the
    whole model in float64 (compute_dtype float64), for the first `count` queries."""
    from indexer.sketch.embedding import Embedder
    from indexer.score.exact import ExactScorer

    train = task.training_set()
    qx, qy = queries
    plan = plan_embedding(task, checkpoints, None, "exact", 1, 0, train.batch(0, 3), "float64")
    embedder = Embedder(task, checkpoints, plan)
    scorer = ExactScorer.for_examples(embedder, train)
    rel, of_top = [], []
    for q in range(min(count, len(hits))):
        rows = np.asarray([r for r, _ in hits[q]])
        served = np.asarray([s for _, s in hits[q]])
        grads = [p.grads for p in embedder.embed(qx[q:q + 1], qy[q:q + 1], keep_grads=True).per_checkpoint]
        truth = scorer.scores(grads, rows).total
        rel += (np.abs(served - truth) / np.abs(truth)).tolist()
        of_top += (np.abs(served - truth) / np.abs(truth).max()).tolist()
    return {"queries": min(count, len(hits)), "pairs": len(rel), "max_rel": float(max(rel)),
            "median_rel": float(np.median(rel)), "max_of_top": float(max(of_top))}


# -- main ------------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["fmnist", "digits"], default="fmnist")
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dims", default="128,256,512,1024,2048")
    parser.add_argument("--depths", default="0,10,20,50,100,200")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the reference, build and plain")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="10k Fashion-MNIST rows, 50 queries")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                        help="train the run with this optimizer (adamw: the index and the reference use the "
                             "optimizer-aware formula lr * Gamma from the saved Adam state)")
    parser.add_argument("--limit", type=int, default=None, help="Fashion-MNIST: the first N training images")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    suffix = "" if args.optimizer == "sgd" else f"-{args.optimizer}"
    limit = 10_000 if (args.quick and args.dataset == "fmnist") else args.limit
    if limit is not None and args.dataset == "fmnist":
        suffix += f"-{limit}"
    run_dir = args.run_dir or REPO / ".tracin/bench" / (("fmnist-run" if args.dataset == "fmnist" else "digits-run")
                                                         + suffix)
    queries_n = 50 if args.quick else args.queries
    dims = [int(x) for x in args.dims.split(",")]
    depths = [int(x) for x in args.depths.split(",")]
    config_path = ensure_run(args.dataset, run_dir, args.quick, args.optimizer, limit)
    config, task, checkpoints = task_and_checkpoints(config_path, limit)
    if limit is not None and "limit" not in load_config(config_path).task.args:  # a full run, indexed in part
        text = config_path.read_text()
        config_path = run_dir / "limited.toml"
        config_path.write_text(text.replace("task_args = { ", f"task_args = {{ limit = {limit}, "))
    held = task.held_out_set()
    qx, _ = held.batch(0, queries_n)
    from indexer.sketch.embedding import load_model

    with torch.no_grad():
        last = load_model(task, checkpoints[-1], "cpu", torch.float32)
        qy, _ = task.predict(task.forward(last, qx))  # the service's default query label
    examples = [held.example_of(i) for i in range(queries_n)]
    train = task.training_set()
    ids = [train.id_of(i) for i in range(len(train))]
    results: dict = {"dataset": args.dataset, "optimizer": args.optimizer, "count": len(train), "queries": queries_n,
                     "threads": args.threads, "formula": [c.formula for c in checkpoints],
                     "checkpoints": [{"file": c.path.name, "lr": c.lr} for c in checkpoints], "load": os.getloadavg()}

    log(f"reference pass: {len(train)} training examples x {queries_n} queries x {len(checkpoints)} checkpoints")
    ref = reference_pass(task, checkpoints, (qx, qy), dims, args.batch_size, args.threads)
    results["reference_seconds"] = ref["seconds"]
    table = recall_table(ref, depths)
    results["recall"] = {f"{d}:{depth}": v for (d, depth), v in table.items()}
    print("\n### recall@10 (proponents / opponents) by dim x K'\n")
    print("| dim | bytes/example | " + " | ".join(f"K'={d}" if d else "no re-ranking" for d in depths) + " |")
    print("|---|---|" + "---|" * len(depths))
    for d in dims:
        cells = [f"{table[(d, depth)]['proponents']:.3f} / {table[(d, depth)]['opponents']:.3f}" for depth in depths]
        print(f"| {d} | {4 * d:,} | " + " | ".join(cells) + " |")

    if not args.skip_build:
        index = run_dir.parent / f"{run_dir.name}-index"
        plain = []
        plain.append(plain_pass(task, checkpoints, args.batch_size, args.threads))
        built = build(config_path, index, args.threads)
        plain.append(plain_pass(task, checkpoints, args.batch_size, args.threads))
        results["build"] = built
        results["plain_seconds"] = plain
        ratio = built["seconds"] / float(np.mean(plain))
        embed_ratio = built["manifest_build"]["embed_seconds"] / float(np.mean(plain))
        print(f"\n### index build (default config: dim {built['dim']}) vs plain forward+backward\n")
        print(f"plain {plain[0]:.1f} / {plain[1]:.1f} s; tracin index {built['seconds']:.1f} s (whole command) = "
              f"{ratio:.2f}x; embedding loop {built['manifest_build']['embed_seconds']:.1f} s = {embed_ratio:.2f}x; "
              f"index.faiss {built['index_bytes'] / built['count']:.0f} bytes/example, directory "
              f"{built['dir_bytes'] / 1e6:.1f} MB")
        results["build_ratio"], results["embed_ratio"] = ratio, embed_ratio
        served = serve_and_query(index, examples, ref["exact"], ids, {"compute_threads": 1})
        hits = served.pop("hits")
        results["served"] = served
        results["float64_check"] = float64_check(task, checkpoints, (qx, qy), hits, 20)
        print(f"\nserved scores vs the same pairs in float64 (first 20 queries): {results['float64_check']}")
        print("\n### served (tracin serve, real HTTP, one client)\n")
        print("| settings | p50 ms | p95 ms | recall@10 prop. / opp. | exact scores | max rel. score error | "
              "max error / query's top score |")
        print("|---|---|---|---|---|---|---|")
        for name, s in served.items():
            err = f"{s['max_rel_score_error']:.1e}" if s["max_rel_score_error"] is not None else "-"
            top = f"{s['max_score_error_of_top']:.1e}" if s["max_score_error_of_top"] is not None else "-"
            print(f"| {name} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | {s['recall']['proponents']:.3f} / "
                  f"{s['recall']['opponents']:.3f} | {s['exact']} | {err} | {top} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
