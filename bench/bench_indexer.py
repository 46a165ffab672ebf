"""Benchmark the indexer on Fashion-MNIST (60k training images, small CNN, 5 checkpoints).

    .venv/bin/python bench/bench_indexer.py                  # the full benchmark (tens of minutes)
    .venv/bin/python bench/bench_indexer.py --quick          # a reduced run (a few minutes)

Needs the Debian package `dataset-fashion-mnist`. In one run, side by side, with the same examples,
checkpoints, batch size and torch thread count:

  (a) plain   a batched forward + `loss.sum().backward()` over the training set at every checkpoint
              (run before and after the build; their mean is the reference), plus interleaved repeats
              of plain vs our embedding loop on a subset (median ratio);
  (b) ours    `build_index` with the default projection, all layers, into --index-out (a subprocess,
              which also samples its peak memory);
  (c) Captum  `TracInCP(sample_wise_grads_per_batch=True)` answering ONE query: top-10 proponents of
              one test example over the same training set and checkpoints;
  (d) peak memory of indexing at two training-set sizes, and the index size on disk.

Fidelity of the compact default against exact TracIn (recall@10 by dim and K') is measured by
bench/bench_retrieval.py. Prints markdown tables and writes every figure to --json. The model is trained once (plain SGD,
decaying lr, 5 checkpoints) into --run-dir and reused on later runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.checkpoints import load_checkpoint, load_state_into  # noqa: E402
from indexer.config import IndexConfig, TaskRef, load_config  # noqa: E402
from indexer.sketch.embedding import Checkpoint, CheckpointEmbedder, plan_embedding, resolve_checkpoints  # noqa: E402

DEFAULT_RUN = REPO / ".tracin/bench/fmnist-run"
DEFAULT_INDEX = REPO / ".tracin/bench/fmnist-index"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_pressure() -> str:
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return line.replace("some ", "")
    except OSError:
        return "n/a"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- memory sampling ---------------------------------------------------------------------------------
class MemorySampler:
    """Peak VmRSS / RssAnon / RssFile of this process, sampled from /proc/self/status."""

    KEYS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self.phase_peak = interval, {}, {}
        self.phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> dict[str, int]:
        text = Path("/proc/self/status").read_text()
        out = {}
        for key in MemorySampler.KEYS:
            match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
            out[key] = int(match.group(1)) * 1024 if match else -1
        return out

    def sample(self) -> None:
        now = self.read()
        for key, value in now.items():
            self.peak[key] = max(self.peak.get(key, 0), value)
            phase = self.phase_peak.setdefault(self.phase, {})
            phase[key] = max(phase.get(key, 0), value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


# -- setup -------------------------------------------------------------------------------------------
def ensure_run(run_dir: Path, epochs: int, limit: int | None, seed: int, threads: int) -> dict:
    """Train once (or reuse): checkpoints + config under run_dir, with a record of how."""
    from indexer.demo.fashion_mnist import FashionMNISTTask, evaluate_accuracy, train_fashion_mnist

    info_file = run_dir / "train_info.json"
    wanted = {"epochs": epochs, "limit": limit, "seed": seed}
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        if all(info.get(k) == v for k, v in wanted.items()) and (run_dir / "fashion_mnist.toml").is_file():
            log(f"reusing the trained run in {run_dir}")
            return info
    log(f"training the CNN ({epochs} epochs, limit={limit}) into {run_dir}")
    t0 = time.perf_counter()
    config = train_fashion_mnist(run_dir, epochs=epochs, checkpoints=5, limit=limit, seed=seed, log=log)
    seconds = time.perf_counter() - t0
    task = FashionMNISTTask(limit=limit, seed=seed)
    model = task.build_model()
    accuracies = []
    for spec in load_config(config).checkpoints:
        state, meta = load_checkpoint(spec.path)
        model.load_state_dict(state)
        accuracies.append({"file": spec.path.name, "lr": meta["lr"], "test_accuracy": evaluate_accuracy(model)})
    info = {**wanted, "threads": threads, "train_seconds": round(seconds, 1), "checkpoints": accuracies,
            "config": str(config)}
    info_file.write_text(json.dumps(info, indent=2))
    return info


def config_with_limit(config: IndexConfig, limit: int | None) -> IndexConfig:
    args = dict(config.task.args)
    if limit is not None:
        args["limit"] = limit
    return replace(config, task=TaskRef(config.task.ref, args))


def _model_at(task, ckpt: Checkpoint):
    model = task.build_model()
    state, _ = load_checkpoint(ckpt.path)
    load_state_into(model, state, str(ckpt.path))
    return model.eval()


# -- (a) plain forward + backward, and our embedding loop in-process ------------------------------------
def plain_pass(task, ckpts, examples, count: int, batch_size: int) -> dict:
    """Batched forward + loss.sum().backward() (weight gradients) over `count` examples x checkpoints."""
    wall, cpu = time.perf_counter(), time.process_time()
    for ckpt in ckpts:
        model = _model_at(task, ckpt)
        for start in range(0, count, batch_size):
            x, y = examples.batch(start, min(start + batch_size, count))
            model.zero_grad(set_to_none=True)
            task.loss(task.forward(model, x), y).sum().backward()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def embed_pass(task, ckpts, plan, examples, count: int, batch_size: int) -> dict:
    """Our per-checkpoint embedding loop (what build_index runs), adding into a preallocated array."""
    out = np.zeros((count, plan.total_dim), dtype=np.float32)
    wall, cpu = time.perf_counter(), time.process_time()
    for c, ckpt in enumerate(ckpts):
        embedder = CheckpointEmbedder(task, ckpt, c, plan)
        for b, start in enumerate(range(0, count, batch_size)):
            stop = min(start + batch_size, count)
            x, y = examples.batch(start, stop)
            out[start:stop] += embedder.embed(x, y, check=(b % 64 == 0)).vectors.numpy()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


# -- (b) build_index in a subprocess, with its peak memory ---------------------------------------------
def build_child(config_path: str, limit: int | None, out: str, threads: int) -> dict:
    from indexer.build.pipeline import build_index

    torch.set_num_threads(threads)
    config = config_with_limit(load_config(config_path), limit)
    with MemorySampler() as mem:
        mem.phase = "imports"
        base = MemorySampler.read()
        state = {"total": None}

        def progress(done: int, total: int) -> None:
            mem.phase = "embedding" if done < total else "finalize (FAISS, examples table)"

        t0, c0 = time.perf_counter(), time.process_time()
        result = build_index(config, out, overwrite=True, progress=progress)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        del state
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out_dir = Path(out)
    sizes = {p.name: p.stat().st_size for p in out_dir.rglob("*") if p.is_file()}
    return {
        "count": result.count, "dim": result.dim, "seconds": seconds, "cpu_seconds": cpu,
        "embed_seconds": result.embed_seconds, "base_rss": base["VmRSS"], "peak": mem.peak,
        "phase_peak": mem.phase_peak, "ru_maxrss": usage.ru_maxrss * 1024, "sizes": sizes,
        "dir_bytes": sum(sizes.values()),
    }


def run_build(config_path: Path, limit: int | None, out: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "_build", str(config_path), str(limit or 0), str(out),
           str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"build subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- (c) Captum ----------------------------------------------------------------------------------------
class _Batches(torch.utils.data.Dataset):
    """Pre-cut float batches (Captum requires float inputs it can mark requires_grad)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        self.parts = [(x[s:s + batch_size], y[s:s + batch_size]) for s in range(0, len(y), batch_size)]

    def __len__(self):
        return len(self.parts)

    def __getitem__(self, i):
        return self.parts[i]


