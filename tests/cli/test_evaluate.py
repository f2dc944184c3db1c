"""The evaluation protocol's arithmetic: windows, bootstrap intervals, last-word items."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlx_cli import evaluate as E


@given(st.integers(2, 3000), st.integers(2, 600), st.data())
def test_windows_score_every_target_once(n, context, data):
    stride = data.draw(st.integers(1, context))
    ws = E.windows(n, context, stride)
    scored = []
    for w in ws:
        assert 0 <= w.start < w.end <= n and w.end - w.start <= context
        assert 1 <= w.scored <= w.end - w.start - 1  # every scored target has a token before it
        scored += list(range(w.end - w.scored, w.end))
    assert scored == list(range(1, n))


def test_window_arguments_checked():
    with pytest.raises(ValueError, match="stride"):
        E.windows(100, 10, 11)
    with pytest.raises(ValueError, match="context"):
        E.windows(100, 1, 1)


def test_evaluate_ppl_uses_scored_tail_of_each_window():
    tokens = np.arange(10)
    # A fake model whose NLL for target t is t: the scored set must be targets 1..9, each once.
    res = E.evaluate_ppl(lambda w: w[1:].astype(float), tokens, context=4, stride=2)
    assert sorted(res.nll.tolist()) == list(range(1, 10))
    assert res.ppl == pytest.approx(math.exp(5.0))


def test_bootstrap_interval_covers_and_pairs():
    rng = np.random.default_rng(0)
    nll = rng.gamma(2.0, 1.0, size=4096)
    out = E.bootstrap_ppl(nll, seed=1, baseline=nll - 0.01)
    lo, hi = out["ppl_ci"]
    assert lo < math.exp(nll.mean()) < hi
    # Paired: a constant shift of 0.01 nats gives a tight interval around ppl*(1 - e^-0.01).
    dlo, dhi = out["delta_ppl_ci"]
    assert 0 < dlo < dhi and dhi - dlo < 0.02 * (hi - lo)


def test_wilson():
    lo, hi = E.wilson(50, 100)
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)
    assert E.wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12)


def test_lastword_items_tokenize_word_in_context():
    vocab = {}

    def tok(text):
        return [vocab.setdefault(w, len(vocab)) for w in text.split(" ")]

    paras = ["the cat sat on the mat.", "one two", "ends with a number 42", "a b c d"]
    items = E.lastword_items(paras, tok, 10)
    assert [i.word for i in items] == ["mat", "two", "d"]
    assert items[0].target == tok("mat") and items[0].context == tok("the cat sat on the")
    acc = E.lastword_accuracy(items, lambda ctx, n: [vocab["mat"]] if n == 1 else [])
    assert acc["lastword_n"] == 3 and acc["lastword_accuracy"] == pytest.approx(1 / 3)
