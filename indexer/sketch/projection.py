"""Seeded random projections of per-example block gradients G ([m, n], see `indexer.capture.grads`).

One embedding size per example, whatever the number of layers and checkpoints: every (checkpoint,
block) gradient is projected independently into the SAME `dim`-dimensional space and the projections
are added, e(z) = sum_{i,l} sqrt(lr_i) P_{i,l} G_{i,l}(z). Each P is zero-mean with E[P^T P] = I and the
P's are independent, so e(z) . e(z') is an unbiased estimate of the concatenated inner product, i.e. of
TracInCP, with the variance of one dense JL map of the whole sqrt(lr)-weighted gradient to `dim` numbers.

  exact      no projection: every (checkpoint, block) gradient keeps its own coordinates (the oracle;
             the embedding is their concatenation, dim = sum of block sizes x checkpoints)
  sketch     tensor sketch of vec(G): bucket (h_o(i) + h_i(j)) mod dim, sign s_o(i) s_i(j); computed as
             the circular convolution of the count sketches of u_t and v_t (FFT), as a scatter of the
             explicit G, or (one-hot rows) as a direct scatter, whichever costs less: all give the same vector
  gaussian   dense JL of vec(G): P [dim, m n] with N(0, 1/dim) entries (small blocks only)
  kronecker  (P_o u)(P_i v)^T with P_o [k_o, m], P_i [k_i, n] ~ N(0, 1/k) (LoGra style; a side that is
             already small is not projected), placed into `dim` coordinates with random signs

A block with at most `dim` entries is not compressed: its entries are placed at distinct random
coordinates with random signs (exact within the block, zero-mean across blocks). Arrays are drawn on the
CPU from a torch.Generator seeded by (seed, checkpoint, block, side), so any machine rebuilds them
bit-identically; `fingerprint()` hashes every drawn array for the manifest.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from indexer.capture.blocks import TracedBlock
from indexer.capture.grads import BlockGrad, ConvOuter, Dense, Outer, _sq

KINDS = ("exact", "sketch", "kronecker", "gaussian")
#: at most this many explicit per-example gradient entries are formed at once (64 MiB of float32)
EXAMPLE_CHUNK = 1 << 24


def _generator(seed: int, checkpoint: int, layer: str, side: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{checkpoint}:{layer}:{side}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def _gaussian(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(rows, cols, generator=g, dtype=torch.float64) / math.sqrt(rows)


def _hash(size: int, buckets: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    bucket = torch.randint(0, buckets, (size,), generator=g, dtype=torch.int64)
    sign = torch.randint(0, 2, (size,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
    return bucket, sign


def _placement(size: int, dim: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    position = torch.randperm(dim, generator=g)[:size]
    sign = torch.randint(0, 2, (size,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
    return position, sign


@dataclass
class BlockProjector:
    """The projection of one block at one checkpoint. `arrays` are float64/int64 on the CPU until `to`.

    kind: "exact" (output = vec(G), width m n), "place" (signed placement of vec(G) into `dim`),
    "sketch", "gaussian", "kronecker" (output width `dim`)."""

    block: TracedBlock
    kind: str
    dim: int
    arrays: dict[str, torch.Tensor]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "BlockProjector":
        moved = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                 for k, v in self.arrays.items()}
        return BlockProjector(self.block, self.kind, self.dim, moved)

    def project(self, grad: BlockGrad, out: torch.Tensor | None = None) -> torch.Tensor:
        """[B, dim] for one block's batch of gradients (linear in G: a sum over its terms). With `out`
        ([B, dim], projected kinds), the projection is added into it (one buffer for all blocks)."""
        if out is None:
            if self.kind == "exact":
                return self._exact(grad)
            out = torch.zeros(grad.batch, self.dim, dtype=grad.dtype, device=grad.device)
        getattr(self, f"_{self.kind}")(grad, out)
        return out

    def embed(self, grad: BlockGrad, out: torch.Tensor | None, scale: torch.Tensor | None = None
              ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Project scale (.) G into `out` [B, dim] (projected kinds: added into it) or return it ([B, m n],
        exact kind), and return the exact squared norms ||scale (.) G||^2 [B] float64 alongside.

        `scale` [m, n] is the square root of a tensor step weight (indexer.optimizer.step), or None (a float
        weight is already in the factors: `BlockGrad.weighted`). Where the explicit gradient is needed (a
        tensor scale, the exact / place / gaussian kinds, dense terms, or cheaper: `explicit_cheaper`) it is
        formed EXAMPLE_CHUNK entries at a time, so memory does not grow with the layer's width; otherwise
        the factored routes (FFT tensor sketch, Kronecker) and the Gram identity never form it."""
        B = grad.batch
        factored = scale is None and self.kind in ("sketch", "kronecker") and not grad.explicit_cheaper(self.dim)
        if factored:
            self.project(grad, out)
            return None, grad.squared_norm(self.dim)
        size = self.block.m * self.block.n
        step = max(1, EXAMPLE_CHUNK // max(size, 1))
        parts, norms = [], []
        for start in range(0, B, step):
            rows = slice(start, min(B, start + step))
            part = grad if (start == 0 and step >= B) else grad.select(rows)
            full = part.full()
            if scale is not None:
                full = full * scale
            chunk = BlockGrad(grad.block, [Dense(full)])
            norms.append(_sq_f64(full))
            if self.kind == "exact":
                parts.append(full.reshape(full.shape[0], -1))
            else:
                getattr(self, f"_{self.kind}")(chunk, out[rows])
        sq = torch.cat(norms) if len(norms) > 1 else norms[0]
        return (torch.cat(parts) if len(parts) > 1 else parts[0]) if parts else None, sq

    # -- kinds ---------------------------------------------------------------------------------
    def _exact(self, grad: BlockGrad) -> torch.Tensor:
        return grad.full().reshape(grad.batch, -1)

    def _place(self, grad: BlockGrad, out: torch.Tensor) -> None:
        flat = grad.full().reshape(grad.batch, -1)
        out.index_add_(1, self.arrays["position"], flat * self.arrays["sign"])

    def _gaussian(self, grad: BlockGrad, out: torch.Tensor) -> None:
        out.addmm_(grad.full().reshape(grad.batch, -1), self.arrays["P"].T)

    def _kronecker(self, grad: BlockGrad, out: torch.Tensor) -> None:
        m = self.block.m
        P_out, P_in = self.arrays.get("P_out"), self.arrays.get("P_in")
        total = None
        for term in grad.terms:
            if isinstance(term, Dense):
                g = term.g
                g = g if P_out is None else P_out @ g
                g = g if P_in is None else g @ P_in.T
                part = g.reshape(g.shape[0], -1)
            else:
                if isinstance(term, ConvOuter):
                    u = torch.cat([c.deltas() for c in term.calls], dim=1) if len(term.calls) > 1 \
                        else term.calls[0].deltas()
                    if P_in is None:
                        v = term.factors()[1]
                    else:
                        parts = [c.projected_patches(P_in, term.bias) for c in term.calls]
                        v = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
                else:
                    u, v = term.u, term.v
                    v = v if P_in is None else v @ P_in.T
                if not u.is_floating_point():  # one-hot rows: columns of P_out (or of I)
                    cols = P_out.T if P_out is not None else torch.eye(m, dtype=v.dtype, device=v.device)
                    u_proj = cols[u.clamp(min=0)] * (u >= 0).unsqueeze(-1).to(v.dtype)
                else:
                    u_proj = u if P_out is None else u @ P_out.T
                part = torch.einsum("bto,bti->boi", u_proj, v).reshape(v.shape[0], -1)
            total = part if total is None else total + part
        out.index_add_(1, self.arrays["position"], total * self.arrays["sign"])

    def _sketch(self, grad: BlockGrad, out: torch.Tensor) -> None:
        k = self.dim
        h_o, s_o, h_i, s_i = (self.arrays[x] for x in ("h_out", "s_out", "h_in", "s_in"))
        m, n = self.block.m, self.block.n
        B = grad.batch
        for term in grad.terms:
            if isinstance(term, Outer) and term.indexed:  # one-hot rows: scatter T*n values into the buckets
                ids, v = term.u, term.v
                idx = ids.clamp(min=0)
                valid = (ids >= 0).to(v.dtype).unsqueeze(-1)
                buckets = (h_o[idx].unsqueeze(-1) + h_i.view(1, 1, n)) % k
                values = v * s_i.view(1, 1, n) * (s_o[idx].unsqueeze(-1) * valid)
                out.scatter_add_(1, buckets.reshape(B, -1), values.reshape(B, -1))
            elif isinstance(term, Dense) or grad.explicit_cheaper(k):
                full = grad.full() if len(grad.terms) == 1 else term.full(m, n)  # the block's cached G when it is one
                out.index_add_(1, self._buckets(), full.reshape(B, -1) * self._signs())
            else:
                u, v = term.factors()
                cs_u = _count_sketch(u, h_o, s_o, k)
                cs_v = _count_sketch(v, h_i, s_i, k)
                spectrum = (torch.fft.rfft(cs_u, n=k) * torch.fft.rfft(cs_v, n=k)).sum(dim=1)
                out += torch.fft.irfft(spectrum, n=k)

    def _buckets(self) -> torch.Tensor:
        """Bucket of every entry of vec(G) (the explicit route), computed once."""
        if "cached_buckets" not in self.__dict__:
            m, n = self.block.m, self.block.n
            self.__dict__["cached_buckets"] = ((self.arrays["h_out"].view(m, 1) + self.arrays["h_in"].view(1, n))
                                               % self.dim).reshape(-1)
        return self.__dict__["cached_buckets"]

    def _signs(self) -> torch.Tensor:
        if "cached_signs" not in self.__dict__:
            m, n = self.block.m, self.block.n
            self.__dict__["cached_signs"] = (self.arrays["s_out"].view(m, 1)
                                             * self.arrays["s_in"].view(1, n)).reshape(1, -1)
        return self.__dict__["cached_signs"]


def _sq_f64(full: torch.Tensor) -> torch.Tensor:
    return _sq(full).to(torch.float64)


def _count_sketch(x: torch.Tensor, bucket: torch.Tensor, sign: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T, size] -> [B, T, k]: out[..., bucket[j]] += sign[j] x[..., j]."""
    out = torch.zeros(*x.shape[:-1], k, dtype=x.dtype, device=x.device)
    return out.index_add_(x.dim() - 1, bucket, x * sign)


def make_projector(block: TracedBlock, kind: str, dim: int, seed: int, checkpoint: int) -> BlockProjector:
    """Draw the projection of `block` at checkpoint index `checkpoint` into `dim` numbers (deterministic)."""
    if kind == "exact":
        return BlockProjector(block, "exact", block.size, {})
    if kind not in KINDS:
        raise ValueError(f"unknown projection kind {kind!r}")
    m, n = block.m, block.n
    if block.size <= dim:
        position, sign = _placement(block.size, dim, _generator(seed, checkpoint, block.name, "place"))
        return BlockProjector(block, "place", dim, {"position": position, "sign": sign})
    if kind == "gaussian":
        return BlockProjector(block, kind, dim, {"P": _gaussian(dim, m * n, _generator(seed, checkpoint, block.name, "P"))})
    if kind == "kronecker":
        k_out, k_in = _kronecker_split(m, n, dim)
        arrays = {}
        if k_out < m:
            arrays["P_out"] = _gaussian(k_out, m, _generator(seed, checkpoint, block.name, "out"))
        if k_in < n:
            arrays["P_in"] = _gaussian(k_in, n, _generator(seed, checkpoint, block.name, "in"))
        position, sign = _placement(k_out * k_in, dim, _generator(seed, checkpoint, block.name, "place"))
        arrays.update(position=position, sign=sign)
        return BlockProjector(block, kind, dim, arrays)
    h_out, s_out = _hash(m, dim, _generator(seed, checkpoint, block.name, "out"))
    h_in, s_in = _hash(n, dim, _generator(seed, checkpoint, block.name, "in"))
    return BlockProjector(block, kind, dim, {"h_out": h_out, "s_out": s_out, "h_in": h_in, "s_in": s_in})


def _kronecker_split(m: int, n: int, dim: int) -> tuple[int, int]:
    """Output/input sizes with k_out * k_in <= dim; a side smaller than its share stays unprojected."""
    root = max(1, math.isqrt(dim))
    if m <= root:
        return m, min(n, max(1, dim // m))
    if n <= root:
        return min(m, max(1, dim // n)), n
    return root, max(1, dim // root)


def fingerprint(projectors: list[list[BlockProjector]], kind: str, seed: int, dim: int) -> str:
    """sha256 of the projection settings and of every drawn array, in order."""
    digest = hashlib.sha256(f"{kind}:{seed}:{dim}".encode())
    for c, per_block in enumerate(projectors):
        for p in per_block:
            digest.update(f"|{c}:{p.block.name}:{p.kind}:{p.dim}:{p.block.m}x{p.block.n}".encode())
            for name in sorted(p.arrays):
                array = p.arrays[name].contiguous()
                digest.update(name.encode())
                digest.update(array.numpy().tobytes())
    return digest.hexdigest()