def captum_one_query(task, ckpts, examples, count: int, batch_size: int, qx: torch.Tensor, qy: torch.Tensor,
                     k: int = 10) -> dict:
    from captum.influence import TracInCP

    x = examples.inputs[:count].float() / 255.0
    loader = torch.utils.data.DataLoader(_Batches(x, examples.labels[:count], batch_size), batch_size=None)
    states = {str(c.path): (load_checkpoint(c.path)[0], c.lr) for c in ckpts}  # cached: no disk reads timed

    def load(model, path):
        state, lr = states[path]
        model.load_state_dict(state)
        return lr

    model = task.build_model().eval()
    wall, cpu = time.perf_counter(), time.process_time()
    tracin = TracInCP(model, loader, list(states), checkpoints_load_func=load,
                      loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), sample_wise_grads_per_batch=True)
    result = tracin.influence((qx.float() / 255.0 if qx.dtype == torch.uint8 else qx, qy), k=k, proponents=True)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
            "indices": result.indices[0].tolist(), "scores": result.influence_scores[0].tolist()}


# -- exact scores of one query (checks Captum's answer) ------------------------------------------------
def exact_one_query(task, ckpts, examples, count: int, qx, qy) -> np.ndarray:
    """Exact TracIn of one query against the first `count` training examples (indexer.score.exact)."""
    from indexer.sketch.embedding import Embedder
    from indexer.score.exact import ExactScorer

    plan = plan_embedding(task, ckpts, None, "exact", 1, 0, examples.batch(0, 3))
    embedder = Embedder(task, ckpts, plan)
    grads = [p.grads for p in embedder.embed(qx, qy, keep_grads=True).per_checkpoint]
    return ExactScorer.for_examples(embedder, examples).scores(grads, np.arange(count)).total


