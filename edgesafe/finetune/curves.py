"""Loss curves of a fine-tuning run: JSON for machines, a PNG for people."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..io import atomic_path, write_json  # noqa: E402


def save_curves(curves: list[dict[str, float]], folder: Path) -> None:
    """Write ``curves.json`` and ``curves.png`` (one panel per logged term, log scale)."""
    write_json(folder / "curves.json", curves)
    terms = sorted({k for row in curves for k in row if k != "step"})
    fig, axes = plt.subplots(len(terms), 1, figsize=(6, 1.8 * max(1, len(terms))), sharex=True, squeeze=False)
    for ax, term in zip(axes[:, 0], terms, strict=True):
        points = [(row["step"], row[term]) for row in curves if term in row]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=0.8)
        ax.set_ylabel(term, fontsize=8)
        if all(p[1] > 0 for p in points):
            ax.set_yscale("log")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    with atomic_path(folder / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
