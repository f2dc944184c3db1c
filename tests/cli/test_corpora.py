"""The bundled corpus and the evaluation/calibration split."""

import pytest

from kvmlx_cli import corpora


def test_bbc_split_is_disjoint_and_deterministic():
    try:
        c = corpora.load("bbc")
    except corpora.CorpusError as e:
        pytest.skip(f"BBC corpus not installed here: {e}")
    ev, cal = c.split("eval"), c.split("calib")
    assert len(ev) + len(cal) == len(c.documents) > 2100  # 2,225 files, some repeated verbatim
    assert not set(ev) & set(cal)
    assert c.text("eval").startswith("Ad sales boost Time Warner profit")
    paras = c.paragraphs()
    assert len(paras) > 1000 and all(60 <= len(p.split()) <= 160 for p in paras)


def test_text_file_and_errors(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("para one\n\npara two\n\n" * 10)
    assert "para two" in corpora.load(str(p)).text("eval")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(corpora.CorpusError, match="no text"):
        corpora.load(str(tmp_path / "empty.txt"))
    with pytest.raises(corpora.CorpusError, match="use one of bbc"):
        corpora.load("nope")
    if not _hub_reachable():  # offline machines (CI): a clear error instead of retries
        with pytest.raises(corpora.CorpusError, match="hub, which is unreachable"):
            corpora.load("wikitext2")


def _hub_reachable() -> bool:
    from kvspec.models import ModelNotAvailable, check_hub_reachable

    try:
        check_hub_reachable("Salesforce/wikitext")
    except ModelNotAvailable:
        return False
    return True
