"""What the main job writes after training: files, pictures, W&B tables."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from hypergrad.plots import plot_approximation_error, plot_influencers


def _predict(model, x, device, batch=512) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            outs.append(model(x[start : start + batch].to(device)).cpu())
    return torch.cat(outs) if outs else torch.zeros(0, 10)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two flat tensors (ties broken by order)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return float((ra * rb).sum() / denom) if denom > 0 else 1.0


def top_k_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Mean over rows of |top-k(a) & top-k(b)| / k, by absolute contribution."""
    k = min(k, a.shape[1])
    ta = a.abs().topk(k, dim=1).indices
    tb = b.abs().topk(k, dim=1).indices
    same = [
        len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ta, tb, strict=True)
    ]
    return sum(same) / len(same)


def choose_explained(
    pred: torch.Tensor, target: torch.Tensor, count: int
) -> torch.Tensor:
    """Misclassified test points first (up to ``count``), then a few correct."""
    wrong = (pred != target).nonzero().squeeze(1)
    right = (pred == target).nonzero().squeeze(1)
    n_wrong = min(len(wrong), count)
    n_right = min(len(right), max(3, count - n_wrong))
    return torch.cat([wrong[:n_wrong], right[:n_right]])


def write_report(tracker, sets, split, config, out: Path, logger, device) -> dict:
    """Accuracies, contributions, agreement, pictures and W&B tables."""
    model = tracker.load_into(tracker.fmodel.module).eval()
    results = {}
    preds = {}
    for name, (x, y) in sets.items():
        preds[name] = _predict(model, x, device).argmax(1) if len(x) else y
        results[f"{name}_accuracy"] = (
            float((preds[name] == y).double().mean()) if len(x) else None
        )
    test_x, test_y = sets["test"]
    train_x, train_y = sets["train"]
    explained = choose_explained(preds["test"], test_y, config.explain)
    results["explained_test_indices"] = split["test"][explained]

    contributions = {
        mode: tracker.contributions(
            test_x[explained], test_y[explained], mode=mode
        ).cpu()
        for mode in tracker.modes
    }
    train_source = split["train"][tracker.tracked.cpu()]
    test_source = split["test"][explained]
    with (out / "contributions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["test_index", "train_index", "mode", "contribution"])
        for mode, table in contributions.items():
            for r, t in enumerate(test_source.tolist()):
                for c, i in enumerate(train_source.tolist()):
                    writer.writerow([t, i, mode, repr(float(table[r, c]))])

    if tracker.mode == "both":
        ex, ap = contributions["exact"], contributions["approx"]
        per_row = [spearman(ex[r], ap[r]) for r in range(len(ex))]
        results["rank_agreement"] = {
            "spearman_all": spearman(ex.flatten(), ap.flatten()),
            "spearman_per_test_point_mean": sum(per_row) / len(per_row),
            f"top{config.top_k}_overlap": top_k_overlap(ex, ap, config.top_k),
        }
        steps, abs_e, rel_e, cos = _read_curve(out / "approximation_error.csv")
        if steps:
            plot = plot_approximation_error(
                steps, abs_e, rel_e, cos, out / "approximation_error.png"
            )
            logger.log_image("plots/approximation_error", plot)

    mode = "exact" if "exact" in tracker.modes else "approx"
    table = contributions[mode]
    k = min(config.top_k, table.shape[1])
    rows = []
    for r, t in enumerate(explained[: min(6, len(explained))].tolist()):
        best = table[r].topk(k).indices.tolist()
        worst = table[r].topk(k, largest=False).indices.tolist()

        def item(c, r=r):
            pos = int(tracker.tracked[c])
            return {
                "image": train_x[pos].numpy(),
                "label": int(train_y[pos]),
                "index": int(train_source[c]),
                "contribution": float(table[r, c]),
            }

        rows.append(
            {
                "index": int(test_source[r]),
                "image": test_x[t].numpy(),
                "label": int(test_y[t]),
                "pred": int(preds["test"][t]),
                "helpful": [item(c) for c in best],
                "harmful": [item(c) for c in worst],
            }
        )
        positions = tracker.tracked.cpu()
        logger.log_rankings(
            table[r],
            images=train_x[positions].numpy(),
            labels=train_y[positions].numpy(),
            indices=train_source.numpy(),
            top_k=k,
            test_name=f"test_{int(test_source[r])}",
        )
    plot = plot_influencers(rows, out / "influencers.png", k, mode)
    logger.log_image("plots/influencers", plot)
    logger.log_histogram("influence/contributions", table)

    save_state(tracker, split, out / "state.pt", explained)
    return results


def save_state(tracker, split, path: Path, explained=None) -> None:
    """Trained weights and hypergradients, enough to rebuild contributions."""
    state = {
        "params": tracker.params,
        "buffers": tracker.buffers,
        "hypergradients": {m: tracker.hypergradients(m) for m in tracker.modes},
        "buffer_tangents": {m: tracker.tangents(m)[1] for m in tracker.modes},
        "tracked_positions": tracker.tracked.cpu(),
        "steps": tracker.step_count,
        "split": split,
    }
    if explained is not None:
        state["explained_positions"] = explained
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _read_curve(path: Path):
    steps, abs_e, rel_e, cos = [], [], [], []
    with path.open() as f:
        for row in csv.DictReader(f):
            steps.append(int(row["step"]))
            abs_e.append(float(row["abs_error"]))
            rel_e.append(float(row["rel_error"]))
            cos.append(float(row["cosine"]))
    return steps, abs_e, rel_e, cos
