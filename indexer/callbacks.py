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

Keeping an index current while training (`IndexUpdate`): after each checkpoint the callback can bring an
index directory up to date and tell a running server to switch to the new version:

    update = IndexUpdate("index.toml", "runs/index", reload_url="http://127.0.0.1:8000")   # key: TRACIN_API_KEY
    trainer = Trainer(..., callbacks=[TracInTrainerCallback("checkpoints", update_index=update)])

The update runs `tracin index CONFIG --out DIR --update` (a plain build the first time, when DIR holds no
index yet) in a child process, started from a background thread, so training goes on while it embeds; see
`IndexUpdate` for why a process and not an in-process call.

The classes are built on first use, so that importing this module needs neither library; a missing one
raises an ImportError naming the extra to install (`tracin-service[huggingface]` / `[lightning]`).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import tomllib
from torch import nn

from indexer.checkpoints import save_checkpoint

__all__ = ["IndexUpdate", "TracInLightningCallback", "TracInTrainerCallback", "lightning_callback_class"]


class IndexUpdate:
    """Bring the index directory `out` up to date with the checkpoints a callback saved, after each save.

    `config` is the index config (TOML) of the run: task, layers, projection, index; its `[[checkpoints]]`
    tables (optional) are checkpoints from before this run. After each save the callback calls `request(saved)`
    with every checkpoint it saved so far; the update writes CONFIG's text followed by one `[[checkpoints]]`
    table per saved file (absolute path, no lr: `tracin index` reads it from the file) to
    `<config stem>.update.toml` beside CONFIG (so relative paths in CONFIG keep their meaning, and the same
    command can be rerun by hand), then runs

        tracin index <config stem>.update.toml --out OUT --update     (a plain build while OUT holds no index)

    in a child process, its output appended to `OUT.update.log` (beside OUT). With `reload_url`, a finished
    update is followed by `POST {reload_url}/admin/reload` with the bearer key `api_key` (default: the
    TRACIN_API_KEY environment variable), so a running `tracin serve OUT` switches to the new version.

    Why a child process, started from a background thread, rather than `indexer.build.update.update_index`
    called in the training process:
    - training is not blocked: the update embeds (every row at the new checkpoint, a backward pass per batch)
      while training goes on (`wait=True` blocks each save until its update and reload are done instead);
      the cost is the child's CPU/GPU time and one more copy of the model in memory;
    - kill -9 safe: the update holds the index's build lock and follows the update crash rules (the previous
      version stays served; a rerun resumes). A kill -9 of the training process leaves the child running to
      its end (or, killed too, an update that the next one - or the same command by hand - resumes);
    - an update that fails (a refused config, a full disk) is a warning with its last log line, never an
      exception in the training loop.
    One update runs at a time: checkpoints saved while one runs are taken by the next, which includes every
    checkpoint saved so far (an update adds everything missing at once). `join()` (called by the callbacks
    when training ends, and by the interpreter at exit: the thread is not a daemon) waits until the index
    holds every saved checkpoint.

    `runs` lists what each update did: {"checkpoints", "command", "returncode", "seconds", "reload"} where
    "reload" is the server's answer (status and JSON body) or None. Raises ValueError (one line) when CONFIG
    is missing, is not TOML, or writes its checkpoints as an inline array (use [[checkpoints]] tables)."""

    def __init__(self, config: str | Path, out: str | Path, reload_url: str | None = None,
                 api_key: str | None = None, wait: bool = False, env: dict[str, str] | None = None):
        self.config, self.out = Path(config).expanduser().resolve(), Path(out).expanduser().resolve()
        if not self.config.is_file():
            raise ValueError(f"IndexUpdate: config file not found: {self.config}")
        self.text = self.config.read_text()
        try:
            tomllib.loads(self._with_checkpoints([self.config]))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"IndexUpdate: {self.config} cannot take [[checkpoints]] tables after its text (write its "
                             f"checkpoints as [[checkpoints]] tables, not an inline array): {exc}") from None
        self.generated = self.config.with_name(f"{self.config.stem}.update.toml")
        self.log = self.out.with_name(f"{self.out.name}.update.log")
        self.reload_url = reload_url.rstrip("/") if reload_url else None
        self.api_key = api_key if api_key is not None else os.environ.get("TRACIN_API_KEY")
        self.wait, self.env = wait, env
        self.runs: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._pending: list[Path] | None = None
        self._thread: threading.Thread | None = None

    def _with_checkpoints(self, paths: list[Path]) -> str:
        tables = "".join(f"\n[[checkpoints]]\npath = {json.dumps(str(p))}\n" for p in paths)
        return self.text.rstrip("\n") + "\n\n# checkpoints saved by the training callback (indexer.callbacks.IndexUpdate)" \
            + tables

    def request(self, saved: list[Path]) -> None:
        """Bring the index up to date with `saved` (every checkpoint saved so far, in order): start an update now,
        or after the one that is running."""
        with self._lock:
            self._pending = list(saved)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="tracin-index-update", daemon=False)
                self._thread.start()
        if self.wait:
            self.join()

    def join(self) -> None:
        """Wait until no update is running or pending (the index then holds every checkpoint requested)."""
        while True:
            with self._lock:
                thread = self._thread
            if thread is None:
                return
            thread.join()

    def _loop(self) -> None:
        while True:
            with self._lock:
                saved, self._pending = self._pending, None
                if saved is None:
                    self._thread = None
                    return
            self._run(saved)

    def _run(self, saved: list[Path]) -> None:
        tmp = self.generated.with_name(f".{self.generated.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(self._with_checkpoints(saved))
        os.replace(tmp, self.generated)
        update = (self.out / "manifest.json").is_file()
        command = [sys.executable, "-m", "indexer.cli", "index", str(self.generated), "--out", str(self.out),
                   *(["--update"] if update else []), "--quiet"]
        started = time.perf_counter()
        env = {**os.environ, **(self.env or {})}
        with open(self.log, "ab") as handle:
            handle.write(f"$ {' '.join(command)}\n".encode())
            handle.flush()
            returncode = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                        check=False).returncode
        run = {"checkpoints": [str(p) for p in saved], "command": command, "returncode": returncode,
               "seconds": round(time.perf_counter() - started, 3), "reload": None}
        self.runs.append(run)
        if returncode != 0:
            warnings.warn(f"IndexUpdate: `tracin index ... --out {self.out}` failed (exit {returncode}): "
                          f"{_last_line(self.log)} (log: {self.log})", stacklevel=2)
            return
        if self.reload_url:
            run["reload"] = self._reload()

    def _reload(self) -> dict[str, Any]:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.reload_url + "/admin/reload", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {self.api_key}"}
                                                     if self.api_key else {})})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return {"status": response.status, "body": json.loads(response.read() or b"null")}
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                body = json.loads(body)
            except ValueError:
                body = body.decode(errors="replace")[:500]
            out = {"status": exc.code, "body": body}
        except (urllib.error.URLError, OSError, ValueError) as exc:
            out = {"status": None, "body": f"{type(exc).__name__}: {exc}"}
        message = out["body"].get("message") if isinstance(out["body"], dict) else out["body"]
        warnings.warn(f"IndexUpdate: POST {self.reload_url}/admin/reload: {out['status']}: {message}", stacklevel=2)
        return out


