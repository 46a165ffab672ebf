"""Checkpoints with their learning rates: a helper for training loops, and safe loading.

Files are written with `torch.save` of plain tensors, numbers and strings only, and read back with
`torch.load(weights_only=True)` (or safetensors), so loading never unpickles arbitrary objects.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import re
from dataclasses import dataclass
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
    optimizer_state: bool = True,
) -> Path:
    """Save `model.state_dict()` with the learning rate in force (`optimizer.param_groups[0]["lr"]` unless
    `lr` is given) and, with an optimizer, its class, its `state_dict()` (every group's lr and
    hyperparameters, Adam's second moments, ...) and the name of every parameter of each group, so that
    `tracin index` weighs each parameter by the step the optimizer took (indexer.optimizer). Call it in
    your training loop at the moments TracIn should look at, after `optimizer.step()` and before the
    scheduler's step. `optimizer_state=False` records the class and groups' names only (smaller files;
    an Adam-type optimizer is then scored with the plain formula, with a warning)."""
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
    if optimizer is not None:
        payload["optimizer_class"] = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
        if optimizer_state:
            names = {id(p): n for n, p in model.named_parameters()}
            groups = [[names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
            payload["optimizer_state_dict"] = _to_cpu(optimizer.state_dict())
            if all(n is not None for g in groups for n in g):
                payload["optimizer_param_names"] = groups
    if step is not None:
        payload["step"] = int(step)
    if epoch is not None:
        payload["epoch"] = int(epoch)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


RESAVE_HINT = ("re-save it with indexer.checkpoints.save_checkpoint(path, model, optimizer) or "
               "torch.save(model.state_dict(), path)")
_STATE_KEYS = ("state_dict", "model_state_dict", "model")  # where training code puts the weights
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json",
               # a PEFT adapter's save_pretrained folder: the adapter's weights only (`load_state_into`)
               "adapter_model.safetensors", "adapter_model.bin")


def load_checkpoint(path: str | Path, prefix: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) from a checkpoint people have, read without unpickling objects.

    Formats: a tracin checkpoint (`save_checkpoint`), a plain `torch.save(model.state_dict())` file,
    `{"model_state_dict": ...}` / `{"model": ...}` training dicts, Lightning's `{"state_dict": ...,
    "optimizer_states": ...}`, a `.safetensors` file, and a Hugging Face `save_pretrained` folder
    (model.safetensors, sharded safetensors with their index json, or pytorch_model.bin).

    Keys: `prefix` (e.g. "model." for Lightning) keeps only the keys that start with it and strips
    it; without a prefix, a `module.` that every key carries (DataParallel / DDP) is stripped.

    Metadata: `lr` is the recorded learning rate, from an `lr` or `learning_rate` entry or, failing
    those, from the saved optimizer state when all its parameter groups share one lr (absent when
    the file records none). Raises CheckpointError (one line: the keys found and how to re-save)."""
    path = Path(path)
    if path.is_dir():
        state, meta = _load_pretrained_folder(path)
    elif not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    elif path.suffix == ".safetensors":
        state, meta = _load_safetensors(path)
    else:
        state, meta = _unwrap(_torch_load(path), path)
    state = _strip_prefix(state, prefix, path)
    return state, meta


def _torch_load(path: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file for the user
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise CheckpointError(f"cannot read checkpoint {path}: it holds a pickled {found.group(1)} object, and "
                                  f"checkpoints are only read with torch.load(weights_only=True); {RESAVE_HINT}") from None
        line = next((x.strip() for x in text.splitlines() if x.strip()), type(exc).__name__)
        raise CheckpointError(f"cannot read checkpoint {path}: {line[:300]}; {RESAVE_HINT}") from None


def _is_state(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _keys_found(payload: Any) -> str:
    if isinstance(payload, dict):
        keys = [str(k) for k in payload]
        return f"keys found: {keys[:8]}{' ...' if len(keys) > 8 else ''}"
    return f"found a {type(payload).__name__}"


def _unwrap(payload: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and the metadata of a loaded payload (see load_checkpoint for the formats)."""
    if _is_state(payload):
        return payload, {}
    if isinstance(payload, dict):
        for key in _STATE_KEYS:
            if key in payload and _is_state(payload[key]):
                meta = {k: v for k, v in payload.items() if k != key and isinstance(k, str)}
                return payload[key], _normalise_meta(meta)
        for key in _STATE_KEYS:
            if key in payload and isinstance(payload[key], dict):
                bad = [k for k, v in payload[key].items() if not isinstance(v, torch.Tensor)][:3]
                raise CheckpointError(f"checkpoint {path}: {key!r} holds entries that are not tensors ({bad}); "
                                      f"{RESAVE_HINT}")
    raise CheckpointError(f"checkpoint {path} holds no state_dict ({_keys_found(payload)}); expected a state_dict, "
                          f"or a dict with one under {list(_STATE_KEYS)}; {RESAVE_HINT}")


def _optimizer_lr(meta: dict[str, Any]) -> float | None:
    """The lr of a saved optimizer state (PyTorch `optimizer_state_dict`, Lightning `optimizer_states`),
    when all its parameter groups agree."""
    for key in ("optimizer_state_dict", "optimizer", "optimizer_states"):
        value = meta.get(key)
        states = value if isinstance(value, list) else [value]
        if len(states) != 1 or not isinstance(states[0], dict):
            continue
        groups = states[0].get("param_groups")
        if isinstance(groups, list) and groups and all(isinstance(g, dict) and "lr" in g for g in groups):
            lrs = {g["lr"] if not isinstance(g["lr"], torch.Tensor) else float(g["lr"]) for g in groups}
            if len(lrs) == 1:
                return next(iter(lrs))
    return None


def _normalise_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """`lr` from `lr`, `learning_rate` or the saved optimizer state; the optimizer state itself is dropped."""
    out = {k: v for k, v in meta.items() if k not in ("optimizer_state_dict", "optimizer", "optimizer_states")}
    if "lr" not in out and "learning_rate" in out:
        out["lr"] = out["learning_rate"]
    if "lr" not in out:
        lr = _optimizer_lr(meta)
        if lr is not None:
            out["lr"] = lr
            out["lr_source"] = "optimizer state"
    if isinstance(out.get("lr"), torch.Tensor) and out["lr"].numel() == 1:
        out["lr"] = float(out["lr"])
    return out


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}; {RESAVE_HINT}") from None
    meta: dict[str, Any] = {}
    for key in ("lr", "learning_rate"):
        if key in metadata:
            try:
                meta[key] = float(metadata[key])
            except ValueError:
                meta[key] = metadata[key]
    return state, _normalise_meta(meta)


def _load_pretrained_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A Hugging Face `save_pretrained` folder: model.safetensors (or shards listed in
    model.safetensors.index.json), else pytorch_model.bin (read with weights_only=True)."""
    found = [name for name in _HF_WEIGHTS if (path / name).is_file()]
    if not found:
        names = sorted(p.name for p in path.iterdir())[:8]
        raise CheckpointError(f"checkpoint folder {path} has none of {list(_HF_WEIGHTS)} (found {names}); give a "
                              f"checkpoint file, or {RESAVE_HINT}")
    name = found[0]
    if name.endswith(".index.json"):
        import json

        try:
            weight_map = json.loads((path / name).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint folder {path}: {name} is not a shard index: {exc}") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            shard_path = (path / shard)
            if "/" in shard or not shard_path.is_file():
                raise CheckpointError(f"checkpoint folder {path}: shard {shard!r} listed in {name} is missing")
            part, _ = (_load_safetensors(shard_path) if shard.endswith(".safetensors")
                       else _unwrap(_torch_load(shard_path), shard_path))
            state.update(part)
        return state, {}
    if name.endswith(".safetensors"):
        return _load_safetensors(path / name)
    return _unwrap(_torch_load(path / name), path / name)


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str | None, path: Path) -> dict[str, torch.Tensor]:
    if prefix:
        kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not kept:
            raise CheckpointError(f"checkpoint {path}: no key starts with the prefix {prefix!r} "
                                  f"(keys found: {list(state)[:5]})")
        return kept
    while state and all(k.startswith("module.") for k in state):  # DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def checkpoint_digest(path: str | Path) -> str:
    """sha256 of a checkpoint file; for a folder, of its files' names and sha256s (sorted)."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def checked_lr(value: Any, where: str) -> float:
    """`value` as a float, or CheckpointError unless it is a finite number > 0 (booleans and strings
    are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CheckpointError(f"{where}: lr must be a number, got {value!r}")
    lr = float(value)
    if not math.isfinite(lr) or lr <= 0:
        raise CheckpointError(f"{where}: lr must be a finite number > 0, got {value!r}")
    return lr


def recorded_lr(meta: dict[str, Any], where: str) -> float | None:
    """The lr a checkpoint file records (validated), or None when it records none."""
    if "lr" not in meta:
        return None
    return checked_lr(meta["lr"], f"{where} (the lr the file records)")


@dataclass(frozen=True)
class LoadReport:
    """How `load_state_into` filled a model: `from_factory` = the state-dict keys the checkpoint does not hold
    and that therefore keep the values the task's model factory gave them (frozen parameters and buffers of
    a base model under an adapter-only checkpoint; empty for a full checkpoint), with `factory_sha256` a
    digest of those values (names, dtypes, shapes and bytes) so that a later load can tell whether the
    factory still builds the same base; `adapter` = the PEFT adapter name the checkpoint was loaded into
    (None unless the checkpoint is a PEFT adapter's `save_pretrained` state)."""

    from_factory: tuple[str, ...] = ()
    factory_sha256: str | None = None
    adapter: str | None = None

    @property
    def partial(self) -> bool:
        return bool(self.from_factory)


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> LoadReport:
    """load_state_dict with a message that names what does not match; returns a `LoadReport`.

    Full checkpoints load strictly. Tied parameters (one tensor under several names, e.g. an LM head
    sharing the embedding) may be present once in `state` (Hugging Face writes a tied tensor once): the
    missing names are filled from the present one. When several names of one tied tensor are present their
    values must be equal.

    Adapter-only checkpoints (PEFT `save_pretrained` writes only the adapter's weights; the frozen base comes
    from the task's model factory) load over the base: when the model is a PEFT model and the checkpoint's
    keys are its adapter's state as PEFT saves it (`...lora_A.weight` for the model's
    `...lora_A.default.weight`), through peft's own `set_peft_model_state_dict`; otherwise when the
    checkpoint's keys are a subset of the model's. Either way every key the checkpoint lacks must be a
    frozen parameter (requires_grad False) or a buffer of the model as the factory built it, never a
    trainable one (the traced parameters are trainable): CheckpointError naming the first trainable
    parameter missing otherwise.

    Raises CheckpointError (one line) on missing trainable parameters, unexpected keys or shape mismatches."""
    own = model.state_dict()
    state = _fill_tied(model, dict(state), where)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not missing and not unexpected and not shapes:
        model.load_state_dict(state, strict=True)
        return LoadReport()
    if unexpected and _is_peft_model(model):
        report = _load_peft_adapter(model, state, where)
        if report is not None:
            return report
    if missing and not unexpected and not shapes:
        _refuse_missing_trainable(model, missing, where)
        digest = _factory_digest(own, missing)
        model.load_state_dict(state, strict=False)
        return LoadReport(tuple(missing), digest)
    parts = []
    if missing:
        parts.append(f"missing keys {missing[:5]}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected[:5]}")
    if shapes:
        parts.append("shape mismatch " + "; ".join(shapes[:5]))
    hint = _prefix_hint(set(own), set(state))
    raise CheckpointError(f"{where} does not match the model: " + ", ".join(parts) + hint)


def _trainable_names(model: nn.Module) -> dict[str, str]:
    """state-dict key -> canonical parameter name, for every parameter that requires grad (tied names too)."""
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    return {key: trainable[id(t)] for key, t in model.state_dict(keep_vars=True).items() if id(t) in trainable}


def _refuse_missing_trainable(model: nn.Module, missing: list[str], where: str) -> None:
    trainable = _trainable_names(model)
    lacking = [k for k in missing if k in trainable]
    if lacking:
        raise CheckpointError(
            f"{where} lacks the trainable parameter{'s' if len(lacking) > 1 else ''} {lacking[:5]}"
            f"{' ...' if len(lacking) > 5 else ''}: a checkpoint may leave out only frozen parameters "
            "(requires_grad False) and buffers, which the task's model factory provides (an adapter-only "
            f"checkpoint over a frozen base); {len(missing)} keys are missing in all. Save every trainable "
            "parameter, or freeze what the checkpoint does not hold")


def _factory_digest(own: dict[str, torch.Tensor], keys: list[str]) -> str:
    digest = hashlib.sha256()
    for key in sorted(keys):
        tensor = own[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "active_adapter") and \
        type(model).__module__.startswith("peft.")


def _load_peft_adapter(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> LoadReport | None:
    """Load a PEFT adapter state (keys as `save_pretrained` writes them) into its PEFT model with peft's own
    `set_peft_model_state_dict`; None when the keys are not the adapter's (the caller then refuses)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    adapter = model.active_adapter
    if not isinstance(adapter, str):
        raise CheckpointError(f"{where}: the PEFT model has several active adapters {list(adapter)[:5]}; an "
                              "adapter checkpoint holds one: activate one adapter in the task's model factory")
    expected = get_peft_model_state_dict(model, adapter_name=adapter)
    if set(expected) != set(state):
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if set(state) & set(expected):  # an adapter checkpoint, but not of this adapter configuration
            raise CheckpointError(f"{where} is not a checkpoint of the PEFT adapter the task builds "
                                  f"({adapter!r}): adapter keys missing {missing[:5]}, unexpected {extra[:5]}; "
                                  "build the task's PEFT model with the adapter_config.json it was trained with")
        return None
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if tuple(state[k].shape) != tuple(v.shape)]
    if shapes:
        raise CheckpointError(f"{where} does not match the PEFT adapter {adapter!r}: shape mismatch "
                              + "; ".join(shapes[:5]))
    # get_peft_model_state_dict returns the model's own tensors (renamed): what it covers is loaded, by storage
    loaded = {(t.data_ptr(), tuple(t.shape)) for t in expected.values()}
    own = model.state_dict()
    missing = sorted(k for k, t in own.items() if (t.data_ptr(), tuple(t.shape)) not in loaded)
    _refuse_missing_trainable(model, missing, where)
    digest = _factory_digest(own, missing)
    set_peft_model_state_dict(model, state, adapter_name=adapter)
    after = get_peft_model_state_dict(model, adapter_name=adapter)
    wrong = [k for k, v in state.items() if not torch.equal(after[k], v.to(after[k].dtype))]
    if wrong:
        raise CheckpointError(f"{where}: peft did not load the adapter weights {wrong[:5]} into the model")
    return LoadReport(tuple(missing), digest, adapter)


def _fill_tied(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    for names in groups.values():
        if len(names) < 2:
            continue
        present = [n for n in names if n in state]
        if not present:
            continue
        first = state[present[0]]
        for other in present[1:]:
            if state[other].shape != first.shape or not torch.equal(state[other], first):
                raise CheckpointError(f"{where}: the model ties {present[0]!r} and {other!r} (one tensor), but the "
                                      "checkpoint holds different values for them")
        for name in names:
            state.setdefault(name, first)
    return state


def _prefix_hint(own: set[str], found: set[str]) -> str:
    """A hint when the checkpoint's keys are the model's under a prefix (e.g. Lightning's 'model.')."""
    firsts = {k.split(".", 1)[0] for k in found if "." in k}
    for first in sorted(firsts):
        prefix = first + "."
        stripped = {k[len(prefix):] for k in found if k.startswith(prefix)}
        if stripped and len(stripped & own) >= max(1, len(own) // 2):
            return (f"; its keys are the model's under the prefix {prefix!r}: set checkpoint_prefix = "
                    f"\"{prefix}\" in the config")
    sample = sorted(found)[:5]
    return f" (keys found: {sample}{' ...' if len(found) > 5 else ''}; {RESAVE_HINT})"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
