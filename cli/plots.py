"""Plots of sweep results: ΔPPL against bits per element, one line per model and family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARKERS = {"int (token)": "o", "int (K per channel)": "s", "rank": "v", "hybrid (q8)": "^", "hybrid (q4)": "D"}


def plot_sweeps(reports: list[dict[str, Any]], path: Path) -> None:
    """ΔPPL (symlog) vs bits per element for each family of each report; saved as PNG."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'kvmlx[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for report in reports:
        for family, marker in MARKERS.items():
            rows = sorted((r for r in report["results"] if r.get("family") == family), key=lambda r: r["bits_per_element_limit"])
            if rows:
                ax.plot([r["bits_per_element_limit"] for r in rows], [r["delta_ppl"] for r in rows], marker=marker,
                        label=f"{report['model']}: {family}")
    ax.set_xscale("linear")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("bits per element (K and V, scales and biases included)")
    ax.set_ylabel("ΔPPL vs fp16 cache")
    ax.set_title("Quantization vs rank reduction at matched storage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
