"""``hypergrad debug-labels``: find wrong labels, retrain without them.

The HYDRA paper's debugging experiment (Table 4). A share of the training
labels is flipped to another class; one training run tracks every training
sample and saves a checkpoint per epoch (for TracIn); each method ranks the
training samples by their total effect on a clean validation set, most
harmful first; the flagged share is removed and the network retrained from
the same initial weights with the same settings. Methods: HYDRA's total
contribution ``sum_z C(z, i)``, influence functions (conjugate gradients on
the last layer, LiSSA on all parameters), TracIn over the checkpoints, the
training loss, random order, and on request captum's TracInCP and influence
function. The oracle removes exactly the flipped labels.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from torch.func import grad

import hypergrad as hg
from hypergrad import baselines as bl
from hypergrad.baselines.simple import row_blocks
from hypergrad.data import inject_label_noise
from hypergrad.job import _batches, _Csv, _progress, _write_json, resolve_device
from hypergrad.jobsetup import (
    DATASETS,
    MODELS,
    OPTIMIZERS,
    PRESETS,
    SCHEDULES,
    JobError,
    RunConfig,
    available_memory_bytes,
    load_data,
    loss_fn,
    make_model,
    make_rule,
    make_splits,
    tracked_memory_bytes,
    validate_config,
)

METHODS = ("hydra", "influence-cg", "influence-lissa", "tracin", "self-loss", "random")
CAPTUM_METHODS = ("tracin-captum", "influence-captum")
PRESET_VALUES = {name: {**v, "retrain_epochs": 50} for name, v in PRESETS.items()}
FRACTIONS = [i / 100 for i in range(101)]


@dataclasses.dataclass
class DebugConfig(RunConfig):
    """The main job's settings, with this experiment's defaults and extras."""

    dataset: str = "mnist"
    model: str = "lenet5"
    train_size: int | None = 5000
    val_size: int | None = 1000
    test_size: int | None = 10_000
    epochs: int = 20
    lr: float = 0.01
    schedule: str = "multistep"
    milestones: tuple[int, ...] = (5,)
    mode: str = "approx"
    out: str = "runs/debug-labels"
    noise: float = 0.5
    remove: float | None = None  # default: the noise rate
    retrain_epochs: int | None = None  # default: epochs
    methods: tuple[str, ...] = METHODS
    damping: float = 0.01
    cg_max_iter: int = 1000
    lissa_depth: int = 1000
    lissa_batch: int = 128
    lissa_scale: float | None = None  # default: from the top eigenvalue
    # Above the mini-batch Hessians' negative curvature (0.01 diverged on
    # LeNet-5 / MNIST, 0.5 converged).
    lissa_damping: float = 0.5
    # One thread: on a busy 2-core machine two fight (measured 10x slower).
    threads: int = 1


_CHOICES = {
    "dataset": DATASETS,
    "model": MODELS,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "mode": ("approx", "exact"),
    "device": ("auto", "cpu", "cuda"),
    "wandb": ("offline", "online", "disabled"),
}
_TYPES = {  # the fields whose default is None
    "data_dir": str,
    "train_size": int,
    "val_size": int,
    "test_size": int,
    "remove": float,
    "retrain_epochs": int,
    "lissa_scale": float,
}
_NOTES = {
    "data_dir": "folder of the data files; default ./data",
    "remove": "share removed; default the noise rate",
    "retrain_epochs": "default --epochs",
    "methods": f"comma list of {', '.join(METHODS + CAPTUM_METHODS)}",
    "milestones": "epochs, for multistep",
    "lissa_scale": "default 2 x the top mini-batch eigenvalue",
    "threads": "torch threads; 0: torch's default",
}


def add_parser(subparsers):
    """Adds the ``debug-labels`` subcommand and its arguments."""
    p = subparsers.add_parser(
        "debug-labels",
        help="flip labels, rank samples by HYDRA and baselines, retrain",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--preset", choices=sorted(PRESET_VALUES), help="the paper's scale")
    p.add_argument("--download", action="store_true", help="fetch via torchvision")
    p.add_argument("--no-progress", action="store_true")
    skip = {"download", "track", "track_indices", "explain", "top_k"}
    for field in dataclasses.fields(DebugConfig):
        if field.name in skip:
            continue
        options = {"help": _NOTES.get(field.name, f"default {field.default}")}
        if field.name in _CHOICES:
            options["choices"] = _CHOICES[field.name]
        elif field.name == "milestones":
            options.update(type=int, nargs="*")
        elif field.name != "methods":
            options["type"] = _TYPES.get(field.name) or type(field.default)
        p.add_argument("--" + field.name.replace("_", "-"), **options)
    return p


def config_from_args(args) -> DebugConfig:
    """The settings: preset, then the arguments given; checked."""
    values = dict(PRESET_VALUES[args.preset]) if getattr(args, "preset", None) else {}
    for field in dataclasses.fields(DebugConfig):
        given = getattr(args, field.name, None)
        if given is not None and field.name == "methods":
            given = tuple(m.strip() for m in given.split(",") if m.strip())
        if given is not None:
            values[field.name] = tuple(given) if field.name == "milestones" else given
    config = DebugConfig(**values)
    _check(config)
    return config


def _check(config: DebugConfig):
    validate_config(config)
    if not 0 < config.noise < 1:
        raise JobError(f"--noise must be in (0, 1), got {config.noise}; try 0.5")
    remove = config.noise if config.remove is None else config.remove
    if not 0 < remove < 1:
        raise JobError(f"--remove must be in (0, 1), got {remove}; try the noise rate")
    unknown = [m for m in config.methods if m not in METHODS + CAPTUM_METHODS]
    if unknown or not config.methods:
        raise JobError(
            f"--methods got {','.join(unknown) or 'nothing'}; expected a comma list "
            f"of {', '.join(METHODS + CAPTUM_METHODS)}"
        )
    if set(config.methods) & set(CAPTUM_METHODS):
        from hypergrad.baselines.captum_adapter import captum_available

        if not captum_available():
            raise JobError(
                'the captum methods need captum: pip install "hypergrad[influence]", '
                "or leave them out of --methods"
            )
    if config.mode not in ("approx", "exact"):
        raise JobError(f"--mode must be approx or exact, got {config.mode}")
    positive = ("epochs", "cg_max_iter", "lissa_depth", "lissa_batch", "batch_size")
    defaults = DebugConfig()
    for name in (*positive, "retrain_epochs", "threads", "damping", "lissa_damping"):
        value, least = getattr(config, name), 1 if name in positive else 0
        if name == "retrain_epochs":
            value, least = 1 if value is None else value, 1
        if value < least:
            raise JobError(
                f"--{name.replace('_', '-')} must be >= {least}, got {value}; the "
                f"default is {getattr(defaults, name)}"
            )


def main(args) -> int:
    """Runs ``hypergrad debug-labels``; prints where the results went."""
    config = config_from_args(args)
    summary = run(config, progress=not getattr(args, "no_progress", False))
    print(f"{'method':18s} {'AUC':>6s} {'test acc':>9s} {'seconds':>8s}")
    for method in ("none", "oracle", *config.methods):
        auc = summary["detection_auc"].get(method)
        acc = summary["retrain_accuracy"][method]
        secs = summary["seconds"].get(method)
        print(
            f"{method:18s} {'' if auc is None else f'{auc:.3f}':>6s} {acc:9.4f} "
            f"{'' if secs is None else f'{secs:.1f}':>8s}"
        )
    print(f"outputs in {config.out}/: detection.csv, detection.png, retrain.csv, ")
    print("  scores.csv, flipped.csv, summary.json, checkpoints/, wandb/")
    return 0


def run(config: DebugConfig, *, progress: bool = True) -> dict:
    """The whole experiment; writes every output into ``config.out``."""
    _check(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or threads)
    try:
        return _run(config, progress)
    finally:
        torch.set_num_threads(threads)


def _run(config: DebugConfig, progress: bool) -> dict:
    from hypergrad.integrations.wandb import WandbLogger

    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    sets, split = make_splits(config, *load_data(config))
    sets = {k: (x.to(device), y.to(device)) for k, (x, y) in sets.items()}
    train_x, clean_y = sets["train"]
    noisy_y, flipped = inject_label_noise(clean_y, config.noise, 10, config.seed)
    num_train = len(train_x)
    init = make_model(config, tuple(train_x.shape[1:])).to(device)
    _check_memory(config, init, num_train, device)
    out = Path(config.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    _write_flipped(out / "flipped.csv", flipped, split["train"], clean_y, noisy_y)
    summary = {"config": dataclasses.asdict(config), "status": "running"}
    summary.update(num_train=num_train, num_flipped=len(flipped), device=str(device))
    _write_json(out / "summary.json", summary)
    logger = WandbLogger(
        out, mode=config.wandb, name=out.name, config=summary["config"]
    )
    try:
        say = _say if progress else (lambda _: None)
        train = (train_x, noisy_y)
        tracker, checkpoints, seconds = _train_tracked(
            config, init, train, sets["val"], out, logger, progress
        )
        model = tracker.load_into(copy.deepcopy(init)).eval()
        summary["train_seconds_tracked"] = seconds
        summary["test_accuracy_tracked"] = _accuracy(model, *sets["test"])
        scores, summary["seconds"], summary["solvers"] = _score_all(
            config, tracker, model, checkpoints, train, sets["val"], say
        )
        if "hydra" in summary["seconds"]:
            summary["hydra_readout_seconds"] = summary["seconds"]["hydra"]
            summary["seconds"]["hydra"] += seconds  # the tracked training too
        del tracker
        _write_scores(out / "scores.csv", scores, split["train"], flipped)
        orders = {m: bl.harmful_first(s) for m, s in scores.items()}
        summary["detection_auc"] = {
            m: bl.detection_auc(o, flipped.cpu()) for m, o in orders.items()
        }
        curves = {
            m: bl.detection_curve(o, flipped, FRACTIONS) for m, o in orders.items()
        }
        _write_detection(out, curves, summary["detection_auc"], logger)
        summary["retrain_accuracy"], summary["retrain_seconds"] = _retrain_all(
            config, init, train, sets, orders, flipped, out, logger, say
        )
        if (config.retrain_epochs or config.epochs) == config.epochs:
            summary["train_seconds_plain"] = summary["retrain_seconds"]["none"]
        summary["status"] = "finished"
        logger.summary(_flat_metrics(summary))
    except KeyboardInterrupt:
        summary["status"] = "interrupted"
        raise
    except Exception as error:
        summary.update(status="failed", error=str(error).splitlines()[0])
        raise
    finally:
        _write_json(out / "summary.json", summary)
        logger.finish(exit_code=0 if summary["status"] == "finished" else 1)
    return summary


def _say(message: str):
    print(f"debug-labels: {message}", file=sys.stderr, flush=True)


def _check_memory(config, init, num_train, device):
    num_params = sum(p.numel() for p in init.parameters() if p.requires_grad)
    num_buffers = sum(b.numel() for b in init.buffers() if b.is_floating_point())
    slots = len(make_rule(config, 1)[0].init({"w": torch.zeros(1)}).slots)
    need = tracked_memory_bytes(
        num_params, slots, num_train, num_buffers, config.mode, torch.float32
    )
    # Approx-mode tangents are copied once when read out.
    need *= 2 if config.mode == "approx" else 1
    have = available_memory_bytes(device)
    if need > 0.8 * have:
        raise JobError(
            f"tracking all {num_train} training samples of a {num_params:,}-parameter "
            f"model in mode {config.mode} needs about {need / 2**30:.1f} GiB, more "
            f"than the {have / 2**30:.1f} GiB available; lower --train-size"
            + (" or use --mode approx" if config.mode == "exact" else "")
        )


def _train_tracked(config, init, train, val, out: Path, logger, progress: bool):
    """One run with every training sample tracked; a checkpoint per epoch."""
    (x, y), num_train = train, len(train[0])
    steps_per_epoch = math.ceil(num_train / config.batch_size)
    rule, schedule = make_rule(config, steps_per_epoch)
    tracker = hg.Tracker(
        init,
        loss_fn,
        rule,
        num_train=num_train,
        tracked=torch.arange(num_train),
        mode=config.mode,
        chunk_size=config.chunk_size,
    )
    checkpoints, bar = [], _progress(steps_per_epoch * config.epochs, progress)
    start = time.perf_counter()
    for epoch, order in _batches(
        num_train, config.batch_size, config.epochs, config.seed
    ):
        rates, epoch_loss = [], 0.0
        for b in order:
            rates.append(float(rule.lr(tracker.state.count)))
            loss = tracker.step(x[b], y[b], b.to(x.device))
            epoch_loss += loss * len(b)
            logger.log_step(tracker.step_count - 1, loss=loss, lr=rates[-1])
            bar.update(loss, rates[-1])
        if isinstance(schedule, hg.schedules.ReduceOnPlateau):
            net = tracker.load_into(copy.deepcopy(init))
            schedule.step(epoch_loss / num_train + _mean_loss(net, *val))
        state = {k: v.detach().clone() for k, v in tracker.state_dict().items()}
        checkpoints.append(bl.Checkpoint(state, sum(rates) / len(rates)))
        torch.save(
            {"state_dict": state, "learning_rate": checkpoints[-1].learning_rate},
            out / "checkpoints" / f"epoch_{epoch + 1:03d}.pt",
        )
    bar.close()
    return tracker, checkpoints, time.perf_counter() - start


def hydra_scores(tracker: hg.Tracker, inputs, targets, *, mode=None, batch_size=256):
    """``(K,)`` total contribution ``sum_z C(z, i)`` of each tracked sample.

    Equal to ``tracker.contributions(inputs, targets).sum(0)``, from one summed
    test gradient instead of one per test point (eval mode; BatchNorm
    statistics' tangents included in exact mode).
    """
    t_params, t_buffers, _ = tracker.tangents(mode)
    const = {n: b for n, b in tracker.buffers.items() if n not in t_buffers}

    def total(params, buffers, x, y):
        out, _ = tracker.fmodel(params, {**buffers, **const}, x, train=False)
        return tracker.loss_fn(out, y).sum()

    float_buffers = {n: tracker.buffers[n] for n in t_buffers}
    g_params = {n: torch.zeros_like(p) for n, p in tracker.params.items()}
    g_buffers = {n: torch.zeros_like(b) for n, b in float_buffers.items()}
    for x, y in row_blocks(inputs, targets, batch_size):
        gp, gb = grad(total, argnums=(0, 1))(tracker.params, float_buffers, x, y)
        g_params = {n: g + gp[n] for n, g in g_params.items()}
        g_buffers = {n: g + gb[n] for n, g in g_buffers.items()}
    k = tracker.num_tracked
    scores = torch.zeros(k, dtype=torch.float64, device=tracker.device)
    for tangents, grads in ((t_params, g_params), (t_buffers, g_buffers)):
        for name, t in tangents.items():
            scores -= (t.reshape(k, -1) @ grads[name].reshape(-1)).double()
    return scores


def _score_all(config, tracker, model, checkpoints, train, val, say):
    """Each method's ``(N,)`` scores (HYDRA's sign), wall times, solver info."""
    scores, seconds, solvers = {}, {}, {}
    common = dict(damping=config.damping, weight_decay=config.weight_decay)
    methods = {
        "hydra": lambda: hydra_scores(tracker, *val),
        "influence-cg": lambda: bl.influence_scores(
            model, loss_fn, train, val, method="cg", max_iter=config.cg_max_iter,
            tol=1e-8, **common,
        ),
        "influence-lissa": lambda: bl.influence_scores(
            model, loss_fn, train, val, method="lissa", depth=config.lissa_depth,
            lissa_batch_size=config.lissa_batch, scale=config.lissa_scale,
            seed=config.seed, damping=config.lissa_damping,
            weight_decay=config.weight_decay,
        ),
        "tracin": lambda: bl.tracin_scores(model, loss_fn, checkpoints, train, val),
        "self-loss": lambda: bl.self_loss_scores(model, loss_fn, *train),
        "random": lambda: bl.random_scores(len(train[0]), config.seed + 2),
        "tracin-captum": lambda: _captum().tracin_scores_captum(
            model, loss_fn, checkpoints, train, val
        ),
        "influence-captum": lambda: _captum().influence_scores_captum(
            model, loss_fn, train, val, **common
        ),
    }  # fmt: skip
    for method in config.methods:
        say(f"scoring by {method}")
        start = time.perf_counter()
        try:
            result = methods[method]()
        except ValueError as error:
            raise JobError(f"{method}: {error}") from error
        if isinstance(result, tuple):
            result, solvers[method] = result
        if solvers.get(method, {}).get("growth", 1.0) > 2:
            say(f"{method} did not converge; raise --lissa-damping or the scale")
        seconds[method] = time.perf_counter() - start
        scores[method] = result.detach().double().cpu()
    return scores, seconds, solvers


def _captum():
    from hypergrad.baselines import captum_adapter

    return captum_adapter


def _retrain_all(config, init, train, sets, orders, flipped, out, logger, say):
    """Test accuracy after removing each method's flagged samples, and times."""
    num_train = len(train[0])
    remove = round(
        (config.noise if config.remove is None else config.remove) * num_train
    )
    keep = {"none": torch.arange(num_train)}
    mask = torch.ones(num_train, dtype=torch.bool)
    mask[flipped.cpu()] = False
    keep["oracle"] = mask.nonzero().squeeze(1)
    keep.update({m: order[remove:].sort().values for m, order in orders.items()})
    accuracy, seconds = {}, {}
    table = _Csv(out / "retrain.csv", ["method", "test_accuracy"])
    for method, rows in keep.items():
        say(f"retraining without the samples flagged by {method} ({len(rows)} kept)")
        start = time.perf_counter()
        rows = rows.to(train[0].device)
        net = _fit(config, init, (train[0][rows], train[1][rows]), sets["val"])
        seconds[method] = time.perf_counter() - start
        accuracy[method] = _accuracy(net, *sets["test"])
        table.row(method, f"{accuracy[method]:.6f}")
    table.close()
    _log_table(logger, "debug_labels/retrain", ["method", "test_accuracy"], accuracy)
    return accuracy, seconds


