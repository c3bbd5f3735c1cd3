"""Run figures: metric curves and a grid of clean / triggered / amplified-difference samples."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402

from utils.run.checkpoint import atomic_write  # noqa: E402
from utils.run.distributed import is_main  # noqa: E402


def _save(fig, path: str) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def plot_curves(records: list[dict], path: str, panels: dict[str, list[str]], x_key: str = "epoch",
                more_rows: list[tuple[list[dict], dict[str, list[str]], str]] = ()) -> None:
    """One panel per entry of ``panels`` (title -> metric keys), each key a line over ``x_key``.

    ``more_rows``: further rows of panels, each ``(records, panels, x_key)`` (e.g. PUD's per-step figures
    under its per-epoch curves). Every value is a fraction: the axes run from 0 to 1.
    """
    if not is_main():  # torchrun: rank 0 draws
        return
    rows = [(records, panels, x_key), *more_rows]
    ncols = max(len(p) for _, p, _ in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(4.5 * ncols, 3.4 * len(rows)), squeeze=False)
    for row, (recs, row_panels, xk) in zip(axes, rows):
        for ax, (title, keys) in zip(row, row_panels.items()):
            drawn = 0
            for k in keys:
                pts = [(r[xk], r[k]) for r in recs if k in r and r.get(k) is not None and xk in r]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=k)
                    drawn += 1
            ax.set_title(title)
            ax.set_xlabel(xk)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, steps and rounds are counts
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            if drawn:
                ax.legend(fontsize=8)
            else:  # e.g. ASR or detection figures of a run that cannot measure them
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="grey")
        for ax in row[len(row_panels):]:
            ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def plot_samples(clean: torch.Tensor, triggered: torch.Tensor, path: str, amplify: float = 5.0) -> None:
    """Rows: clean, triggered, |difference| x amplify, for a few images (N, C, H, W in [0,1])."""
    if not is_main():
        return
    n = clean.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5), squeeze=False)
    diff = ((triggered - clean).abs() * amplify).clamp(0, 1)
    for row, (name, imgs) in enumerate((("clean", clean), ("triggered", triggered), (f"|diff| x{amplify:g}", diff))):
        for i in range(n):
            img = imgs[i].detach().cpu()
            ax = axes[row][i]
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    _save(fig, path)
