"""Projection kinds: shapes, routes that must agree, dimension rules."""
from __future__ import annotations

import torch

from indexer.capture import LayerGrad, TracedLayer
from indexer.projection import LayerProjector, fingerprint, make_projector


def _grad(B=4, T=5, m=12, n=9, index=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = TracedLayer("layer", "embedding" if index else "linear", m, n, ("layer.weight",))
    delta = torch.randn(B, T, m, generator=g, dtype=torch.float64)
    if index:
        ids = torch.randint(0, n, (B, T), generator=g)
        ids[0, -1] = -1  # padding position
        return LayerGrad(layer, delta, index=ids)
    return LayerGrad(layer, delta, a=torch.randn(B, T, n, generator=g, dtype=torch.float64))


def test_full_gradient_of_index_layer_equals_dense_one_hot():
    grad = _grad(index=True)
    one_hot = torch.nn.functional.one_hot(grad.index.clamp(min=0), grad.layer.n).double()
    one_hot[grad.index < 0] = 0
    dense = LayerGrad(grad.layer, grad.delta, a=one_hot)
    assert torch.allclose(grad.full(), dense.full(), atol=1e-12)
    assert torch.allclose(grad.squared_norm(), dense.full().pow(2).sum((1, 2)), atol=1e-12)


def test_squared_norm_routes_agree():
    for T in (1, 3, 40):
        grad = _grad(T=T)
        assert torch.allclose(grad.squared_norm(), grad.full().pow(2).sum((1, 2)), rtol=1e-12)


def test_sketch_fft_route_equals_explicit_route():
    grad = _grad(T=2, m=30, n=40)
    proj = make_projector(grad.layer, "sketch", 64, seed=1, checkpoint=0)
    fft_vec, _ = proj.project(grad)  # T (m + n + 3 k log k) < T m n: FFT route
    h_o, s_o, h_i, s_i = (proj.arrays[k] for k in ("h_out", "s_out", "h_in", "s_in"))
    explicit = torch.zeros(grad.batch, 64, dtype=torch.float64)
    buckets = ((h_o.view(-1, 1) + h_i.view(1, -1)) % 64).reshape(-1)
    explicit.index_add_(1, buckets, grad.full().reshape(grad.batch, -1) * (s_o.view(-1, 1) * s_i.view(1, -1)).reshape(1, -1))
    assert torch.allclose(fft_vec, explicit, atol=1e-10)


def test_sketch_of_index_layer_equals_sketch_of_dense_layer():
    grad = _grad(index=True, m=16, n=20)
    proj = make_projector(grad.layer, "sketch", 32, seed=2, checkpoint=1)
    one_hot = torch.nn.functional.one_hot(grad.index.clamp(min=0), grad.layer.n).double()
    one_hot[grad.index < 0] = 0
    dense_layer = TracedLayer("layer", "linear", 16, 20, ("layer.weight",))
    dense = LayerProjector(dense_layer, "sketch", 32, proj.arrays)
    assert torch.allclose(proj.project(grad)[0], dense.project(LayerGrad(dense_layer, grad.delta, a=one_hot))[0],
                          atol=1e-10)


def test_small_layers_stay_exact_and_kronecker_keeps_small_side():
    small = TracedLayer("s", "linear", 3, 4, ("s.weight",))
    assert make_projector(small, "sketch", 64, 0, 0).kind == "exact"
    head = TracedLayer("head", "linear", 10, 129, ("head.weight",))
    proj = make_projector(head, "kronecker", 256, 0, 0)
    assert "P_out" not in proj.arrays and proj.arrays["P_in"].shape == (25, 129) and proj.dim == 250


def test_fingerprint_changes_with_seed_and_is_stable():
    layer = TracedLayer("l", "linear", 30, 30, ("l.weight",))
    a = [[make_projector(layer, "sketch", 64, 0, 0)]]
    b = [[make_projector(layer, "sketch", 64, 0, 0)]]
    c = [[make_projector(layer, "sketch", 64, 1, 0)]]
    assert fingerprint(a, "sketch", 0, 64) == fingerprint(b, "sketch", 0, 64)
    assert fingerprint(a, "sketch", 0, 64) != fingerprint(c, "sketch", 1, 64)