def _fit(config, init, train, val):
    """Trains a copy of ``init`` with ``torch.optim`` and the run's schedule."""
    (x, y), epochs = train, config.retrain_epochs or config.epochs
    settings = dataclasses.replace(config, epochs=epochs)
    _, schedule = make_rule(settings, math.ceil(len(x) / config.batch_size))
    net = copy.deepcopy(init).train()
    kind = {
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
    }
    extra = {"momentum": config.momentum} if config.optimizer == "sgd" else {}
    opt = kind[config.optimizer](
        net.parameters(), lr=config.lr, weight_decay=config.weight_decay, **extra
    )
    count = 0
    for _, order in _batches(len(x), config.batch_size, epochs, config.seed):
        epoch_loss = 0.0
        for b in order:
            for group in opt.param_groups:
                group["lr"] = float(schedule(count))
            opt.zero_grad()
            loss = loss_fn(net(x[b]), y[b]).mean()
            loss.backward()
            opt.step()
            count, epoch_loss = count + 1, epoch_loss + loss.item() * len(b)
        if isinstance(schedule, hg.schedules.ReduceOnPlateau):
            schedule.step(epoch_loss / len(x) + _mean_loss(net, *val))
            net.train()
    return net.eval()


def _mean_loss(net, x, y, batch=1024) -> float:
    if len(x) == 0:
        return 0.0
    net.eval()
    with torch.no_grad():
        total = sum(
            float(loss_fn(net(x[i : i + batch]), y[i : i + batch]).sum())
            for i in range(0, len(x), batch)
        )
    return total / len(x)


