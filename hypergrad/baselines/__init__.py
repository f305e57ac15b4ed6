"""Attribution baselines: influence functions, TracIn, self-loss, random.

Every score has HYDRA's sign: positive when a training sample helps the
reference set, negative when it hurts it; :func:`harmful_first` gives the
order of inspection. Captum's versions are in
:mod:`hypergrad.baselines.captum_adapter` (optional).
"""

from hypergrad.baselines.influence import (
    conjugate_gradient,
    hessian_vector_product,
    influence_scores,
    last_linear_features,
    lissa,
    top_eigenvalue,
)
from hypergrad.baselines.simple import (
    FunctionalLoss,
    detection_auc,
    detection_curve,
    directional_derivatives,
    harmful_first,
    random_scores,
    sample_losses,
    self_loss_scores,
    summed_gradient,
)
from hypergrad.baselines.tracin import Checkpoint, tracin_scores

__all__ = [
    "Checkpoint",
    "FunctionalLoss",
    "conjugate_gradient",
    "detection_auc",
    "detection_curve",
    "directional_derivatives",
    "harmful_first",
    "hessian_vector_product",
    "influence_scores",
    "last_linear_features",
    "lissa",
    "random_scores",
    "sample_losses",
    "self_loss_scores",
    "summed_gradient",
    "top_eigenvalue",
    "tracin_scores",
]
