"""Per-example gradients of one traced block, kept in factored form as long as that is cheaper.

A block's per-example gradient G_b (layout [m, n], see `indexer.capture.blocks`) is a sum of *terms*:

    Outer(u, v)      G_b = sum_t u[b,t] v[b,t]^T    u: float [B, T, m] or int64 ids [B, T] (one-hot rows,
                                                    -1 = no contribution), v: float [B, T, n]
    ConvOuter(calls) the same for a Conv2d (u = output gradients, v = unfolded patches), whose explicit
                     gradient comes from a batched weight-gradient convolution without im2col
    Dense(g)         the explicit G [B, m, n] (torch.func and per-example-loop routes)

A tied weight has one term per module that uses it; everything else has one. From the terms,
`BlockGrad` computes what the index and the re-ranking need, exactly, by whichever identity costs less:

    full()            [B, m, n]
    squared_norm()    [B]        ||G_b||_F^2  (self-influence part; never approximated)
    inner(other)      [Ba, Bb]   <G_a, G_b>_F  (exact TracIn terms between two batches)
    batch_sum()       [m, n]     sum_b G_b     (must equal the batch gradient of the summed loss)

The factored identity is <sum_t u_t v_t^T, sum_s u'_s v'_s^T> = sum_{t,s} (u_t . u'_s)(v_t . v'_s).
Factors and explicit gradients are kept in the capture's dtype (float32 or float64); inner products and
the Gram identity are accumulated in float64 (float32 loses digits to cancellation there); plain sums of
squares are computed in the capture's dtype and squared in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from indexer.capture.blocks import TracedBlock


@dataclass(frozen=True)
class ConvCall:
    """One call of a hooked Conv2d: its input x [B, C_in, H, W] and output gradient d [B, m, H', W']."""

    x: torch.Tensor
    d: torch.Tensor
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def select(self, rows) -> "ConvCall":
        return ConvCall(self.x[rows], self.d[rows], self.kernel_size, self.stride, self.padding, self.dilation)

    def unfolded(self, bias: bool) -> torch.Tensor:
        """The patches a_t [B, T, n] (im2col; a trailing 1 for the bias)."""
        a = F.unfold(self.x, self.kernel_size, self.dilation, self.padding, self.stride).transpose(1, 2)
        if bias:
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        return a

    def deltas(self) -> torch.Tensor:
        """Output gradients as [B, T, m] (a view)."""
        return self.d.reshape(self.d.shape[0], self.d.shape[1], -1).transpose(1, 2)

    def projected_patches(self, P: torch.Tensor, bias: bool) -> torch.Tensor:
        """a_t P^T for every position [B, T, k] without im2col: a convolution with the rows of P as filters."""
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

    def summed_weight_gradient(self, bias: bool) -> torch.Tensor:
        """sum_b of `weight_gradients` [m, n]: one ordinary weight-gradient convolution."""
        m, c_in = self.d.shape[1], self.x.shape[1]
        kh, kw = self.kernel_size
        _, grad_w, _ = torch.ops.aten.convolution_backward(
            self.d, self.x, self.x.new_empty(m, c_in, kh, kw), None, list(self.stride), list(self.padding),
            list(self.dilation), False, [0, 0], 1, [False, True, False],
        )
        g = grad_w.reshape(m, -1)
        if bias:
            g = torch.cat([g, self.d.sum(dim=(0, 2, 3)).unsqueeze(-1)], dim=1)
        return g


class Outer:
    """G_b = sum_t u[b,t] v[b,t]^T. `u` float [B, T, m] or int64 ids [B, T] (-1 = none); `v` [B, T, n]."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor):
        self.u, self.v = u, v

    @property
    def indexed(self) -> bool:
        return not self.u.is_floating_point()

    @property
    def batch(self) -> int:
        return int(self.v.shape[0])

    @property
    def positions(self) -> int:
        return int(self.v.shape[1])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.u, self.v

    def full(self, m: int, n: int) -> torch.Tensor:
        if not self.indexed:
            return torch.einsum("btm,btn->bmn", self.u, self.v)
        B, T = self.u.shape
        out = torch.zeros(B, m + 1, n, dtype=self.v.dtype, device=self.v.device)
        idx = torch.where(self.u < 0, m, self.u)  # no-contribution rows go to a dropped extra row
        out.scatter_add_(1, idx.unsqueeze(-1).expand(B, T, n), self.v)
        return out[:, :m, :]

    def batch_sum(self, m: int, n: int) -> torch.Tensor:
        v = self.v.reshape(-1, n)
        if not self.indexed:
            return self.u.reshape(-1, self.u.shape[-1]).T @ v
        idx = self.u.reshape(-1)
        keep = idx >= 0
        out = torch.zeros(m, n, dtype=v.dtype, device=v.device)
        return out.index_add_(0, idx[keep], v[keep])

    def select(self, rows) -> "Outer":
        return Outer(self.u[rows], self.v[rows])

    def full_cost(self, m: int, n: int) -> float:
        return self.batch * self.positions * (n if self.indexed else m * n)


