"""`kvmlx ppl`: perplexity through compressed KV caches, every spec on the same tokens."""

from __future__ import annotations

import json
import platform
import sys
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import kvspec
from kvspec.budget import bits_per_element, matched_rank
from kvspec.models import DEFAULT_MODEL

from . import backend as backends
from . import bases as basis_store
from . import corpora, evaluate

PROTOCOL = (
    "Windows of up to --context tokens, each from an empty cache, fed through the cache in chunks of "
    "--chunk tokens; each token attends to the cache exactly as token-by-token decoding would (earlier "
    "tokens compressed per the spec), so the PPL is that of decoding through the cache. Every token "
    "after the first is scored once; later windows score --stride new tokens with the rest as context."
)

err = Console(stderr=True)


def default_specs(head_dim: int) -> list[str]:
    """int8, int4, int2 and the rank that stores as many bits per element as int4."""
    int4_bits = bits_per_element(kvspec.parse("int4"), head_dim).total
    return ["int8", "int4", "int2", f"rank{matched_rank(int4_bits, head_dim)}"]


def parse_specs(values: list[str] | None, head_dim: int) -> list[kvspec.KVSpec]:
    texts = [s for v in values or [] for s in v.split(",") if s.strip()] or default_specs(head_dim)
    specs = []
    for text in texts:
        try:
            spec = kvspec.parse(text)
            spec.check_head_dim(head_dim)
        except kvspec.SpecError as e:
            raise typer.BadParameter(str(e), param_hint="--kv") from None
        if not spec.is_baseline and spec not in specs:
            specs.append(spec)
    return [kvspec.parse("fp16")] + specs


def load_tokens(runner, data: str, max_tokens: int, part: str = "eval") -> np.ndarray:
    try:
        corpus = corpora.load(data)
    except corpora.CorpusError as e:
        raise typer.BadParameter(str(e), param_hint="--data") from None
    text = corpus.text(part)
    # Tokenize a prefix a little longer than needed, not the whole corpus.
    chars = max(4 * max_tokens * 2, 10_000)
    tokens = np.asarray(runner.tokenize(text[:chars]), dtype=np.int64)[:max_tokens]
    return tokens


def ensure_bases(runner, specs, data: str, calib_tokens: int, recalibrate: bool) -> dict[str, np.ndarray] | None:
    if not any(basis_store.needs_pca(s) for s in specs):
        return None
    path = basis_store.bases_path(runner.name, runner.fingerprint)
    if path.is_file() and not recalibrate:
        return basis_store.load(path, runner.fingerprint)
    tokens = load_tokens(runner, data, calib_tokens, part="calib")
    err.print(f"calibrating PCA bases on {len(tokens):,} calibration tokens of {data} -> {path}")
    tensors = basis_store.calibrate(runner.activations(tokens))
    basis_store.save(path, tensors, runner.name, runner.fingerprint, len(tokens), data)
    return tensors


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err, transient=True,
    )


def run_spec(runner, spec, tokens, bases, args, bar, task) -> dict[str, Any]:
    spec_bases = basis_store.for_spec(bases, spec, runner.shape.layers) if bases is not None else None
    cache_bytes = []

    def nll_fn(window):
        cache = runner.new_cache(spec, spec_bases)
        out = runner.nll(window, cache, args["chunk"])
        cache_bytes.append(runner.cache_bytes(cache))
        return out

    runner.reset_peak_memory()
    res = evaluate.evaluate_ppl(nll_fn, tokens, args["context"], args["stride"], lambda n: bar.advance(task, n))
    row = {
        "spec": kvspec.format(spec),
        "bits_per_element": bits_per_element(spec, runner.shape.head_dim, args["context"]).total,
        "kv_bytes": max(cache_bytes),
        "ppl": res.ppl,
        "nll": float(res.nll.mean()),
        "tokens": int(len(res.nll)),
        "tokens_per_s": res.tokens_processed / res.seconds,
        "peak_memory_bytes": runner.peak_memory(),
    }
    if args["lastword"]:
        row.update(run_lastword(runner, spec, spec_bases, args, bar, task))
    return row, res.nll


def run_lastword(runner, spec, spec_bases, args, bar, task) -> dict[str, Any]:
    def greedy(ctx, n):
        return runner.greedy(ctx, runner.new_cache(spec, spec_bases), n)

    return evaluate.lastword_accuracy(args["lastword_items"], greedy, lambda n: bar.advance(task, n))


