"""Seeded random projections of per-example layer gradients G = sum_t delta_t a_t^T  ([m, n]).

Every kind is unbiased for inner products:  E[<P G, P G'>] = <G, G'>_F.

  exact      P = I (the oracle; dim m*n)
  gaussian   dense JL on vec(G): P [k, m n] with N(0, 1/k) entries. Cost O(k m n) per example.
  kronecker  (P_o delta)(P_i a)^T with P_o [k_o, m], P_i [k_i, n] ~ N(0, 1/k_side) (LoGra style).
             A side that is already small is not projected. Cheapest, but noisier at equal dim.
  sketch     tensor sketch: a count sketch of vec(G) with bucket (h_o(i) + h_i(j)) mod k and sign
             s_o(i) s_i(j). Computed either as the circular convolution of the count sketches of
             delta_t and a_t (FFT, O(T (m + n + k log k))) or from the explicit G (O(T m n)),
             whichever is cheaper (for conv layers the explicit G needs no im2col, see _sketch);
             both give the same vector.

A layer whose gradient has at most `dim` entries is kept exact. Matrices and hashes are drawn on the CPU
from a torch.Generator seeded by (seed, checkpoint, layer, side), so any machine rebuilds them
bit-identically; `fingerprint()` hashes every drawn array for the manifest.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from indexer.capture import LayerGrad, TracedLayer


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


@dataclass
class LayerProjector:
    """The projection of one layer at one checkpoint. `arrays` are float64/int64 on the CPU."""

    layer: TracedLayer
    kind: str
    dim: int
    arrays: dict[str, torch.Tensor]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "LayerProjector":
        moved = {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in self.arrays.items()
        }
        return LayerProjector(self.layer, self.kind, self.dim, moved)

    def project(self, grad: LayerGrad) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected [B, dim], exact squared norm [B]) for one layer's batch of gradients."""
        fn = getattr(self, f"_{self.kind}")
        return fn(grad)

    # -- kinds ---------------------------------------------------------------------------------
    def _exact(self, grad: LayerGrad):
        full = grad.full()
        return full.reshape(grad.batch, -1), grad.squared_norm(full)

    def _gaussian(self, grad: LayerGrad):
        full = grad.full()
        return full.reshape(grad.batch, -1) @ self.arrays["P"].T, grad.squared_norm(full)

    def _kronecker(self, grad: LayerGrad):
        d = grad.delta if "P_out" not in self.arrays else grad.delta @ self.arrays["P_out"].T
        if grad.index is not None:
            P_in = self.arrays.get("P_in")
            cols = P_in.T if P_in is not None else torch.eye(self.layer.n, dtype=d.dtype, device=d.device)
            idx = grad.index.clamp(min=0)
            a = cols[idx] * (grad.index >= 0).unsqueeze(-1).to(d.dtype)
        else:
            a = grad.a if "P_in" not in self.arrays else grad.projected_inputs(self.arrays["P_in"])
        out = torch.einsum("bto,bti->boi", d, a).reshape(grad.batch, -1)
        return out, grad.squared_norm()

    def _sketch(self, grad: LayerGrad):
        k = self.dim
        h_o, s_o, h_i, s_i = (self.arrays[x] for x in ("h_out", "s_out", "h_in", "s_in"))
        B, T, m = grad.delta.shape
        n = self.layer.n
        if grad.index is not None:  # one-hot rows: scatter T*m values straight into the buckets
            idx = grad.index.clamp(min=0)
            valid = (grad.index >= 0).to(grad.delta.dtype).unsqueeze(-1)
            buckets = (h_o.view(1, 1, m) + h_i[idx].unsqueeze(-1)) % k
            values = grad.delta * s_o.view(1, 1, m) * (s_i[idx].unsqueeze(-1) * valid)
            out = torch.zeros(B, k, dtype=grad.delta.dtype, device=grad.delta.device)
            return out.scatter_add_(1, buckets.reshape(B, -1), values.reshape(B, -1)), grad.squared_norm()
        fft_cost = T * (m + n + 3 * k * max(1, math.log2(k)))
        if grad.conv is not None:
            # For a conv layer the explicit G is one batched weight-gradient convolution, while the FFT route
            # first unfolds the patches (im2col) and scatters [B, T, n] into [B, T, k]: memory-bound steps that
            # measured ~10-20x slower per element than the convolution (Fashion-MNIST conv2, k=64: 280 ms vs
            # 30 ms per batch of 256). Choose FFT only where the explicit G is far larger.
            fft_cost *= FFT_CONV_PENALTY
        if fft_cost < T * m * n:
            cs_d = _count_sketch(grad.delta, h_o, s_o, k)
            cs_a = _count_sketch(grad.a, h_i, s_i, k)
            spectrum = (torch.fft.rfft(cs_d, n=k) * torch.fft.rfft(cs_a, n=k)).sum(dim=1)
            return torch.fft.irfft(spectrum, n=k), grad.squared_norm()
        full = grad.full()
        buckets = ((h_o.view(m, 1) + h_i.view(1, n)) % k).reshape(-1)
        signs = (s_o.view(m, 1) * s_i.view(1, n)).reshape(1, -1)
        out = torch.zeros(B, k, dtype=full.dtype, device=full.device)
        out.index_add_(1, buckets, full.reshape(B, -1) * signs)
        return out, grad.squared_norm(full)


