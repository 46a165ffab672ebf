"""Training-loop callbacks that save checkpoints with their learning rate and the optimizer's state (every
group's lr and parameter names, Adam's second moments: `tracin index` weighs each parameter by the step
the optimizer took), in the format of `indexer.checkpoints.save_checkpoint`.

    from indexer.callbacks import TracInTrainerCallback        # Hugging Face transformers.Trainer
    trainer = Trainer(..., callbacks=[TracInTrainerCallback("checkpoints")])          # one per epoch

    from indexer.callbacks import TracInLightningCallback      # Lightning (lightning.pytorch)
    trainer = L.Trainer(..., callbacks=[TracInLightningCallback("checkpoints", every_n_train_steps=500)])

The learning rate recorded with a checkpoint is the one the optimizer used for the last step before it
(read from `optimizer.param_groups[0]["lr"]` between the optimizer step and the scheduler step), not the
one the scheduler has already set for the next step. A checkpoint whose learning rate is 0 (the first
step of a warm-up) adds nothing to TracIn and is skipped with a warning.

The classes are built on first use, so that importing this module needs neither library; a missing one
raises an ImportError naming the extra to install (`tracin-service[huggingface]` / `[lightning]`).
"""
from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from indexer.checkpoints import save_checkpoint

__all__ = ["TracInTrainerCallback", "TracInLightningCallback", "lightning_callback_class"]


class _Saver:
    """What both callbacks share: when to save, the lr of the last optimizer step, the file names."""

    def __init__(self, dirpath: str | Path, every_n_epochs: int | None, every_n_steps: int | None, who: str):
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{who}: {name} must be a positive integer or None, got {value!r}")
        if every_n_epochs is None and every_n_steps is None:
            raise ValueError(f"{who}: give every_n_epochs or every_n_steps (or both)")
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.who = who
        self.last_lr: float | None = None
        self.last_saved_step: int | None = None
        self.saved: list[Path] = []

    def record_lr(self, optimizer: Any) -> None:
        if optimizer is not None and getattr(optimizer, "param_groups", None):
            self.last_lr = float(optimizer.param_groups[0]["lr"])

    def due_at_step(self, step: int) -> bool:
        return self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0

    def due_at_epoch(self, epoch: int) -> bool:
        return self.every_n_epochs is not None and epoch > 0 and epoch % self.every_n_epochs == 0

    def save(self, model: nn.Module, step: int, epoch: int | None, name: str, optimizer: Any = None) -> Path | None:
        if step == self.last_saved_step:
            return None  # the step and the epoch rule met at the same step: one checkpoint
        lr = self.last_lr
        if lr is None:
            self.record_lr(optimizer)
            lr = self.last_lr
        if lr is None:
            warnings.warn(f"{self.who}: no optimizer step seen yet: checkpoint {name} not saved", stacklevel=3)
            return None
        if lr <= 0:
            warnings.warn(f"{self.who}: learning rate {lr:g} at step {step} (warm-up?): checkpoint {name} not saved, "
                          "it would add nothing to TracIn", stacklevel=3)
            return None
        path = save_checkpoint(self.dirpath / name, model, _torch_optimizer(optimizer), lr=lr, step=step, epoch=epoch)
        self.last_saved_step = step
        self.saved.append(path)
        return path


def _torch_optimizer(optimizer: Any) -> Any:
    """The innermost torch optimizer under a framework's wrapper (accelerate's AcceleratedOptimizer keeps it
    as `.optimizer`), or None."""
    import torch

    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


_CLASSES: dict[str, type] = {}


