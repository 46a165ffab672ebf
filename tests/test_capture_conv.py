"""Conv2d capture without im2col: the batched weight-gradient convolution and the convolution by the
projection rows must equal the unfold-based formulas exactly; in-place edits of a kept input are refused."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from indexer.capture import ConvCall, GradientCapture, LayerGrad, select_layers
from indexer.projection import make_projector

GEOMETRIES = [  # (batch, c_in, side, c_out, kernel, stride, padding, dilation, bias)
    (3, 2, 7, 4, 3, 1, 1, 1, True),
    (3, 3, 7, 4, 3, 2, 0, 1, True),
    (2, 3, 9, 5, (3, 2), (2, 1), (1, 0), (1, 2), False),
    (4, 1, 8, 3, 2, 3, 1, 1, True),
]


def _call(geometry, seed=0):
    B, c_in, side, c_out, k, stride, padding, dilation, bias = geometry
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, bias=bias).double()
    x = torch.randn(B, c_in, side, side, dtype=torch.float64)
    d = torch.randn_like(conv(x))
    return ConvCall(x, d, conv.kernel_size, conv.stride, conv.padding, conv.dilation), bias


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_weight_gradients_equal_unfold_einsum(geometry):
    call, bias = _call(geometry)
    a = call.unfolded(bias)
    delta = call.d.reshape(call.d.shape[0], call.d.shape[1], -1).transpose(1, 2)
    reference = torch.einsum("btm,btn->bmn", delta, a)
    assert torch.allclose(call.weight_gradients(bias), reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_projected_patches_equal_unfold_matmul(geometry):
    call, bias = _call(geometry, seed=1)
    a = call.unfolded(bias)
    P = torch.randn(6, a.shape[-1], dtype=torch.float64)
    assert torch.allclose(call.projected_patches(P, bias), a @ P.T, rtol=1e-12, atol=1e-12)


def test_conv_layer_grad_routes_agree_for_every_kind():
    """A conv LayerGrad (lazy patches) and the same gradient given as explicit patches project alike."""
    call, bias = _call(GEOMETRIES[1], seed=2)
    B, m = call.d.shape[:2]
    delta = call.d.reshape(B, m, -1).transpose(1, 2)
    from indexer.capture import TracedLayer

    layer = TracedLayer("conv", "conv2d", m, call.x.shape[1] * 9 + 1, ("conv.weight", "conv.bias"), True)
    lazy = LayerGrad(layer, delta, conv=(call,))
    dense = LayerGrad(layer, delta, a=call.unfolded(bias))
    for kind in ("exact", "sketch", "kronecker", "gaussian"):
        proj = make_projector(layer, kind, 24, seed=5, checkpoint=0)
        v1, n1 = proj.project(LayerGrad(layer, delta, conv=(call,)))
        v2, n2 = proj.project(LayerGrad(layer, delta, a=dense.a))
        assert torch.allclose(v1, v2, rtol=1e-10, atol=1e-12), kind
        assert torch.allclose(n1, n2, rtol=1e-12), kind
    assert torch.allclose(lazy.squared_norm(), dense.full().pow(2).sum((1, 2)), rtol=1e-12)


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 5 * 5, 3)

    def forward(self, x):
        x = x * 1.0  # a tensor of the model's own, outside autograd's view (x needs no gradient)
        h = self.conv1(x)
        x.mul_(2.0)  # edits the input conv1 used, after conv1 ran: autograd cannot notice
        return self.fc((h + x[:, :, 1:-1, 1:-1]).flatten(1))


def test_in_place_edit_of_a_kept_conv_input_is_refused():
    model = _InPlace().double()
    layers = select_layers(model, None)
    capture = GradientCapture(model, layers, lambda m, x, y: nn.functional.cross_entropy(m(x), y, reduction="none"))
    x = torch.randn(2, 1, 7, 7, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="modified in place"):
        capture.capture(x, torch.tensor([0, 1]))
