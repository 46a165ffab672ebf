"""What normalisation does to the answers (issue 11): raw TracIn vs cosine vs training-norm (RelatIF-style).

    .venv/bin/python bench/bench_normalize.py --dataset digits        # the digits demo (10% flipped labels)
    .venv/bin/python bench/bench_normalize.py --dataset fmnist        # Fashion-MNIST 60k with 10% flipped labels

For --queries held-out examples (the service's defaults: loss on the predicted label, exact re-ranking),
and each of normalize = none / cosine / train, over the k proponents and k opponents of every query:
distinct training ids; the share of hits whose training label was flipped; the share whose label
equals the query's predicted label; the share among the top 1% by self-influence. Also the mislabel
detection curve of self-influence (the share of flipped labels found in the top 5/10/20% of the index's
self-influence ranking), which normalisation does not touch. Runs the service engine in-process
(`service.loading.load_engine`: the same code as `tracin serve`)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_index(dataset: str, work: Path) -> Path:
    from indexer.config import load_config
    from indexer.build.pipeline import build_index

    index = work / "index"
    if (index / "manifest.json").is_file():
        log(f"reusing {index}")
        return index
    if dataset == "digits":
        from indexer.demo.digits import train_digits

        config = train_digits(work / "run")
    else:
        from indexer.demo.fashion_mnist import train_fashion_mnist

        config = train_fashion_mnist(work / "run", epochs=3, checkpoints=5, flip_fraction=0.1, log=log)
    log(f"indexing {config}")
    build_index(load_config(config), index, overwrite=True)
    return index


def measure(index: Path, queries: int, k: int, rerank: int) -> dict:
    import torch

    from service.loading import load_engine
    from service.settings import Settings

    torch.set_num_threads(2)
    engine = load_engine(Settings(index_dir=index, warmup=False))
    examples = [q["example"] for q in engine.queries[:queries]]
    flipped = np.asarray([bool((e.get("display") or {}).get("flipped")) for e in engine.examples])
    top1 = max(1, int(np.ceil(0.01 * engine.count)))
    out = {}
    for normalize in ("none", "cosine", "train"):
        stats = {side: {"ids": set(), "hits": 0, "flipped": 0, "same_label": 0, "top1": 0}
                 for side in ("proponents", "opponents")}
        t0 = time.perf_counter()
        for example in examples:
            req = SimpleNamespace(example=engine.task.example_schema.model_validate(example), train_id=None,
                                  label=None, filter_label=None, k=k, exclude_self=False, include_embedding=False,
                                  rerank=rerank, metric=None, normalize=normalize)
            body = engine.influence(req)
            predicted = body["prediction"]["label"]
            for side in ("proponents", "opponents"):
                s = stats[side]
                for hit in body[side]:
                    row = engine.id_to_row[hit["id"]]
                    s["ids"].add(hit["id"])
                    s["hits"] += 1
                    s["flipped"] += int(flipped[row])
                    s["same_label"] += int(hit["label"] == predicted)
                    s["top1"] += int(hit["self_influence_rank"] <= top1)
        out[normalize] = {side: {"distinct_ids": len(s["ids"]), "hits": s["hits"],
                                 "flipped_share": s["flipped"] / max(1, s["hits"]),
                                 "same_label_share": s["same_label"] / max(1, s["hits"]),
                                 "top1pct_share": s["top1"] / max(1, s["hits"])}
                          for side, s in stats.items()}
        log(f"normalize={normalize}: {time.perf_counter() - t0:.1f}s")
    order = np.argsort(-np.asarray(engine.index_dir.self_influence), kind="stable")
    curve = {f"{int(100 * f)}%": float(flipped[order[:int(round(f * engine.count))]].sum() / max(1, flipped.sum()))
             for f in (0.05, 0.10, 0.20)}
    return {"count": engine.count, "queries": len(examples), "k": k, "rerank": rerank,
            "flipped_fraction": float(flipped.mean()), "results": out, "self_influence_curve": curve}


def table(result: dict) -> str:
    lines = ["| normalize | side | distinct ids (of hits) | flipped labels | label = query's prediction | "
             "in top 1% by self-influence |", "|---|---|---|---|---|---|"]
    for normalize, sides in result["results"].items():
        for side, s in sides.items():
            lines.append(f"| {normalize} | {side} | {s['distinct_ids']} (of {s['hits']}) | {s['flipped_share']:.3f} | "
                         f"{s['same_label_share']:.3f} | {s['top1pct_share']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["digits", "fmnist"], default="digits")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rerank", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or REPO / ".tracin/bench" / f"normalize-{args.dataset}"
    index = ensure_index(args.dataset, work)
    result = measure(index, args.queries, args.k, args.rerank)
    print(f"\n{args.dataset}: {result['count']} training examples ({100 * result['flipped_fraction']:.0f}% flipped), "
          f"{result['queries']} held-out queries x k={args.k} per side, K'={args.rerank}\n")
    print(table(result))
    print(f"\nself-influence finds {result['self_influence_curve']} of the flipped labels in the top 5/10/20% "
          "(the same index and numbers for every normalisation)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
