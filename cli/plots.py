"""Plots of sweep results: ΔPPL against bits per element, one line per model and family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

MARKERS = {"int (token)": "o", "int (K per channel)": "s", "rank": "v", "hybrid (q8)": "^", "hybrid (q4)": "D"}
# Quantization solid, rank dashed, hybrids dotted: the comparison the paper is about.
STYLES = {"int (token)": "-", "int (K per channel)": "-", "rank": "--", "hybrid (q8)": ":", "hybrid (q4)": ":"}


def plot_sweeps(reports: list[dict[str, Any]], path: Path) -> None:
    """ΔPPL (symlog) vs bits per element for each family of each report (one colour per report);
    saved as PNG."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'kvmlx[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, report in enumerate(reports):
        name = report["model"] if len({r["model"] for r in reports}) == len(reports) else f"{report['model']} {report['data']}"
        for family, marker in MARKERS.items():
            rows = sorted((r for r in report["results"] if r.get("family") == family), key=lambda r: r["bits_per_element_limit"])
            if rows:
                ax.plot([r["bits_per_element_limit"] for r in rows], [r["delta_ppl"] for r in rows], marker=marker,
                        linestyle=STYLES[family], color=colours[i % len(colours)], label=f"{name}: {family}")
    ax.set_xscale("linear")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("bits per element (K and V, scales and biases included)")
    ax.set_ylabel("ΔPPL vs fp16 cache")
    ax.set_title("Quantization vs rank reduction at matched storage")
    ax.legend(fontsize=6, ncol=len(reports))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(
    sweeps: list[Path] = typer.Argument(..., help="Sweep JSON files (kvmlx sweep --out PREFIX writes PREFIX.json)."),
    out: Path = typer.Option(..., "--out", help="PNG to write."),
) -> None:
    """Draw several sweeps in one figure: one colour per model, one line per family."""
    reports = []
    for path in sweeps:
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise typer.BadParameter(f"{path}: not a readable sweep JSON ({e})", param_hint="SWEEPS") from None
        if not isinstance(report, dict) or "results" not in report or "model" not in report:
            raise typer.BadParameter(f"{path}: no 'model' and 'results' (write it with kvmlx sweep)", param_hint="SWEEPS")
        reports.append(report)
    try:
        plot_sweeps(reports, out)
    except RuntimeError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo(f"wrote {out}")
