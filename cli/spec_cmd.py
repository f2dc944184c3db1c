"""`kvmlx spec`: parse a KV spec and show what it stores and costs."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

import kvspec
from kvspec.budget import ModelShape, bits_per_element, bytes_per_token, kv_bytes
from kvspec.models import ALIASES, DEFAULT_MODEL, resolve_alias
from kvspec.spec import Float, Quant, TensorSpec

app = typer.Typer(help="Parse KV specs and show their storage cost.", no_args_is_help=True)
console = Console()


def parse_shape(text: str) -> ModelShape:
    try:
        layers, heads, dim = (int(x) for x in text.split(","))
        return ModelShape(layers=layers, kv_heads=heads, head_dim=dim)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not LAYERS,KV_HEADS,HEAD_DIM (e.g. 32,8,128)") from None


def resolve_shape(model_shape: str | None, model: str | None) -> tuple[ModelShape, str]:
    if model_shape and model:
        raise typer.BadParameter("give --model-shape or --model, not both")
    if model_shape:
        return parse_shape(model_shape), f"shape {model_shape}"
    name = model or DEFAULT_MODEL
    alias = resolve_alias(name)
    if alias is None:
        raise typer.BadParameter(f"unknown model {name!r}; known: {', '.join(ALIASES)} (or pass --model-shape L,H,D)")
    return alias.shape, alias.name


def describe_tensor(t: TensorSpec) -> str:
    if isinstance(t, Float):
        return "float"
    if isinstance(t, Quant):
        rot = f", Hadamard rotation (seed {t.rotation})" if t.rotation is not None else ""
        return f"int{t.bits}, group {t.group} along {'head dim' if t.axis == 'token' else 'tokens'}{rot}"
    coeff = f", coefficients int{t.coeff.bits} group {t.coeff.group}" if t.coeff else ""
    return f"rank {t.rank}, {t.basis} basis{coeff}"


@app.command()
def describe(
    spec: str = typer.Argument(..., help="A KV spec string, e.g. int4-g64, k8v4, rank32."),
    model_shape: str = typer.Option(None, "--model-shape", help="LAYERS,KV_HEADS,HEAD_DIM, e.g. 32,8,128."),
    model: str = typer.Option(None, "--model", help=f"A model alias ({', '.join(ALIASES)}); default {DEFAULT_MODEL}."),
    context: int = typer.Option(32768, "--context", help="Context length for totals and the window's share."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Print the parsed spec, bits per element (K, V, total) and KV bytes per token and per context."""
    try:
        parsed = kvspec.parse(spec)
        shape, label = resolve_shape(model_shape, model)
        bits = bits_per_element(parsed, shape.head_dim)
        bits_ctx = bits_per_element(parsed, shape.head_dim, context)
    except kvspec.SpecError as e:
        raise typer.BadParameter(str(e)) from None
    fp16 = kvspec.parse("fp16")
    row = {
        "spec": kvspec.format(parsed),
        "model": label,
        "k": describe_tensor(parsed.k),
        "v": describe_tensor(parsed.v),
        "residual_tokens": parsed.residual,
        "float_dtype": parsed.float_dtype,
        "bits_per_element": {"k": bits.k, "v": bits.v, "total": bits.total},
        "bits_per_element_at_context": {"k": bits_ctx.k, "v": bits_ctx.v, "total": bits_ctx.total},
        "bytes_per_token": bytes_per_token(parsed, shape),
        "fp16_bytes_per_token": bytes_per_token(fp16, shape),
        "context": context,
        "kv_bytes_at_context": kv_bytes(parsed, shape, context),
        "fp16_kv_bytes_at_context": kv_bytes(fp16, shape, context),
    }
    if as_json:
        print(json.dumps(row))
        return
    table = Table(title=f"{row['spec']} on {label} ({shape.layers} layers, {shape.kv_heads} KV heads, head dim {shape.head_dim})")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("K", row["k"])
    table.add_row("V", row["v"])
    table.add_row("float window", f"last {parsed.residual} tokens ({parsed.float_dtype})")
    table.add_row("bits/element K, V, total", f"{bits.k:.4g}, {bits.v:.4g}, {bits.total:.4g}")
    table.add_row(f"bits/element at {context:,} tokens", f"{bits_ctx.total:.4g}")
    table.add_row("KV bytes per token", f"{row['bytes_per_token']:,.0f} (fp16: {row['fp16_bytes_per_token']:,.0f})")
    table.add_row(
        f"KV bytes at {context:,} tokens",
        f"{row['kv_bytes_at_context']:,} (fp16: {row['fp16_kv_bytes_at_context']:,}, "
        f"{row['fp16_kv_bytes_at_context'] / row['kv_bytes_at_context']:.2f}x smaller)",
    )
    console.print(table)


@app.command("list")
def list_methods() -> None:
    """Show the methods, the options of the spec grammar, and examples."""
    table = Table(title="KV spec grammar: head(-option)*  (a k/v prefix applies an option to K or V only)")
    table.add_column("form")
    table.add_column("meaning")
    for form, meaning in (
        ("fp16, bf16", "uncompressed baseline"),
        ("int2, int3, int4, int8", "K and V quantized to 2/3/4/8 bits (asymmetric, fp16 scale+bias per group)"),
        ("k8v4, k16v4, krank48vrank16", "K and V apart (16 = kept in float)"),
        ("rank32", "K and V projected to rank 32 (basis per layer and KV head)"),
        ("-g32, -g64, -g128", "group size (default 64)"),
        ("-tok, -chan (-kchan)", "groups along the head dim (default) or along tokens (KIVI-style keys)"),
        ("-rot, -rot7", "randomized Hadamard rotation of the head dim (seed 0, or the given seed)"),
        ("-q4", "quantize rank coefficients (hybrid), one group per token unless -gN"),
        ("-pca, -random, -identity, -hadamard", "low-rank basis (default pca, from `kvmlx calibrate`)"),
        ("-res128", "keep the last 128 tokens in float"),
        ("-bf16", "float parts in bf16 instead of fp16"),
    ):
        table.add_row(form, meaning)
    console.print(table)
    console.print("examples: " + ", ".join(kvspec.EXAMPLES))
