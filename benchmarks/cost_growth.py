"""Cost of a tracked step as the number K of tracked samples grows.

The supplement's Figure 1: time per step per tracked sample per parameter,
for LeNet-5 (61,706 parameters, 28x28x1), DenseNet-BC-40 (176,122, 32x32x3)
and MobileNetV2 (2,236,682, 32x32x3), exact and approx mode, SGD with
momentum 0.9 and weight decay 2e-5, batch 64, float32, CPU, one thread.

Each point (model, mode, K) runs in a fresh subprocess: one warm-up step,
then at least ``--steps`` timed steps, more (up to ``--max-steps``) until
they add up to ``--min-seconds``; the median is reported. After each
tracked step the subprocess also times one plain ``torch.optim.SGD`` step of
the same architecture on the same batch: the ratio of the two medians is
what to compare across points on a loaded machine. Inputs are random tensors
of the right shape (timing does not depend on pixel values); the batches are
the first steps of a random permutation of N = max(K, the paper's
training-set size: 50,000 for LeNet-5, 40,000 for the CIFAR models) dataset
indices, so the share of tracked samples in a batch is K / N, as in a real
run. The tracked set is the first K entries of a fixed permutation.

The subprocess measures the increase of its peak resident memory over the
resident memory just before the Tracker is built (VmHWM after resetting it
through /proc/self/clear_refs; ru_maxrss where that is not possible) and
sets it beside ``hypergrad.jobsetup.tracked_memory_bytes``.

Points that would not fit are skipped with the reason printed: the peak is
predicted as ``factor * estimate`` (3 in exact mode, where the old tangents,
the per-chunk results and their concatenation are alive at once; 1 in
deferred approx mode) plus the workspace of the largest smaller K measured,
and must stay under ``--memory-fraction`` of the available memory; in exact
mode a point's time is predicted from the largest smaller K measured (the
cost is linear in K), and a warm-up plus the timed steps must fit in
``--max-point-seconds`` (fewer timed steps, down to one, are taken to make
them fit); an exact point above K = 16 with nothing smaller to predict from
is not run.

Run (each command well under 20 minutes on a 2-core CPU; the CSV is merged,
the plot redrawn from the whole CSV):

    python benchmarks/cost_growth.py --models lenet5
    python benchmarks/cost_growth.py --models mobilenetv2
    python benchmarks/cost_growth.py --models densenet40 --modes approx
    python benchmarks/cost_growth.py --models densenet40 --modes exact \
        --max-point-seconds 700
    python benchmarks/cost_growth.py --plot-only
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSV_PATH = HERE / "cost_growth.csv"
PNG_PATH = HERE / "cost_growth.png"
COLUMNS = [
    "model",
    "params",
    "mode",
    "K",
    "seconds_per_step",
    "seconds_per_step_per_sample_per_param",
    "estimated_bytes",
    "measured_peak_bytes",
]

# name -> (input shape, paper's training-set size, exact chunk size, K per mode)
MODELS = {
    "lenet5": dict(
        shape=(1, 28, 28),
        num_train=50_000,
        chunk_size=16,
        ks={
            "exact": [4, 16, 64, 400, 1000, 2000, 10000, 20000],
            "approx": [4, 16, 64, 400, 1000, 2000, 10000, 20000, 50000],
        },
    ),
    "densenet40": dict(
        shape=(3, 32, 32),
        num_train=40_000,
        # A trial exact step with a chunk of 16 (batch 64) peaked at 19 GB,
        # nearly all jvp activations; with a chunk of 4 it peaks at ~7 GB.
        chunk_size=4,
        ks={
            "exact": [4, 16, 64, 400, 2000],
            "approx": [4, 16, 64, 400, 2000, 5000, 10000],
        },
    ),
    "mobilenetv2": dict(
        shape=(3, 32, 32),
        num_train=40_000,
        chunk_size=16,
        ks={"exact": [4, 16, 64, 400], "approx": [4, 16, 64, 400, 1000, 2000]},
    ),
}
PEAK_FACTOR = {"exact": 3.0, "approx": 1.0}
# glibc hands large freed blocks back to the kernel and page-faults them in
# again at the next allocation; these settings keep them in the process.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def build_model(name: str):
    from hypergrad.models import densenet40, lenet5, mobilenetv2

    if name == "lenet5":
        return lenet5()
    if name == "densenet40":
        return densenet40(bottleneck=True, compression=0.5)
    return mobilenetv2()


def loss_fn(out, y):
    import torch.nn.functional as F

    return F.cross_entropy(out, y, reduction="none")


# ------------------------------------------------------------ memory reading


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def estimate(model, mode: str, k: int) -> int:
    """The CLI's estimate, with its own way of counting (hypergrad/job.py)."""
    import torch

    import hypergrad as hg
    from hypergrad.jobsetup import tracked_memory_bytes

    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    num_buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    slots = len(make_rule(hg).init({"w": torch.zeros(1)}).slots)
    return tracked_memory_bytes(num_params, slots, k, num_buffers, mode, torch.float32)


