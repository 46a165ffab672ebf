"""Gradient capture: exact per-example gradients of every traced block, by the fastest route proven right.

Routes, fastest first (each block has one, chosen by `calibrate` and recorded in the manifest):

  hook   Linear / Conv2d / Embedding weights (and biases) used only through module calls whose input and
         output hold one row per example on a known axis: G_b = sum_t delta_t a_t^T from one batched
         forward + backward of the summed loss (forward hooks keep a, tensor hooks keep delta). The
         parameters do not require grad, so no weight gradient is ever formed.
  norm   the scale / shift of a normalisation layer (BatchNorm with running statistics, LayerNorm,
         GroupNorm, RMSNorm) from the same forward + backward: sum of delta (.) x_hat and of delta per example
         (`indexer.capture.norms`).
  vmap   torch.func per-sample gradients (vmap of grad) of the block's parameters.
  loop   one `torch.autograd.grad` of each example's own loss: correct wherever the model can train.

`calibrate` decides from the model itself, on a few training examples:
  * a forward that is random in eval mode (two forwards of the same examples differ: F.dropout(training=
    True), stochastic depth) is refused, naming the first module whose output differs for the same input;
    so are traced layers that the forward calls only with gradients disabled (a torch.no_grad() region);
  * a structural probe with two batch sizes finds each hooked module's batch axis (the one axis whose
    size follows the batch size, in every call); a module never called as a module (attention's
    out_proj), called a varying number of times, or whose rows are not examples (sequence-first with an
    unknown axis, ids broadcast as [1, T], batches folded into rows) leaves the hook route;
  * modules that mix the examples of a batch (batch-statistics normalisation) are detected by comparing
    each example's loss in a batch with its loss alone: the model is then run one example at a time;
  * the hooks' per-example gradients of each block must sum to the ordinary batch gradient (catches
    uses the hooks miss: tied or functional reuse, reparametrised weights, regularisers);
  * torch.func is tried and compared with the loop; where it fails or disagrees, the loop is used.
During indexing the batch axis of every call is verified and the sum check repeats on a sample of
batches; a violation raises `CaptureError` naming the layer, never a silently wrong number (per-example
gradients that are all zero while the batch gradient is not are named as such).

Activation checkpointing inside the model's forward (`torch.utils.checkpoint`) runs its function plainly
while any route, the calibration or the per-example loop runs (`indexer.capture.plain_checkpoints`): its
values and gradients are the plain forward's by definition, and the reentrant kind would otherwise hide
its parameters from the hooks (an all-zero capture). The first traced layer's output is handed to the model
as a copy of the leaf the backward runs to, so in-place ops after it (ReLU(inplace=True), `out += x`) work.

All factors are kept in the capture's compute dtype (float32, or float64 for float64 models): models in
bfloat16 / float16 are run in float32 (`compute_dtype`), so norms and inner products are never
accumulated in low precision and results do not depend on the batch.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from indexer.capture.blocks import TracedBlock, Use
from indexer.config import ConfigError
from indexer.capture.grads import BlockGrad, ConvCall, ConvOuter, Dense, Outer
from indexer.capture.plain_checkpoints import plainly
from indexer.task import Inputs, batch_size_of, take_rows, unsqueeze_inputs

ROUTES = ("hook", "norm", "vmap", "loop")
# torch.func warns when an op has no batching rule (it then loops inside): slower, still exact. Not a
# message for our users (and a catch_warnings around each call would race between threads).
warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
PROBE_ROWS = 3  # training rows calibration probes
RANDOM_TRIES = 3  # forwards compared with the first one to tell a random forward from a deterministic one
SUM_CHECK_EVERY = 64  # besides the first batch of each checkpoint, every 64th batch is sum-checked


class CaptureError(ConfigError):
    """The capture cannot compute this model's per-example gradients exactly; the message names the layer."""


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for comparing two exact computations of the same gradient in `dtype`."""
    return 1e-9 if dtype == torch.float64 else 1e-4


def compute_dtype_for(model_dtype: torch.dtype, requested: str = "auto") -> torch.dtype:
    """The dtype capture computes in: float64 for float64 models, float32 otherwise (bfloat16/float16
    models are run in float32); `requested` = "float32" / "float64" overrides."""
    if requested == "float64":
        return torch.float64
    if requested == "float32":
        return torch.float32
    return torch.float64 if model_dtype == torch.float64 else torch.float32


# -- the plan -------------------------------------------------------------------------------------

@dataclass
class CapturePlan:
    """Traced blocks, the route of each, the batch axis of each hooked module, and whether the model is
    run one example at a time. Serialised into the manifest so the service captures exactly as the
    indexer did."""

    blocks: list[TracedBlock]
    routes: dict[str, str]
    axes: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    per_example: bool = False
    mixing: str | None = None

    def route(self, block: TracedBlock) -> str:
        return self.routes[block.name]

    def to_json(self) -> dict[str, Any]:
        return {"per_example": self.per_example, "mixing": self.mixing, "axes": dict(self.axes),
                "blocks": [{"name": b.name, "route": self.routes[b.name], "reason": self.reasons.get(b.name)}
                           for b in self.blocks]}

    @classmethod
    def from_json(cls, blocks: list[TracedBlock], data: dict[str, Any]) -> "CapturePlan":
        """Rebuild a recorded plan for the blocks selected again from the model; refuses a mismatch."""
        recorded = {entry["name"]: entry for entry in data.get("blocks", [])}
        if set(recorded) != {b.name for b in blocks}:
            missing = sorted({b.name for b in blocks} - set(recorded))[:5]
            extra = sorted(set(recorded) - {b.name for b in blocks})[:5]
            raise CaptureError(f"capture plan: the model's traced blocks differ from the index's "
                               f"(not recorded: {missing}, recorded but absent: {extra})")
        routes = {}
        for name, entry in recorded.items():
            if entry.get("route") not in ROUTES:
                raise CaptureError(f"capture plan: block {name!r} has unknown route {entry.get('route')!r}")
            routes[name] = entry["route"]
        axes = {str(k): int(v) for k, v in (data.get("axes") or {}).items()}
        for block in blocks:
            if routes[block.name] == "hook":
                if not block.uses:
                    raise CaptureError(f"capture plan: block {block.name!r} cannot take the hook route")
                for use in block.uses:
                    if use.module not in axes:
                        raise CaptureError(f"capture plan: no batch axis recorded for module {use.module!r}")
            if routes[block.name] == "norm":
                if block.norm is None:
                    raise CaptureError(f"capture plan: block {block.name!r} cannot take the norm route")
                if block.norm.module not in axes:
                    raise CaptureError(f"capture plan: no batch axis recorded for module {block.norm.module!r}")
        return cls(blocks, routes, axes, {e["name"]: e.get("reason") for e in recorded.values() if e.get("reason")},
                   bool(data.get("per_example", False)), data.get("mixing"))

    def describe(self) -> list[str]:
        lines = []
        for b in self.blocks:
            why = f"  ({self.reasons[b.name]})" if self.reasons.get(b.name) else ""
            lines.append(f"{b.name:<32} {b.kind:<9} {b.m}x{b.n:<8} {self.routes[b.name]}{why}")
        return lines


@dataclass
class Captured:
    """One batch: per-block gradients (in plan order), per-example losses [B] and the model's outputs."""

    grads: list[BlockGrad]
    losses: torch.Tensor
    outputs: Any

    @staticmethod
    def concat(parts: list["Captured"]) -> "Captured":
        grads = [BlockGrad.concat([p.grads[i] for p in parts]) for i in range(len(parts[0].grads))]
        return Captured(grads, torch.cat([p.losses for p in parts]), _cat_outputs([p.outputs for p in parts]))


