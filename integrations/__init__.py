"""Loggers that send hypergrad's metrics to experiment trackers.

The core library never imports this package. Each logger imports its
tracker lazily, so importing this package needs no tracker installed.
"""

from .wandb import WandbLogger

__all__ = ["WandbLogger"]