FFT_CONV_PENALTY = 16


def _count_sketch(x: torch.Tensor, bucket: torch.Tensor, sign: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T, size] -> [B, T, k]: out[..., bucket[j]] += sign[j] x[..., j]."""
    out = torch.zeros(*x.shape[:-1], k, dtype=x.dtype, device=x.device)
    return out.index_add_(x.dim() - 1, bucket, x * sign)


def make_projector(layer: TracedLayer, kind: str, dim: int, seed: int, checkpoint: int) -> LayerProjector:
    """Draw the projection of `layer` at checkpoint index `checkpoint` (deterministic)."""
    if kind == "exact" or layer.size <= dim:
        return LayerProjector(layer, "exact", layer.size, {})
    m, n = layer.m, layer.n
    if kind == "gaussian":
        return LayerProjector(layer, kind, dim, {"P": _gaussian(dim, m * n, _generator(seed, checkpoint, layer.name, "P"))})
    if kind == "kronecker":
        k_out, k_in = _kronecker_split(m, n, dim)
        arrays = {}
        if k_out < m:
            arrays["P_out"] = _gaussian(k_out, m, _generator(seed, checkpoint, layer.name, "out"))
        if k_in < n:
            arrays["P_in"] = _gaussian(k_in, n, _generator(seed, checkpoint, layer.name, "in"))
        return LayerProjector(layer, kind, k_out * k_in, arrays)
    if kind == "sketch":
        h_out, s_out = _hash(m, dim, _generator(seed, checkpoint, layer.name, "out"))
        h_in, s_in = _hash(n, dim, _generator(seed, checkpoint, layer.name, "in"))
        return LayerProjector(layer, kind, dim, {"h_out": h_out, "s_out": s_out, "h_in": h_in, "s_in": s_in})
    raise ValueError(f"unknown projection kind {kind!r}")


def _kronecker_split(m: int, n: int, dim: int) -> tuple[int, int]:
    """Output/input sizes with k_out * k_in <= dim; a side smaller than its share stays unprojected."""
    root = max(1, math.isqrt(dim))
    if m <= root:
        return m, min(n, max(1, dim // m))
    if n <= root:
        return min(m, max(1, dim // n)), n
    return root, max(1, dim // root)


def fingerprint(projectors: list[list[LayerProjector]], kind: str, seed: int, dim: int) -> str:
    """sha256 of the projection settings and of every drawn array, in order."""
    digest = hashlib.sha256(f"{kind}:{seed}:{dim}".encode())
    for c, per_layer in enumerate(projectors):
        for p in per_layer:
            digest.update(f"|{c}:{p.layer.name}:{p.kind}:{p.dim}:{p.layer.m}x{p.layer.n}".encode())
            for name in sorted(p.arrays):
                array = p.arrays[name].contiguous()
                digest.update(name.encode())
                digest.update(array.numpy().tobytes())
    return digest.hexdigest()
