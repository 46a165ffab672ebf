"""The optimizer state saved with a checkpoint, read without unpickling objects, and its parameter groups
mapped to the model's parameter names.

Where it is read from (`read_saved_optimizer`):

    tracin checkpoint (save_checkpoint)   "optimizer_state_dict" + "optimizer_param_names" + "optimizer_class"
    PyTorch training dict                  "optimizer_state_dict" or "optimizer" (optimizer.state_dict())
    Lightning checkpoint                   "optimizer_states": [optimizer.state_dict()] (one optimizer)
    Hugging Face Trainer checkpoint-N/     optimizer.pt (optimizer.state_dict()) and trainer_state.json (the
                                           learning rate logged at the checkpoint's global_step)

An `optimizer.state_dict()` numbers the parameters 0, 1, ... in the order its groups list them and does
not name them (unless the optimizer was built from `named_parameters()`: torch then records
"param_names"). `map_parameters` gives each number its parameter name, from recorded names, from the
config's group patterns, or from the one hypothesis that fits every saved state tensor's shape:
    model order      one group, or groups whose concatenation is the model's parameters in order (all of
                     them, the trainable ones, or the traced ones: an optimizer over the traced layers only)
    Trainer groups   the Hugging Face Trainer's split: parameters with weight decay, then those without
                     (biases and normalisation weights), each in model order
A mapping that cannot be established is refused in one line naming the groups (`OptimizerError`).
"""
from __future__ import annotations

import fnmatch
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from indexer.checkpoints import CheckpointError

#: payload keys under which training code saves optimizer state
OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optimizer_states")


class OptimizerError(CheckpointError):
    """The optimizer state saved with a checkpoint cannot be used exactly; one line naming the file and group."""


@dataclass
class SavedOptimizer:
    """An `optimizer.state_dict()` found beside a checkpoint's weights.

    groups: the param_groups as saved (hyperparameters, "params": the parameter numbers);
    state: parameter number -> its state ({"step", "exp_avg_sq", ...}; tensors on the CPU);
    names: per group, the parameter names when the file records them (else None);
    class_name: the optimizer's class when recorded (e.g. "torch.optim.adamw.AdamW");
    source: where it was read, for messages and the manifest;
    trainer: read from a Hugging Face Trainer folder (its groups follow the Trainer's weight-decay split);
    logged_lr: the learning rate trainer_state.json logged at the checkpoint's global_step (the lr the
    optimizer used for that step; optimizer.pt holds the one the scheduler set for the next step)."""

    groups: list[dict[str, Any]]
    state: dict[int, dict[str, Any]]
    names: list[list[str]] | None = None
    class_name: str | None = None
    source: str = ""
    trainer: bool = False
    logged_lr: float | None = None
    global_step: int | None = None

    @property
    def numbers(self) -> list[int]:
        return [int(i) for g in self.groups for i in g["params"]]

    def describe_groups(self) -> str:
        """'group 0: lr 0.03, 4 tensors; group 1: lr 0.3, 2 tensors' (for one-line messages)."""
        return "; ".join(f"group {i}: lr {_float(g.get('lr')):g}, {len(g['params'])} tensors"
                         for i, g in enumerate(self.groups))


def _float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0]) if value.numel() else float("nan")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return float("nan")
    return float(value)


def _as_optimizer_state(value: Any, where: str) -> dict[str, Any] | None:
    """An optimizer.state_dict() (dict with param_groups and state), or None when `value` is not one."""
    if not isinstance(value, dict) or "param_groups" not in value:
        return None
    groups, state = value.get("param_groups"), value.get("state", {})
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups) or not isinstance(state, dict):
        raise OptimizerError(f"{where}: the saved optimizer state is malformed (param_groups must be a list of "
                             "groups with a 'params' list, state a dict)")
    return value


