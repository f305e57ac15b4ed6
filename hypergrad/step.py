"""One training step as a pure function, and its tangents.

The step maps ``(params, float buffers, optimizer slots, sample_weight)`` to
their values after one update. ``sample_weight`` holds one weight per batch
row, zero on the primal trajectory; a tracked sample's tangent puts
``num_train`` on its rows, so that the batch objective

    (1 / B) * sum_j (1 + sample_weight_j) * loss_j

has the derivative ``(N / B) * grad loss_i`` in that direction, the DESIGN's
mini-batch estimate of ``d / d eps_i``.

- :func:`exact_tangents` pushes tangents through the whole step with
  ``torch.func.jvp``: Hessian-vector products, BatchNorm statistics and the
  optimizer's Jacobian included.
- :func:`batch_gradients` returns the batch gradient and the per-row
  gradients of the tracked rows at the primal (no tangent on the weights);
  :func:`rule_tangents` pushes those through the update rule alone. That is
  the approximate recurrence: the Hessian term is the only thing dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from hypergrad._compat import quiet_forward_ad
from hypergrad.functional import FunctionalModel, Params
from hypergrad.optim.base import RuleState, UpdateRule

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Batch:
    """One mini-batch and the data that the step closes over."""

    inputs: Tensor
    targets: Tensor
    const_buffers: Params  # buffers without tangents (integer counters, ...)
    count: int  # optimizer steps taken before this one
    lr: float


def per_sample_losses(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    """Calls ``loss_fn`` and checks it returned one loss per row."""
    losses = loss_fn(outputs, targets)
    rows = outputs.shape[0]
    if not isinstance(losses, Tensor) or losses.shape != (rows,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses)
        raise ValueError(
            f"hypergrad: loss_fn must return one loss per sample, shape ({rows},), "
            f"got {shape}. Use reduction='none', e.g. "
            "lambda out, y: F.cross_entropy(out, y, reduction='none')."
        )
    return losses


def _batch_objective(fmodel, loss_fn, batch: Batch):
    def objective(params, float_buffers, sample_weight):
        buffers = {**float_buffers, **batch.const_buffers}
        outputs, new_buffers = fmodel(params, buffers, batch.inputs, train=True)
        losses = per_sample_losses(loss_fn, outputs, batch.targets)
        loss = ((1 + sample_weight) * losses).sum() / losses.shape[0]
        return loss, (new_buffers, losses.detach())

    return objective


def exact_tangents(
    fmodel: FunctionalModel,
    loss_fn: LossFn,
    rule: UpdateRule,
    batch: Batch,
    primals: tuple[Params, Params, dict[str, Params]],
    tangents: tuple[Params, Params, dict[str, Params], Tensor],
):
    """The step and the exact tangents of a chunk of tracked samples.

    Args:
        primals: ``(params, float_buffers, slots)`` before the step.
        tangents: Their tangents, each leaf batched ``(chunk, *shape)``, and
            the sample-weight tangent ``(chunk, B)``.

    Returns:
        ``(new_primals, new_tangents, new_buffers, losses)``: the primal state
        after the step (float buffers and slots split as in ``primals``), the
        tangents after the step (batched like the input), every buffer after
        the step, and the per-sample losses ``(B,)``.
    """
    quiet_forward_ad()
    objective = _batch_objective(fmodel, loss_fn, batch)
    float_names = list(primals[1])

    def step(params, float_buffers, slots, sample_weight):
        grads, (new_buffers, losses) = grad(objective, has_aux=True)(
            params, float_buffers, sample_weight
        )
        state = RuleState(batch.count, slots)
        new_params, new_state = rule.update(grads, state, params, batch.lr)
        new_float = {n: new_buffers[n] for n in float_names}
        return (new_params, new_float, new_state.slots), (new_buffers, losses)

    sample_weight = batch.inputs.new_zeros(batch.targets.shape[0])
    sample_weight = sample_weight.to(next(iter(primals[0].values())).dtype)

    def one(t_params, t_buffers, t_slots, t_weight):
        return jvp(
            step,
            (*primals, sample_weight),
            (t_params, t_buffers, t_slots, t_weight),
            has_aux=True,
        )

    new_primals, new_tangents, (new_buffers, losses) = vmap(
        one, out_dims=(None, 0, None), randomness="same"
    )(*tangents)
    return new_primals, new_tangents, new_buffers, losses


def batch_gradients(
    fmodel: FunctionalModel,
    loss_fn: LossFn,
    batch: Batch,
    params: Params,
    float_buffers: Params,
    row_weights: Tensor,
    *,
    rows_independent: bool,
):
    """Batch gradient plus weighted per-row gradients, at the primal.

    The batch gradient comes from one forward and backward pass. The per-row
    gradients are computed one of two ways, with the same result:

    - when the rows do not interact (``rows_independent``: no BatchNorm in
      train mode) and the forward pass drew no random numbers, each needed
      row is run on its own, batched with ``vmap``: about ``k / B`` of a
      batch step;
    - otherwise one backward pass per weighted row through the whole
      batch's forward pass, so that BatchNorm statistics and the dropout mask
      are the training step's.

    Args:
        row_weights: ``(k, B)``: row ``r`` asks for
            ``sum_j row_weights[r, j] * grad loss_j / B``.
        rows_independent: Whether the model's rows may be run separately.

    Returns:
        ``(grads, row_grads, new_buffers, losses)``: the batch-mean gradient
        by name, the weighted per-row gradients ``(k, *param.shape)`` by
        name, every buffer after the step, and the losses ``(B,)``.
    """
    buffers = {**float_buffers, **batch.const_buffers}

    def losses_of(p, inputs, targets):
        outputs, new_buffers = fmodel(p, buffers, inputs, train=True)
        return per_sample_losses(loss_fn, outputs, targets), new_buffers

    rng = _RngSnapshot(batch.inputs.device)
    losses, vjp_fn, new_buffers = vjp(
        lambda p: losses_of(p, batch.inputs, batch.targets), params, has_aux=True
    )
    rows = losses.shape[0]
    row_weights = row_weights.to(losses.dtype)
    if rows_independent and rng == _RngSnapshot(batch.inputs.device):
        (grads,) = vjp_fn(losses.new_full((rows,), 1.0 / rows))
        needed = row_weights.any(dim=0).nonzero().squeeze(1)
        if needed.numel() == 0:  # no tracked sample in this batch
            k = row_weights.shape[0]
            row_grads = {n: g.new_zeros((k, *g.shape)) for n, g in grads.items()}
            return grads, row_grads, new_buffers, losses.detach()

        def row_grad(x, y):
            return grad(lambda p: losses_of(p, x[None], y[None])[0].sum())(params)

        per_row = vmap(row_grad)(batch.inputs[needed], batch.targets[needed])
        weights = row_weights[:, needed] / rows
        row_grads = {
            n: (weights @ g.flatten(1)).reshape(-1, *g.shape[1:])
            for n, g in per_row.items()
        }
        return grads, row_grads, new_buffers, losses.detach()
    mean_row = losses.new_ones(1, rows)
    cotangents = torch.cat([mean_row, row_weights]) / rows
    (all_grads,) = vmap(vjp_fn)(cotangents)
    grads = {n: g[0] for n, g in all_grads.items()}
    row_grads = {n: g[1:] for n, g in all_grads.items()}
    return grads, row_grads, new_buffers, losses.detach()


class _RngSnapshot:
    """The random generators' states, comparable with ``==``."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def __eq__(self, other) -> bool:
        same_cuda = self.cuda is None or torch.equal(self.cuda, other.cuda)
        return torch.equal(self.cpu, other.cpu) and same_cuda


def rule_tangents(
    rule: UpdateRule,
    count: int,
    lr: float,
    primals: tuple[Params, Params, dict[str, Params]],
    tangents: tuple[Params, Params, dict[str, Params]],
) -> tuple[Params, dict[str, Params]]:
    """Tangents of ``rule.update`` alone, batched over the leading dimension.

    Args:
        primals: ``(params, grads, slots)`` of the step.
        tangents: ``(d params, d grads, d slots)``, each ``(chunk, *shape)``.

    Returns:
        ``(d new_params, d new_slots)``, each ``(chunk, *shape)``.
    """

    quiet_forward_ad()

    def update(params, grads, slots):
        new_params, new_state = rule.update(grads, RuleState(count, slots), params, lr)
        return new_params, new_state.slots

    # An unused parameter's gradient can come back as an expanded zero,
    # which jvp refuses as a primal: give it its own memory.
    params, grads, slots = primals
    primals = (params, {n: g.contiguous() for n, g in grads.items()}, slots)

    def one(t_params, t_grads, t_slots):
        return jvp(update, primals, (t_params, t_grads, t_slots))[1]

    return vmap(one)(*tangents)
