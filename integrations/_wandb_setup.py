"""Start W&B so that it stays quiet and writes only inside one folder.

W&B puts its cache, config, data (artifact staging) and artifact folders
under the home folder unless the environment variables below say otherwise,
and it reads some of them at the moment a file is written, not only at
`wandb.init`. So the logger sets them around every W&B call and then puts
back whatever was there before.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

INSTALL_HINT = 'pip install "hypergrad[wandb]"'
"""How to install the optional wandb dependency."""

WANDB_SUBFOLDERS = {
    "WANDB_CACHE_DIR": "cache",
    "WANDB_CONFIG_DIR": "config",
    "WANDB_DATA_DIR": "data",
    "WANDB_ARTIFACT_DIR": "artifacts",
}
"""Environment variables W&B reads its folders from, and where they point,
relative to `out_dir/wandb/`."""


def import_wandb() -> ModuleType:
    """Import wandb, or raise an ImportError that says how to install it."""
    try:
        return importlib.import_module("wandb")
    except ImportError as error:
        raise ImportError(
            "WandbLogger needs the wandb package, which could not be imported "
            f"({error}). Install it with: {INSTALL_HINT}, or pass "
            'mode="disabled" to turn logging off.'
        ) from error


def confined_environment(out_dir: Path, mode: str) -> dict[str, str]:
    """Return environment variables that keep W&B's files inside out_dir.

    Creates the folders they name.

    Args:
        out_dir: The run's output folder; W&B's own folder is
            `out_dir/wandb`.
        mode: "offline" also turns off W&B's error reports, which would
            otherwise be sent over the network.
    """
    root = out_dir.resolve()
    env = {name: str(root / "wandb" / sub) for name, sub in WANDB_SUBFOLDERS.items()}
    for folder in env.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    env["WANDB_DIR"] = str(root)
    if mode == "offline":
        env["WANDB_ERROR_REPORTING"] = "false"
    return env


@contextlib.contextmanager
def scoped_environment(env: Mapping[str, str]) -> Iterator[None]:
    """Set `env` in `os.environ` for the block, then restore what was there.

    Only the names in `env` are touched, so variables W&B sets meanwhile
    (such as the address of its service) survive. Not thread-safe.
    """
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def quiet_settings(wandb: ModuleType, mode: str) -> Any:
    """Return the `wandb.Settings` of a silent run in `mode`.

    Args:
        wandb: The imported wandb module.
        mode: "offline" or "online". Offline runs also skip system metrics
            and machine probes, some of which query cloud metadata servers.
    """
    options: dict[str, Any] = {
        "silent": True,
        "quiet": True,
        "console": "off",
        "save_code": False,
        # A second init must not hand back a run that someone else started.
        "reinit": "create_new",
    }
    if mode == "offline":
        options.update(
            x_disable_stats=True,
            x_disable_meta=True,
            x_disable_machine_info=True,
        )
    return wandb.Settings(**options)
