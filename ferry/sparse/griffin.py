"""Griffin: a prompt-fixed set of MLP neurons per layer, chosen from the prefill's activations.

For prompt activations z = SiLU(gate(x)) * up(x), shape [T, I], each token's row is scaled to
unit L2 norm (so no single token dominates) and neuron j scores the L2 norm of its column. The
top k = round((1 - sparsity) * I) neurons are kept, the same k in every layer, for the whole
generation.
"""

from __future__ import annotations

import torch



def griffin_scores(z: torch.Tensor) -> torch.Tensor:
    """z [T, I] -> neuron scores [I] (fp32)."""
    return griffin_sumsq(z).sqrt()


def griffin_sumsq(z: torch.Tensor) -> torch.Tensor:
    """z [T, I] -> the squared scores [I]: sums over tokens, so a prompt's can be added to those
    of the prefix before it (same order of neurons, same top k as `griffin_scores`)."""
    z = z.float()
    unit = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit.pow(2).sum(dim=0)


def griffin_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A permutation of the neurons [I] that brings the k best into the first k places with the
    fewest moves: a chosen neuron already there stays; each chosen neuron beyond trades places
    with an unchosen one inside, both taken in ascending place order.

    Reordering a layer's neurons this way makes the selected set a contiguous prefix of the MLP
    bundle; the MLP itself is unchanged by any permutation of its neurons. A reorder moves only
    the traded rows (`ferry.kernels.gather.moved_rows`): about half the neurons after a cold
    prefill, and few for a prompt extending the last one, whose summed scores change little. The
    prefix stays two ascending runs of places merged, so neighbouring records mostly share
    down_proj groups (the GPU columns kernel's table reads, `ferry.kernels.gemv_triton`).
    """
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen[torch.topk(scores, k, sorted=False).indices] = True
    incoming = chosen[k:].nonzero().flatten() + k
    outgoing = (~chosen[:k]).nonzero().flatten()
    order = torch.arange(scores.numel(), device=scores.device)
    order[outgoing], order[incoming] = incoming, outgoing
    return order
