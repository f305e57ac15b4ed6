"""``hypergrad explain RUN_DIR``: the training samples that sway a test set.

Reads the output folder of ``hypergrad run`` (its ``summary.json`` config
and ``state.pt``: trained weights, hypergradients and buffer tangents, the
split), reloads the data with the job's own set-up functions and the saved
split, and computes the contributions ``C(z, i)`` of the tracked training
samples to the first ``--test-size`` points of the run's test split
(``hypergrad.attribution.contributions``; positive: ``i`` helps ``z``).

Training samples are ranked by their average absolute contribution over
those test points, ``mean_z |C(z, i)|``; for each of the top ``--top`` the
``--per-sample`` test points with the largest ``|C(z, i)|`` are listed, with
their labels, the model's prediction and its confidence (the softmax
probability of the predicted class). Outputs, in ``--out`` (default
``RUN_DIR/explain``): ``extreme_influencers.csv``, ``extreme_influencers.png``
and a W&B run (offline by default) with the influencers as ranking tables.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

import hypergrad as hg
from hypergrad.attribution import contributions
from hypergrad.jobsetup import JobError, RunConfig, load_data, loss_fn, make_model
from hypergrad.plots import _pyplot, _show

COLUMNS = [
    "rank",
    "train_index",
    "train_label",
    "train_pred",
    "train_confidence",
    "avg_abs_contribution",
    "mean_contribution",
    "test_rank",
    "test_index",
    "test_label",
    "test_pred",
    "test_confidence",
    "contribution",
]
STATE_KEYS = ("params", "buffers", "hypergradients", "tracked_positions", "split")


def add_parser(subparsers):
    """Adds ``explain`` to an argparse sub-parser set; returns the parser."""
    p = subparsers.add_parser(
        "explain",
        help="training samples with the largest influence on a run's test set",
        description="List the tracked training samples of a finished `hypergrad "
        "run` with the largest average absolute contribution to its test set, "
        "and the test samples each one influences most.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a run")
    p.add_argument("--mode", choices=("exact", "approx"), help="default: exact")
    p.add_argument("--test-size", type=int, default=1000, help="test points used")
    p.add_argument("--top", type=int, default=8, help="training samples listed")
    p.add_argument("--per-sample", type=int, default=6, help="test points each")
    p.add_argument("--data-dir", help="the data folder, if not the run's")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", help="default RUN_DIR/explain")
    p.add_argument("--wandb", choices=("offline", "disabled"), default="offline")
    p.set_defaults(func=main)
    return p


def load_run(run_dir, device="cpu"):
    """``(summary, config, state)`` of a run folder; ``JobError`` if not one."""
    run_dir = Path(run_dir)
    hint = "pass the --out folder of `hypergrad run`"
    if not run_dir.is_dir():
        raise JobError(f"RUN_DIR {run_dir} is not a folder; {hint}")
    if not (run_dir / "summary.json").is_file():
        raise JobError(f"{run_dir} is not a hypergrad run (no summary.json); {hint}")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        config = dict(summary["config"])
        config["milestones"] = tuple(config.get("milestones", ()))
        config = RunConfig(**config)
    except (ValueError, KeyError, TypeError) as error:
        raise JobError(
            f"{run_dir}/summary.json is not a run summary ({error!r}); {hint}"
        ) from error
    path = run_dir / "state.pt"
    if not path.is_file():
        raise JobError(
            f"{run_dir} has no state.pt (run status: {summary.get('status')}); "
            "rerun `hypergrad run` to the end to write it"
        )
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickle and zip errors vary
        raise JobError(f"cannot read {path}: {error}") from error
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise JobError(f"{path} lacks {', '.join(missing)}; rerun `hypergrad run`")
    return summary, config, state


def choose_mode(state: dict, config: RunConfig, mode: str | None) -> str:
    """The hypergradients to use: ``mode``, or exact when the run has them."""
    have = [m for m in ("exact", "approx") if m in state["hypergradients"]]
    if mode is None:
        return have[0]
    if mode not in have:
        raise JobError(
            f"the run has no {mode} hypergradients (it ran --mode {config.mode}); "
            f"pass --mode {' or --mode '.join(have)}"
        )
    return mode


def load_sets(config: RunConfig, split: dict):
    """``(train_x, train_y, test_x, test_y)``: the data cut by the saved split."""
    pool_x, pool_y, test_x, test_y = load_data(config)
    if test_x is None:  # the test split was cut from the training pool
        test_x, test_y = pool_x, pool_y
    for name, rows, size in (
        ("train", split["train"], len(pool_x)),
        ("test", split["test"], len(test_x)),
    ):
        if len(rows) and int(rows.max()) >= size:
            raise JobError(
                f"the saved {name} split reaches index {int(rows.max())} but the "
                f"{config.dataset} data have {size} samples; pass the run's --data-dir"
            )
    train, test = split["train"], split["test"]
    return pool_x[train], pool_y[train], test_x[test], test_y[test]


def rank_influencers(table: torch.Tensor, top: int):
    """The ``top`` columns with the largest mean absolute contribution.

    Args:
        table: ``(n_test, K)`` contributions.
        top: How many columns, at most K.

    Returns:
        ``(columns, avg_abs)``: column indices, largest mean ``|C|`` first
        (ties in column order), and those means.
    """
    avg_abs = table.abs().mean(dim=0)
    order = torch.sort(avg_abs, descending=True, stable=True).indices[:top]
    return order, avg_abs[order]


def _predict(fmodel, params, buffers, x, device, batch=512):
    """``(predictions, confidences)``: argmax and softmax maximum, eval mode."""
    probs = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            rows = x[start : start + batch].to(device)
            out, _ = fmodel(params, buffers, rows, train=False)
            probs.append(out.softmax(dim=1))
    confidence, pred = torch.cat(probs).max(dim=1)
    return pred.cpu(), confidence.cpu()


def main(args) -> int:
    """Runs ``hypergrad explain``; raises ``JobError`` on a bad request."""
    for name in ("test_size", "top", "per_sample"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise JobError(f"expected {flag} >= 1, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise JobError("--device cuda was asked for, but no CUDA device is available")
    device = torch.device(args.device)
    _, config, state = load_run(args.run_dir, device)
    mode = choose_mode(state, config, args.mode)
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    split = {k: v.cpu() for k, v in state["split"].items()}
    train_x, train_y, test_x, test_y = load_sets(config, split)
    test_x, test_y = test_x[: args.test_size], test_y[: args.test_size]
    positions = state["tracked_positions"].cpu()
    tracked = (train_x[positions], train_y[positions], split["train"][positions])
    test = (test_x, test_y, split["test"][: len(test_x)])

    fmodel = hg.FunctionalModel(make_model(config, tuple(train_x.shape[1:])))
    fmodel.module.to(device)
    if set(state["params"]) != set(fmodel.param_names):
        raise JobError(
            f"state.pt holds the parameters {sorted(state['params'])[:3]}..., not "
            f"those of --model {config.model}; the run folder is inconsistent"
        )
    table = contributions(
        fmodel,
        loss_fn,
        state["params"],
        state["buffers"],
        state["hypergradients"][mode],
        state.get("buffer_tangents", {}).get(mode, {}),
        test_x.to(device),
        test_y.to(device),
    ).cpu()
    weights = (fmodel, state["params"], state["buffers"])
    seen = (_predict(*weights, tracked[0], device), _predict(*weights, test_x, device))
    items = describe(table, tracked, seen[0], test, seen[1], args.top, args.per_sample)

    out = Path(args.out) if args.out else Path(args.run_dir) / "explain"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(items, out / "extreme_influencers.csv")
    title = (
        f"{config.dataset} {config.model}, {mode} mode: tracked training samples "
        f"with the largest mean |C| over {len(test_x)} test points"
    )
    plot_influencers(items, title, out / "extreme_influencers.png")
    _log(args, out, mode, len(test_x), items)
    _print(items, mode, len(test_x), out)
    return 0


def describe(table, tracked, tracked_pred, test, test_pred, top: int, per: int):
    """The top influencers and the test points each sways most.

    Args:
        table: ``(n_test, K)`` contributions.
        tracked: ``(images, labels, source indices)`` of the K tracked samples.
        tracked_pred: ``(predictions, confidences)`` of the model on them.
        test: ``(images, labels, source indices)`` of the test points.
        test_pred: ``(predictions, confidences)`` on the test points.
        top: How many training samples.
        per: How many test points for each.

    Returns:
        One ``(train, image, tests, test_images)`` per influencer, largest
        mean ``|C|`` first: ``train`` and each of ``tests`` are dicts of
        CSV fields.
    """
    order, avg_abs = rank_influencers(table, min(top, table.shape[1]))
    items = []
    for rank, (c, value) in enumerate(zip(order.tolist(), avg_abs, strict=True), 1):
        influenced = table[:, c].abs().topk(min(per, len(table))).indices.tolist()
        train = {
            "rank": rank,
            "train_index": int(tracked[2][c]),
            "train_label": int(tracked[1][c]),
            "train_pred": int(tracked_pred[0][c]),
            "train_confidence": float(tracked_pred[1][c]),
            "avg_abs_contribution": float(value),
            "mean_contribution": float(table[:, c].mean()),
        }
        tests = [
            {
                "test_rank": r,
                "test_index": int(test[2][z]),
                "test_label": int(test[1][z]),
                "test_pred": int(test_pred[0][z]),
                "test_confidence": float(test_pred[1][z]),
                "contribution": float(table[z, c]),
            }
            for r, z in enumerate(influenced, 1)
        ]
        images = [test[0][z].numpy() for z in influenced]
        items.append((train, tracked[0][c].numpy(), tests, images))
    return items


def write_csv(items, path: Path) -> Path:
    """One row per (influencer, influenced test point), columns ``COLUMNS``."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for train, _, tests, _ in items:
            for test in tests:
                row = {**train, **test}
                writer.writerow(
                    {k: repr(v) if isinstance(v, float) else v for k, v in row.items()}
                )
    return path