class ConvOuter:
    """The terms of one hooked Conv2d's calls (weight, weight + bias): explicit gradients by convolution."""

    def __init__(self, calls: tuple[ConvCall, ...], bias: bool):
        self.calls, self.bias = calls, bias
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None

    indexed = False

    @property
    def batch(self) -> int:
        return int(self.calls[0].x.shape[0])

    @property
    def positions(self) -> int:
        return sum(int(c.d.shape[2] * c.d.shape[3]) for c in self.calls)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(u = output gradients [B, T, m], v = unfolded patches [B, T, n]) over all calls (im2col)."""
        if self._factors is None:
            us = [c.deltas() for c in self.calls]
            vs = [c.unfolded(self.bias) for c in self.calls]
            self._factors = (torch.cat(us, 1) if len(us) > 1 else us[0], torch.cat(vs, 1) if len(vs) > 1 else vs[0])
        return self._factors

    def full(self, m: int, n: int) -> torch.Tensor:
        total = None
        for call in self.calls:
            g = call.weight_gradients(self.bias)
            total = g if total is None else total + g
        return total

    def batch_sum(self, m: int, n: int) -> torch.Tensor:
        total = None
        for call in self.calls:
            g = call.summed_weight_gradient(self.bias)
            total = g if total is None else total + g
        return total

    def select(self, rows) -> "ConvOuter":
        return ConvOuter(tuple(c.select(rows) for c in self.calls), self.bias)

    def full_cost(self, m: int, n: int) -> float:
        return self.batch * self.positions * m * n


class Dense:
    """An explicit per-example gradient g [B, m, n]."""

    indexed = False

    def __init__(self, g: torch.Tensor):
        self.g = g

    @property
    def batch(self) -> int:
        return int(self.g.shape[0])

    positions = 1

    def full(self, m: int, n: int) -> torch.Tensor:
        return self.g

    def batch_sum(self, m: int, n: int) -> torch.Tensor:
        return self.g.sum(dim=0)

    def select(self, rows) -> "Dense":
        return Dense(self.g[rows])

    def full_cost(self, m: int, n: int) -> float:
        return 0.0


Term = Outer | ConvOuter | Dense


def _gram(x: torch.Tensor, y: torch.Tensor, cross: bool) -> torch.Tensor:
    """Inner products of the rows of two factors: [B, T, S] (same examples) or [Ba, Bb, T, S] (cross).

    Each factor is float [B, T, d] or int64 ids [B, T] meaning one-hot rows (-1 = the zero row)."""
    xi, yi = not x.is_floating_point(), not y.is_floating_point()
    if not xi and not yi:
        return torch.einsum("atd,bsd->abts", x, y) if cross else torch.bmm(x, y.transpose(1, 2))
    if xi and yi:
        valid_x, valid_y = x >= 0, y >= 0
        if cross:
            same = (x[:, None, :, None] == y[None, :, None, :]) & valid_x[:, None, :, None] & valid_y[None, :, None, :]
        else:
            same = (x.unsqueeze(2) == y.unsqueeze(1)) & valid_x.unsqueeze(2) & valid_y.unsqueeze(1)
        return same
    if yi:  # make x the indexed one
        g = _gram(y, x, cross)
        return g.permute(1, 0, 3, 2) if cross else g.transpose(1, 2)
    valid = (x >= 0)
    idx = x.clamp(min=0)
    if cross:  # y [Bb, S, d]; x ids [Ba, T] -> [Ba, Bb, T, S] = y[b, s, x[a, t]]
        picked = y[:, :, idx]  # [Bb, S, Ba, T]
        return picked.permute(2, 0, 3, 1) * valid[:, None, :, None]
    B, T = x.shape
    S = y.shape[1]
    picked = torch.gather(y.transpose(1, 2), 1, idx.unsqueeze(-1).expand(B, T, S))  # [B, T, S]
    return picked * valid.unsqueeze(-1)


def _f64(factors: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(f.to(torch.float64) if f.is_floating_point() else f for f in factors)


#: cost of one entry of an explicit per-example gradient taken only for its norm (allocate, scatter, square), in
#: units of one multiply-add of the factored Gram identity. Measured single-threaded (batch 64): an embedding
#: table of 2,000 x 256 rows at 64 tokens, explicit 0.26 s vs factored 0.009 s; 30,522 x 256: 4.3 s vs 0.008 s;
#: 100 x 256: 0.004 s vs 0.006 s (the explicit route stays the cheaper one for small tables).
FULL_ENTRY_COST = 20

FLOAT32_NORM_MAX = 1 << 16  # per-example entries up to which a float32 sum of squares stays within ~1e-7


def _sq(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares over all but the batch axis [B] (float64). A sum of positive terms has no cancellation,
    so for rows of up to FLOAT32_NORM_MAX entries it is computed in the factor's dtype (relative error
    ~1e-7 in float32) and squared in float64, without a float64 copy of the whole gradient (this loop is
    memory-bound); longer rows are accumulated in float64 (a float32 sum of 590k terms measured 4e-6 off)."""
    flat = x.reshape(x.shape[0], -1)
    if flat.dtype == torch.float64 or flat.shape[1] > FLOAT32_NORM_MAX:
        return torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64).square()
    return torch.linalg.vector_norm(flat, dim=1).to(torch.float64).square()


