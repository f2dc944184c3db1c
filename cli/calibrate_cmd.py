"""`kvmlx calibrate`: PCA bases per layer and KV head from calibration text (kept apart from
evaluation text), saved in the user cache where `ppl`, `chat` and `sweep` find them."""

from __future__ import annotations

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvspec.models import DEFAULT_MODEL

from . import bases as basis_store
from . import experiment

console = Console()


def calibrate(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Alias, HF id, local dir or .gguf file."),
    data: str = typer.Option("bbc", "--data", help="Corpus whose calibration part (every 10th document) is used."),
    tokens: int = typer.Option(8192, "--tokens", min=64, help="Calibration tokens."),
    backend: str = typer.Option("auto", "--backend", help="auto, mlx or torch."),
    device: str = typer.Option(None, "--device", help="Device for the torch backend."),
) -> None:
    """Compute and save PCA bases (post-RoPE keys and values) for low-rank specs."""
    runner = experiment.load_runner(backend, model, device)
    ids = experiment.load_tokens(runner, data, tokens, part="calib")
    path = basis_store.bases_path(runner.name, runner.fingerprint)
    with console.status(f"collecting K/V activations on {len(ids):,} tokens"):
        acts = runner.activations(ids)
    layers = sum(len(v) for v in acts.values())
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("PCA per layer and KV head", total=layers)
        tensors = basis_store.calibrate(acts, lambda: bar.advance(task))
    basis_store.save(path, tensors, runner.name, runner.fingerprint, len(ids), data)
    print_energy(tensors, runner.shape.layers, runner.shape.head_dim)
    console.print(f"saved {path}")


def energy_kept(tensors: dict[str, np.ndarray], which: str, layers: int, rank: int) -> float:
    """Mean over layers and heads of the share of second-moment energy in the top `rank` directions."""
    shares = []
    for i in range(layers):
        e = tensors[f"energy.{which}.{i}"].astype(np.float64)
        shares.append((e[:, :rank].sum(-1) / np.maximum(e.sum(-1), 1e-30)).mean())
    return float(np.mean(shares))


def print_energy(tensors: dict[str, np.ndarray], layers: int, head_dim: int) -> None:
    ranks = [r for r in (8, 16, 32, 64, 128) if r < head_dim]
    table = Table(title="energy kept by the top-r PCA directions (mean over layers and KV heads)")
    table.add_column("")
    for r in ranks:
        table.add_column(f"r={r}", justify="right")
    for which in ("k", "v"):
        table.add_row(which.upper(), *(f"{100 * energy_kept(tensors, which, layers, r):.1f}%" for r in ranks))
    console.print(table)