def make_rule(hg):
    return hg.optim.sgd(0.01, momentum=0.9, weight_decay=2e-5)


# ------------------------------------------------------- one point (child)


def run_point(name, mode, k, batch, steps, max_steps, min_seconds, chunk, threads):
    """Times one (model, mode, K) point in this process; returns a dict.

    One warm-up step, then at least ``steps`` timed steps, more (up to
    ``max_steps``) until the timed steps add up to ``min_seconds``. Each
    tracked step is followed by a plain ``torch.optim.SGD`` step of the same
    architecture on the same batch, so that the ratio of the two medians
    does not depend on how loaded the machine is.
    """
    import torch

    import hypergrad as hg

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = MODELS[name]
    model = build_model(name)
    plain = build_model(name)
    opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-5)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    num_train = max(k, spec["num_train"])
    g = torch.Generator().manual_seed(0)
    tracked = torch.randperm(num_train, generator=g)[:k]
    order = torch.randperm(num_train, generator=g)
    batches = [order[s * batch : (s + 1) * batch] for s in range(1 + max_steps)]
    inputs = [torch.randn(batch, *spec["shape"], generator=g) for _ in batches]
    targets = [torch.randint(0, 10, (batch,), generator=g) for _ in batches]
    est = estimate(model, mode, k)

    gc.collect()
    reset = _reset_peak()
    base_kib = _status_kib("VmRSS") if reset else None
    if base_kib is None:  # no /proc: fall back on the process's peak so far
        reset = False
        base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    tracker = hg.Tracker(
        model,
        loss_fn,
        make_rule(hg),
        num_train=num_train,
        tracked=tracked,
        mode=mode,
        chunk_size=chunk,
    )
    after_init_kib = _status_kib("VmRSS")

    def plain_step(s):
        opt.zero_grad()
        loss_fn(plain(inputs[s]), targets[s]).mean().backward()
        opt.step()

    wall, cpu, ref, in_batch = [], [], [], []
    for s, b in enumerate(batches):
        timed = wall[1:]
        if len(timed) >= steps and sum(timed) >= min_seconds:
            break
        start, start_cpu = time.perf_counter(), time.process_time()
        tracker.step(inputs[s], targets[s], b)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        in_batch.append(int(torch.isin(b, tracked).sum()))
        start = time.perf_counter()
        plain_step(s)
        ref.append(time.perf_counter() - start)
    if reset:
        peak_kib = _status_kib("VmHWM")
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = statistics.median(wall[1:])
    return {
        "model": name,
        "params": params,
        "mode": mode,
        "K": k,
        "seconds_per_step": seconds,
        "seconds_per_step_per_sample_per_param": seconds / (k * params),
        "estimated_bytes": est,
        "measured_peak_bytes": (peak_kib - base_kib) * 1024,
        # for the log only
        "warmup_seconds": wall[0],
        "step_seconds": wall[1:],
        "cpu_seconds_per_step": statistics.median(cpu[1:]),
        "plain_seconds_per_step": statistics.median(ref[1:]),
        "tracked_in_batch": in_batch[1:],
        "after_init_bytes": (
            (after_init_kib - base_kib) * 1024 if after_init_kib and reset else None
        ),
        "peak_from": "VmHWM" if reset else "ru_maxrss",
        "num_train": num_train,
        "batch": batch,
        "chunk_size": chunk,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


# ------------------------------------------------------------- the driver


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict]):
    order = {n: i for i, n in enumerate(MODELS)}
    rows = sorted(
        rows, key=lambda r: (order.get(r["model"], 99), r["mode"], int(r["K"]))
    )
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r[c] for c in COLUMNS})


