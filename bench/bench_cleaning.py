"""Proof by retraining: does acting on a set query's answer help? (issue 20, docs/cleaning.md)

    nice -n 10 .venv/bin/python bench/bench_cleaning.py --threads 1            # the full run (hours)
    .venv/bin/python bench/bench_cleaning.py --limit 3000 --epochs 2 --validation 200 --evaluate 800 \
        --sizes 60 120 --seeds 0 1 --out /tmp/cleaning-small                         # a reduced run

1. Train the CNN of `indexer/demo/fashion_mnist.py` with its recipe (plain SGD, batch 64, lr 0.1 -> 0.01 over 3
   epochs, 5 checkpoints) on the 60,000 training images with 10% of the labels flipped (seed 0), and build its
   index (`indexer.build.pipeline.build_index`, the default projection).
2. Take the first `--validation` (1,000) test images as a validation set, with their true labels, and ask the
   service ONE set query over them (POST /influence with `examples`, `labels`, `aggregate: "sum"`, through the
   real FastAPI app in-process): the opponents of the validation set's summed loss, exactly re-ranked, are the
   training examples whose training raised the validation loss the most: the most harmful first.
3. For m in `--sizes` (600, 1,200, 3,000): drop the top m most harmful (and, separately, relabel them with the
   model's prediction at the last checkpoint); as baselines drop m random examples, the top m by
   self-influence, the top m by the label-review default ranking (`GET /label-review`'s `combined`), and
   relabel those two as well; and keep the full (noisy) set.
4. Retrain each variant with the same recipe for every seed in `--seeds` (init and batch order from the seed)
   and measure accuracy and mean cross-entropy on the `--evaluate` test images after the validation set (the
   other 9,000).

Everything resumes: the base run (run.json), the index, the ranking (ranking.npz) and every retraining
(retrain/<variant>-s<seed>.json) are cached in --out and reused when their settings match, so a killed run
continues where it stopped. The table (markdown) and every figure go to <out>/cleaning.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from indexer.demo.fashion_mnist import (  # noqa: E402
    CLASS_NAMES, DEFAULT_DATA_DIR, FashionCNN, FashionMNISTTask, data_available, fit_sgd, load_split,
    train_fashion_mnist,
)

#: the variants the issue asks for run first (every seed), then the extra relabel baselines
REQUIRED = ("influence_drop", "influence_relabel", "random_drop", "self_influence_drop", "review_drop")
#: variants (method -> what the table calls it), in table order
METHODS = {
    "influence_drop": "drop the top m harmful by set influence (this issue)",
    "influence_relabel": "relabel the top m harmful by set influence with the model's prediction",
    "random_drop": "drop m random examples",
    "self_influence_drop": "drop the top m by self-influence",
    "self_influence_relabel": "relabel the top m by self-influence",
    "review_drop": "drop the top m by the label-review default (combined)",
    "review_relabel": "relabel the top m by the label-review default (combined)",
}


def write_json(path: Path, data: dict) -> None:
    """Atomically (temp + rename): a killed run never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def base_settings(args: argparse.Namespace) -> dict:
    return {"limit": args.limit, "epochs": args.epochs, "checkpoints": args.checkpoints,
            "flip_fraction": args.flip_fraction, "seed": 0, "lr": args.lr, "final_lr": args.final_lr,
            "batch_size": args.batch_size, "data_dir": str(args.data_dir), "kind": args.kind, "dim": args.dim}