def _hf_class() -> type:
    if "hf" in _CLASSES:
        return _CLASSES["hf"]
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise ImportError("indexer.callbacks.TracInTrainerCallback needs transformers: "
                          "pip install 'tracin-service[huggingface]'") from exc

    class TracInTrainerCallback(TrainerCallback):
        """Save `model.state_dict()` with its learning rate every `every_n_epochs` epochs (default 1) and/or
        every `every_n_steps` optimizer steps, as `DIR/epoch-NNN.pt` / `DIR/step-NNNNNN.pt` (main process only).
        `saved` lists the files written, in order: name them in the `[[checkpoints]]` of the index config."""

        def __init__(self, dirpath: str | Path, every_n_epochs: int | None = 1, every_n_steps: int | None = None):
            self._saver = _Saver(dirpath, every_n_epochs, every_n_steps, "TracInTrainerCallback")

        @property
        def saved(self) -> list[Path]:
            return self._saver.saved

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            self._saver.record_lr(optimizer)  # after optimizer.step(), before lr_scheduler.step()

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.is_world_process_zero and self._saver.due_at_step(state.global_step):
                self._saver.save(model, state.global_step, None, f"step-{state.global_step:06d}.pt", optimizer)

        def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            epoch = int(round(state.epoch or 0))
            if state.is_world_process_zero and self._saver.due_at_epoch(epoch):
                self._saver.save(model, state.global_step, epoch, f"epoch-{epoch:03d}.pt", optimizer)

    TracInTrainerCallback.__qualname__ = "TracInTrainerCallback"
    _CLASSES["hf"] = TracInTrainerCallback
    return TracInTrainerCallback


def lightning_callback_class(package: str | None = None) -> type:
    """The Lightning callback class for `package` ("lightning.pytorch" or "pytorch_lightning"; default:
    the first that imports). Lightning checks callbacks with isinstance, so a `pytorch_lightning.Trainer`
    needs the class built on `pytorch_lightning`."""
    for name in [package] if package else ["lightning.pytorch", "pytorch_lightning"]:
        if name in _CLASSES:
            return _CLASSES[name]
        try:
            base = importlib.import_module(name).Callback
        except ImportError:
            continue
        _CLASSES[name] = _build_lightning_class(base)
        return _CLASSES[name]
    raise ImportError("indexer.callbacks.TracInLightningCallback needs Lightning (lightning or pytorch_lightning): "
                      "pip install 'tracin-service[lightning]'")


def _build_lightning_class(base: type) -> type:
    class TracInLightningCallback(base):  # type: ignore[misc, valid-type]
        """Save the LightningModule's `state_dict()` (or that of its attribute `module`, e.g. "model", when the
        task's `build_model()` returns that inner model) with its learning rate every `every_n_epochs` epochs
        (default 1) and/or every `every_n_train_steps` optimizer steps, as `DIR/epoch-NNN.pt` /
        `DIR/step-NNNNNN.pt` (global rank 0 only). `saved` lists the files written, in order."""

        def __init__(self, dirpath: str | Path, every_n_epochs: int | None = 1,
                     every_n_train_steps: int | None = None, module: str | None = None):
            super().__init__()
            self._saver = _Saver(dirpath, every_n_epochs, every_n_train_steps, "TracInLightningCallback")
            self.module = module

        @property
        def saved(self) -> list[Path]:
            return self._saver.saved

        def _model(self, pl_module) -> nn.Module:
            target = pl_module
            for part in (self.module.split(".") if self.module else []):
                target = getattr(target, part)
            return target

        def _optimizer(self, trainer):
            optimizers = getattr(trainer, "optimizers", None) or []
            return optimizers[0] if optimizers else None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self._saver.record_lr(optimizer)  # the lr this step uses: schedulers step after it

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = int(trainer.global_step)
            if trainer.is_global_zero and self._saver.due_at_step(step):
                self._saver.save(self._model(pl_module), step, None, f"step-{step:06d}.pt", self._optimizer(trainer))

        def on_train_epoch_end(self, trainer, pl_module):
            epoch = int(trainer.current_epoch) + 1
            if trainer.is_global_zero and self._saver.due_at_epoch(epoch):
                self._saver.save(self._model(pl_module), int(trainer.global_step), epoch, f"epoch-{epoch:03d}.pt",
                                 self._optimizer(trainer))

    TracInLightningCallback.__qualname__ = "TracInLightningCallback"
    return TracInLightningCallback


def __getattr__(name: str) -> Any:
    if name == "TracInTrainerCallback":
        return _hf_class()
    if name == "TracInLightningCallback":
        return lightning_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
