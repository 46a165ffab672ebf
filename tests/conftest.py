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
