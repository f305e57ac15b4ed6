"""The main job: train on real data with tracking, then write what it found.

This is the edge of the library: it reads data, shows progress, writes files
and talks to Weights & Biases. The core (``hypergrad.tracker`` and below)
knows nothing of it.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import hypergrad as hg
from hypergrad.jobsetup import (  # noqa: F401 - re-exported for the CLI
    DATASETS,
    MODELS,
    OPTIMIZERS,
    PRESETS,
    SCHEDULES,
    JobError,
    RunConfig,
    available_memory_bytes,
    choose_tracked,
    load_data,
    loss_fn,
    make_model,
    make_rule,
    make_splits,
    tracked_memory_bytes,
    validate_config,
)


def peak_factor(mode: str, scalar_linear: bool) -> float:
    """Peak memory of a step over the tangent state, as measured on LeNet-5.

    A step keeps the old tangents while it writes the new ones, plus one
    chunk's working memory: 2.6x measured in exact mode at K = 1,000 (3.0 is
    used); both mode and the general approx path were 4.6x and 5x before the
    new tangents were written in place (5 is used); the closed form of approx
    mode updates in place (1.1x). See benchmarks/README.md.
    """
    if mode == "approx":
        return 1.1 if scalar_linear else 5.0
    return 3.0 if mode == "exact" else 5.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise JobError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def _accuracy(tracker_or_model, x, y, device, batch=512) -> float:
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch):
            out = tracker_or_model(x[start : start + batch].to(device))
            correct += int((out.argmax(1).cpu() == y[start : start + batch]).sum())
    return correct / max(1, len(x))


def _batches(num: int, batch_size: int, epochs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        yield epoch, torch.randperm(num, generator=g).split(batch_size)


class _Csv:
    """A CSV written row by row and flushed, so an interrupt leaves it readable."""

    def __init__(self, path: Path, columns):
        self.file = path.open("w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(columns)
        self.file.flush()

    def row(self, *values):
        self.writer.writerow(values)
        self.file.flush()

    def close(self):
        self.file.close()


def _write_json(path: Path, payload: dict):
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(value):
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def run(config: RunConfig, *, progress: bool = True) -> dict:
    """Trains with tracking and writes every output into ``config.out``.

    Returns the summary (also written to ``summary.json``).
    """
    from hypergrad.integrations.wandb import WandbLogger
    from hypergrad.report import save_state, write_report

    validate_config(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    pool_x, pool_y, test_x, test_y = load_data(config)
    sets, split = make_splits(config, pool_x, pool_y, test_x, test_y)
    train_x, train_y = sets["train"]
    num_train = len(train_x)
    model = make_model(config, tuple(train_x.shape[1:])).to(device)
    tracked = choose_tracked(config, num_train)
    steps_per_epoch = math.ceil(num_train / config.batch_size)
    rule, schedule = make_rule(config, steps_per_epoch)

    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    num_buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    slots = len(rule.init({"w": torch.zeros(1)}).slots)
    need = tracked_memory_bytes(
        num_params, slots, len(tracked), num_buffers, config.mode, torch.float32
    )
    have = available_memory_bytes(device)
    peak = need * peak_factor(config.mode, rule.scalar_linear)
    if peak > 0.8 * have:
        raise JobError(
            f"tracking {len(tracked)} samples of a {num_params:,}-parameter model in "
            f"mode {config.mode} needs about {need / 2**30:.1f} GiB of tangent "
            f"state and about {peak / 2**30:.1f} GiB at the peak of a step, more "
            f"than the {have / 2**30:.1f} GiB available; lower --track or use "
            "--mode approx"
        )

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "config": dataclasses.asdict(config),
        "status": "running",
        "num_train": num_train,
        "num_params": num_params,
        "tracked_state_bytes": need,
        "tracked_positions": tracked,
        "tracked_indices": split["train"][tracked],
        "device": str(device),
    }
    _write_json(out / "summary.json", summary)

    tracker, logger, curve, bar = None, None, None, None
    try:
        tracker = hg.Tracker(
            model,
            loss_fn,
            rule,
            num_train=num_train,
            tracked=tracked,
            mode=config.mode,
            chunk_size=config.chunk_size,
        )
        logger = WandbLogger(
            out, mode=config.wandb, name=out.name, config=dataclasses.asdict(config)
        )
        if config.mode == "both":
            columns = ["step", "abs_error", "rel_error", "cosine"]
            curve = _Csv(out / "approximation_error.csv", columns)
        bar = _progress(steps_per_epoch * config.epochs, progress)
        start = time.perf_counter()
        _train(tracker, rule, schedule, sets, config, logger, curve, bar, device)
        summary["train_seconds_tracked"] = time.perf_counter() - start
        bar.close()
        summary["steps"] = tracker.step_count
        summary["train_seconds_plain"] = _plain_training_seconds(
            config, model, sets["train"], device
        )
        summary.update(write_report(tracker, sets, split, config, out, logger, device))
        summary["status"] = "finished"
        logger.summary(
            {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        )
    except KeyboardInterrupt:
        summary["status"] = "interrupted"
        raise
    except BaseException as error:
        summary["status"] = "failed"
        summary["error"] = f"{type(error).__name__}: {error}"
        raise
    finally:
        if bar is not None:
            bar.close()
        if curve is not None:
            curve.close()
        if tracker is not None:
            summary["steps"] = tracker.step_count
            if summary["status"] != "finished" and tracker.step_count:
                # Nothing computed is lost: the weights and hypergradients so far.
                save_state(tracker, split, out / "state.pt")
        _write_json(out / "summary.json", summary)
        if logger is not None:
            logger.finish(exit_code=0 if summary["status"] == "finished" else 1)
    return summary


def _train(tracker, rule, schedule, sets, config, logger, curve, bar, device):
    """The training loop: steps, per-step logs, the plateau rule per epoch."""
    train_x, train_y = sets["train"]
    num_train = len(train_x)
    for _epoch, order in _batches(
        num_train, config.batch_size, config.epochs, config.seed
    ):
        epoch_loss = 0.0
        for b in order:
            lr = float(rule.lr(tracker.state.count))
            loss = tracker.step(train_x[b], train_y[b], b)
            epoch_loss += loss * len(b)
            step = tracker.step_count - 1
            logger.log_step(step, loss=loss, lr=lr)
            if curve is not None:
                err = hg.approximation_error(tracker)
                curve.row(step, err["abs_error"], err["rel_error"], err["cosine"])
                logger.log_approximation_error(step, **err)
            bar.update(loss, lr)
        if isinstance(schedule, hg.schedules.ReduceOnPlateau):
            val_x, val_y = sets["val"]
            val_loss = _mean_loss(tracker, val_x, val_y, device)
            schedule.step(epoch_loss / num_train + val_loss)


def _mean_loss(tracker, x, y, device) -> float:
    if len(x) == 0:
        return 0.0
    model = tracker.load_into(tracker.fmodel.module).eval()
    with torch.no_grad():
        return float(loss_fn(model(x.to(device)), y.to(device)).mean())


def _plain_training_seconds(config, model, train_set, device) -> float:
    """Wall time of the same training with torch.optim and no tracking."""
    net = copy.deepcopy(model).train()
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(
            net.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    else:
        cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
        opt = cls(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    x, y = train_set
    start = time.perf_counter()
    for _, order in _batches(len(x), config.batch_size, config.epochs, config.seed):
        for b in order:
            opt.zero_grad()
            loss_fn(net(x[b].to(device)), y[b].to(device)).mean().backward()
            opt.step()
    return time.perf_counter() - start


class _progress:
    """A tqdm bar on stderr (step, loss, lr, time left), or nothing."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(
                    total=total, unit="step", file=sys.stderr, dynamic_ncols=True
                )

    def update(self, loss: float, lr: float):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
