"""`tracin` command line: index, init, check, inspect, demo, serve.

Errors in the user's input print one line naming the problem and exit with status 2 (no traceback).
Only the standard library is imported before a command runs: `tracin --version` and `tracin --help`
never import torch (tests/test_demo_cli.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


class UsageError(Exception):
    pass


def check_output_dir(out: str | Path, flag: str = "--out", work_dir: bool = False) -> None:
    """Refuse in one line (UsageError) an output that cannot be written: an ancestor that is a file, a
    directory that cannot be created, a read-only directory. Creates the missing parents of `out` (and
    `out` itself when it is a `work_dir` the command writes into)."""
    out = Path(out).absolute()
    parent = out if work_dir else out.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists() or p.is_symlink()), None)
    if existing is not None and not existing.is_dir():
        raise UsageError(f"{flag} {out}: {existing} is a file, not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag} {out}: cannot create {exc.filename or parent}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {out}: {parent} is not writable (read-only file system or no write permission)")


def _set_threads(threads: int | None) -> None:
    """torch intra-op threads of the build: `--threads N`, else TRACIN_INDEX_THREADS, else the CPUs this process may
    run on (os.sched_getaffinity: a container's or taskset's share, not the machine's)."""
    import os

    import torch

    if threads is None:
        threads = int(os.environ.get("TRACIN_INDEX_THREADS") or 0) or len(os.sched_getaffinity(0))
    if threads < 1:
        raise UsageError(f"--threads: expected a positive number of threads, got {threads}")
    torch.set_num_threads(threads)


def _cmd_index(args: argparse.Namespace) -> int:
    from indexer.config import load_config
    from indexer.build.pipeline import build_index, build_shard, merge_shards

    if args.merge is not None and args.merge < 1:
        raise UsageError(f"--merge N: N is the number of shards (>= 1), got {args.merge}")
    if args.shard and args.merge:
        raise UsageError("--shard and --merge are separate steps")
    if args.ray is not None and (args.shard or args.merge):
        raise UsageError("--ray runs every shard and the merge itself: leave out --shard / --merge")
    if args.shards is not None and args.ray is None:
        raise UsageError("--shards goes with --ray (one job per shard: --shard I/N, then --merge N)")
    if args.keep_shards and not args.merge:
        raise UsageError("--keep-shards goes with --merge N")
    check_output_dir(args.out)
    updating = args.update or args.remove_ids is not None
    if updating and args.force:
        raise UsageError("--force rebuilds the index and --update / --remove-ids extend it: choose one")
    if args.keep_versions is not None and not updating:
        raise UsageError("--keep-versions goes with --update or --remove-ids")
    if args.keep_versions is not None and args.keep_versions < 1:
        raise UsageError(f"--keep-versions K: K is how many versions to keep (>= 1), got {args.keep_versions}")
    if args.remove_ids is not None and args.shard:
        raise UsageError("--remove-ids goes with the update itself or its --merge, not with a --shard")
    if args.remove_ids is not None and not args.update and (args.merge or args.ray is not None):
        raise UsageError("--remove-ids alone embeds nothing: leave out --merge / --ray (or add --update)")
    if updating and not args.update and args.config is None and args.trainer_dir is None:
        return _cmd_update(args, None)  # removal only: no config is read
    if args.ray is not None:
        from indexer.build.distributed import _import_ray

        _import_ray()  # before any work: "pip install 'tracin-service[ray]'" in one line
    _set_threads(args.threads)
    if args.trainer_dir is not None:
        config_path = _trainer_config(args)
        if config_path is None:  # --print-config
            return 0
    else:
        if args.config is None:
            raise UsageError("give a CONFIG file, or --trainer-dir OUTPUT_DIR --data FILE for a Hugging Face Trainer run")
        stray = [f"--{name.replace('_', '-')}" for name in TRAINER_OPTIONS if getattr(args, name) is not None]
        if stray or args.print_config:
            raise UsageError(f"{', '.join(stray) or '--print-config'} goes with --trainer-dir")
        config_path = args.config
    config = load_config(config_path)
    if args.batch_size:
        from dataclasses import replace

        config = replace(config, index=replace(config.index, batch_size=args.batch_size))
    if updating:
        return _cmd_update(args, config if args.update else None)
    if args.ray is not None:
        from indexer.build.distributed import build_with_ray

        result = build_with_ray(config, args.out, shards=args.shards, overwrite=args.force,
                                address=None if args.ray == LOCAL_RAY else args.ray,
                                log=None if args.quiet else _say)
        print(f"indexed {result.count} examples into {result.path} (dim {result.dim}) with {len(result.shards)} "
              f"Ray shard tasks in {result.seconds:.1f}s")
        return 0
    if args.shard:
        shard, _, shards = args.shard.partition("/")
        if not (shard.isdigit() and shards.isdigit()):
            raise UsageError(f"--shard: expected I/N such as 0/8, got {args.shard!r}")
        path = build_shard(config, args.out, int(shard), int(shards), show_progress=not args.quiet)
        print(f"shard {shard}/{shards} written to {path}")
        return 0
    if args.merge is not None:
        result = merge_shards(config, args.out, args.merge, overwrite=args.force, keep_shards=args.keep_shards)
    else:
        result = build_index(config, args.out, overwrite=args.force, show_progress=not args.quiet)
    print(f"indexed {result.count} examples into {result.path} (dim {result.dim}) in {result.seconds:.1f}s")
    return 0


def _cmd_update(args: argparse.Namespace, config) -> int:
    """tracin index [CONFIG] --out DIR --update / --remove-ids FILE: a new version of DIR (`indexer.build.update`)."""
    from indexer.build.update import merge_update, update_index, update_shard

    out = Path(args.out)
    if args.shard:
        shard, _, shards = args.shard.partition("/")
        if not (shard.isdigit() and shards.isdigit()):
            raise UsageError(f"--shard: expected I/N such as 0/8, got {args.shard!r}")
        path = update_shard(config, out, int(shard), int(shards), show_progress=not args.quiet)
        print(f"update shard {shard}/{shards} written to {path}")
        return 0
    if args.merge is not None:
        result = merge_update(config, out, args.merge, keep_shards=args.keep_shards, remove_ids=args.remove_ids,
                              keep_versions=args.keep_versions)
    elif args.ray is not None:
        from indexer.build.distributed import update_with_ray

        result = update_with_ray(config, out, shards=args.shards, address=None if args.ray == LOCAL_RAY else args.ray,
                                 remove_ids=args.remove_ids, keep_versions=args.keep_versions,
                                 log=None if args.quiet else _say)
    else:
        result = update_index(config, out, remove_ids=args.remove_ids, keep_versions=args.keep_versions,
                              show_progress=not args.quiet)
    print(result.describe(out.resolve()))
    return 0


LOCAL_RAY = "local"  # `--ray` without an address: a local Ray cluster on this machine
#: options of `tracin index --trainer-dir` (besides --print-config)
TRAINER_OPTIONS = ("data", "text_column", "text_pair_column", "label_column", "tokenizer", "max_length", "task")


def _trainer_config(args: argparse.Namespace) -> Path | None:
    """Write the config of `tracin index --trainer-dir` beside the index (OUT.toml) and return its path; with
    --print-config print it and return None. The Trainer's checkpoint-N/ folders are taken in step order; the
    model's config (and its tokenizer, else the one saved in OUTPUT_DIR) come from the last one."""
    from indexer.tasks.templates import TRAINER_HEADER, trainer_config
    from indexer.tasks.huggingface import TOKENIZER_FILES

    if args.config is not None:
        raise UsageError("give either a CONFIG file or --trainer-dir, not both")
    if args.data is None:
        raise UsageError("--trainer-dir needs --data FILE (the training rows: .csv .tsv .jsonl .json .parquet or a "
                         "datasets folder)")
    root = Path(args.trainer_dir).expanduser().resolve()
    if not root.is_dir():
        raise UsageError(f"--trainer-dir: {root} is not a folder (a Trainer's output_dir)")
    steps = sorted((int(p.name.split("-", 1)[1]), p) for p in root.iterdir()
                   if p.is_dir() and p.name.startswith("checkpoint-") and p.name.split("-", 1)[1].isdigit())
    if not steps:
        raise UsageError(f"--trainer-dir: {root} has no checkpoint-N/ folders (train with save_strategy \"steps\" "
                         "or \"epoch\" and keep them: save_total_limit None)")
    folders = [p for _, p in steps]
    model = folders[-1]
    tokenizer = args.tokenizer
    if tokenizer is None and not any((model / n).is_file() for n in TOKENIZER_FILES) \
            and any((root / n).is_file() for n in TOKENIZER_FILES):
        tokenizer = str(root)  # saved by trainer.save_model() / tokenizer.save_pretrained(output_dir)
    task = args.task or "huggingface.sequence_classification"
    task_args = {"model": str(model), "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None,
                 "data": str(Path(args.data).expanduser().resolve()), "text_column": args.text_column or "text"}
    if task == "huggingface.sequence_classification":
        task_args["text_pair_column"] = args.text_pair_column
        task_args["label_column"] = args.label_column or "label"
    elif args.text_pair_column is not None or args.label_column is not None:
        raise UsageError(f"--text-pair-column / --label-column do not apply to {task}")
    task_args["max_length"] = args.max_length
    out = Path(args.out).expanduser()
    import shlex

    command = "tracin " + shlex.join(a for a in args.argv if a != "--print-config")
    text = trainer_config(task, task_args, folders, command, out.resolve())
    if args.print_config:
        print(text, end="")
        return None
    path = out.parent / f"{out.name}.toml"
    if path.exists() and not path.read_text(errors="replace").startswith(TRAINER_HEADER) and not args.force:
        raise UsageError(f"{path} exists and was not written by --trainer-dir; move it, or --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    if not args.quiet:
        print(f"config written to {path} (repeat with: tracin index {path} --out {out})", file=sys.stderr)
    return path


def _cmd_init(args: argparse.Namespace) -> int:
    """Print (or write) the commented config of a built-in task."""
    from indexer.tasks.templates import TEMPLATES

    if args.task not in TEMPLATES:
        raise UsageError(f"unknown built-in task {args.task!r}; built-in tasks: {', '.join(TEMPLATES)}")
    text = TEMPLATES[args.task]
    if args.out is None:
        print(text, end="")
        return 0
    path = Path(args.out)
    if path.exists() and not args.force:
        raise UsageError(f"{path} exists (use --force to replace it)")
    path.write_text(text)
    print(f"wrote {path}: edit its paths, then: tracin index {path} --out index", file=sys.stderr)
    return 0


def _say(line: str) -> None:
    print(f"tracin index: {line}", file=sys.stderr, flush=True)


def _cmd_check(args: argparse.Namespace) -> int:
    """Calibrate the capture, run the self-check and the query path, print every traced block."""
    from indexer.config import load_config
    from indexer.build.pipeline import prepare

    config = load_config(args.config)
    ready = prepare(config, strict=False)
    plan, report = ready.plan, ready.check
    print(f"task       {config.task.ref}  ({len(ready.examples)} training examples, labels: {ready.task.kind})")
    print(f"capture    compute dtype {plan.compute_dtype}"
          + ("; one example at a time: module " + repr(plan.capture.mixing) + " mixes the examples of a batch"
             if plan.capture.per_example else "; batched"))
    print(f"self-check rows {report.rows} at checkpoints {report.checkpoints}, threshold {report.threshold:.0e}, "
          f"{report.seconds:.1f}s")
    print(report.table())
    reasons = [(b.name, plan.capture.reasons[b.name]) for b in plan.blocks if plan.capture.reasons.get(b.name)]
    if reasons:
        print("why not the hook route:")
        for name, why in reasons:
            print(f"  {name}: {why}")
    if not report.ok:
        raise UsageError(report.refusal())
    print("ok: every traced block agrees with torch.autograd.grad per example; the query path works")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from indexer.store.directory import IndexDirectory

    index = IndexDirectory.open(args.dir, verify=not args.no_verify)
    m = index.manifest
    sizes = {p.name: p.stat().st_size for p in sorted(Path(args.dir).rglob("*")) if p.is_file()}
    if args.json:
        print(json.dumps({"manifest": m, "sizes": sizes}, indent=2))
        return 0
    print(f"index      {index.path}")
    print(f"task       {m['task']['ref']} {m['task']['args'] or ''}")
    print(f"examples   {m['count']}   embedding dim {m['embedding_dim']}")
    proj = m["projection"]
    if proj["kind"] == "exact":  # no projection: `dim` of the config is unused, each layer keeps its gradient
        per_checkpoint = proj.get("dim_per_checkpoint") or sum(int(layer["dim"]) for layer in m["layers"])
        print(f"projection exact (none: whole gradients, {per_checkpoint} numbers per checkpoint) "
              f"fingerprint={proj['fingerprint'][:16]}")
    else:
        print(f"projection {proj['kind']} dim={proj['dim']} seed={proj['seed']} "
              f"fingerprint={proj['fingerprint'][:16]}")
    f = m["faiss"]
    extra = f"  recall@10 {f.get('recall_at_10')}" if f["approximate"] else ""
    print(f"faiss      {f['factory']} ({'approximate' if f['approximate'] else 'exact'}){extra}")
    opt = m.get("optimizer") or {"formula": "sgd", "why": "an index built before optimizer-aware TracIn"}
    print(f"formula    {opt['formula']}: {opt['why']}"
          + (f" ({opt['bounded']} preconditioner coordinates bounded)" if opt.get("bounded") else ""))
    for c in m["checkpoints"]:
        step = c.get("step") or {}
        groups = step.get("groups") or []
        lrs = "  groups " + ", ".join(f"{g['lr']:g} ({len(g['params'])} tensors)" for g in groups) \
            if len(groups) > 1 else ""
        print(f"checkpoint {c['file']}  {step.get('formula', 'sgd')}  lr={c['lr']:g}{lrs}  sha256={c['sha256'][:12]}")
    for layer in m["layers"]:
        print(f"layer      {layer['name']:<24} {layer['kind']:<9} {layer['shape'][0]}x{layer['shape'][1]}"
              f" -> {layer['projection']} {layer['dim']}")
    total = sum(sizes.values())
    print(f"size       {total / 1e6:.1f} MB  ({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in sizes.items() if v > 1e5)})")
    order = index.self_influence.argsort()[::-1][: args.top]
    names = m["task"].get("class_names") or []

    def label_text(label) -> str:  # "3 (Dress)" where the manifest names the classes
        name = names[label] if isinstance(label, int) and 0 <= label < len(names) else None
        return f"{label} ({name})" if name is not None and str(name) != str(label) else str(label)

    labels = [label_text(index.examples[row]["label"]) for row in order]
    width = max([6, *map(len, labels)])
    print(f"top {len(order)} self-influence:")
    for rank, (row, label) in enumerate(zip(order, labels), 1):
        ex = index.examples[row]
        flags = {k: v for k, v in ex["display"].items() if isinstance(v, (bool, int, float)) and k != "row"}
        print(f"  {rank:>3}. {ex['id']:<16} label={label:<{width}} score={index.self_influence[row]:.4g} {flags or ''}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from indexer.config import load_config
    from indexer.demo.digits import train_digits
    from indexer.build.pipeline import build_index

    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    out = Path(args.out)
    index_dir = out / "index"
    check_output_dir(out, work_dir=True)
    t0 = time.perf_counter()
    if index_dir.exists() and not args.force:
        print(f"demo index already at {index_dir} (use --force to rebuild)")
    else:
        if not args.quiet:
            print(f"training the digits MLP for {args.epochs} epochs ...", flush=True)
        config_path = train_digits(out / "run", epochs=args.epochs, progress=None if args.quiet else _print_line)
        t1 = time.perf_counter()
        result = build_index(load_config(config_path), index_dir, overwrite=True, show_progress=not args.quiet)
        print(f"trained digits MLP in {t1 - t0:.1f}s; indexed {result.count} examples in {result.seconds:.1f}s "
              f"-> {index_dir}")
    if args.no_serve:
        return 0
    return _serve(index_dir, args.host, args.port)


def _print_line(line: str) -> None:
    print(line, flush=True)


def _serve(index_dir: Path, host: str, port: int) -> int:
    try:
        from service.server import serve
    except ImportError as exc:  # the service package is part of this distribution
        raise UsageError(f"the service is not available: {exc}") from exc
    return serve(index_dir, host=host, port=port)


def _cmd_serve(args: argparse.Namespace) -> int:
    return _serve(Path(args.dir), args.host, args.port)


def build_parser() -> argparse.ArgumentParser:
    from indexer import __version__

    parser = argparse.ArgumentParser(prog="tracin", description="TracIn influence indexing and serving")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter  # "(default: ...)" after every option with a help text

    p = sub.add_parser("index", help="build an index directory from a TOML config (or a Hugging Face Trainer run)",
                       formatter_class=defaults)
    p.add_argument("config", nargs="?", help="TOML config (task, checkpoints, layers, projection, index)")
    p.add_argument("--out", required=True, help="index directory to write")
    g = p.add_argument_group("a Hugging Face Trainer run, without a config (writes OUT.toml beside the index)")
    g.add_argument("--trainer-dir", metavar="OUTPUT_DIR", help="the Trainer's output_dir (its checkpoint-N/ folders)")
    g.add_argument("--data", metavar="FILE", help="the training rows in training order: .csv .tsv .jsonl .json "
                                                  ".parquet or a datasets folder saved with save_to_disk")
    g.add_argument("--text-column", help="the text column (default: text)")
    g.add_argument("--text-pair-column", help="the second text of sentence pairs")
    g.add_argument("--label-column", help="the label column: class ids or label2id names (default: label)")
    g.add_argument("--tokenizer", metavar="DIR", help="the tokenizer's folder when the checkpoints lack it")
    g.add_argument("--max-length", type=int, help="tokens per text, as in training (default: the tokenizer's, "
                                                  "at most 512)")
    g.add_argument("--task", choices=("huggingface.sequence_classification", "huggingface.causal_lm"),
                   help="the model's kind (default: huggingface.sequence_classification)")
    g.add_argument("--print-config", action="store_true", help="print the config and stop (writes nothing)")
    p.add_argument("--force", action="store_true", help="replace an existing index directory")
    u = p.add_argument_group("keeping an index current (a new version of --out, switched atomically; a running "
                             "tracin serve takes it on SIGHUP or POST /admin/reload)")
    u.add_argument("--update", action="store_true",
                   help="embed only what the config adds to the index in --out: new training rows (after the indexed "
                        "ones) at every checkpoint, new checkpoints (after the indexed ones) for every row; anything "
                        "else changed is refused (rebuild with --force)")
    u.add_argument("--remove-ids", metavar="FILE",
                   help="mark the training examples whose ids FILE lists (one per line) removed: kept out of every "
                        "answer without re-embedding (CONFIG is not needed without --update)")
    u.add_argument("--keep-versions", metavar="K", type=int, default=None,
                   help="after the switch, delete the versions under --out/versions older than the K newest "
                        "(default: keep every version)")
    p.add_argument("--batch-size", type=int, default=None, help="override index.batch_size of the config")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the build (default: TRACIN_INDEX_THREADS, else the CPUs it may run on)")
    p.add_argument("--shard", metavar="I/N", help="embed only shard I of N (e.g. $SLURM_ARRAY_TASK_ID/8)")
    p.add_argument("--merge", metavar="N", type=int, help="build the index from N finished shards")
    p.add_argument("--keep-shards", action="store_true",
                   help="with --merge: keep <out>.shards/ (merge again, e.g. under another index.factory, "
                        "without embedding again)")
    p.add_argument("--ray", metavar="ADDRESS", nargs="?", const=LOCAL_RAY, default=None,
                   help="run one Ray task per shard, then merge: ADDRESS of a running cluster (auto, "
                        "ray://host:10001), or none for a local cluster; needs tracin-service[ray]")
    p.add_argument("--shards", metavar="N", type=int, default=None,
                   help="with --ray: number of shard tasks (default: the cluster's GPUs, else its CPUs)")
    p.set_defaults(fn=_cmd_index)

    p = sub.add_parser("init", help="print a commented config for a built-in task", formatter_class=defaults,
                       description="Print the commented config of a built-in task (a model trained with a standard "
                                   "stack, indexed without writing Python): edit its paths, then tracin index it.")
    p.add_argument("task", help="huggingface.sequence_classification, huggingface.causal_lm, "
                                "torchvision.image_classification or tabular.mlp")
    p.add_argument("--out", help="write it to this file instead of printing it")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(fn=_cmd_init)

    p = sub.add_parser("check", help="check the capture of a config's model against per-example autograd",
                       formatter_class=defaults)
    p.add_argument("config", help="TOML config (task, checkpoints, layers, projection, index)")
    p.set_defaults(fn=_cmd_check)

    p = sub.add_parser("inspect", help="summarise an index directory", formatter_class=defaults)
    p.add_argument("dir", help="index directory")
    p.add_argument("--top", type=int, default=10, help="how many top self-influence examples to list")
    p.add_argument("--json", action="store_true", help="print the manifest and file sizes as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 verification")
    p.set_defaults(fn=_cmd_inspect)

    p = sub.add_parser("demo", help="train the embedded digits demo, index it and serve it", formatter_class=defaults,
                       description="Train a small MLP on scikit-learn's digits (10% of the training labels "
                                   "flipped), save checkpoints with their learning rates, index them and serve "
                                   "the index with its dashboard.")
    p.add_argument("--out", default=".tracin/demo", help="work directory (checkpoints, config, index)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (5 checkpoints, evenly spaced)")
    p.add_argument("--force", action="store_true", help="retrain and rebuild even if an index exists")
    p.add_argument("--no-serve", action="store_true", help="only build the index")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (0: any free port)")
    p.add_argument("--quiet", action="store_true", help="no training progress lines or progress bar")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("serve", help="serve an index directory over HTTP", formatter_class=defaults,
                       description="Verify an index directory, then serve the REST API, the dashboard (/) and "
                                   "the API docs (/docs). Further settings come from TRACIN_* environment "
                                   "variables (docs/service.md).")
    p.add_argument("dir", help="index directory (written by tracin index or tracin demo)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (0: any free port)")
    p.set_defaults(fn=_cmd_serve)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input (one line, exit 2), imported only once a command failed."""
    from indexer.checkpoints import CheckpointError
    from indexer.config import ConfigError
    from indexer.store.directory import IndexBuildError, IndexDirectoryError
    from indexer.store.manifest import ManifestError

    return ConfigError, CheckpointError, IndexDirectoryError, IndexBuildError, ManifestError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # the command line, recorded in written configs
    try:
        return int(args.fn(args) or 0)
    except (FileExistsError, UsageError) as exc:
        print(f"tracin {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, _user_errors()):
            print(f"tracin {args.command}: error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError) and exc.strerror:  # the file system said no (permissions, read-only, ...)
            where = f": {exc.filename}" if exc.filename else ""
            print(f"tracin {args.command}: error: {exc.strerror}{where}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
