"""Conv2d capture without im2col: the batched weight-gradient convolution and the convolution by the
projection rows must equal the unfold-based formulas exactly; in-place edits of a kept input are refused."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from indexer.capture.blocks import select_blocks
from indexer.capture.routes import CaptureError, CapturePlan, GradientCapture
from indexer.capture.grads import BlockGrad, ConvCall, ConvOuter, Outer
from indexer.sketch.projection import make_projector

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


def test_conv_block_grad_routes_agree_for_every_kind():
    """A conv term (lazy patches, explicit gradient by convolution) and the same gradient given as explicit
    patches project alike, and have the same norm and inner products."""
    call, bias = _call(GEOMETRIES[1], seed=2)
    B, m = call.d.shape[:2]
    from indexer.capture.blocks import TracedBlock

    n = call.x.shape[1] * 9 + 1
    block = TracedBlock("conv", "conv2d", m, n, ("conv.weight", "conv.bias"), ((m, n - 1), (m,)))
    lazy = lambda: BlockGrad(block, [ConvOuter((call,), bias)])  # noqa: E731
    dense = lambda: BlockGrad(block, [Outer(call.deltas(), call.unfolded(bias))])  # noqa: E731
    for kind in ("exact", "sketch", "kronecker", "gaussian"):
        proj = make_projector(block, kind, 24, seed=5, checkpoint=0)
        assert torch.allclose(proj.project(lazy()), proj.project(dense()), rtol=1e-10, atol=1e-12), kind
    explicit = dense().full()
    assert torch.allclose(lazy().squared_norm(), explicit.pow(2).sum((1, 2)), rtol=1e-12)
    assert torch.allclose(lazy().batch_sum(), explicit.sum(0), rtol=1e-10, atol=1e-12)
    assert torch.allclose(lazy().inner(dense()), explicit.reshape(B, -1) @ explicit.reshape(B, -1).T, rtol=1e-10)


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
    blocks = select_blocks(model, None)
    plan = CapturePlan(blocks, {b.name: "hook" for b in blocks}, {"conv1": 0, "fc": 0})
    loss = lambda out, y: nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    capture = GradientCapture(model, plan, lambda m, x: m(x), loss, torch.float64)
    x = torch.randn(2, 1, 7, 7, dtype=torch.float64)
    with pytest.raises(CaptureError, match="modified in place"):
        capture.capture(x, torch.tensor([0, 1]))