def format_row(r: dict) -> dict:
    return {
        "model": r["model"],
        "params": int(r["params"]),
        "mode": r["mode"],
        "K": int(r["K"]),
        "seconds_per_step": f"{float(r['seconds_per_step']):.6g}",
        "seconds_per_step_per_sample_per_param": (
            f"{float(r['seconds_per_step_per_sample_per_param']):.6g}"
        ),
        "estimated_bytes": int(r["estimated_bytes"]),
        "measured_peak_bytes": int(r["measured_peak_bytes"]),
    }


def child(args) -> int:
    result = run_point(
        args.point_model,
        args.point_mode,
        args.point_k,
        args.batch,
        args.steps,
        args.max_steps,
        args.min_seconds,
        args.point_chunk,
        args.threads,
    )
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def drive(args) -> int:
    rows = {(r["model"], r["mode"], int(r["K"])): r for r in read_rows(args.csv)}
    for name in args.models:
        spec = MODELS[name]
        for mode in args.modes:
            for k in args.ks or spec["ks"][mode]:
                below = [r for (n, m, kk), r in rows.items()
                         if (n, m) == (name, mode) and kk < k]  # fmt: skip
                previous = max(below, key=lambda r: int(r["K"]), default=None)
                steps, skip = plan_point(name, mode, k, previous, args)
                if skip:
                    print(f"{name:12s} {mode:6s} K={k:6d}: skipped, {skip}", flush=True)
                    continue
                result = spawn(name, mode, k, spec, steps, args)
                if isinstance(result, str):
                    print(f"{name:12s} {mode:6s} K={k:6d}: {result}", flush=True)
                    break
                rows[(name, mode, k)] = format_row(result)
                write_rows(args.csv, list(rows.values()))
                print_result(result)
    if rows:
        plot(list(rows.values()), args.png)
    return 0


def plan_point(name, mode, k, previous, args) -> tuple[int, str | None]:
    """The number of timed steps for a point, or why it is skipped.

    ``previous`` is the measured row of the largest smaller K of the same
    model and mode (or None). Its workspace (peak minus ``factor * estimate``)
    is carried over: as it is in exact mode, where it belongs to one chunk;
    scaled by the ratio of the Ks in approx mode, where it grows with the
    tracked rows per batch.
    """
    model = build_model(name)
    est = estimate(model, mode, k)
    workspace = 0.0
    if previous is not None:
        k0 = int(previous["K"])
        workspace = max(
            0.0,
            int(previous["measured_peak_bytes"])
            - PEAK_FACTOR[mode] * int(previous["estimated_bytes"]),
        )
        if mode == "approx":
            workspace *= k / k0
    need = PEAK_FACTOR[mode] * est + workspace
    have = available_bytes()
    if need > args.memory_fraction * have:
        return 0, (
            f"predicted peak {need / 2**30:.1f} GiB ({PEAK_FACTOR[mode]:g} x the "
            f"{est / 2**30:.1f} GiB estimate + {workspace / 2**30:.1f} GiB workspace),"
            f" more than {args.memory_fraction:g} of the {have / 2**30:.1f} GiB "
            "available"
        )
    if mode != "exact":
        return args.steps, None
    if previous is None:
        if k > 16:
            return 0, (
                "no smaller K of this model measured in exact mode to predict its "
                "time from; measure K <= 16 first"
            )
        return args.steps, None
    per_step = float(previous["seconds_per_step"]) * k / k0  # K HVPs per step
    fits = int(args.max_point_seconds // per_step) - 1  # one warm-up step
    if fits < 1:
        return 0, (
            f"predicted {per_step:.0f} s per step from K={k0} (cost linear in K): "
            "a warm-up and one timed step exceed --max-point-seconds "
            f"{args.max_point_seconds:g}"
        )
    return min(args.steps, fits), None


def spawn(name, mode, k, spec, steps, args):
    command = [
        sys.executable, __file__, "--point-model", name, "--point-mode", mode,
        "--point-k", str(k), "--point-chunk", str(spec["chunk_size"]),
        "--batch", str(args.batch), "--steps", str(steps),
        "--max-steps", str(args.max_steps), "--min-seconds", str(args.min_seconds),
        "--threads", str(args.threads),
    ]  # fmt: skip
    env = dict(os.environ)
    if args.keep_freed_memory:
        env.update(KEEP_FREED_MEMORY)
    limit = args.max_point_seconds * 1.5
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=limit, env=env
        )
    except subprocess.TimeoutExpired:
        return f"stopped: over {limit:.0f} s"
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return f"failed (exit {done.returncode}): {tail[0]}"


