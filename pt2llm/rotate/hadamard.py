"""Hadamard-based orthogonal matrices for any width, applied fast.

A width n = m * 2^k (m odd) gets the orthogonal matrix K = A ⊗ H_p / sqrt(p):
  - m == 1: A = [1], a pure Walsh-Hadamard matrix (Sylvester order), applied by the fast
    Walsh-Hadamard transform (FWHT);
  - otherwise A is the smallest Hadamard matrix of order h = m * 2^j (j <= k, h <= 256,
    so the dense part stays small) that a Paley construction gives for a prime q (Paley I:
    h = q + 1, q = 3 mod 4; Paley II: h = 2(q + 1), q = 1 mod 4), normalised by 1/sqrt(h),
    and p = n / h;
  - when no such h exists (e.g. m = 25 at n = 100, or Llama-2-7B's 11008 = 43 * 256) A is a
    random orthogonal m x m matrix, seeded by m, and p = 2^k.
x K for a row vector x: reshape x to [m', p], FWHT along p, then the small dense Aᵀ along m'
(Aᵀ X H_p). A random Hadamard matrix is diag(s) K with seeded random signs s.

Widths of the models at hand: SmolLM2-135M 576 = H36 (Paley II, q=17) ⊗ H16, 1536 = H12
(Paley I, q=11) ⊗ H128, head_dim 64 = H64; Qwen2.5-Coder-0.5B 896 = H28 (Paley II, q=13)
⊗ H32, 4864 = H76 (Paley II, q=37) ⊗ H64; the tiny test models 200 = H200 (Paley I, q=199),
328 = H164 (Paley I, q=163) ⊗ H2, head_dim 50 = random 25 ⊗ H2.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..kernels import lasting


def is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) with chi the quadratic character mod the prime q (chi(0) = 0)."""
    squares = {x * x % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def paley1(q: int) -> torch.Tensor:
    """Hadamard matrix of order q + 1 (entries ±1) for a prime q = 3 mod 4: I + S with S the
    skew conference matrix [[0, 1ᵀ], [-1, Q]]."""
    if not (is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q = 3 mod 4, got {q}")
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def paley2(q: int) -> torch.Tensor:
    """Hadamard matrix of order 2(q + 1) for a prime q = 1 mod 4: in the symmetric conference
    matrix C = [[0, 1ᵀ], [1, Q]], every ±1 becomes ±[[1, 1], [1, -1]] and every 0 (the
    diagonal) becomes [[1, -1], [-1, -1]]."""
    if not (is_prime(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime q = 1 mod 4, got {q}")
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron(torch.eye(n, dtype=torch.float64), zero)


def sylvester(p: int) -> torch.Tensor:
    """The Walsh-Hadamard matrix of order p = 2^k (entries ±1), H_2p = [[H, H], [H, -H]]."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {p}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def paley(h: int) -> tuple[str, int] | None:
    """How a Paley construction (with a prime q) gives a Hadamard matrix of order h, or None."""
    if h % 4 == 0 and is_prime(h - 1) and (h - 1) % 4 == 3:
        return "paley1", h - 1
    if h % 4 == 0 and is_prime(h // 2 - 1) and (h // 2 - 1) % 4 == 1:
        return "paley2", h // 2 - 1
    return None


def random_orthogonal(m: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal m x m (QR of a seeded Gaussian, signs fixed by diag(R) > 0)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()


MAX_FACTOR = 256  # largest dense Hadamard factor: its cost is h multiply-adds per element


def plan(n: int) -> tuple[str, int]:
    """(kind of the small factor, its order h) for width n: kind is "sylvester" (h = 1, the
    whole width is a power of two), "paley1"/"paley2", or "random" (a random orthogonal
    factor of the odd part); the power-of-two part is n // h."""
    if n < 1:
        raise ValueError(f"width must be positive, got {n}")
    m, k = n, 0
    while m % 2 == 0:
        m, k = m // 2, k + 1
    if m == 1:
        return "sylvester", 1
    for j in range(k + 1):
        if m << j > MAX_FACTOR:
            break
        found = paley(m << j)
        if found is not None:
            return found[0], m << j
    return "random", m


@lru_cache(maxsize=None)
def _factor64(n: int) -> torch.Tensor:
    kind, h = plan(n)
    if kind == "sylvester":
        return torch.ones(1, 1, dtype=torch.float64)
    if kind == "random":
        return random_orthogonal(h, seed=h)
    return (paley1 if kind == "paley1" else paley2)(paley(h)[1]) / math.sqrt(h)


def factor(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The orthonormal small factor A of width n's K = A ⊗ H_p / sqrt(p)."""
    return _factor_on(n, torch.device(device or "cpu"), dtype)


@lru_cache(maxsize=None)
def _factor_on(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return lasting.make(lambda: _factor64(n).to(device=device, dtype=dtype), device)


RADIX = 32  # butterflies of 32 points (five radix-2 stages) at a time, each as a small GEMM


@lru_cache(maxsize=None)
def _sylvester_on(q: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return lasting.make(lambda: sylvester(q).to(device=device, dtype=dtype), device)


def _wht(x: torch.Tensor) -> torch.Tensor:
    """x H_p (unnormalised) along the last dimension: with p = r * q and x as [r, q],
    x H_p = H_r X H_q (H_p = H_r ⊗ H_q): H_q as one small GEMM, H_r recursively."""
    p = x.shape[-1]
    q = min(p, RADIX)
    y = torch.matmul(x.reshape(*x.shape[:-1], p // q, q), _sylvester_on(q, x.device, x.dtype))
    if p > q:
        y = _wht(y.transpose(-1, -2)).transpose(-1, -2)
    return y.reshape(x.shape)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x H_p / sqrt(p) along the last dimension (p a power of two): the orthonormal
    Walsh-Hadamard transform in Sylvester order, O(p log p) work per row: log2(p) radix-2
    stages, grouped five at a time into 32-point butterflies done as small GEMMs."""
    p = x.shape[-1]
    if p < 1 or p & (p - 1):
        raise ValueError(f"the FWHT needs a power-of-two length, got {p}")
    return _wht(x) / math.sqrt(p)


def kron_transform(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x (A ⊗ H_p / sqrt(p)) along the last dimension, n = h * p with A [h, h]: as [h, p],
    the FWHT along p, then Aᵀ along h."""
    h = a.shape[0]
    n = x.shape[-1]
    if n % h:
        raise ValueError(f"width {n} is not a multiple of the factor's order {h}")
    y = fwht(x.reshape(*x.shape[:-1], h, n // h))
    if h > 1:  # Aᵀ Y as (Yᵀ A)ᵀ: one GEMM over all rows, not a batch of small ones
        y = torch.matmul(y.transpose(-1, -2), a.to(y.dtype)).transpose(-1, -2)
    return y.reshape(x.shape)


def transform(x: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """x diag(signs) K_n along the last dimension (n = x.shape[-1]): the (random, when signs
    are given) Hadamard-based orthogonal matrix of width n applied to row vectors."""
    n = x.shape[-1]
    if signs is not None:
        x = x * signs.to(device=x.device, dtype=x.dtype)
    return kron_transform(x, factor(n, x.device, x.dtype))


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    """n random signs ±1 (int8) from a CPU generator."""
    return (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(torch.int8)


def matrix(n: int, signs: torch.Tensor | None = None, dtype=torch.float64) -> torch.Tensor:
    """The dense n x n matrix diag(signs) K_n (for tests and small checks, not inference)."""
    return transform(torch.eye(n, dtype=dtype), signs)
