"""Traced blocks: which parameters are traced, grouped into the blocks whose per-example gradients
the capture computes and the projection maps.

A block is keyed by parameter *tensors*, never by module names: a tensor that several modules hold
(tied embeddings and language-model heads, a layer registered twice) is ONE block, and its per-example
gradient is the sum over all its uses. Each block has a layout [m, n] in which its per-example
gradient G is an m x n matrix:

    hooked Linear        weight (+ bias)   [out, in (+1)]       G = sum_t delta_t a_t^T  (a_t gets a trailing 1)
    hooked Conv2d        weight (+ bias)   [out, in*kh*kw (+1)]  the same with unfolded patches a_t
    hooked Embedding     weight            [num, dim]           G = sum_t e_{x_t} delta_t^T
    tied weight          weight            [rows, cols]         the sum of each holder's term above
    bias only            bias              [out, 1]             G = sum_t delta_t
    any other parameter  param             [numel, 1]           a per-example gradient from torch.func or a loop

`assemble` / `split` convert between a block's layout and its parameters' shapes, so routes that
produce parameter-shaped per-example gradients (torch.func, the per-example loop, the self-check)
land in the same layout as the hooks.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from indexer.config import ConfigError

#: module types with a factored fast route (hooks on the module's input and output gradient)
HOOK_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)


@dataclass(frozen=True)
class Use:
    """One module's use of a block: the module (its name in the model) and what it contributes.

    role: "weight+bias" | "weight" | "bias"."""

    module: str
    role: str


@dataclass(frozen=True)
class TracedBlock:
    """One traced block: its parameters (canonical names, in layout order), its layout [m, n] and, when
    every use is a module call of a hookable type, those uses (the hook route's candidates).

    kind: "linear" | "conv2d" | "embedding" (one module), "tied" (several modules share the weight),
    "bias" (a module's bias alone) or "param" (no factored route)."""

    name: str
    kind: str
    m: int
    n: int
    params: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    uses: tuple[Use, ...] = ()

    @property
    def size(self) -> int:
        return self.m * self.n

    @property
    def hookable(self) -> bool:
        return bool(self.uses)

    def assemble(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Parameter-shaped per-example gradients [B, *shape] (in `params` order) -> [B, m, n]."""
        B = grads[0].shape[0]
        if self.kind == "param":
            return grads[0].reshape(B, self.m, 1)
        if len(grads) == 1:
            return grads[0].reshape(B, self.m, -1)
        weight, bias = grads
        return torch.cat([weight.reshape(B, self.m, -1), bias.reshape(B, self.m, 1)], dim=2)

    def split(self, full: torch.Tensor) -> list[torch.Tensor]:
        """[B, m, n] -> parameter-shaped gradients [B, *shape] (the inverse of `assemble`)."""
        B = full.shape[0]
        if len(self.params) == 1:
            return [full.reshape(B, *self.shapes[0])]
        return [full[:, :, :-1].reshape(B, *self.shapes[0]), full[:, :, -1].reshape(B, *self.shapes[1])]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "shape": [self.m, self.n], "params": list(self.params),
                "uses": [{"module": u.module, "role": u.role} for u in self.uses]}


def _hook_eligible(module: nn.Module) -> str | None:
    """None when a module's weight can take the factored route, else why not."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups}"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str):
            return f"Conv2d with padding={module.padding!r}"
    if isinstance(module, nn.Embedding):
        if module.scale_grad_by_freq:
            return "Embedding with scale_grad_by_freq"
        # sparse=True only changes the layout autograd gives the weight's gradient (rows of the ids used);
        # the hooks never form that gradient, and the checks densify it (`indexer.capture.routes.dense_grad`)
    return None


def _weight_layout(module: nn.Module, with_bias: bool) -> tuple[str, int, int]:
    extra = 1 if with_bias else 0
    if isinstance(module, nn.Linear):
        return "linear", module.out_features, module.in_features + extra
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return "conv2d", module.out_channels, module.in_channels * kh * kw + extra
    assert isinstance(module, nn.Embedding)
    return "embedding", module.num_embeddings, module.embedding_dim


def _canonical_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Parameter tensor -> every (module name, module, attribute) that registers it directly."""
    out: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules():
        for attr, param in module._parameters.items():
            if param is not None:
                out.setdefault(id(param), []).append((name, module, attr))
    return out


def quantized_modules(model: nn.Module) -> list[tuple[str, str]]:
    """(name, type) of every quantised module (`torch.ao.quantization.quantize_dynamic` / static
    quantisation: int8 packed weights with no autograd, e.g. torch.ao.nn.quantized.dynamic.Linear)."""
    out: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if any(name.startswith(parent + ".") for parent, _ in out):  # its packed parameters
            continue
        where = type(module).__module__
        if where.startswith(("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")) \
                or hasattr(module, "_packed_params"):
            out.append((name or type(module).__name__, f"{where}.{type(module).__name__}"))
    return out


def check_model(model: nn.Module) -> None:
    """Refuse (ConfigError, one line) a model no gradient can be taken through: quantised modules."""
    quantized = quantized_modules(model)
    if quantized:
        names = ", ".join(repr(n) for n, _ in quantized[:5]) + (" ..." if len(quantized) > 5 else "")
        raise ConfigError(
            f"model: module{'s' if len(quantized) > 1 else ''} {names} {'are' if len(quantized) > 1 else 'is'} "
            f"quantised ({quantized[0][1]}): their int8 packed weights have no gradient, and none flows through "
            "them, so TracIn cannot be computed; index the float model (before quantize_dynamic / convert) and "
            "its float checkpoints")


def select_blocks(model: nn.Module, patterns: list[str] | None) -> list[TracedBlock]:
    """Traced blocks for module-name patterns (fnmatch globs); None = every trainable parameter.

    A matched module contributes every trainable parameter below it. Raises ConfigError when a pattern
    matches no module, the selection holds no trainable parameter, or the model is quantised
    (`check_model`)."""
    check_model(model)
    modules = dict(model.named_modules())
    if patterns is None:
        roots = [""]
    else:
        roots = []
        for pattern in patterns:
            hits = [name for name in modules if name and fnmatch.fnmatchcase(name, pattern)]
            if not hits:
                names = [n for n in modules if n][:20]
                raise ConfigError(f"layers: {pattern!r} matches no module of the model; modules: {names}")
            roots.extend(hits)
    canonical = _canonical_names(model)
    traced: dict[int, nn.Parameter] = {}
    for root in roots:
        for _, param in modules[root].named_parameters():
            if param.requires_grad and id(param) in canonical:
                traced.setdefault(id(param), param)
    if not traced:
        raise ConfigError("layers: the selection holds no trainable parameter")
    holders = _holders(model)
    order = [p for p in model.parameters() if id(p) in traced]  # model order, each tensor once
    blocks: list[TracedBlock] = []
    done: set[int] = set()
    for param in order:
        if id(param) in done:
            continue
        blocks.append(_block_for(param, traced, holders, canonical, done))
    return blocks


def _block_for(param: nn.Parameter, traced: dict[int, nn.Parameter], holders, canonical, done: set[int]) -> TracedBlock:
    name = canonical[id(param)]
    hs = holders.get(id(param), [])
    dense = TracedBlock(name, "param", param.numel(), 1, (name,), (tuple(param.shape),))
    done.add(id(param))
    if not hs or not all(isinstance(mod, HOOK_TYPES) and _hook_eligible(mod) is None for _, mod, _ in hs):
        return dense
    attrs = {attr for _, _, attr in hs}
    if attrs == {"weight"}:
        if param.dim() < 2:
            return dense
        if len(hs) == 1:
            mod_name, module, _ = hs[0]
            bias = module._parameters.get("bias") if not isinstance(module, nn.Embedding) else None
            with_bias = (bias is not None and id(bias) in traced and id(bias) not in done
                         and len(holders.get(id(bias), [])) == 1)
            kind, m, n = _weight_layout(module, with_bias)
            if with_bias:
                done.add(id(bias))
                return TracedBlock(mod_name, kind, m, n, (name, canonical[id(bias)]),
                                   (tuple(param.shape), tuple(bias.shape)), (Use(mod_name, "weight+bias"),))
            return TracedBlock(mod_name, kind, m, n, (name,), (tuple(param.shape),), (Use(mod_name, "weight"),))
        if all(isinstance(mod, (nn.Linear, nn.Embedding)) for _, mod, _ in hs):
            rows, cols = param.shape[0], param.numel() // param.shape[0]
            uses = tuple(Use(mod_name, "weight") for mod_name, _, _ in hs)
            return TracedBlock(name, "tied", rows, cols, (name,), (tuple(param.shape),), uses)
        return dense
    if attrs == {"bias"} and len(hs) == 1 and isinstance(hs[0][1], (nn.Linear, nn.Conv2d)):
        mod_name = hs[0][0]
        return TracedBlock(name, "bias", param.numel(), 1, (name,), (tuple(param.shape),), (Use(mod_name, "bias"),))
    return dense

