"""kvmlx: kvspec caches for mlx-lm models on MLX (Metal and CUDA kernels).

    model, tokenizer = kvmlx.load_model("smollm2-135m")
    cache = kvmlx.make_cache(model, "int4")
    mlx_lm.generate(model, tokenizer, prompt, prompt_cache=cache)

Importing kvmlx imports neither mlx_lm nor transformers (which would pull in torch where it is
installed); they load when a model is loaded or a cache is made for one.
"""

from . import ops
from .cache import LayerCache, ModelCache
from .cachefile import load_cache, save_cache
from .integration import make_cache
from .loading import load_model
from .runner import Runner

__all__ = ["LayerCache", "ModelCache", "Runner", "load_cache", "load_model", "make_cache", "ops", "save_cache"]
