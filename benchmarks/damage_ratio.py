"""Projection damage vs quantization damage under the softmax Fisher metric, on real attention rows.

For query q and keys k_j (post-RoPE, one KV head of one layer of a real model on real text), the
attention logits are s_j = (q . k_j) * scale and p = softmax(s) over the causal prefix. A small change
delta of the logits costs, to second order, KL(p || p') = 1/2 delta^T F delta with the softmax Fisher
F = diag(p) - p p^T, i.e. half the variance of delta under p. For a unit direction u of the head dim:
- removing u (rank reduction drops it): delta_j = -(q . u)(k_j . u) * scale;
- quantizing the coordinate c_j = k_j . u to b bits (kvspec numerics, groups of 64 tokens along the
  sequence, as a channel-axis cache stores one direction): delta_j = (q . u)(c_hat_j - c_j) * scale.
The paper (arXiv 2604.11501) states that removal costs 3 x 2^(2b) times more than quantization per
direction. This script measures the ratio of summed damages over every query, head, layer sampled and
direction (the PCA directions of the keys), for b = 2..8, and plots it against 3 x 2^(2b).

    python benchmarks/damage_ratio.py --model smollm2-135m --tokens 512
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from kvspec.reference.lowrank import pca_basis
from kvspec.reference.quant import dequantize, quantize

BITS = range(2, 9)
GROUP = 64


def fisher_damage(p: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Var_p(delta) per query row: p, delta [Tq, T] (p zero outside the causal prefix)."""
    mean = (p * delta).sum(-1)
    return (p * delta**2).sum(-1) - mean**2


def causal_softmax(scores: np.ndarray) -> np.ndarray:
    t = scores.shape[-1]
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(-1, keepdims=True)


def head_damages(q: np.ndarray, k: np.ndarray, scale: float) -> dict[str, np.ndarray]:
    """q [Hrep, T, D] (query heads sharing this KV head), k [T, D] -> summed damages per direction:
    {"remove": [D], "quant<b>": [D]} over every query of every head."""
    basis, _ = pca_basis(k)
    coords = k @ basis  # [T, D]: coordinate of every key along every direction
    t = (k.shape[0] // GROUP) * GROUP
    out = {"remove": np.zeros(k.shape[1])}
    qhat = {}
    for b in BITS:
        # Channel axis: each direction's coordinates quantized in groups of GROUP consecutive tokens.
        qz = quantize(coords[:t].astype(np.float32)[None, None], b, GROUP, "channel")
        qhat[b] = dequantize(qz, b, GROUP, "channel", k.shape[1])[0, 0]  # [t, D]
        out[f"quant{b}"] = np.zeros(k.shape[1])
    for h in range(q.shape[0]):
        qd = q[h, :t] @ basis  # [t, D]: q . u per query and direction
        p = causal_softmax(q[h, :t] @ k[:t].T * scale)
        for d in range(k.shape[1]):
            out["remove"][d] += fisher_damage(p, -np.outer(qd[:, d], coords[:t, d]) * scale).sum()
            for b in BITS:
                err = qhat[b][:, d] - coords[:t, d]
                out[f"quant{b}"][d] += fisher_damage(p, np.outer(qd[:, d], err) * scale).sum()
    return out


def capture(model_name: str, text: str, tokens: int, layers_every: int):
    """Post-RoPE queries and keys of every `layers_every`-th layer: list of (q [Hq, T, D], k [Hkv, T, D])."""
    import torch
    import transformers

    import kvtorch

    model, tok = kvtorch.load_model(model_name, device="cpu")
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    captured = {}

    def recorder(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx % layers_every == 0:
            captured[module.layer_idx] = (query[0].float().numpy(), key[0].float().numpy(), kwargs.get("scaling"))
        return transformers.integrations.sdpa_attention.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    transformers.AttentionInterface.register("kvmlx_damage_capture", recorder)
    model.set_attn_implementation("kvmlx_damage_capture")
    with torch.no_grad():
        model(ids)
    return [captured[i] for i in sorted(captured)], int(ids.shape[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="bbc")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers-every", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/damage-ratio")
    args = ap.parse_args()
    from kvmlx_cli import corpora

    t0 = time.time()
    rows, n_tokens = capture(args.model, corpora.load(args.data).text("eval")[: 8 * args.tokens], args.tokens, args.layers_every)
    totals: dict[str, float] = {}
    for q, k, scale in rows:
        rep = q.shape[0] // k.shape[0]
        for h in range(k.shape[0]):
            for name, v in head_damages(q[h * rep : (h + 1) * rep].astype(np.float64), k[h].astype(np.float64), scale).items():
                totals[name] = totals.get(name, 0.0) + float(v.sum())
    result = {
        "model": args.model,
        "data": args.data,
        "tokens": n_tokens,
        "layers": [i * args.layers_every for i in range(len(rows))],
        "group": GROUP,
        "bits": list(BITS),
        "measured_ratio": [totals["remove"] / totals[f"quant{b}"] for b in BITS],
        "paper_ratio": [3 * 2 ** (2 * b) for b in BITS],
        "seconds": time.time() - t0,
        "machine": f"{platform.system()} {platform.machine()}",
        "command": "python benchmarks/damage_ratio.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"{'bits':>4} {'measured':>12} {'3*2^(2b)':>12} {'measured/paper':>15}")
    for b, m, p in zip(result["bits"], result["measured_ratio"], result["paper_ratio"]):
        print(f"{b:>4} {m:>12.4g} {p:>12.4g} {m / p:>15.3f}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(result["bits"], result["measured_ratio"], "o-", label=f"measured ({result['model']}, {result['tokens']} tokens)")
    ax.semilogy(result["bits"], result["paper_ratio"], "k--", label="3 x 2^(2b) (paper)")
    ax.set_xlabel("bits b per quantized direction")
    ax.set_ylabel("removal damage / quantization damage")
    ax.set_title("Softmax-Fisher damage per key direction")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
