"""Linear datamodeling score (LDS) of the served TracIn scores (issue 18; method and figures: docs/quality.md).

    nice -n 10 .venv/bin/python bench/bench_lds.py --work .tracin/bench/lds --json docs/lds.json
    .venv/bin/python bench/bench_lds.py --quick --work /tmp/lds-quick       # a smoke run (minutes)

LDS (Park et al., 2023, "TRAK: Attributing Model Behavior at Scale", sec. 2.2): draw M random subsets S_m
holding half of the training set, retrain the model on each with the run's own recipe, and for every
held-out query q take the Spearman rank correlation over m between

    predicted_m(q) = sum_{z in S_m} score(q, z)      and      actual_m(q) = -loss(retrained_m, q)

(the query's loss with its true label; a positive TracIn score means training on z lowers the query's
loss, hence the minus). LDS = the mean over queries, reported with its standard error. Two settings:
`fixed` (every retraining starts from the full run's initialisation and visits its subset in the full
run's example order: TracIn describes that one run) and `fresh` (a new initialisation and example order per
subset). The same subsets serve every run of a dataset, every variant and the peer.

Runs (each trained once on the whole training set, saving 20 checkpoints evenly spaced in steps):
  digits-sgd, digits-adamw, digits-momentum    indexer/demo/digits.py: 1,500 rows (10% flipped labels), the
                                               MLP, 30 epochs, batch 32, lr x 0.93 per epoch; SGD lr 0.1,
                                               AdamW lr 0.01, SGD lr 0.01 + momentum 0.9; queries: all 297
                                               held-out digits
  fmnist-sgd, fmnist-adamw                     indexer/demo/fashion_mnist.py: the first 3,000 training
                                               images, the CNN, 3 epochs, batch 64, lr decaying
                                               exponentially to lr/10 per step; SGD lr 0.1, AdamW lr 1e-3;
                                               queries: 100 drawn (seeded) from the first 500 test images
The full runs are checked to be bit-identical to the demos' own training functions (`train_digits`,
`train_fashion_mnist` with `optimizer=`), so "the recipe" is the demos'.

Score variants, all from the served code path: an index is built by `indexer.build.pipeline.build_index`
from a config, reopened with `IndexDirectory.open` + `load_embedder` as `tracin serve` does, the queries
embedded by `Embedder.embed(keep_grads=True)` and every training row scored by `ExactScorer` (the service's
re-ranking), per checkpoint:
  plain     5 checkpoints, [optimizer] formula = "sgd" (lr_g * g)
  auto      5 checkpoints, the default (lr_g * Gamma for Adam/AdamW state; lr_g for SGD)
  cosine    auto / (sqrt(self-influence(q)) sqrt(self-influence(z))) in the index's metric
  last      the last checkpoint only (auto)
  more      20 checkpoints of the same run (auto)
  effective (momentum run) 5 checkpoints, [optimizer] momentum = "effective"
  ekfac     the peer: Kronfluence 1.0.1 EK-FAC influence (pairwise scores, loss measurement) at the final model
The 20-checkpoint indexes (one per formula) are scored once, per checkpoint, from their step weights and the
capture's gradients (`per_checkpoint_scores`); "auto", "plain" and "last" are sums of these terms over their
checkpoints, checked against `ExactScorer.matrix` (the service's re-ranking) of the 5- and 1-checkpoint
indexes built from their own configs (first 5 queries; the largest relative difference is recorded).

Everything is cached under --work (checkpoints, indexes, score matrices, every retrained model's query
losses): an interrupted run resumes where it stopped; the table can be printed at any time from what is
done (`--report-only`). Prints markdown tables and writes every figure to --json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FRESH_SEED = 10_000  # fresh setting: seed of subset m is FRESH_SEED + m
SUBSET_SEED = 20_231  # subset m: np.random.default_rng([SUBSET_SEED, m]).permutation(N)[:N // 2]
QUERY_SEED = 7
MORE = 20  # checkpoints saved per run; the default variants use every 4th (5), "last" the last one
MATMUL = torch.float64  # --matmul


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- runs ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One training recipe. schedule "epoch": lr x gamma after each epoch (digits); "step": lr decays
    exponentially to final_lr at the last step (Fashion-MNIST, `fit_sgd`)."""

    name: str
    dataset: str
    optimizer: str  # sgd | adamw
    lr: float
    epochs: int
    batch_size: int
    schedule: str
    gamma: float = 0.93
    final_lr: float | None = None
    momentum: float = 0.0
    limit: int | None = None  # fmnist: training images
    pool: int | None = None  # fmnist: held-out images the queries are drawn from
    queries: int | None = None  # queries drawn from the pool (None: all)


