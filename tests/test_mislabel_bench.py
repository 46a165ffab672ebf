"""bench/bench_mislabel.py: the ranking arithmetic on toys, and a reduced run on Fashion-MNIST (1500 images,
10% of labels flipped, 4 short epochs) whose table and JSON must be sane and where self-influence and the
default label-review ranking must find the planted label noise far better than random (cleanlab's columns
when cleanlab is installed). The reduced run is skipped when the Debian package
`dataset-fashion-mnist` is not installed."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "bench_mislabel.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_mislabel", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_found_curve_on_toys():
    bench = _bench()
    flipped = np.zeros(100, dtype=bool)
    flipped[[3, 50, 77, 90, 99]] = True
    checked = np.array([0.0, 0.03, 0.05, 0.10, 0.5, 1.0])
    perfect = bench.found_curve(flipped.astype(float) + 0.01 * np.arange(100), flipped, checked)
    assert perfect.tolist() == [0.0, 0.6, 1.0, 1.0, 1.0, 1.0]
    worst = bench.found_curve(-flipped.astype(float), flipped, checked)
    assert worst.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    rng = np.random.default_rng(0)
    big = rng.random(100_000) < 0.1
    noise = bench.found_curve(rng.random(100_000), big, np.array([0.05, 0.1, 0.2, 0.3]))
    assert np.allclose(noise, [0.05, 0.1, 0.2, 0.3], atol=0.01)  # a random ranking finds what it checks
    table = bench.markdown_table({"self_influence": [0.4, 0.6, 0.8, 0.9], "random": [0.05, 0.1, 0.2, 0.3]})
    lines = table.splitlines()
    assert lines[0] == "| ranking (most suspicious first) | top 5% | top 10% | top 20% | top 30% |" and len(lines) == 4
    assert lines[2].startswith("| self-influence") and lines[2].endswith("| 0.400 | 0.600 | 0.800 | 0.900 |")


def _data_available() -> bool:
    from indexer.demo.fashion_mnist import data_available

    return data_available()


@pytest.mark.skipif(not _data_available(),
                    reason="Fashion-MNIST data not installed (apt-get install dataset-fashion-mnist)")
def test_reduced_run_finds_planted_label_noise(tmp_path):
    out_json, plot = tmp_path / "figures.json", tmp_path / "plot.png"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--limit", "1500", "--epochs", "4", "--batch-size", "32", "--dim", "32",
         "--threads", "1", "--out", str(tmp_path / "work"), "--json", str(out_json), "--plot", str(plot), "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(out_json.read_text())
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| ranking")]
    assert len(rows) == len(figures["found"])
    assert figures["examples"] == 1500 and figures["flipped"] == 150 and figures["markdown"] in proc.stdout
    assert figures["checked"] == [0.05, 0.1, 0.2, 0.3] and figures["found"]["random"] == figures["checked"]
    expected = {"combined", "self_influence", "loss", "margin", "aum", "random"}
    if importlib.util.find_spec("cleanlab") is not None:  # a bench-only dependency (the `bench` extra)
        expected |= {"cleanlab_cl", "cleanlab_quality"}
    assert set(figures["found"]) == expected and figures["default_ranking"] == "combined"
    for key, found in figures["found"].items():
        assert all(0.0 <= f <= 1.0 for f in found), key
        assert found == sorted(found), f"{key}: not monotone in the fraction checked"
        row = next(r for r in rows if r.startswith(f"| {figures['rankings'][key]} |"))
        assert np.allclose([float(v) for v in row.split("|")[2:6]], found, atol=5e-4), key
    for key, curve in figures["curve"].items():
        assert np.all(np.diff(curve) >= 0) and 0 <= min(curve) and max(curve) <= 1, key
    assert figures["curve"]["self_influence"][-1] == 1.0
    # the planted noise is found: far better than random at every checked fraction, by the default too
    for key in ("self_influence", "combined"):
        found = figures["found"][key]
        assert all(s > r + 0.2 for s, r in zip(found, figures["checked"])), (key, found)
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
