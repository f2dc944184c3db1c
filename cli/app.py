"""Root of the `kvmlx` typer app: one module per verb, each importing its backend lazily."""

from __future__ import annotations

import typer

from . import calibrate_cmd, chat_cmd, data_cmd, plots, ppl_cmd, spec_cmd, sweep_cmd

app = typer.Typer(
    name="kvmlx",
    help="KV-cache compression for LLM inference: quantized and low-rank caches for MLX and PyTorch.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(spec_cmd.app, name="spec")
app.add_typer(data_cmd.app, name="data")
app.command()(chat_cmd.chat)
app.command()(calibrate_cmd.calibrate)
app.command()(sweep_cmd.sweep)
app.command()(plots.plot)
app.command(help=f"{ppl_cmd.ppl.__doc__}\n\nProtocol: {ppl_cmd.PROTOCOL}")(ppl_cmd.ppl)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
