"""The evaluation engine shared by `kvmlx ppl` and `kvmlx sweep`: one runner, one token stream,
every spec on the same tokens, paired bootstrap against the fp16 row."""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import kvspec
from kvspec.budget import bits_per_element
from kvspec.models import resolve_alias

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


@dataclass
class Setup:
    """Everything fixed across the specs of one run."""

    runner: Any
    data: str
    tokens: np.ndarray
    context: int
    stride: int
    chunk: int
    seed: int = 0
    lastword_items: list[evaluate.LastWordItem] = field(default_factory=list)


def load_runner(backend: str, model: str, device: str | None):
    from kvspec.models import ModelNotAvailable

    with err.status(f"loading {model}"):
        try:
            return backends.runner(backend, model, **({"device": device} if device else {}))
        except (ModelNotAvailable, FileNotFoundError, ValueError, OSError) as e:
            raise typer.BadParameter(str(e), param_hint="--model") from None


def load_tokens(runner, data: str, max_tokens: int, part: str = "eval") -> np.ndarray:
    try:
        corpus = corpora.load(data)
    except corpora.CorpusError as e:
        raise typer.BadParameter(str(e), param_hint="--data") from None
    text = corpus.text(part)
    # Tokenize a prefix comfortably longer than needed (about 4 characters a token), not the corpus.
    tokens = np.asarray(runner.tokenize(text[: max(8 * max_tokens, 10_000)]), dtype=np.int64)[:max_tokens]
    if len(tokens) < 16:
        raise typer.BadParameter(f"only {len(tokens)} tokens of text in {data}; need at least 16", param_hint="--data")
    return tokens


def check_early(spec_texts: list[str], data: str, context: int, stride: int | None, model: str | None = None) -> None:
    """Usage errors that need no model, raised before the (slow) model load: for an alias `model`,
    also the specs against its head dim and the context against its length."""
    alias = resolve_alias(model) if model else None
    if stride is not None and stride > context:
        raise typer.BadParameter(f"--stride {stride} exceeds --context {context}", param_hint="--stride")
    try:
        corpora.load(data)
    except corpora.CorpusError as e:
        raise typer.BadParameter(str(e), param_hint="--data") from None
    for text in spec_texts:
        check_spec(text, alias.shape.head_dim if alias else None)
    if alias:
        check_context(context, alias.max_positions)


def check_spec(text: str, head_dim: int | None) -> kvspec.KVSpec:
    """The parsed spec (checked against `head_dim` when given); a bad one is a usage error naming the fix."""
    try:
        spec = kvspec.parse(text)
        if head_dim is not None:
            spec.check_head_dim(head_dim)
    except kvspec.SpecError as e:
        raise typer.BadParameter(str(e), param_hint="--kv") from None
    return spec


def check_context(context: int, max_positions: int | None) -> None:
    if max_positions and context > max_positions:
        raise typer.BadParameter(f"--context {context} exceeds the model's {max_positions} positions", param_hint="--context")


def make_setup(runner, data: str, max_tokens: int, context: int, stride: int | None, chunk: int, lastword: int, seed: int) -> Setup:
    stride = stride or context
    if stride > context:
        raise typer.BadParameter(f"--stride {stride} exceeds --context {context}", param_hint="--stride")
    check_context(context, runner.max_context)
    tokens = load_tokens(runner, data, max_tokens)
    setup = Setup(runner, data, tokens, min(context, len(tokens)), min(stride, len(tokens)), chunk, seed)
    if lastword:
        paras = corpora.load(data).paragraphs()
        setup.lastword_items = evaluate.lastword_items(paras, runner.tokenize, lastword)
    return setup


def parse_specs(texts: list[str], head_dim: int) -> list[kvspec.KVSpec]:
    """fp16 first, then each distinct spec; a bad spec is a usage error naming the fix."""
    specs = [kvspec.parse("fp16")]
    for text in texts:
        spec = check_spec(text, head_dim)
        if spec not in specs:
            specs.append(spec)
    return specs


