"""`kvmlx sweep`: quantization vs rank reduction vs hybrids at matched storage, on the same tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

import kvspec
from kvspec.budget import bits_per_element, matched_rank
from kvspec.models import DEFAULT_MODEL
from kvspec.spec import BASES, GROUP_SIZES, QUANT_BITS

from . import backend as backends
from . import bases as basis_store
from . import experiment, fanout, plots

console = Console()


def configs_at(budget: float, head_dim: int) -> list[tuple[str, str]]:
    """(family, spec) pairs storing at most `budget` bits per element (long-context limit):
    quantized specs that hit the budget exactly, the largest rank, and the largest hybrid ranks."""
    out = []
    for bits in QUANT_BITS:
        for group in GROUP_SIZES:
            if head_dim % group == 0 and abs(bits + 32 / group - budget) < 1e-9:
                out += [("int (token)", f"int{bits}-g{group}"), ("int (K per channel)", f"int{bits}-g{group}-kchan")]
    try:
        out.append(("rank", f"rank{matched_rank(budget, head_dim)}"))
    except kvspec.SpecError:
        pass
    for coeff_bits in (8, 4):
        try:
            r = matched_rank(budget, head_dim, coeff_bits=coeff_bits)
        except kvspec.SpecError:
            continue
        if r < head_dim:  # at full rank a hybrid reduces nothing: it is quantization in another basis
            out.append((f"hybrid (q{coeff_bits})", f"rank{r}-q{coeff_bits}"))
    return [(family, kvspec.format(kvspec.parse(text))) for family, text in out]


def sweep(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Alias, HF id, local dir or .gguf file."),
    budgets: str = typer.Option("2.5,3.5,4.5,8.5", "--budgets", help="Comma-separated storage budgets in bits per element."),
    basis_ablation: int = typer.Option(0, "--basis-ablation", min=0, help="Also run rank R with every basis (pca, random, identity, hadamard)."),
    extra: list[str] = typer.Option(None, "--kv", help="Extra specs to include (repeatable)."),
    data: str = typer.Option("bbc", "--data", help="Corpus (see `kvmlx data list`)."),
    max_tokens: int = typer.Option(16384, "--max-tokens", min=16, help="Evaluation tokens."),
    context: int = typer.Option(1024, "--context", min=2, help="Tokens per window."),
    stride: int = typer.Option(None, "--stride", help="New targets per window after the first."),
    chunk: int = typer.Option(256, "--chunk", min=1, help="Prefill chunk size."),
    lastword: int = typer.Option(0, "--lastword", min=0, help="LAMBADA-style final-word test on N paragraphs (not the human-filtered LAMBADA)."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    backend: str = typer.Option("auto", "--backend", help="auto, mlx or torch."),
    device: str = typer.Option(None, "--device", help="Device for the torch backend."),
    calib_tokens: int = typer.Option(8192, "--calib-tokens", min=64, help="Calibration tokens for PCA bases."),
    gpus: int = typer.Option(0, "--gpus", min=0, help="Fan the specs out over N GPUs (cuda:0..N-1), one worker each (torch backend)."),
    workers: int = typer.Option(0, "--workers", min=0, help="Fan the specs out over N worker processes on --device (e.g. CPU)."),
    out: Path = typer.Option(None, "--out", help="Output prefix (default benchmarks/results/sweep-<model>-<data>)."),
) -> None:
    """Matched-budget sweep: writes <out>.json, <out>.md and <out>.png."""
    if gpus and backends.resolve(backend) != "torch":
        raise typer.BadParameter("fans out over CUDA GPUs, which only the torch backend uses; "
                                 "pass --backend torch, or --workers N for MLX worker processes", param_hint="--gpus")
    devices = fanout_devices(gpus, workers, device)
    experiment.check_early(list(extra or []), data, context, stride, model)
    runner = experiment.load_runner(backend, model, "cpu" if devices else device)
    try:
        budget_list = [float(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise typer.BadParameter(f"{budgets!r} is not a comma-separated list of numbers", param_hint="--budgets") from None
    families: dict[str, tuple[str, float | None]] = {}
    for b in budget_list:
        found = configs_at(b, runner.shape.head_dim)
        if not found:
            raise typer.BadParameter(f"no spec stores {b} bits per element at head dim {runner.shape.head_dim}", param_hint="--budgets")
        for family, text in found:
            families.setdefault(text, (family, b))
    for basis in BASES if basis_ablation else ():
        text = kvspec.format(kvspec.parse(f"rank{basis_ablation}-{basis}"))
        families.setdefault(text, (f"basis ablation (rank {basis_ablation})", None))
    for text in extra or []:
        families.setdefault(kvspec.format(kvspec.parse(text)), ("extra", None))
    specs = experiment.parse_specs(list(families), runner.shape.head_dim)
    setup = experiment.make_setup(runner, data, max_tokens, context, stride, chunk, lastword, seed)
    bases = experiment.ensure_bases(runner, specs, data, calib_tokens)
    failures: list[dict[str, str]] = []
    if devices:
        job = fanout.Job(backend, model, data, max_tokens, context, stride, chunk, lastword, seed,
                         tuple(kvspec.format(s) for s in specs), devices,
                         str(basis_store.bases_path(runner.name, runner.fingerprint)) if bases is not None else None, "")
        results, failures = fanout.run(job, lambda msg: console.print(f"[yellow]{msg}[/]"))
        if not results or results[0][0]["spec"] != "fp16":
            raise typer.Exit(_report_failures(failures) or 1)
        rows = experiment.with_intervals([r for r, _ in results], [n for _, n in results], seed)
    else:
        rows = experiment.run_specs(setup, specs, bases)
    for row in rows:
        family, budget = families.get(row["spec"], ("baseline", None))
        row["family"], row["budget"] = family, budget
        row["bits_per_element_limit"] = bits_per_element(kvspec.parse(row["spec"]), runner.shape.head_dim).total
    report = experiment.report(setup, rows, devices, budgets=budget_list, command=experiment.command_line("sweep"),
                               workers=list(devices), failures=failures)
    prefix = out or Path("benchmarks/results") / f"sweep-{_slug(runner.name)}-{_slug(data)}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # Suffixes appended, not substituted: "sweep-qwen2.5-0.5b-bbc" has a dot of its own.
    Path(f"{prefix}.json").write_text(json.dumps(report, indent=1))
    Path(f"{prefix}.md").write_text(markdown(report))
    console.print(markdown(report))
    try:
        plots.plot_sweeps([report], Path(f"{prefix}.png"))
        console.print(f"wrote {prefix}.json, .md, .png")
    except RuntimeError as e:  # the numbers are written; only the picture needs matplotlib
        console.print(f"wrote {prefix}.json, .md; [yellow]no plot: {e}[/]")
    if failures:
        raise typer.Exit(_report_failures(failures))


def fanout_devices(gpus: int, workers: int, device: str | None) -> tuple[str, ...]:
    """Worker devices: cuda:0..N-1 for --gpus N, N copies of --device for --workers N, else none."""
    if gpus and workers:
        raise typer.BadParameter("give --gpus or --workers, not both", param_hint="--gpus")
    if gpus:
        import torch

        have = torch.cuda.device_count()
        if gpus > have:
            raise typer.BadParameter(f"--gpus {gpus} but {have} CUDA device(s) are visible", param_hint="--gpus")
        return tuple(f"cuda:{i}" for i in range(gpus))
    return tuple([device or "cpu"] * workers) if workers > 1 else ()


def _report_failures(failures: list[dict[str, str]]) -> int:
    for f in failures:
        console.print(f"[red]{f['spec']} failed twice: {f['error']}[/]")
    return 1 if failures else 0


def markdown(report: dict[str, Any]) -> str:
    lw = any("lastword_accuracy" in r for r in report["results"])
    head = "| budget | family | spec | bits/el | PPL | ΔPPL [95% CI] |" + (" last word |" if lw else "")
    lines = [
        f"{report['model']} on {report['data']} ({report['results'][0]['tokens']:,} scored tokens, context "
        f"{report['context']}, {report['backend']}/{report['device']}, {report.get('hardware', '?')})",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in report["results"]:
        budget = "-" if r.get("budget") is None else f"{r['budget']:g}"
        cells = [budget, r.get("family", ""), f"`{r['spec']}`", f"{r['bits_per_element_limit']:.3g}", f"{r['ppl']:.3f}",
                 f"{r['delta_ppl']:+.3f} ({r['delta_ppl_pct']:+.1f}%) [{r['delta_ppl_ci'][0]:+.3f}, {r['delta_ppl_ci'][1]:+.3f}]"]
        if lw:
            cells.append(f"{100 * r['lastword_accuracy']:.1f}% (n={r['lastword_n']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(text).name)

