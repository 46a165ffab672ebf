"""`StepWeights`: the weight w of every traced parameter coordinate at one checkpoint, so that

    TracIn_i(z, z') = sum_p <w_p (.) grad_p l(w_i, z), grad_p l(w_i, z')>          (p: traced parameters)

is the first-order effect of the step the optimizer took on z (Pruthi et al., 2020, for SGD; the diagonal
preconditioner of Adam-type optimizers as in the TracIn-Adam variant of Xia et al., 2024, "LESS"):

    sgd       w = lr_g                                           (per parameter group g)
    adam      w = lr_g / (sqrt(v / (1 - beta2^step)) + eps)       Adam, AdamW (v = exp_avg_sq, or
                                                                 max_exp_avg_sq with amsgrad)
    rmsprop   w = lr_g / (sqrt(v) + eps)                          (v = square_avg; centered: minus grad_avg^2)
    adagrad   w = lr_g / (1 + (step - 1) lr_decay) / (sqrt(sum) + eps)

from the hyperparameters and state saved with the checkpoint. Decoupled weight decay (AdamW) and L2 decay
do not depend on the example and add nothing. With `momentum = "effective"`, SGD and RMSprop weights are
multiplied by (1 - dampening) / (1 - momentum): the total contribution of one gradient to all later steps
(Adam's first moment already sums to one: its w needs no such factor).

Coordinates whose second moment is exactly 0 were never moved by a gradient (e.g. the weights of an input
pixel that is always 0): 1 / (0 + eps) ~ 1e8 would make a query's gradient there dominate every estimate
while no training gradient is non-zero there. Their preconditioner is bounded by the largest one of the
same tensor among coordinates the optimizer did move (`bounded` counts them; a parameter with no state at
all takes the largest of the checkpoint).

The embedding stores sqrt(w) (.) g on both sides (training rows and queries): inner products, ||e||^2 =
self-influence and exact re-ranking are then one formula.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from indexer.optimizer.state import (
    PRECONDITIONED, OptimizerError, SavedOptimizer, _float, map_parameters, optimizer_kind,
)

FORMULAS = ("sgd", "adam", "rmsprop", "adagrad")
#: hyperparameters recorded per group in the manifest (those the formulas use)
_HYPER = ("betas", "eps", "amsgrad", "momentum", "dampening", "nesterov", "alpha", "centered", "lr_decay",
          "weight_decay", "decoupled_weight_decay")


@dataclass(frozen=True)
class StepOptions:
    """[optimizer] in the config. formula: "auto" (from the checkpoint's optimizer state) or "sgd" (the plain
    formula lr_g * g, per-group learning rates kept); groups: parameter patterns of the optimizer's groups,
    in order, for files that record no names; momentum: "ignore" | "effective"."""

    formula: str = "auto"
    groups: list[list[str]] | None = None
    momentum: str = "ignore"


@dataclass
class StepWeights:
    """w per traced parameter at one checkpoint: a float (one number for the whole tensor) or a tensor of the
    parameter's shape (float32, or float64 for float64 models). `groups` describe the optimizer's groups
    ({"lr", "params", hyperparameters}); `source` says where they were read, `mapping` how parameter
    numbers were named, `why` why this formula; `bounded` counts bounded preconditioner coordinates."""

    formula: str
    weights: dict[str, float | torch.Tensor]
    groups: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""
    mapping: str | None = None
    why: str = ""
    bounded: int = 0
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def uniform(cls, lr: float, names: list[str], source: str, why: str) -> "StepWeights":
        """Plain SGD with one learning rate for every parameter."""
        return cls("sgd", {n: float(lr) for n in names}, [{"lr": float(lr), "params": list(names)}], source, None, why)

    @property
    def lr(self) -> float:
        """The first group's learning rate (what a one-number summary of this checkpoint shows)."""
        return float(self.groups[0]["lr"]) if self.groups else float(next(iter(self.weights.values())))

    @property
    def scalar(self) -> float | None:
        """The one weight of every parameter when they all share it (plain SGD, one lr), else None."""
        values = list(self.weights.values())
        if all(isinstance(v, float) for v in values) and len(set(values)) == 1:
            return values[0]
        return None

    def block_weight(self, block) -> float | torch.Tensor:
        """The block's weights in its layout: a float when all its parameters share one scalar, else a
        tensor [m, n] (see indexer.capture.blocks.TracedBlock.assemble)."""
        values = [self.weights[p] for p in block.params]
        if all(isinstance(v, float) for v in values) and len(set(values)) == 1:
            return values[0]
        dtype = next((v.dtype for v in values if isinstance(v, torch.Tensor)), torch.float64)
        full = [v.to(dtype).unsqueeze(0) if isinstance(v, torch.Tensor)
                else torch.full((1, *shape), v, dtype=dtype) for v, shape in zip(values, block.shapes)]
        return block.assemble(full)[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor weights (for the index directory's step file)."""
        return {n: v.contiguous() for n, v in self.weights.items() if isinstance(v, torch.Tensor)}

    def to_json(self, file: str | None = None) -> dict[str, Any]:
        """The manifest entry: formula, groups (lr, params, hyperparameters), where they came from; `file`
        holds the tensor weights (absent when every weight is a group's lr)."""
        out = {"formula": self.formula, "why": self.why, "source": self.source, "mapping": self.mapping,
               "groups": self.groups, "bounded": self.bounded}
        if file is not None:
            out["file"] = file
        return out

    @classmethod
    def from_json(cls, entry: dict[str, Any], tensors: dict[str, torch.Tensor], names: list[str],
                  where: str) -> "StepWeights":
        """Rebuild from a manifest entry and its file's tensors (validated: every traced parameter has a finite
        weight > 0 of its shape). Raises OptimizerError naming the parameter."""
        formula = entry.get("formula")
        if formula not in FORMULAS:
            raise OptimizerError(f"{where}: unknown step formula {formula!r}")
        weights: dict[str, float | torch.Tensor] = {}
        for group in entry.get("groups") or []:
            lr = group.get("lr")
            if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
                raise OptimizerError(f"{where}: a group's lr is {lr!r}, not a finite number > 0")
            scale = group.get("factor")
            scale = 1.0 if scale is None else scale
            if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
                raise OptimizerError(f"{where}: a group's momentum factor is {scale!r}")
            for name in group.get("params") or []:
                weights[str(name)] = float(lr) * float(scale)
        for name, tensor in tensors.items():
            if not bool(torch.isfinite(tensor).all()) or not bool((tensor > 0).all()):
                raise OptimizerError(f"{where}: the step weights of {name!r} are not all finite and > 0")
            weights[name] = tensor
        missing = [n for n in names if n not in weights]
        if missing:
            raise OptimizerError(f"{where}: no step weight for traced parameter(s) {missing[:5]}")
        return cls(formula, {n: weights[n] for n in names}, list(entry.get("groups") or []), str(entry.get("source", "")),
                   entry.get("mapping"), str(entry.get("why", "")), int(entry.get("bounded", 0)))


def _checked_lr(value: Any, where: str) -> float:
    lr = _float(value)
    if not math.isfinite(lr) or lr < 0:
        raise OptimizerError(f"{where}: lr is {value!r}, not a finite number >= 0")
    return lr


def step_weights(saved: SavedOptimizer | None, model: nn.Module, traced: list[str], options: StepOptions,
                 config_lr: float | dict[str, float] | None, file_lr: float | None, where: str,
                 dtype: torch.dtype = torch.float32) -> StepWeights:
    """The StepWeights of one checkpoint for the `traced` parameter names of `model` (weights loaded).

    saved: the optimizer state saved with the checkpoint (indexer.optimizer.state), or None; config_lr: the
    config's lr (one number, or a table {parameter pattern: lr}); file_lr: the lr the file records (the lr
    in force at its last step). Raises OptimizerError (one line naming the file, group or parameter) when the
    step cannot be weighed exactly: unmapped groups, a traced parameter the optimizer did not train, an
    optimizer whose step is not lr * Gamma (.) g, maximize=True, disagreeing learning rates."""
    params = dict(model.named_parameters())
    kind = optimizer_kind(saved) if saved is not None else None
    if saved is not None and saved.trainer and not saved.groups:
        kind = "adam"  # a Trainer folder saved without optimizer.pt: the Trainer's default optimizer
    have_groups = saved is not None and bool(saved.groups)
    mapping = map_parameters(saved, model, options.groups, where, traced) if have_groups else None
    group_of: dict[str, int] = {}
    if mapping is not None:
        for g, names in enumerate(mapping.groups):
            for name in names:
                group_of[name] = g
        untrained = [n for n in traced if n not in group_of]
        if untrained:
            raise OptimizerError(f"{where}: traced parameter(s) {untrained[:5]} are in none of the optimizer's groups "
                                 "(the optimizer never moved them): leave them out of `layers`")
        for group in saved.groups:
            if group.get("maximize"):
                raise OptimizerError(f"{where}: the optimizer maximizes (maximize=True): its steps climb the loss; "
                                     "TracIn's sign convention does not hold")

    # -- learning rates ---------------------------------------------------------------------------
    lrs, source = _learning_rates(saved, mapping, group_of, traced, config_lr, file_lr, where)
    zero = [n for n in traced if lrs[n] <= 0]
    if zero:
        hint = (" (a Trainer folder whose trainer_state.json logged no lr at its step: the scheduler's next lr is 0 "
                "at the end of the schedule; log every save step, e.g. logging_steps = save_steps, or give lr in "
                "the config)" if saved is not None and saved.trainer and saved.logged_lr is None else "")
        raise OptimizerError(f"{where}: traced parameter(s) {zero[:5]} have lr 0 (the optimizer does not move them "
                             f"at this checkpoint){hint}: leave them out of `layers` or drop this checkpoint")

    # -- formula ----------------------------------------------------------------------------------
    warnings: list[str] = []
    has_state = have_groups and any(saved.state.get(n) for n in mapping.names)
    if options.formula == "sgd":
        formula, why = "sgd", "[optimizer] formula = \"sgd\" in the config (the plain formula, forced)"
    elif kind is None or kind == "sgd":
        formula = "sgd"
        why = ("the checkpoint records no optimizer: plain TracIn with its lr" if kind is None
               else "SGD: the step is lr * g")
    elif kind in PRECONDITIONED and has_state:
        formula, why = kind, f"{_display(saved, kind)} state saved with the checkpoint ({saved.source})"
    elif kind in PRECONDITIONED or (kind == "unknown" and not has_state):
        formula = "sgd"
        why = f"{_display(saved, kind)} without its state: the plain formula, a heuristic for this optimizer"
        warnings.append(f"{where}: trained with {_display(saved, kind)} but the checkpoint carries no optimizer "
                        "state; scored with the plain SGD formula, a heuristic for it (save the optimizer state "
                        "with the checkpoint for the optimizer-aware score)")
    else:
        keys = sorted(set().union(*(set(s) for s in saved.state.values())))[:6] if saved.state else []
        raise OptimizerError(f"{where}: the optimizer ({_display(saved, kind)}{', state ' + str(keys) if keys else ''}) "
                             "does not take a step of the form lr * Gamma (.) g with a diagonal Gamma from its state; "
                             "set [optimizer] formula = \"sgd\" to score it with the plain formula (a heuristic)")

    factor = {n: _momentum_factor(saved.groups[group_of[n]], formula, options.momentum) if mapping else 1.0
              for n in traced}
    weights: dict[str, float | torch.Tensor] = {}
    bounded = 0
    if formula == "sgd":
        for n in traced:
            weights[n] = lrs[n] * factor[n]
    else:
        gammas, bounded = _preconditioners(saved, mapping, group_of, traced, params, formula, where)
        for n in traced:
            weights[n] = (gammas[n] * (lrs[n] * factor[n])).to(dtype)
    groups = _describe_groups(saved, mapping, lrs, factor, traced)
    return StepWeights(formula, weights, groups, source, mapping.how if mapping else None, why, bounded, warnings)


def _display(saved: SavedOptimizer | None, kind: str | None) -> str:
    if saved is not None and saved.trainer and not saved.groups:
        return "the Hugging Face Trainer (AdamW unless told otherwise; no optimizer.pt)"
    if kind == "unknown":
        keys = sorted(set().union(*(set(g) for g in saved.groups)) - {"params", "param_names"}) if saved.groups else []
        return f"an optimizer of unknown kind (group keys {keys[:8]})"
    if saved is not None and saved.class_name:
        return saved.class_name.rsplit(".", 1)[-1]
    return {"adam": "Adam/AdamW", "rmsprop": "RMSprop", "adagrad": "Adagrad", "sgd": "SGD"}.get(kind or "", str(kind))


def _learning_rates(saved, mapping, group_of, traced, config_lr, file_lr, where) -> tuple[dict[str, float], str]:
    """lr per traced parameter and where it came from (see step_weights)."""
    if isinstance(config_lr, dict):
        out = {}
        for name in traced:
            hit = next((lr for pattern, lr in config_lr.items()
                        if fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")), None)
            if hit is None:
                raise OptimizerError(f"{where}: the config's lr table {sorted(config_lr)[:5]} has no entry for traced "
                                     f"parameter {name!r}")
            out[name] = _checked_lr(hit, f"{where}: lr of {name!r}")
        return out, "the config's lr table"
    group_lrs = None
    if mapping is not None:
        group_lrs = [_checked_lr(g.get("lr"), f"{where}: group {i}") for i, g in enumerate(saved.groups)]
    recorded = file_lr if file_lr is not None else (saved.logged_lr if saved is not None else None)
    if config_lr is not None:
        if group_lrs is not None:
            used = {group_lrs[group_of[n]] for n in traced}
            if len(used) > 1:
                raise OptimizerError(f"{where}: the config gives one lr ({config_lr:g}) but the optimizer's groups use "
                                     f"different ones ({saved.describe_groups()}); remove lr from the config, or "
                                     "give a table lr = {\"pattern\" = lr, ...}")
        return {n: float(config_lr) for n in traced}, "the config"
    if group_lrs is not None:
        source = f"the optimizer's param_groups ({saved.source})"
        if saved.trainer and recorded is None:
            source += (f": the lrs the scheduler set for the step after {saved.global_step} (trainer_state.json logged "
                       "no learning_rate at the checkpoint's step)")
        if recorded is not None:
            first = group_lrs[0]
            if first <= 0:
                if any(x != first for x in group_lrs):
                    raise OptimizerError(f"{where}: group 0's saved lr is 0, so the groups' lrs cannot be scaled to "
                                         f"the lr in force ({recorded:g}); give lr in the config")
                group_lrs = [recorded for _ in group_lrs]
            else:
                group_lrs = [recorded * (x / first) for x in group_lrs]  # group 0: exactly the recorded lr
            source = (f"the lr in force at the checkpoint ({recorded:g}, "
                      f"{'trainer_state.json' if file_lr is None else 'recorded in the file'}), "
                      f"groups in the ratios of their saved lrs ({saved.source})")
        return {n: group_lrs[group_of[n]] for n in traced}, source
    if recorded is not None:
        return {n: float(recorded) for n in traced}, "the lr recorded in the checkpoint"
    raise OptimizerError(f"{where} records no lr; give lr in the config")


def _momentum_factor(group: dict[str, Any], formula: str, momentum: str) -> float:
    if momentum != "effective" or formula not in ("sgd", "rmsprop"):
        return 1.0
    mu = _float(group.get("momentum", 0.0))
    if not math.isfinite(mu) or mu <= 0:
        return 1.0
    if mu >= 1:
        raise OptimizerError(f"momentum {mu:g} >= 1: the effective step diverges")
    dampening = _float(group.get("dampening", 0.0)) if formula == "sgd" else 0.0
    return (1.0 - (dampening if math.isfinite(dampening) else 0.0)) / (1.0 - mu)


def _preconditioners(saved: SavedOptimizer, mapping, group_of, traced, params, formula: str, where: str
                     ) -> tuple[dict[str, torch.Tensor], int]:
    """Gamma per traced parameter (float64, the parameter's shape), bounded where the second moment is 0."""
    number_of = {name: number for number, name in mapping.names.items()}
    raw: dict[str, torch.Tensor | None] = {}
    for name in traced:
        group = saved.groups[group_of[name]]
        state = saved.state.get(number_of[name]) or {}
        raw[name] = _gamma(formula, group, state, tuple(params[name].shape), f"{where}: parameter {name!r}")
    moved = [g[torch.isfinite(g)] for g in raw.values() if g is not None and bool(torch.isfinite(g).any())]
    if not moved:
        raise OptimizerError(f"{where}: the optimizer's second moments are 0 for every traced parameter (no step "
                             "taken yet?): nothing to weigh; drop this checkpoint or set [optimizer] formula = \"sgd\"")
    overall = max(float(g.max()) for g in moved)
    out, bounded = {}, 0
    for name, gamma in raw.items():
        if gamma is None:
            out[name] = torch.full(tuple(params[name].shape), overall, dtype=torch.float64)
            bounded += params[name].numel()
            continue
        never = ~torch.isfinite(gamma)
        if bool(never.any()):
            ceiling = float(gamma[~never].max()) if bool((~never).any()) else overall
            gamma = torch.where(never, torch.full_like(gamma, ceiling), gamma)
            bounded += int(never.sum())
        out[name] = gamma
    return out, bounded


def _gamma(formula: str, group: dict[str, Any], state: dict[str, Any], shape: tuple, where: str
           ) -> torch.Tensor | None:
    """Gamma [shape] float64, +inf where the second moment is exactly 0; None when the parameter has no state."""
    eps = _float(group.get("eps", 1e-8 if formula == "adam" else 1e-10))
    if not math.isfinite(eps) or eps < 0:
        raise OptimizerError(f"{where}: eps is {group.get('eps')!r}")

    def tensor(key: str) -> torch.Tensor | None:
        value = state.get(key)
        if value is None:
            return None
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            raise OptimizerError(f"{where}: state {key!r} is not a tensor of the parameter's shape {shape}")
        value = value.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise OptimizerError(f"{where}: state {key!r} holds negative or non-finite values")
        return value

    if formula == "adam":
        second = tensor("max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq")
        if second is None:
            return None
        step = _float(state.get("step"))
        betas = group.get("betas")
        beta2 = _float(betas[1]) if isinstance(betas, (list, tuple)) and len(betas) == 2 else float("nan")
        if not (math.isfinite(step) and step >= 1 and 0 <= beta2 < 1):
            raise OptimizerError(f"{where}: Adam state step {state.get('step')!r} / betas {betas!r} are not usable")
        denominator = (second / (1.0 - beta2 ** step)).sqrt() + eps
    elif formula == "rmsprop":
        second = tensor("square_avg")
        if second is None:
            return None
        if group.get("centered"):
            mean = state.get("grad_avg")
            if not isinstance(mean, torch.Tensor):
                raise OptimizerError(f"{where}: centered RMSprop state lacks grad_avg")
            second = (second - mean.detach().to("cpu", torch.float64) ** 2).clamp(min=0)
        denominator = second.sqrt() + eps
    else:  # adagrad
        second = tensor("sum")
        if second is None:
            return None
        step = _float(state.get("step", 1))
        lr_decay = _float(group.get("lr_decay", 0.0))
        if not (math.isfinite(step) and step >= 1 and math.isfinite(lr_decay) and lr_decay >= 0):
            raise OptimizerError(f"{where}: Adagrad step {state.get('step')!r} / lr_decay {group.get('lr_decay')!r}")
        denominator = (second.sqrt() + eps) * (1.0 + (step - 1.0) * lr_decay)
    gamma = 1.0 / denominator
    return torch.where(second == 0, torch.full_like(gamma, math.inf), gamma)


def _describe_groups(saved, mapping, lrs: dict[str, float], factor: dict[str, float], traced: list[str]
                     ) -> list[dict[str, Any]]:
    """Manifest groups: {"lr", "params" (traced ones), "factor" (momentum, when not 1), "index" (the
    optimizer's group), hyperparameters}, one per (optimizer group, lr, factor) holding a traced parameter."""
    keyed: dict[tuple, dict[str, Any]] = {}
    for name in traced:
        g = None
        if mapping is not None:
            g = next(i for i, names in enumerate(mapping.groups) if name in names)
        key = (g, lrs[name], factor[name])
        if key not in keyed:
            entry: dict[str, Any] = {"lr": lrs[name], "params": []}
            if factor[name] != 1.0:
                entry["factor"] = factor[name]
            if g is not None:
                entry["index"] = g
                for hyper in _HYPER:
                    value = saved.groups[g].get(hyper)
                    if value is None:
                        continue
                    if isinstance(value, (tuple, list)):
                        entry[hyper] = [_float(v) for v in value]
                    elif isinstance(value, bool):
                        entry[hyper] = value
                    else:
                        entry[hyper] = _float(value)
            keyed[key] = entry
        keyed[key]["params"].append(name)
    return list(keyed.values())