# -- 1. the noisy model and its index -------------------------------------------------------------------
def prepare(args: argparse.Namespace, out: Path) -> Path:
    """Train (or reuse) the base run and build (or reuse) its index; returns the index directory."""
    from indexer.build.pipeline import build_index
    from indexer.config import load_config

    settings = base_settings(args)
    stamp, run_dir, index_dir = out / "run.json", out / "run", out / "index"
    recorded = read_json(stamp) or {}
    config_path = run_dir / "fashion_mnist.toml"
    if recorded.get("settings") != settings or not config_path.is_file():
        t0 = time.perf_counter()
        config_path = train_fashion_mnist(run_dir, epochs=args.epochs, checkpoints=args.checkpoints, limit=args.limit,
                                          flip_fraction=args.flip_fraction, seed=0, lr=args.lr,
                                          final_lr=args.final_lr, batch_size=args.batch_size, data_dir=args.data_dir,
                                          dim=args.dim, kind=args.kind, log=lambda m: print(m, flush=True))
        recorded = {"settings": settings, "train_seconds": round(time.perf_counter() - t0, 1)}
        write_json(stamp, recorded)
    else:
        print(f"reusing the base run in {run_dir}", flush=True)
    if recorded.get("index_seconds") is None or not (index_dir / "manifest.json").is_file():
        t0 = time.perf_counter()
        result = build_index(load_config(config_path), index_dir, overwrite=True, show_progress=False)
        print(f"indexed {result.count} examples (dim {result.dim}) in {result.seconds:.0f}s", flush=True)
        recorded["index_seconds"] = round(time.perf_counter() - t0, 1)
        write_json(stamp, recorded)
    else:
        print(f"reusing the index in {index_dir}", flush=True)
    return index_dir


