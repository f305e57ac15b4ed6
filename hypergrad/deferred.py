"""Approximate tangents in closed form for scalar-linear update rules.

For rules such as SGD with momentum and weight decay, the approximate tangent
of one tracked sample (its hypergradient ``x`` and the tangents ``s`` of the
optimizer slots) evolves per coordinate as

    [x; s]_t = A_t [x; s]_{t-1} + c_t * g_t

where ``A_t`` and ``c_t`` are scalars (a ``(1 + m) x (1 + m)`` matrix and a
vector for ``m`` slots) shared by every coordinate and every sample, and
``g_t`` is the sample's scaled gradient when it is in the batch, zero
otherwise. Between two appearances of a sample only the small matrices
multiply, so the ``K x P`` state is touched for the tracked samples of the
batch alone: the cost of a step does not grow with K.

``A_t`` and ``c_t`` are not derived by hand: they are read off the rule by
calling its ``update`` on a probe of a few coordinates.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch
from torch import Tensor

from hypergrad.optim.base import RuleState, UpdateRule


def probe_coefficients(rule: UpdateRule, count: int, lr: float, slot_names: list[str]):
    """``(A, c)`` of the rule's tangent map at one step, as float64 arrays.

    A scalar-linear rule is affine in ``(params, grads, slots)`` with the same
    coefficients for every coordinate, so one call of ``update`` on a probe
    of ``m + 3`` coordinates (the origin and one unit vector per input) reads
    them all off: column ``j`` is the image of unit ``j`` minus the origin's.
    """
    m = len(slot_names)
    units = torch.eye(m + 2, dtype=torch.float64)
    probe = torch.cat([units.new_zeros(1, m + 2), units])  # (m + 3, m + 2)
    slots = {n: {"w": probe[:, 1 + i]} for i, n in enumerate(slot_names)}
    state = RuleState(count, slots)
    new_params, new_state = rule.update(
        {"w": probe[:, -1]}, state, {"w": probe[:, 0]}, lr
    )
    outs = [new_params["w"]] + [new_state.slots[n]["w"] for n in slot_names]
    images = torch.stack(outs)  # (m + 1, m + 3)
    matrix = (images[:, 1:] - images[:, :1]).numpy()
    return matrix[:, : m + 1].copy(), matrix[:, m + 1].copy()


class DeferredTangents:
    """The approximate tangents of K samples, updated lazily.

    Args:
        rule: A rule with ``scalar_linear=True``.
        slot_names: The rule's slot names, in a fixed order.
        num_tracked: K.
        num_params: P, the number of trainable coordinates.
        dtype, device: Of the parameters.
    """

    def __init__(self, rule, slot_names, num_tracked, num_params, dtype, device):
        self.rule = rule
        self.slot_names = list(slot_names)
        width = 1 + len(self.slot_names)
        self.state = torch.zeros(
            num_tracked, width, num_params, dtype=dtype, device=device
        )
        self.last = np.zeros(num_tracked, dtype=np.int64)  # state is as of this step
        self.step = 0
        self._starts: list[int] = []  # steps where a new run of A begins
        self._mats: list[np.ndarray] = []

    def _record(self, matrix: np.ndarray):
        if not self._mats or not np.array_equal(self._mats[-1], matrix):
            self._starts.append(self.step)
            self._mats.append(matrix)

    def _product(self, first: int, last: int) -> np.ndarray:
        """``A_last @ ... @ A_first`` (identity when ``first > last``)."""
        out = np.eye(1 + len(self.slot_names))
        run = bisect.bisect_right(self._starts, first) - 1
        at = first
        while at <= last:
            end = self._starts[run + 1] - 1 if run + 1 < len(self._starts) else last
            end = min(end, last)
            out = np.linalg.matrix_power(self._mats[run], end - at + 1) @ out
            at, run = end + 1, run + 1
        return out

    def _catch_up(self, rows: Tensor, through: int) -> Tensor:
        """Brings the given samples' state to step ``through``; returns it."""
        mats = [self._product(int(self.last[r]) + 1, through) for r in rows.tolist()]
        mats = torch.as_tensor(np.stack(mats), dtype=self.state.dtype)
        mats = mats.to(self.state.device)[..., None]  # (k, 1 + m, 1 + m, 1)
        state = self.state[rows]  # (k, 1 + m, P)
        # The inner dimension is 1 + m <= 3: sums of scaled rows beat bmm.
        return torch.stack(
            [
                sum(mats[:, i, j] * state[:, j] for j in range(state.shape[1]))
                for i in range(state.shape[1])
            ],
            dim=1,
        )

    def advance(self, count: int, lr: float, rows: Tensor, injections: Tensor):
        """Takes one step.

        Args:
            count, lr: The step's optimizer count and learning rate.
            rows: ``(k,)`` positions (in ``[0, K)``) of the tracked samples in
                the batch.
            injections: ``(k, P)`` their scaled gradients, flattened.
        """
        matrix, inject = probe_coefficients(self.rule, count, lr, self.slot_names)
        self.step += 1
        self._record(matrix)
        if rows.numel() == 0:
            return
        inject = torch.as_tensor(
            inject, dtype=self.state.dtype, device=self.state.device
        )
        # Row by row, in place: z <- A z + c g, no gather or scatter of (k, P).
        for r, g in zip(rows.tolist(), injections, strict=True):
            product = self._product(int(self.last[r]) + 1, self.step)
            product = torch.as_tensor(product, dtype=self.state.dtype)
            z = self.state[r]  # (1 + m, P), a view
            torch.mm(product.to(z.device), z.clone(), out=z)
            z.addr_(inject, g)
            self.last[r] = self.step

    def materialize(self) -> Tensor:
        """Brings every sample up to date; returns the ``(K, 1 + m, P)`` state."""
        stale = torch.from_numpy(np.flatnonzero(self.last < self.step))
        for chunk in stale.split(256) if stale.numel() else ():
            self.state[chunk] = self._catch_up(chunk, self.step)
        self.last[:] = self.step
        return self.state
