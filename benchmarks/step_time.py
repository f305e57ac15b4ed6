"""Step time of the Tracker against its natural references, as ratios.

LeNet-5 (61,706 parameters) on 28x28 inputs, batch 64, float32, CPU:

1. exact mode, K = 16 tracked samples: Tracker step time over one batch
   gradient plus K double-backward Hessian-vector products on the same batch
   (what any exact method needs at least).
2. approx mode, K = 1,000 of N = 6,400: Tracker step time over one plain
   ``torch.optim.SGD`` step.

Both ratios are measured in one run, medians over repeated steps, so the
machine's load affects numerator and denominator alike. Run:

    python benchmarks/step_time.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import hypergrad as hg
from hypergrad.models import lenet5


def loss_fn(out, y):
    return F.cross_entropy(out, y, reduction="none")


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def data(num_train: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_train, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (num_train,), generator=g)
    batches = torch.randperm(num_train, generator=g).split(batch)
    return x, y, batches


def exact_ratio(k: int, batch: int, repeats: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = lenet5()
    x, y, batches = data(6400, batch)
    rule = hg.optim.sgd(0.01, momentum=0.9, weight_decay=2e-5)
    tracker = hg.Tracker(
        model,
        loss_fn,
        rule,
        num_train=6400,
        tracked=batches[0][:k],
        mode="exact",
        chunk_size=k,
    )
    order = iter(batches * 100)

    def tracked_step():
        b = next(order)
        tracker.step(x[b], y[b], b)

    params = list(model.parameters())
    vectors = [[torch.randn_like(p) for p in params] for _ in range(k)]
    b0 = batches[0]

    def reference():
        loss = loss_fn(model(x[b0]), y[b0]).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for v in vectors:
            dot = sum((g * u).sum() for g, u in zip(grads, v, strict=True))
            torch.autograd.grad(dot, params, retain_graph=True)

    t_tracker = median_time(tracked_step, repeats)
    t_ref = median_time(reference, repeats)
    return t_tracker / t_ref, t_tracker, t_ref


def approx_ratio(k: int, num_train: int, batch: int, repeats: int):
    torch.manual_seed(0)
    model = lenet5()
    x, y, batches = data(num_train, batch)
    tracked = torch.randperm(num_train, generator=torch.Generator().manual_seed(1))[:k]
    rule = hg.optim.sgd(0.01, momentum=0.9, weight_decay=2e-5)
    tracker = hg.Tracker(
        model, loss_fn, rule, num_train=num_train, tracked=tracked, mode="approx"
    )
    order = iter(batches * 100)

    def tracked_step():
        b = next(order)
        tracker.step(x[b], y[b], b)

    plain = lenet5()
    opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-5)
    order_plain = iter(batches * 100)

    def plain_step():
        b = next(order_plain)
        opt.zero_grad()
        loss_fn(plain(x[b]), y[b]).mean().backward()
        opt.step()

    t_tracker = median_time(tracked_step, repeats)
    t_plain = median_time(plain_step, repeats)
    return t_tracker / t_plain, t_tracker, t_plain


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    ratio, t, ref = exact_ratio(k=16, batch=64, repeats=args.repeats)
    print(
        f"exact  K=16:          tracker {t * 1e3:8.1f} ms / (grad + 16 HVP) "
        f"{ref * 1e3:8.1f} ms = {ratio:5.2f}  (target <= 1.5)"
    )
    ratio, t, ref = approx_ratio(k=1000, num_train=6400, batch=64, repeats=args.repeats)
    print(
        f"approx K=1000 N=6400: tracker {t * 1e3:8.1f} ms / SGD step "
        f"{ref * 1e3:8.1f} ms = {ratio:5.2f}  (target <= 3)"
    )


if __name__ == "__main__":
    main()
