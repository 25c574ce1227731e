"""The packed int4 kernel path against the plain reference: dequantize, then F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ferry.kernels.gather import moved_rows
from ferry.kernels.int4pack import (BLOCK, int4_linear, int4_matrix, int8_matrix, layout_matches, move_rows_, pack,
                                   permute_rows, supported, unpack)
from ferry.sparse.griffin import griffin_order
from ferry.kernels.quant import Grouped

pytestmark = pytest.mark.skipif(not layout_matches(), reason="this torch packs int4 differently")


def _int4(n, k, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).half()
    minimum = (-torch.rand(n, k // group, generator=g) * 0.1).half()
    return Grouped(q, scale, minimum, 4)


def _int8(n, k, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return Grouped(q, (torch.rand(n, k // group, generator=g) * 0.01 + 1e-4).half(), None, 8)


@pytest.mark.parametrize("n", [64, 192, 16, 80])
def test_pack_is_torchs_layout(n):
    codes = torch.randint(0, 16, (n, 96), dtype=torch.uint8)
    theirs = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2).view(torch.uint8)
    if n % BLOCK:
        with pytest.raises(RuntimeError):
            pack(codes)
        return
    assert torch.equal(pack(codes), theirs)
    assert torch.equal(unpack(theirs), codes)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k,group", [(128, 64, 32), (80, 256, 64), (64, 512, 128), (192, 256, 256)])
def test_linear_matches_dequantize_then_linear(bits, n, k, group):
    w = (_int4 if bits == 4 else _int8)(n, k, group)
    parts = (int4_matrix(w.q, w.scale, w.minimum, torch.float32),) if bits == 4 else int8_matrix(w.q, w.scale, torch.float32)
    x = torch.randn(3, k)
    want = F.linear(x, w.dequantize(torch.float32))
    torch.testing.assert_close(int4_linear(x, parts), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_bf16_is_the_reference_rounded(bits):
    """bf16 activations and tables (the fast path): within bf16's rounding of the fp32 result."""
    n, k, group = 256, 512, 32
    w = (_int4 if bits == 4 else _int8)(n, k, group, seed=1)
    parts = (int4_matrix(w.q, w.scale, w.minimum, torch.bfloat16),) if bits == 4 else int8_matrix(w.q, w.scale, torch.bfloat16)
    x = torch.randn(1, k).bfloat16()
    want = F.linear(x.float(), w.dequantize(torch.float32))
    got = int4_linear(x, parts).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_prefix_rows_are_the_first_rows():
    w = _int4(192, 128, 32, seed=2)
    m = int4_matrix(w.q, w.scale, w.minimum, torch.float32)
    x = torch.randn(2, 128)
    full = int4_linear(x, (m,))
    torch.testing.assert_close(int4_linear(x, (m.prefix(128),)), full[:, :128], rtol=0, atol=0)
    with pytest.raises(ValueError):
        m.prefix(100)


def test_supported_shapes():
    cpu = torch.device("cpu")
    assert supported(192, 64, 32, cpu, reordered=True)
    assert not supported(160, 64, 32, cpu, reordered=True)  # rows to permute need whole blocks
    assert supported(160, 64, 32, cpu)
    assert not supported(72, 64, 32, cpu)  # rows a multiple of 16
    assert not supported(64, 96, 48, cpu)  # group 48 has no kernel
    assert not supported(64, 64, 32, torch.device("meta"))


@pytest.mark.parametrize("n,k", [(64, 32), (192, 96), (512, 256)])
@pytest.mark.parametrize("kind", ["random", "griffin", "identity"])
def test_permute_rows_is_unpack_index_pack(n, k, kind):
    g = torch.Generator().manual_seed(n + k)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    order = {"random": torch.randperm(n, generator=g), "identity": torch.arange(n),
             "griffin": griffin_order(torch.rand(n, generator=g), n // 3)}[kind]
    packed = pack(codes)
    got = permute_rows(packed, order)
    assert torch.equal(got, pack(unpack(packed)[order]))
    assert torch.equal(unpack(got), codes[order])


def test_permute_rows_refuses_what_it_cannot_do():
    packed = pack(torch.zeros(128, 32, dtype=torch.uint8))
    with pytest.raises(ValueError):
        permute_rows(packed[:96], torch.arange(96))  # not whole blocks
    with pytest.raises(ValueError):
        permute_rows(packed, torch.arange(64))  # one index a row
    with pytest.raises(ValueError):
        permute_rows(packed, torch.arange(128) + 1)  # past the last row
    with pytest.raises(ValueError):
        permute_rows(packed, -torch.arange(128))  # before the first


@pytest.mark.parametrize("n,k", [(64, 32), (512, 256)])
@pytest.mark.parametrize("kind", ["griffin", "few", "none", "all"])
def test_move_rows_in_place_is_the_permutation(n, k, kind):
    g = torch.Generator().manual_seed(n + 7)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    if kind == "griffin":  # kept neurons stay, the rest trade places
        order = griffin_order(torch.rand(n, generator=g), n // 2)
    elif kind == "all":
        order = torch.randperm(n, generator=g)
    else:
        order, pairs = torch.arange(n), torch.randperm(n, generator=g)[:(6 if kind == "few" else 0)].view(2, -1)
        order[pairs[0]], order[pairs[1]] = pairs[1], pairs[0]
    packed = pack(codes)
    want = permute_rows(packed, order)
    got = move_rows_(packed, order, moved_rows(order))
    assert got is packed and torch.equal(got, want)
    assert torch.equal(unpack(got), codes[order])


def test_move_rows_refuses_places_the_order_does_not_move_among_themselves():
    packed = pack(torch.randint(0, 16, (128, 32), dtype=torch.uint8))
    order = torch.arange(128)
    order[[3, 70]] = torch.tensor([70, 3])
    for places in (torch.tensor([3]), torch.tensor([70, 3]), torch.tensor([3, 71])):
        with pytest.raises(ValueError):
            move_rows_(packed, order, places)
