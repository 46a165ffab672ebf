"""A tiny text task for the dashboard's browser tests (importable as tests.dashboard_tasks:TinyTextTask):
an example is `{"text": ...}`, the model a linear layer over hashed character trigrams, the display
fields those of a text task (`title`, `snippet`, `category`)."""
from __future__ import annotations

import zlib
from typing import Sequence

import torch
from pydantic import BaseModel, Field
from torch import nn

from indexer.demo.digits import DigitsTask
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


# -- a tabular task: the README walkthrough's wine task (no image or text field) ---------------------

class Wine(BaseModel):
    """One wine: the 13 measurements of sklearn's load_wine, in its column order."""

    measurements: list[float] = Field(min_length=13, max_length=13,
                                      description="the 13 measurements of sklearn's load_wine, in its column order")


def _wine(held_out: int = 28):
    from sklearn.datasets import load_wine

    data = load_wine()
    order = torch.randperm(len(data.target), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(data.data, dtype=torch.float64)[order]
    y = torch.tensor(data.target, dtype=torch.long)[order]
    return x[:-held_out], y[:-held_out], x[-held_out:], y[-held_out:]


class WineNet(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.hidden = nn.Linear(13, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden((x - self.mean) / self.std)))


class TinyWineTask(Task):
    """As the README's WineTask: training examples show two display fields, held-out ones none."""

    example_schema = Wine
    class_names = ["cultivar 1", "cultivar 2", "cultivar 3"]

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        x = _wine()[0]
        return WineNet(x.mean(dim=0), x.std(dim=0)).double()

    def encode(self, examples: Sequence[Wine]) -> torch.Tensor:
        return torch.tensor([e.measurements for e in examples], dtype=torch.float64)

    def training_set(self) -> ExampleSet:
        x, y, _, _ = _wine()
        return ExampleSet(x, y, ids=[f"wine-{i}" for i in range(len(y))],
                          display=lambda i: {"alcohol": round(float(x[i, 0]), 2),
                                             "color_intensity": round(float(x[i, 9]), 2)},
                          examples=lambda i: {"measurements": x[i].tolist()})

    def held_out_set(self) -> ExampleSet:
        _, _, x, y = _wine()
        return ExampleSet(x, y, ids=[f"held-out-{i}" for i in range(len(y))],
                          examples=lambda i: {"measurements": x[i].tolist()})


# -- an image task with long class names (Fashion-MNIST's), on the digits data -------------------------

FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]


class LongNamesDigitsTask(DigitsTask):
    """The digits demo task whose ten classes carry Fashion-MNIST's names (as long as they get)."""

    class_names = FASHION_NAMES


# -- an image task whose example is a base64 PNG file (as torchvision.image_classification's) -------------

class ImageFile(BaseModel):
    """One image file."""

    image: str = Field(min_length=8, description="a base64 PNG (or a data:image/png;base64, URL) of an 8x8 digit")


class TinyImageFileTask(Task):
    """scikit-learn digits as 8x8 PNG files: an example is {"image": base64 PNG}, decoded to pixels / 255."""

    example_schema = ImageFile
    class_names = [str(i) for i in range(10)]

    @staticmethod
    def _pixels(n: int, offset: int):
        from sklearn.datasets import load_digits

        digits = load_digits()
        grid = torch.tensor(digits.images[offset:offset + n] * 255 / 16).round().to(torch.uint8)
        return grid, torch.tensor(digits.target[offset:offset + n])

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()

    def encode(self, examples: Sequence[ImageFile]) -> torch.Tensor:
        import base64

        from indexer.demo.fashion_mnist import decode_png

        out = []
        for e in examples:
            data = e.image.split(",", 1)[1] if e.image.startswith("data:") else e.image
            gray = decode_png(base64.b64decode(data))
            if gray.shape != (8, 8):
                raise ValueError(f"image: {gray.shape[1]}x{gray.shape[0]} pixels; expected 8x8")
            out.append(torch.tensor(gray, dtype=torch.float64) / 255)
        return torch.stack(out)

    def _set(self, n: int, offset: int, prefix: str) -> ExampleSet:
        from indexer.images import png_data_url

        grid, labels = self._pixels(n, offset)
        urls = [png_data_url(g.numpy()) for g in grid]
        return ExampleSet(grid.double() / 255, labels, ids=[f"{prefix}{i}" for i in range(n)],
                          display=lambda i: {"image": urls[i]}, examples=lambda i: {"image": urls[i]})

    def training_set(self) -> ExampleSet:
        return self._set(60, 0, "digit-")

    def held_out_set(self) -> ExampleSet:
        return self._set(6, 100, "held-")
