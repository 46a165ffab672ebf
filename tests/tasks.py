"""Tiny seeded float64 tasks for the oracle tests (importable as tests.tasks:Name)."""
from __future__ import annotations

import errno
import os
from typing import Sequence

import torch
from pydantic import BaseModel, Field
from torch import nn

from indexer.task import ExampleSet, Task


class VectorExample(BaseModel):
    x: list[float] = Field(min_length=6, max_length=6)


class MLPTask(Task):
    example_schema = VectorExample
    class_names = ["a", "b", "c"]

    def __init__(self, n: int = 40, seed: int = 0):
        self.n, self.seed = n, seed

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()

    def training_set(self) -> ExampleSet:
        g = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randn(self.n, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (self.n,), generator=g)
        return ExampleSet(x, y, ids=[f"ex{i}" for i in range(self.n)],
                          display=lambda i: {"row": i, "flipped": i % 7 == 0},
                          examples=lambda i: {"x": x[i].tolist()})

    def held_out_set(self) -> ExampleSet:
        g = torch.Generator().manual_seed(self.seed + 2)
        x = torch.randn(5, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (5,), generator=g)
        return ExampleSet(x, y, ids=[f"q{i}" for i in range(5)], examples=lambda i: {"x": x[i].tolist()})

    def encode(self, examples: Sequence[VectorExample]) -> torch.Tensor:
        return torch.tensor([e.x for e in examples], dtype=torch.float64)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu_(self.conv2(x))  # in-place on a traced output on purpose
        return self.fc(x.flatten(1))


class CNNTask(Task):
    example_schema = VectorExample

    def __init__(self, n: int = 24, seed: int = 0):
        self.n, self.seed = n, seed

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return SmallCNN().double()

    def training_set(self) -> ExampleSet:
        g = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randn(self.n, 1, 7, 7, generator=g, dtype=torch.float64)
        return ExampleSet(x, torch.randint(0, 3, (self.n,), generator=g))


class TokenModel(nn.Module):
    """Embedding over padded token sequences, mean-pooled, a LayerNorm (torch.func path), a head."""

    def __init__(self, vocab: int = 11, dim: int = 5, pad: int = 0):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=pad)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)
        self.pad = pad

    def forward(self, tokens):
        mask = (tokens != self.pad).unsqueeze(-1).to(self.emb.weight.dtype)
        h = torch.tanh(self.proj(self.emb(tokens)))  # Linear applied per token (T > 1)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(self.norm(pooled))


class TokenTask(Task):
    example_schema = VectorExample

    def __init__(self, n: int = 20, seed: int = 0):
        self.n, self.seed = n, seed

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return TokenModel().double()

    def training_set(self) -> ExampleSet:
        g = torch.Generator().manual_seed(self.seed + 1)
        tokens = torch.randint(1, 11, (self.n, 6), generator=g)
        lengths = torch.randint(2, 7, (self.n,), generator=g)
        tokens[torch.arange(6).unsqueeze(0) >= lengths.unsqueeze(1)] = 0  # right padding
        tokens[0, 1] = tokens[0, 0]  # a repeated token in one sequence
        return ExampleSet(tokens, torch.randint(0, 3, (self.n,), generator=g))


class BrokenTask(MLPTask):
    """Appends its pid to the file `attempts` each time it is constructed, then fails (a ConfigError of
    the build): the distributed-build tests count how often a shard task ran."""

    def __init__(self, attempts: str, n: int = 40, seed: int = 0):
        with open(attempts, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        raise ValueError("no training data on this worker")


class FlakyTask(MLPTask):
    """MLPTask whose training_set() fails once with EIO (a network file system hiccup) in the one process
    that creates the file `flaky`; everywhere else it is MLPTask."""

    def __init__(self, flaky: str, n: int = 40, seed: int = 0):
        super().__init__(n, seed)
        self.flaky = flaky

    def training_set(self) -> ExampleSet:
        try:
            os.close(os.open(self.flaky, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return super().training_set()
        raise OSError(errno.EIO, "Input/output error (simulated)", self.flaky)


class GrowingTask(MLPTask):
    """MLPTask whose training set is the first `n` rows of one fixed draw of `rows` (default 60): a training set
    that grows between index versions (n = 30, then 60, holds the same first 30 rows). `changed` (a row number)
    perturbs that row's input, the case an update must refuse."""

    def __init__(self, n: int = 40, seed: int = 0, rows: int = 60, changed: int | None = None):
        super().__init__(n, seed)
        self.rows, self.changed = rows, changed

    def training_set(self) -> ExampleSet:
        g = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randn(self.rows, 6, generator=g, dtype=torch.float64)[:self.n].clone()
        y = torch.randint(0, 3, (self.rows,), generator=g)[:self.n].clone()
        if self.changed is not None:
            x[self.changed, 0] += 1.0
        return ExampleSet(x, y, ids=[f"ex{i}" for i in range(self.n)],
                          display=lambda i: {"row": i, "flipped": i % 7 == 0},
                          examples=lambda i: {"x": x[i].tolist()})
