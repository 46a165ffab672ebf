"""Mislabel detection with self-influence on Fashion-MNIST (the TracIn paper's experiment).

    .venv/bin/python bench/bench_mislabel.py                      # 60k images, 10% flipped, 3 epochs, 5 ckpts
    .venv/bin/python bench/bench_mislabel.py --limit 2000 --epochs 2 --out /tmp/mislabel --plot /tmp/m.png

Trains the small CNN of `indexer/demo/fashion_mnist.py` with plain SGD and a decaying lr on the
training images with `--flip-fraction` of the labels replaced by another class (seeded), saves 5
checkpoints with their lr (`indexer.checkpoints.save_checkpoint`), builds the index directory with
`indexer.build.pipeline.build_index` (default projection: self-influence is computed exactly whatever the
projection), then ranks the training examples, most suspicious first, by
  * self-influence: TracInCP(z, z) = sum_i lr_i ||grad loss(w_i, z)||^2 over the 5 checkpoints (the index's
    `self_influence`, what `GET /self-influence/top` serves);
  * self-influence at the last checkpoint only (TracIn with one checkpoint; exact, computed here with the
    index's own embedder);
  * the loss at the last checkpoint (a strong, cheap baseline);
  * random order: the expected fraction found equals the fraction checked;
and reports the fraction of the flipped examples found in the top 5/10/20/30% of each ranking
(a markdown table), a plot of the fraction found against the fraction checked (`--plot`), and a JSON
file of every figure (`--json`, default <out>/mislabel.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from indexer.config import load_config  # noqa: E402
from indexer.demo.fashion_mnist import (  # noqa: E402
    DEFAULT_DATA_DIR, FashionMNISTTask, data_available, evaluate_accuracy, fit_sgd, train_fashion_mnist,
)
from indexer.sketch.embedding import load_embedder  # noqa: E402
from indexer.build.pipeline import build_index  # noqa: E402
from indexer.build.review import DEFAULT_RANKING, ranking_scores, suspicion  # noqa: E402
from indexer.store.directory import IndexDirectory  # noqa: E402

CHECKED = (0.05, 0.10, 0.20, 0.30)
RANKINGS_SHOWN = {  # key -> label in the table and the plot, in table order
    "combined": "combined: mean-loss & AUM percentile ranks (the default of GET /label-review)",
    "self_influence": "self-influence (TracInCP, all checkpoints)",
    "loss": "loss at the last checkpoint",
    "margin": "margin at the last checkpoint",
    "aum": "AUM: margin averaged over the checkpoints",
    "self_influence_last": "self-influence, last checkpoint only",
    "cleanlab_cl": "cleanlab: confident learning, flagged first (3-fold CV)",
    "cleanlab_quality": "cleanlab: label quality score (3-fold CV)",
    "random": "random (expected)",
}


def found_curve(scores: np.ndarray, flipped: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Fraction of the flipped examples among the top `round(f * N)` examples by score, for each f."""
    order = np.argsort(-scores, kind="stable")
    hits = np.concatenate([[0], np.cumsum(flipped[order])])
    counts = np.rint(fractions * len(scores)).astype(int)
    return hits[counts] / max(1, int(flipped.sum()))