def _log(args, out: Path, mode: str, n_test: int, items):
    from hypergrad.integrations.wandb import WandbLogger

    settings = {"run_dir": str(args.run_dir), "mode": mode, "test_size": n_test}
    name = f"explain-{Path(args.run_dir).resolve().name}"
    with WandbLogger(out, mode=args.wandb, name=name, config=settings) as logger:
        # Signed mean contributions: helpful on average, or harmful.
        table = [
            {
                "index": train["train_index"],
                "contribution": train["mean_contribution"],
                "label": train["train_label"],
                "image": image,
            }
            for train, image, _, _ in items
        ]
        logger.log_rankings(table, top_k=len(table), test_name="extreme_influencers")
        logger.log_image("plots/extreme_influencers", out / "extreme_influencers.png")
        logger.summary({"explain/test_points": n_test})


def _print(items, mode: str, n_test: int, out: Path):
    print(f"largest mean |C| over {n_test} test points ({mode} mode):")
    for train, _, tests, _ in items:
        shown = ", ".join(
            f"{t['test_index']} ({t['contribution']:+.3g})" for t in tests
        )
        print(
            f"  {train['rank']:2d}. train {train['train_index']} "
            f"(label {train['train_label']}): mean |C| "
            f"{train['avg_abs_contribution']:.4g}, mean C "
            f"{train['mean_contribution']:+.4g}; test {shown}"
        )
    print(f"outputs in {out}/")


def plot_influencers(items, title: str, path: Path) -> Path:
    """One row per training sample: its image, then the test images it sways."""
    plt = _pyplot()
    cols = 1 + max(len(tests) for _, _, tests, _ in items)
    fig, axes = plt.subplots(
        len(items), cols, figsize=(1.45 * cols, 1.6 * len(items)), squeeze=False
    )
    for r, (train, image, tests, images) in enumerate(items):
        _show(
            axes[r, 0],
            image,
            f"train #{train['train_index']} y={train['train_label']} "
            f"p={train['train_pred']} ({train['train_confidence']:.2f})\n"
            f"mean|C| {train['avg_abs_contribution']:.3g}",
        )
        for c in range(1, cols):
            if c > len(tests):
                axes[r, c].axis("off")
                continue
            t = tests[c - 1]
            _show(
                axes[r, c],
                images[c - 1],
                f"#{t['test_index']} y={t['test_label']} p={t['test_pred']}"
                f" ({t['test_confidence']:.2f})\nC={t['contribution']:+.3g}",
            )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