RUNS = {
    "digits-sgd": Run("digits-sgd", "digits", "sgd", 0.1, 30, 32, "epoch"),
    "digits-adamw": Run("digits-adamw", "digits", "adamw", 0.01, 30, 32, "epoch"),
    "digits-momentum": Run("digits-momentum", "digits", "sgd", 0.01, 30, 32, "epoch", momentum=0.9),
    "fmnist-sgd": Run("fmnist-sgd", "fmnist", "sgd", 0.1, 3, 64, "step", final_lr=0.01, limit=3000, pool=500,
                      queries=100),
    "fmnist-adamw": Run("fmnist-adamw", "fmnist", "adamw", 1e-3, 3, 64, "step", final_lr=1e-4, limit=3000, pool=500,
                        queries=100),
}
QUICK = {"digits": dict(epochs=6), "fmnist": dict(limit=600, pool=60, queries=20, epochs=1)}


def make_task(run: Run):
    if run.dataset == "digits":
        from indexer.demo.digits import DigitsTask

        return DigitsTask(seed=0)
    from indexer.demo.fashion_mnist import FashionMNISTTask

    return FashionMNISTTask(limit=run.limit, held_out=run.pool, seed=0)


def task_args(run: Run) -> str:
    if run.dataset == "digits":
        return "{ seed = 0 }"
    from indexer.demo.fashion_mnist import DEFAULT_DATA_DIR

    return f'{{ data_dir = "{DEFAULT_DATA_DIR}", seed = 0, limit = {run.limit}, held_out = {run.pool} }}'


def fresh_model(run: Run, seed: int) -> torch.nn.Module:
    """The run's architecture with a new initialisation from `seed` (the task's seed also fixes its data)."""
    torch.manual_seed(seed)
    if run.dataset == "digits":
        from indexer.demo.digits import DigitsMLP

        return DigitsMLP()
    from indexer.demo.fashion_mnist import FashionCNN

    return FashionCNN()


def make_optimizer(run: Run, model: torch.nn.Module) -> torch.optim.Optimizer:
    if run.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=run.lr)
    return torch.optim.SGD(model.parameters(), lr=run.lr, momentum=run.momentum)


