"""Captum's TracInCP and NaiveInfluenceFunction, on this package's scale.

An optional second implementation of :func:`~hypergrad.baselines.tracin_scores`
and of last-layer :func:`~hypergrad.baselines.influence_scores`, to check
ours against (``tests/test_baselines.py``) or to use instead. It needs
captum: ``pip install "hypergrad[influence]"``.

Captum's influence function takes the Hessian of the *summed* training loss
and adds ``hessian_reg`` to its diagonal; ours is the Hessian of the *mean*
plus ``damping + weight_decay``. With ``hessian_reg = N * (damping +
weight_decay)`` the two inverses differ by the factor N, which
:func:`influence_scores_captum` multiplies back, so both return the same
numbers with the same sign (positive helps the reference set).
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from hypergrad.baselines.influence import last_linear_features
from hypergrad.baselines.tracin import Checkpoint
from hypergrad.step import LossFn


def captum_available() -> bool:
    """Whether captum can be imported."""
    return importlib.util.find_spec("captum") is not None


def _captum_influence():
    try:
        import captum.influence
    except ImportError as error:
        raise ImportError(
            "the captum baselines need captum, which is not installed. Install it "
            'with `pip install "hypergrad[influence]"`, or leave the captum '
            "methods out."
        ) from error
    return captum.influence


class _PerSampleLoss(nn.Module):
    """A per-sample loss as captum expects it (``reduction='none'``)."""

    reduction = "none"

    def __init__(self, loss_fn: LossFn):
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.loss_fn(outputs, targets)


def _load(module: nn.Module, checkpoint: Checkpoint) -> float:
    module.load_state_dict(checkpoint.state_dict)
    return float(checkpoint.learning_rate)


def tracin_scores_captum(
    model: nn.Module,
    loss_fn: LossFn,
    checkpoints: Sequence[Checkpoint],
    train: tuple[Tensor, Tensor],
    reference: tuple[Tensor, Tensor],
    *,
    batch_size: int = 256,
) -> Tensor:
    """``(N,)`` captum's TracInCP, summed over the reference set.

    Same arguments and result as :func:`hypergrad.baselines.tracin_scores`.
    """
    influence = _captum_influence()
    if not checkpoints:
        raise ValueError("tracin_scores_captum: expected at least one checkpoint.")
    net = copy.deepcopy(model).eval()
    tracin = influence.TracInCP(
        net,
        TensorDataset(*train),
        checkpoints=list(checkpoints),
        checkpoints_load_func=_load,
        loss_fn=_PerSampleLoss(loss_fn),
        batch_size=batch_size,
        sample_wise_grads_per_batch=False,
    )
    return tracin.influence(tuple(reference), aggregate=True).reshape(-1).detach()


def influence_scores_captum(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[Tensor, Tensor],
    reference: tuple[Tensor, Tensor],
    *,
    damping: float = 0.01,
    weight_decay: float = 0.0,
    batch_size: int = 256,
) -> Tensor:
    """``(N,)`` captum's exact-Hessian influence of the last linear layer.

    Captum forms the layer's Hessian explicitly and inverts it through its
    full eigendecomposition (``projection_dim`` = the layer's size), so this
    is the reference for ``influence_scores(..., method="cg")``.
    """
    influence = _captum_influence()
    n = train[0].shape[0]
    net = copy.deepcopy(model).eval()
    layer, head, _ = last_linear_features(net, train[0][:1])
    net = net.to(torch.float64) if train[0].dtype == torch.float64 else net
    size = sum(p.numel() for p in head.parameters())
    solver = influence.NaiveInfluenceFunction(
        net,
        TensorDataset(*train),
        Checkpoint(net.state_dict(), 1.0),
        checkpoints_load_func=_load,
        layers=[layer],
        loss_fn=_PerSampleLoss(loss_fn),
        batch_size=batch_size,
        projection_dim=size,
        hessian_reg=n * (damping + weight_decay),
        hessian_inverse_tol=0.0,
    )
    train_emb = solver.compute_intermediate_quantities(
        DataLoader(TensorDataset(*train), batch_size=batch_size)
    )
    ref_emb = solver.compute_intermediate_quantities(
        DataLoader(TensorDataset(*reference), batch_size=batch_size),
        aggregate=True,
        test=True,
    )
    return n * (train_emb @ ref_emb.reshape(-1)).detach()