def last_checkpoint_scores(index_dir: Path, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(exact self-influence at the last checkpoint, loss at the last checkpoint) per training example,
    with the training labels the model saw, computed with the index's own embedder."""
    index = IndexDirectory.open(index_dir, verify=False)
    task, embedder = load_embedder(index)
    last = embedder.per_checkpoint[-1]
    train = task.training_set()
    self_inf, losses = [], []
    for start in range(0, len(train), batch_size):
        inputs, labels = train.batch(start, min(start + batch_size, len(train)))
        part = last.embed(inputs, labels)
        self_inf.append(part.self_influence.detach().double().cpu().numpy())
        losses.append(part.losses.detach().double().cpu().numpy())
    return np.concatenate(self_inf), np.concatenate(losses)


def run_settings(args: argparse.Namespace) -> dict:
    """What decides the trained checkpoints (and the cross-validated probabilities): reused when equal."""
    settings = {"limit": args.limit, "epochs": args.epochs, "checkpoints": args.checkpoints,
                "flip_fraction": args.flip_fraction, "seed": args.seed, "lr": args.lr, "final_lr": args.final_lr,
                "batch_size": args.batch_size, "data_dir": str(args.data_dir), "kind": args.kind, "dim": args.dim}
    if args.checkpoint_schedule != "even":
        settings["checkpoint_schedule"] = args.checkpoint_schedule
    return settings


def train_or_reuse(args: argparse.Namespace, run_dir: Path) -> tuple[Path, float, bool]:
    """(config path, training seconds, reused): with --reuse, the checkpoints of an earlier run of the same
    settings in `run_dir` (its run.json) are used instead of training again."""
    stamp = run_dir / "run.json"
    settings = run_settings(args)
    config = run_dir / "fashion_mnist.toml"
    if args.reuse and stamp.is_file() and config.is_file():
        recorded = json.loads(stamp.read_text())
        if recorded.get("settings") == settings:
            print(f"reusing the checkpoints trained earlier in {run_dir} ({recorded['seconds']:.1f}s then)", flush=True)
            return config, float(recorded["seconds"]), True
    t0 = time.perf_counter()
    config = train_fashion_mnist(run_dir, epochs=args.epochs, checkpoints=args.checkpoints, limit=args.limit,
                                 flip_fraction=args.flip_fraction, seed=args.seed, lr=args.lr,
                                 final_lr=args.final_lr, batch_size=args.batch_size, data_dir=args.data_dir,
                                 dim=args.dim, kind=args.kind, log=lambda m: print(m, flush=True),
                                 schedule=args.checkpoint_schedule)
    seconds = time.perf_counter() - t0
    stamp.write_text(json.dumps({"settings": settings, "seconds": seconds}))
    return config, seconds, False


def cross_validated_probabilities(args: argparse.Namespace, folds: int = 3,
                                  only_fold: int | None = None) -> tuple[np.ndarray | None, float, bool]:
    """(out-of-sample softmax probabilities [N, 10], seconds, reused) for cleanlab: `folds`-fold
    cross-validation (stratified on the given, possibly flipped labels, seeded), each fold's CNN the same
    architecture, initialisation, optimiser, lr schedule, batch size and epochs as the indexed run
    (`fit_sgd`), trained on the other folds and applied to its own. Each fold is cached in
    <out>/cleanlab-cv-<f>-of-<folds>.npz (reused with --reuse when the settings match), so folds can run as
    separate processes (`--cv-fold F --prepare-only`); with `only_fold` only that fold is computed (None
    returned)."""
    from sklearn.model_selection import StratifiedKFold

    settings = run_settings(args)
    settings.pop("checkpoint_schedule", None)  # which checkpoints the indexed run keeps: no matter here
    key = json.dumps({**settings, "folds": folds}, sort_keys=True)
    task = FashionMNISTTask(data_dir=args.data_dir, limit=args.limit, flip_fraction=args.flip_fraction,
                            seed=args.seed)
    train = task.training_set()
    labels = train.labels.numpy()
    probabilities = np.full((len(labels), 10), np.nan)
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=args.seed)
    seconds, all_reused = 0.0, True
    for fold, (fit_rows, held_rows) in enumerate(split.split(np.zeros(len(labels)), labels)):
        if only_fold is not None and fold != only_fold:
            continue
        cache = Path(args.out) / f"cleanlab-cv-{fold + 1}-of-{folds}.npz"
        if args.reuse and cache.is_file():
            data = np.load(cache, allow_pickle=False)
            if str(data["key"]) == key and np.array_equal(data["rows"], held_rows):
                print(f"reusing cross-validation fold {fold + 1}/{folds} of {cache}", flush=True)
                probabilities[held_rows] = data["probabilities"]
                seconds += float(data["seconds"])
                continue
        all_reused = False
        t0 = time.perf_counter()
        model = task.build_model()  # the same seeded initialisation as the indexed run
        fit_rows_t = torch.from_numpy(fit_rows)
        fit_sgd(model, task.loss, train.inputs[fit_rows_t], train.labels[fit_rows_t], epochs=args.epochs,
                lr=args.lr, final_lr=args.final_lr, batch_size=args.batch_size, seed=args.seed,
                log=lambda m, f=fold: print(f"cleanlab cross-validation fold {f + 1}/{folds}: {m}", flush=True))
        model.eval()
        with torch.no_grad():
            for s in range(0, len(held_rows), 1000):
                rows = torch.from_numpy(held_rows[s:s + 1000])
                probabilities[held_rows[s:s + 1000]] = torch.softmax(model(train.inputs[rows]).double(), 1).numpy()
        took = time.perf_counter() - t0
        seconds += took
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, probabilities=probabilities[held_rows], rows=held_rows, key=np.array(key),
                 seconds=np.array(took))
    if only_fold is not None:
        return None, seconds, all_reused
    assert np.isfinite(probabilities).all()
    return probabilities, seconds, all_reused


