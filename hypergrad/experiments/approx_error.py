"""``hypergrad approx-error``: the approx-mode error along a run, and its bound.

One trajectory of plain SGD in ``both`` mode (exact and approx tangents on
the same weights). After every step ``t`` (counted from 0 in the outputs)
it records, over the K tracked samples with ``e_i = nabla_exact_i -
nabla_approx_i`` (all trainable parameters flattened):

- ``abs_error``: the mean over i of ``||e_i||``; ``rel_error``: the mean of
  ``||e_i|| / ||nabla_exact_i||``; ``cosine``: the mean cosine of the two
  (``hypergrad.approximation_error``);
- ``bound``: the supplement's Theorem 1, ``L M_w eta_1 / (eta_t lambda)``
  (derived in :mod:`hypergrad.bounds`), evaluated with
  ``L``: the largest ``|eigenvalue|`` seen so far of a batch Hessian, each
  the Hessian of the regulariser-free mean loss of the step's batch at the
  weights before the step, estimated every ``--power-every`` steps by
  ``--power-iters`` warm-started power iterations;
  ``M_w``: the largest ``||nabla_exact_i||`` over tracked samples and steps
  so far (the current step included);
  ``lambda``: ``--weight-decay``; ``eta_1``: the rate of the first step;
  ``eta_t``: the rate of step t.

The theorem bounds each ``||e_i||``, so the largest of them is compared
with it too (``max_error_over_bound`` in ``summary.json``). ``L`` and
``M_w`` are estimates of suprema from below (a few power iterations, a
subset of the steps and K samples), so the plotted bound is the theorem's
expression at measured values, not a certified bound. The derivation
assumes momentum 0, non-increasing rates and ``eta_t lambda <= 1``; with
momentum the bound is drawn for reference only. With weight decay 0 it is
infinite and left out (an empty ``bound`` column).

At the end the exact and approx contributions to the test split are
compared by rank: Spearman and Kendall correlation over all (test, train)
pairs and per test point, and top-k overlap by absolute value. The same run
with a constant, a step and an exponential schedule (same data, batches,
initial weights and tracked samples) gives ``schedules.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

import hypergrad as hg
from hypergrad.bounds import Theorem1, batch_loss, row_norms
from hypergrad.job import resolve_device
from hypergrad.jobsetup import (
    JobError,
    RunConfig,
    choose_tracked,
    load_data,
    loss_fn,
    make_model,
    make_rule,
    make_splits,
)
from hypergrad.plots import _pyplot
from hypergrad.report import spearman, top_k_overlap

SCHEDULES = ("constant", "multistep", "exponential")
COLUMNS = ["step", "abs_error", "rel_error", "cosine", "bound"]
PNG = "approx_error.png"
POSITIVE = ("epochs", "batch_size", "track", "power_iters", "power_every", "top_k")
DEFAULTS = {"mnist": (1024, 1000, "lenet5"), "digits": (1000, 497, "cnn")}


def add_parser(subparsers):
    """Adds ``approx-error`` to argparse sub-parsers; returns the parser."""
    p = subparsers.add_parser(
        "approx-error",
        help="approximation error of approx mode along a run, with its bound",
        description="Exact vs approx hypergradients on one SGD trajectory, the "
        "supplement's Theorem 1 bound, and the effect of the schedule.",
    )
    p.add_argument("--dataset", choices=tuple(DEFAULTS), default="mnist")
    p.add_argument("--data-dir", help="folder of the MNIST IDX files")
    p.add_argument("--model", choices=("lenet5", "cnn", "mlp"))
    p.add_argument("--train-size", type=int, help="default 1024 (digits 1000)")
    p.add_argument("--test-size", type=int, help="default 1000 (digits 497)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1, help="eta_1")
    p.add_argument("--momentum", type=float, default=0.0, help="the theorem: 0")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="lambda")
    p.add_argument("--schedule", choices=SCHEDULES, default="multistep")
    p.add_argument("--milestones", type=int, nargs="*", help="epochs; default 2E//3")
    p.add_argument("--gamma", type=float, default=0.1, help="step-decay factor")
    p.add_argument("--track", type=int, default=16, help="K, tracked samples")
    p.add_argument("--power-iters", type=int, default=5, help="per evaluation")
    p.add_argument("--power-every", type=int, default=4, help="steps between")
    p.add_argument("--top-k", type=int, default=5, help="for the top-k overlap")
    p.add_argument("--no-schedules", action="store_true", help="skip schedules.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--out", default="runs/approx-error")
    p.add_argument("--wandb", choices=("offline", "disabled"), default="offline")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    return p


def config_from_args(args) -> RunConfig:
    """The run's settings as the main job's ``RunConfig``; checks them."""
    train, test, model = DEFAULTS[args.dataset]
    for name in POSITIVE:
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise JobError(f"expected {flag} >= 1, got {getattr(args, name)}")
    if not args.lr > 0 or not args.weight_decay >= 0 or not 0 <= args.momentum < 1:
        raise JobError(
            f"expected --lr > 0, --weight-decay >= 0 and 0 <= --momentum < 1, got "
            f"{args.lr}, {args.weight_decay}, {args.momentum}"
        )
    if not 0 < args.gamma <= 1:
        raise JobError(f"expected 0 < --gamma <= 1 (a decay), got {args.gamma}")
    milestones = args.milestones
    if milestones is None:
        milestones = [2 * args.epochs // 3] if args.epochs > 1 else []
    if any(not 0 < m < args.epochs for m in milestones):
        raise JobError(
            f"expected --milestones between 1 and --epochs - 1 = {args.epochs - 1}, "
            f"got {milestones}"
        )
    same = ("dataset", "data_dir", "epochs", "batch_size", "lr", "momentum")
    same += ("weight_decay", "schedule", "gamma", "track", "seed", "device", "out")
    return RunConfig(
        **{name: getattr(args, name) for name in (*same, "wandb", "top_k")},
        model=args.model or model,
        train_size=train if args.train_size is None else args.train_size,
        val_size=0,
        test_size=test if args.test_size is None else args.test_size,
        milestones=tuple(sorted(milestones)),
        mode="both",
    )


def with_schedule(config: RunConfig, name: str) -> RunConfig:
    """``config`` with schedule ``name``.

    The exponential schedule decays every step, by a factor per epoch chosen
    so that it ends at the step schedule's final rate.
    """
    if name != "exponential":
        return dataclasses.replace(config, schedule=name)
    decay = config.gamma ** (len(config.milestones) / config.epochs)
    return dataclasses.replace(config, schedule=name, gamma=decay)


CURVE = ("lr", "loss", "abs_error", "rel_error", "cosine", "max_error", "bound")
CURVE += ("hessian_norm", "tangent_norm")


def trajectory(config, data, args, *, rows=None, logger=None):
    """Trains one schedule in ``both`` mode; returns ``(curve, tracker)``.

    The curve maps each name of ``CURVE`` to one value per step; ``rows``
    receives each CSV row, ``logger`` the W&B records.
    """
    train_x, train_y, model, tracked, device = data
    steps_per_epoch = math.ceil(len(train_x) / config.batch_size)
    rule, _ = make_rule(config, steps_per_epoch)
    tracker = hg.Tracker(
        model, loss_fn, rule, num_train=len(train_x), tracked=tracked, mode="both"
    )
    first_lr = float(rule.lr(0))
    monitor = Theorem1(config.weight_decay, first_lr, args.power_iters, config.seed)
    defined = config.weight_decay > 0
    curve, start = {k: [] for k in CURVE}, time.perf_counter()
    order = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.epochs):
        for b in torch.randperm(len(train_x), generator=order).split(config.batch_size):
            x, y = train_x[b].to(device), train_y[b].to(device)
            lr = float(rule.lr(tracker.state.count))
            if tracker.state.count % args.power_every == 0:
                devices = [device] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    batch = batch_loss(tracker.fmodel, loss_fn, tracker.buffers, x, y)
                    monitor.observe_hessian(batch, tracker.params)
            loss = tracker.step(x, y, b)
            exact = tracker.hypergradients("exact")
            approx = tracker.hypergradients("approx")
            monitor.observe_tangents(exact)
            errors = row_norms({n: exact[n] - approx[n] for n in exact})
            err = hg.approximation_error(tracker)
            bound = monitor.bound(lr) if defined else None
            values = dict(lr=lr, loss=loss, **err, max_error=float(errors.max()))
            values.update(bound=bound, hessian_norm=monitor.hessian_norm)
            values.update(tangent_norm=monitor.tangent_norm)
            for key, value in values.items():
                curve[key].append(value)
            step = tracker.step_count - 1
            if rows is not None:
                rows(step, err["abs_error"], err["rel_error"], err["cosine"], bound)
            if logger is not None:
                logger.log_step(step, loss=loss, lr=lr)
                logger.log_approximation_error(step, **err, bound=bound)
        if not args.no_progress:
            bound = "undefined" if not defined else f"{curve['bound'][-1]:.3g}"
            done = f"{config.schedule} epoch {epoch + 1}/{config.epochs}"
            now = f"loss {loss:.4f}, mean ||e|| {err['abs_error']:.3g}, bound {bound}"
            seconds = f"{time.perf_counter() - start:.0f} s"
            print(f"approx-error {done}: {now}, {seconds}", file=sys.stderr)
    return curve, tracker


def rank_agreement(tracker, test_x, test_y, top_k: int) -> dict:
    """How alike the exact and approx contributions to a test set rank."""
    try:
        from scipy.stats import kendalltau
    except ImportError as error:
        raise JobError(
            'Kendall tau needs scipy: pip install "hypergrad[dev]"'
        ) from error
    ex = tracker.contributions(test_x, test_y, mode="exact").double().cpu()
    ap = tracker.contributions(test_x, test_y, mode="approx").double().cpu()
    per_row = [spearman(a, b) for a, b in zip(ex, ap, strict=True)]
    taus = [
        kendalltau(a.numpy(), b.numpy()).statistic for a, b in zip(ex, ap, strict=True)
    ]
    taus = [t for t in taus if math.isfinite(t)]
    return {
        "test_points": len(ex),
        "spearman_all": spearman(ex.flatten(), ap.flatten()),
        "spearman_per_test_point_mean": sum(per_row) / len(per_row),
        "kendall_all": float(kendalltau(ex.flatten(), ap.flatten()).statistic),
        "kendall_per_test_point_mean": sum(taus) / len(taus) if taus else None,
        f"top{top_k}_overlap": top_k_overlap(ex, ap, top_k),
    }


def _curve_summary(curve: dict) -> dict:
    pairs = zip(curve["max_error"], curve["bound"], strict=True)
    ratios = [_ratio(e, b) for e, b in pairs if b is not None]
    return {
        "steps": len(curve["lr"]),
        "final_lr": curve["lr"][-1],
        "final_abs_error": curve["abs_error"][-1],
        "final_rel_error": curve["rel_error"][-1],
        "final_cosine": curve["cosine"][-1],
        "final_bound": curve["bound"][-1],
        "hessian_norm_max": curve["hessian_norm"][-1],
        "tangent_norm_max": curve["tangent_norm"][-1],
        "max_error_over_bound": max(ratios) if ratios else None,
        "error_below_bound_at_every_step": all(r <= 1 for r in ratios)
        if ratios
        else None,
    }


def _ratio(error: float, bound: float) -> float:
    # The bound is 0 before any tracked sample was in a batch; so is the error.
    return error / bound if bound > 0 else (0.0 if error == 0 else math.inf)


def _notes(config: RunConfig) -> list[str]:
    notes = []
    if config.weight_decay == 0:
        notes.append(
            "the Theorem 1 bound L M_w eta_1 / (eta_t lambda) is infinite with "
            "weight decay 0, so it is left out; pass --weight-decay > 0 to see it"
        )
    if config.momentum != 0:
        notes.append(
            f"the Theorem 1 bound is derived for momentum 0; with momentum "
            f"{config.momentum} it is drawn for reference only"
        )
    if config.lr * config.weight_decay > 1:
        notes.append("eta_1 lambda > 1: outside the bound's assumptions")
    return notes


def main(args) -> int:
    """Runs ``hypergrad approx-error``; raises ``JobError`` on a bad request."""
    from hypergrad.integrations.wandb import WandbLogger

    config = config_from_args(args)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    sets, _ = make_splits(config, *load_data(config))
    train_x, train_y = sets["train"]
    test_x, test_y = sets["test"]
    model = make_model(config, tuple(train_x.shape[1:])).to(device)
    tracked = choose_tracked(config, len(train_x))
    data = (train_x, train_y, model, tracked, device)
    notes = _notes(config)
    for note in notes:
        print(f"hypergrad approx-error: note: {note}", file=sys.stderr)

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        **dataclasses.asdict(config),
        "power_iters": args.power_iters,
        "power_every": args.power_every,
    }
    start = time.perf_counter()
    with WandbLogger(out, mode=config.wandb, name=out.name, config=settings) as logger:
        with (out / "approximation_error.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)

            def rows(*values):
                writer.writerow(["" if v is None else repr(v) for v in values])

            main_config = with_schedule(config, config.schedule)
            curve, tracker = trajectory(
                main_config, data, args, rows=rows, logger=logger
            )
        agreement = rank_agreement(tracker, *_on(device, test_x, test_y), config.top_k)
        summary = {
            "config": settings,
            "notes": notes,
            "num_params": sum(p.numel() for p in tracker.params.values()),
            "test_accuracy": _accuracy(tracker, test_x, test_y, device),
            "rank_agreement": agreement,
            "bound": _curve_summary(curve),
        }
        logger.log_image("plots/approx_error", plot_error(curve, config, out / PNG))
        curves = {config.schedule: curve}
        if not args.no_schedules:
            for name in [s for s in SCHEDULES if s not in curves]:
                curves[name], _ = trajectory(with_schedule(config, name), data, args)
            plot = plot_schedules(curves, config, out / "schedules.png")
            logger.log_image("plots/schedules", plot)
        summary["schedules"] = {n: _curve_summary(c) for n, c in curves.items()}
        summary["seconds"] = time.perf_counter() - start
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        flat = {f"rank_agreement/{k}": v for k, v in agreement.items()}
        flat.update({f"bound/{k}": v for k, v in summary["bound"].items()})
        logger.summary({k: v for k, v in flat.items() if v is not None})
    _print(summary, out)
    return 0


def _on(device, *tensors):
    return tuple(t.to(device) for t in tensors)


def _accuracy(tracker, x, y, device) -> float:
    model = tracker.load_into(tracker.fmodel.module).eval()
    with torch.no_grad():
        pred = torch.cat([model(b.to(device)).argmax(1).cpu() for b in x.split(512)])
    return float((pred == y).double().mean())


def _print(summary: dict, out: Path):
    bound, agree = summary["bound"], dict(summary["rank_agreement"])
    print(f"test accuracy {summary['test_accuracy']:.4f} after {bound['steps']} steps")
    print(
        f"final step: mean ||e|| {bound['final_abs_error']:.4g}, relative "
        f"{bound['final_rel_error']:.4g}, cosine {bound['final_cosine']:.4f}"
    )
    if bound["final_bound"] is not None:
        pieces = (
            f"L {bound['hessian_norm_max']:.4g}, M_w {bound['tangent_norm_max']:.4g}"
        )
        ratio = f"max_i ||e_i|| / bound at most {bound['max_error_over_bound']:.3g}"
        print(f"Theorem 1 bound {bound['final_bound']:.4g} ({pieces}); {ratio}")
    where = f"on {agree.pop('test_points')} test points"
    agree = ", ".join(f"{k} {v:.3f}" for k, v in agree.items() if v is not None)
    print(f"exact vs approx contributions {where}: {agree}")
    print(f"outputs in {out}/")


# ------------------------------------------------------------------ plots


def _positive(values):
    return [v if v is not None and v > 1e-12 else math.nan for v in values]


def _save(fig, axes, title: str, path: Path) -> Path:
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_error(curve: dict, config: RunConfig, path: Path) -> Path:
    """Measured error under the bound (left), the bound's pieces (right)."""
    steps = range(len(curve["lr"]))
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(11, 3.8))
    left.semilogy(steps, _positive(curve["abs_error"]), label="mean ||e_i||")
    left.semilogy(steps, _positive(curve["max_error"]), label="max ||e_i||")
    if config.weight_decay > 0:
        left.semilogy(steps, _positive(curve["bound"]), "--", label="Theorem 1 bound")
    else:
        left.set_title("(bound infinite: weight decay 0)", fontsize=8, loc="right")
    left.set_ylabel("||nabla_exact - nabla_approx||")
    right.semilogy(steps, _positive(curve["hessian_norm"]), label="L (max |eig H_t|)")
    right.semilogy(steps, _positive(curve["tangent_norm"]), label="M_w (max ||nabla||)")
    right.semilogy(
        steps, [curve["lr"][0] / r for r in curve["lr"]], label="eta_1/eta_t"
    )
    right.semilogy(steps, _positive(curve["rel_error"]), label="mean relative error")
    title = (
        f"{config.dataset} {config.model}, K={config.track}, {config.schedule} "
        f"schedule, lambda={config.weight_decay:g}, momentum={config.momentum:g}"
    )
    return _save(fig, (left, right), title, path)


def plot_schedules(curves: dict, config: RunConfig, path: Path) -> Path:
    """Error and bound, relative error and rate for each schedule."""
    fig, axes = _pyplot().subplots(1, 3, figsize=(14, 3.8))
    for name, color in zip(SCHEDULES, ("C0", "C1", "C2"), strict=True):
        curve = curves[name]
        steps = range(len(curve["lr"]))
        axes[0].semilogy(steps, _positive(curve["abs_error"]), color=color, label=name)
        if config.weight_decay > 0:
            axes[0].semilogy(steps, _positive(curve["bound"]), "--", color=color)
        axes[1].semilogy(steps, _positive(curve["rel_error"]), color=color, label=name)
        axes[2].semilogy(steps, curve["lr"], color=color, label=name)
    axes[0].set_title("mean ||e_i|| (solid), Theorem 1 bound (dashed)", fontsize=9)
    axes[1].set_title("mean relative error", fontsize=9)
    axes[2].set_title("learning rate eta_t", fontsize=9)
    title = f"{config.dataset} {config.model}, K={config.track}: three schedules"
    return _save(fig, axes, title, path)