def _cat_outputs(outputs: list[Any]) -> Any:
    if all(isinstance(o, torch.Tensor) for o in outputs):
        return torch.cat(outputs) if outputs[0].dim() else torch.stack(outputs)
    return outputs


# -- hooks ----------------------------------------------------------------------------------------

#: `CapturePlan.axes` value of a module whose input and output hold ONE row shared by every example (position
#: ids given as [1, T] and broadcast over the batch downstream, as in BERT / GPT-2 position embeddings): the hook
#: route hands the model the output expanded to the batch, so that the gradient reaching it holds one row per
#: example (downstream broadcasting made exactly that expansion); calibrate proves each such block against the
#: per-example loop before it keeps the route.
BROADCAST = -1


class _Recorder:
    """Forward + tensor hooks of one hooked module; several calls per forward are supported.

    Verifies on every call that the input and output hold one row per example on the planned axis."""

    def __init__(self, name: str, module: nn.Module, axis: int, batch: int, dtype: torch.dtype):
        self.name, self.module, self.axis, self.batch, self.dtype = name, module, axis, batch, dtype
        self.inputs: list[torch.Tensor] = []
        self.deltas: list[torch.Tensor | None] = []
        self.versions: list[tuple[torch.Tensor, int]] = []

    def forward_hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        x = args[0]
        ax, B = self.axis, self.batch
        if ax == BROADCAST:
            if not isinstance(output, torch.Tensor) or x.dim() < 2 or output.dim() < 2 \
                    or x.shape[0] != 1 or output.shape[0] != 1:
                raise CaptureError(
                    f"layer {self.name!r}: input {tuple(x.shape)} / output {tuple(getattr(output, 'shape', ()))} are "
                    "not one row shared by the batch as they were when the capture was planned; its per-example "
                    "gradient cannot be taken from hooks")
            return self._record(module, x.expand(B, *x.shape[1:]), x, output.expand(B, *output.shape[1:]), 0)
        if not isinstance(output, torch.Tensor) or x.dim() <= ax or output.dim() <= ax \
                or x.shape[ax] != B or output.shape[ax] != B:
            raise CaptureError(
                f"layer {self.name!r}: input {tuple(x.shape)} / output {tuple(getattr(output, 'shape', ()))} do not "
                f"hold one row per example on axis {ax} (batch of {B}) as they did when the capture was planned; "
                "its per-example gradient cannot be taken from hooks")
        return self._record(module, x, x, output, ax)

    def _record(self, module: nn.Module, x: torch.Tensor, given: torch.Tensor, output: torch.Tensor, ax: int):
        """Keep the input x (examples on axis `ax`) and hook the output's gradient; returns what the model gets
        instead of the module's output (None: the output itself)."""
        B = self.batch
        self.versions.append((given, given._version))
        if isinstance(module, nn.Conv2d):
            kept = x.detach().to(self.dtype)
        elif isinstance(module, nn.Embedding):
            ids = x.detach().movedim(ax, 0).reshape(B, -1).long()
            if module.padding_idx is not None:
                ids = ids.masked_fill(ids == module.padding_idx, -1)
            kept = ids
        else:
            kept = x.detach().movedim(ax, 0).reshape(B, -1, x.shape[-1]).to(self.dtype)
        slot = len(self.inputs)
        self.inputs.append(kept)
        self.deltas.append(None)
        if not output.requires_grad:
            # First traced layer on this path: make its output a leaf the backward runs to, and hand the
            # model a copy of it, so that an in-place op that follows (VGG's ReLU(inplace=True), a residual
            # `out += x`) modifies the copy, never the leaf.
            leaf = output.detach()
            leaf = (leaf.contiguous() if self.axis == BROADCAST else leaf).requires_grad_(True)
            leaf.register_hook(lambda g, s=slot: self._store(s, g))
            return leaf.clone()
        output.register_hook(lambda g, s=slot: self._store(s, g))
        return output if self.axis == BROADCAST else None

    def _store(self, slot: int, grad: torch.Tensor) -> None:
        self.deltas[slot] = grad.detach()

    def _check_versions(self) -> None:
        for x, version in self.versions:
            if x._version != version:
                raise CaptureError(
                    f"the input of traced layer {self.name!r} was modified in place after the layer used it; its "
                    "per-example gradient cannot be captured (avoid the in-place op on that tensor)")

    def terms(self, use: Use) -> list:
        """The gradient terms of this module's calls for one use (role), or [] when never called."""
        self._check_versions()
        if not self.inputs:
            return []
        module, B = self.module, self.batch
        ax = 0 if self.axis == BROADCAST else self.axis
        if isinstance(module, nn.Conv2d):
            m = module.out_channels
            calls = []
            for x, d in zip(self.inputs, self.deltas):
                if d is None:
                    with torch.no_grad():
                        shape = module(x[:1].to(module.weight.dtype)).shape[2:]
                    d = torch.zeros(x.shape[0], m, *shape, dtype=self.dtype, device=x.device)
                calls.append(ConvCall(x, d.to(self.dtype).contiguous(), tuple(module.kernel_size),
                                      tuple(module.stride), tuple(module.padding), tuple(module.dilation)))
            if use.role == "bias":
                u = torch.cat([c.deltas() for c in calls], dim=1)
                return [Outer(u, u.new_ones(u.shape[0], u.shape[1], 1))]
            return [ConvOuter(tuple(calls), use.role == "weight+bias")]
        width = module.embedding_dim if isinstance(module, nn.Embedding) else module.out_features
        deltas = []
        for x, d in zip(self.inputs, self.deltas):
            if d is None:  # this call did not reach the loss: zero gradient
                deltas.append(torch.zeros(B, x.shape[1], width, dtype=self.dtype, device=x.device))
            else:
                deltas.append(d.movedim(ax, 0).reshape(B, -1, width).to(self.dtype))
        delta = torch.cat(deltas, dim=1) if len(deltas) > 1 else deltas[0]
        x = torch.cat(self.inputs, dim=1) if len(self.inputs) > 1 else self.inputs[0]
        if isinstance(module, nn.Embedding):
            return [Outer(x, delta)]
        if use.role == "bias":
            return [Outer(delta, delta.new_ones(B, delta.shape[1], 1))]
        if use.role == "weight+bias":
            x = torch.cat([x, x.new_ones(B, x.shape[1], 1)], dim=2)
        return [Outer(delta, x)]


