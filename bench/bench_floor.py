"""`tracin index` against the floor: a plain forward + `loss.sum().backward()` of the same batches.

    .venv/bin/python bench/bench_floor.py                        # fmnist, resnet, bert; 3 interleaved pairs each
    .venv/bin/python bench/bench_floor.py --models resnet --pairs 5
    .venv/bin/python bench/bench_floor.py --quick                # small sizes, 1 pair (a smoke run)

For each model, in one run and interleaved (plain, ours, plain, ours, ...), each a subprocess with ONE
torch thread:
  plain  for every checkpoint: load its weights, then for every batch of the training set (the index's
         batch size) a forward and `loss.sum().backward()` (weight gradients included);
  ours   `tracin index CONFIG --out DIR --force --quiet --threads 1` with the default projection (sketch,
         dim 512), every trainable layer, the Flat index: the whole command (plan, self-check, embedding,
         FAISS, label review, examples table, checkpoint copies).
Reported: medians over pairs of the user+sys CPU-time ratio, the wall ratio and the peak-RSS ratio
(ours / plain; RSS from the child's rusage), the load average around the run, and each traced block's
capture route and its share of the embedding time (an in-process profile of a few batches).

Models: the Fashion-MNIST CNN of indexer/demo/fashion_mnist.py (60k images, 5 checkpoints of a 1-epoch SGD
run; needs Debian's dataset-fashion-mnist), a ResNet-18-style CNN on 512 random 32x32x3 images and a
6-layer BERT-style encoder (hidden 256, 64 tokens) on 1,024 random sequences (bench/floor_tasks.py, two
checkpoints each: random weights, saved with save_checkpoint and an SGD lr).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
WORK = REPO / ".tracin/bench/floor"

PLAIN = r"""
import sys, torch
torch.set_num_threads(1)
from indexer.config import load_config
from indexer.checkpoints import load_checkpoint, load_state_into
config = load_config(sys.argv[1])
task = config.task.build()
examples = task.training_set()
batch = config.index.batch_size
for spec in config.checkpoints:
    model = task.build_model()
    state, _ = load_checkpoint(spec.path, spec.prefix)
    load_state_into(model, state, str(spec.path))
    model.eval()
    for start in range(0, len(examples), batch):
        inputs, labels = examples.batch(start, min(start + batch, len(examples)))
        model.zero_grad(set_to_none=True)
        task.loss(task.forward(model, inputs), labels).sum().backward()
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


