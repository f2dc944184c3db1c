"""A model dispatched by accelerate's device map (layers on their own devices) keeps each layer's
compressed cache on that layer's device and computes what the undispatched model computes."""

from __future__ import annotations

import pytest
import torch

from kvtorch import make_cache
from kvtorch.loading import load_model

from .tiny import tiny_model

accelerate = pytest.importorskip("accelerate", reason="device maps need accelerate")


@pytest.mark.parametrize("spec", ["int4-kchan-res4", "rank16-random-q8"])
def test_dispatched_model_matches_and_caches_follow_layers(spec):
    ids = torch.arange(3, 40)[None]
    plain = tiny_model("llama", seed=3)
    want = plain(ids, past_key_values=make_cache(plain, spec), use_cache=True).logits
    # Every module on its own entry of the map; on this CPU-only machine every entry is "cpu",
    # which still routes the forward through accelerate's hooks.
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatched = accelerate.dispatch_model(tiny_model("llama", seed=3), device_map=device_map)
    cache = make_cache(dispatched, spec)
    got = dispatched(ids, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for layer, module in zip(cache.layers, dispatched.model.layers):
        assert layer.device == next(module.parameters()).device


def test_auto_device_map_on_a_cpu_machine_loads_on_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback of device='auto'")
    model = tiny_model("llama", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    from .tiny import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), device="auto")
    assert next(loaded.parameters()).device.type == "cpu"


def test_runner_reports_the_layers_per_device_of_a_dispatched_model():
    from kvtorch.runner import Runner

    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatched = accelerate.dispatch_model(tiny_model("llama", seed=3), device_map=device_map)
    assert Runner.wrap(dispatched).placement == {"cpu": 2}
    assert Runner.wrap(tiny_model("llama", seed=3)).placement is None


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("spec", ["int4-kchan-res4", "int4", "rank16-random-q8"])
def test_gpu_model_split_over_two_gpus_matches_one_gpu(spec):
    """Layer 0 on cuda:0, layer 1 on cuda:1: the Triton kernels launch on their layer's GPU (Triton
    launches on the current device, so without kvtorch.kernels.support.on_device layer 1 would run on
    cuda:0) and the logits equal the one-GPU model's."""
    ids = (torch.arange(3, 300) % 256)[None].to("cuda:0")  # byte ids: the tiny vocabulary has 258
    logits = {}
    for name, model in (("one", tiny_model("llama", seed=3, dtype=torch.float32).to("cuda:0")),
                        ("split", accelerate.dispatch_model(
                            tiny_model("llama", seed=3, dtype=torch.float32),
                            device_map={"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1,
                                        "model.norm": 1, "model.rotary_emb": 0, "lm_head": 1}))):
        cache = make_cache(model, spec)
        prefill = model(ids[:, :-1], past_key_values=cache, use_cache=True).logits
        step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits  # decode: the kernels' lean path
        logits[name] = (prefill.cpu(), step.cpu())
        devices = [layer.device for layer in cache.layers]
    assert devices == [torch.device("cuda:0"), torch.device("cuda:1")]
    for got, want in zip(logits["split"], logits["one"]):
        torch.testing.assert_close(got, want)
