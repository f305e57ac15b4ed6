"""Weights & Biases logging for hypergrad runs.

`WandbLogger` serves both the `hypergrad` command and a user's own training
loop. It logs under fixed keys (the `KEY_*` constants below), so two runs
overlay in the W&B UI, and every metric is plotted against the training step
`KEY_STEP`, so values may arrive out of order (an error curve computed after
training, say).

Everything W&B writes stays under `out_dir`: the run folder, and also its
cache, config, data and artifact folders (`out_dir/wandb/cache`, `config`,
`data`, `artifacts`), which W&B would otherwise put under the home folder.
W&B reads those folders from environment variables, so the logger sets them
around each W&B call and then puts back what was there; this is not
thread-safe. Offline mode is chosen up front, never tried after online, and
it also turns off W&B's system metrics, hardware probes and error reports,
so an offline run opens no network connection (under strace, wandb 0.31
connects only to its own service, over a Unix socket). W&B's console output
is off in every mode.

Example::

    with WandbLogger("runs/mnist", mode="offline", config=vars(args)) as logger:
        for step, (loss, lr) in enumerate(trajectory):
            logger.log_step(step, loss=loss, lr=lr)
        for step, (abs_error, rel_error, cosine) in enumerate(error_curve):
            logger.log_approximation_error(step, abs_error, rel_error, cosine)
        logger.log_rankings(contributions[0], images, labels, indices=tracked)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ._checks import (
    RankedRow,
    check_image,
    check_key,
    rank_samples,
    to_scalar,
    to_step,
    to_vector,
)
from ._wandb_records import wait_until_closed
from ._wandb_setup import (
    confined_environment,
    import_wandb,
    quiet_settings,
    scoped_environment,
)

MODES = ("offline", "online", "disabled")
"""The accepted values of `WandbLogger(mode=...)`."""

KEY_STEP = "step"
"""The x-axis of every metric: the training step."""

TRAIN_PREFIX = "train/"
"""Prefix of everything `log_step` logs; `log_step(..., acc=x)` is train/acc."""

KEY_TRAIN_LOSS = "train/loss"
KEY_TRAIN_LR = "train/lr"

KEY_APPROX_ABS = "approx_error/abs"
"""`||nabla_exact - nabla_approx||` at a step."""

KEY_APPROX_REL = "approx_error/rel"
"""The absolute error divided by `||nabla_exact||`."""

KEY_APPROX_COSINE = "approx_error/cosine"
"""Cosine similarity between the exact and the approximate hypergradient."""

KEY_APPROX_BOUND = "approx_error/bound"
"""An upper bound on the absolute error, when one is known."""

KEY_TOP_HELPFUL = "influence/top_helpful"
"""Table of the training samples with the largest positive contribution."""

KEY_TOP_HARMFUL = "influence/top_harmful"
"""Table of the training samples with the most negative contribution."""

RANKING_COLUMNS = ("rank", "index", "contribution", "label", "image")
"""Columns of the ranking tables; label and image only when given."""


class WandbLogger:
    """Logs training curves, approximation errors and rankings to W&B.

    Args:
        out_dir: Folder of the run's output; W&B writes under
            `out_dir/wandb/` only. Not created in disabled mode.
        mode: "offline" writes a local run that `wandb sync` can upload
            later; "online" streams to the W&B server (needs a login);
            "disabled" makes every method a no-op, writes nothing and does
            not need wandb installed.
        project: W&B project name.
        name: Run name; None lets W&B choose one.
        config: Hyperparameters to store with the run.
        tags: Run tags.

    Raises:
        ValueError: If `mode` is not one of `MODES`.
        TypeError: If `config` is not a mapping or `tags` is a single str.
        ImportError: If wandb is needed but not installed.

    Example:
        >>> logger = WandbLogger("out", mode="disabled")
        >>> logger.log_step(0, loss=2.3, lr=0.1)  # does nothing
        >>> logger.finish()
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        mode: str = "offline",
        project: str = "hypergrad",
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        tags: Sequence[str] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(
                f"WandbLogger: expected mode to be one of {', '.join(MODES)}, "
                f"got {mode!r}. Use 'offline' for a local run, 'online' to "
                "stream to W&B, or 'disabled' to turn logging off."
            )
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(
                "WandbLogger: expected config to be a mapping (e.g. a dict), "
                f"got {type(config).__name__}. Use vars(args) for argparse."
            )
        if isinstance(tags, str) or (
            tags is not None and not all(isinstance(tag, str) for tag in tags)
        ):
            raise TypeError(
                f"WandbLogger: expected tags to be a list of str, got {tags!r}. "
                "Wrap a single tag in a list: tags=['mnist']."
            )

        self.out_dir = Path(out_dir)
        self.mode = mode
        self._run: Any = None
        self._finished = False
        self._wandb: ModuleType | None = None
        self._env: dict[str, str] = {}
        self._run_dir: Path | None = None
        self._run_file: Path | None = None
        if mode == "disabled":
            return

        self._wandb = import_wandb()
        self._env = confined_environment(self.out_dir, mode)
        with self._scoped_env():
            self._run = self._wandb.init(
                dir=str(self.out_dir),
                mode=mode,
                project=project,
                name=name,
                config=dict(config or {}),
                tags=list(tags) if tags is not None else None,
                settings=quiet_settings(self._wandb, mode),
            )
            self._run.define_metric(KEY_STEP)
            self._run.define_metric("*", step_metric=KEY_STEP)
        self._run_file = Path(self._run.settings.sync_file)
        self._run_dir = self._run_file.parent

    @property
    def enabled(self) -> bool:
        """Whether this logger writes anything (False in disabled mode)."""
        return self.mode != "disabled"

    @property
    def run(self) -> Any:
        """The underlying `wandb.Run`, or None when disabled or finished."""
        return self._run

    @property
    def run_dir(self) -> Path | None:
        """The run's own folder under `out_dir/wandb/`, or None if disabled.

        It holds the run file and, under `files/`, the logged media.
        """
        return self._run_dir

    @property
    def run_file(self) -> Path | None:
        """The run file `run-<id>.wandb` that `wandb sync` uploads.

        None if disabled. Offline, it is complete once `finish()` returns.
        """
        return self._run_file

    def log_step(
        self,
        step: int,
        loss: Any = None,
        lr: Any = None,
        **extra: Any,
    ) -> None:
        """Log one training step's scalars.

        Args:
            step: The training step, counted from 0.
            loss: The batch loss, logged as `KEY_TRAIN_LOSS`.
            lr: The learning rate used at this step, as `KEY_TRAIN_LR`.
            **extra: More scalars, each logged as `train/<name>`. None values
                are skipped.

        Raises:
            TypeError: If a value is not a number.
            ValueError: If a value has more than one element.
        """
        where = "WandbLogger.log_step"
        step = to_step(where, step)
        payload = {}
        for key, value in (("loss", loss), ("lr", lr), *extra.items()):
            if value is not None:
                payload[TRAIN_PREFIX + key] = to_scalar(where, key, value)
        self._log(where, payload, step)

    def log_approximation_error(
        self,
        step: int,
        abs_error: Any,
        rel_error: Any,
        cosine: Any,
        bound: Any = None,
    ) -> None:
        """Log how far the approx hypergradient is from the exact one.

        Args:
            step: The training step, counted from 0.
            abs_error: `||e_t||` with `e_t = nabla_exact - nabla_approx`.
            rel_error: `||e_t|| / ||nabla_exact||`.
            cosine: Cosine similarity of the two hypergradients.
            bound: Optional upper bound on `||e_t||` (e.g. Theorem 1).

        Raises:
            TypeError: If a value is not a number.
            ValueError: If a value has more than one element.
        """
        where = "WandbLogger.log_approximation_error"
        step = to_step(where, step)
        payload = {
            KEY_APPROX_ABS: to_scalar(where, "abs_error", abs_error),
            KEY_APPROX_REL: to_scalar(where, "rel_error", rel_error),
            KEY_APPROX_COSINE: to_scalar(where, "cosine", cosine),
        }
        if bound is not None:
            payload[KEY_APPROX_BOUND] = to_scalar(where, "bound", bound)
        self._log(where, payload, step)

    def log_rankings(
        self,
        contributions: Any,
        images: Any = None,
        labels: Any = None,
        *,
        indices: Any = None,
        top_k: int = 10,
        step: int | None = None,
        test_name: str | None = None,
    ) -> None:
        """Log the most helpful and most harmful training samples as tables.

        Logs `KEY_TOP_HELPFUL` (largest positive contributions first) and
        `KEY_TOP_HARMFUL` (most negative first), tables with the columns of
        `RANKING_COLUMNS`; images appear as `wandb.Image` cells.

        Args:
            contributions: `C(z, i)` for one test point z, shape
                `(num_tracked,)`; or table rows, mappings with the keys
                'index', 'contribution' and optionally 'label' and 'image'.
            images: None, or one image per contribution: an array or tensor
                of shape `(num_tracked, H, W)` or `(num_tracked, C, H, W)`,
                or a sequence of paths, PIL images or arrays.
            labels: None, or the training label of each contribution, shape
                `(num_tracked,)`.
            indices: Training-set index of each contribution, shape
                `(num_tracked,)`; default 0..num_tracked-1.
            top_k: How many samples each table keeps.
            step: The training step to file the tables under; default the
                last logged step.
            test_name: Names the test point when several are logged; the
                keys become `influence/top_helpful/<test_name>`.

        Raises:
            ValueError: On mismatched lengths, non-finite contributions,
                rows mixed with `images`/`labels`/`indices`, or `top_k < 1`.
        """
        where = "WandbLogger.log_rankings"
        if step is not None:
            step = to_step(where, step)
        suffix = "" if test_name is None else "/" + check_key(where, test_name)
        helpful, harmful = rank_samples(
            where, contributions, images, labels, indices, top_k
        )
        if not self._active(where):
            return
        both = helpful + harmful
        with_label = any(row.label is not None for row in both)
        with_image = any(row.image is not None for row in both)
        payload = {
            KEY_TOP_HELPFUL + suffix: self._table(helpful, with_label, with_image),
            KEY_TOP_HARMFUL + suffix: self._table(harmful, with_label, with_image),
        }
        self._log(where, payload, step)

    def log_histogram(
        self,
        name: str,
        values: Any,
        step: int | None = None,
        num_bins: int = 64,
    ) -> None:
        """Log the distribution of some values (e.g. self-influence scores).

        Args:
            name: The metric key, e.g. "influence/self_influence".
            values: Finite numbers of any shape; flattened.
            step: The training step; default the last logged step.
            num_bins: Number of bins, 1 to 512.

        Raises:
            ValueError: If `values` is empty or not finite, or `num_bins` is
                out of range.
        """
        where = "WandbLogger.log_histogram"
        check_key(where, name)
        if step is not None:
            step = to_step(where, step)
        if isinstance(num_bins, bool) or not isinstance(num_bins, int):
            raise TypeError(f"{where}: expected an int num_bins, got {num_bins!r}.")
        if not 1 <= num_bins <= 512:
            raise ValueError(
                f"{where}: expected 1 <= num_bins <= 512 (the W&B limit), got "
                f"{num_bins}."
            )
        if hasattr(values, "detach"):
            values = values.detach().cpu().numpy()
        flat = to_vector(where, "values", np.asarray(values).reshape(-1))
        if flat.size == 0:
            raise ValueError(f"{where}: got no values for {name!r}.")
        finite = np.isfinite(flat)
        if not finite.all():
            raise ValueError(
                f"{where}: expected finite values for {name!r}, got "
                f"{int(flat.size - finite.sum())} NaN or infinite of "
                f"{flat.size}. Drop them first, e.g. values[values.isfinite()]."
            )
        if not self._active(where):
            return
        histogram = self._wandb.Histogram(flat, num_bins=num_bins)
        self._log(where, {name: histogram}, step)

    def log_image(
        self,
        name: str,
        image: Any,
        step: int | None = None,
        caption: str | None = None,
    ) -> None:
        """Log one image: a saved plot, a matplotlib figure or an array.

        Args:
            name: The metric key, e.g. "plots/error_curve".
            image: A path to an image file, a matplotlib figure, a PIL image,
                or an array or tensor of shape `(H, W)`, `(H, W, C)` or
                `(C, H, W)`.
            step: The training step; default the last logged step.
            caption: Text shown under the image.

        Raises:
            FileNotFoundError: If `image` is a path with no file.
            ValueError: If an array image has the wrong number of dimensions.
        """
        where = "WandbLogger.log_image"
        check_key(where, name)
        if step is not None:
            step = to_step(where, step)
        source = check_image(where, image)
        if not self._active(where):
            return
        with self._scoped_env():
            picture = self._wandb.Image(source, caption=caption)
        self._log(where, {name: picture}, step)

    def log_table(
        self,
        name: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        step: int | None = None,
    ) -> None:
        """Log a plain table of numbers and strings (detection curves, ...).

        Args:
            name: The metric key, e.g. "debug/retrain".
            columns: Column names.
            rows: One sequence of ``len(columns)`` values per row.
            step: The training step; default the last logged step.

        Raises:
            ValueError: If a row's length differs from the number of columns.
        """
        where = "WandbLogger.log_table"
        check_key(where, name)
        if step is not None:
            step = to_step(where, step)
        columns, rows = list(columns), [list(row) for row in rows]
        bad = next((r for r in rows if len(r) != len(columns)), None)
        if bad is not None:
            raise ValueError(
                f"{where}: expected {len(columns)} values per row for columns "
                f"{columns}, got a row of {len(bad)}: {bad!r}."
            )
        if not self._active(where):
            return
        with self._scoped_env():
            table = self._wandb.Table(columns=columns, data=rows)
        self._log(where, {name: table}, step)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Set run-level results (final accuracy, detection precision, ...).

        Args:
            values: Keys and values to merge into the run's summary.

        Raises:
            TypeError: If `values` is not a mapping with str keys.
        """
        where = "WandbLogger.summary"
        if not isinstance(values, Mapping) or not all(
            isinstance(key, str) for key in values
        ):
            raise TypeError(
                f"{where}: expected a mapping with str keys, got {values!r}. "
                "Pass a dict such as {'test/accuracy': 0.99}."
            )
        if not self._active(where):
            return
        with self._scoped_env():
            self._run.summary.update(dict(values))

    def finish(self, exit_code: int | None = None, timeout: float = 30.0) -> None:
        """Finish the run; offline, also wait until its run file is complete.

        Later calls do nothing. W&B closes the run file a moment after its
        own `finish()` returns; in offline mode this waits for that, so the
        file can be read or synced as soon as this returns. (Online, W&B's
        `finish()` already waits for the upload.)

        Args:
            exit_code: 0 marks the run finished, anything else failed; None
                lets W&B decide.
            timeout: Seconds to wait at most for the run file.

        Raises:
            TimeoutError: If W&B did not complete the run file in time.
        """
        run, self._run = self._run, None
        self._finished = True
        if run is None:
            return
        with self._scoped_env():
            run.finish(exit_code=exit_code)
        if self.mode == "offline" and not wait_until_closed(self._run_file, timeout):
            raise TimeoutError(
                f"WandbLogger.finish: W&B did not complete {self._run_file} "
                f"within {timeout} s, so the run may lack its last records. "
                "Check the W&B logs under out_dir/wandb/, or pass a larger "
                "timeout."
            )

    def __enter__(self) -> WandbLogger:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    def _scoped_env(self) -> contextlib.AbstractContextManager[None]:
        """Confine W&B's folders to out_dir for the duration of a call."""
        return scoped_environment(self._env)

    def _active(self, where: str) -> bool:
        """Whether to log now; raises after finish() unless disabled."""
        if self.mode == "disabled":
            return False
        if self._finished:
            raise RuntimeError(
                f"{where}: the run was already finished. Create a new "
                "WandbLogger to log another run."
            )
        return True

    def _log(self, where: str, payload: dict[str, Any], step: int | None) -> None:
        """Log `payload`, filed under `step` when given."""
        if not self._active(where) or not payload:
            return
        if step is not None:
            payload = {KEY_STEP: step, **payload}
        with self._scoped_env():
            self._run.log(payload)

    def _table(self, rows: list[RankedRow], with_label: bool, with_image: bool) -> Any:
        """Build a `wandb.Table` of ranked rows with the given columns."""
        columns = [
            column
            for column in RANKING_COLUMNS
            if (column != "label" or with_label) and (column != "image" or with_image)
        ]
        data = []
        with self._scoped_env():
            for row in rows:
                cells: list[Any] = [row.rank, row.index, row.contribution]
                if with_label:
                    cells.append(row.label)
                if with_image and row.image is None:
                    cells.append(None)
                elif with_image:
                    caption = f"#{row.index}: {row.contribution:.3g}"
                    cells.append(self._wandb.Image(row.image, caption=caption))
                data.append(cells)
            return self._wandb.Table(columns=columns, data=data)
