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


@dataclass(frozen=True)
class ConvCall:
    """One call of a hooked Conv2d: its input x [B, C_in, H, W] and output gradient d [B, m, H', W']."""

    x: torch.Tensor
    d: torch.Tensor
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def unfolded(self, bias: bool) -> torch.Tensor:
        """The patches a_t [B, T, n] (im2col; a trailing 1 for the bias)."""
        a = F.unfold(self.x, self.kernel_size, self.dilation, self.padding, self.stride).transpose(1, 2)
        if bias:
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        return a

    def projected_patches(self, P: torch.Tensor, bias: bool) -> torch.Tensor:
        """P a_t for every position [B, T, k] without im2col: a convolution with the rows of P as filters."""
        k = P.shape[0]
        c_in = self.x.shape[1]
        kh, kw = self.kernel_size
        weight = P[:, : c_in * kh * kw].reshape(k, c_in, kh, kw)
        out = F.conv2d(self.x, weight, P[:, -1] if bias else None, self.stride, self.padding, self.dilation)
        return out.reshape(out.shape[0], k, -1).transpose(1, 2)

    def weight_gradients(self, bias: bool) -> torch.Tensor:
        """Per-example gradient [B, m, n] = sum_t d_t a_t^T without im2col: the weight gradient of a
        convolution with the batch folded into the groups (B groups of C_in -> m channels)."""
        B, c_in = self.x.shape[:2]
        m = self.d.shape[1]
        kh, kw = self.kernel_size
        _, grad_w, _ = torch.ops.aten.convolution_backward(
            self.d.reshape(1, B * m, *self.d.shape[2:]), self.x.reshape(1, B * c_in, *self.x.shape[2:]),
            self.x.new_empty(B * m, c_in, kh, kw), None, list(self.stride), list(self.padding),
            list(self.dilation), False, [0, 0], B, [False, True, False],
        )
        g = grad_w.reshape(B, m, c_in * kh * kw)
        if bias:
            g = torch.cat([g, self.d.sum(dim=(2, 3)).unsqueeze(-1)], dim=2)
        return g


class LayerGrad:
    """Per-example gradient factors of one layer for a batch: G_b = sum_t delta[b,t] a[b,t]^T.

    dense layers: a [B, T, n], delta [B, T, m]
    embedding:    index [B, T] token ids (-1 = padding, contributes nothing), delta [B, T, m]
    param:        a = ones [B, 1, 1], delta = g [B, 1, numel]
    conv2d:       also `conv` (the calls' inputs and 4-D output gradients): `a` is then unfolded only when
                  asked for, and `full()` comes from a batched weight-gradient convolution (no im2col).
    """

    def __init__(self, layer: TracedLayer, delta: torch.Tensor, a: torch.Tensor | None = None,
                 index: torch.Tensor | None = None, conv: tuple[ConvCall, ...] | None = None):
        self.layer, self.delta, self.index, self.conv = layer, delta, index, conv
        self._a = a
        self._full: torch.Tensor | None = None

    @property
    def a(self) -> torch.Tensor | None:
        if self._a is None and self.conv is not None:
            parts = [call.unfolded(self.layer.has_bias) for call in self.conv]
            self._a = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return self._a

    def projected_inputs(self, P: torch.Tensor) -> torch.Tensor:
        """a_t P^T  [B, T, k] (for a conv layer, computed as a convolution instead of unfolding)."""
        if self._a is None and self.conv is not None:
            parts = [call.projected_patches(P, self.layer.has_bias) for call in self.conv]
            return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return self.a @ P.T

    @property
    def batch(self) -> int:
        return int(self.delta.shape[0])

    @property
    def positions(self) -> int:
        return int(self.delta.shape[1])

    def full(self) -> torch.Tensor:
        """The explicit per-example gradient [B, m, n] (computed once, then kept)."""
        if self._full is None:
            self._full = self._compute_full()
        return self._full

    def _compute_full(self) -> torch.Tensor:
        m, n = self.layer.m, self.layer.n
        if self.conv is not None:
            total = None
            for call in self.conv:
                g = call.weight_gradients(self.layer.has_bias)
                total = g if total is None else total + g
            return total
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
            return torch.linalg.vector_norm(full.reshape(full.shape[0], -1), dim=1).square()
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
        return self.squared_norm(self.full())


