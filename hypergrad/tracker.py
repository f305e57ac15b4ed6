"""The Tracker: training steps with hypergradients carried alongside."""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
from einops import rearrange
from torch import Tensor, nn

from hypergrad.deferred import DeferredTangents
from hypergrad.functional import FunctionalModel, Params
from hypergrad.optim.base import RuleState, UpdateRule
from hypergrad.step import Batch, LossFn, batch_gradients, exact_tangents, rule_tangents
from hypergrad.validation import (
    check_batch,
    check_mode,
    check_test_points,
    check_tracked,
)

MODES = ("exact", "approx", "both")


class Tracker:
    """Trains a model with a pure update rule and carries hypergradients.

    For each tracked training sample ``i`` the Tracker carries
    ``d w_t / d sample_weight_i`` (the hypergradient) through every step,
    together with the tangents of the optimizer state (and, in exact mode,
    of the BatchNorm running statistics).

    Args:
        model: The network. It is copied and never modified; read the trained
            weights from :attr:`params` or with :meth:`load_into`.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-sample losses.
        rule: An update rule from :mod:`hypergrad.optim` or your own.
        num_train: N, the size of the training set.
        tracked: ``(K,)`` distinct dataset indices in ``[0, N)``.
        mode: ``"exact"`` (Hessian term kept), ``"approx"`` (dropped) or
            ``"both"`` (the two on one primal trajectory).
        chunk_size: Tracked samples pushed through one batched ``jvp``;
            bounds memory. Default 16.
        deferred: Use the closed form for approximate tangents of a
            ``scalar_linear`` rule (default: when the rule allows it and the
            mode is ``"approx"``).
        rows_independent: Whether each row's loss depends on that row alone
            in train mode, so that per-sample gradients may be taken row by
            row (approx mode). Default: True unless the model has BatchNorm.
            Pass False for a model that couples rows in its own code. Random
            layers are detected at each step and take the batch path.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        rule: UpdateRule,
        *,
        num_train: int,
        tracked,
        mode: str = "exact",
        chunk_size: int = 16,
        deferred: bool | None = None,
        rows_independent: bool | None = None,
    ):
        if not isinstance(rule, UpdateRule):
            raise TypeError(
                "Tracker: expected rule to be an UpdateRule (hypergrad.optim.sgd(...) "
                f"or UpdateRule(init, update, lr)), got {type(rule).__name__}."
            )
        if not callable(loss_fn):
            raise TypeError(f"Tracker: expected a callable loss_fn, got {loss_fn!r}.")
        whole = isinstance(num_train, numbers.Integral) and not isinstance(
            num_train, bool
        )
        if not whole or num_train < 1:
            raise ValueError(f"Tracker: expected num_train >= 1, got {num_train!r}.")
        num_train = int(num_train)
        if (
            isinstance(chunk_size, bool)
            or not isinstance(chunk_size, int)
            or chunk_size < 1
        ):
            raise ValueError(f"Tracker: expected chunk_size >= 1, got {chunk_size!r}.")
        self.mode = check_mode(mode, MODES, "Tracker")
        self.fmodel = FunctionalModel(model)
        if not self.fmodel.param_names:
            raise ValueError(
                "Tracker: the model has no parameter with requires_grad=True; "
                "there is nothing to train."
            )
        self.loss_fn, self.rule = loss_fn, rule
        self.num_train, self.chunk_size = num_train, chunk_size
        self.params = self.fmodel.initial_params()
        self.buffers = self.fmodel.initial_buffers()
        first = next(iter(self.params.values()))
        self.device, self.dtype = first.device, first.dtype
        self.tracked = check_tracked(tracked, num_train, "Tracker").to(self.device)
        self.state = rule.init(self.params)
        self.step_count = 0
        self.float_buffer_names = self.fmodel.float_buffer_names
        if rows_independent is None:
            rows_independent = self.fmodel.rows_independent
        self.rows_independent = bool(rows_independent)

        if deferred is None:
            deferred = rule.scalar_linear and self.mode == "approx"
        if deferred and not rule.scalar_linear:
            raise ValueError(
                "Tracker: deferred=True needs a scalar_linear rule, got "
                f"{rule.name!r}, whose tangent map has per-coordinate coefficients. "
                "Pass deferred=None."
            )
        if deferred and self.mode != "approx":
            raise ValueError(
                f"Tracker: deferred=True applies to mode='approx' only, got "
                f"mode={self.mode!r}. Pass deferred=None."
            )
        self._tangents = {m: self._zero_tangents(m) for m in self.modes if not deferred}
        self._deferred = None
        if deferred:
            self._deferred = DeferredTangents(
                rule,
                sorted(self.state.slots),
                len(self.tracked),
                sum(p.numel() for p in self.params.values()),
                self.dtype,
                self.device,
            )

    @property
    def modes(self) -> tuple[str, ...]:
        """The tangent sets carried: ``("exact",)``, ``("approx",)`` or both."""
        return ("exact", "approx") if self.mode == "both" else (self.mode,)

    @property
    def num_tracked(self) -> int:
        return len(self.tracked)

    def _zero_tangents(self, mode: str):
        k = len(self.tracked)

        def zeros(tree):
            return {n: t.new_zeros((k, *t.shape)) for n, t in tree.items()}

        buffers = {n: self.buffers[n] for n in self.float_buffer_names}
        slots = {s: zeros(tree) for s, tree in self.state.slots.items()}
        return zeros(self.params), zeros(buffers) if mode == "exact" else {}, slots

    # ------------------------------------------------------------------ step

    def step(self, inputs: Tensor, targets: Tensor, indices: Tensor) -> float:
        """One training step on a mini-batch, tangents included.

        Args:
            inputs: ``(B, ...)`` the batch.
            targets: ``(B, ...)`` what ``loss_fn`` compares the outputs with.
            indices: ``(B,)`` the dataset indices of the rows, in ``[0, N)``.

        Returns:
            The mean training loss of the batch before the step.

        Raises:
            ValueError: Bad indices, or a non-finite loss or tangent; the
                Tracker then keeps the state it had before the call.
        """
        where = f"Tracker.step (step {self.step_count})"
        indices = check_batch(inputs, targets, indices, self.num_train, where)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        indices = indices.to(self.device)
        count = self.state.count
        lr = float(self.rule.lr(count))
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"{where}: the schedule gave lr={lr!r}; expected >= 0.")
        const = {
            n: b for n, b in self.buffers.items() if n not in self.float_buffer_names
        }
        batch = Batch(inputs, targets, const, count, lr)
        floats = {n: self.buffers[n] for n in self.float_buffer_names}
        match = self.tracked[:, None] == indices[None, :]  # (K, B)
        sample_weights = match.to(self.dtype) * self.num_train
        rng = _RngReplay(self.device)

        new_tangents = {}
        if "exact" in self.modes:
            new_primal, new_tangents["exact"], new_buffers, losses = self._exact(
                batch, floats, sample_weights, rng
            )
        if "approx" in self.modes:
            with rng.replay():
                in_batch = match.any(dim=1).nonzero().squeeze(1)
                grads, injections, approx_buffers, approx_losses = batch_gradients(
                    self.fmodel,
                    self.loss_fn,
                    batch,
                    self.params,
                    floats,
                    sample_weights[in_batch],
                    rows_independent=self.rows_independent,
                )
            if "exact" not in self.modes:
                losses, new_buffers = approx_losses, approx_buffers
                new_params, new_state = self.rule.update(
                    grads, self.state, self.params, lr
                )
                new_primal = (new_params, None, new_state.slots)
            if self._deferred is None:
                new_tangents["approx"] = self._approx(
                    count, lr, grads, in_batch, injections
                )
        named = {"loss": losses}
        for mode, tangent in new_tangents.items():
            for tree in (tangent[0], tangent[1], *tangent[2].values()):
                named.update((f"{mode} tangent of {n!r}", t) for n, t in tree.items())
        named.update((f"updated parameter {n!r}", p) for n, p in new_primal[0].items())
        for slot, tree in new_primal[2].items():
            named.update(
                (f"optimizer slot {slot!r} of {n!r}", t) for n, t in tree.items()
            )
        if self._deferred is not None:
            flat = _flatten(injections)
            named["approx tangent"] = flat
        _check_finite(named, where)
        if self._deferred is not None:
            self._deferred.advance(count, lr, in_batch, flat)

        # commit
        self.params = {n: p.detach() for n, p in new_primal[0].items()}
        self.buffers = {n: b.detach() for n, b in new_buffers.items()}
        self.state = RuleState(count + 1, _detach(new_primal[2]))
        self._tangents.update(new_tangents)
        self.step_count += 1
        return float(losses.mean())

    def _exact(self, batch, floats, sample_weights, rng):
        old = self._tangents["exact"]
        primals = (self.params, floats, self.state.slots)
        new, new_primal = _empty_like(old), None
        for rows in _chunks(len(self.tracked), self.chunk_size):
            tangents = (*_rows(old, rows), sample_weights[rows])
            with rng.replay():
                out = exact_tangents(
                    self.fmodel, self.loss_fn, self.rule, batch, primals, tangents
                )
            if new_primal is None:
                new_primal, _, new_buffers, losses = out
            _write_rows(new, rows, out[1])
        return new_primal, new, new_buffers, losses

    def _approx(self, count, lr, grads, in_batch, injections):
        old = self._tangents["approx"]
        primals = (self.params, grads, self.state.slots)
        new = _empty_like(old)
        for rows in _chunks(len(self.tracked), self.chunk_size * 64):
            t_params, _, t_slots = _rows(old, rows)
            size = rows.stop - rows.start
            t_grads = {n: g.new_zeros((size, *g.shape)) for n, g in grads.items()}
            here = (in_batch >= rows.start) & (in_batch < rows.stop)
            for n, injected in injections.items():
                t_grads[n][in_batch[here] - rows.start] = injected[here]
            tangents = (t_params, t_grads, t_slots)
            d_params, d_slots = rule_tangents(self.rule, count, lr, primals, tangents)
            _write_rows(new, rows, (d_params, {}, d_slots))
        return new

    # ---------------------------------------------------------------- results

    def _resolve_mode(self, mode: str | None, where: str) -> str:
        if mode is None:
            if self.mode == "both":
                raise ValueError(
                    f"{where}: this Tracker runs mode='both'; pass mode='exact' or "
                    "mode='approx' to say which hypergradients to use."
                )
            return self.mode
        check_mode(mode, ("exact", "approx"), where)
        if mode not in self.modes:
            raise ValueError(
                f"{where}: this Tracker was built with mode={self.mode!r}, so it "
                f"has no {mode!r} hypergradients. Build it with mode='both' to "
                "get both."
            )
        return mode

    def hypergradients(self, mode: str | None = None) -> Params:
        """``d w_T / d sample_weight_i`` for every tracked sample.

        Args:
            mode: ``"exact"`` or ``"approx"``; needed only for ``mode="both"``.

        Returns:
            Parameter name -> ``(K, *param.shape)``, rows in the order of
            :attr:`tracked`.
        """
        return self.tangents(mode)[0]

    def tangents(self, mode: str | None = None):
        """``(d params, d float buffers, d slots)``, each leaf ``(K, *shape)``.

        The buffer tangents are empty in approx mode, where the network is
        evaluated without tangents.
        """
        mode = self._resolve_mode(mode, "Tracker.tangents")
        if mode == "approx" and self._deferred is not None:
            # A copy: the deferred state is updated in place by later steps.
            state = self._deferred.materialize().clone()
            params = _unflatten(state[:, 0], self.params)
            slots = {
                s: _unflatten(state[:, 1 + i], self.state.slots[s])
                for i, s in enumerate(self._deferred.slot_names)
            }
            return params, {}, slots
        return self._tangents[mode]

    def contributions(
        self,
        inputs: Tensor,
        targets: Tensor,
        *,
        mode: str | None = None,
        batch_size: int = 256,
    ) -> Tensor:
        """``C(z, i) = -grad_w loss(z) . d w_T / d sample_weight_i``.

        Positive means up-weighting training sample ``i`` lowers the test loss
        of ``z``: ``i`` helps ``z``. Test losses are taken in eval mode; in
        exact mode the BatchNorm running statistics' tangents are included.
        Leaving ``i`` out (``sample_weight_i = -1 / N``) changes the loss
        of ``z`` by about ``+C(z, i) / N``.

        Args:
            inputs: ``(n, ...)`` test inputs.
            targets: ``(n, ...)`` their targets.
            mode: ``"exact"`` or ``"approx"``; needed only for ``mode="both"``.
            batch_size: Test points per block (bounds memory).

        Returns:
            ``(n, K)``, columns in the order of :attr:`tracked`.
        """
        from hypergrad.attribution import contributions

        mode = self._resolve_mode(mode, "Tracker.contributions")
        check_test_points(inputs, targets, "Tracker.contributions")
        t_params, t_buffers, _ = self.tangents(mode)
        return contributions(
            self.fmodel,
            self.loss_fn,
            self.params,
            self.buffers,
            t_params,
            t_buffers,
            inputs.to(self.device),
            targets.to(self.device),
            batch_size=batch_size,
        )

    def state_dict(self) -> dict[str, Tensor]:
        """The trained weights and buffers under the module's own names."""
        return {**self.params, **self.fmodel.frozen, **self.buffers}

    def load_into(self, module: nn.Module) -> nn.Module:
        """Copies the trained weights and buffers into ``module``; returns it."""
        module.load_state_dict(self.state_dict(), strict=False)
        return module


