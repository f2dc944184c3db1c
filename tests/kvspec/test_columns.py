"""kvspec.columns: every (query, visible key) in exactly one span, in a form the cache holds."""

import numpy as np
import pytest

import kvspec
from kvspec.columns import spans
from kvspec.layout import n_quantized


@pytest.mark.parametrize("text", ["int4", "int4-res5", "int4-kchan-g32-res3", "k4v2-g32-vchan", "rank16-random-res2",
                                  "int2-g32-kchan-vchan-res7"])
@pytest.mark.parametrize("t0, t1", [(0, 70), (40, 101), (96, 97)])
def test_each_visible_key_is_read_once_in_the_form_its_split_names(text, t0, t1):
    """Queries at [t0, t1) of a chunk just appended; the cache as kvspec.layout leaves it."""
    spec = kvspec.parse(text)
    k_n, v_n = (n_quantized(t, spec.residual, t1) for t in (spec.k, spec.v))
    # float tokens: the tail before the append ([n_quantized(t0), t0)) plus the chunk itself
    k_fs, v_fs = (n_quantized(t, spec.residual, t0) for t in (spec.k, spec.v))
    p = np.arange(t0, t1)[:, None]
    ks, vs = (np.array([[n_quantized(t, spec.residual, q + 1)] for q in range(t0, t1)]) for t in (spec.k, spec.v))
    seen = np.zeros((t1 - t0, t1), int)
    for sp in spans(k_n, k_fs, v_n, v_fs, t1):
        s = np.arange(sp.lo, sp.hi)[None, :]
        reads = sp.reads(s, ks, vs, p)
        seen[:, sp.lo : sp.hi] += reads
        # the form each read takes is the one the query's splits name, and the cache holds it
        assert np.all(~reads | ((s < ks) == (sp.k_form == "c")) & ((s < vs) == (sp.v_form == "c"))), sp
        assert sp.lo >= (0 if sp.k_form == "c" else k_fs) and sp.hi <= (k_n if sp.k_form == "c" else t1), sp
        assert sp.lo >= (0 if sp.v_form == "c" else v_fs) and sp.hi <= (v_n if sp.v_form == "c" else t1), sp
    np.testing.assert_array_equal(seen, np.arange(t1)[None, :] <= p)