def saved_optimizer_from_payload(payload: dict[str, Any], where: str) -> SavedOptimizer | None:
    """The optimizer state of a loaded checkpoint payload (see the module docstring), or None."""
    for key in OPTIMIZER_KEYS:
        if key not in payload:
            continue
        value = payload[key]
        if key == "optimizer_states":
            if not isinstance(value, list) or not value:
                continue
            if len(value) > 1:
                raise OptimizerError(f"{where}: the checkpoint holds the state of {len(value)} optimizers "
                                     "(optimizer_states); one optimizer per model is supported")
            value = value[0]
        found = _as_optimizer_state(value, f"{where} ({key})")
        if found is None:
            continue
        names = payload.get("optimizer_param_names")
        if names is not None and not (isinstance(names, list) and all(
                isinstance(g, list) and all(isinstance(n, str) for n in g) for g in names)):
            raise OptimizerError(f"{where}: optimizer_param_names must be a list of lists of parameter names")
        class_name = payload.get("optimizer_class")
        return _saved(found, names, class_name if isinstance(class_name, str) else None, f"{key} in {where}")
    class_name = payload.get("optimizer_class")
    if isinstance(class_name, str):  # recorded without its state (save_checkpoint(..., optimizer_state=False))
        return SavedOptimizer([], {}, None, class_name, f"optimizer_class in {where} (no state saved)")
    return None


def _saved(found: dict[str, Any], names, class_name: str | None, source: str, **kwargs) -> SavedOptimizer:
    groups = [dict(g) for g in found["param_groups"]]
    recorded = [g.get("param_names") for g in groups]
    if names is None and all(isinstance(r, list) and all(isinstance(n, str) for n in r) for r in recorded) and groups:
        names = [list(r) for r in recorded]  # torch >= 2.6 records names for named_parameters() optimizers
    state = {}
    for key, value in found["state"].items():
        try:
            number = int(key)
        except (TypeError, ValueError):
            raise OptimizerError(f"{source}: state key {key!r} is not a parameter number") from None
        state[number] = dict(value) if isinstance(value, dict) else {}
    return SavedOptimizer(groups, state, names, class_name, source, **kwargs)


def read_saved_optimizer(path: str | Path) -> SavedOptimizer | None:
    """The optimizer state saved with the checkpoint at `path` (a file or a Trainer `checkpoint-N/` folder),
    or None when it carries none (a plain state_dict, a safetensors file, a save_pretrained folder)."""
    from indexer.checkpoints import _is_state, _torch_load

    path = Path(path)
    if path.is_dir():
        return read_trainer_folder(path)
    if path.suffix == ".safetensors" or not path.is_file():
        return None
    payload = _torch_load(path)
    if isinstance(payload, dict) and not _is_state(payload):
        return saved_optimizer_from_payload(payload, path.name)
    return None


def read_trainer_folder(path: Path) -> SavedOptimizer | None:
    """optimizer.pt and trainer_state.json of a Hugging Face Trainer `checkpoint-N/` folder (None when the
    folder has neither). optimizer.pt is read with torch.load(weights_only=True)."""
    optimizer_file, state_file = path / "optimizer.pt", path / "trainer_state.json"
    logged, step = _logged_lr(state_file)
    if not optimizer_file.is_file():
        if not state_file.is_file():
            return None
        return SavedOptimizer([], {}, None, None, f"trainer_state.json in {path.name}/ (no optimizer.pt)",
                              trainer=True, logged_lr=logged, global_step=step)
    from indexer.checkpoints import _torch_load

    found = _as_optimizer_state(_torch_load(optimizer_file), f"{optimizer_file}")
    if found is None:
        raise OptimizerError(f"{optimizer_file}: not an optimizer state_dict (no param_groups)")
    return _saved(found, None, None, f"optimizer.pt in {path.name}/", trainer=True, logged_lr=logged,
                  global_step=step)


