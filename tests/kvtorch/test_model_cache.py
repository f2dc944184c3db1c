"""The converted-model cache of `load_model` for GGUF files (kvtorch.loading).

Fast tests stand a tiny random llama (tied embeddings, a word-level tokenizer) in for transformers'
GGUF conversion, so the cache's own reading and writing run for real in milliseconds; the slow test
loads the bundled SmolLM2 twice and compares logits bit for bit.
"""

from __future__ import annotations

import errno
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'kvmlx[torch]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install 'kvmlx[torch]')")
gguf = pytest.importorskip("gguf", reason="gguf is not installed")

from kvspec.models import ALIASES, ModelNotAvailable  # noqa: E402
from kvtorch import loading  # noqa: E402
from kvtorch.loading import UnsupportedTransformers, cache_key, load_model, model_cache_dir  # noqa: E402

SENTENCE = "w1 w2 w3 w40 w5"


def write_gguf(path, architecture: str = "llama"):
    """A GGUF file with a header and one tensor: enough for the architecture check and the cache key."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def entry_of(root, path):
    """Where a float32 load of the GGUF file `path` is cached under `root`."""
    # Imported where used: importing a transformers model class can replace the module object in
    # sys.modules (seen with 5.24), which would leave a module-level name stale.
    import transformers

    return root / cache_key(path, torch.float32, transformers.__version__)


@pytest.fixture(scope="module")
def converted():
    """(model, tokenizer) as transformers' GGUF conversion returns them, in miniature: the config keeps
    the GGUF quantization_config, and lm_head.weight is the embedding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils.quantization_config import GgufConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, tie_word_embeddings=True)
    config.quantization_config = GgufConfig(gguf_file="tiny.gguf")
    model = LlamaForCausalLM(config).eval()
    words = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, 64)}}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return model, PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")


@pytest.fixture
def conversions(monkeypatch, converted):
    """Stands in for transformers' GGUF conversion; the list records each GGUF file converted."""
    calls = []

    def convert(path, dtype, placement):
        calls.append(path)
        return converted

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    return calls


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    """A fresh cache under tmp_path, on, with no write failure reported yet."""
    monkeypatch.setenv("KVMLX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KVMLX_MODEL_CACHE", raising=False)
    monkeypatch.setattr(loading, "_UNWRITABLE", set())
    return tmp_path / "cache" / "models"


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_gguf(tmp_path / "tiny.gguf")


def test_the_cache_lives_in_kvmlx_cache_dir_else_the_xdg_cache_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KVMLX_CACHE_DIR", str(tmp_path / "k"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert model_cache_dir() == tmp_path / "k" / "models"
    monkeypatch.delenv("KVMLX_CACHE_DIR")
    assert model_cache_dir() == tmp_path / "x" / "kvmlx" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache_dir() == tmp_path / "home" / ".cache" / "kvmlx" / "models"


def test_the_key_changes_with_the_files_size_and_mtime_the_dtype_and_transformers(tiny_gguf):
    import os

    key = cache_key(tiny_gguf, torch.float32, "5.24.0")
    assert key == cache_key(tiny_gguf, torch.float32, "5.24.0") and key.startswith("tiny-float32-")
    assert cache_key(tiny_gguf, torch.bfloat16, "5.24.0") != key
    assert cache_key(tiny_gguf, torch.float32, "5.23.0") != key
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    touched = cache_key(tiny_gguf, torch.float32, "5.24.0")
    assert touched != key
    with open(tiny_gguf, "ab") as f:
        f.write(b"\0")
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # the size alone changes
    assert cache_key(tiny_gguf, torch.float32, "5.24.0") not in (key, touched)


def test_a_second_load_reads_the_entry_instead_of_the_gguf_file(tiny_gguf, cache_root, conversions, capsys):
    import json

    model, tokenizer = load_model(str(tiny_gguf), device="cpu")
    entry = entry_of(cache_root, tiny_gguf)
    assert f"cached the converted model in {entry} (" in capsys.readouterr().err
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in entry.iterdir()}
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())

    again, tokenizer_again = load_model(str(tiny_gguf), device="cpu")
    assert conversions == [tiny_gguf] and again is not model
    assert "kvmlx:" not in capsys.readouterr().err
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()  # tied again
    saved, loaded = model.state_dict(), again.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert tokenizer_again(SENTENCE).input_ids == tokenizer(SENTENCE).input_ids == [1, 2, 3, 40, 5]


@pytest.mark.parametrize("setting, keyword, cached", [("0", None, False), (None, False, False), ("0", True, True)])
def test_the_environment_or_the_keyword_turns_the_cache_off(tiny_gguf, cache_root, conversions, monkeypatch,
                                                            setting, keyword, cached):
    if setting is not None:
        monkeypatch.setenv("KVMLX_MODEL_CACHE", setting)
    for _ in range(2):
        load_model(str(tiny_gguf), device="cpu", cache=keyword)
    assert len(conversions) == (1 if cached else 2)
    assert cache_root.exists() == cached


