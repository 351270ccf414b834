"""Column orders against brute-force computations."""
import numpy as np
import pytest
import torch

from pt2llm.ternary import ssr


@pytest.mark.parametrize("r,k", [(300, 128), (129, 128), (128, 128), (50, 128), (576, 64)])
def test_next_block_is_top_k_cosine_to_the_mean_column(r, k, gen):
    W = torch.randn(40, r, generator=gen, dtype=torch.float64) + torch.randn(40, 1, generator=gen, dtype=torch.float64)
    W[:, 3] = 0  # a dead column: similarity 0, no NaN
    pos = ssr.next_block(W, k)
    Wn = W.numpy()
    mean = Wn.mean(axis=1)
    sims = []
    for j in range(r):
        c = Wn[:, j]
        nc = np.linalg.norm(c)
        sims.append(0.0 if nc == 0 else float(c @ mean / (nc * np.linalg.norm(mean))))
    sims = np.array(sims)
    want = min(k, r)
    assert len(pos) == want and len(set(pos.tolist())) == want
    if r > k:
        chosen = sims[pos.numpy()]
        others = np.delete(sims, pos.numpy())
        assert chosen.min() >= others.max() - 1e-12
        assert np.all(np.diff(chosen) <= 1e-12)  # most similar first


def test_static_orders(gen):
    H = torch.diag(torch.tensor([1.0, 5.0, 3.0, 5.0, 0.5]))
    assert ssr.static_order("none", 5).tolist() == [0, 1, 2, 3, 4]
    assert ssr.static_order("hessian", 5, H).tolist() == [1, 3, 2, 0, 4]
    a, b = ssr.static_order("random", 50, seed=3), ssr.static_order("random", 50, seed=3)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(50))
    assert not torch.equal(a, ssr.static_order("random", 50, seed=4))
    with pytest.raises(ValueError):
        ssr.static_order("hessian", 5, None)
