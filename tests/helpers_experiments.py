"""Shared by the experiment command tests: run one command, quiet folders."""

from __future__ import annotations

import argparse
import contextlib
import os

import pytest


def run_command(module, name: str, argv: list[str]) -> int:
    """Parses ``name argv`` with the module's own sub-parser and runs it."""
    parser = argparse.ArgumentParser(prog="hypergrad")
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([name, *argv])
    return args.func(args)


@contextlib.contextmanager
def quiet_home(home):
    """HOME, XDG and matplotlib folders under ``home``; no WANDB_ settings."""
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("WANDB_")]:
            patch.delenv(key)
        patch.setenv("HOME", str(home))
        for key in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME"):
            patch.setenv(key, str(home / key.lower()))
        patch.setenv("MPLCONFIGDIR", str(home / "mpl"))
        yield home