@pytest.mark.parametrize("failure", ["read-only", "full"])
def test_a_cache_that_cannot_be_written_warns_once_and_the_load_goes_on(tiny_gguf, cache_root, conversions,
                                                                        monkeypatch, capsys, failure):
    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError(*{"read-only": (errno.EROFS, "Read-only file system"), "full": (errno.ENOSPC, "No space left on device")}[failure])

    if failure == "read-only":  # as root, a chmod would not stop the write
        monkeypatch.setattr(loading.Path, "mkdir", fail)
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", fail)
    models = [load_model(str(tiny_gguf), device="cpu")[0] for _ in range(2)]
    assert all(m is not None for m in models) and len(conversions) == 2
    err = capsys.readouterr().err
    assert err.count("could not write the model cache") == 1 and "loading goes on without it" in err
    assert not cache_root.exists() or list(cache_root.iterdir()) == []  # no entry, no temporary left


def test_a_partial_entry_left_behind_is_ignored(tiny_gguf, cache_root, conversions):
    entry = entry_of(cache_root, tiny_gguf)
    partial = cache_root / f".{entry.name}.x1y2.partial"  # a writer that died before its rename
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{")
    load_model(str(tiny_gguf), device="cpu")
    load_model(str(tiny_gguf), device="cpu")
    assert len(conversions) == 1 and (entry / "model.safetensors").is_file()


def test_a_writer_that_finds_the_entry_written_keeps_it_and_leaves_nothing(tmp_path, converted, capsys):
    entry = tmp_path / "models" / "tiny-float32-0123"
    loading._write_entry(entry, *converted)
    written = (entry / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    loading._write_entry(entry, *converted)  # another worker converted the same file at once
    assert "kvmlx:" not in capsys.readouterr().err
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]
    assert (entry / "model.safetensors").stat().st_mtime_ns == written


def test_an_entry_whose_weights_do_not_fill_the_model_is_not_used(tiny_gguf, cache_root, conversions, converted, capsys):
    from safetensors.torch import load_file, save_file

    load_model(str(tiny_gguf), device="cpu")
    weights = entry_of(cache_root, tiny_gguf) / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.norm.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    capsys.readouterr()
    again, _ = load_model(str(tiny_gguf), device="cpu")
    assert "ignoring the model cache entry" in capsys.readouterr().err
    assert len(conversions) == 2 and again is converted[0]


def test_weights_left_packed_in_gguf_blocks_are_not_cached(tiny_gguf, cache_root, monkeypatch, converted, capsys):
    from transformers import LlamaForCausalLM

    packed = LlamaForCausalLM(converted[0].config)
    packed.model.norm.weight = torch.nn.Parameter(torch.zeros(32, dtype=torch.uint8), requires_grad=False)
    monkeypatch.setattr(loading, "_convert_gguf", lambda *a: (packed, converted[1]))
    assert load_model(str(tiny_gguf), device="cpu")[0] is packed
    assert "packed in GGUF blocks" in capsys.readouterr().err and list(cache_root.iterdir()) == []


def test_an_unsupported_architecture_is_refused_before_its_entry_loads(tmp_path, cache_root, monkeypatch):
    import transformers

    path = write_gguf(tmp_path / "tiny-gemma3.gguf", "gemma3")
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    (cache_root / cache_key(path, torch.float32, "5.17.0")).mkdir(parents=True)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(UnsupportedTransformers, match="5.17.0"):
        load_model(str(path), device="cpu")


def test_a_model_directory_is_loaded_as_it_is_and_not_cached(tmp_path, cache_root, converted):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(converted[0].config.__class__(**{**converted[0].config.to_dict(), "quantization_config": None}))
    model.save_pretrained(tmp_path / "tiny")
    converted[1].save_pretrained(tmp_path / "tiny")
    loaded, _ = load_model(str(tmp_path / "tiny"), device="cpu")
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight) and not cache_root.exists()


@pytest.mark.slow
def test_smollm2_loads_from_the_cache_with_identical_logits(tmp_path, monkeypatch):
    import transformers

    try:
        ALIASES["smollm2-135m"].gguf_path()
    except ModelNotAvailable as e:
        pytest.skip(str(e))
    monkeypatch.setenv("KVMLX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KVMLX_MODEL_CACHE", raising=False)
    start = time.perf_counter()
    cold, tokenizer = load_model("smollm2-135m", device="cpu")
    cold_s = time.perf_counter() - start
    assert len(list((tmp_path / "models").iterdir())) == 1

    sources = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", lambda *a, _load=auto.from_pretrained, **k: sources.append(k) or _load(*a, **k))
    start = time.perf_counter()
    cached, tokenizer_again = load_model("smollm2-135m", device="cpu")
    print(f"SmolLM2-135M fp32 load: from GGUF {cold_s:.1f} s, from the cache {time.perf_counter() - start:.1f} s")
    assert len(sources) == 2 and not any("gguf_file" in k for k in sources)

    sentence = "The BBC reported that the Bank of England held interest rates at 5.25% on Thursday."
    ids = tokenizer(sentence, return_tensors="pt").input_ids
    assert tokenizer_again(sentence, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, cold(ids).logits)