class _RngReplay:
    """Replays one random state for every evaluation of a step.

    The primal and every chunk of tangents must see the same dropout mask.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        yield


def _check_finite(named: dict[str, Tensor], where: str):
    """Raises ValueError naming the first tensor with a NaN or an infinity."""
    tensors = [t for t in named.values() if t.numel()]
    peaks = torch.stack(torch._foreach_norm(tensors, float("inf"))) if tensors else None
    if peaks is None or bool(torch.isfinite(peaks).all()):
        return
    what = next(
        n for n, t in named.items() if t.numel() and not torch.isfinite(t).all()
    )
    raise ValueError(
        f"{where}: the {what} is not finite. The Tracker keeps the state of the "
        "last good step; lower the learning rate or check the inputs of this "
        "batch."
    )


def _chunks(total: int, size: int):
    """Consecutive slices of ``range(total)`` of at most ``size`` rows."""
    return [slice(a, min(a + size, total)) for a in range(0, total, size)]


def _rows(tangents, rows: slice):
    """Views of rows ``rows`` of a ``(params, buffers, slots)`` tangent set."""
    params, buffers, slots = tangents
    return (
        {n: t[rows] for n, t in params.items()},
        {n: t[rows] for n, t in buffers.items()},
        {s: {n: t[rows] for n, t in tree.items()} for s, tree in slots.items()},
    )


def _empty_like(tangents):
    """Uninitialised storage for a tangent set of the same shapes."""
    params, buffers, slots = tangents
    return (
        {n: torch.empty_like(t) for n, t in params.items()},
        {n: torch.empty_like(t) for n, t in buffers.items()},
        {
            s: {n: torch.empty_like(t) for n, t in tree.items()}
            for s, tree in slots.items()
        },
    )


def _write_rows(tangents, rows: slice, piece):
    """Copies a chunk's new tangents into rows ``rows`` of a tangent set."""
    for into, source in zip(_flat_trees(tangents), _flat_trees(piece), strict=True):
        for name, t in source.items():
            into[name][rows] = t


def _flat_trees(tangents):
    params, buffers, slots = tangents
    return [params, buffers, *(slots[s] for s in sorted(slots))]


def _detach(slots: dict[str, Params]) -> dict[str, Params]:
    return {s: {n: t.detach() for n, t in tree.items()} for s, tree in slots.items()}


def _flatten(tree: Params) -> Tensor:
    return torch.cat([rearrange(t, "k ... -> k (...)") for t in tree.values()], dim=1)


def _unflatten(flat: Tensor, like: Params) -> Params:
    out, at = {}, 0
    for name, ref in like.items():
        out[name] = flat[:, at : at + ref.numel()].reshape(-1, *ref.shape)
        at += ref.numel()
    return out