# -- 2. the rankings ------------------------------------------------------------------------------------
def validation_rows(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(validation test rows, evaluation test rows): the first `validation`, then the next `evaluate`."""
    return np.arange(args.validation), np.arange(args.validation, args.validation + args.evaluate)


def set_query(args: argparse.Namespace, index_dir: Path, k: int) -> tuple[list[str], dict]:
    """The ids of the top-k opponents of the validation set's summed loss (most harmful first), asked of the
    service as one set query, and the answer's summary."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    images, labels = load_split("test", args.data_dir)
    rows, _ = validation_rows(args)
    body = {"examples": [{"image": images[r].tolist()} for r in rows], "labels": [int(labels[r]) for r in rows],
            "aggregate": "sum", "k": k, "rerank": args.rerank_factor * k}
    settings = Settings(index_dir=index_dir, max_k=k, max_rerank=args.rerank_factor * k, max_set=len(rows),
                        max_body_bytes=1 << 30, access_log=False, warmup=False)
    t0 = time.perf_counter()
    with TestClient(create_app(settings)) as client:
        response = client.post("/influence", json=body)
    if response.status_code != 200:
        raise SystemExit(f"the set query failed: {response.status_code} {response.text[:500]}")
    answer = response.json()
    summary = {"seconds": round(time.perf_counter() - t0, 1), "took_ms": answer["took_ms"], "exact": answer["exact"],
               "rerank": answer["rerank"], "members": len(rows), "k": k,
               "opponent_scores": [h["score"] for h in answer["opponents"][:10]],
               "proponent_scores": [h["score"] for h in answer["proponents"][:10]]}
    return [h["id"] for h in answer["opponents"]], summary


def rankings(args: argparse.Namespace, out: Path, index_dir: Path) -> dict:
    """Per method the training rows to act on, most suspicious first (the longest m), the model's prediction
    per row (relabel targets), the flipped flags; cached in ranking.npz."""
    from indexer.build.review import DEFAULT_RANKING, ranking_scores, suspicious_first
    from indexer.store.directory import IndexDirectory

    cache = out / "ranking.npz"
    key = json.dumps({"base": base_settings(args), "validation": args.validation, "k": max(args.sizes),
                      "rerank_factor": args.rerank_factor}, sort_keys=True)
    if cache.is_file():
        data = np.load(cache, allow_pickle=False)
        if str(data["key"]) == key:
            print(f"reusing the rankings of {cache}", flush=True)
            return {name: data[name] for name in data.files if name != "key"} | {
                "summary": json.loads(str(data["summary"]))}
    index = IndexDirectory.open(index_dir, verify=False)
    row_of = {e["id"]: i for i, e in enumerate(index.examples)}
    k = max(args.sizes)
    ids, summary = set_query(args, index_dir, k)
    if len(ids) < k:
        raise SystemExit(f"the set query returned {len(ids)} opponents, fewer than m = {k}")
    influence = np.asarray([row_of[i] for i in ids], dtype=np.int64)
    scores = ranking_scores(index.label_review, index.self_influence)
    review = suspicious_first(DEFAULT_RANKING, scores[DEFAULT_RANKING])[:k]
    self_influence = suspicious_first("self_influence", scores["self_influence"])[:k]
    prediction = np.asarray(index.label_review["prediction"], dtype=np.int64).reshape(-1)
    flipped = np.asarray([bool(e["display"]["flipped"]) for e in index.examples])
    labels = np.asarray([int(e["label"]) for e in index.examples], dtype=np.int64)
    out_data = {"influence": influence, "review": review, "self_influence": self_influence,
                "prediction": prediction, "flipped": flipped, "labels": labels}
    np.savez(cache, key=np.array(key), summary=np.array(json.dumps(summary)), **out_data)
    return out_data | {"summary": summary}


def variant_rows(method: str, m: int, seed: int, ranked: dict) -> np.ndarray:
    if method == "random_drop":
        return np.random.default_rng(10_000 + 97 * m + seed).choice(ranked["labels"].size, m, replace=False)
    source = {"influence": "influence", "self": "self_influence", "review": "review"}[method.split("_")[0]]
    return ranked[source][:m]


# -- 3. retraining --------------------------------------------------------------------------------------
def retrain(args: argparse.Namespace, ranked: dict, method: str, m: int, seed: int) -> dict:
    """Train the CNN with the base recipe on the edited training set (init and batch order from `seed`) and
    measure accuracy and mean cross-entropy on the evaluation test images."""
    task = FashionMNISTTask(data_dir=args.data_dir, limit=args.limit, flip_fraction=args.flip_fraction, seed=0)
    train = task.training_set()
    inputs, labels = train.inputs, train.labels.clone()
    keep = np.ones(labels.shape[0], dtype=bool)
    rows = np.empty(0, dtype=np.int64) if method == "full" else variant_rows(method, m, seed, ranked)
    changed = 0
    if method.endswith("_relabel"):
        new = torch.from_numpy(ranked["prediction"][rows]).to(labels.dtype)
        changed = int((labels[torch.from_numpy(rows)] != new).sum())
        labels[torch.from_numpy(rows)] = new
    elif method != "full":
        keep[rows] = False
    kept = torch.from_numpy(np.flatnonzero(keep))
    torch.manual_seed(seed)
    model = FashionCNN()
    t0 = time.perf_counter()
    fit_sgd(model, task.loss, inputs[kept], labels[kept], epochs=args.epochs, lr=args.lr, final_lr=args.final_lr,
            batch_size=args.batch_size, seed=seed)
    seconds = time.perf_counter() - t0
    images, test_labels = load_split("test", args.data_dir)
    _, evaluate = validation_rows(args)
    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for s in range(0, evaluate.size, 1000):
            part = evaluate[s:s + 1000]
            x = torch.from_numpy(np.array(images[part])).unsqueeze(1)
            y = torch.from_numpy(test_labels[part].astype(np.int64))
            logits = model(x).double()
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    flipped = ranked["flipped"][rows] if rows.size else np.zeros(0, dtype=bool)
    return {"method": method, "m": m, "seed": seed, "accuracy": correct / evaluate.size,
            "loss": loss_sum / evaluate.size, "train_examples": int(kept.numel()), "relabelled": changed,
            "flipped_among_acted_on": int(flipped.sum()), "train_seconds": round(seconds, 1)}


def jobs(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(method, m, seed) in the order they run: the full set and the required variants for every seed (seed by
    seed), then the extra relabel baselines."""
    out = []
    for group in ([m for m in args.methods if m in REQUIRED], [m for m in args.methods if m not in REQUIRED]):
        for seed in args.seeds:
            if group and group[0] in REQUIRED:
                out.append(("full", 0, seed))
            for m in args.sizes:
                out += [(method, m, seed) for method in group]
    return out


def job_path(out: Path, method: str, m: int, seed: int) -> Path:
    return out / "retrain" / (f"full-s{seed}.json" if method == "full" else f"{method}-m{m}-s{seed}.json")


def retrain_settings(args: argparse.Namespace) -> dict:
    return {"base": base_settings(args), "validation": args.validation, "evaluate": args.evaluate,
            "rerank_factor": args.rerank_factor}


# -- 4. the table ---------------------------------------------------------------------------------------
def summarise(results: list[dict], sizes: list[int], methods: list[str]) -> dict:
    """Mean, sample standard deviation, min and max of accuracy and loss over seeds per (method, m)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["m"]), []).append(r)
    full = {r["seed"]: r for r in groups.get(("full", 0), [])}
    rows = []
    for method, m in [("full", 0)] + [(meth, m) for m in sizes for meth in methods]:
        got = groups.get((method, m), [])
        if not got:
            continue
        acc = np.array([r["accuracy"] for r in got])
        loss = np.array([r["loss"] for r in got])
        rows.append({"method": method, "m": m, "seeds": sorted(r["seed"] for r in got),
                     "accuracy_mean": float(acc.mean()),
                     "accuracy_sd": float(acc.std(ddof=1)) if acc.size > 1 else None,
                     "accuracy_min": float(acc.min()), "accuracy_max": float(acc.max()),
                     "loss_mean": float(loss.mean()), "loss_sd": float(loss.std(ddof=1)) if loss.size > 1 else None,
                     "flipped_among_acted_on": got[0]["flipped_among_acted_on"],
                     "relabelled": got[0]["relabelled"]})
        paired = [(r["accuracy"] - full[r["seed"]]["accuracy"], r["loss"] - full[r["seed"]]["loss"])
                  for r in got if r["seed"] in full]
        if method != "full" and paired:  # against the full set retrained with the same seed (init, batch order)
            d_acc, d_loss = np.array([p[0] for p in paired]), np.array([p[1] for p in paired])
            rows[-1].update(paired_seeds=len(paired), d_accuracy_mean=float(d_acc.mean()),
                            d_accuracy_sd=float(d_acc.std(ddof=1)) if d_acc.size > 1 else None,
                            d_loss_mean=float(d_loss.mean()),
                            d_loss_sd=float(d_loss.std(ddof=1)) if d_loss.size > 1 else None)
    return {"rows": rows}