class _NormRecorder:
    """Forward + tensor hooks of one normalisation layer on the norm route (`indexer.capture.norms`): its
    input x and output gradient delta per call, with the batch axis verified on every call."""

    def __init__(self, name: str, module: nn.Module, axis: int, batch: int, dtype: torch.dtype):
        self.name, self.module, self.axis, self.batch, self.dtype = name, module, axis, batch, dtype
        self.calls: list[list] = []  # [x, delta or None, x's version]

    def forward_hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        x = args[0] if args else None
        ax, B = self.axis, self.batch
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor) or x.shape != output.shape \
                or x.dim() <= ax or x.shape[ax] != B:
            raise CaptureError(
                f"layer {self.name!r}: input {tuple(getattr(x, 'shape', ()))} / output "
                f"{tuple(getattr(output, 'shape', ()))} do not hold one row per example on axis {ax} (batch of {B}) "
                "as they did when the capture was planned")
        call = [x.detach(), None, x._version]
        self.calls.append(call)

        def store(grad, call=call):
            call[1] = grad.detach()

        if not output.requires_grad:  # the first traced layer on this path (see _Recorder.forward_hook)
            leaf = output.detach().requires_grad_(True)
            leaf.register_hook(store)
            return leaf.clone()
        output.register_hook(store)
        return None

    def gradient(self, block: TracedBlock) -> torch.Tensor:
        """[B, m, 1]: the block's per-example gradient summed over the module's calls (zero when never called
        or when no call reached the loss)."""
        from indexer.capture.norms import per_example_gradients

        total = None
        for x, delta, version in self.calls:
            if x._version != version:
                raise CaptureError(f"the input of traced layer {self.name!r} was modified in place after the layer "
                                   "used it; its per-example gradient cannot be captured (avoid the in-place op)")
            if delta is None:
                continue
            g = per_example_gradients(self.module, block.norm.role, x.to(self.dtype), delta.to(self.dtype), self.axis)
            total = g if total is None else total + g
        if total is None:
            return torch.zeros(self.batch, block.m, 1, dtype=self.dtype, device=_device(self.module))
        return block.assemble([total])


# -- capture --------------------------------------------------------------------------------------

