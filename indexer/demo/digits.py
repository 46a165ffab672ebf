"""The embedded demo: scikit-learn's digits (8x8 images), a small MLP trained with plain SGD and a
decaying learning rate, with 10% of the training labels flipped to another class. Each training
example's display fields record `flipped` and `original_label`, so self-influence can be checked
against the known mislabels.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from pydantic import BaseModel, Field, field_validator
from torch import nn

from indexer.checkpoints import save_checkpoint
from indexer.images import png_data_url
from indexer.task import ExampleSet, Task

FLIP_FRACTION = 0.10
HELD_OUT = 297  # 1797 digits -> 1500 training, 297 held out


class DigitsExample(BaseModel):
    """One 8x8 digit as 64 pixel intensities in 0..16 (row-major), as in sklearn's load_digits."""

    pixels: list[float] = Field(min_length=64, max_length=64, description="64 numbers in 0..16, row-major 8x8")

    @field_validator("pixels")
    @classmethod
    def _in_range(cls, values: list[float]) -> list[float]:
        for i, v in enumerate(values):
            if not np.isfinite(v) or v < 0 or v > 16:
                raise ValueError(f"pixels[{i}] = {v} is outside 0..16")
        return values


@lru_cache(maxsize=4)
def digits_data(seed: int = 0):
    """(x_train, y_train (possibly flipped), original_train, flipped mask, x_test, y_test) as numpy."""
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.target))
    x, y = data.data[order].astype(np.float32), data.target[order].astype(np.int64)
    x_train, y_train, x_test, y_test = x[:-HELD_OUT], y[:-HELD_OUT], x[-HELD_OUT:], y[-HELD_OUT:]
    flipped = np.zeros(len(y_train), dtype=bool)
    flipped[rng.choice(len(y_train), size=int(FLIP_FRACTION * len(y_train)), replace=False)] = True
    noisy = y_train.copy()
    noisy[flipped] = (y_train[flipped] + rng.integers(1, 10, size=flipped.sum())) % 10
    return x_train, noisy, y_train, flipped, x_test, y_test


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(pixels / 16.0)))


def _thumbnail(pixels: np.ndarray) -> str:
    return png_data_url(np.clip(pixels.reshape(8, 8) * (255.0 / 16.0), 0, 255).astype(np.uint8), scale=4)


class DigitsTask(Task):
    example_schema = DigitsExample
    class_names = [str(d) for d in range(10)]

    def __init__(self, seed: int = 0, hidden: int = 32):
        self.seed, self.hidden = seed, hidden

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return DigitsMLP(self.hidden)

    def encode(self, examples: Sequence[DigitsExample]) -> torch.Tensor:
        return torch.tensor([e.pixels for e in examples], dtype=torch.float32)

    def training_set(self) -> ExampleSet:
        x, y, original, flipped, _, _ = digits_data(self.seed)
        return ExampleSet(
            torch.from_numpy(x), torch.from_numpy(y), ids=[f"train-{i}" for i in range(len(y))],
            display=lambda i: {"image": _thumbnail(x[i]), "flipped": bool(flipped[i]),
                               "original_label": int(original[i])},
            examples=lambda i: {"pixels": x[i].tolist()},
        )

    def held_out_set(self) -> ExampleSet:
        _, _, _, _, x, y = digits_data(self.seed)
        return ExampleSet(
            torch.from_numpy(x), torch.from_numpy(y), ids=[f"test-{i}" for i in range(len(y))],
            display=lambda i: {"image": _thumbnail(x[i])},
            examples=lambda i: {"pixels": x[i].tolist()},
        )


OPTIMIZERS = {"sgd": 0.1, "adamw": 0.01}  # optimizer -> its default initial learning rate


def train_digits(out_dir: str | Path, epochs: int = 30, checkpoints: int = 5, seed: int = 0,
                 lr: float | None = None, batch_size: int = 32, progress: Callable[[str], None] | None = None,
                 optimizer: str = "sgd") -> Path:
    """Train the demo MLP, save `checkpoints` evenly spaced checkpoints with the optimizer's state
    (`save_checkpoint(path, model, optimizer)`), write a config.

    `optimizer`: "sgd" (plain SGD, the demo) or "adamw" (torch.optim.AdamW, default hyperparameters);
    `lr`: the initial learning rate (default 0.1 for SGD, 0.01 for AdamW), multiplied by 0.93 after each
    epoch. `progress`, when given, receives a line every few epochs (epoch, mean loss, lr, elapsed time).
    Returns the path of the TOML config that indexes it. Raises ValueError for an unknown optimizer."""
    import time

    started = time.perf_counter()
    report_every = max(1, epochs // checkpoints)  # a line per checkpoint interval
    out_dir = Path(out_dir)
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    task = DigitsTask(seed)
    train = task.training_set()
    model = task.build_model()
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    lr = OPTIMIZERS[optimizer] if lr is None else lr
    optimizer = (torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD)(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.93)
    generator = torch.Generator().manual_seed(seed)
    every = max(1, epochs // checkpoints)
    saved = []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train), generator=generator)
        model.train()
        total, batches = 0.0, 0
        for start in range(0, len(train), batch_size):
            rows = order[start:start + batch_size]
            loss = task.loss(model(train.inputs[rows]), train.labels[rows]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        saving = epoch % every == 0 and len(saved) < checkpoints
        if saving:
            saved.append(save_checkpoint(out_dir / "checkpoints" / f"epoch-{epoch:03d}.pt", model, optimizer,
                                         epoch=epoch))
        if progress is not None and (epoch % report_every == 0 or epoch == epochs):
            progress(f"epoch {epoch:>3}/{epochs}: mean loss {total / max(1, batches):.4f}, "
                     f"lr {optimizer.param_groups[0]['lr']:.4g}, {time.perf_counter() - started:.1f}s"
                     + (f"; saved checkpoint {saved[-1].name}" if saving else ""))
        scheduler.step()
    lines = ['task = "indexer.demo.digits:DigitsTask"', f"task_args = {{ seed = {seed} }}", ""]
    for path in saved:
        lines += ["[[checkpoints]]", f'path = "checkpoints/{path.name}"', ""]
    lines += ["[projection]", 'kind = "sketch"', "seed = 0", "",  # dim: the library default
              "[index]", 'factory = "Flat"', "batch_size = 256", ""]
    config = out_dir / "digits.toml"
    config.write_text("\n".join(lines))
    return config