# -- reporting -------------------------------------------------------------------------------------------
def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def report(r: dict) -> str:
    lines = []
    add = lines.append
    m = r["machine"]
    add(f"Machine: {m['cpus']} CPUs ({m['cpu']}), torch {m['torch']} with {m['threads']} thread(s); "
        f"load average at start {m['load_start']}, at end {m.get('load_end', '?')}; "
        f"CPU pressure at end {m.get('pressure_end', '?')}.")
    t = r["train"]
    acc = ", ".join(f"{c['test_accuracy']:.3f}" for c in t["checkpoints"])
    add(f"Model: FashionCNN (2 Conv2d + 2 Linear, {r['params']:,} parameters), {t['epochs']} epochs plain SGD, "
        f"5 checkpoints (test accuracy {acc}). Training set: {r['count']:,} images; batch size {r['batch_size']}.")
    add("")
    add("| timing (same examples, checkpoints, batch size, threads) | wall s | CPU s | ratio (wall) | target |")
    add("|---|---:|---:|---:|---|")
    p = r["plain"]
    add(f"| plain forward + loss.backward(), run 1 / run 2 | {p[0]['wall']:.1f} / {p[1]['wall']:.1f} | "
        f"{p[0]['cpu']:.1f} / {p[1]['cpu']:.1f} | 1 (mean {r['plain_mean']:.1f} s) | |")
    b = r["build"]
    add(f"| ours: embedding loop of build_index | {b['embed_seconds']:.1f} | | "
        f"**{b['embed_seconds'] / r['plain_mean']:.2f}** | <= 1.2 |")
    add(f"| ours: build_index end to end (+ FAISS, examples table, copies) | {b['seconds']:.1f} | "
        f"{b['cpu_seconds']:.1f} | **{b['seconds'] / r['plain_mean']:.2f}** | |")
    if r.get("interleaved"):
        i = r["interleaved"]
        add(f"| interleaved repeats on {i['count']:,} examples: median ratio ours / plain ({i['repeats']} pairs) | "
            f"| | **{i['median_ratio']:.2f}** (wall), {i['median_ratio_cpu']:.2f} (CPU); all {i['ratios_str']} | |")
    if r.get("captum"):
        c = r["captum"]
        add(f"| Captum TracInCP(sample_wise_grads_per_batch=True), ONE query, top-10 proponents | "
            f"{c['wall']:.1f} | {c['cpu']:.1f} | build / Captum = **{b['seconds'] / c['wall']:.2f}** | <= 1 |")
        add(f"| (Captum's top-10 vs our exact top-10 for the same query: {c['overlap_with_exact']}/10 shared; "
            f"max relative score difference {c['score_rel_diff']:.1e}) | | | | |")
    add("")
    if r.get("memory"):
        add("| indexing memory (build_index subprocess) | examples | peak RSS | peak anon | peak file-backed | "
            "RSS after imports | index.faiss | index directory |")
        add("|---|---:|---:|---:|---:|---:|---:|---:|")
        for row in r["memory"]:
            emb = row["phase_peak"].get("embedding", {})
            add(f"| whole build | {row['count']:,} | {mb(row['peak']['VmHWM'])} | {mb(row['peak']['RssAnon'])} | "
                f"{mb(row['peak']['RssFile'])} | {mb(row['base_rss'])} | {mb(row['sizes'].get('index.faiss', 0))} | "
                f"{mb(row['dir_bytes'])} |")
            if emb:
                add(f"| embedding loop only | {row['count']:,} | {mb(emb['VmRSS'])} | {mb(emb['RssAnon'])} | "
                    f"{mb(emb['RssFile'])} | | | |")
        add("")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced run: 4096 examples, fewer queries and dims")
    ap.add_argument("--run-dir", type=Path, default=None, help=f"trained checkpoints + config (default {DEFAULT_RUN})")
    ap.add_argument("--index-out", type=Path, default=None, help=f"the benchmark index (default {DEFAULT_INDEX})")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="training examples (default all 60k)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every measured part (default 1: on a shared 2-core VM two OpenMP threads "
                         "stall at barriers whenever another job holds a core)")
    ap.add_argument("--memory-limit", type=int, default=10000, help="the smaller training set for the memory test")
    ap.add_argument("--interleaved", type=int, default=5120, help="examples for interleaved plain/ours repeats")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-captum", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from indexer.demo.fashion_mnist import data_available

    if not data_available():
        print("Fashion-MNIST not found: apt-get install dataset-fashion-mnist", file=sys.stderr)
        return 2
    if args.quick:
        args.limit = args.limit or 4096
        args.memory_limit = min(args.memory_limit, 1024)
        args.interleaved = min(args.interleaved, 1024)
        args.repeats = min(args.repeats, 2)
        args.epochs = 1
    suffix = "-quick" if args.quick else ""
    run_dir = args.run_dir or DEFAULT_RUN.with_name(DEFAULT_RUN.name + suffix)
    index_out = args.index_out or DEFAULT_INDEX.with_name(DEFAULT_INDEX.name + suffix)
    json_out = args.json or REPO / f".tracin/bench/bench_indexer{suffix}.json"
    torch.set_num_threads(args.threads)
    from indexer.capture.routes import tune_allocator

    tuned = tune_allocator()  # what GradientCapture does: plain and ours run under the same allocator settings
    r: dict = {"args": {k: str(v) for k, v in vars(args).items()},
               "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                           "torch": torch.__version__, "threads": args.threads, "load_start": load_average(), "malloc_tuned": tuned,
                           "pressure_start": cpu_pressure()}}
    r["train"] = ensure_run(run_dir, args.epochs, args.limit if args.quick else None, 0, args.threads)
    config_path = Path(r["train"]["config"])
    config = config_with_limit(load_config(config_path), args.limit)
    task = config.task.build()
    examples = task.training_set()
    count = len(examples)
    ckpts = resolve_checkpoints([(c.path, c.lr) for c in config.checkpoints])
    bs = args.batch_size
    r.update(count=count, batch_size=bs, params=sum(p.numel() for p in task.build_model().parameters()),
             projection={"kind": config.projection.kind, "dim": config.projection.dim})
    held = task.held_out_set()
    qx, qy = held.batch(0, 1)

    # (a) + (b): plain, build, plain
    log(f"plain forward+backward over {count} x {len(ckpts)} checkpoints")
    r["plain"] = [plain_pass(task, ckpts, examples, count, bs)]
    log(f"plain: {r['plain'][0]['wall']:.1f}s; build_index (default projection) -> {index_out}")
    limit_arg = args.limit if args.limit else None
    r["build"] = run_build(config_path, limit_arg, index_out, args.threads)
    log(f"build: {r['build']['seconds']:.1f}s (embedding {r['build']['embed_seconds']:.1f}s); plain again")
    r["plain"].append(plain_pass(task, ckpts, examples, count, bs))
    r["plain_mean"] = (r["plain"][0]["wall"] + r["plain"][1]["wall"]) / 2

    # interleaved repeats on a subset
    n_sub = min(args.interleaved, count)
    plan = plan_embedding(task, ckpts, config.layers, config.projection.kind, config.projection.dim,
                          config.projection.seed, examples.batch(0, 3))
    pairs = []
    for rep in range(args.repeats):
        p = plain_pass(task, ckpts, examples, n_sub, bs)
        o = embed_pass(task, ckpts, plan, examples, n_sub, bs)
        pairs.append({"plain": p, "ours": o})
        log(f"interleaved {rep + 1}/{args.repeats}: plain {p['wall']:.1f}s ours {o['wall']:.1f}s")
    ratios = [x["ours"]["wall"] / x["plain"]["wall"] for x in pairs]
    ratios_cpu = [x["ours"]["cpu"] / x["plain"]["cpu"] for x in pairs]
    r["interleaved"] = {"count": n_sub, "repeats": args.repeats, "pairs": pairs,
                        "median_ratio": float(np.median(ratios)), "median_ratio_cpu": float(np.median(ratios_cpu)),
                        "ratios_str": ", ".join(f"{x:.2f}" for x in ratios)}

    # (e) memory at the smaller size (the full size is the build above)
    r["memory"] = []
    if args.memory_limit and args.memory_limit < count:
        log(f"build at {args.memory_limit} examples for the memory comparison")
        small = run_build(config_path, args.memory_limit, index_out.with_name(index_out.name + "-small"),
                          args.threads)
        r["memory"].append(small)
    r["memory"].append(r["build"])

    # (c) Captum, one query
    if not args.skip_captum:
        log("Captum TracInCP: one query, top-10 proponents")
        c = captum_one_query(task, ckpts, examples, count, bs, qx[:1], qy[:1])
        log("our exact scores of the same query (indexer.score.exact) to check Captum's answer")
        exact = exact_one_query(task, ckpts, examples, count, qx[:1], qy[:1])
        truth = np.argsort(-exact)[:10]
        c["overlap_with_exact"] = len(set(truth.tolist()) & set(c["indices"]))
        ours = exact[np.asarray(c["indices"])]
        c["score_rel_diff"] = float(np.abs(ours - np.asarray(c["scores"])).max() / np.abs(ours).max())
        r["captum"] = c
        log(f"Captum: {c['wall']:.1f}s")

    r["machine"].update(load_end=load_average(), pressure_end=cpu_pressure())
    text = report(r)
    print(text)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(r, indent=2, default=str))
    log(f"figures written to {json_out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_build":
        _, _, cfg, lim, out, threads = sys.argv
        print(json.dumps(build_child(cfg, int(lim) or None, out, int(threads))))
        sys.exit(0)
    sys.exit(main())
