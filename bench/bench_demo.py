"""How long `tracin demo --no-serve` takes (training the digits MLP, then indexing it), and the CLI's start.

    .venv/bin/python bench/bench_demo.py                 # the demo as `make demo` runs it (30 epochs)
    .venv/bin/python bench/bench_demo.py --epochs 1      # a smoke run

This is where the demo's speed is measured: tests assert outcomes only (a busy machine is slow; issue 22
found the former test's "under a minute" failing at 89 s under load, 33 s alone). Also times `tracin
--version` and `tracin --help`, which import nothing heavy (no torch). Prints one line per figure and
writes them to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> tuple[float, str]:
    """(wall seconds, stdout) of `python -m indexer.cli ARGS` from the repository root."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "indexer.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return time.perf_counter() - started, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="runs of --version / --help (the median is shown)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    figures: dict[str, float] = {}
    for flag in ("--version", "--help"):
        times = sorted(run([flag])[0] for _ in range(args.repeats))
        figures[f"tracin {flag} s"] = times[len(times) // 2]
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as out:
        seconds, stdout = run(["demo", "--out", out, "--no-serve", "--quiet", "--epochs", str(args.epochs)])
    figures["tracin demo --no-serve s"] = seconds
    match = re.search(r"trained digits MLP in ([0-9.]+)s; indexed (\d+) examples in ([0-9.]+)s", stdout)
    if match:
        figures["training s"], figures["indexing s"] = float(match.group(1)), float(match.group(3))
    for name, value in figures.items():
        print(f"{name:<28} {value:8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"epochs": args.epochs, "cpus": os.cpu_count(), **figures}, indent=2))


if __name__ == "__main__":
    main()
