from __future__ import annotations

from pathlib import Path

import pytest
import torch

from indexer.checkpoints import save_checkpoint
from indexer.sketch.embedding import Checkpoint


def make_checkpoints(task, directory: Path, count: int = 3, prefix: str = "ckpt") -> list[Checkpoint]:
    """Seeded, well-separated weights for each checkpoint, with decaying learning rates."""
    out = []
    for i in range(count):
        torch.manual_seed(1000 + i)
        model = task.build_model()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        lr = 0.5 / (i + 1)
        path = save_checkpoint(directory / f"{prefix}-{i}.pt", model, lr=lr, step=i)
        out.append(Checkpoint(path, lr))
    return out


def write_config(directory: Path, task_ref: str, checkpoints, kind="exact", dim=64, layers=None,
                 factory="Flat", batch_size=7, extra="", with_lr=True) -> Path:
    lines = [f'task = "{task_ref}"']
    if layers is not None:
        lines.append("layers = [" + ", ".join(f'"{x}"' for x in layers) + "]")
    for c in checkpoints:
        lines += ["[[checkpoints]]", f'path = "{c.path}"'] + ([f"lr = {c.lr!r}"] if with_lr else [])
    lines += ["[projection]", f'kind = "{kind}"', f"dim = {dim}", "seed = 3",
              "[index]", f'factory = "{factory}"', f"batch_size = {batch_size}", extra]
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def make_adamw_checkpoints(task, directory: Path, count: int = 2, steps: int = 3, lr: float = 0.01):
    """Checkpoints of a real AdamW run (two parameter groups when the model has several trainable tensors:
    the first tensor at lr, the rest at 3 lr) saved with save_checkpoint(path, model, optimizer), so each
    carries the optimizer's state; returns [(path, optimizer.state_dict() copy, group names)] per checkpoint.
    The model is trained in eval mode (no running statistics change) on its whole training set."""
    import copy

    torch.manual_seed(2000)
    model = task.build_model().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [named[:1], named[1:]] if len(named) > 1 else [named]
    optimizer = torch.optim.AdamW([{"params": [p for _, p in g], "lr": lr * (1 + 2 * i)}
                                   for i, g in enumerate(groups)], weight_decay=0.01)
    ts = task.training_set()
    x, y = ts.batch(0, len(ts))
    out = []
    for i in range(count):
        for _ in range(steps):
            loss = task.loss(task.forward(model, x), y).float().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        path = save_checkpoint(directory / f"adamw-{i}.pt", model, optimizer, step=i)
        out.append((path, copy.deepcopy(optimizer.state_dict()), [[n for n, _ in g] for g in groups]))
    return out
