"""Loss curves of a fine-tuning run: JSON for machines, a PNG for people."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..io import atomic_path, write_json  # noqa: E402


def plot_curves(curves: list[dict[str, float]]):
    """One panel per logged term (log scale where every value is positive); None when nothing was logged."""
    terms = sorted({k for row in curves for k in row if k != "step"})
    if not terms:
        return None
    fig, axes = plt.subplots(len(terms), 1, figsize=(6, 1.8 * len(terms)), sharex=True, squeeze=False)
    for ax, term in zip(axes[:, 0], terms, strict=True):
        points = [(row["step"], row[term]) for row in curves if term in row]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=0.8)
        ax.set_ylabel(term, fontsize=8)
        if all(p[1] > 0 for p in points):
            ax.set_yscale("log")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return fig


def save_curves(curves: list[dict[str, float]], folder: Path) -> None:
    """Write ``curves.json`` and ``curves.png``."""
    write_json(folder / "curves.json", curves)
    fig = plot_curves(curves)
    if fig is None:
        return
    with atomic_path(folder / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
