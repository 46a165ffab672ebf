"""Block gradients and projections: every route of a computation must agree with the explicit one."""
from __future__ import annotations

import pytest
import torch

from indexer.capture.blocks import TracedBlock
from indexer.capture.grads import BlockGrad, Dense, Outer
from indexer.sketch.projection import BlockProjector, fingerprint, make_projector


def _block(m=12, n=9, kind="linear", name="layer"):
    return TracedBlock(name, kind, m, n, (f"{name}.weight",), ((m, n),))


def _outer(B=4, T=5, m=12, n=9, index=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, T, n, generator=g, dtype=torch.float64)
    if index:
        ids = torch.randint(0, m, (B, T), generator=g)
        ids[0, -1] = -1  # padding position
        return Outer(ids, v)
    return Outer(torch.randn(B, T, m, generator=g, dtype=torch.float64), v)


def _one_hot(term: Outer, m: int) -> Outer:
    dense = torch.nn.functional.one_hot(term.u.clamp(min=0), m).double()
    dense[term.u < 0] = 0
    return Outer(dense, term.v)


def test_full_gradient_of_index_term_equals_dense_one_hot():
    term = _outer(index=True)
    grad, dense = BlockGrad(_block(), [term]), BlockGrad(_block(), [_one_hot(term, 12)])
    assert torch.allclose(grad.full(), dense.full(), atol=1e-12)
    assert torch.allclose(grad.squared_norm(), dense.full().pow(2).sum((1, 2)), atol=1e-12)
    assert torch.allclose(grad.batch_sum(), dense.full().sum(0), atol=1e-12)


@pytest.mark.parametrize("T", [1, 3, 40])
@pytest.mark.parametrize("index", [False, True])
def test_squared_norm_and_inner_routes_agree(T, index):
    block = _block()
    a = BlockGrad(block, [_outer(T=T, index=index)])
    b = BlockGrad(block, [_outer(B=3, T=T + 1, index=index, seed=1)])
    explicit_a = a.full().reshape(a.batch, -1)
    explicit_b = b.full().reshape(b.batch, -1)
    fresh_a = BlockGrad(block, a.terms)  # no cached full: the factored route where it is cheaper
    assert torch.allclose(fresh_a.squared_norm(), explicit_a.pow(2).sum(1), rtol=1e-12)
    assert torch.allclose(BlockGrad(block, a.terms).inner(BlockGrad(block, b.terms)), explicit_a @ explicit_b.T,
                          rtol=1e-10, atol=1e-12)


def test_tied_block_sums_its_terms_everywhere():
    """A tied weight: one dense term (an LM head's delta a^T) plus one-hot rows (the embedding's)."""
    block = _block(m=10, n=6, kind="tied")
    head = _outer(T=1, m=10, n=6, seed=3)
    emb = _outer(T=4, m=10, n=6, index=True, seed=4)
    grad = BlockGrad(block, [head, emb])
    full = BlockGrad(block, [head]).full() + BlockGrad(block, [emb]).full()
    assert torch.allclose(grad.full(), full, atol=1e-12)
    assert torch.allclose(BlockGrad(block, [head, emb]).squared_norm(), full.pow(2).sum((1, 2)), rtol=1e-12)
    other = BlockGrad(block, [_outer(B=2, T=1, m=10, n=6, seed=5), _outer(B=2, T=3, m=10, n=6, index=True, seed=6)])
    assert torch.allclose(BlockGrad(block, [head, emb]).inner(other),
                          full.reshape(4, -1) @ other.full().reshape(2, -1).T, rtol=1e-10, atol=1e-12)
    for kind in ("sketch", "kronecker", "gaussian"):
        proj = make_projector(block, kind, 16, seed=1, checkpoint=0)
        summed = proj.project(BlockGrad(block, [head])) + proj.project(BlockGrad(block, [emb]))
        assert torch.allclose(proj.project(grad), summed, atol=1e-12), kind


def test_sketch_fft_route_equals_explicit_route():
    block = _block(m=60, n=300)
    grad = BlockGrad(block, [_outer(T=2, m=60, n=300)])
    proj = make_projector(block, "sketch", 64, seed=1, checkpoint=0)
    assert not grad.explicit_cheaper(64)  # the FFT route is taken
    via_fft = proj.project(grad)
    explicit = proj.project(BlockGrad(block, [Dense(grad.full())]))
    assert torch.allclose(via_fft, explicit, atol=1e-10)


def test_sketch_of_index_term_equals_sketch_of_dense_term():
    block = _block(m=20, n=16)
    term = _outer(index=True, m=20, n=16)
    proj = make_projector(block, "sketch", 32, seed=2, checkpoint=1)
    assert torch.allclose(proj.project(BlockGrad(block, [term])), proj.project(BlockGrad(block, [_one_hot(term, 20)])),
                          atol=1e-10)


def test_small_blocks_are_placed_and_kronecker_keeps_small_side():
    small = _block(3, 4)
    place = make_projector(small, "sketch", 64, 0, 0)
    assert place.kind == "place" and place.dim == 64 and len(set(place.arrays["position"].tolist())) == 12
    grad = BlockGrad(small, [_outer(m=3, n=4)])
    out = place.project(grad)
    assert torch.allclose(out.pow(2).sum(1), grad.squared_norm(), rtol=1e-12)  # placement loses nothing
    head = _block(10, 129)
    proj = make_projector(head, "kronecker", 256, 0, 0)
    assert "P_out" not in proj.arrays and proj.arrays["P_in"].shape == (25, 129) and proj.dim == 256


@pytest.mark.parametrize("kind", ["sketch", "kronecker", "gaussian"])
def test_every_kind_writes_dim_numbers(kind):
    for block in (_block(3, 4), _block(30, 40)):
        proj = make_projector(block, kind, 48, 0, 0)
        assert proj.project(BlockGrad(block, [_outer(m=block.m, n=block.n)])).shape == (4, 48)


def test_fingerprint_changes_with_seed_and_is_stable():
    block = _block(30, 30)
    a = [[make_projector(block, "sketch", 64, 0, 0)]]
    b = [[make_projector(block, "sketch", 64, 0, 0)]]
    c = [[make_projector(block, "sketch", 64, 1, 0)]]
    assert fingerprint(a, "sketch", 0, 64) == fingerprint(b, "sketch", 0, 64)
    assert fingerprint(a, "sketch", 0, 64) != fingerprint(c, "sketch", 1, 64)
    assert isinstance(a[0][0], BlockProjector)
