"""`kvmlx chat`: a streaming chat through a compressed KV cache."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

import kvspec
from kvspec.budget import kv_bytes
from kvspec.models import DEFAULT_MODEL, resolve_alias

from . import bases as basis_store
from . import experiment

err = Console(stderr=True)
HELP = ("/stats  cache size vs fp16   /reset  new conversation   /save PATH  write the cache   /quit  leave"
        "   (Ctrl-C stops an answer)")


def chat(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Alias, HF id, local dir or .gguf file."),
    kv: str = typer.Option("int4", "--kv", help="KV spec of the cache (see `kvmlx spec list`)."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Answer this one message and exit (for scripts)."),
    system: str = typer.Option(None, "--system", help="System message."),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Most tokens per answer."),
    backend: str = typer.Option("auto", "--backend", help="auto (MLX on Apple Silicon, else torch), mlx or torch."),
    device: str = typer.Option(None, "--device", help="Device for the torch backend (cpu, cuda)."),
    data: str = typer.Option("bbc", "--calib-data", help="Calibration text for PCA bases of rank specs."),
    load_cache: Path = typer.Option(None, "--load-cache", help="Start from a saved cache (kvspec file, either backend); a conversation that begins with its tokens reuses them."),
    save_cache: Path = typer.Option(None, "--save-cache", help="Write the cache to this file when the chat ends."),
) -> None:
    """Chat with a model whose KV cache is compressed per --kv."""
    alias = resolve_alias(model)
    experiment.check_spec(kv, alias.shape.head_dim if alias else None)  # before the slow load
    runner = experiment.load_runner(backend, model, device)
    spec = experiment.check_spec(kv, runner.shape.head_dim)
    bases = experiment.ensure_bases(runner, [spec], data, 8192)
    spec_bases = basis_store.for_spec(bases, spec, runner.shape.layers) if bases is not None else None
    cache = runner.new_cache(spec, spec_bases) if load_cache is None else loaded(runner, load_cache, spec)
    try:
        converse(runner, spec, cache, system, prompt, max_tokens, save_cache)
    finally:
        if save_cache is not None:
            runner.save_cache(cache, str(save_cache))
            err.print(f"saved {runner.cache_tokens(cache):,} tokens of {kvspec.format(spec)} cache to {save_cache}")


def loaded(runner, path: Path, spec: kvspec.KVSpec):
    from kvspec.cachefile import CacheFileError

    try:
        cache = runner.load_cache(str(path))
    except CacheFileError as e:
        raise typer.BadParameter(str(e), param_hint="--load-cache") from None
    if kvspec.format(cache.spec) != kvspec.format(spec):
        raise typer.BadParameter(f"{path} holds a {kvspec.format(cache.spec)} cache; pass --kv {kvspec.format(cache.spec)}",
                                 param_hint="--load-cache")
    return cache


def converse(runner, spec, cache, system, prompt, max_tokens, save_to) -> None:
    """One-shot answer, or the REPL until /quit or end of input."""
    messages = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        messages.append({"role": "user", "content": prompt})
        answer(runner, messages, cache, max_tokens)
        return
    err.print(f"[bold]{runner.name}[/] with a {kvspec.format(spec)} KV cache on {runner.backend}/{runner.device}. {HELP}")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        command = line.strip()
        if command == "/quit":
            return
        if command == "/reset":
            messages = messages[:1] if system else []
            cache.reset()  # both backends' caches empty themselves in place
            err.print("conversation cleared")
            continue
        if command == "/stats":
            print_stats(runner, spec, cache)
            continue
        if command.startswith("/save"):
            target = command[len("/save"):].strip() or (str(save_to) if save_to else "")
            if not target:
                err.print("usage: /save PATH")
                continue
            runner.save_cache(cache, target)
            err.print(f"saved {runner.cache_tokens(cache):,} tokens to {target}")
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        answer(runner, messages, cache, max_tokens)


def answer(runner, messages: list[dict[str, str]], cache, max_tokens: int) -> None:
    """Stream one answer; Ctrl-C stops it and keeps what was said so far in the conversation."""
    pieces = []
    stream = runner.stream_chat(messages, cache, max_tokens)
    try:
        for piece in stream:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
        err.print("\n[stopped]")
    print()
    messages.append({"role": "assistant", "content": "".join(pieces)})


def print_stats(runner, spec, cache) -> None:
    tokens = runner.cache_tokens(cache)
    used = runner.cache_bytes(cache)
    fp16 = kv_bytes(kvspec.parse("fp16"), runner.shape, max(tokens, 1)) if tokens else 0
    ratio = f"{fp16 / used:.2f}x smaller" if used else "-"
    err.print(f"{tokens:,} tokens in the cache; {used / 1e6:.2f} MB as {kvspec.format(spec)} vs {fp16 / 1e6:.2f} MB in fp16 ({ratio})")