def ensure_bases(runner, specs, data: str, calib_tokens: int, recalibrate: bool = False) -> dict[str, np.ndarray] | None:
    """PCA bases for the specs that need them: loaded from the user cache, else calibrated now."""
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


def run_specs(setup: Setup, specs: list[kvspec.KVSpec], bases: dict[str, np.ndarray] | None) -> list[dict[str, Any]]:
    """One row per spec (specs[0] must be the fp16 baseline), with paired bootstrap intervals."""
    wins = evaluate.windows(len(setup.tokens), setup.context, setup.stride)
    work = sum(w.end - w.start for w in wins) + len(setup.lastword_items)
    rows, nlls = [], []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        for spec in specs:
            task = bar.add_task(f"{kvspec.format(spec):>20}", total=work)
            row, nll = run_spec(setup, spec, bases, lambda n, t=task: bar.advance(t, n))
            rows.append(row)
            nlls.append(nll)
    return with_intervals(rows, nlls, setup.seed)


def with_intervals(rows: list[dict[str, Any]], nlls: list[np.ndarray], seed: int) -> list[dict[str, Any]]:
    """Add bootstrap intervals and ΔPPL against rows[0] (the fp16 baseline, on the same tokens)."""
    base = rows[0]
    for row, nll in zip(rows, nlls):
        row.update(evaluate.bootstrap_ppl(nll, seed, baseline=None if row is base else nlls[0]))
        row["delta_ppl"] = row["ppl"] - base["ppl"]
        row["delta_ppl_pct"] = 100 * row["delta_ppl"] / base["ppl"]
        row.setdefault("delta_ppl_ci", [0.0, 0.0])
    return rows


def run_spec(setup: Setup, spec: kvspec.KVSpec, bases, advance=None) -> tuple[dict[str, Any], np.ndarray]:
    """One spec's row (without intervals) and its per-token NLLs [N]."""
    runner = setup.runner
    spec_bases = basis_store.for_spec(bases, spec, runner.shape.layers) if bases is not None else None
    cache_bytes = []

    def nll_fn(window):
        cache = runner.new_cache(spec, spec_bases)
        out = runner.nll(window, cache, setup.chunk)
        cache_bytes.append(runner.cache_bytes(cache))
        return out

    runner.reset_peak_memory()
    res = evaluate.evaluate_ppl(nll_fn, setup.tokens, setup.context, setup.stride, advance)
    row = {
        "spec": kvspec.format(spec),
        "method": spec.method,
        "bits_per_element": bits_per_element(spec, runner.shape.head_dim, setup.context).total,
        "kv_bytes": max(cache_bytes),
        "ppl": res.ppl,
        "nll": float(res.nll.mean()),
        "tokens": int(len(res.nll)),
        "tokens_per_s": res.tokens_processed / res.seconds,
        "peak_memory_bytes": runner.peak_memory(),
    }
    if setup.lastword_items:
        def greedy(ctx, n):
            return runner.greedy(ctx, runner.new_cache(spec, spec_bases), n)

        row.update(evaluate.lastword_accuracy(setup.lastword_items, greedy, advance))
    return row, res.nll


def report(setup: Setup, rows: list[dict[str, Any]], devices: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """The JSON report; `devices` are the fan-out workers' devices when the rows were computed there."""
    r = setup.runner
    device = devices[0] if devices else str(r.device)
    return {
        "model": r.name,
        "backend": r.backend,
        "device": device,
        "hardware": hardware_name(device),
        "machine": f"{platform.system()} {platform.machine()}",
        "data": setup.data,
        "context": setup.context,
        "stride": setup.stride,
        "chunk": setup.chunk,
        **({"placement": r.placement} if getattr(r, "placement", None) else {}),
        "protocol": PROTOCOL,
        **extra,
        "results": rows,
    }


def command_line(name: str) -> str:
    """The command as typed (`kvmlx <name> <arguments>`), for the report."""
    return f"kvmlx {name} " + " ".join(sys.argv[2:])


def hardware_name(device: str) -> str:
    """The accelerator's name for a CUDA device, else the CPU's (what a result was measured on)."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()
