"""Pictures of a run: approximation-error curves and influential images."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            'hypergrad plots need matplotlib: pip install "hypergrad[plots]".'
        ) from error
    return plt


def _positive(values) -> np.ndarray:
    """Values for a log axis: zeros and rounding noise left out (NaN)."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(values > 1e-12, values, np.nan)


def plot_approximation_error(steps, abs_error, rel_error, cosine, path: Path) -> Path:
    """Error of the approximate hypergradient over training, log scale."""
    plt = _pyplot()
    steps = np.asarray(steps)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].semilogy(steps, _positive(abs_error), label="||exact - approx||")
    axes[0].set_title("absolute error (mean over tracked samples)")
    axes[1].semilogy(steps, _positive(rel_error), label="relative error")
    axes[1].semilogy(steps, _positive(1 - np.asarray(cosine)), label="1 - cosine")
    axes[1].set_title("relative error and 1 - cosine")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _show(ax, image, title: str):
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else image * 0
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_influencers(rows: list[dict], path: Path, k: int, mode: str = "") -> Path:
    """One row per test image: the image, then its top helpful and harmful.

    Args:
        rows: One dict per test image with ``image``, ``label``, ``pred``,
            ``helpful`` and ``harmful`` (lists of dicts with ``image``,
            ``label``, ``index``, ``contribution``).
        path: Where to save the PNG.
        k: Helpful and harmful images per row.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(rows),
        1 + 2 * k,
        figsize=(1.3 * (1 + 2 * k), 1.5 * len(rows)),
        squeeze=False,
    )
    for r, row in enumerate(rows):
        _show(
            axes[r, 0],
            row["image"],
            f"test {row['index']}\ntrue {row['label']} pred {row['pred']}",
        )
        for j, (kind, items) in enumerate(
            (("+", row["helpful"]), ("-", row["harmful"]))
        ):
            for c in range(k):
                ax = axes[r, 1 + j * k + c]
                if c < len(items):
                    item = items[c]
                    _show(
                        ax,
                        item["image"],
                        f"{kind} #{item['index']} y={item['label']}"
                        f"\n{item['contribution']:.3g}",
                    )
                else:
                    ax.axis("off")
    title = "test image | most helpful (+) | most harmful (-) training images"
    fig.suptitle(title + (f" ({mode} mode)" if mode else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