class _Recorder:
    """Forward + tensor hooks of one hooked module; supports several calls per forward."""

    def __init__(self, layer: TracedLayer, module: nn.Module):
        self.layer, self.module = layer, module
        self.inputs: list[torch.Tensor] = []
        self.deltas: list[torch.Tensor | None] = []
        self.versions: list[tuple[torch.Tensor, int]] = []  # kept inputs that are views of the model's tensors

    def forward_hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        x = args[0]
        B = x.shape[0]
        kind = self.layer.kind
        if kind == "linear":
            a = x.detach().reshape(B, -1, x.shape[-1])
        elif kind == "conv2d":  # keep the input; patches are unfolded later only if a projection needs them
            a = x.detach()
        else:  # embedding: keep ids; padding_idx rows get no gradient
            a = x.detach().reshape(B, -1).long()
            if module.padding_idx is not None:
                a = a.masked_fill(a == module.padding_idx, -1)
        if self.layer.has_bias and kind != "conv2d":
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        slot = len(self.inputs)
        self.inputs.append(a)
        self.versions.append((a, a._version))
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
        for a, version in self.versions:
            if a._version != version:
                raise RuntimeError(
                    f"the input of traced layer {self.layer.name!r} was modified in place after the layer used it; "
                    "its per-example gradient cannot be captured (avoid the in-place op on that tensor)"
                )
        if self.layer.kind == "conv2d":
            return self._conv_result()
        B = self.inputs[0].shape[0]
        deltas = []
        for a, d in zip(self.inputs, self.deltas):
            if d is None:  # this call did not reach the loss: zero gradient
                d = torch.zeros(*a.shape[:2], self.layer.m, dtype=_float_dtype(a, self.module), device=a.device)
            else:
                d = d.reshape(B, -1, self.layer.m)
            deltas.append(d)
        delta = torch.cat(deltas, dim=1) if len(deltas) > 1 else deltas[0]
        a = torch.cat(self.inputs, dim=1) if len(self.inputs) > 1 else self.inputs[0]
        if self.layer.kind == "embedding":
            return LayerGrad(self.layer, delta, index=a)
        return LayerGrad(self.layer, delta, a=a)

    def _conv_result(self) -> LayerGrad:
        module, m = self.module, self.layer.m
        calls, deltas = [], []
        for x, d in zip(self.inputs, self.deltas):
            if d is None:  # this call did not reach the loss: zero gradient
                with torch.no_grad():
                    shape = module(x[:1]).shape[2:]
                d = torch.zeros(x.shape[0], m, *shape, dtype=x.dtype, device=x.device)
            d = d.contiguous()
            calls.append(ConvCall(x, d, tuple(module.kernel_size), tuple(module.stride), tuple(module.padding),
                                  tuple(module.dilation)))
            deltas.append(d.reshape(d.shape[0], m, -1).transpose(1, 2))  # [B, T, m] view
        delta = torch.cat(deltas, dim=1) if len(deltas) > 1 else deltas[0]
        return LayerGrad(self.layer, delta, conv=tuple(calls))


def _float_dtype(a: torch.Tensor, module: nn.Module) -> torch.dtype:
    return a.dtype if a.is_floating_point() else module.weight.dtype


_ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """Keep freed batch-sized buffers in the process heap instead of returning them to the OS.

    glibc serves allocations above a (dynamic) threshold with fresh mmap pages and gives them back on free,
    so every batch page-faults its activations, output gradients and per-example gradients in again
    (measured on the Fashion-MNIST benchmark: ~9k minor faults and ~15% of the embedding time per batch of
    256). Raising the mmap threshold to 32 MiB and the trim threshold to 256 MiB lets the next batch reuse
    them. Linux/glibc only; a no-op elsewhere or with TRACIN_NO_MALLOPT=1. Returns whether it applied."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("TRACIN_NO_MALLOPT"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 256 << 20) == 1
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = ok
    return ok


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
        tune_allocator()

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
