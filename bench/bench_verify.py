"""Cost of the service's load-time consistency check (`indexer.store.consistency`, TRACIN_VERIFY_ROWS).

For each index directory: the service is loaded once with the check off (TRACIN_VERIFY_ROWS=0, warm-up off),
then the check's two parts are timed on that engine, `--repeat` times each (median): the examples table's
ids and labels against the task's training set (every row), and the sampled rows re-embedded at every
checkpoint and compared with the stored vectors, self-influence and label review.

    .venv/bin/python bench/bench_verify.py DIR [DIR ...] [--rows 12] [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(path: Path, rows: int, repeat: int) -> dict:
    from indexer.store.consistency import check_examples_table, check_rows, sample_rows
    from service.loading import load_engine
    from service.settings import Settings

    t0 = time.perf_counter()
    engine = load_engine(Settings(index_dir=path, verify_rows=0, warmup=False, access_log=False))
    load = time.perf_counter() - t0
    examples = engine.task.training_set()
    table, embed = [], []
    report = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        check_examples_table(engine.index_dir, engine.task, examples)
        table.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        report = check_rows(engine.index_dir, engine.task, engine.embedder, examples,
                            sample_rows(engine.count, rows))
        embed.append(time.perf_counter() - t0)
    return {"index": str(path), "count": engine.count, "checkpoints": len(engine.embedder.checkpoints),
            "dim": engine.index_dir.manifest["embedding_dim"], "factory": engine.index_dir.manifest["faiss"]["factory"],
            "load_s (check off)": round(load, 3), "examples table s": round(statistics.median(table), 4),
            f"{rows} rows re-embedded s": round(statistics.median(embed), 4), "vectors": report.vectors,
            "notes": report.notes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    for path in args.dirs:
        print(measure(path, args.rows, args.repeat), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