def _factored_cost(x: Term, y: Term, m: int, n: int, pairs: int) -> float:
    u_cost = 1 if (x.indexed or y.indexed) else m
    return pairs * x.positions * y.positions * (u_cost + n)


class BlockGrad:
    """The per-example gradients of one block for a batch of B examples (a list of terms, summed)."""

    def __init__(self, block: TracedBlock, terms: Sequence[Term]):
        if not terms:
            raise ValueError(f"block {block.name!r}: no gradient terms")
        self.block, self.terms = block, list(terms)
        self._full: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.terms[0].batch

    def _sample(self) -> torch.Tensor:
        """A float tensor of the gradient (its dtype and device are the block's)."""
        t = self.terms[0]
        if isinstance(t, Dense):
            return t.g
        if isinstance(t, ConvOuter):
            return t.calls[0].d
        return t.v

    @property
    def dtype(self) -> torch.dtype:
        return self._sample().dtype

    @property
    def device(self) -> torch.device:
        return self._sample().device

    def full(self) -> torch.Tensor:
        """The explicit per-example gradient [B, m, n] (computed once, then kept)."""
        if self._full is None:
            m, n = self.block.m, self.block.n
            total = None
            for term in self.terms:
                g = term.full(m, n)
                total = g if total is None else total + g
            self._full = total
        return self._full

    def batch_sum(self) -> torch.Tensor:
        """sum_b G_b [m, n] (compare with the ordinary gradient of the summed loss)."""
        m, n = self.block.m, self.block.n
        total = None
        for term in self.terms:
            g = term.batch_sum(m, n)
            total = g if total is None else total + g
        return total

    def select(self, rows) -> "BlockGrad":
        return BlockGrad(self.block, [t.select(rows) for t in self.terms])

    def weighted(self, scale: float | torch.Tensor) -> "BlockGrad":
        """scale (.) G_b: the gradient weighted by the square root of the optimizer's step weights
        (`indexer.optimizer.step`). A float scales one factor of each term (the factored form is kept); a
        tensor [m, n] (a diagonal preconditioner) multiplies the explicit gradient."""
        if isinstance(scale, torch.Tensor):
            return BlockGrad(self.block, [Dense(self.full() * scale.to(self.dtype))])
        terms: list[Term] = []
        for t in self.terms:
            if isinstance(t, Outer):
                terms.append(Outer(t.u, t.v * scale) if t.indexed else Outer(t.u * scale, t.v))
            elif isinstance(t, ConvOuter):
                terms.append(ConvOuter(tuple(ConvCall(c.x, c.d * scale, c.kernel_size, c.stride, c.padding, c.dilation)
                                             for c in t.calls), t.bias))
            else:
                terms.append(Dense(t.g * scale))
        out = BlockGrad(self.block, terms)
        if self._full is not None:
            out._full = self._full * scale
        return out

    def _use_factors(self, other: "BlockGrad", pairs: int, cross: bool) -> bool:
        if self._full is not None and (other is self or other._full is not None):
            return False
        if not all(isinstance(t, (Outer, ConvOuter)) for t in self.terms + other.terms):
            return False
        m, n = self.block.m, self.block.n
        factored = sum(_factored_cost(x, y, m, n, pairs) for x in self.terms for y in other.terms)
        if any(isinstance(t, ConvOuter) for t in self.terms + other.terms):
            factored *= 4  # im2col of the patches first
        full = sum(t.full_cost(m, n) for t in self.terms)
        if cross:
            full += sum(t.full_cost(m, n) for t in other.terms) + pairs * m * n
        else:  # zero-filling, scattering into and reading back B x m x n entries: memory-bound, ~20x a Gram MAC
            full += FULL_ENTRY_COST * self.batch * m * n
        return factored < full

    def explicit_cheaper(self, dim: int) -> bool:
        """Whether the explicit gradient is the cheaper way to both sketch this block into `dim` numbers and
        take its exact norm (else: the FFT tensor sketch of the factors and the factored Gram identity).

        A fixed cost model (so that the same build always takes the same route and writes the same bytes),
        fitted to single-thread CPU timings of a batch of 64 (docs/benchmarks.md "Capture routes"), in ns
        per example with T positions, an m x n block and dim = k:
            explicit  m n (20 + 0.035 T)                       form G (a matmul or a weight-gradient
                                                               convolution), scatter and square its m n entries
            factored  T (c k log2(k) / 4608 + 6 (m + n))       count sketches and FFTs of the factors
                      + 0.1 T^2 (m + n) + 10 T n [conv]        the float64 Gram identity (after im2col)
        with c = 8000 for Conv2d (im2col first) and 3000 for other factors. E.g. a 512x4608 convolution at
        4x4: explicit 1.8 s vs factored 0.06 s per batch of 64; 64x576 at 32x32: 0.12 s vs 3.7 s."""
        if self._full is not None:
            return True
        if not all(isinstance(t, (Outer, ConvOuter)) for t in self.terms):
            return True
        if any(t.indexed for t in self.terms):  # embedding rows: scattered into the sketch either way; the norm
            return not self._use_factors(self, self.batch, cross=False)  # by the ids' Gram unless a small table
        m, n = self.block.m, self.block.n
        T = sum(t.positions for t in self.terms)
        conv = any(isinstance(t, ConvOuter) for t in self.terms)
        fft = (8000 if conv else 3000) * dim * max(1.0, math.log2(dim)) / 4608
        factored = T * (fft + 6 * (m + n)) + 0.1 * T * T * (m + n) + (10 * T * n if conv else 0)
        explicit = m * n * (20 + 0.035 * T)
        return explicit <= factored

    def squared_norm(self, dim: int = 512) -> torch.Tensor:
        """Exact ||G_b||_F^2 [B], never approximated (factored Gram identity or the explicit gradient,
        whichever costs less when the block is also sketched into `dim` numbers: `explicit_cheaper`)."""
        if len(self.terms) == 1 and isinstance(self.terms[0], Outer) and self.terms[0].positions == 1 \
                and not self.terms[0].indexed:
            u, v = self.terms[0].factors()
            return _sq(u) * _sq(v)
        if all(isinstance(t, (Outer, ConvOuter)) and not t.indexed for t in self.terms):
            use_factors = self._full is None and not self.explicit_cheaper(dim)
        else:
            use_factors = self._use_factors(self, self.batch, cross=False)
        if use_factors:
            total = None
            for i, x in enumerate(self.terms):
                for j, y in enumerate(self.terms[i:], start=i):
                    (ux, vx), (uy, vy) = _f64(x.factors()), _f64(y.factors())
                    value = (_gram(ux, uy, False) * _gram(vx, vy, False)).sum(dim=(1, 2))
                    value = value if i == j else 2 * value
                    total = value if total is None else total + value
            return total
        return _sq(self.full())

    def inner(self, other: "BlockGrad") -> torch.Tensor:
        """Exact <G_a, G_b>_F for every pair: [Ba, Bb] (self = a, other = b, same block), float64."""
        self_dense = all(isinstance(t, Dense) for t in self.terms)
        other_dense = all(isinstance(t, Dense) for t in other.terms)
        if self_dense and not other_dense and other._full is None:
            return _dense_inner(self.full(), other.terms, self.block)
        if other_dense and not self_dense and self._full is None:
            return _dense_inner(other.full(), self.terms, self.block).T
        if self._use_factors(other, self.batch * other.batch, cross=True):
            total = None
            for x in self.terms:
                for y in other.terms:
                    (ux, vx), (uy, vy) = _f64(x.factors()), _f64(y.factors())
                    value = (_gram(ux, uy, True) * _gram(vx, vy, True)).sum(dim=(2, 3))
                    total = value if total is None else total + value
            return total
        a = self.full().reshape(self.batch, -1).to(torch.float64)
        b = other.full().reshape(other.batch, -1).to(torch.float64)
        return a @ b.T

    @staticmethod
    def concat(parts: Sequence["BlockGrad"]) -> "BlockGrad":
        """Stack the examples of several BlockGrads of the same block (e.g. one example at a time)."""
        if len(parts) == 1:
            return parts[0]
        block = parts[0].block
        shapes = [[_term_shape(t) for t in p.terms] for p in parts]
        if all(s == shapes[0] for s in shapes):
            terms: list[Term] = []
            for i, term in enumerate(parts[0].terms):
                group = [p.terms[i] for p in parts]
                if isinstance(term, Outer):
                    terms.append(Outer(torch.cat([t.u for t in group]), torch.cat([t.v for t in group])))
                elif isinstance(term, ConvOuter):
                    calls = tuple(
                        ConvCall(torch.cat([t.calls[c].x for t in group]), torch.cat([t.calls[c].d for t in group]),
                                 call.kernel_size, call.stride, call.padding, call.dilation)
                        for c, call in enumerate(term.calls))
                    terms.append(ConvOuter(calls, term.bias))
                else:
                    terms.append(Dense(torch.cat([t.g for t in group])))
            return BlockGrad(block, terms)
        return BlockGrad(block, [Dense(torch.cat([p.full() for p in parts]))])


