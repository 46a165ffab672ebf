"""Checkpoints with their learning rates: a helper for training loops, and safe loading.

Files are written with `torch.save` of plain tensors, numbers and strings only, and read back with
`torch.load(weights_only=True)` (or safetensors), so loading never unpickles arbitrary objects.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    lr: float | None = None,
    step: int | None = None,
    epoch: int | None = None,
) -> Path:
    """Save `model.state_dict()` with the learning rate in force (`optimizer.param_groups[0]["lr"]`
    unless `lr` is given). Call it in your training loop at the moments TracIn should look at."""
    if lr is None:
        if optimizer is None:
            raise ValueError("save_checkpoint needs an optimizer or an explicit lr")
        lr = float(optimizer.param_groups[0]["lr"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format": "tracin-checkpoint/1",
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "lr": float(lr),
    }
    if step is not None:
        payload["step"] = int(step)
    if epoch is not None:
        payload["epoch"] = int(epoch)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) from a tracin checkpoint, a plain state_dict file, or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path)), {}
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(payload, dict) and "state_dict" in payload:
        meta = {k: v for k, v in payload.items() if k != "state_dict"}
        state = payload["state_dict"]
    elif isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        state, meta = payload, {}
    else:
        raise CheckpointError(f"checkpoint {path} holds neither a state_dict nor a tracin checkpoint")
    return state, meta


def checked_lr(value: Any, where: str) -> float:
    try:
        lr = float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: lr must be a number, got {value!r}") from None
    if not math.isfinite(lr) or lr <= 0:
        raise CheckpointError(f"{where}: lr must be a finite number > 0, got {value!r}")
    return lr


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict=True) with a message that names what does not match."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        raise CheckpointError(f"{where} does not match the model: " + ", ".join(parts))
    model.load_state_dict(state, strict=True)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