def full_orders(run: Run, count: int, seed: int = 0) -> list[torch.Tensor]:
    """The example order of every epoch of a run on `count` rows (one randperm per epoch from `seed`, as the
    demos' loops draw it)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(count, generator=generator) for _ in range(run.epochs)]


def fit(run: Run, model: torch.nn.Module, loss_fn, inputs, labels, orders: list[torch.Tensor], on_step=None
        ) -> torch.optim.Optimizer:
    """The demos' training loop, on the rows `orders[e]` in epoch e (batches of run.batch_size in that order;
    mean loss; `on_step(step, epoch, optimizer)` after each optimizer step, before the lr moves)."""
    optimizer = make_optimizer(run, model)
    per_step = run.schedule == "step"
    if per_step:
        total = sum((len(o) + run.batch_size - 1) // run.batch_size for o in orders)
        decay = (run.final_lr / run.lr) ** (1.0 / max(1, total - 1))
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=decay)
    else:
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=run.gamma)
    step = 0
    for epoch, order in enumerate(orders, 1):
        model.train()
        for start in range(0, len(order), run.batch_size):
            rows = order[start:start + run.batch_size]
            loss = loss_fn(model(inputs[rows]), labels[rows]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if on_step is not None:
                on_step(step, epoch, optimizer)
            if per_step:
                scheduler.step()
        if not per_step:
            scheduler.step()
    return optimizer


def steps_of(run: Run, count: int) -> int:
    return run.epochs * ((count + run.batch_size - 1) // run.batch_size)


def save_steps(run: Run, count: int) -> list[int]:
    total = steps_of(run, count)
    return sorted({round(total * (c + 1) / MORE) for c in range(MORE)})


def write_config(path: Path, run: Run, checkpoints: list[Path], optimizer: dict[str, str] | None = None) -> Path:
    ref = "indexer.demo.digits:DigitsTask" if run.dataset == "digits" else \
        "indexer.demo.fashion_mnist:FashionMNISTTask"
    lines = [f'task = "{ref}"', f"task_args = {task_args(run)}", ""]
    for c in checkpoints:
        lines += ["[[checkpoints]]", f'path = "{c.resolve()}"', ""]
    if optimizer:
        lines += ["[optimizer]", *[f'{k} = "{v}"' for k, v in optimizer.items()], ""]
    lines += ["[projection]", 'kind = "sketch"', "seed = 0", "", "[index]", 'factory = "Flat"', "batch_size = 256", ""]
    path.write_text("\n".join(lines))
    return path


def train_full(run: Run, work: Path) -> list[Path]:
    """Train the run on the whole training set once, saving MORE checkpoints (cached)."""
    from indexer.checkpoints import save_checkpoint

    folder = work / "checkpoints"
    done = folder / "done.json"
    if done.is_file():
        return [folder / name for name in json.loads(done.read_text())["files"]]
    task = make_task(run)
    train = task.training_set()
    model = task.build_model()
    at = set(save_steps(run, len(train)))
    saved: list[Path] = []

    def on_step(step, epoch, optimizer):
        if step in at:
            saved.append(save_checkpoint(folder / f"step-{step:06d}.pt", model, optimizer, step=step, epoch=epoch))

    t0 = time.perf_counter()
    fit(run, model, task.loss, train.inputs, train.labels, full_orders(run, len(train)), on_step)
    held = task.held_out_set()
    with torch.no_grad():
        accuracy = float((model.eval()(held.inputs).argmax(1) == held.labels).double().mean())
    done.write_text(json.dumps({"files": [p.name for p in saved], "seconds": time.perf_counter() - t0,
                                "held_out_accuracy": accuracy}))
    log(f"{run.name}: trained on {len(train)} rows in {time.perf_counter() - t0:.0f}s, {len(saved)} checkpoints, "
        f"held-out accuracy {accuracy:.3f}")
    return saved


def check_recipe(run: Run, work: Path, checkpoints: list[Path]) -> dict:
    """Train with the demo's own function (same seed, optimizer, lr, epochs) and compare its last checkpoint
    with the bench's full run bit for bit: the bench's loop is the demo's recipe."""
    out = work / "recipe-check.json"
    if out.is_file():
        return json.loads(out.read_text())
    from indexer.checkpoints import load_checkpoint

    demo = work / "demo-run"
    if run.dataset == "digits":
        from indexer.demo.digits import train_digits

        train_digits(demo, epochs=run.epochs, checkpoints=5, seed=0, lr=run.lr, batch_size=run.batch_size,
                     optimizer=run.optimizer)
    else:
        from indexer.demo.fashion_mnist import train_fashion_mnist

        train_fashion_mnist(demo, epochs=run.epochs, checkpoints=5, limit=run.limit, seed=0, lr=run.lr,
                            final_lr=run.final_lr, batch_size=run.batch_size, optimizer=run.optimizer)
    theirs = sorted((demo / "checkpoints").glob("*.pt"))[-1]
    a, meta_a = load_checkpoint(theirs)
    b, meta_b = load_checkpoint(checkpoints[-1])
    same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    result = {"demo_checkpoint": theirs.name, "bench_checkpoint": checkpoints[-1].name, "identical": same,
              "lr": [meta_a.get("lr"), meta_b.get("lr")]}
    out.write_text(json.dumps(result))
    log(f"{run.name}: the demo's own training gives {'the same' if same else 'DIFFERENT'} weights "
        f"({theirs.name} vs {checkpoints[-1].name})")
    return result


# -- queries and subsets -------------------------------------------------------------------------------------
def query_rows(run: Run, pool: int) -> np.ndarray:
    if run.queries is None or run.queries >= pool:
        return np.arange(pool)
    return np.sort(np.random.default_rng(QUERY_SEED).choice(pool, size=run.queries, replace=False))