def _dense_inner(q: torch.Tensor, terms: Sequence[Term], block: TracedBlock) -> torch.Tensor:
    """<Q_a, G_b>_F [A, B] (float64) of explicit gradients q [A, m, n] with a batch given by its terms,
    without forming the batch's explicit gradients: Outer: sum_t u_t^T Q v_t; one-hot rows: sum_t
    Q[x_t] . v_t; Conv2d: a convolution with Q's rows as filters, dotted with the output gradients."""
    q = q.to(torch.float64)
    A, m, n = q.shape
    total = None
    for term in terms:
        if isinstance(term, Dense):
            part = q.reshape(A, -1) @ term.g.to(torch.float64).reshape(term.batch, -1).T
        elif isinstance(term, ConvOuter):
            part = None
            for call in term.calls:
                c_in = call.x.shape[1]
                kh, kw = call.kernel_size
                weight = q[:, :, : c_in * kh * kw].reshape(A * m, c_in, kh, kw)
                bias = q[:, :, -1].reshape(A * m) if term.bias else None
                out = F.conv2d(call.x.to(torch.float64), weight, bias, call.stride, call.padding, call.dilation)
                d = call.d.to(torch.float64)
                value = (out.reshape(d.shape[0], A, m, -1) * d.reshape(d.shape[0], 1, m, -1)).sum(dim=(2, 3)).T
                part = value if part is None else part + value
        elif term.indexed:
            ids, v = term.u, term.v.to(torch.float64)
            valid = (ids >= 0).to(torch.float64).unsqueeze(-1)
            part = torch.stack([(q[a][ids.clamp(min=0)] * valid * v).sum(dim=(1, 2)) for a in range(A)])
        else:
            u, v = term.u.to(torch.float64), term.v.to(torch.float64)
            part = torch.stack([((u @ q[a]) * v).sum(dim=(1, 2)) for a in range(A)])
        total = part if total is None else total + part
    return total


def _term_shape(term: Term) -> tuple:
    if isinstance(term, Outer):
        return ("outer", tuple(term.u.shape[1:]), tuple(term.v.shape[1:]))
    if isinstance(term, ConvOuter):
        return ("conv", term.bias, tuple((tuple(c.x.shape[1:]), tuple(c.d.shape[1:])) for c in term.calls))
    return ("dense", tuple(term.g.shape[1:]))
