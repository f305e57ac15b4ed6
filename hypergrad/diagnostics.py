"""How far the approximate hypergradient is from the exact one."""

from __future__ import annotations

import torch
from einops import rearrange

from hypergrad.tracker import Tracker


def approximation_error(tracker: Tracker) -> dict[str, float]:
    """Error of the approximate hypergradients, averaged over tracked samples.

    For each tracked sample, with ``e = exact - approx`` over all trainable
    parameters flattened:

    - ``abs_error``: ``||e||``;
    - ``rel_error``: ``||e|| / ||exact||`` (0 where both are 0);
    - ``cosine``: cosine between exact and approx (1 where both are 0).

    Needs a Tracker built with ``mode="both"``.
    """
    if tracker.mode != "both":
        raise ValueError(
            "approximation_error: expected a Tracker built with mode='both', got "
            f"mode={tracker.mode!r}. Build it with mode='both' to measure the error."
        )
    exact = _flat(tracker.hypergradients("exact"))
    approx = _flat(tracker.hypergradients("approx"))
    err = (exact - approx).norm(dim=1)
    norm_e, norm_a = exact.norm(dim=1), approx.norm(dim=1)
    rel = torch.where(norm_e > 0, err / norm_e.clamp_min(1e-300), err * 0)
    both = norm_e * norm_a
    cos = torch.where(
        both > 0, (exact * approx).sum(1) / both.clamp_min(1e-300), torch.ones_like(err)
    )
    return {
        "abs_error": float(err.mean()),
        "rel_error": float(rel.mean()),
        "cosine": float(cos.mean()),
    }


def _flat(tree):
    return torch.cat([rearrange(t, "k ... -> k (...)") for t in tree.values()], dim=1)