def cleanlab_scores(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """cleanlab 2.x on out-of-sample probabilities, as rankings (higher = more suspicious):
    `cleanlab_quality`: its label quality score (self-confidence, the probability of the given label),
    ascending; `cleanlab_cl`: confident learning (`find_label_issues`, prune by noise rate): the flagged
    examples first (each group by the quality score)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    flagged = find_label_issues(labels, probabilities, filter_by="prune_by_noise_rate")
    return {"cleanlab_quality": -quality, "cleanlab_cl": flagged.astype(np.float64) * 2.0 - quality}


def markdown_table(fractions: dict[str, list[float]], checked=CHECKED) -> str:
    """One row per ranking (table order), one column per fraction of the training data checked."""
    keys = [k for k in RANKINGS_SHOWN if k in fractions] + [k for k in fractions if k not in RANKINGS_SHOWN]
    lines = ["| ranking (most suspicious first) | " + " | ".join(f"top {f:.0%}" for f in checked) + " |",
             "|---|" + "---|" * len(checked)]
    for k in keys:
        lines.append(f"| {RANKINGS_SHOWN.get(k, k)} | " + " | ".join(f"{v:.3f}" for v in fractions[k]) + " |")
    return "\n".join(lines)


def plot(path: Path, grid: np.ndarray, curves: dict[str, np.ndarray], flip_fraction: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"combined": dict(color="#d62728", lw=2.6),
              "self_influence": dict(color="#ff7f0e", lw=1.6),
              "loss": dict(color="#1f77b4", lw=1.4, ls="-."),
              "margin": dict(color="#17becf", lw=1.2, ls="--"),
              "aum": dict(color="#2ca02c", lw=1.6, ls="--"),
              "self_influence_last": dict(color="#ff7f0e", lw=1.0, ls=":"),
              "cleanlab_cl": dict(color="#9467bd", lw=2.0),
              "cleanlab_quality": dict(color="#9467bd", lw=1.2, ls=":"),
              "random": dict(color="#7f7f7f", lw=1.4, ls=":")}
    fig, ax = plt.subplots(figsize=(7.6, 5.2), dpi=120)
    ideal = np.minimum(1.0, grid / flip_fraction) if flip_fraction > 0 else grid
    ax.plot(grid, ideal, color="black", lw=0.8, alpha=0.35, label="ideal (every flipped example first)")
    for key in RANKINGS_SHOWN:
        if key in curves:
            ax.plot(grid, curves[key], label=RANKINGS_SHOWN[key], **styles[key])
    for f in CHECKED:
        ax.axvline(f, color="#cccccc", lw=0.6, zorder=0)
        for key, dy in (("combined", 7), ("cleanlab_cl", -13)):
            if key in curves:
                y = float(np.interp(f, grid, curves[key]))
                ax.plot([f], [y], "o", ms=4, color=styles[key]["color"])
                ax.annotate(f"{y:.2f}", (f, y), textcoords="offset points", xytext=(4, dy), fontsize=8,
                            color=styles[key]["color"],
                            bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
    ax.set_xlim(0, 0.5)
    ax.set_ylim(0, 1.01)
    ax.set_xticks([0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5])
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("fraction of training data checked (most suspicious first)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7, framealpha=0.95)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    if args.prepare_only and args.cv_fold is not None:  # one cross-validation fold, nothing else
        cross_validated_probabilities(args, only_fold=args.cv_fold)
        return {}
    config_path, t_train, _ = train_or_reuse(args, out / "run")
    if args.prepare_only:
        if not args.no_cleanlab:
            cross_validated_probabilities(args, only_fold=args.cv_fold)
        return {}
    config = load_config(config_path)
    result = build_index(config, out / "index", overwrite=True, show_progress=not args.quiet)
    t_index = result.seconds
    print(f"trained in {t_train:.1f}s; indexed {result.count} examples (dim {result.dim}) in {t_index:.1f}s",
          flush=True)

    index = IndexDirectory.open(result.path, verify=False)
    flipped = np.array([bool(e["display"]["flipped"]) for e in index.examples])
    labels = np.array([int(e["label"]) for e in index.examples])
    review = index.label_review
    scores = dict(ranking_scores(review, index.self_influence))  # what GET /label-review serves
    suspicion_of = {name: suspicion(name, values) for name, values in scores.items()}
    seconds = {"train": round(t_train, 1), "index": round(t_index, 1)}
    if args.last_checkpoint_self_influence:
        t1 = time.perf_counter()
        suspicion_of["self_influence_last"], _ = last_checkpoint_scores(result.path)
        seconds["last_checkpoint_self_influence"] = round(time.perf_counter() - t1, 1)
    cv_probabilities = None
    if not args.no_cleanlab:
        try:
            import cleanlab  # noqa: F401
        except ImportError:
            print("cleanlab is not installed (pip install 'tracin-service[bench]'): its columns are left out",
                  flush=True)
        else:
            cv_probabilities, t_cv, reused = cross_validated_probabilities(args)
            seconds["cleanlab_cross_validation"] = round(t_cv, 1)
            suspicion_of.update(cleanlab_scores(labels, cv_probabilities))

    task_model = FashionMNISTTask(data_dir=args.data_dir).build_model()
    from indexer.checkpoints import load_checkpoint, load_state_into

    last_path = config.checkpoints[-1].path
    load_state_into(task_model, load_checkpoint(last_path)[0], str(last_path))
    test_accuracy = evaluate_accuracy(task_model, args.data_dir)
    fits = review["prediction"] == labels  # the index's own predictions at the last checkpoint
    predicted_ok = {"flipped_fit": float(fits[flipped].mean()) if flipped.any() else None,
                    "clean_fit": float(fits[~flipped].mean())}

    checked = np.array(CHECKED)
    grid = np.linspace(0, 1, 401)
    fractions = {k: found_curve(v, flipped, checked).tolist() for k, v in suspicion_of.items()}
    fractions["random"] = checked.tolist()
    curves = {k: found_curve(v, flipped, grid) for k, v in suspicion_of.items()}
    curves["random"] = grid
    table = markdown_table(fractions)
    n, n_flipped = len(flipped), int(flipped.sum())
    per_epoch = (n + args.batch_size - 1) // args.batch_size
    at = ", ".join(f"{int(Path(c.path).stem.split('-')[-1]) / per_epoch:.3g}" for c in config.checkpoints)
    header = (f"Fashion-MNIST, {n:,} training images, {n_flipped:,} labels flipped ({args.flip_fraction:.0%}, seed "
              f"{args.seed}); CNN, {args.epochs} epochs SGD lr {args.lr:g}->{args.final_lr:g}, "
              f"{len(config.checkpoints)} checkpoints ({args.checkpoint_schedule}: at epochs {at}); "
              f"test accuracy {test_accuracy:.4f}")
    print()
    print(header)
    print(f"the last checkpoint predicts the (flipped) training label for {predicted_ok['flipped_fit']:.1%} of "
          f"flipped and {predicted_ok['clean_fit']:.1%} of clean examples")
    print()
    print(table)
    print()
    best_cleanlab = max((fractions[k][1] for k in ("cleanlab_cl", "cleanlab_quality") if k in fractions), default=None)
    if best_cleanlab is not None:
        default = fractions[DEFAULT_RANKING][1]
        verdict = "at least as many as" if default >= best_cleanlab else "FEWER than"
        print(f"at 10% checked the default ranking ({DEFAULT_RANKING}) finds {default:.3f}, {verdict} cleanlab's "
              f"best ({best_cleanlab:.3f})")
    figures = {
        "command": "bench/bench_mislabel.py " + " ".join(args.argv),
        "examples": n, "flipped": n_flipped, "flip_fraction": args.flip_fraction, "seed": args.seed,
        "epochs": args.epochs, "checkpoints": [{"file": Path(c.path).name, "lr": lr}
                                               for c, (_, lr) in zip(config.checkpoints,
                                                                    index.checkpoint_paths())],
        "lr": args.lr, "final_lr": args.final_lr, "batch_size": args.batch_size,
        "projection": index.manifest["projection"]["kind"], "projection_dim": index.manifest["projection"]["dim"],
        "embedding_dim": result.dim, "test_accuracy": test_accuracy, "fit_at_last_checkpoint": predicted_ok,
        "checked": list(CHECKED), "found": fractions, "rankings": {k: RANKINGS_SHOWN[k] for k in fractions},
        "default_ranking": DEFAULT_RANKING,
        "curve": {"checked": grid.round(4).tolist(), **{k: np.round(v, 4).tolist() for k, v in curves.items()}},
        "seconds": seconds, "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "markdown": table,
    }
    raw = {f"review_{name}": review[name] for name in review.dtype.names}
    if cv_probabilities is not None:
        raw["cleanlab_cv_probabilities"] = cv_probabilities
    # per example, in index row order: every ranking's suspicion (higher = first) and the raw table
    np.savez_compressed(out / "scores.npz", flipped=flipped, labels=labels, **suspicion_of, **raw)
    json_path = Path(args.json) if args.json else out / "mislabel.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(figures, indent=2))
    print(f"figures written to {json_path}")
    if args.plot:
        plot(Path(args.plot), grid, curves, args.flip_fraction, header.replace("; CNN", ";\nCNN"))
        print(f"plot written to {args.plot}")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / ".tracin" / "mislabel"), help="work directory (checkpoints, index)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N training images (reduced run)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--checkpoint-schedule", choices=("even", "log"), default="even",
                        help="even: checkpoints evenly spaced in steps; log: log-spaced in epochs (most early)")
    parser.add_argument("--flip-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--final-lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--kind", default=None, help="projection kind (default: the library's)")
    parser.add_argument("--dim", type=int, default=None, help="projection dim per layer and checkpoint")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--plot", default=None,
                        help="PNG to write ('' for none); default docs/mislabel-fashion-mnist.png for a full run, "
                             "<out>/mislabel.png with --limit")
    parser.add_argument("--json", default=None, help="figures as JSON (default <out>/mislabel.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the checkpoints and cross-validated probabilities of an earlier run with the same "
                             "settings in --out (the index is always rebuilt)")
    parser.add_argument("--no-cleanlab", action="store_true", help="leave out the cleanlab baseline")
    parser.add_argument("--last-checkpoint-self-influence", action="store_true",
                        help="also rank by the exact self-influence of the last checkpoint alone (one more pass)")
    parser.add_argument("--cv-fold", type=int, default=None,
                        help="with --prepare-only: only this cleanlab cross-validation fold (0-based; folds can run "
                             "as separate processes, each cached in --out)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only train (or reuse) the checkpoints and the cleanlab cross-validation, then stop")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.plot is None:
        args.plot = str(REPO / "docs" / "mislabel-fashion-mnist.png") if args.limit is None else str(
            Path(args.out) / "mislabel.png")
    if not data_available(args.data_dir):
        print(f"error: Fashion-MNIST files not found in {args.data_dir} (apt-get install dataset-fashion-mnist)",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
