"""Drawing primitives for the run figures (``utils.figures`` decides what each figure shows).

Figures are laid out in rows of panels (each row its own number of panels, so no row has an empty one),
with a title, labelled axes and each panel's legend to the right of it, outside the data. Series may hold
``None`` (a value that was not measured): the line breaks there instead of being drawn across. Functions
return the matplotlib Figure, so a caller (or a test) can read back what was drawn; ``save`` writes it
atomically (rank 0 only under torchrun). matplotlib is imported on first use, not when the run starts.
"""
from __future__ import annotations

import math

from utils.run.checkpoint import atomic_write
from utils.run.distributed import is_main

LEGEND = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0, "fontsize": 7.5,
          "frameon": False}
ADVERSARIAL_COLOUR = "#f4a261"
BOUNDARY_STYLE = {"color": "0.45", "linestyle": "--", "linewidth": 0.8}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rows_figure(title: str, row_panels: list[int], panel_size=(4.2, 2.9)):
    """A figure with a title and one row per entry of ``row_panels`` (its panel count); returns (fig, rows of axes)."""
    plt = pyplot()
    ncols = max(row_panels)
    fig = plt.figure(figsize=(panel_size[0] * ncols + 1.6, panel_size[1] * len(row_panels) + 0.5),
                     layout="constrained")
    fig.suptitle(title, fontsize=10)
    subfigs = fig.subfigures(len(row_panels), 1, squeeze=False)[:, 0]
    rows = []
    for sub, n in zip(subfigs, row_panels):
        axes = sub.subplots(1, n, squeeze=False)[0]
        rows.append(list(axes))
    return fig, rows


def _nan(v):
    return float("nan") if v is None else float(v)


def series(ax, xs, ys, label: str, **style) -> None:
    """A line with markers; ``None`` values break the line (nothing is drawn where nothing was measured)."""
    style = {"marker": "o", "ms": 3, "linewidth": 1.4, **style}
    ax.plot(list(xs), [_nan(y) for y in ys], label=label, **style)


def points(ax, xs, ys, label: str, **style) -> None:
    """Markers only (a metric measured at a few points, e.g. robust accuracy); ``None`` values are left out."""
    kept = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if kept:
        style = {"marker": "D", "ms": 6, "linestyle": "none", **style}
        ax.plot([x for x, _ in kept], [y for _, y in kept], label=label, **style)


def shade(ax, xs, label: str) -> None:
    """Shade the integer positions ``xs`` (e.g. adversarial epochs), one band per run of consecutive ones."""
    xs = sorted(xs)
    first = True
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        ax.axvspan(xs[i] - 0.5, xs[j] + 0.5, color=ADVERSARIAL_COLOUR, alpha=0.22, linewidth=0,
                   label=label if first else "_nolegend_")
        first = False
        i = j + 1


def stages(ax, groups: list[tuple[str, float, float]]) -> None:
    """Mark consecutive stages: ``(name, first x, last x)`` each; a dashed line between two, names on top."""
    for (_, _, last), (_, first, _) in zip(groups, groups[1:]):
        ax.axvline((last + first) / 2, **BOUNDARY_STYLE)
    top = ax.secondary_xaxis("top")
    top.set_xticks([(a + b) / 2 for _, a, b in groups], [name for name, _, _ in groups], fontsize=7)
    top.tick_params(length=0, pad=1)


def fraction_axis(ax, label: str) -> None:
    """A y axis for fractions in [0, 1]."""
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel(label)


def share_axis(ax, values, label: str) -> None:
    """A y axis zoomed on small shares (e.g. 0-0.3 % poisoned), from 0 to a little above the largest, in percent."""
    from matplotlib.ticker import PercentFormatter

    top = max((v for v in values if v is not None and math.isfinite(v)), default=0.0)
    top = 1.25 * top if top > 0 else 0.01
    ax.set_ylim(0, min(top, 1.02))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=None))
    ax.set_ylabel(label)


def finish_panel(ax, title: str, xlabel: str, integer_x: bool = True) -> None:
    """Title, x label, grid and the legend (right of the panel, outside the data)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, steps and rounds are counts
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**LEGEND)


def categorical_x(ax, names: list[str]) -> list[int]:
    """Positions 0..n-1 with ``names`` as tick labels (e.g. PUD's stages); returns the positions."""
    xs = list(range(len(names)))
    ax.set_xticks(xs, names, rotation=25, ha="right", fontsize=7.5)
    ax.set_xlim(-0.5, len(names) - 0.5)
    return xs


def image(ax, img, ylabel: str | None = None, title: str | None = None, title_colour: str = "black") -> None:
    """One (C, H, W) image in [0, 1] (a tensor), without ticks; a row label and a small title if given."""
    img = img.detach().cpu()
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])
    if ylabel is not None:
        ax.set_ylabel(ylabel, fontsize=7.5)
    if title is not None:
        ax.set_title(title, fontsize=7.5, color=title_colour)


def save(fig, path: str) -> None:
    """Write ``fig`` as a PNG (atomically; under torchrun rank 0 only) and release pyplot's hold on it."""
    if is_main():
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    pyplot().close(fig)
