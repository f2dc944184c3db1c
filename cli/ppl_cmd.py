"""`kvmlx ppl`: perplexity through compressed KV caches, every spec on the same tokens."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

import kvspec
from kvspec.budget import bits_per_element, matched_rank
from kvspec.models import DEFAULT_MODEL

from . import backend as backends
from . import experiment
from .experiment import PROTOCOL, err


def default_specs(head_dim: int) -> list[str]:
    """int8, int4, int2 and the rank that stores as many bits per element as int4."""
    int4_bits = bits_per_element(kvspec.parse("int4"), head_dim).total
    return ["int8", "int4", "int2", f"rank{matched_rank(int4_bits, head_dim)}"]


def ppl(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Alias (smollm2-135m, qwen2.5-0.5b, gemma3-270m, mistral-7b), HF id, local dir or .gguf file."),
    kv: list[str] = typer.Option(None, "--kv", help="KV spec(s), repeatable or comma-separated; fp16 always runs. Default: int8, int4, int2 and the rank matching int4's bits."),
    data: str = typer.Option("bbc", "--data", help="bbc (default, bundled), austen, botchan (`kvmlx data fetch`), wikitext2 (hub), or a text file."),
    max_tokens: int = typer.Option(4096, "--max-tokens", min=16, help="Evaluation tokens taken from the start of the corpus's evaluation part."),
    context: int = typer.Option(1024, "--context", min=2, help="Tokens per window."),
    stride: int = typer.Option(None, "--stride", help="New targets scored per window after the first (default --context; at most context - 1 take effect)."),
    chunk: int = typer.Option(256, "--chunk", min=1, help="Prefill chunk size: tokens fed through the cache per forward."),
    lastword: int = typer.Option(0, "--lastword", min=0, help="Also run a LAMBADA-style final-word test on N paragraphs of 60-160 words from --data (not the human-filtered LAMBADA)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resampling."),
    backend: str = typer.Option("auto", "--backend", help="auto (MLX on Apple Silicon, else torch), mlx or torch."),
    device: str = typer.Option(None, "--device", help="Device for the torch backend (cpu, cuda); default: cuda if available."),
    device_map: str = typer.Option(None, "--device-map", help="auto: shard a model too large for one GPU over all visible GPUs with accelerate (torch backend); each layer's cache lives on its layer's GPU."),
    calib_tokens: int = typer.Option(8192, "--calib-tokens", min=64, help="Calibration tokens for PCA bases (taken from --data's calibration part)."),
    recalibrate: bool = typer.Option(False, "--recalibrate", help="Recompute PCA bases even if saved ones exist."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with a `results` list to stdout."),
) -> None:
    """Perplexity (with bootstrap 95% intervals) through compressed KV caches, against the fp16 cache."""
    if device_map not in (None, "auto"):
        raise typer.BadParameter(f"{device_map!r} is not supported; use --device-map auto", param_hint="--device-map")
    if device_map and backends.resolve(backend) != "torch":
        raise typer.BadParameter("shards a model over GPUs with accelerate, which only the torch backend uses; "
                                 "MLX runs a model on one device (drop --device-map, or pass --backend torch)",
                                 param_hint="--device-map")
    given = [s for v in kv or [] for s in v.split(",") if s.strip()]
    experiment.check_early(given, data, context, stride, model)
    runner = experiment.load_runner(backend, model, "auto" if device_map else device)
    texts = given or default_specs(runner.shape.head_dim)
    specs = experiment.parse_specs(texts, runner.shape.head_dim)
    setup = experiment.make_setup(runner, data, max_tokens, context, stride, chunk, lastword, seed)
    bases = experiment.ensure_bases(runner, specs, data, calib_tokens, recalibrate)
    result = experiment.report(setup, experiment.run_specs(setup, specs, bases), command=experiment.command_line("ppl"))
    if as_json:
        print(json.dumps(result))
    else:
        print_table(result, lastword > 0)


def num(x: float, sign: str = "") -> str:
    """Perplexities without exponents: 2 decimals below 100, 1 below 10,000, none above."""
    digits = 2 if abs(x) < 100 else 1 if abs(x) < 10_000 else 0
    return f"{x:{sign},.{digits}f}"


def where(report: dict[str, Any]) -> str:
    """The device, or the layers per device of a sharded model ("cuda:0 x15 + cuda:1 x15 layers")."""
    if "placement" not in report:
        return report["device"]
    return " + ".join(f"{d} x{n}" for d, n in report["placement"].items()) + " layers"


def print_table(report: dict[str, Any], lastword: bool) -> None:
    table = Table(title=f"{report['model']} on {report['data']}: {report['results'][0]['tokens']:,} scored tokens, "
                  f"context {report['context']}, {report['backend']} on {where(report)}")
    for col in ("spec", "bits/el", "KV MB", "PPL (95% CI)", "ΔPPL vs fp16", "tok/s", "peak MB"):
        table.add_column(col, justify="left" if col == "spec" else "right", no_wrap=True)
    if lastword:
        table.add_column("last word (95% CI)", justify="right", no_wrap=True)
    for r in report["results"]:
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 1e6:,.0f}"
        cells = [
            r["spec"],
            f"{r['bits_per_element']:.2f}",
            f"{r['kv_bytes'] / 1e6:.2f}",
            f"{num(r['ppl'])} ({num(r['ppl_ci'][0])}-{num(r['ppl_ci'][1])})",
            f"{num(r['delta_ppl'], '+')} ({r['delta_ppl_pct']:+.1f}%)",
            f"{r['tokens_per_s']:,.0f}",
            peak,
        ]
        if lastword:
            lo, hi = r["lastword_ci"]
            cells.append(f"{100 * r['lastword_accuracy']:.0f}% of {r['lastword_n']} ({100 * lo:.0f}-{100 * hi:.0f})")
        table.add_row(*cells)
    # Files and pipes get the whole table on one line per row; terminals keep their own width.
    console = Console() if sys.stdout.isatty() else Console(width=140)
    console.print(table)
    err.print(PROTOCOL, style="dim")