def _logged_lr(state_file: Path) -> tuple[float | None, int | None]:
    """(learning_rate logged at global_step, global_step) from trainer_state.json, or Nones."""
    if not state_file.is_file():
        return None, None
    try:
        data = json.loads(state_file.read_text())
        step = int(data["global_step"])
        history = data.get("log_history") or []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OptimizerError(f"{state_file}: unreadable trainer_state.json ({exc})") from None
    for entry in history:
        if isinstance(entry, dict) and entry.get("step") == step and "learning_rate" in entry:
            lr = entry["learning_rate"]
            if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
                raise OptimizerError(f"{state_file}: learning_rate at step {step} is {lr!r}, not a number")
            return float(lr), step
    return None, step


# -- the kind of optimizer ----------------------------------------------------------------------------

#: optimizers whose step on a gradient g is lr * Gamma (.) g with a diagonal Gamma from their state
PRECONDITIONED = ("adam", "rmsprop", "adagrad")


def optimizer_kind(saved: SavedOptimizer) -> str:
    """"sgd" | "adam" | "rmsprop" | "adagrad", or the name of a known optimizer whose step is not
    lr * Gamma (.) g ("nadam", "radam", "adamax", "adadelta", "rprop", "asgd", "lbfgs", "adafactor", "lion"),
    or "unknown". From the recorded class when there is one, else from the keys of its groups and state."""
    if saved.class_name:
        name = saved.class_name.rsplit(".", 1)[-1].lower()
        known = {"sgd": "sgd", "adam": "adam", "adamw": "adam", "rmsprop": "rmsprop", "adagrad": "adagrad"}
        if name in known:
            return known[name]
        if name in ("nadam", "radam", "adamax", "adadelta", "rprop", "asgd", "lbfgs", "sparseadam", "adafactor",
                    "lion"):
            return name
        # another class (a wrapper or a subclass): judged by its groups' and state's keys below
    keys = set().union(*(set(g) for g in saved.groups)) if saved.groups else set()
    state_keys = set().union(*(set(s) for s in saved.state.values())) if saved.state else set()
    if "momentum_decay" in keys:
        return "nadam"
    if "rho" in keys:
        return "adadelta"
    if "etas" in keys or "step_sizes" in keys:
        return "rprop"
    if "lambd" in keys and "t0" in keys:
        return "asgd"
    if "history_size" in keys or "line_search_fn" in keys:
        return "lbfgs"
    if "clip_threshold" in keys or "exp_avg_sq_row" in state_keys:
        return "adafactor"
    if "exp_inf" in state_keys:
        return "adamax"
    if "betas" in keys and "amsgrad" in keys:
        return "adam"
    if "betas" in keys and "decoupled_weight_decay" in keys and "amsgrad" not in keys:
        return "radam"
    if "betas" in keys and "eps" not in keys:
        return "lion"
    if "alpha" in keys and "centered" in keys:
        return "rmsprop"
    if "lr_decay" in keys and "initial_accumulator_value" in keys:
        return "adagrad"
    if {"momentum", "dampening", "nesterov"} <= keys:
        return "sgd"
    return "unknown"


# -- parameter numbers -> names ----------------------------------------------------------------------

#: the state tensor whose shape is the parameter's, per kind (for checking a mapping)
_SHAPED = ("exp_avg_sq", "max_exp_avg_sq", "exp_avg", "square_avg", "sum", "momentum_buffer")


@dataclass
class Mapping:
    """Parameter number -> name, and how it was established (for the manifest)."""

    names: dict[int, str]
    how: str
    groups: list[list[str]] = field(default_factory=list)