#: runs the measured command as ITS child and writes that child's wait4 rusage to the file named by argv[1]: a
#: process's peak RSS (ru_maxrss) starts from its parent's at the fork (Linux keeps the high-water mark across
#: exec), so a command forked straight from this process would report at least this process's own peak (the
#: in-process profiles make it large); forked from this small launcher, it reports its own.
LAUNCHER = r"""
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"user": usage.ru_utime, "sys": usage.ru_stime, "maxrss_kib": usage.ru_maxrss}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(args: list[str]) -> dict:
    """Run a subprocess (through LAUNCHER); its wall time, user+sys CPU seconds and peak RSS (MiB) from wait4's
    rusage of that process alone."""
    import tempfile

    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'bench'}", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TRACIN_INDEX_THREADS="1")
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, report.name, *args], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:4])} failed:\n{proc.stderr.decode(errors='replace')[-2000:]}")
        usage = json.loads(Path(report.name).read_text())
    return {"wall": wall, "cpu": usage["user"] + usage["sys"], "user": usage["user"], "sys": usage["sys"],
            "rss_mib": usage["maxrss_kib"] / 1024}


def prepare(name: str, quick: bool) -> Path:
    """The config of one benchmark model (checkpoints made once, reused)."""
    import torch

    from indexer.checkpoints import save_checkpoint

    directory = WORK / (name + ("-quick" if quick else ""))
    config = directory / "config.toml"
    if config.is_file():
        return config
    directory.mkdir(parents=True, exist_ok=True)
    if name == "fmnist":
        from indexer.demo.fashion_mnist import train_fashion_mnist

        limit = 4000 if quick else None
        train_fashion_mnist(directory, epochs=1, checkpoints=2 if quick else 5, limit=limit)
        produced = directory / "fashion_mnist.toml"
        config.write_text(produced.read_text())
        return config
    from floor_tasks import BertTask, ResNetTask

    task, ref, args = ((ResNetTask(n=128 if quick else 512), "floor_tasks:ResNetTask", {"n": 128 if quick else 512})
                       if name == "resnet" else
                       (BertTask(n=128 if quick else 1024), "floor_tasks:BertTask", {"n": 128 if quick else 1024}))
    lines = [f'task = "{ref}"', "task_args = { " + ", ".join(f"{k} = {v}" for k, v in args.items()) + " }"]
    for i, lr in enumerate((0.1, 0.05)):
        torch.manual_seed(100 + i)
        model = task.build_model()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + 0.05 * torch.randn_like(p))
        path = save_checkpoint(directory / f"ckpt-{i}.pt", model, lr=lr)
        lines += ["[[checkpoints]]", f'path = "{path.name}"']
    lines += ["[index]", "batch_size = 64"]
    config.write_text("\n".join(lines) + "\n")
    return config


def block_shares(config_path: Path, batches: int = 3) -> list[dict]:
    """Each traced block's route and its share of the embedding time of a few batches (one thread, in
    process): the capture of each route, then each block's projection + exact norm."""
    import torch

    from indexer.build.pipeline import prepare as prepare_build
    from indexer.config import load_config
    from indexer.sketch.embedding import CheckpointEmbedder

    torch.set_num_threads(1)
    config = load_config(config_path)
    ready = prepare_build(config)
    plan = ready.plan
    embedder = CheckpointEmbedder(ready.task, ready.checkpoints[0], 0, plan)
    size = config.index.batch_size
    times: dict[str, float] = {}
    capture_time = 0.0
    for b in range(min(batches, (len(ready.examples) + size - 1) // size)):
        inputs, labels = ready.examples.batch(b * size, min((b + 1) * size, len(ready.examples)))
        t0 = time.process_time()
        captured = embedder.grads(inputs, labels)
        capture_time += time.process_time() - t0
        out = torch.zeros(captured.losses.shape[0], plan.dim, dtype=embedder.dtype)
        for projector, grad, scale in zip(embedder.projectors, captured.grads, embedder.scales):
            t0 = time.process_time()
            if isinstance(scale, torch.Tensor):
                projector.embed(grad, out, scale)
            else:
                projector.embed(grad.weighted(scale), out)
            times[projector.block.name] = times.get(projector.block.name, 0.0) + time.process_time() - t0
    total = capture_time + sum(times.values())
    rows = [{"block": "(capture: forward + backward of every route)", "route": "", "share": capture_time / total}]
    for p in plan.projectors[0]:
        grad_route = plan.capture.routes[p.block.name]
        rows.append({"block": p.block.name, "shape": f"{p.block.m}x{p.block.n}", "route": grad_route,
                     "share": times[p.block.name] / total})
    return rows


def bench(name: str, pairs: int, quick: bool) -> dict:
    config = prepare(name, quick)
    out = config.parent / "index"
    plain_cmd = [sys.executable, "-c", PLAIN, str(config)]
    ours_cmd = [sys.executable, "-m", "indexer.cli", "index", str(config), "--out", str(out), "--force", "--quiet",
                "--threads", "1"]
    log(f"{name}: warm-up build")
    run_child(ours_cmd)
    results = []
    for i in range(pairs):
        load = os.getloadavg()[0]
        plain = run_child(plain_cmd)
        ours = run_child(ours_cmd)
        results.append({"plain": plain, "ours": ours, "load": load})
        log(f"{name} pair {i + 1}/{pairs}: cpu {ours['cpu']:.1f}/{plain['cpu']:.1f} s = {ours['cpu'] / plain['cpu']:.2f}x, "
            f"wall {ours['wall'] / plain['wall']:.2f}x, rss {ours['rss_mib']:.0f}/{plain['rss_mib']:.0f} MiB, "
            f"load {load:.2f}")

    def median(key: str) -> float:
        return statistics.median(r["ours"][key] / r["plain"][key] for r in results)

    return {"model": name, "config": str(config.relative_to(REPO)), "pairs": results,
            "cpu_ratio": median("cpu"), "wall_ratio": median("wall"), "rss_ratio": median("rss_mib"),
            "blocks": block_shares(config)}


def markdown(reports: list[dict]) -> str:
    lines = ["| model | CPU (user+sys) ours / plain | wall | peak RSS | plain CPU s | ours CPU s | load |",
             "|---|---|---|---|---|---|---|"]
    for r in reports:
        plain = statistics.median(p["plain"]["cpu"] for p in r["pairs"])
        ours = statistics.median(p["ours"]["cpu"] for p in r["pairs"])
        loads = ", ".join(f"{p['load']:.2f}" for p in r["pairs"])
        lines.append(f"| {r['model']} | **{r['cpu_ratio']:.2f}x** | {r['wall_ratio']:.2f}x | {r['rss_ratio']:.2f}x | "
                     f"{plain:.1f} | {ours:.1f} | {loads} |")
    for r in reports:
        lines += ["", f"{r['model']}: route and share of the embedding time per traced block", "",
                  "| block | shape | route | share |", "|---|---|---|---|"]
        lines += [f"| {b['block']} | {b.get('shape', '')} | {b['route']} | {100 * b['share']:.1f}% |"
                  for b in r["blocks"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="fmnist,resnet,bert")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=str(WORK / "floor.json"))
    args = parser.parse_args(argv)
    pairs = 1 if args.quick else args.pairs
    started = time.time()
    reports = [bench(name, pairs, args.quick) for name in args.models.split(",")]
    text = markdown(reports)
    print(text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"reports": reports, "seconds": time.time() - started,
                                           "uptime": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