def _last_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


class _Saver:
    """What both callbacks share: when to save, the lr of the last optimizer step, the file names."""

    def __init__(self, dirpath: str | Path, every_n_epochs: int | None, every_n_steps: int | None, who: str,
                 update_index: IndexUpdate | None = None):
        if update_index is not None and not isinstance(update_index, IndexUpdate):
            raise ValueError(f"{who}: update_index must be an indexer.callbacks.IndexUpdate, got "
                             f"{type(update_index).__name__}")
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
        self.update_index = update_index

    def finish(self) -> None:
        """Training ended: wait for the index update (if any) to hold every checkpoint saved."""
        if self.update_index is not None:
            self.update_index.join()

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
        if self.update_index is not None:
            self.update_index.request(self.saved)
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
        `saved` lists the files written, in order: name them in the `[[checkpoints]]` of the index config, or
        give `update_index` (an `IndexUpdate`) to bring an index up to date after each save (and to wait for it
        when training ends)."""

        def __init__(self, dirpath: str | Path, every_n_epochs: int | None = 1, every_n_steps: int | None = None,
                     update_index: IndexUpdate | None = None):
            self._saver = _Saver(dirpath, every_n_epochs, every_n_steps, "TracInTrainerCallback", update_index)

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

        def on_train_end(self, args, state, control, **kwargs):
            self._saver.finish()

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
        `DIR/step-NNNNNN.pt` (global rank 0 only). `saved` lists the files written, in order; `update_index`
        (an `IndexUpdate`) brings an index up to date after each save."""

        def __init__(self, dirpath: str | Path, every_n_epochs: int | None = 1,
                     every_n_train_steps: int | None = None, module: str | None = None,
                     update_index: IndexUpdate | None = None):
            super().__init__()
            self._saver = _Saver(dirpath, every_n_epochs, every_n_train_steps, "TracInLightningCallback", update_index)
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

        def on_train_end(self, trainer, pl_module):
            self._saver.finish()

    TracInLightningCallback.__qualname__ = "TracInLightningCallback"
    return TracInLightningCallback


def __getattr__(name: str) -> Any:
    if name == "TracInTrainerCallback":
        return _hf_class()
    if name == "TracInLightningCallback":
        return lightning_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
