"""Neuron selection (Griffin, CATS) against straightforward references; the row gather and scatter kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ferry.kernels.gather import gather_rows, gather_rows_reference, moved_rows, scatter_rows, scatter_rows_reference
from ferry.sparse.cats import cats_mask, sample_abs, threshold_for
from ferry.offload.accounting import kept_neurons
from ferry.sparse.griffin import griffin_order, griffin_scores


def test_griffin_scores_match_the_definition():
    z = torch.randn(7, 40, generator=torch.Generator().manual_seed(0))
    expected = torch.zeros(40)
    for j in range(40):  # column norm of the row-normalised activations, one neuron at a time
        total = 0.0
        for t in range(7):
            total += (z[t, j] / torch.sqrt((z[t] ** 2).sum())) ** 2
        expected[j] = torch.sqrt(total)
    torch.testing.assert_close(griffin_scores(z), expected, atol=1e-6, rtol=1e-5)


def test_griffin_scores_ignore_token_scale():
    z = torch.randn(5, 30)
    scaled = z * torch.tensor([1.0, 100.0, 0.01, 3.0, 7.0])[:, None]
    torch.testing.assert_close(griffin_scores(z), griffin_scores(scaled))


def test_griffin_order_puts_the_top_k_first_with_fewest_moves():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.0, 0.5])
    order = griffin_order(scores, 3)
    assert sorted(order.tolist()) == list(range(6))  # a permutation
    # 1 stays; 0 and 2 (unchosen, inside) trade with 3 and 5 (chosen, beyond), in ascending order
    assert order.tolist() == [3, 1, 5, 0, 4, 2]
    assert moved_rows(order).tolist() == [0, 2, 3, 5]


@pytest.mark.parametrize("seed", range(4))
def test_griffin_order_moves_only_what_it_must(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 200, 70
    scores = torch.rand(n, generator=g)
    order = griffin_order(scores, k)
    top = set(torch.topk(scores, k).indices.tolist())
    assert sorted(order.tolist()) == list(range(n))
    assert set(order[:k].tolist()) == top  # the chosen ones fill the prefix
    beyond = sum(1 for j in top if j >= k)
    assert moved_rows(order).numel() == 2 * beyond  # each chosen one beyond trades with one inside
    assert moved_rows(griffin_order(scores[order], k)).numel() == 0  # chosen again: nothing moves


@pytest.mark.parametrize("sparsity, size, kept", [(0.5, 1536, 768), (0.0, 1536, 1536), (0.3, 10, 7), (0.99, 10, 1)])
def test_kept_neurons(sparsity, size, kept):
    assert kept_neurons(size, sparsity) == kept


def test_cats_threshold_drops_the_requested_fraction():
    a = torch.randn(200, 500, generator=torch.Generator().manual_seed(1))
    samples = sample_abs(a, 1 << 20)
    for sparsity in (0.1, 0.5, 0.9):
        thr = threshold_for(samples, sparsity)
        assert thr == pytest.approx(float(np.quantile(a.abs().numpy(), sparsity)), rel=1e-3)
        kept = cats_mask(a, thr).float().mean().item()
        assert kept == pytest.approx(1 - sparsity, abs=2e-3)
    assert threshold_for(samples, 0.0) == 0.0


def test_sample_abs_respects_budget():
    a = torch.randn(100, 1000)
    assert sample_abs(a, 5000).numel() <= 5000 + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_rows_kernel_matches_torch(dtype):
    src = torch.randn(257, 3 * 24).to(dtype)
    index = torch.randperm(257, generator=torch.Generator().manual_seed(2))
    fast = gather_rows(src, index, torch.empty_like(src))
    ref = gather_rows_reference(src, index, torch.empty_like(src))
    assert torch.equal(fast, ref)
    assert torch.equal(fast[3], src[index[3]])


def test_gather_rows_rejects_mismatched_buffers():
    with pytest.raises(ValueError):
        gather_rows(torch.randn(4, 3), torch.arange(4), torch.empty(4, 3, dtype=torch.float16))
    with pytest.raises(ValueError):
        gather_rows(torch.randn(4, 3), torch.arange(3), torch.empty(4, 3))  # an index a row of out
    with pytest.raises(ValueError):
        gather_rows(torch.randn(4, 3), torch.tensor([0, 1, 2, 4]), torch.empty(4, 3))  # past src


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_scatter_rows_kernel_matches_torch(dtype):
    g = torch.Generator().manual_seed(3)
    out = torch.randint(0, 100, (300, 40), generator=g).to(dtype)
    index = torch.randperm(300, generator=g)[:120]
    src = torch.randint(0, 100, (120, 40), generator=g).to(dtype)
    fast = scatter_rows(src, index, out.clone())
    assert torch.equal(fast, scatter_rows_reference(src, index, out.clone()))
    assert torch.equal(fast[index[7]], src[7])
    untouched = torch.ones(300, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(fast[untouched], out[untouched])


def test_scatter_rows_rejects_what_it_cannot_do():
    out = torch.zeros(10, 4)
    with pytest.raises(ValueError):
        scatter_rows(torch.zeros(2, 4), torch.tensor([3, 10]), out)  # past the last row
    with pytest.raises(ValueError):
        scatter_rows(torch.zeros(2, 4), torch.tensor([-1, 2]), out)
    with pytest.raises(ValueError):
        scatter_rows(torch.zeros(2, 5), torch.tensor([1, 2]), out)  # another width
    with pytest.raises(ValueError):
        scatter_rows(torch.zeros(3, 4), torch.tensor([1, 2]), out)  # a row without an index


def test_parallel_kernels_leave_torchs_thread_count_alone():
    from ferry.kernels.gather import gather_rows

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        src = torch.randn(4096, 64)
        gather_rows(src, torch.randperm(4096), torch.empty_like(src))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
