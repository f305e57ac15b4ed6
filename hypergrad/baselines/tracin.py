"""TracIn over checkpoints (TracInCP; Pruthi et al., NeurIPS 2020).

The influence of training sample ``i`` on a reference set, summed over the
checkpoints ``w_c`` saved during training with the learning rate ``lr_c`` in
effect before each::

    score_i = sum_c lr_c * g_ref(w_c) . grad l_i(w_c),
    g_ref(w) = sum_z grad l(z, w)

Positive means a gradient step on ``i`` lowers the reference loss (a
"proponent"): HYDRA's sign. HYDRA's approximate hypergradient with plain
SGD is a sum of the same per-step terms, taken at the final weights for
the reference gradient; TracIn evaluates both gradients at the checkpoint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from hypergrad.baselines.simple import (
    FunctionalLoss,
    directional_derivatives,
    summed_gradient,
)
from hypergrad.step import LossFn


class Checkpoint(NamedTuple):
    """Weights saved during training and the learning rate that led to them.

    Attributes:
        state_dict: The module's ``state_dict()`` at the checkpoint.
        learning_rate: The rate of the steps since the previous checkpoint
            (their mean, when a schedule changed it).
    """

    state_dict: Mapping[str, Tensor]
    learning_rate: float


def tracin_scores(
    model: nn.Module,
    loss_fn: LossFn,
    checkpoints: Sequence[Checkpoint],
    train: tuple[Tensor, Tensor],
    reference: tuple[Tensor, Tensor],
    *,
    batch_size: int = 512,
) -> Tensor:
    """``(N,)`` TracInCP scores of every training sample on a reference set.

    Each checkpoint costs one gradient of the summed reference loss and one
    forward-mode pass over the training set (``g_ref . grad l_i`` for all
    ``i`` at once); no per-sample gradient is stored.

    Args:
        model: A network of the checkpoints' architecture (its own weights
            are not used).
        loss_fn: ``loss_fn(outputs, targets) -> (B,)``.
        checkpoints: The saved weights and rates, at least one.
        train: ``(inputs, targets)`` of the samples scored.
        reference: ``(inputs, targets)`` of the set whose loss is explained.
        batch_size: Rows per block.

    Returns:
        The scores; positive helps the reference set.
    """
    if not checkpoints:
        raise ValueError(
            "tracin_scores: expected at least one checkpoint, got none. Save "
            "the weights during training, e.g. once per epoch."
        )
    net = copy.deepcopy(model)
    scores, dtype = torch.zeros(train[0].shape[0], dtype=torch.float64), None
    for number, point in enumerate(checkpoints):
        lr = float(point.learning_rate)
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(
                f"tracin_scores: checkpoint {number} has learning rate {lr!r}; "
                "expected a finite rate >= 0."
            )
        net.load_state_dict(point.state_dict)
        loss = FunctionalLoss(net, loss_fn)
        g_ref = summed_gradient(loss, *reference, batch_size=batch_size)
        dots = directional_derivatives(loss, *train, g_ref, batch_size=batch_size)
        scores += lr * dots.to(torch.float64).cpu()
        dtype = loss.theta.dtype
    return scores.to(dtype)
