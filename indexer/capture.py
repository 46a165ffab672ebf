"""Gradient capture: per-example gradients of the traced layers from one batched forward+backward.

For Linear / Conv2d / Embedding the per-example weight gradient is  G = sum_t delta_t a_t^T  with
a_t the layer input at position t (conv: an unfolded patch; a trailing 1 carries the bias) and
delta_t = d(sum_b loss_b)/d(output_t). Forward hooks keep `a`; tensor hooks on the outputs keep
`delta`. The model's parameters do not require grad during capture: the backward runs only to the
traced outputs, so no weight gradient is ever formed. Any other traced parameter (norms, custom
layers, grouped convs) gets an exact per-sample gradient from torch.func (vmap of grad).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from indexer.config import ConfigError


@dataclass(frozen=True)
class TracedLayer:
    """One traced block of parameters. Its per-example gradient is an [m, n] matrix G.

    kind: "linear" | "conv2d" | "embedding" (hooked) or "param" (torch.func, G = g as [numel, 1])
    """

    name: str
    kind: str
    m: int
    n: int
    params: tuple[str, ...]
    has_bias: bool = False

    @property
    def size(self) -> int:
        return self.m * self.n


def _hookable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return module.weight.requires_grad
    if isinstance(module, nn.Conv2d):
        return (
            module.weight.requires_grad
            and module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
    if isinstance(module, nn.Embedding):
        return module.weight.requires_grad and module.max_norm is None and not module.scale_grad_by_freq
    return False


def _has_bias(module: nn.Module) -> bool:
    bias = getattr(module, "bias", None)
    return bias is not None and bias.requires_grad


def select_layers(model: nn.Module, patterns: list[str] | None) -> list[TracedLayer]:
    """Traced layers for module-name patterns (fnmatch globs); None = every trainable parameter.

    A matched module contributes all trainable parameters below it: supported leaf modules are hooked
    (weight + bias as one block), every other parameter becomes its own "param" block."""
    modules = dict(model.named_modules())
    if patterns is None:
        chosen = [""]
    else:
        chosen = []
        for pattern in patterns:
            hits = [name for name in modules if name and fnmatch.fnmatchcase(name, pattern)]
            if not hits:
                names = [n for n in modules if n][:20]
                raise ConfigError(f"layers: {pattern!r} matches no module of the model; modules: {names}")
            chosen.extend(hits)
    layers: list[TracedLayer] = []
    seen: set[str] = set()
    for root in chosen:
        prefix = f"{root}." if root else ""
        for sub_name, module in modules[root].named_modules():
            name = prefix + sub_name if sub_name else root
            if _hookable(module) and f"{name}.weight".lstrip(".") not in seen:
                params = ["weight"] + (["bias"] if _has_bias(module) else [])
                full = tuple(f"{name}.{p}" for p in params)
                seen.update(full)
                layers.append(TracedLayer(name, *_layer_shape(module), full, _has_bias(module)))
        for pname, param in modules[root].named_parameters():
            full_name = prefix + pname
            if param.requires_grad and full_name not in seen:
                seen.add(full_name)
                layers.append(TracedLayer(full_name, "param", param.numel(), 1, (full_name,)))
    if not layers:
        raise ConfigError("layers: the selection holds no trainable parameter")
    return layers


def _layer_shape(module: nn.Module) -> tuple[str, int, int]:
    extra = 1 if _has_bias(module) else 0
    if isinstance(module, nn.Linear):
        return "linear", module.out_features, module.in_features + extra
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return "conv2d", module.out_channels, module.in_channels * kh * kw + extra
    assert isinstance(module, nn.Embedding)
    return "embedding", module.embedding_dim, module.num_embeddings


@dataclass
class LayerGrad:
    """Per-example gradient factors of one layer for a batch: G_b = sum_t delta[b,t] a[b,t]^T.

    dense layers: a [B, T, n], delta [B, T, m]
    embedding:    index [B, T] token ids (-1 = padding, contributes nothing), delta [B, T, m]
    param:        a = ones [B, 1, 1], delta = g [B, 1, numel]
    """

    layer: TracedLayer
    delta: torch.Tensor
    a: torch.Tensor | None = None
    index: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return int(self.delta.shape[0])

    @property
    def positions(self) -> int:
        return int(self.delta.shape[1])

    def full(self) -> torch.Tensor:
        """The explicit per-example gradient [B, m, n]."""
        m, n = self.layer.m, self.layer.n
        if self.index is None:
            return torch.einsum("btm,btn->bmn", self.delta, self.a)
        B, T = self.index.shape
        out = torch.zeros(B, n + 1, m, dtype=self.delta.dtype, device=self.delta.device)
        idx = torch.where(self.index < 0, n, self.index)  # padding goes to a dropped extra row
        out.scatter_add_(1, idx.unsqueeze(-1).expand(B, T, m), self.delta)
        return out[:, :n, :].transpose(1, 2)

    def squared_norm(self, full: torch.Tensor | None = None) -> torch.Tensor:
        """Exact ||G_b||_F^2 [B], never approximated.

        T = 1: ||delta||^2 ||a||^2.  T > 1: sum_{t,t'} (delta_t . delta_t')(a_t . a_t') or ||G||^2
        from the explicit gradient, whichever costs less."""
        if full is not None:
            return full.pow(2).sum(dim=(1, 2))
        d = self.delta
        if self.index is not None:
            same = (self.index.unsqueeze(2) == self.index.unsqueeze(1)) & (self.index >= 0).unsqueeze(2)
            return (torch.bmm(d, d.transpose(1, 2)) * same).sum(dim=(1, 2))
        T = self.positions
        if T == 1:
            return d.pow(2).sum(dim=(1, 2)) * self.a.pow(2).sum(dim=(1, 2))
        m, n = self.layer.m, self.layer.n
        if T * (m + n) < m * n:
            return (torch.bmm(d, d.transpose(1, 2)) * torch.bmm(self.a, self.a.transpose(1, 2))).sum(dim=(1, 2))
        return self.full().pow(2).sum(dim=(1, 2))


class _Recorder:
    """Forward + tensor hooks of one hooked module; supports several calls per forward."""

    def __init__(self, layer: TracedLayer, module: nn.Module):
        self.layer, self.module = layer, module
        self.inputs: list[torch.Tensor] = []
        self.deltas: list[torch.Tensor | None] = []

    def forward_hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        x = args[0]
        B = x.shape[0]
        kind = self.layer.kind
        if kind == "linear":
            a = x.detach().reshape(B, -1, x.shape[-1])
        elif kind == "conv2d":
            a = F.unfold(x.detach(), module.kernel_size, module.dilation, module.padding, module.stride)
            a = a.transpose(1, 2)
        else:  # embedding: keep ids; padding_idx rows get no gradient
            a = x.detach().reshape(B, -1).long()
            if module.padding_idx is not None:
                a = a.masked_fill(a == module.padding_idx, -1)
        if self.layer.has_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        slot = len(self.inputs)
        self.inputs.append(a)
        self.deltas.append(None)
        if not output.requires_grad:
            # First traced layer on this path: make its output the leaf the backward runs to.
            output = output.detach().requires_grad_(True)
            output.register_hook(lambda g, s=slot: self._store(s, g))
            return output
        output.register_hook(lambda g, s=slot: self._store(s, g))
        return None

    def _store(self, slot: int, grad: torch.Tensor) -> None:
        self.deltas[slot] = grad.detach()

    def result(self) -> LayerGrad | None:
        if not self.inputs:
            return None
        B = self.inputs[0].shape[0]
        deltas = []
        for a, d in zip(self.inputs, self.deltas):
            if d is None:  # this call did not reach the loss: zero gradient
                d = torch.zeros(*a.shape[:2], self.layer.m, dtype=_float_dtype(a, self.module), device=a.device)
            elif self.layer.kind == "conv2d":
                d = d.reshape(B, self.layer.m, -1).transpose(1, 2)
            else:
                d = d.reshape(B, -1, self.layer.m)
            deltas.append(d)
        delta = torch.cat(deltas, dim=1) if len(deltas) > 1 else deltas[0]
        a = torch.cat(self.inputs, dim=1) if len(self.inputs) > 1 else self.inputs[0]
        if self.layer.kind == "embedding":
            return LayerGrad(self.layer, delta, index=a)
        return LayerGrad(self.layer, delta, a=a)


def _float_dtype(a: torch.Tensor, module: nn.Module) -> torch.dtype:
    return a.dtype if a.is_floating_point() else module.weight.dtype


class GradientCapture:
    """Computes LayerGrad for every traced layer of `model` for one batch.

    `loss_fn(model, inputs, labels) -> [B]` is the task's per-example loss; it is summed (never averaged)
    so that delta for example b is d loss_b / d output_b."""

    def __init__(self, model: nn.Module, layers: list[TracedLayer],
                 loss_fn: Callable[[nn.Module, object, torch.Tensor], torch.Tensor]):
        self.model, self.layers, self.loss_fn = model, layers, loss_fn
        modules = dict(model.named_modules())
        self.hooked = [(layer, modules[layer.name]) for layer in layers if layer.kind != "param"]
        self.param_layers = [layer for layer in layers if layer.kind == "param"]
        for param in model.parameters():
            param.requires_grad_(False)

    def capture(self, inputs, labels: torch.Tensor) -> list[LayerGrad]:
        grads: dict[str, LayerGrad] = {}
        if self.hooked:
            grads.update(self._capture_hooked(inputs, labels))
        if self.param_layers:
            grads.update(self._capture_params(inputs, labels))
        return [grads[layer.name] for layer in self.layers]

    def _capture_hooked(self, inputs, labels) -> dict[str, LayerGrad]:
        recorders = [_Recorder(layer, module) for layer, module in self.hooked]
        handles = [module.register_forward_hook(r.forward_hook) for r, (_, module) in zip(recorders, self.hooked)]
        try:
            with torch.enable_grad():
                losses = self.loss_fn(self.model, inputs, labels)
                _check_losses(losses, labels)
                if losses.requires_grad:
                    torch.autograd.backward(losses.sum())
        finally:
            for handle in handles:
                handle.remove()
        out = {}
        for recorder in recorders:
            result = recorder.result()
            if result is None:
                raise RuntimeError(f"traced layer {recorder.layer.name!r} was not called by the model's forward")
            out[recorder.layer.name] = result
        return out

    def _capture_params(self, inputs, labels) -> dict[str, LayerGrad]:
        from torch.func import functional_call, grad, vmap

        names = [layer.name for layer in self.param_layers]
        wrapper = _LossModule(self.model, self.loss_fn)
        state = {f"model.{k}": v.detach() for k, v in self.model.named_parameters()}
        state.update({f"model.{k}": v for k, v in self.model.named_buffers()})
        traced = {name: state.pop(f"model.{name}") for name in names}

        def one_loss(params, x, y):
            full = {**state, **{f"model.{k}": v for k, v in params.items()}}
            return functional_call(wrapper, full, (_unsqueeze(x), y.unsqueeze(0))).sum()

        with torch.enable_grad():
            per_example = vmap(grad(one_loss), in_dims=(None, 0, 0))(traced, inputs, labels)
        out = {}
        for layer in self.param_layers:
            g = per_example[layer.name].detach().reshape(labels.shape[0], 1, -1)
            out[layer.name] = LayerGrad(layer, g, a=g.new_ones(g.shape[0], 1, 1))
        return out


class _LossModule(nn.Module):
    """model + per-example loss as one module, so torch.func can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self._loss_fn = model, loss_fn

    def forward(self, inputs, labels):
        return self._loss_fn(self.model, inputs, labels)


def _unsqueeze(x):
    if isinstance(x, dict):
        return {k: v.unsqueeze(0) for k, v in x.items()}
    return x.unsqueeze(0)


def _check_losses(losses: torch.Tensor, labels: torch.Tensor) -> None:
    if losses.dim() != 1 or losses.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Task.loss must return one loss per example (shape [{labels.shape[0]}]), got {tuple(losses.shape)}"
        )
