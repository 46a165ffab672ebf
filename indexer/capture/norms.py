"""The norm route: per-example gradients of normalisation layers' affine parameters from the one batched
forward + backward of the hook route, without torch.func.

A normalisation layer computes y = gamma (.) x_hat + beta with x_hat its input normalised (BatchNorm with
running statistics, LayerNorm, GroupNorm, RMSNorm). With delta = d(sum_b loss_b)/dy recorded by a tensor
hook on its output and x_hat recomputed from its recorded input by the same normalisation with the affine
part off (F.batch_norm / F.layer_norm / F.group_norm / F.rms_norm with weight and bias None),

    grad gamma(b) = sum over the axes that are neither the batch axis nor gamma's of delta_b (.) x_hat_b
    grad beta(b)  = the same sum of delta_b

exactly (the formula autograd itself uses; Ioffe & Szegedy 2015, Ba et al. 2016). Calibration proves it on
the user's model like the hook route: the per-example gradients must sum to the batch gradient, and the
self-check compares them with one autograd call per example; a module used otherwise leaves the route.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
NORM_TYPES: tuple[type, ...] = (*_BATCHNORM, nn.LayerNorm, nn.GroupNorm) + \
    ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def norm_role(module: nn.Module, attr: str) -> str | None:
    """"weight" / "bias" when `module.<attr>` is the scale / shift of a normalisation layer the norm route
    handles, else None."""
    if not isinstance(module, NORM_TYPES) or attr not in ("weight", "bias"):
        return None
    if isinstance(module, _BATCHNORM) and module.training:
        return None  # batch statistics of a training-mode BatchNorm are not recomputed here
    return attr


def parameter_axes(module: nn.Module, ndim: int) -> tuple[int, ...]:
    """The axes of the module's input that its weight / bias run along (channels, or the normalised shape)."""
    if isinstance(module, (*_BATCHNORM, nn.GroupNorm)):
        return (1,)
    shape = tuple(module.normalized_shape)
    return tuple(range(ndim - len(shape), ndim))


def normalised(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x_hat: the module's normalisation of `x` with the affine part off (the module's own eps and, for
    BatchNorm, its running statistics, or the batch's when it keeps none)."""
    if isinstance(module, _BATCHNORM):
        running = module.running_mean is not None and module.track_running_stats
        return F.batch_norm(x, module.running_mean if running else None, module.running_var if running else None,
                            None, None, training=not running, momentum=0.0, eps=module.eps)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    return F.rms_norm(x, module.normalized_shape, None, module.eps)


def per_example_gradients(module: nn.Module, role: str, x: torch.Tensor, delta: torch.Tensor, axis: int
                          ) -> torch.Tensor:
    """[B, *parameter shape]: the gradient of each example's loss w.r.t. the module's weight (role "weight")
    or bias ("bias"), from its input x and output gradient delta (same shape, batch on `axis`)."""
    keep = set(parameter_axes(module, x.dim())) | {axis}
    summed = tuple(a for a in range(x.dim()) if a not in keep)
    value = delta * normalised(module, x) if role == "weight" else delta
    if summed:
        value = value.sum(dim=summed)
    # what is left: the batch axis and the parameter's axes, in input order; batch first
    kept = sorted(keep)
    return value.movedim(kept.index(axis), 0)