def ppl(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Alias (smollm2-135m, qwen2.5-0.5b, gemma3-270m, mistral-7b), HF id, local dir or .gguf file."),
    kv: list[str] = typer.Option(None, "--kv", help="KV spec(s), repeatable or comma-separated; fp16 always runs. Default: int8, int4, int2 and the rank matching int4's bits."),
    data: str = typer.Option("bbc", "--data", help="bbc (default, bundled), austen, botchan (`kvmlx data fetch`), or a text file."),
    max_tokens: int = typer.Option(4096, "--max-tokens", min=16, help="Evaluation tokens taken from the start of the corpus's evaluation part."),
    context: int = typer.Option(1024, "--context", min=2, help="Tokens per window."),
    stride: int = typer.Option(None, "--stride", help="New targets scored per window after the first (default --context; at most context - 1 take effect)."),
    chunk: int = typer.Option(256, "--chunk", min=1, help="Prefill chunk size: tokens fed through the cache per forward."),
    lastword: int = typer.Option(0, "--lastword", min=0, help="Also run a LAMBADA-style final-word test on N paragraphs of 60-160 words from --data (not the human-filtered LAMBADA)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resampling."),
    backend: str = typer.Option("auto", "--backend", help="auto (MLX on Apple Silicon, else torch), mlx or torch."),
    device: str = typer.Option(None, "--device", help="Device for the torch backend (cpu, cuda); default: cuda if available."),
    calib_tokens: int = typer.Option(8192, "--calib-tokens", min=64, help="Calibration tokens for PCA bases (taken from --data's calibration part)."),
    recalibrate: bool = typer.Option(False, "--recalibrate", help="Recompute PCA bases even if saved ones exist."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with a `results` list to stdout."),
) -> None:
    """Perplexity (with bootstrap 95% intervals) through compressed KV caches, against the fp16 cache."""
    stride = stride or context
    if stride > context:
        raise typer.BadParameter(f"--stride {stride} exceeds --context {context}", param_hint="--stride")
    options = {"device": device} if device else {}
    runner = load_runner(backend, model, options)
    max_ctx = runner.max_context
    if max_ctx and context > max_ctx:
        raise typer.BadParameter(f"--context {context} exceeds the model's {max_ctx} positions", param_hint="--context")
    specs = parse_specs(kv, runner.shape.head_dim)
    tokens = load_tokens(runner, data, max_tokens)
    if len(tokens) < 16:
        raise typer.BadParameter(f"only {len(tokens)} tokens of text in {data}; need at least 16", param_hint="--data")
    bases = ensure_bases(runner, specs, data, calib_tokens, recalibrate)
    args = {"context": min(context, len(tokens)), "stride": min(stride, len(tokens)), "chunk": chunk, "lastword": lastword}
    work = sum(w.end - w.start for w in evaluate.windows(len(tokens), args["context"], args["stride"]))
    if lastword:
        paras = corpora.load(data).paragraphs()
        args["lastword_items"] = evaluate.lastword_items(paras, runner.tokenize, lastword)
        work += len(args["lastword_items"])
    rows, nlls = [], []
    with progress_bar() as bar:
        for spec in specs:
            task = bar.add_task(f"{kvspec.format(spec):>16}", total=work)
            row, nll = run_spec(runner, spec, tokens, bases, args, bar, task)
            rows.append(row)
            nlls.append(nll)
    base = rows[0]
    for row, nll in zip(rows, nlls):
        row.update(evaluate.bootstrap_ppl(nll, seed, baseline=None if row is base else nlls[0]))
        row["delta_ppl"] = row["ppl"] - base["ppl"]
        row["delta_ppl_pct"] = 100 * row["delta_ppl"] / base["ppl"]
        if row is base:
            row["delta_ppl_ci"] = [0.0, 0.0]
    report = {
        "model": runner.name,
        "backend": runner.backend,
        "device": runner.device,
        "machine": f"{platform.system()} {platform.machine()}",
        "data": data,
        "context": args["context"],
        "stride": args["stride"],
        "chunk": chunk,
        "protocol": PROTOCOL,
        "results": rows,
    }
    if as_json:
        print(json.dumps(report))
    else:
        print_table(report, lastword > 0)


def load_runner(backend: str, model: str, options: dict[str, Any]):
    from kvspec.models import ModelNotAvailable

    with err.status(f"loading {model}"):
        try:
            return backends.runner(backend, model, **options)
        except (ModelNotAvailable, FileNotFoundError, ValueError, OSError) as e:
            raise typer.BadParameter(str(e), param_hint="--model") from None


def print_table(report: dict[str, Any], lastword: bool) -> None:
    table = Table(title=f"{report['model']} on {report['data']}: {report['results'][0]['tokens']:,} scored tokens, "
                  f"context {report['context']}, {report['backend']} on {report['device']}")
    for col in ("spec", "bits/el", "KV MB", "PPL [95% CI]", "ΔPPL [95% CI]", "tok/s", "peak MB"):
        table.add_column(col, justify="left" if col == "spec" else "right")
    if lastword:
        table.add_column("last word", justify="right")
    for r in report["results"]:
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 1e6:,.0f}"
        cells = [
            r["spec"],
            f"{r['bits_per_element']:.2f}",
            f"{r['kv_bytes'] / 1e6:.2f}",
            f"{r['ppl']:.3f} [{r['ppl_ci'][0]:.2f}, {r['ppl_ci'][1]:.2f}]",
            f"{r['delta_ppl']:+.3f} ({r['delta_ppl_pct']:+.1f}%) [{r['delta_ppl_ci'][0]:+.2f}, {r['delta_ppl_ci'][1]:+.2f}]",
            f"{r['tokens_per_s']:,.0f}",
            peak,
        ]
        if lastword:
            cells.append(f"{100 * r['lastword_accuracy']:.1f}% of {r['lastword_n']}")
        table.add_row(*cells)
    Console().print(table)
    err.print(PROTOCOL, style="dim")
    sys.stdout.flush()
