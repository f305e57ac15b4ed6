"""An ``nn.Module`` as a pure function of parameters, buffers and inputs.

``FunctionalModel`` wraps a private copy of the module and calls it with
``torch.func.functional_call`` under strict keys, so a misspelled or missing
name is an error rather than a silent fall-back to the module's own tensor.

BatchNorm layers are the one place where a module mutates state during the
forward pass. Inside a ``FunctionalModel`` their forward is replaced by an
out-of-place one: in train mode it normalises with the batch statistics and
*returns* the new running statistics instead of writing them, so that
``jvp`` can carry tangents through them; in eval mode it normalises with
the running statistics passed in, differentiably in them.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]


class FunctionalModel:
    """A pure ``apply(params, buffers, inputs, train=...)`` for a module.

    Args:
        module: Any ``nn.Module``. It is copied; the original is never
            modified.

    Attributes:
        param_names: Names of the trainable parameters (``requires_grad``),
            tied parameters listed once.
        frozen: Parameters with ``requires_grad=False``: constants of the
            trajectory, never updated and carrying no tangent.
        float_buffer_names: Floating-point buffers (BatchNorm running
            statistics, ...), which may carry tangents.
        rows_independent: False when a layer couples the rows of a batch in
            train mode (BatchNorm); the Tracker then takes per-sample
            gradients through the whole batch.
    """

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"hypergrad: expected an nn.Module, got {type(module).__name__}."
            )
        self.module = copy.deepcopy(module)
        named = dict(self.module.named_parameters())
        self.param_names = [n for n, p in named.items() if p.requires_grad]
        self.frozen = {n: p.detach() for n, p in named.items() if not p.requires_grad}
        buffers = dict(self.module.named_buffers())
        self.float_buffer_names = [
            n for n, b in buffers.items() if b.is_floating_point()
        ]
        self._updates: dict[str, Tensor] | None = None
        self.rows_independent = True
        for prefix, sub in self.module.named_modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.forward = types.MethodType(_make_bn_forward(self, prefix), sub)
                self.rows_independent = False

    def initial_params(self) -> Params:
        """Detached copies of the trainable parameters."""
        named = dict(self.module.named_parameters())
        return {n: named[n].detach().clone() for n in self.param_names}

    def initial_buffers(self) -> Params:
        """Detached copies of all buffers."""
        return {n: b.detach().clone() for n, b in self.module.named_buffers()}

    def __call__(
        self, params: Params, buffers: Params, inputs: Tensor, *, train: bool
    ) -> tuple[Tensor, Params]:
        """Runs the module on ``inputs``.

        Args:
            params: Trainable parameters by name.
            buffers: All buffers by name.
            inputs: The batch, passed as the module's single positional input.
            train: Train mode (batch statistics, dropout) or eval mode.

        Returns:
            ``(outputs, new_buffers)``: in train mode ``new_buffers`` holds the
            updated running statistics (and ``num_batches_tracked`` advanced
            once); in eval mode it is ``buffers`` itself.
        """
        self.module.train(train)
        self._updates = {}
        try:
            outputs = functional_call(
                self.module,
                {**params, **self.frozen, **buffers},
                (inputs,),
                strict=True,
            )
            updates = self._updates
        finally:
            self._updates = None
        if not updates:
            return outputs, buffers
        return outputs, {**buffers, **updates}


def _make_bn_forward(owner: FunctionalModel, prefix: str):
    """An out-of-place BatchNorm forward that reports its running statistics."""
    key = f"{prefix}." if prefix else ""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            scale = torch.rsqrt(self.running_var + self.eps).reshape(shape)
            out = (x - self.running_mean.reshape(shape)) * scale
            if self.affine:
                out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
            return out
        out = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if self.training and self.running_mean is not None:
            dims = [0, *range(2, x.dim())]
            count = self.num_batches_tracked + 1
            factor = 1.0 / count if self.momentum is None else self.momentum
            mean = x.mean(dims)
            var = x.var(dims, correction=1)
            owner._updates[key + "running_mean"] = (
                1 - factor
            ) * self.running_mean + factor * mean
            owner._updates[key + "running_var"] = (
                1 - factor
            ) * self.running_var + factor * var
            owner._updates[key + "num_batches_tracked"] = count
        return out

    return forward
