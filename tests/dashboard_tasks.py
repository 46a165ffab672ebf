"""A tiny text task for the dashboard's browser tests (importable as tests.dashboard_tasks:TinyTextTask):
an example is `{"text": ...}`, the model a linear layer over hashed character trigrams, the display
fields those of a text task (`title`, `snippet`, `category`)."""
from __future__ import annotations

import zlib
from typing import Sequence

import torch
from pydantic import BaseModel, Field
from torch import nn

from indexer.task import ExampleSet, Task

TOPICS = {
    "sport": "match goal league striker coach season final penalty stadium cup",
    "tech": "software chip phone network startup cloud robot code browser data",
    "business": "market shares profit bank inflation merger investors revenue price trade",
}
DIM = 64


class TextExample(BaseModel):
    """One short article: the title on the first line, then the body."""

    text: str = Field(min_length=1, max_length=10_000, description="article text (title, newline, body)")


def featurize(text: str) -> torch.Tensor:
    out = torch.zeros(DIM, dtype=torch.float64)
    t = f"  {text.lower()}  "
    for i in range(len(t) - 2):
        out[zlib.crc32(t[i:i + 3].encode()) % DIM] += 1.0
    return out / max(1.0, float(out.norm()))


def _articles(count: int, seed: int) -> list[tuple[str, int]]:
    g = torch.Generator().manual_seed(seed)
    names = list(TOPICS)
    out = []
    for i in range(count):
        label = i % len(names)
        words = TOPICS[names[label]].split()
        picks = [words[int(j)] for j in torch.randint(0, len(words), (12,), generator=g)]
        title = f"{picks[0].capitalize()} {picks[1]} report #{i}"
        out.append((f"{title}\n{' '.join(picks[2:])} and more {' '.join(picks[:3])}.", label))
    return out


class TinyTextTask(Task):
    example_schema = TextExample
    class_names = list(TOPICS)

    def __init__(self, n: int = 36, seed: int = 0):
        self.n, self.seed = n, seed

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return nn.Sequential(nn.Linear(DIM, 3)).double()

    def encode(self, examples: Sequence[TextExample]) -> torch.Tensor:
        return torch.stack([featurize(e.text) for e in examples])

    def _set(self, articles: list[tuple[str, int]], prefix: str, flip_every: int = 0) -> ExampleSet:
        labels = [(lab + 1) % 3 if flip_every and i % flip_every == 0 else lab for i, (_, lab) in enumerate(articles)]
        texts = [t for t, _ in articles]
        return ExampleSet(
            torch.stack([featurize(t) for t in texts]), torch.tensor(labels),
            ids=[f"{prefix}{i}" for i in range(len(texts))],
            display=lambda i: {"title": texts[i].splitlines()[0], "snippet": texts[i].splitlines()[1][:120],
                               "category": self.class_names[labels[i]], "flipped": labels[i] != articles[i][1]},
            examples=lambda i: {"text": texts[i]},
        )

    def training_set(self) -> ExampleSet:
        return self._set(_articles(self.n, self.seed), "doc-", flip_every=9)

    def held_out_set(self) -> ExampleSet:
        return self._set(_articles(6, self.seed + 1), "held-")