class GradientCapture:
    """Per-example gradients of every traced block of `model` for one batch, by the plan's routes.

    `forward(model, inputs) -> outputs` and `loss(outputs, labels) -> [B]` are the task's; the loss is
    summed (never averaged), so the output gradient of example b is d loss_b / d output_b. The model's
    parameters are frozen (requires_grad False); routes enable gradients only where they need them."""

    def __init__(self, model: nn.Module, plan: CapturePlan, forward: Callable, loss: Callable,
                 dtype: torch.dtype = torch.float32):
        self.model, self.plan, self.forward, self.loss, self.dtype = model, plan, forward, loss, dtype
        self.modules = dict(model.named_modules())
        self.params = dict(model.named_parameters())
        self.by_route = {r: [b for b in plan.blocks if plan.routes[b.name] == r] for r in ROUTES}
        for param in model.parameters():
            param.requires_grad_(False)
        tune_allocator()

    # -- public -----------------------------------------------------------------------------------
    @plainly  # activation checkpointing runs as the plain forward it stands for (`plain_checkpoints`)
    def capture(self, inputs: Inputs, labels: torch.Tensor, check: bool = False,
                loss: Callable | None = None) -> Captured:
        """Gradients, losses and outputs for a batch. With `check`, the hook route's per-example
        gradients are also compared with the ordinary batch gradient (CaptureError on a mismatch).
        `loss(outputs, labels) -> [B]` replaces the task's loss (a query metric: `indexer.score.metrics`)."""
        B = batch_size_of(inputs)
        if labels.shape[0] != B:
            raise CaptureError(f"{B} inputs but {labels.shape[0]} labels")
        if self.plan.per_example and B > 1:
            return Captured.concat([self._capture(take_rows(inputs, slice(b, b + 1)), labels[b:b + 1], check, loss)
                                    for b in range(B)])
        return self._capture(inputs, labels, check, loss)

    def _capture(self, inputs, labels, check: bool, loss: Callable | None = None) -> Captured:
        grads: dict[str, BlockGrad] = {}
        outputs = losses = None
        if self.by_route["hook"] or self.by_route["norm"]:  # one forward + backward for both
            hooked, outputs, losses = self.hook_route(self.by_route["hook"] + self.by_route["norm"], inputs, labels,
                                                      check, loss)
            grads.update(hooked)
        if self.by_route["vmap"]:
            try:
                grads.update(self.vmap_route(self.by_route["vmap"], inputs, labels, loss))
            except CaptureError:
                raise
            except Exception:  # noqa: BLE001 - torch.func could not batch this batch: the loop is exact too
                grads.update(self._loop_or_refuse(self.by_route["vmap"], inputs, labels, loss))
        if self.by_route["loop"]:
            grads.update(self._loop_or_refuse(self.by_route["loop"], inputs, labels, loss))
        if outputs is None:
            with torch.no_grad():
                outputs = self.forward(self.model, inputs)
                losses = (loss or self.loss)(outputs, labels)
            check_losses(losses, labels.shape[0])
        return Captured([grads[b.name] for b in self.plan.blocks], losses.detach(), _detach(outputs))

    # -- routes -----------------------------------------------------------------------------------
    def hook_route(self, blocks: list[TracedBlock], inputs, labels, check: bool = False,
                   loss: Callable | None = None):
        B = batch_size_of(inputs)
        loss = loss or self.loss
        names = sorted({u.module for b in blocks for u in b.uses})
        recorders = {n: _Recorder(n, self.modules[n], self.plan.axes.get(n, 0), B, self.dtype) for n in names}
        norms = sorted({b.norm.module for b in blocks if b.norm is not None and not b.uses})
        norm_recorders = {n: _NormRecorder(n, self.modules[n], self.plan.axes.get(n, 0), B, self.dtype) for n in norms}
        handles = [self.modules[n].register_forward_hook(recorders[n].forward_hook) for n in names]
        handles += [self.modules[n].register_forward_hook(norm_recorders[n].forward_hook) for n in norms]
        params = [self.params[p] for b in blocks for p in b.params] if check else []
        for p in params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                outputs = self.forward(self.model, inputs)
                losses = loss(outputs, labels)
                check_losses(losses, B)
                if check:
                    batch_grads = torch.autograd.grad(losses.sum(), params, allow_unused=True) \
                        if losses.requires_grad else [None] * len(params)
                elif losses.requires_grad:
                    torch.autograd.backward(losses.sum())
        finally:
            for handle in handles:
                handle.remove()
            for p in params:
                p.requires_grad_(False)
        out = {}
        for block in blocks:
            if not block.uses:
                out[block.name] = BlockGrad(block, [Dense(norm_recorders[block.norm.module].gradient(block))])
                continue
            terms = [t for use in block.uses for t in recorders[use.module].terms(use)]
            if not terms:  # never called in this batch: its gradient is zero
                terms = [Dense(torch.zeros(B, block.m, block.n, dtype=self.dtype, device=_device(self.model)))]
            out[block.name] = BlockGrad(block, terms)
        if check:
            grads_by_param = dict(zip([p for b in blocks for p in b.params], batch_grads))
            for block in blocks:
                reference = [dense_grad(grads_by_param[p], self.params[p]) for p in block.params]
                expected = block.assemble([g.unsqueeze(0) for g in reference])[0].to(self.dtype)
                _compare_sum(block, out[block.name].batch_sum(), expected, self.dtype)
        return out, outputs, losses

    def vmap_route(self, blocks: list[TracedBlock], inputs, labels, loss: Callable | None = None
                   ) -> dict[str, BlockGrad]:
        from torch.func import functional_call, grad, vmap

        names = [p for b in blocks for p in b.params]
        wrapper = _LossModule(self.model, self.forward, loss or self.loss)
        state = {f"model.{k}": v.detach() for k, v in self.model.named_parameters()}
        state.update({f"model.{k}": v for k, v in self.model.named_buffers()})
        traced = {name: state.pop(f"model.{name}") for name in names}

        def one_loss(params, x, y):
            full = {**state, **{f"model.{k}": v for k, v in params.items()}}
            losses = functional_call(wrapper, full, (unsqueeze_inputs(x), y.unsqueeze(0)))
            check_losses(losses, 1)
            return losses.sum()

        with torch.enable_grad():
            per_example = vmap(grad(one_loss), in_dims=(None, 0, 0))(traced, inputs, labels)
        return {b.name: BlockGrad(b, [Dense(b.assemble([per_example[p].detach().to(self.dtype) for p in b.params]))])
                for b in blocks}

    def _loop_or_refuse(self, blocks: list[TracedBlock], inputs, labels, loss: Callable | None = None
                        ) -> dict[str, BlockGrad]:
        try:
            return self.loop_route(blocks, inputs, labels, loss)
        except CaptureError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model cannot give this gradient at all
            raise CaptureError(f"block {blocks[0].name!r}: autograd cannot compute its gradient for one example "
                               f"({type(exc).__name__}: {_short(exc)})") from None

    def loop_route(self, blocks: list[TracedBlock], inputs, labels, loss: Callable | None = None
                   ) -> dict[str, BlockGrad]:
        names = [p for b in blocks for p in b.params]
        grads = per_example_loop(self.model, self.forward, loss or self.loss, [self.params[n] for n in names],
                                 inputs, labels)
        by_name = dict(zip(names, grads))
        return {b.name: BlockGrad(b, [Dense(b.assemble([by_name[p].to(self.dtype) for p in b.params]))])
                for b in blocks}


