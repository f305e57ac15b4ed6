"""The ``hypergrad`` command: ``hypergrad demo`` and ``hypergrad run``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from hypergrad import job
from hypergrad.experiments import approx_error, debug_labels, explain

# The paper's experiments, each a module with add_parser(subparsers) and main(args).
EXPERIMENTS = {
    "debug-labels": debug_labels,
    "approx-error": approx_error,
    "explain": explain,
}


def _run_parser(sub):
    p = sub.add_parser("run", help="train on a data set with tracking")
    d = job.RunConfig()
    p.add_argument("--preset", choices=sorted(job.PRESETS), help="the paper's settings")
    p.add_argument("--dataset", choices=job.DATASETS)
    p.add_argument("--data-dir")
    p.add_argument("--download", action="store_true", help="fetch via torchvision")
    p.add_argument("--model", choices=job.MODELS)
    p.add_argument("--train-size", type=int)
    p.add_argument("--val-size", type=int)
    p.add_argument("--test-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--optimizer", choices=job.OPTIMIZERS)
    p.add_argument("--schedule", choices=job.SCHEDULES)
    p.add_argument("--milestones", type=int, nargs="*", help="epochs, for multistep")
    p.add_argument("--gamma", type=float, help="decay factor of the schedule")
    p.add_argument("--track", type=int, help=f"tracked samples (default {d.track})")
    p.add_argument("--track-indices", help="file of training-split positions")
    p.add_argument("--mode", choices=("exact", "approx", "both"))
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out")
    p.add_argument("--wandb", choices=("offline", "online", "disabled"))
    p.add_argument(
        "--explain",
        type=int,
        help="misclassified test points explained (plus at least 3 correct ones)",
    )
    p.add_argument("--chunk-size", type=int)
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's); 1 is fastest on a busy machine",
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hypergrad",
        description="Which training samples made a network what it is (HYDRA).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="digits, small CNN, exact and approx, W&B offline (under a minute)"
    )
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--no-progress", action="store_true")
    _run_parser(sub)
    for module in EXPERIMENTS.values():
        module.add_parser(sub)
    return parser


def config_from_args(args) -> job.RunConfig:
    values = {}
    if args.command == "run" and args.preset:
        values.update(job.PRESETS[args.preset])
    for field in dataclasses.fields(job.RunConfig):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = tuple(given) if field.name == "milestones" else given
    if args.command == "demo":
        values.update(
            dataset="digits", model="cnn", mode="both", track=48, epochs=12, threads=1
        )
        values.setdefault("wandb", "offline")
    return job.RunConfig(**values)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = getattr(args, "out", None)
    try:
        if args.command in EXPERIMENTS:
            return EXPERIMENTS[args.command].main(args)
        config = config_from_args(args)
        out = config.out
        summary = job.run(config, progress=not args.no_progress)
    except (job.JobError, ValueError) as error:
        # hypergrad's own ValueErrors say what was wrong and how to fix it.
        message = " ".join(str(error).split())
        print(f"hypergrad: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f"; what was written is in {out}" if out else ""
        print(f"hypergrad: interrupted{where}", file=sys.stderr)
        return 130
    _print_summary(summary, Path(config.out))
    return 0


def _print_summary(summary: dict, out: Path):
    acc = summary.get("test_accuracy")
    print(
        f"test accuracy {acc:.4f} after {summary['steps']} steps"
        if acc is not None
        else ""
    )
    print(
        f"training: {summary['train_seconds_tracked']:.1f} s tracked, "
        f"{summary['train_seconds_plain']:.1f} s without tracking"
    )
    if "rank_agreement" in summary:
        agree = ", ".join(f"{k} {v:.3f}" for k, v in summary["rank_agreement"].items())
        print(f"exact vs approx contributions: {agree}")
    print(f"outputs in {out}/:")
    for name in (
        "summary.json",
        "contributions.csv",
        "approximation_error.csv",
        "approximation_error.png",
        "influencers.png",
        "state.pt",
        "wandb",
    ):
        if (out / name).exists():
            print(f"  {out / name}")


if __name__ == "__main__":
    sys.exit(main())