def print_result(r: dict):
    ratio = r["measured_peak_bytes"] / r["estimated_bytes"]
    steps = ", ".join(f"{t:.3g}" for t in r["step_seconds"])
    print(
        f"{r['model']:12s} {r['mode']:6s} K={r['K']:6d}: "
        f"{r['seconds_per_step']:.4g} s/step [{steps}] (warm-up "
        f"{r['warmup_seconds']:.3g}; CPU {r['cpu_seconds_per_step']:.4g} s), "
        f"{r['seconds_per_step_per_sample_per_param']:.3e} s/step/sample/param, "
        f"plain SGD step {r['plain_seconds_per_step']:.4g} s "
        f"(ratio {r['seconds_per_step'] / r['plain_seconds_per_step']:.3g}), "
        f"tracked in batch {r['tracked_in_batch']}, "
        f"estimate {r['estimated_bytes'] / 2**20:.1f} MiB, "
        f"after init +{(r['after_init_bytes'] or 0) / 2**20:.1f} MiB, "
        f"peak +{r['measured_peak_bytes'] / 2**20:.1f} MiB (x{ratio:.2f})",
        flush=True,
    )


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"lenet5": "C0", "densenet40": "C1", "mobilenetv2": "C2"}
    labels = {
        "lenet5": "LeNet-5",
        "densenet40": "DenseNet-BC-40",
        "mobilenetv2": "MobileNetV2",
    }
    styles = {"exact": ("-", "o"), "approx": ("--", "s")}
    for name in MODELS:
        for mode in ("exact", "approx"):
            mine = [r for r in rows if r["model"] == name and r["mode"] == mode]
            pts = sorted((int(r["K"]), r) for r in mine)
            if not pts:
                continue
            ks = [k for k, _ in pts]
            line, marker = styles[mode]
            label = f"{labels[name]}, {mode}"
            cost = [float(r["seconds_per_step_per_sample_per_param"]) for _, r in pts]
            ax.plot(ks, cost, line, marker=marker, color=colors[name], label=label)
            ratio = [
                int(r["measured_peak_bytes"]) / int(r["estimated_bytes"])
                for _, r in pts
            ]
            bx.plot(ks, ratio, line, marker=marker, color=colors[name], label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tracked samples K")
    ax.set_ylabel("seconds per step per tracked sample per parameter")
    ax.set_title("Cost per tracked sample (batch 64, float32, CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.axhline(1.0, color="k", lw=0.8)
    bx.axhline(3.0, color="k", lw=0.8, ls=":")
    for y, text in ((1.0, "= estimate"), (3.0, "3 x estimate (exact step)")):
        bx.annotate(
            text,
            (0, y),
            xycoords=("axes fraction", "data"),
            xytext=(4, 3),
            textcoords="offset points",
            fontsize=7,
        )
    bx.set_xlabel("tracked samples K")
    bx.set_ylabel("peak RSS increase / tracked_memory_bytes")
    bx.set_title("Measured peak memory over the estimate")
    bx.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS)
    )
    parser.add_argument("--modes", nargs="+", choices=["exact", "approx"],
                        default=["exact", "approx"])  # fmt: skip
    parser.add_argument("--ks", nargs="+", type=int, help="override the K grid")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads per point"
    )
    parser.add_argument("--steps", type=int, default=3, help="least timed steps")
    parser.add_argument("--max-steps", type=int, default=20, help="most timed steps")
    parser.add_argument(
        "--min-seconds", type=float, default=5.0, help="time steps until this adds up"
    )
    parser.add_argument("--max-point-seconds", type=float, default=900.0)
    parser.add_argument("--memory-fraction", type=float, default=0.8)
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="run the points with glibc's "
        + " ".join(f"{k}={v}" for k, v in KEEP_FREED_MEMORY.items()),
    )
    parser.add_argument("--csv", type=Path, default=CSV_PATH)
    parser.add_argument("--png", type=Path, default=PNG_PATH)
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--point-model", help=argparse.SUPPRESS)
    parser.add_argument("--point-mode", help=argparse.SUPPRESS)
    parser.add_argument("--point-k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--point-chunk", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point_model:
        return child(args)
    if args.plot_only:
        plot(read_rows(args.csv), args.png)
        return 0
    import torch

    print(
        f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, "
        f"{args.steps} to {args.max_steps} timed steps (until {args.min_seconds:g} s) "
        "after 1 warm-up, "
        f"{available_bytes() / 2**30:.1f} GiB available",
        flush=True,
    )
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
