"""kvspec.paths.cache_root: the one directory every kvmlx cache (models, bases, corpora, joined GGUF
parts) lives under, redirected by $KVMLX_CACHE_DIR or $XDG_CACHE_HOME at each call."""

from cli.bases import bases_path
from cli.corpora import corpora_dir
from kvspec.paths import cache_root


def test_the_cache_root_follows_the_environment_at_each_call(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMLX_CACHE_DIR", str(tmp_path / "k"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "k"
    monkeypatch.delenv("KVMLX_CACHE_DIR")
    assert cache_root() == tmp_path / "x" / "kvmlx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "kvmlx"


def test_bases_and_corpora_live_under_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMLX_CACHE_DIR", str(tmp_path))
    assert bases_path("org/model", "0123456789abcdef99") == tmp_path / "bases" / "org_model-0123456789abcdef.safetensors"
    assert corpora_dir() == tmp_path / "corpora"
