"""Root of the `kvmlx` typer app: one module per verb, each importing its backend lazily."""

from __future__ import annotations

import typer

from . import spec_cmd

app = typer.Typer(
    name="kvmlx",
    help="KV-cache compression for LLM inference: quantized and low-rank caches for MLX and PyTorch.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(spec_cmd.app, name="spec")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