def map_parameters(saved: SavedOptimizer, model: nn.Module, group_patterns: list[list[str]] | None,
                   where: str, traced: list[str] | None = None) -> Mapping:
    """Name every parameter number of `saved` with one of `model`'s parameter names (see the module
    docstring for the rules). Raises OptimizerError in one line naming the groups when it cannot."""
    numbers_ = saved.numbers
    if len(set(numbers_)) != len(numbers_):
        raise OptimizerError(f"{where}: the saved optimizer lists a parameter in two groups ({saved.describe_groups()})")
    params = dict(model.named_parameters())
    if saved.names is not None:
        if [len(n) for n in saved.names] != [len(g["params"]) for g in saved.groups]:
            raise OptimizerError(f"{where}: the recorded parameter names do not match the optimizer's groups "
                                 f"({saved.describe_groups()})")
        names = [_own_name(n, params, where) for group in saved.names for n in group]
        return _checked(saved, dict(zip(numbers_, names)), params, "parameter names recorded with the optimizer",
                        where, strict=True)
    if group_patterns is not None:
        if len(group_patterns) != len(saved.groups):
            raise OptimizerError(f"{where}: [optimizer] groups gives {len(group_patterns)} groups of patterns but the "
                                 f"saved optimizer has {len(saved.groups)} ({saved.describe_groups()})")
        taken: set[str] = set()
        names = []
        for i, patterns in enumerate(group_patterns):
            members = [n for n in params if n not in taken and any(_matches(n, p) for p in patterns)]
            if len(members) != len(saved.groups[i]["params"]):
                raise OptimizerError(f"{where}: [optimizer] groups[{i}] {patterns} matches {len(members)} parameters "
                                     f"but the optimizer's group {i} holds {len(saved.groups[i]['params'])}")
            taken.update(members)
            names.extend(members)
        return _checked(saved, dict(zip(numbers_, names)), params, "[optimizer] groups of the config", where,
                        strict=True)
    candidates = _hypotheses(saved, model, traced)
    fitting = [(how, mapping) for how, mapping in candidates if _fits(saved, mapping, params)]
    differing = {tuple(sorted(m.items())) for _, m in fitting}
    hint = ("save checkpoints with indexer.checkpoints.save_checkpoint(path, model, optimizer) (it records "
            "the names), build the optimizer from model.named_parameters(), or give [optimizer] groups = "
            "[[\"pattern\", ...], ...] in the config")
    if len(differing) > 1:
        raise OptimizerError(f"{where}: the optimizer's parameter groups ({saved.describe_groups()}) fit more than "
                             f"one assignment of the model's parameters; {hint}")
    if not fitting:
        raise OptimizerError(f"{where}: cannot tell which of the model's parameters the optimizer's groups hold "
                             f"({saved.describe_groups()}; {len(numbers_)} tensors, the model has {len(params)} "
                             f"parameters, {sum(p.requires_grad for p in params.values())} trainable); {hint}")
    how, mapping = fitting[0]
    if len(saved.groups) > 1 and how != "Trainer weight-decay groups" and not _same_hyper(saved) \
            and not _membership_by_shape(saved):
        raise OptimizerError(f"{where}: the optimizer's groups differ ({saved.describe_groups()}) and the file does "
                             f"not say which parameters each holds (parameters of one shape sit in different "
                             f"groups, or no state tensor shows their shapes); {hint}")
    shaped = any(any(isinstance(s.get(k), torch.Tensor) for k in _SHAPED) for s in saved.state.values())
    return _checked(saved, mapping, params, how + (" (checked against every state tensor's shape)" if shaped else ""),
                    where, strict=False)


def _own_name(name: str, params: dict[str, torch.Tensor], where: str) -> str:
    if name in params:
        return name
    for prefix in ("module.", "model."):  # DDP, Lightning
        if name.startswith(prefix) and name[len(prefix):] in params:
            return name[len(prefix):]
    raise OptimizerError(f"{where}: the optimizer names parameter {name!r}, which the model does not have")


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def _hypotheses(saved: SavedOptimizer, model: nn.Module, traced: list[str] | None = None
                ) -> list[tuple[str, dict[int, str]]]:
    numbers_ = saved.numbers
    names_all = [n for n, _ in model.named_parameters()]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    traced_order = [n for n in names_all if traced is not None and n in set(traced)]
    out = []
    for how, order in (("model order", names_all), ("model order, trainable parameters", trainable),
                       ("model order, traced parameters (an optimizer over the traced layers only)", traced_order)):
        if len(order) == len(numbers_):
            out.append((how, dict(zip(numbers_, order))))
    if len(saved.groups) == 2:
        decay = set(_trainer_decay_names(model))
        first = [n for n in trainable if n in decay]
        second = [n for n in trainable if n not in decay]
        if [len(first), len(second)] == [len(g["params"]) for g in saved.groups]:
            entry = ("Trainer weight-decay groups", dict(zip(numbers_, first + second)))
            if saved.trainer:
                out.insert(0, entry)
            else:
                out.append(entry)
    if saved.trainer and out and out[0][0] == "Trainer weight-decay groups":
        return out[:1]  # a Trainer folder: its own grouping rule, checked by shapes
    return out