def subset(m: int, count: int) -> np.ndarray:
    """Row indices (sorted) of subset m: half the training set."""
    return np.sort(np.random.default_rng([SUBSET_SEED, m]).permutation(count)[:count // 2])


# -- scores from the served code path ---------------------------------------------------------------------------
def build(config: Path, out: Path) -> Path:
    from indexer.build.pipeline import build_index
    from indexer.config import load_config

    if not (out / "manifest.json").is_file():
        build_index(load_config(config), out, overwrite=True)
    return out


def served(index: Path, threads: int):
    """(task, embedder, scorer, index directory) exactly as `tracin serve` loads them."""
    from indexer.score.exact import ExactScorer
    from indexer.sketch.embedding import load_embedder
    from indexer.store.directory import IndexDirectory

    directory = IndexDirectory.open(index)
    task, embedder = load_embedder(directory, threads=threads)
    return task, embedder, ExactScorer.for_examples(embedder, task.training_set()), directory


def per_checkpoint_scores(indexes: list[Path], qx, qy, chunk: int, threads: int, batch: int = 128,
                          transforms: tuple = ()) -> dict:
    """Exact TracIn of the queries against every training row per checkpoint [F, C, Q, N] float64, for F
    index directories over the same checkpoints with different step weights (formulas), the queries'
    self-influence per checkpoint in the first index's metric [C, Q], and each manifest's optimizer summary.

    The weights w are each index's (`load_embedder`, as served) and the gradients the capture's
    (`CheckpointEmbedder.grads`); the terms sum_l <w_l (.) G_l(q), G_l(z)> are taken between explicit
    gradients (`BlockGrad.full`) in float64, one matrix product per block for all queries and formulas: the
    same numbers as `ExactScorer` (which convolves a Conv2d block's training patches with every query's
    gradient: Q times the work of one explicit gradient per training row when Q queries are scored at once).
    `scores_for` checks the sums against `ExactScorer.matrix` of indexes built from their own configs.
    `transforms` (investigation): functions w -> w' of the first index's tensor weights, scored as more rows."""
    from indexer.score.exact import weigh

    loaded = [served(index, threads) for index in indexes]
    digests = [[c["sha256"] for c in d.manifest["checkpoints"]] for *_, d in loaded]
    if any(d != digests[0] for d in digests):
        raise SystemExit(f"{indexes}: the indexes hold different checkpoints")
    task, embedder, _, directory = loaded[0]
    train = task.training_set()
    N, Q, C, F = directory.count, qy.shape[0], len(embedder.per_checkpoint), len(indexes) + len(transforms)
    terms = np.zeros((F, C, Q, N))
    query_si = np.zeros((C, Q))
    for c, part in enumerate(embedder.per_checkpoint):
        for start in range(0, Q, chunk):
            stop = min(Q, start + chunk)
            query_si[c, start:stop] = part.embed(qx[start:stop], qy[start:stop]).self_influence.cpu().numpy()
        q_grads = part.grads(qx, qy).grads
        weighted = []  # per block: [F * Q, m * n] float64
        for b, g in enumerate(q_grads):
            rows = []
            weights = [e.per_checkpoint[c].weights[b] for _, e, _, _ in loaded]
            w0 = weights[0]
            weights += [f(w0) if isinstance(w0, torch.Tensor) else w0 for f in transforms]
            for w in weights:
                side, scale = weigh(g, w)
                rows.append((side.full().reshape(Q, -1).to(torch.float64) * scale).to(MATMUL))
            weighted.append(torch.cat(rows))
        for s in range(0, N, batch):
            grads = part.grads(*train.batch(s, min(N, s + batch))).grads
            with torch.no_grad():
                total = sum((w @ g.full().reshape(g.batch, -1).to(MATMUL).T).to(torch.float64)
                            for w, g in zip(weighted, grads))
            terms[:, c, :, s:s + batch] = total.reshape(F, Q, -1).numpy()
    return {"terms": terms, "query_si": query_si, "optimizer": [d.manifest.get("optimizer") for *_, d in loaded]}


def served_matrix(index: Path, qx, qy, threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """`ExactScorer.matrix` of the queries against every training row [Q, N], the queries' self-influence
    [Q] and the training rows' [N] (self_influence.npy), from an index directory (what is served)."""
    _, embedder, scorer, directory = served(index, threads)
    embedding = embedder.embed(qx, qy, keep_grads=True)
    grads = [p.grads for p in embedding.per_checkpoint]
    matrix = scorer.matrix(grads, np.arange(directory.count))
    return matrix, embedding.self_influence.cpu().numpy(), np.asarray(directory.self_influence), \
        directory.manifest.get("optimizer")


def ekfac_scores(run: Run, checkpoint: Path, queries, work: Path, threads: int) -> np.ndarray:
    """Kronfluence (EK-FAC) pairwise influence [Q, N] at the final model: train loss = summed cross-entropy
    (labels sampled from the model for the Fisher factors), measurement = the query's cross-entropy with its
    true label. Sign: score = g_q^T (G + damping)^-1 g_z > 0 when upweighting z lowers the query's loss
    (Grosse et al., 2023, eq. 5 up to its sign), the same convention as TracIn."""
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task as KTask

    from indexer.checkpoints import load_checkpoint, load_state_into

    class Classification(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

    task = make_task(run)
    train = task.training_set()
    model = task.build_model()
    load_state_into(model, load_checkpoint(checkpoint)[0], str(checkpoint))
    model.eval()
    ktask = Classification()
    model = prepare_model(model, ktask)
    train_ds = torch.utils.data.TensorDataset(train.inputs, train.labels)
    query_ds = torch.utils.data.TensorDataset(*queries)
    torch.manual_seed(0)
    analyzer = Analyzer(analysis_name=run.name, model=model, task=ktask, cpu=True, disable_tqdm=True,
                        output_dir=str(work / "kronfluence"))
    analyzer.fit_all_factors(factors_name="ekfac", dataset=train_ds, per_device_batch_size=256,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    analyzer.compute_pairwise_scores(scores_name="ekfac", factors_name="ekfac", query_dataset=query_ds,
                                     train_dataset=train_ds, per_device_query_batch_size=50,
                                     per_device_train_batch_size=256, overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("ekfac")["all_modules"]
    return scores.to(torch.float64).numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def scores_for(run: Run, work: Path, checkpoints: list[Path], threads: int, chunk: int, skip_more: bool = False
               ) -> dict[str, np.ndarray]:
    """Every variant's score matrix [Q, N] (cached in work/scores.npz) and the checks (work/scores.json).
    `skip_more`: score the 5-checkpoint indexes only (no "more" variant; a run without it recomputes
    everything once scores.npz is removed)."""
    cache, info_file = work / "scores.npz", work / "scores.json"
    if cache.is_file() and info_file.is_file():
        with np.load(cache) as data:
            cached = {k: data[k] for k in data.files}
        if skip_more or "more" in cached:
            return cached
        return add_more(run, work, checkpoints, threads, chunk, cached)
    task = make_task(run)
    held = task.held_out_set()
    q = query_rows(run, len(held))
    qx, qy = held.rows(q)
    five = checkpoints[MORE // 5 - 1::MORE // 5]
    pick = [checkpoints.index(c) for c in five]
    info: dict = {"queries": q.tolist(), "checkpoints": [c.name for c in checkpoints], "matmul": str(MATMUL),
                  "five": [c.name for c in five]}
    configs = {
        "more-auto": write_config(work / "more-auto.toml", run, checkpoints),
        "more-plain": write_config(work / "more-plain.toml", run, checkpoints, {"formula": "sgd"}),
        "auto": write_config(work / "auto.toml", run, five),
        "plain": write_config(work / "plain.toml", run, five, {"formula": "sgd"}),
        "last": write_config(work / "last.toml", run, checkpoints[-1:]),
    }
    if run.momentum:
        configs["effective"] = write_config(work / "effective.toml", run, five, {"momentum": "effective"})
    t0 = time.perf_counter()
    out: dict[str, np.ndarray] = {}
    # SGD's optimizer-aware weights are lr_g (formula "sgd"): a plain pass would repeat the auto one term for
    # term; the 5-checkpoint plain index is still built and compared with it below
    formulas = ["auto"] if run.optimizer == "sgd" else ["auto", "plain"]
    if skip_more:  # the 5-checkpoint indexes are the per-checkpoint source
        indexes = [build(configs[f], work / f"index-{f}") for f in formulas]
        pick = list(range(len(five)))
    else:
        indexes = [build(configs[f"more-{f}"], work / f"index-more-{f}") for f in formulas]
    log(f"{run.name}: indexes built ({time.perf_counter() - t0:.0f}s); scoring {len(q)} queries x every training "
        f"row at {len(pick) if skip_more else MORE} checkpoints ({', '.join(formulas)})")
    pc = per_checkpoint_scores(indexes, qx, qy, chunk, threads)
    info["more"] = "skipped (--skip-more)" if skip_more else {"formulas": formulas, "optimizer": pc["optimizer"]}
    terms = pc["terms"]
    out["auto"] = terms[0][pick].sum(axis=0)
    out["plain"] = terms[-1][pick].sum(axis=0)
    if not skip_more:
        out["more"] = terms[0].sum(axis=0)
    out["last"] = terms[0][-1]
    query_si5 = pc["query_si"][pick].sum(axis=0)
    log(f"{run.name}: per-checkpoint scores done ({time.perf_counter() - t0:.0f}s)")
    # what the 5- and 1-checkpoint indexes built from their own configs serve, on the first queries
    first = slice(0, min(5, len(q)))
    for name in ("auto", "plain", "last"):
        index = build(configs[name], work / f"index-{name}")
        matrix, qsi, tsi, optimizer = served_matrix(index, qx[first], qy[first], threads)
        info[name] = {"optimizer": optimizer, "max_rel_diff_vs_summed_terms": rel(out[name][first], matrix)}
        if name == "auto":
            info[name]["query_self_influence_max_rel_diff"] = rel(query_si5[first], qsi)
            train_si = tsi
    out["cosine"] = out["auto"] / np.sqrt(np.outer(query_si5, train_si))
    if run.momentum:
        index = build(configs["effective"], work / "index-effective")
        matrix, _, _, optimizer = served_matrix(index, qx, qy, threads)
        out["effective"] = matrix
        info["effective"] = {"optimizer": optimizer, "ratio_to_auto": [float((matrix / out["auto"]).min()),
                                                                     float((matrix / out["auto"]).max())]}
    log(f"{run.name}: EK-FAC (kronfluence) scores")
    t1 = time.perf_counter()
    out["ekfac"] = ekfac_scores(run, checkpoints[-1], (qx, qy), work, threads)
    info["ekfac_seconds"] = time.perf_counter() - t1
    info["seconds"] = time.perf_counter() - t0
    np.savez(work / "scores.tmp.npz", **out)
    os.replace(work / "scores.tmp.npz", cache)
    info_file.write_text(json.dumps(info, indent=1, default=float))
    log(f"{run.name}: all scores in {info['seconds']:.0f}s; served-vs-summed checks "
        f"{ {k: info[k]['max_rel_diff_vs_summed_terms'] for k in ('auto', 'plain', 'last')} }")
    return out


def clip_quantile(q: float):
    """w -> min(w, the q-quantile of w over the tensor): a tighter bound on the preconditioner than the
    index's (the largest Gamma among coordinates the optimizer moved)."""
    def clip(w: torch.Tensor) -> torch.Tensor:
        flat = w.reshape(-1).to(torch.float64)
        ceiling = float(torch.quantile(flat, q)) if flat.numel() <= 1 << 24 else float(flat.sort().values[
            int(q * (flat.numel() - 1))])
        return w.clamp(max=ceiling)
    return clip


INVESTIGATE = {"clip99": clip_quantile(0.99), "clip90": clip_quantile(0.90), "clip50": clip_quantile(0.50)}


def investigate(run: Run, work: Path, threads: int, chunk: int) -> None:
    """Extra variants of an Adam run's auto scores (work/extra.npz): the preconditioner clipped per tensor at
    its 99th / 90th / 50th percentile (5 checkpoints), to see whether the bound on Gamma decides the LDS."""
    out_file = work / "extra.npz"
    if out_file.is_file() or run.optimizer != "adamw":
        return
    task = make_task(run)
    held = task.held_out_set()
    qx, qy = held.rows(query_rows(run, len(held)))
    info = json.loads((work / "scores.json").read_text())
    pc = per_checkpoint_scores([work / "index-auto"], qx, qy, chunk, threads, transforms=tuple(INVESTIGATE.values()))
    with np.load(work / "scores.npz") as data:
        assert rel(pc["terms"][0].sum(axis=0), data["auto"]) < 1e-6, "index-auto does not reproduce auto"
    out = {f"auto-{name}": pc["terms"][1 + i].sum(axis=0) for i, name in enumerate(INVESTIGATE)}
    np.savez(work / "extra.tmp.npz", **out)
    os.replace(work / "extra.tmp.npz", out_file)
    log(f"{run.name}: investigation variants {list(out)} ({info['five']})")


def add_more(run: Run, work: Path, checkpoints: list[Path], threads: int, chunk: int,
             cached: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The "more" variant (all MORE checkpoints, auto) for scores computed with --skip-more; its terms at the 5
    default checkpoints are checked against the cached "auto" scores (recorded in scores.json)."""
    task = make_task(run)
    held = task.held_out_set()
    qx, qy = held.rows(query_rows(run, len(held)))
    index = build(write_config(work / "more-auto.toml", run, checkpoints), work / "index-more-auto")
    log(f"{run.name}: scoring the {MORE}-checkpoint index (more)")
    terms = per_checkpoint_scores([index], qx, qy, chunk, threads)["terms"][0]
    pick = [checkpoints.index(c) for c in checkpoints[MORE // 5 - 1::MORE // 5]]
    info = json.loads((work / "scores.json").read_text())
    info["more"] = {"added_later": True, "max_rel_diff_of_its_5_checkpoints_vs_auto": rel(terms[pick].sum(axis=0),
                                                                                          cached["auto"])}
    cached["more"] = terms.sum(axis=0)
    np.savez(work / "scores.tmp.npz", **cached)
    os.replace(work / "scores.tmp.npz", work / "scores.npz")
    (work / "scores.json").write_text(json.dumps(info, indent=1, default=float))
    log(f"{run.name}: more added ({info['more']})")
    return cached


# -- retraining ------------------------------------------------------------------------------------------------
def retrain(run: Run, work: Path, setting: str, m: int) -> np.ndarray:
    """The queries' losses (true labels) [Q] after retraining on subset m (cached)."""
    path = work / "retrain" / setting / f"{m:03d}.npy"
    if path.is_file():
        return np.load(path)
    task = make_task(run)
    train = task.training_set()
    held = task.held_out_set()
    qx, qy = held.rows(query_rows(run, len(held)))
    rows = subset(m, len(train))
    if setting == "fixed":
        model = task.build_model()
        member = np.zeros(len(train), dtype=bool)
        member[rows] = True
        member = torch.from_numpy(member)
        orders = [o[member[o]] for o in full_orders(run, len(train))]
    else:
        model = fresh_model(run, FRESH_SEED + m)
        index = torch.from_numpy(rows)
        orders = [index[o] for o in full_orders(run, len(rows), FRESH_SEED + m)]
    fit(run, model, task.loss, train.inputs, train.labels, orders)
    with torch.no_grad():
        losses = task.loss(model.eval()(qx), qy).to(torch.float64).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".tmp.npy"), losses)
    os.replace(path.with_suffix(".tmp.npy"), path)
    return losses


def done_subsets(work: Path, setting: str) -> list[int]:
    folder = work / "retrain" / setting
    return sorted(int(p.stem) for p in folder.glob("[0-9][0-9][0-9].npy")) if folder.is_dir() else []


# -- LDS ----------------------------------------------------------------------------------------------------------
def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> dict:
    """Spearman over subsets, per query, of predicted = masks @ scores.T and actual = -losses [M, Q]; mean
    and standard error over the queries whose actual losses vary."""
    from scipy.stats import rankdata

    predicted = masks.astype(np.float64) @ scores.T
    actual = -losses

    def ranks(x):
        r = rankdata(x, axis=0)
        return (r - r.mean(axis=0)) / np.where(r.std(axis=0) > 0, r.std(axis=0), np.nan)

    per_query = (ranks(predicted) * ranks(actual)).mean(axis=0)
    rho = per_query[np.isfinite(per_query)]
    return {"lds": float(rho.mean()), "se": float(rho.std(ddof=1) / math.sqrt(rho.size)), "queries": int(rho.size),
            "subsets": int(masks.shape[0]), "per_query": per_query}


def paired(a: dict, b: dict) -> dict:
    """LDS(a) - LDS(b) over the same queries, with the standard error of the per-query differences."""
    d = a["per_query"] - b["per_query"]
    d = d[np.isfinite(d)]
    return {"diff": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(d.size)), "queries": int(d.size)}


VARIANTS = ["plain", "auto", "cosine", "last", "more", "effective", "ekfac"]


def table(runs: list[Run], root: Path, count_of: dict[str, int]) -> dict:
    results: dict = {}
    for run in runs:
        work = root / run.name
        if not (work / "scores.npz").is_file():
            continue
        with np.load(work / "scores.npz") as data:
            scores = {k: data[k] for k in data.files}
        if (work / "extra.npz").is_file():
            with np.load(work / "extra.npz") as data:
                scores.update({k: data[k] for k in data.files})
        for setting in ("fixed", "fresh"):
            ms = done_subsets(work, setting)
            if len(ms) < 3:
                continue
            masks = np.zeros((len(ms), count_of[run.name]), dtype=bool)
            for i, m in enumerate(ms):
                masks[i, subset(m, count_of[run.name])] = True
            losses = np.stack([np.load(work / "retrain" / setting / f"{m:03d}.npy") for m in ms])
            row = {v: lds(scores[v], masks, losses) for v in scores}
            row["auto - plain"] = paired(row["auto"], row["plain"])
            if "more" in row:
                row["more - auto"] = paired(row["more"], row["auto"])
            row["ekfac - auto"] = paired(row["ekfac"], row["auto"])
            for value in row.values():
                value.pop("per_query", None)
            results[f"{run.name}/{setting}"] = row
    return results


def print_table(results: dict) -> None:
    print("\n### LDS (mean Spearman over queries +- standard error; M retrained subsets)\n")
    print("| run / setting | M | queries | " + " | ".join(VARIANTS) + " |")
    print("|---|---|---|" + "---|" * len(VARIANTS))
    for key, row in results.items():
        any_ = next(iter(row.values()))
        cells = [f"{row[v]['lds']:.3f} ± {row[v]['se']:.3f}" if v in row else "-" for v in VARIANTS]
        print(f"| {key} | {any_['subsets']} | {any_['queries']} | " + " | ".join(cells) + " |")
    print("\n### paired differences (mean over queries of the per-query difference +- its standard error)\n")
    print("| run / setting | auto - plain | more - auto | ekfac - auto |")
    print("|---|---|---|---|")
    for key, row in results.items():
        cells = [f"{row[v]['diff']:+.3f} ± {row[v]['se']:.3f}" if v in row else "-"
                 for v in ("auto - plain", "more - auto", "ekfac - auto")]
        print(f"| {key} | " + " | ".join(cells) + " |")
    extra = sorted({v for row in results.values() for v in row if "lds" in row[v]} - set(VARIANTS))
    if extra:
        print("\n### investigation (Adam runs: the preconditioner clipped per tensor)\n")
        print("| run / setting | auto | " + " | ".join(extra) + " |")
        print("|---|---|" + "---|" * len(extra))
        for key, row in results.items():
            if any(v in row for v in extra):
                cells = [f"{row[v]['lds']:.3f} ± {row[v]['se']:.3f}" for v in ["auto", *extra]]
                print(f"| {key} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / ".tracin/bench/lds")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {list(RUNS)}")
    parser.add_argument("--subsets", type=int, default=50, help="M retrained subsets per run and setting")
    parser.add_argument("--first-subset", type=int, default=0,
                        help="retrain subsets from this one on (several --stage retrain processes can share the work)")
    parser.add_argument("--matmul", choices=["float64", "float32"], default="float64",
                        help="dtype of the explicit-gradient products of the per-checkpoint scores (float32: ~2.5x "
                             "faster on CPU, ~1e-6 relative; the checks against ExactScorer show which was used)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--chunk", type=int, default=100, help="queries scored at once")
    parser.add_argument("--quick", action="store_true", help="fewer epochs, rows and queries (a smoke run)")
    parser.add_argument("--report-only", action="store_true", help="print the table from what is cached")
    parser.add_argument("--skip-more", action="store_true",
                        help="score the 5-checkpoint indexes only (no 20-checkpoint variant: for a short session)")
    parser.add_argument("--investigate", action="store_true",
                        help="also score the Adam runs with the preconditioner clipped per tensor (extra.npz)")
    parser.add_argument("--stage", choices=["all", "scores", "retrain"], default="all",
                        help="scores: train the full runs and score them only; retrain: the subsets only (the two "
                             "can run side by side on the same --work)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global MATMUL
    MATMUL = {"float64": torch.float64, "float32": torch.float32}[args.matmul]
    unknown = sorted(set(args.runs.split(",")) - set(RUNS))
    if unknown:
        parser.error(f"--runs: unknown {unknown}; known: {list(RUNS)}")
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        print("error: the peer needs Kronfluence: .venv/bin/pip install -c constraints.txt -e '.[lds]' && "
              ".venv/bin/pip install --no-deps kronfluence==1.0.1", file=sys.stderr)
        return 2
    runs = [RUNS[name] for name in args.runs.split(",")]
    if args.quick:
        runs = [replace(r, **QUICK[r.dataset]) for r in runs]
    root = args.work.resolve()
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    count_of = {}
    for run in runs:
        count_of[run.name] = len(make_task(run).training_set())
    recipe: dict = {}
    if not args.report_only:
        # scores first (every run), then the retrainings interleaved (subset m of every run and setting
        # before subset m + 1), so that an interrupted bench still has a balanced table
        for run in runs:
            work = root / run.name
            work.mkdir(parents=True, exist_ok=True)
            (work / "run.json").write_text(json.dumps(asdict(run)))
            if args.stage == "retrain":
                continue
            checkpoints = train_full(run, work)
            if not run.momentum:
                recipe[run.name] = check_recipe(run, work, checkpoints)
            scores_for(run, work, checkpoints, args.threads, args.chunk, args.skip_more)
            if args.investigate:
                investigate(run, work, args.threads, args.chunk)
        t0 = time.perf_counter()
        for m in range(args.first_subset, args.subsets if args.stage != "scores" else 0):
            for run in runs:
                for setting in ("fixed", "fresh"):
                    retrain(run, root / run.name, setting, m)
            log(f"subset {m + 1}/{args.subsets} retrained for every run and setting "
                f"({time.perf_counter() - t0:.0f}s, load {os.getloadavg()[0]:.1f})")
    results = table(runs, root, count_of)
    print_table(results)
    if args.json:
        info = {name: json.loads((root / name / "scores.json").read_text())
                for name in count_of if (root / name / "scores.json").is_file()}
        for name, value in info.items():
            value.pop("queries", None)
            if (root / name / "recipe-check.json").is_file():
                recipe[name] = json.loads((root / name / "recipe-check.json").read_text())
        trained = {name: json.loads((root / name / "checkpoints" / "done.json").read_text())
                   for name in count_of if (root / name / "checkpoints" / "done.json").is_file()}
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "load_at_end": os.getloadavg(),
                                         "seconds": time.time() - started, "runs": [asdict(r) for r in runs],
                                         "recipe_check": recipe, "trained": trained, "checks": info,
                                         "lds": results}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
