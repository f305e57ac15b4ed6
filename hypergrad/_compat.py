"""Workarounds for the installed PyTorch, each in one place."""

from __future__ import annotations

import functools
import warnings


@functools.cache
def quiet_forward_ad() -> None:
    """Loads torch's forward-mode decompositions once, without its warning.

    The first ``jvp`` of a process imports ``torch._decomp.
    decompositions_for_jvp``, which calls the deprecated ``torch.jit.script``
    and so emits a FutureWarning that is torch's own, not the caller's.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit\.script.*", category=FutureWarning
        )
        try:
            from torch._decomp import decompositions_for_jvp  # noqa: F401
        except ImportError:  # a torch without it has nothing to load
            pass