def _trainer_decay_names(model: nn.Module) -> list[str]:
    """The parameters the Hugging Face Trainer applies weight decay to (its own rule when transformers is
    installed: not in a LayerNorm, no 'bias' / norm in the name)."""
    patterns = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]
    try:
        from transformers.trainer_pt_utils import get_parameter_names

        return list(get_parameter_names(model, [nn.LayerNorm], [p.pattern for p in patterns]))
    except ImportError:
        out = []
        for module_name, module in model.named_modules():
            if isinstance(module, nn.LayerNorm):
                continue
            for attr in module._parameters:
                name = f"{module_name}.{attr}" if module_name else attr
                if not any(p.search(name.lower()) for p in patterns):
                    out.append(name)
        return out


def _fits(saved: SavedOptimizer, mapping: dict[int, str], params: dict[str, torch.Tensor]) -> bool:
    for number, name in mapping.items():
        for key in _SHAPED:
            value = saved.state.get(number, {}).get(key)
            if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(params[name].shape):
                return False
    return True


def _same_hyper(saved: SavedOptimizer) -> bool:
    """Every group has the same hyperparameters (then group membership changes nothing)."""
    first = _hyper(saved.groups[0])
    return all(_same(_hyper(g), first) for g in saved.groups[1:])


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    """A group's hyperparameters that change the step on a gradient (not its parameters, not weight decay:
    decoupled weight decay does not depend on the example, and L2 decay adds the same term for every one)."""
    return {k: (_float(v) if isinstance(v, (numbers.Real, torch.Tensor)) and not isinstance(v, bool) else repr(v))
            for k, v in group.items() if k not in ("params", "param_names", "initial_lr", "weight_decay")}


def _membership_by_shape(saved: SavedOptimizer) -> bool:
    """Every state tensor shape occurs only in groups with the same hyperparameters: then each parameter's
    group follows from its shape, whatever order the groups listed the parameters in."""
    by_shape: dict[tuple, dict] = {}
    for group in saved.groups:
        hyper = _hyper(group)
        for number in group["params"]:
            state = saved.state.get(int(number), {})
            shapes = [tuple(state[k].shape) for k in _SHAPED if isinstance(state.get(k), torch.Tensor)]
            if not shapes:
                return False
            seen = by_shape.setdefault(shapes[0], hyper)
            if not _same(seen, hyper):
                return False
    return True


def _same(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) and isinstance(y, float):
            if not (x == y or (math.isnan(x) and math.isnan(y))):
                return False
        elif x != y:
            return False
    return True


def _checked(saved: SavedOptimizer, mapping: dict[int, str], params: dict[str, torch.Tensor], how: str, where: str,
             strict: bool) -> Mapping:
    if len(set(mapping.values())) != len(mapping):
        raise OptimizerError(f"{where}: the optimizer holds a parameter twice under different numbers")
    if strict and not _fits(saved, mapping, params):
        bad = next(n for n, name in mapping.items() if not _fits(saved, {n: name}, params))
        raise OptimizerError(f"{where}: the optimizer's state for parameter {mapping[bad]!r} does not have its shape "
                             f"{tuple(params[mapping[bad]].shape)} ({how})")
    groups = [[mapping[int(i)] for i in g["params"]] for g in saved.groups]
    return Mapping(mapping, how, groups)
