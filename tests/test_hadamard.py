"""Hadamard-based orthogonal matrices: constructions, the factor chosen for every width of
the models at hand, orthogonality, and the fast transform against the dense matrix."""
import math

import pytest
import torch

from pt2llm.rotate import hadamard, online

# width -> (kind of small factor, its order): SmolLM2-135M hidden, MLP, head_dim;
# Qwen2.5-Coder-0.5B hidden, MLP; the tiny test models' hidden, MLP, head_dim;
# widths with no Paley order that fits (random orthogonal factor of the odd part)
WIDTHS = {576: ("paley2", 36), 1536: ("paley1", 12), 64: ("sylvester", 1),
          896: ("paley2", 28), 4864: ("paley2", 76),
          200: ("paley1", 200), 328: ("paley1", 164), 50: ("random", 25),
          100: ("random", 25), 11008: ("random", 43), 1: ("sylvester", 1), 4096: ("sylvester", 1)}


def _is_hadamard(h: torch.Tensor) -> bool:
    n = h.shape[0]
    return bool((h.abs() == 1).all()) and torch.equal(h @ h.t(), n * torch.eye(n, dtype=h.dtype))


@pytest.mark.parametrize("q", [3, 7, 11, 19, 23, 31, 43, 47, 59, 67, 71, 163, 199])
def test_paley1_gives_a_hadamard_matrix(q):
    h = hadamard.paley1(q)
    assert h.shape == (q + 1, q + 1) and _is_hadamard(h)


@pytest.mark.parametrize("q", [5, 13, 17, 29, 37, 41, 53, 61, 73])
def test_paley2_gives_a_hadamard_matrix(q):
    h = hadamard.paley2(q)
    assert h.shape == (2 * (q + 1), 2 * (q + 1)) and _is_hadamard(h)


def test_paley_rejects_the_wrong_primes():
    for bad in (5, 9, 15, 2):
        with pytest.raises(ValueError):
            hadamard.paley1(bad)
    for bad in (3, 7, 25, 2):
        with pytest.raises(ValueError):
            hadamard.paley2(bad)


@pytest.mark.parametrize("p", [1, 2, 4, 8, 32, 64, 128, 1024])
def test_fwht_is_the_normalised_sylvester_matrix(p):
    s = hadamard.sylvester(p)
    assert _is_hadamard(s)
    torch.testing.assert_close(hadamard.fwht(torch.eye(p, dtype=torch.float64)), s / math.sqrt(p),
                               rtol=0, atol=1e-14)


def test_fwht_refuses_other_lengths():
    with pytest.raises(ValueError):
        hadamard.fwht(torch.zeros(3, 12))


@pytest.mark.parametrize("n", sorted(WIDTHS))
def test_factor_chosen_for_each_width(n):
    assert hadamard.plan(n) == WIDTHS[n]
    kind, h = WIDTHS[n]
    a = hadamard.factor(n, dtype=torch.float64)
    assert a.shape == (h, h) if kind != "sylvester" else a.shape == (1, 1)
    if kind.startswith("paley"):
        assert _is_hadamard(torch.round(a * math.sqrt(h)))


@pytest.mark.parametrize("n", [n for n in sorted(WIDTHS) if n <= 4864])
def test_fast_transform_equals_the_dense_orthogonal_matrix(n):
    """transform(x, s) = x diag(s) (A ⊗ H_p / sqrt(p)), the matrix built here by torch.kron."""
    kind, h = WIDTHS[n]
    gen = torch.Generator().manual_seed(n)
    signs = hadamard.random_signs(n, gen)
    p = n // (1 if kind == "sylvester" else h)
    a = hadamard.factor(n, dtype=torch.float64)
    dense = torch.diag(signs.double()) @ torch.kron(a, hadamard.sylvester(p) / math.sqrt(p))
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(dense @ dense.t(), eye, rtol=0, atol=1e-12)
    x = torch.randn(3, 5, n, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(hadamard.transform(x, signs), x @ dense, rtol=0, atol=1e-12)
    m = hadamard.matrix(n, signs)
    torch.testing.assert_close(m, dense, rtol=0, atol=1e-12)
    if kind != "random":  # a Hadamard matrix: every entry ±1/sqrt(n), maximally incoherent
        torch.testing.assert_close(m.abs(), torch.full_like(m, 1 / math.sqrt(n)), rtol=0, atol=1e-12)
    else:  # the random factor is orthogonal but not flat
        assert m.abs().max() > 1.5 / math.sqrt(n)


def test_signs_are_seeded_and_random():
    a = hadamard.random_signs(1000, torch.Generator().manual_seed(0))
    b = hadamard.random_signs(1000, torch.Generator().manual_seed(0))
    c = hadamard.random_signs(1000, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.tolist()) == {-1, 1} and 400 < int((a == 1).sum()) < 600


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_online_transform_in_16_bits(dtype):
    n = 1536
    signs = hadamard.random_signs(n, torch.Generator().manual_seed(3))
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(4)) * 30
    y = online.OnlineHadamard(n, signs)(x.to(dtype))
    assert y.dtype == dtype
    ref = x.double() @ hadamard.matrix(n, signs)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6}[dtype]
    assert ((y.double() - ref).norm() / ref.norm()) < tol
