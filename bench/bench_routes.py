"""What a capture fallback costs: time per example of each capture route against a plain batched
forward + backward on the same model (issue 8).

    .venv/bin/python bench/bench_routes.py                       # the full run (~3 min on 2 cores)
    .venv/bin/python bench/bench_routes.py --quick               # small sizes, 1 repetition (< 1 min)
    .venv/bin/python bench/bench_routes.py --models mlp,lstm --json /tmp/routes.json

One realistic-size float32 model per route situation (random seeded data, one checkpoint, projection
`sketch` dim 1024, routes calibrated by `plan_embedding` on the first 3 examples exactly as `tracin index`
does):

  mlp            784-512-256-10 MLP                                  every block on `hook`
  transformer    token embedding + learned positions broadcast as [1, T] + 2 TransformerEncoderLayers
                 (batch_first=True) + head                           `hook` and `vmap`
  transformer_sf the same with batch_first=False (sequence-first activations, batch axis 1)
  lstm           embedding + nn.LSTM(64, 128, batch_first=True) + head   `hook` and `loop`/`vmap`
  gru            the same with nn.GRU
  cnn_bn         2 convs with BatchNorm2d(track_running_stats=False) + linear: examples mix, so the
                 model is run one example at a time (`per_example`)
  tied_lm        embedding tied to the output head (5000 classes)     `hook` with a tied block

For each model, in one process, on one batch, interleaved (the order rotates every repetition), median
of --reps repetitions, one torch thread:

  plain    `task.loss(task.forward(model, x), y).sum().backward()` with every parameter requiring grad
  capture  `CheckpointEmbedder.grads` (per-example gradients of every block, all routes)
  embed    `CheckpointEmbedder.embed` (capture + projection + exact norms)
  route:*  `GradientCapture.hook_route / vmap_route / loop_route` alone on that route's blocks (run one
           example at a time when the plan says so, as the capture does); for the blocks calibrated to
           `vmap`, also `loop_route` on the same blocks (the alternative route, for comparison)
  check    `self_check` on the model (4 examples; 1 checkpoint here, first + last in a real build)

and the self-check's share of a 10,000-example build at the measured embed rate. Finally the digits demo
(1,500 examples, 5 checkpoints) is trained and indexed with `build_index`; its manifest gives the
self-check's and the build's seconds (`build.self_check_seconds`, `build.seconds`).

Prints markdown tables and writes every figure to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.capture.routes import ROUTES  # noqa: E402
from indexer.checkpoints import save_checkpoint  # noqa: E402
from indexer.sketch.embedding import Checkpoint, CheckpointEmbedder, load_model, plan_embedding  # noqa: E402
from indexer.capture.selfcheck import self_check  # noqa: E402
from indexer.task import ExampleSet, Task, batch_size_of, take_rows  # noqa: E402

BUILD_EXAMPLES = 10_000  # the index build the self-check is compared with
MAX_INNER = 20  # a timing repeats a fast call up to this many times to last about --min-seconds


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- models ------------------------------------------------------------------------------------------

class _Example(BaseModel):
    """Unused (nothing is served); a Task needs a schema."""

    x: list


class _Transformer(nn.Module):
    def __init__(self, vocab: int, dim: int, seq: int, layers: int, heads: int, ff: int, classes: int,
                 batch_first: bool):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=batch_first) for _ in range(layers))
        self.head = nn.Linear(dim, classes)
        self.batch_first = batch_first

    def forward(self, ids):  # [B, T]
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)  # [1, T], broadcast over B
        h = self.tok(ids) + self.pos(positions)
        if not self.batch_first:
            h = h.transpose(0, 1)  # [T, B, D]
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1 if self.batch_first else 0))


class _Recurrent(nn.Module):
    def __init__(self, kind, vocab: int, dim: int, hidden: int, classes: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.rnn = kind(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids):
        out, _ = self.rnn(self.tok(ids))
        return self.head(out[:, -1])


class _BatchStatsCNN(nn.Module):
    def __init__(self, c1: int, c2: int, side: int, classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1, track_running_stats=False)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2, track_running_stats=False)
        self.fc = nn.Linear(c2 * (side // 4) ** 2, classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


class _TiedLM(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.tok.weight  # tied

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.tok(ids))).mean(1))


class BenchTask(Task):
    """A seeded model and random data: `rows` examples of `shape` (token ids below `vocab` when set)."""

    example_schema = _Example
    label_kind = "class"

    def __init__(self, make: Callable[[], nn.Module], shape: tuple[int, ...], classes: int, rows: int,
                 vocab: int = 0, seed: int = 0):
        self.make, self.shape, self.classes, self.rows, self.vocab, self.seed = make, shape, classes, rows, vocab, seed

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return self.make().float()

    def training_set(self) -> ExampleSet:
        g = torch.Generator().manual_seed(self.seed + 1)
        if self.vocab:
            x = torch.randint(0, self.vocab, (self.rows, *self.shape), generator=g)
        else:
            x = torch.randn(self.rows, *self.shape, generator=g)
        y = torch.randint(0, self.classes, (self.rows,), generator=g)
        return ExampleSet(x, y)


@dataclass
class Spec:
    name: str
    what: str
    task: BenchTask


def specs(quick: bool) -> dict[str, Spec]:
    V, T, B = (500, 16, 16) if quick else (5000, 64, 64)
    mlp_batch = 64 if quick else 256
    D, H, F = (64, 4, 128) if quick else (128, 4, 256)
    rnn_dim, rnn_hidden = (32, 64) if quick else (64, 128)
    side = 28
    out = [
        Spec("mlp", f"MLP 784-512-256-10, batch {mlp_batch}",
             BenchTask(lambda: nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                                             nn.Linear(256, 10)), (784,), 10, mlp_batch)),
        Spec("transformer", f"emb {V}x{D} + pos [1,{T}] + 2 enc. layers (d {D}, ff {F}), batch_first, T {T}, batch {B}",
             BenchTask(lambda: _Transformer(V, D, T, 2, H, F, 10, True), (T,), 10, B, vocab=V)),
        Spec("transformer_sf", f"the same, batch_first=False (seq-first), T {T}, batch {B}",
             BenchTask(lambda: _Transformer(V, D, T, 2, H, F, 10, False), (T,), 10, B, vocab=V)),
        Spec("lstm", f"emb {V}x{rnn_dim} + LSTM({rnn_dim}, {rnn_hidden}) + head, T {T}, batch {B}",
             BenchTask(lambda: _Recurrent(nn.LSTM, V, rnn_dim, rnn_hidden, 10), (T,), 10, B, vocab=V)),
        Spec("gru", f"emb {V}x{rnn_dim} + GRU({rnn_dim}, {rnn_hidden}) + head, T {T}, batch {B}",
             BenchTask(lambda: _Recurrent(nn.GRU, V, rnn_dim, rnn_hidden, 10), (T,), 10, B, vocab=V)),
        Spec("cnn_bn", f"conv 1-16-32 3x3 + BatchNorm2d (batch stats) + linear, 28x28, batch {B}",
             BenchTask(lambda: _BatchStatsCNN(16, 32, side, 10), (1, side, side), 10, B)),
        Spec("tied_lm", f"emb {V}x{D} tied to the {V}-way head + Linear {D}x{D}, T {T}, batch {B}",
             BenchTask(lambda: _TiedLM(V, D), (T,), V, B, vocab=V)),
    ]
    return {s.name: s for s in out}


# -- measurement -------------------------------------------------------------------------------------

def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def per_example(capture, plan, fn, inputs, labels):
    """Run a route on the batch, or one example at a time when the plan says examples mix."""
    if not plan.per_example:
        return fn(inputs, labels)
    for b in range(batch_size_of(inputs)):
        fn(take_rows(inputs, slice(b, b + 1)), labels[b:b + 1])


def bench_model(spec: Spec, workdir: Path, reps: int, dim: int, min_seconds: float) -> dict:
    task = spec.task
    examples = task.training_set()
    torch.manual_seed(123)
    path = save_checkpoint(workdir / f"{spec.name}.pt", task.build_model(), lr=0.1)
    checkpoint = Checkpoint(path, 0.1)
    t0 = time.perf_counter()
    plan = plan_embedding(task, [checkpoint], None, "sketch", dim, 0, examples.batch(0, 3))
    plan_seconds = time.perf_counter() - t0
    capture_plan = plan.capture
    embedder = CheckpointEmbedder(task, checkpoint, 0, plan)
    capture = embedder.capture
    inputs, labels = embedder.prepare(*examples.batch(0, len(examples)))
    B = batch_size_of(inputs)

    plain_model = load_model(task, checkpoint, "cpu", torch.float32)
    for p in plain_model.parameters():
        p.requires_grad_(True)
    parameters = sum(p.numel() for p in plain_model.parameters())

    def plain():
        for p in plain_model.parameters():
            p.grad = None
        task.loss(task.forward(plain_model, inputs), labels).sum().backward()

    methods: dict[str, Callable[[], object]] = {
        "plain": plain,
        "capture": lambda: embedder.grads(inputs, labels),
        "embed": lambda: embedder.embed(inputs, labels),
    }
    used = [r for r in ROUTES if capture.by_route[r]]
    if len(used) > 1 or capture_plan.per_example:
        routes = {"hook": capture.hook_route, "vmap": capture.vmap_route, "loop": capture.loop_route}
        for r in used:
            blocks = capture.by_route[r]
            methods[f"route:{r}"] = (lambda r=r, blocks=blocks: per_example(
                capture, capture_plan, lambda x, y: routes[r](blocks, x, y), inputs, labels))
        if capture.by_route["vmap"]:  # the alternative calibration did not take: the same blocks by the loop
            blocks = capture.by_route["vmap"]
            methods["vmap blocks by loop"] = lambda: per_example(
                capture, capture_plan, lambda x, y: capture.loop_route(blocks, x, y), inputs, labels)
    methods["check"] = lambda: self_check(task, [checkpoint], plan, examples, embedders={0: embedder})

    inner = {}
    for name, fn in methods.items():  # warm-up (first calls allocate, load kernels), then size the inner loop
        fn()
        inner[name] = max(1, min(MAX_INNER, round(min_seconds / max(timed(fn), 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in methods}
    names = list(methods)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            fn = methods[name]
            times[name].append(timed(lambda: [fn() for _ in range(inner[name])]) / inner[name])
    med = {k: statistics.median(v) for k, v in times.items()}
    ms = {k: 1000 * v / B for k, v in med.items() if k != "check"}
    counts = {r: len(capture.by_route[r]) for r in ROUTES}
    build_seconds = BUILD_EXAMPLES * med["embed"] / B
    report = self_check(task, [checkpoint], plan, examples, embedders={0: embedder})
    result = {
        "model": spec.name, "what": spec.what, "batch": B, "parameters": parameters,
        "blocks": len(plan.blocks), "routes": counts, "per_example": capture_plan.per_example,
        "mixing": capture_plan.mixing,
        "block_routes": {b.name: {"kind": b.kind, "shape": [b.m, b.n], "route": capture_plan.routes[b.name],
                                  "reason": capture_plan.reasons.get(b.name)} for b in plan.blocks},
        "plan_seconds": plan_seconds,
        "seconds": times, "calls_per_timing": inner, "median_seconds": med, "ms_per_example": ms,
        # paired: each repetition's time over the same repetition's plain time, then the median / spread
        "ratio": {k: statistics.median(t / p for t, p in zip(times[k], times["plain"])) for k in ms},
        "ratio_range": {k: [min(t / p for t, p in zip(times[k], times["plain"])),
                            max(t / p for t, p in zip(times[k], times["plain"]))] for k in ms},
        "ratio_of_medians": {k: v / ms["plain"] for k, v in ms.items()},
        "self_check_seconds": med["check"], "self_check_rows": report.rows,
        "self_check_max_error": max(b.error for b in report.blocks), "self_check_ok": report.ok,
        "build_seconds_estimate": build_seconds, "self_check_share": med["check"] / build_seconds,
    }
    return result


def bench_digits(workdir: Path, reps: int) -> dict:
    from indexer.config import load_config
    from indexer.demo.digits import train_digits
    from indexer.build.pipeline import build_index

    t0 = time.perf_counter()
    config = train_digits(workdir / "digits", epochs=5, checkpoints=5)
    train_seconds = time.perf_counter() - t0
    runs = []
    for rep in range(reps):
        out = workdir / f"digits-index-{rep}"
        build_index(load_config(config), out)
        manifest = json.loads((out / "manifest.json").read_text())
        check = manifest["build"].get("self_check_seconds")  # older manifests: capture.self_check.seconds
        if check is None:
            check = manifest["capture"]["self_check"]["seconds"]
        runs.append({"self_check_seconds": check,
                     "build_seconds": manifest["build"]["seconds"],
                     "embed_seconds": manifest["build"]["embed_seconds"],
                     "routes": [b["route"] for b in manifest["capture"]["blocks"]],
                     "count": manifest["count"], "checkpoints": len(manifest["checkpoints"])})
    check = statistics.median(r["self_check_seconds"] for r in runs)
    build = statistics.median(r["build_seconds"] for r in runs)
    return {"train_seconds": train_seconds, "runs": runs, "self_check_seconds": check, "build_seconds": build,
            "embed_seconds": statistics.median(r["embed_seconds"] for r in runs),
            "self_check_share": check / build, "count": runs[0]["count"], "checkpoints": runs[0]["checkpoints"],
            "routes": runs[0]["routes"]}


# -- report ------------------------------------------------------------------------------------------

def route_counts(r: dict) -> str:
    parts = [f"{n} {k}" for k, n in r["routes"].items() if n]
    return ", ".join(parts) + (", per example" if r["per_example"] else "")


def markdown(results: list[dict], digits: dict | None) -> str:
    def spread(r, key):
        lo, hi = r["ratio_range"][key]
        return f"{lo:.2f}–{hi:.2f}"

    lines = ["| model | routes (blocks) | capture × plain (range) | capture + projection × plain (range) | "
             "plain ms/ex | capture ms/ex | capture + projection ms/ex |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in results:
        ms, ratio = r["ms_per_example"], r["ratio"]
        lines.append(f"| {r['model']} | {route_counts(r)} | **{ratio['capture']:.2f}** ({spread(r, 'capture')}) | "
                     f"**{ratio['embed']:.2f}** ({spread(r, 'embed')}) | {ms['plain']:.3f} | {ms['capture']:.3f} | "
                     f"{ms['embed']:.3f} |")
    split = [r for r in results if any(k.startswith("route:") for k in r["ms_per_example"])]
    if split:
        lines += ["", "| model | route: blocks | route alone × plain (range) | route alone ms/ex |",
                  "|---|---|---|---:|"]
        for r in split:
            for route in ROUTES:
                key = f"route:{route}"
                if key in r["ms_per_example"]:
                    lines.append(f"| {r['model']} | {route}: {r['routes'][route]} | {r['ratio'][key]:.2f} "
                                 f"({spread(r, key)}) | {r['ms_per_example'][key]:.3f} |")
            key = "vmap blocks by loop"
            if key in r["ms_per_example"]:
                lines.append(f"| {r['model']} | (the {r['routes']['vmap']} vmap blocks by `loop_route` instead) | "
                             f"{r['ratio'][key]:.2f} ({spread(r, key)}) | {r['ms_per_example'][key]:.3f} |")
    lines += ["", f"| model | self-check s | {BUILD_EXAMPLES:,}-example build at the embed rate, s | share |",
              "|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['self_check_seconds']:.3f} | {r['build_seconds_estimate']:.1f} | "
                     f"{100 * r['self_check_share']:.2f}% |")
    if digits is not None:
        lines.append(f"| digits demo, measured (`build_index`, {digits['count']:,} ex., {digits['checkpoints']} "
                     f"ckpts) | {digits['self_check_seconds']:.3f} | {digits['build_seconds']:.2f} (whole build) | "
                     f"{100 * digits['self_check_share']:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repetition (< 1 min)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per measurement (default 7; quick 1)")
    parser.add_argument("--models", default=None, help="comma-separated subset of: " + ", ".join(specs(False)))
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="repeat a fast call within one timing to last about this long (default 0.5; quick 0.05)")
    parser.add_argument("--dim", type=int, default=1024, help="sketch projection dim")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--skip-digits", action="store_true", help="skip the digits demo build")
    parser.add_argument("--json", default=None, help="write every figure here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = args.reps or (1 if args.quick else 7)
    if args.min_seconds is None:
        args.min_seconds = 0.05 if args.quick else 0.5
    available = specs(args.quick)
    chosen = list(available) if not args.models else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in available]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {list(available)}")
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "quick": args.quick, "reps": reps, "dim": args.dim,
            "min_seconds": args.min_seconds,
            "load_average_start": load_average()}
    log(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), reps {reps}, "
        f"load {info['load_average_start']}")
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-routes-") as tmp:
        work = Path(tmp)
        for name in chosen:
            t0 = time.perf_counter()
            results.append(bench_model(available[name], work, reps, args.dim, args.min_seconds))
            r = results[-1]
            log(f"{name}: {route_counts(r)}; plain {r['ms_per_example']['plain']:.3f} ms/ex, capture "
                f"x{r['ratio']['capture']:.2f}, embed x{r['ratio']['embed']:.2f} ({time.perf_counter() - t0:.0f}s)")
        digits = None
        if not args.skip_digits:
            digits = bench_digits(work, 1 if args.quick else 3)
            log(f"digits: self-check {digits['self_check_seconds']:.3f}s of a {digits['build_seconds']:.2f}s build")
    info["load_average_end"] = load_average()
    info["seconds"] = time.perf_counter() - started
    table = markdown(results, digits)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "models": results, "digits": digits}, indent=2))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
