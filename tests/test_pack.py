import pytest
import torch

from pt2llm import pack


def test_trits_round_trip_every_length_1_to_1000(gen):
    for L in range(1, 1001):
        t = torch.randint(-1, 2, (3, L), generator=gen, dtype=torch.int8)
        b = pack.pack_trits(t)
        assert b.dtype == torch.uint8 and b.shape == (3, -(-L // 5))
        assert int(b.max()) <= 242
        assert torch.equal(pack.unpack_trits(b, L), t)


def test_trit_layout_is_base_3_little_endian():
    t = torch.tensor([[1, 0, -1, 1, 1, -1]], dtype=torch.int8)
    b = pack.pack_trits(t)
    assert b.tolist() == [[2 * 1 + 1 * 3 + 0 * 9 + 2 * 27 + 2 * 81, 0 + 1 * 3 + 1 * 9 + 1 * 27 + 1 * 81]]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_bits_round_trip(bits, gen):
    for L in [1, 2, 3, 7, 8, 9, 127, 128, 129, 576, 1000]:
        c = torch.randint(0, 2 ** bits, (4, L), generator=gen).to(torch.uint8)
        b = pack.pack_bits(c, bits)
        assert b.shape == (4, -(-L * bits // 8))
        assert torch.equal(pack.unpack_bits(b, L, bits), c)