def _accuracy(net, x, y, batch=1024) -> float:
    net.eval()
    with torch.no_grad():
        right = sum(
            int((net(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
            for i in range(0, len(x), batch)
        )
    return right / max(1, len(x))


def _write_flipped(path, flipped, source, clean_y, noisy_y):
    table = _Csv(path, ["position", "dataset_index", "true_label", "noisy_label"])
    for i in flipped.tolist():
        table.row(i, int(source[i]), int(clean_y[i]), int(noisy_y[i]))
    table.close()


def _write_scores(path, scores, source, flipped):
    is_flipped = torch.zeros(len(source), dtype=torch.bool)
    is_flipped[flipped.cpu()] = True
    columns = list(scores)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["position", "dataset_index", "flipped", *columns])
        values = torch.stack([scores[m] for m in columns], dim=1).tolist()
        for i, row in enumerate(values):
            cells = [f"{v:.6g}" for v in row]
            writer.writerow([i, int(source[i]), int(is_flipped[i]), *cells])


def _write_detection(out: Path, curves, aucs, logger):
    columns = ["method", "fraction_inspected", "fraction_found"]
    rows = [
        [method, f, found]
        for method, curve in curves.items()
        for f, found in zip(FRACTIONS, curve, strict=True)
    ]
    with (out / "detection.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows([[m, f"{f:.2f}", f"{v:.6f}"] for m, f, v in rows])
    _plot_detection(out / "detection.png", curves, aucs)
    _log_table(logger, "debug_labels/detection", columns, rows)
    _log_table(logger, "debug_labels/detection_auc", ["method", "auc"], aucs)
    if logger.enabled:
        logger.log_image("debug_labels/detection_plot", out / "detection.png")


def _plot_detection(path: Path, curves, aucs):
    from hypergrad.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="diagonal")
    for method, curve in curves.items():
        ax.plot(FRACTIONS, curve, label=f"{method} (AUC {aucs[method]:.3f})")
    ax.set_xlabel("fraction of training data inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_table(logger, key: str, columns, rows):
    """Logs a W&B table (offline: into the run file)."""
    rows = [list(r) for r in (rows.items() if isinstance(rows, dict) else rows)]
    logger.log_table(key, columns, rows)


def _flat_metrics(summary: dict) -> dict:
    flat = {"train_seconds_tracked": summary["train_seconds_tracked"]}
    for group in ("detection_auc", "retrain_accuracy", "seconds"):
        flat.update({f"{group}/{k}": v for k, v in summary.get(group, {}).items()})
    return flat
