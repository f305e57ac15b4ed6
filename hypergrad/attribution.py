"""Contributions of training samples to test predictions, and rankings."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor
from torch.func import grad, vmap

from hypergrad.functional import FunctionalModel, Params
from hypergrad.step import LossFn


def contributions(
    fmodel: FunctionalModel,
    loss_fn: LossFn,
    params: Params,
    buffers: Params,
    t_params: Params,
    t_buffers: Params,
    inputs: Tensor,
    targets: Tensor,
    *,
    batch_size: int = 256,
) -> Tensor:
    """``C(z, i) = -(grad_w l(z) . dw_i + grad_b l(z) . db_i)`` for every pair.

    ``dw_i`` are the parameters' hypergradients and ``db_i`` those of the
    float buffers (BatchNorm running statistics; empty in approx mode). Test
    losses are evaluated in eval mode, one per-sample gradient per test point,
    blocked over ``batch_size`` test points.

    Returns:
        ``(n_test, K)``.
    """
    if batch_size < 1:
        raise ValueError(f"contributions: expected batch_size >= 1, got {batch_size}.")
    names_b = list(t_buffers)
    const = {n: b for n, b in buffers.items() if n not in t_buffers}

    def test_loss(p, b, x, y):
        outputs, _ = fmodel(p, {**b, **const}, x[None], train=False)
        return loss_fn(outputs, y[None]).sum()

    per_sample = vmap(grad(test_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))
    tangent = _flat(t_params, t_buffers, names_b)  # (K, P)
    blocks = []
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start : start + batch_size]
        y = targets[start : start + batch_size]
        g_params, g_buffers = per_sample(params, {n: buffers[n] for n in names_b}, x, y)
        g = _flat(g_params, g_buffers, names_b)  # (n_block, P)
        blocks.append(-(g @ tangent.T))
    return torch.cat(blocks)


def _flat(params: Params, buffers: Params, buffer_names) -> Tensor:
    leaves = list(params.values()) + [buffers[n] for n in buffer_names]
    return torch.cat([rearrange(t, "k ... -> k (...)") for t in leaves], dim=1)


def top_k(contributions: Tensor, tracked: Tensor, k: int = 5):
    """The most helpful and most harmful training samples of each test point.

    Args:
        contributions: ``(n_test, K)`` from ``Tracker.contributions``.
        tracked: ``(K,)`` the training indices of the columns.
        k: How many of each; at most K.

    Returns:
        A dict with ``helpful`` and ``harmful`` training indices ``(n_test, k)``
        and their contributions ``helpful_values``, ``harmful_values``: the
        largest positive first and the most negative first.
    """
    tracked = torch.as_tensor(tracked)
    if contributions.dim() != 2 or contributions.shape[1] != len(tracked):
        raise ValueError(
            f"top_k: expected contributions of shape (n_test, {len(tracked)}), got "
            f"{tuple(contributions.shape)}."
        )
    if not 1 <= k <= len(tracked):
        raise ValueError(f"top_k: expected 1 <= k <= {len(tracked)}, got {k}.")
    tracked = tracked.to(contributions.device)
    best = contributions.topk(k, dim=1)
    worst = contributions.topk(k, dim=1, largest=False)
    return {
        "helpful": tracked[best.indices],
        "helpful_values": best.values,
        "harmful": tracked[worst.indices],
        "harmful_values": worst.values,
    }


def total_contribution(
    contributions: Tensor, test_rows: Tensor | None = None
) -> Tensor:
    """``sum_z C(z, i)`` over a set of test points (all by default): ``(K,)``.

    Ranking training samples by this total, most negative first, puts those
    that hurt the set most (mislabelled data, typically) at the top.
    """
    if test_rows is not None:
        contributions = contributions[test_rows]
    return contributions.sum(dim=0)
