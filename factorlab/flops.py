"""Analytic FLOPs per token from the real shapes, dense vs factorized (2 FLOPs per multiply-add).

Only matrix multiplies are counted (as torch's FlopCounterMode does); norms, activations, softmax
and the embedding lookup are a rounding error next to them.
"""
from __future__ import annotations

COMPONENTS = ("attention_proj", "attention_scores", "ffn", "router", "lm_head")


def mean_k_plan(per_token_k: dict | None, top_k: int) -> dict[int, float] | None:
    """Experts per token of per-token-K layers at K: {layer: the mean measured in training at K}
    (per_token_k: {layer: [mean at K=1, ..., mean at K=N]}, as runs store it); None without any."""
    if not per_token_k:
        return None
    return {int(i): float(means[top_k - 1]) for i, means in per_token_k.items()}


def flops_per_token(info: dict, seq_len: int, num_experts: int | None = None, top_k: int | None = None,
                    factorized_layers: list[int] | None = None, shared_size: int = 0,
                    top_k_per_layer: dict[int, float] | None = None) -> dict[str, float]:
    """FLOPs for one token attending over `seq_len` positions, per component and in total.

    info: factorlab.models.model_info(model). num_experts=None gives the dense model.
    attention_scores counts QK^T and AV over seq_len keys: a decode step at position seq_len, or
    the per-token share of a prefill of seq_len tokens as an (unmasked) attention kernel computes it.
    top_k_per_layer: experts per token of some layers ({layer: K}, a mean may be fractional for
    per-token K); it takes precedence over top_k there.
    """
    h, inter, n_layers = info["hidden_size"], info["intermediate_size"], info["num_layers"]
    q_dim = info["num_attention_heads"] * info["head_dim"]
    kv_dim = info["num_key_value_heads"] * info["head_dim"]
    per_layer_proj = 2 * h * q_dim + 2 * 2 * h * kv_dim + 2 * q_dim * h  # q, k, v, o
    per_layer_scores = 2 * 2 * q_dim * seq_len  # QK^T and AV
    dense_ffn = 3 * 2 * h * inter  # gate, up, down
    ffn, router = 0.0, 0.0
    layers = set(range(n_layers) if factorized_layers is None else factorized_layers)
    for i in range(n_layers):
        if num_experts is None or i not in layers:
            ffn += dense_ffn
            continue
        k = (top_k_per_layer or {}).get(i, top_k)
        if k is None:
            raise ValueError("top_k is required with num_experts")
        expert = (inter - shared_size) // num_experts
        ffn += 3 * 2 * h * (shared_size + k * expert)
        router += 2 * h * num_experts
    out = {
        "attention_proj": float(n_layers * per_layer_proj),
        "attention_scores": float(n_layers * per_layer_scores),
        "ffn": float(ffn),
        "router": float(router),
        "lm_head": float(2 * h * info["vocab_size"]),
    }
    out["total"] = sum(out[c] for c in COMPONENTS)
    return out


def flops_table(info: dict, seq_len: int, num_experts: int, ks: list[int] | None = None,
                factorized_layers: list[int] | None = None, shared_size: int = 0,
                per_token_k: dict | None = None) -> dict:
    """Dense and every K side by side, with FFN and total ratios to dense (per_token_k: as mean_k_plan)."""
    dense = flops_per_token(info, seq_len)
    rows = {}
    for k in ks or range(1, num_experts + 1):
        f = flops_per_token(info, seq_len, num_experts, k, factorized_layers, shared_size,
                            top_k_per_layer=mean_k_plan(per_token_k, k))
        rows[str(k)] = {**f, "ffn_ratio": f["ffn"] / dense["ffn"], "total_ratio": f["total"] / dense["total"],
                        "shares": shares(f)}
    return {"seq_len": seq_len, "num_experts": num_experts, "dense": {**dense, "shares": shares(dense)},
            "k": rows}


def shares(flops: dict[str, float]) -> dict[str, float]:
    """Each component's fraction of the total."""
    return {c: flops[c] / flops["total"] for c in COMPONENTS}