@plainly
def per_example_loop(model: nn.Module, forward: Callable, loss: Callable, params: list[torch.Tensor], inputs,
                     labels: torch.Tensor) -> list[torch.Tensor]:
    """The definition: for each example alone, `torch.autograd.grad` of its own loss w.r.t. `params`.
    Returns one [B, *shape] tensor per parameter (zeros where the loss does not depend on it)."""
    B = batch_size_of(inputs)
    rows: list[list[torch.Tensor]] = [[] for _ in params]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        for b in range(B):
            with torch.enable_grad():
                losses = loss(forward(model, take_rows(inputs, slice(b, b + 1))), labels[b:b + 1])
                check_losses(losses, 1)
                grads = torch.autograd.grad(losses.sum(), params, allow_unused=True) if losses.requires_grad \
                    else [None] * len(params)
            for i, (g, p) in enumerate(zip(grads, params)):
                rows[i].append(dense_grad(g, p))
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return [torch.stack(r) for r in rows]


def dense_grad(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient from autograd as a dense tensor of its shape: zeros where autograd gave None
    (unused), `.to_dense()` where it gave a sparse one (`nn.Embedding(sparse=True)`)."""
    if grad is None:
        return torch.zeros_like(param)
    grad = grad.detach()
    return grad.to_dense() if grad.is_sparse else grad


class _LossModule(nn.Module):
    """model + forward + per-example loss as one module, so torch.func can swap the model's parameters."""

    def __init__(self, model: nn.Module, forward: Callable, loss: Callable):
        super().__init__()
        self.model, self._forward, self._loss = model, forward, loss

    def forward(self, inputs, labels):
        return self._loss(self._forward(self.model, inputs), labels)


def check_losses(losses: Any, batch: int) -> None:
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.shape[0] != batch:
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise CaptureError(
            f"Task.loss must return one loss per example (shape [{batch}]), got {shape}"
            + (" (a .squeeze() in the model or the loss drops the batch axis of a batch of 1?)" if batch == 1 else ""))


def _compare_sum(block: TracedBlock, got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    scale = max(float(expected.abs().max()), float(got.abs().max()))
    err = float((got - expected).abs().max())
    if float(got.abs().max()) == 0.0 and float(expected.abs().max()) > 0.0:
        raise CaptureError(
            f"layer {block.name!r}: its per-example gradients are all zero while the batch gradient is not (max "
            f"{scale:.3g}): the capture does not see how the loss depends on it (e.g. activation checkpointing or "
            "a custom autograd Function around it)")
    if err > tolerance(dtype) * max(scale, 1e-30) and err > 1e-30:
        raise CaptureError(
            f"layer {block.name!r}: its per-example gradients from hooks do not sum to the batch gradient "
            f"(max error {err:.3g} of {scale:.3g}): the parameter is used in a way its module's hooks do not see "
            "(tied or functional reuse, a reparametrisation, a regulariser)")


def _detach(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    return outputs


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- calibration ----------------------------------------------------------------------------------

@plainly
def calibrate(model: nn.Module, blocks: list[TracedBlock], forward: Callable, loss: Callable, inputs, labels,
              dtype: torch.dtype = torch.float32) -> CapturePlan:
    """Choose each block's route on a few examples (`inputs`: the first rows of the training set; the first
    three are used).

    Raises CaptureError when the model cannot be captured at all (e.g. it mixes examples and cannot
    run one example at a time)."""
    N = batch_size_of(inputs)
    routes = {b.name: ("hook" if b.uses else "norm" if b.norm is not None else "vmap") for b in blocks}
    reasons: dict[str, str] = {}
    axes: dict[str, int] = {}
    holders = {id(p): type(m).__name__ for _, m in model.named_modules() for p in m._parameters.values()
               if p is not None}
    params = dict(model.named_parameters())
    for b in blocks:
        if not b.uses and b.norm is None:
            kind = holders.get(id(params[b.params[0]]), "module")
            reasons[b.name] = f"{kind} parameter: no factored route"
    probe = (take_rows(inputs, slice(0, min(N, 3))), labels[:min(N, 3)])
    _refuse_random_forward(model, forward, loss, *probe, dtype)
    _refuse_no_grad_regions(model, blocks, forward, probe[0])
    if N < 2:
        for b in blocks:
            routes[b.name], reasons[b.name] = "loop", "a single training example"
        return CapturePlan(blocks, routes, axes, reasons)
    B2 = min(N, 3)
    B1 = B2 - 1
    big = (take_rows(inputs, slice(0, B2)), labels[:B2])
    small = (take_rows(inputs, slice(0, B1)), labels[:B1])

    # 1. structural probe: batch axis of every hooked module and normalisation layer
    candidates = sorted({u.module for b in blocks if b.uses for u in b.uses}
                        | {b.norm.module for b in blocks if b.norm is not None and not b.uses})
    module_reasons = _probe_axes(model, forward, candidates, small[0], big[0], B1, B2, axes)
    for b in blocks:
        bad = [module_reasons[u.module] for u in b.uses if u.module in module_reasons]
        if b.uses and bad:
            routes[b.name], reasons[b.name] = "vmap", bad[0]
        elif routes[b.name] == "norm" and b.norm.module in module_reasons:
            routes[b.name], reasons[b.name] = "vmap", module_reasons[b.norm.module]

    # 2. examples mixed by the batch?
    per_example, mixing = _detect_mixing(model, forward, loss, big[0], big[1], dtype)
    plan = CapturePlan(blocks, routes, axes, reasons, per_example, mixing)

    # 3. hooks (and the norm route) must sum to the batch gradient
    capture = GradientCapture(model, plan, forward, loss, dtype)
    for b in list(capture.by_route["hook"]) + list(capture.by_route["norm"]):
        try:
            _run_per_example(capture, plan, lambda x, y, b=b: capture.hook_route([b], x, y, check=True), *big)
        except CaptureError as exc:
            routes[b.name], reasons[b.name] = "vmap", _short(exc)
        except Exception as exc:  # noqa: BLE001 - e.g. a module whose hooks break the forward
            routes[b.name], reasons[b.name] = "vmap", f"hooks failed: {type(exc).__name__}: {_short(exc)}"

    # 3b. a module shared by the batch (BROADCAST) keeps the hook route only if its per-example gradients equal
    #     the per-example loop's and the model's losses are unchanged by the expansion
    shared = [b for b in capture.by_route["hook"] if any(axes.get(u.module) == BROADCAST for u in b.uses)]
    if shared:
        with torch.no_grad():
            plain = loss(forward(model, big[0]), big[1]).detach()
        for b in shared:
            why = None
            try:
                got, _, hooked = capture.hook_route([b], *big)
                if plan.per_example:
                    got = _run_per_example(capture, plan, lambda x, y, b=b: capture.hook_route([b], x, y), *big)
                ref = capture.loop_route([b], *big)
                if not plan.per_example and not _close(hooked.detach(), plain, dtype):
                    why = "the model's losses change when its shared output is expanded to the batch"
                elif not _close(got[b.name].full(), ref[b.name].full(), dtype):
                    why = "per-example gradients of its output shared by the batch disagree with the per-example loop"
            except Exception as exc:  # noqa: BLE001 - the expansion broke the forward
                why = f"its output shared by the batch cannot be expanded ({type(exc).__name__}: {_short(exc)})"
            if why is not None:
                routes[b.name], reasons[b.name] = "vmap", f"module {b.uses[0].module!r}: {why}"

    # 4. torch.func where it works and agrees with the loop
    capture = GradientCapture(model, plan, forward, loss, dtype)
    vmap_blocks = capture.by_route["vmap"]
    if vmap_blocks:
        try:
            got = _run_per_example(capture, plan, lambda x, y: capture.vmap_route(vmap_blocks, x, y), *big)
            ref = capture.loop_route(vmap_blocks, *big)
            slow = _slow_under_vmap(model, plan)
            for b in vmap_blocks:
                if not _close(got[b.name].full(), ref[b.name].full(), dtype):
                    routes[b.name] = "loop"
                    reasons[b.name] = "torch.func per-sample gradients disagree with the per-example loop"
                elif slow:
                    routes[b.name] = "loop"
                    reasons[b.name] = (reasons.get(b.name) + "; " if reasons.get(b.name) else "") + slow
        except CaptureError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch.func cannot batch this model's forward
            why = f"torch.func cannot batch the forward ({type(exc).__name__}: {_short(exc)})"
            for b in vmap_blocks:
                routes[b.name] = "loop"
                reasons[b.name] = (reasons.get(b.name) + "; " if reasons.get(b.name) else "") + why
    loop_blocks = [b for b in blocks if routes[b.name] == "loop"]
    if loop_blocks:
        GradientCapture(model, plan, forward, loss, dtype)._loop_or_refuse(loop_blocks, *big)
    return plan


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a module's arguments or output (tuples, lists, dicts, Hugging Face ModelOutputs), as
    detached copies (a later in-place op must not change what was recorded)."""
    if isinstance(value, torch.Tensor):
        return [value.detach().clone()]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _same(a: list[torch.Tensor], b: list[torch.Tensor], dtype: torch.dtype) -> bool:
    if len(a) != len(b) or any(x.shape != y.shape or x.dtype != y.dtype for x, y in zip(a, b)):
        return False
    for x, y in zip(a, b):
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False
            continue
        scale = max(float(x.abs().max()) if x.numel() else 0.0, 1e-30)
        if x.numel() and float((x.double() - y.double()).abs().max()) > tolerance(dtype) * scale:
            return False
    return True


def _refuse_random_forward(model: nn.Module, forward: Callable, loss: Callable, inputs, labels,
                           dtype: torch.dtype) -> None:
    """Refuse (CaptureError, one line) a forward that is random in eval mode: two forwards of the same examples
    give different outputs or losses (F.dropout(training=True), stochastic depth drawn whatever the mode,
    noise layers). Names the first module, in the order calls complete, whose output differs for the same
    input (located on one example, with every module's inputs and outputs recorded twice)."""
    def run(batch, batch_labels, records=None):
        handles = [] if records is None else [
            m.register_forward_hook(lambda mod, args, out, n=name: records.append((n, _tensors(args), _tensors(out))))
            for name, m in model.named_modules()]
        try:
            with torch.no_grad():
                outputs = forward(model, batch)
                return _tensors(outputs) + _tensors(loss(outputs, batch_labels))
        finally:
            for h in handles:
                h.remove()

    try:  # a random draw may repeat (stochastic depth keeps a branch with probability p): several tries
        reference = run(inputs, labels)
        if all(_same(reference, run(inputs, labels), dtype) for _ in range(RANDOM_TRIES)):
            return
        one = (take_rows(inputs, slice(0, 1)), labels[:1])
        for _ in range(4 * RANDOM_TRIES):
            first: list = []
            second: list = []
            if not _same(run(*one, first), run(*one, second), dtype):
                break
    except Exception:  # noqa: BLE001 - a forward that fails is reported by the checks that follow
        return
    occurrences: dict[str, int] = {}
    by_call = {}
    for name, args, out in second:
        by_call[(name, occurrences.get(name, 0))] = (args, out)
        occurrences[name] = occurrences.get(name, 0) + 1
    occurrences.clear()
    culprit = None
    for name, args, out in first:
        key = (name, occurrences.get(name, 0))
        occurrences[name] = key[1] + 1
        other = by_call.get(key)
        if other is not None and _same(args, other[0], dtype) and not _same(out, other[1], dtype):
            culprit = name
            break
    modules = dict(model.named_modules())
    if culprit is None:
        where = "outside the model's modules (in Task.forward or Task.loss?)"
    elif culprit == "":
        where = f"in the model's own forward ({type(model).__name__})"
    else:
        where = f"first in module {culprit!r} ({type(modules[culprit]).__name__}), whose output changes for the same input"
    raise CaptureError(
        f"the forward is random in eval mode: two forwards of the same training examples differ, {where} (e.g. "
        "F.dropout(..., training=True), or stochastic depth drawn whatever the mode); TracIn needs a deterministic "
        "forward: make that randomness follow module.training")


def _refuse_no_grad_regions(model: nn.Module, blocks: list[TracedBlock], forward: Callable, inputs) -> None:
    """Refuse (CaptureError, one line) traced layers that the forward calls only with gradients disabled (a
    `torch.no_grad()` / `inference_mode()` region inside forward): their parameters get no gradient."""
    traced = {p for b in blocks for p in b.params}
    names = {id(p): n for n, p in model.named_parameters()}
    holders = {}
    for name, module in model.named_modules():
        own = [names[id(p)] for p in module._parameters.values() if p is not None and names.get(id(p)) in traced]
        if own:
            holders[name] = (module, own)
    calls: dict[str, list[bool]] = {}
    handles = [module.register_forward_pre_hook(lambda m, a, n=name: calls.setdefault(n, []).append(
        torch.is_grad_enabled())) for name, (module, _) in holders.items()]
    try:
        with torch.enable_grad():
            forward(model, inputs)
    except Exception:  # noqa: BLE001 - a forward that fails is reported by the checks that follow
        return
    finally:
        for h in handles:
            h.remove()
    cold = [name for name, flags in calls.items() if not any(flags)]
    if cold:
        params = [p for name in cold for p in holders[name][1]]
        raise CaptureError(
            f"layer{'s' if len(cold) > 1 else ''} {', '.join(repr(n) for n in cold[:5])} "
            f"{'run' if len(cold) > 1 else 'runs'} only inside a torch.no_grad() region of the forward, so the traced "
            f"parameters {', '.join(repr(p) for p in params[:5])}{' ...' if len(params) > 5 else ''} get no gradient "
            "(TracIn over them is zero): leave them out of `layers`, or move the no_grad region")


def _slow_under_vmap(model: nn.Module, plan: CapturePlan) -> str | None:
    """Why the per-example loop beats torch.func on this model, or None. A fixed rule, so that plans do not
    depend on the machine's load: examples run one at a time anyway (nothing for vmap to batch), and
    recurrent layers, which torch.func runs step by step (measured 25.8x a plain forward+backward for an
    LSTM, against 4.9x for the loop: docs/benchmarks.md)."""
    if plan.per_example:
        return "examples run one at a time (the model mixes a batch): the per-example loop is the faster exact route"
    rnn = next((n for n, m in model.named_modules() if isinstance(m, nn.RNNBase)), None)
    if rnn is not None:
        return f"recurrent module {rnn!r}: the per-example loop is faster than torch.func through it"
    return None


def _run_per_example(capture: GradientCapture, plan: CapturePlan, fn, inputs, labels):
    """Run a route on a batch, or one example at a time when the plan says examples mix."""
    if not plan.per_example:
        return fn(inputs, labels)
    B = batch_size_of(inputs)
    results = [fn(take_rows(inputs, slice(b, b + 1)), labels[b:b + 1]) for b in range(B)]
    if isinstance(results[0], tuple):
        results = [r[0] for r in results]
    return {name: BlockGrad.concat([r[name] for r in results]) for name in results[0]}


def _short(exc: Exception, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    scale = max(float(b.abs().max()), float(a.abs().max()), 1e-30)
    return float((a - b).abs().max()) <= tolerance(dtype) * scale


def _probe_axes(model, forward, names: list[str], small, big, B1: int, B2: int, axes: dict[str, int]) -> dict[str, str]:
    """Fill `axes` with each module's batch axis; return {module: why it cannot take the hook route}."""
    modules = dict(model.named_modules())
    shapes: dict[str, list[list[tuple]]] = {n: [[], []] for n in names}

    def recorder(name, slot):
        def hook(module, args, output):
            x = args[0] if args else None
            shapes[name][slot].append((tuple(x.shape) if isinstance(x, torch.Tensor) else None,
                                       tuple(output.shape) if isinstance(output, torch.Tensor) else None))
        return hook

    for slot, batch in ((0, small), (1, big)):
        handles = [modules[n].register_forward_hook(recorder(n, slot)) for n in names]
        try:
            with torch.no_grad():
                forward(model, batch)
        finally:
            for h in handles:
                h.remove()
    reasons = {}
    for name in names:
        module = modules[name]
        calls1, calls2 = shapes[name]
        if not calls1 and not calls2:
            reasons[name] = (f"module {name!r} is never called as a module (its parent uses its weight directly, "
                             "like attention's out_proj)")
            continue
        if len(calls1) != len(calls2):
            reasons[name] = f"module {name!r} is called {len(calls1)} times for {B1} examples and {len(calls2)} for {B2}"
            continue
        found: set[int] | None = None
        for (in1, out1), (in2, out2) in zip(calls1, calls2):
            if in1 is None or in2 is None or out1 is None or out2 is None:
                found = set()
                break
            ok = {ax for ax in range(min(len(in1), len(out1)))
                  if in1[ax] == B1 and in2[ax] == B2 and out1[ax] == B1 and out2[ax] == B2}
            if isinstance(module, nn.Linear):
                ok.discard(len(in1) - 1)
            if isinstance(module, nn.Conv2d):
                ok = ok & {0} if len(in1) == 4 else set()
            found = ok if found is None else found & ok
        shared = isinstance(module, (nn.Embedding, nn.Linear)) and all(
            len(i) >= 2 and len(o) >= 2 and i[0] == 1 and o[0] == 1 for c in (calls1, calls2) for i, o in c)
        if found and len(found) == 1:
            axes[name] = found.pop()
        elif not found and shared:  # e.g. position ids [1, T] broadcast over the batch downstream
            axes[name] = BROADCAST
        else:
            shown = ", ".join(f"{c[0]}" for c in calls2[:2])
            reasons[name] = (f"module {name!r}: no single axis of its input holds the examples (input shapes {shown} "
                             f"for a batch of {B2}: sequence-first, ids broadcast over the batch, or examples folded "
                             "into rows)")
    return reasons


def _detect_mixing(model, forward, loss, inputs, labels, dtype) -> tuple[bool, str | None]:
    """(examples mix?, the first module whose output rows change with the batch). Compares each example's
    loss inside the batch with its loss alone."""
    B = batch_size_of(inputs)
    with torch.no_grad():
        batched = loss(forward(model, inputs), labels)
        check_losses(batched, B)
        alone = []
        for b in range(B):
            entered: list[str] = []
            handles = _track_calls(model, entered)
            try:
                one = loss(forward(model, take_rows(inputs, slice(b, b + 1))), labels[b:b + 1])
            except Exception as exc:  # noqa: BLE001
                culprit = entered[-1] if entered else None
                module = dict(model.named_modules()).get(culprit) if culprit else None
                where = f"module {culprit!r} ({type(module).__name__}) " if culprit else "the model's forward "
                if isinstance(module, nn.modules.batchnorm._NormBase):
                    advice = ("it normalises with the statistics of the batch, which mixes examples; they must then be "
                              "embedded one at a time, so this model cannot be indexed exactly (use running "
                              "statistics: track_running_stats=True)")
                else:
                    advice = "the service embeds one example at a time, so this model cannot be indexed"
                raise CaptureError(f"{where}fails on one example alone ({type(exc).__name__}: {_short(exc)}); "
                                   f"{advice}") from None
            finally:
                for h in handles:
                    h.remove()
            check_losses(one, 1)
            alone.append(one)
    alone_t = torch.cat(alone).to(torch.float64)
    batched = batched.to(torch.float64)
    scale = max(float(batched.abs().max()), 1e-30)
    if float((alone_t - batched).abs().max()) <= tolerance(dtype) * scale:
        return False, None
    return True, _mixing_module(model, forward, inputs)


def _track_calls(model: nn.Module, entered: list[str]) -> list:
    """Hooks that keep `entered` = the stack of module calls in progress (the innermost is last)."""
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: entered.append(n)))
        handles.append(module.register_forward_hook(lambda m, a, o, n=name: entered.remove(n) if n in entered else None))
    return handles


def _mixing_module(model, forward, inputs) -> str | None:
    """The first leaf module (in call order) whose output row 0 differs between the batch and example 0 alone."""
    records: dict[str, list] = {}
    order: list[str] = []

    def hook_for(name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                records.setdefault(name, []).append(output.detach())
                if name not in order:
                    order.append(name)
        return hook

    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    outs = []
    for batch in (inputs, take_rows(inputs, slice(0, 1))):
        records.clear()
        handles = [m.register_forward_hook(hook_for(n)) for n, m in leaves]
        try:
            with torch.no_grad():
                forward(model, batch)
        except Exception:  # noqa: BLE001
            pass
        finally:
            for h in handles:
                h.remove()
        outs.append({k: v[0] for k, v in records.items()})
    batched, alone = outs
    for name in order:
        a, b = batched.get(name), alone.get(name)
        if a is None or b is None or a.dim() == 0 or b.dim() == 0 or a.shape[1:] != b.shape[1:]:
            continue
        if not torch.allclose(a[:1].double(), b[:1].double(), rtol=1e-4, atol=1e-6):
            return name
    return None


# -- allocator --------------------------------------------------------------------------------------

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