def markdown(summary: dict) -> str:
    def pm(mean, sd, scale=1.0, digits=2):
        return f"{mean * scale:.{digits}f}" + ("" if sd is None else f" ± {sd * scale:.{digits}f}")

    lines = ["| variant | m | seeds | accuracy % (mean ± s.d.) | test loss (mean ± s.d.) | Δ accuracy, points "
             "(paired) | Δ loss (paired) | flipped among the m |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        name = "full noisy training set" if r["method"] == "full" else METHODS[r["method"]]
        paired = "d_accuracy_mean" in r
        lines.append(f"| {name} | {r['m'] or '-'} | {len(r['seeds'])} | "
                     f"{pm(r['accuracy_mean'], r['accuracy_sd'], 100)} | {pm(r['loss_mean'], r['loss_sd'], 1, 4)} | "
                     f"{pm(r['d_accuracy_mean'], r['d_accuracy_sd'], 100) if paired else '-'} | "
                     f"{pm(r['d_loss_mean'], r['d_loss_sd'], 1, 4) if paired else '-'} | "
                     f"{r['flipped_among_acted_on'] if r['method'] != 'full' else '-'} |")
    return "\n".join(lines)


def verdict(summary: dict, sizes: list[int]) -> list[str]:
    """Per m: the best variant by mean accuracy, its gain over the full set and over the runner-up."""
    full = next((r for r in summary["rows"] if r["method"] == "full"), None)
    out = []
    for m in sizes:
        rows = sorted((r for r in summary["rows"] if r["m"] == m), key=lambda r: -r["accuracy_mean"])
        if not rows:
            continue
        best = rows[0]
        line = f"m = {m}: best {best['method']} {best['accuracy_mean'] * 100:.2f}%"
        if full is not None:
            line += f" ({(best['accuracy_mean'] - full['accuracy_mean']) * 100:+.2f} points vs the full set)"
        if len(rows) > 1:
            line += (f", runner-up {rows[1]['method']} {rows[1]['accuracy_mean'] * 100:.2f}% "
                     f"({(best['accuracy_mean'] - rows[1]['accuracy_mean']) * 100:+.2f} points)")
        best_loss = min((r for r in summary["rows"] if r["m"] == m), key=lambda r: r["loss_mean"])
        line += f"; lowest loss {best_loss['method']} {best_loss['loss_mean']:.4f}"
        out.append(line)
    return out


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    index_dir = prepare(args, out)
    if args.prepare_only:
        return {}
    ranked = rankings(args, out, index_dir)
    print(f"set query: {ranked['summary']}", flush=True)
    for name in ("influence", "self_influence", "review"):
        for m in args.sizes:
            print(f"{name}: {int(ranked['flipped'][ranked[name][:m]].sum())} flipped among the top {m}", flush=True)
    settings = retrain_settings(args)
    results = []
    todo = jobs(args)
    for i, (method, m, seed) in enumerate(todo, 1):
        path = job_path(out, method, m, seed)
        cached = read_json(path)
        if cached is not None and cached.get("settings") == settings:
            results.append(cached["result"])
            continue
        if args.report_only or (args.max_jobs is not None and args.max_jobs <= 0):
            continue
        t0 = time.perf_counter()
        result = retrain(args, ranked, method, m, seed)
        write_json(path, {"settings": settings, "result": result})
        results.append(result)
        if args.max_jobs is not None:
            args.max_jobs -= 1
        print(f"[{i}/{len(todo)}] {method} m={m} seed={seed}: accuracy {result['accuracy']:.4f}, loss "
              f"{result['loss']:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    summary = summarise(results, args.sizes, args.methods)
    table = markdown(summary)
    lines = verdict(summary, args.sizes)
    done = sum(1 for _ in results)
    print(f"\n{done}/{len(todo)} retrainings done\n\n{table}\n")
    print("\n".join(lines))
    base = read_json(out / "run.json") or {}
    command = "bench/bench_cleaning.py " + " ".join(a for a in args.argv if a != "--report-only")
    figures = {"command": command.strip(), "done": done, "jobs": len(todo),
               "settings": settings, "sizes": args.sizes, "seeds": args.seeds, "set_query": ranked["summary"],
               "flipped_in_top": {name: {str(m): int(ranked["flipped"][ranked[name][:m]].sum()) for m in args.sizes}
                                  for name in ("influence", "self_influence", "review")},
               "base_seconds": {k: base.get(k) for k in ("train_seconds", "index_seconds")},
               "machine": f"{platform.machine()}, torch threads {torch.get_num_threads()}",
               "summary": summary, "markdown": table, "verdict": lines, "results": results}
    write_json(out / "cleaning.json", figures)
    print(f"figures written to {out / 'cleaning.json'}")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / ".tracin" / "cleaning"), help="work directory (resumable)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N training images (reduced run)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--flip-fraction", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--final-lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--kind", default=None, help="projection kind (default: the library's)")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--validation", type=int, default=1000, help="validation set: the first N test images")
    parser.add_argument("--evaluate", type=int, default=9000, help="evaluated on the next N test images")
    parser.add_argument("--sizes", type=int, nargs="+", default=[600, 1200, 3000], help="m: examples acted on")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="retraining seeds")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rerank-factor", type=int, default=2,
                        help="the set query re-ranks factor * m candidates per end exactly")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--prepare-only", action="store_true", help="only train the base run and build its index")
    parser.add_argument("--max-jobs", type=int, default=None, help="retrain at most N variants this time")
    parser.add_argument("--report-only", action="store_true",
                        help="retrain nothing: the table of the retrainings cached so far (the run may go on)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not data_available(args.data_dir):
        print(f"error: Fashion-MNIST files not found in {args.data_dir} (apt-get install dataset-fashion-mnist)",
              file=sys.stderr)
        return 2
    if args.validation + args.evaluate > 10_000 or min(args.sizes) < 1:
        print("error: --validation + --evaluate must be <= 10000 test images and every m >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args)
    return 0


assert len(CLASS_NAMES) == 10
if __name__ == "__main__":
    sys.exit(main())
