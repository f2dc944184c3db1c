"""Backend-agnostic evaluation: perplexity windows, bootstrap intervals, the last-word test.

Perplexity protocol (the same for every spec and backend): the token stream is cut into windows of
`context` tokens starting every `stride` tokens; each window starts with an empty cache and is fed
through it in chunks of `chunk` tokens; every token attends to the cache exactly as token-by-token
decoding would (kvspec's protocol), so the compressed K/V of earlier tokens are what it reads. Every
target token is scored exactly once, by the window that gives it the most context (see `windows`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BLOCK = 128  # tokens per bootstrap block: neighbouring tokens' losses are correlated
MIN_BLOCKS = 20  # short runs use smaller blocks so the resampling has something to resample
RESAMPLES = 1000


@dataclass(frozen=True)
class Window:
    start: int
    end: int
    scored: int  # the last `scored` targets of the window count


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """Windows of at most `context` tokens that score every target 1..n-1 exactly once: the first
    scores its context - 1 targets, each later one the next `stride` targets (at most context - 1,
    since a target needs at least one token before it) with the tokens before them as context."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), got {stride}")
    step = min(stride, context - 1)
    end = min(context, n_tokens)
    out = [Window(0, end, end - 1)] if n_tokens >= 2 else []
    while end < n_tokens:
        nxt = min(end + step, n_tokens)
        out.append(Window(max(0, nxt - context), nxt, nxt - end))
        end = nxt
    return out


@dataclass
class PplResult:
    nll: np.ndarray  # [N] float64 per scored token, natural log
    seconds: float
    tokens_processed: int

    @property
    def ppl(self) -> float:
        return math.exp(float(self.nll.mean()))


def evaluate_ppl(
    nll_fn: Callable[[np.ndarray], np.ndarray],
    tokens: np.ndarray,
    context: int,
    stride: int,
    progress: Callable[[int], None] | None = None,
) -> PplResult:
    """nll_fn(window_tokens [W]) -> NLL [W - 1] of tokens 1..W-1 through a fresh cache."""
    parts, processed = [], 0
    t0 = time.perf_counter()
    for w in windows(len(tokens), context, stride):
        nll = np.asarray(nll_fn(tokens[w.start : w.end]), dtype=np.float64)
        if nll.shape != (w.end - w.start - 1,):
            raise RuntimeError(f"backend returned {nll.shape} NLLs for a {w.end - w.start}-token window")
        parts.append(nll[-w.scored :])
        processed += w.end - w.start
        if progress:
            progress(w.end - w.start)
    return PplResult(np.concatenate(parts), time.perf_counter() - t0, processed)


def block_sums(nll: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """NLL sums and token counts of consecutive blocks (the last block may be shorter)."""
    n = len(nll)
    edges = np.arange(0, n, block)
    return np.add.reduceat(nll, edges), np.diff(np.append(edges, n))


def bootstrap_ppl(nll: np.ndarray, seed: int, baseline: np.ndarray | None = None) -> dict[str, Any]:
    """Block-bootstrap 95% intervals of PPL, and of PPL - baseline PPL when a paired baseline
    (the same tokens) is given."""
    rng = np.random.default_rng(seed)
    block = max(1, min(BLOCK, len(nll) // MIN_BLOCKS))
    sums, counts = block_sums(nll, block)
    idx = rng.integers(0, len(sums), size=(RESAMPLES, len(sums)))
    ppl = np.exp(sums[idx].sum(1) / counts[idx].sum(1))
    out = {"ppl_ci": [float(np.percentile(ppl, 2.5)), float(np.percentile(ppl, 97.5))]}
    if baseline is not None:
        bsums, _ = block_sums(baseline, block)
        base = np.exp(bsums[idx].sum(1) / counts[idx].sum(1))
        delta = ppl - base
        out["delta_ppl_ci"] = [float(np.percentile(delta, 2.5)), float(np.percentile(delta, 97.5))]
    return out


@dataclass(frozen=True)
class LastWordItem:
    context: list[int]
    target: list[int]
    word: str


def lastword_items(paragraphs: Sequence[str], tokenize: Callable[[str], list[int]], n: int) -> list[LastWordItem]:
    """The first n paragraphs as (context tokens, final-word tokens). The word is tokenized in
    context (tokens of the paragraph minus tokens of the paragraph without its last word) so that
    merges across the space are handled the way the model sees them."""
    items = []
    for para in paragraphs:
        head, _, word = para.rpartition(" ")
        word = word.strip(".,;:!?\"'()[]-")
        if not head or not word.isalpha():
            continue
        ctx = tokenize(head)
        full = tokenize(f"{head} {word}")
        if full[: len(ctx)] != ctx or len(full) == len(ctx):
            continue
        items.append(LastWordItem(ctx, full[len(ctx) :], word))
        if len(items) == n:
            break
    return items


def lastword_accuracy(
    items: Sequence[LastWordItem],
    greedy_fn: Callable[[list[int], int], list[int]],
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Greedy exact match of every token of each final word; Wilson 95% interval."""
    hits = 0
    for item in items:
        hits += greedy_fn(item.context, len(item.target)) == item.target
        if progress:
            progress(1)
    n = len(items)
    return {"lastword_accuracy": hits / n if n else float("nan"), "lastword_ci": wilson(hits, n), "lastword_n": n}


def wilson(hits: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [float("nan"), float("nan")]
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]
