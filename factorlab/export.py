"""Export a factorized model as a standard transformers MoE checkpoint that loads without custom code.

Two target classes, as transformers 5.x's own modeling code defines them:
* `qwen2_moe` (Qwen2MoeForCausalLM, the default): layers in `mlp_only_layers` keep a plain dense MLP (layer 0 of
  the default recipe); a sparse layer is router Linear(H, E) -> softmax -> top-k -> renormalised weights
  (`norm_topk_prob`), E experts of one width, plus a shared expert times sigmoid(shared_expert_gate(x)). That
  gate's weight is stored as 0, so the sigmoid is exactly 0.5, and the shared down projection x2 (exact: a power
  of two).
* `granitemoeshared` (GraniteMoeSharedForCausalLM): every layer is sparse; router = top-k logits -> softmax over
  them; an always-on shared MLP; its embedding / residual / logits multipliers set to 1 and attention_multiplier
  to head_dim**-0.5 make it compute Llama. A dense layer is held exactly by its first I - D' neurons in the
  shared MLP and its last D' neurons in every expert (identical copies under a zero router: whichever K' run,
  their weights 1/K' sum to 1); the shared width is then max(S, I - D') and the other layers' shared blocks are
  padded with zero neurons (computed by transformers, so this costs FLOPs).

What each FactorizedMLP routing rule becomes (letters: N experts of width D, K per token, S shared neurons):
* gated top-K: the renormalised softmax over the top K is the softmax over the top-K logits: the class's own
  top-K router, N experts of width D. Exact.
* scaled top-K (N/K x the sum of the K chosen experts, no per-token weights): top-1 over "set experts", one per
  K-subset, of width K*D, with router row = the members' rows summed (its logit is the members' logits summed,
  so the best set is the top K) and N/K folded into the down projections. Exact, at C(N,K)*K*D routed neurons
  instead of N*D (K=1: the experts themselves).
* per-token K (a score threshold per expert): a bias-free linear router cannot express a threshold, so it is
  exported at a fixed K: approximate, and the workflow measures by how much.
* K = N of a tuned (or gated) model is the dense FFN: a dense layer.
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .models import decoder_layers, hub_reachable, model_info
from .moe import FactorizedMLP, factorized_layers
from .recipe import layers_text

log = logging.getLogger(__name__)

FORMATS = ("qwen2_moe", "granitemoeshared")
CLASSES = {"qwen2_moe": "Qwen2MoeForCausalLM", "granitemoeshared": "GraniteMoeSharedForCausalLM"}
SOURCE_TYPES = ("llama", "mistral", "qwen2")  # dense families whose attention both targets compute exactly
CHECK_NEW_TOKENS = 32  # greedy tokens compared between the run and its export


class ExportError(ValueError):
    """A model or setting that cannot be exported; the message says why and what can be."""


@dataclass
class ExportPlan:
    """What the export of a factorized model holds: the target class, the K exported and how routing maps."""
    fmt: str
    top_k: int  # the factorlab K exported (per-token K runs: the fixed K that replaces it)
    routing: str  # in words
    exact: bool
    num_experts: int  # experts per sparse layer in the export (N, or C(N, K) set experts)
    experts_per_token: int  # the export's num_experts_per_tok
    expert_size: int  # the export's expert width
    shared_size: int  # the export's shared width (granitemoeshared with dense layers: padded)
    moe_layers: list[int] = field(default_factory=list)
    dense_layers: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def plan_export(model: nn.Module, fmt: str = "qwen2_moe", top_k: int | None = None) -> ExportPlan:
    """How `model` (a factorized model) exports to `fmt` at K = top_k (None: its current K, or for per-token K
    the nearest fixed K to the mean it was trained for)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    layers = factorized_layers(model)
    if not layers:
        raise ExportError("this model has no factorized layer: it is the dense model, which saves as it is "
                          "(save_pretrained); export a run instead")
    first = next(iter(layers.values()))
    shape = {(m.num_experts, m.expert_size, m.shared_size, m.output_mode, m.adaptive) for m in layers.values()}
    if len(shape) > 1:
        raise ExportError("the factorized layers differ in experts, widths, output rule or routing; a transformers "
                          "MoE config has one of each, so such a model cannot be exported")
    n, d, s, mode = first.num_experts, first.expert_size, first.shared_size, first.output_mode
    notes = []
    if top_k is None:
        top_k = first.top_k
        if first.adaptive:  # the nearest fixed K to the mean number of experts training measured
            top_k = min(n, max(1, round(float(first.expected_k[first.top_k - 1]))))
    if not 1 <= top_k <= n:
        raise ExportError(f"K must be in 1..{n} (the number of experts), got {top_k}")
    dense_at_n = top_k == n and (any(m.tuned for m in layers.values()) or mode == "gated")  # as FactorizedMLP's
    exact = not first.adaptive or dense_at_n
    if not exact:
        notes.append(f"per-token K (each token runs the experts whose router score passes a threshold, {n} at most) "
                     f"cannot be expressed by a router without a bias: exported at the fixed K={top_k}, which is an "
                     "approximation (its measured difference is reported)")
    inter = first.dense_gate.shape[0]
    if dense_at_n:
        routing = f"K = N = {n}: the dense FFN (the run's K = N is the original weights)"
        e, k_out, d_out = n, min(top_k, n), d
    elif mode == "gated":
        routing = f"gated top-{top_k}: the class's own top-{top_k} router over the {n} experts (softmax over the top-K logits)"
        e, k_out, d_out = n, top_k, d
    else:
        e, k_out, d_out = math.comb(n, top_k), 1, top_k * d
        routing = (f"scaled top-{top_k}: top-1 over {e} set experts (one per {top_k}-subset of the {n} experts, width "
                   f"{d_out}, router row = the members' rows summed, N/K = {n / top_k:g} folded into the down projections)")
        if 1 < top_k < n:
            notes.append(f"set experts hold {e * d_out} routed neurons per layer instead of {n * d} "
                         f"({e * d_out / (n * d):.1f}x the routed weights); a token still computes {d_out} of them")
    num_layers = len(decoder_layers(model))
    moe_layers = [] if dense_at_n else sorted(layers)
    dense_layers = [i for i in range(num_layers) if i not in moe_layers]
    shared = s
    if fmt == "granitemoeshared" and dense_layers:
        shared = max(s, inter - d_out)
        notes.append(f"granitemoeshared has no dense layer: the dense layers ({layers_text(dense_layers)}) are held by a "
                     f"{shared}-neuron shared MLP and identical expert copies under a zero router, and the other layers' "
                     f"shared blocks are padded from {s} to {shared} zero neurons (exact, but transformers computes "
                     "them: qwen2_moe has real dense layers)")
    return ExportPlan(fmt, top_k, routing, exact, e, k_out, d_out, shared, moe_layers, dense_layers, notes)


def fix_k(model: nn.Module, top_k: int) -> nn.Module:
    """Switch every factorized layer to plain top-K at K (per-token K off), in place: the model an export
    computes. Returns the model."""
    for mlp in factorized_layers(model).values():
        mlp.set_thresholds(None)
        mlp.set_top_k(top_k)
    return model


# ---------------------------------------------------------------- source checks and config
def check_source(model: nn.Module) -> dict:
    """The dense architecture's facts the export copies; an attention the targets do not compute is refused."""
    cfg = model.config
    if cfg.model_type not in SOURCE_TYPES:
        raise ExportError(f"{type(model).__name__} ({cfg.model_type}) cannot be exported: only {', '.join(SOURCE_TYPES)} "
                          "attention is computed exactly by the target classes")
    attn = decoder_layers(model)[0].self_attn
    if getattr(attn, "q_norm", None) is not None or getattr(attn, "o_proj").bias is not None:
        raise ExportError("this model's attention has q/k norms or an output bias, which qwen2_moe and "
                          "granitemoeshared do not compute")
    sliding = cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)
    if sliding or getattr(cfg, "use_sliding_window", False):
        raise ExportError("this model uses sliding-window attention, which the export does not reproduce")
    if getattr(cfg, "mlp_bias", False):
        raise ExportError("this model's FFN has biases, which the target MoE classes do not hold")
    info = model_info(model)
    info["qkv_bias"] = attn.q_proj.bias is not None
    return info


def export_config(model: nn.Module, plan: ExportPlan):
    """The transformers config of the export (Qwen2MoeConfig or GraniteMoeSharedConfig)."""
    from transformers import GraniteMoeSharedConfig, Qwen2MoeConfig

    info = check_source(model)
    cfg = model.config
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=info["num_layers"],
                  num_attention_heads=cfg.num_attention_heads, num_key_value_heads=info["num_key_value_heads"],
                  hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
                  rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=info["tie_word_embeddings"],
                  rope_parameters=dict(cfg.rope_parameters), attention_dropout=0.0,
                  bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                  num_experts_per_tok=plan.experts_per_token)
    if plan.fmt == "qwen2_moe":
        out = Qwen2MoeConfig(**common, intermediate_size=info["intermediate_size"], num_experts=plan.num_experts,
                             moe_intermediate_size=plan.expert_size, shared_expert_intermediate_size=plan.shared_size,
                             norm_topk_prob=True, mlp_only_layers=list(plan.dense_layers), decoder_sparse_step=1,
                             use_sliding_window=False, qkv_bias=info["qkv_bias"])
    else:
        if info["qkv_bias"]:
            raise ExportError("granitemoeshared has no q/k/v biases: export this model as qwen2_moe")
        out = GraniteMoeSharedConfig(**common, intermediate_size=plan.expert_size, num_local_experts=plan.num_experts,
                                     shared_intermediate_size=plan.shared_size, embedding_multiplier=1.0,
                                     residual_multiplier=1.0, logits_scaling=1.0,
                                     attention_multiplier=info["head_dim"] ** -0.5, attention_bias=False)
    if info["head_dim"] != cfg.hidden_size // cfg.num_attention_heads:
        out.head_dim = info["head_dim"]
    out.architectures = [CLASSES[plan.fmt]]
    return out


# ---------------------------------------------------------------- weights
def routed_tensors(mlp: FactorizedMLP, plan: ExportPlan) -> dict[str, torch.Tensor]:
    """A factorized layer's router (E, H), experts' gate_up (E, 2D', H) and down (E, H, D') in the export,
    and its shared block's gate, up (S, H) and down (H, S) (letters: E, D' of the plan)."""
    n, d, s, k = mlp.num_experts, mlp.expert_size, mlp.shared_size, plan.top_k
    gate, up = mlp.gate_up[:, :d], mlp.gate_up[:, d:]  # (N, D, H) each
    down = mlp.down.transpose(1, 2)  # (N, H, D)
    router = mlp.router.linear.weight  # (N, H)
    if mlp.output_mode == "scaled":  # top-1 over set experts; N/K folded into down
        sets = list(itertools.combinations(range(n), k))
        router = torch.stack([router[list(c)].sum(0) for c in sets])  # (E, H)
        gate = torch.stack([gate[list(c)].reshape(k * d, -1) for c in sets])  # (E, KD, H)
        up = torch.stack([up[list(c)].reshape(k * d, -1) for c in sets])
        down = torch.stack([torch.cat([down[e] for e in c], dim=1) for c in sets]) * (n / k)  # (E, H, KD)
    return {"router": router, "gate_up": torch.cat([gate, up], dim=1), "down": down,
            "shared_gate": mlp.shared_gate_up[:s], "shared_up": mlp.shared_gate_up[s:], "shared_down": mlp.shared_down.t()}


def _dense_ffn(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate (I, H), up (I, H), down (H, I)) of a dense layer: a plain MLP, or a factorized one at K = N."""
    if isinstance(mlp, FactorizedMLP):
        return mlp.dense_gate, mlp.dense_up, mlp.dense_down
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


def export_state_dict(model: nn.Module, plan: ExportPlan) -> dict[str, torch.Tensor]:
    """Every tensor of the export under the target class's names (attention, norms and embeddings unchanged)."""
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    hidden = model.config.hidden_size
    moe = factorized_layers(model)
    for i, layer in enumerate(decoder_layers(model)):
        p = f"model.layers.{i}."
        if i in plan.dense_layers:
            gate, up, down = _dense_ffn(layer.mlp)
            if plan.fmt == "qwen2_moe":
                state |= {p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": down}
                continue
            # granitemoeshared: the first I - D' neurons in the shared MLP, the last D' in every expert
            split, width = gate.shape[0] - plan.expert_size, plan.shared_size
            t = {"router": gate.new_zeros(plan.num_experts, hidden),
                 "gate_up": torch.cat([gate[split:], up[split:]]).expand(plan.num_experts, -1, -1),
                 "down": down[:, split:].expand(plan.num_experts, -1, -1),
                 "shared_gate": gate[:split], "shared_up": up[:split], "shared_down": down[:, :split]}
        else:
            t, width = routed_tensors(moe[i], plan), plan.shared_size
        if plan.fmt == "qwen2_moe":
            state |= {p + "mlp.gate.weight": t["router"], p + "mlp.experts.gate_up_proj": t["gate_up"],
                      p + "mlp.experts.down_proj": t["down"], p + "mlp.shared_expert.gate_proj.weight": t["shared_gate"],
                      p + "mlp.shared_expert.up_proj.weight": t["shared_up"],
                      # sigmoid(0) = 0.5 exactly: the shared block's down projection is stored x2
                      p + "mlp.shared_expert.down_proj.weight": t["shared_down"] * 2,
                      p + "mlp.shared_expert_gate.weight": t["router"].new_zeros(1, hidden)}
        else:
            pad = width - t["shared_gate"].shape[0]  # zero neurons: silu(0) * 0 = 0 through zero down columns
            sg, su = (nn.functional.pad(w, (0, 0, 0, pad)) for w in (t["shared_gate"], t["shared_up"]))
            state |= {p + "block_sparse_moe.router.weight": t["router"],
                      p + "block_sparse_moe.experts.gate_up_proj": t["gate_up"],
                      p + "block_sparse_moe.experts.down_proj": t["down"]}
            if width:
                state |= {p + "shared_mlp.input_linear.weight": torch.cat([sg, su]),
                          p + "shared_mlp.output_linear.weight": nn.functional.pad(t["shared_down"], (0, pad))}
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def build_export(model: nn.Module, plan: ExportPlan) -> nn.Module:
    """The export as an in-memory transformers model (the factorized model at the plan's K; per-token K off)."""
    import transformers

    fix_k(model, plan.top_k)
    config = export_config(model, plan)
    dtype = next(model.parameters()).dtype
    hf = getattr(transformers, CLASSES[plan.fmt])(config).to(dtype)
    missing, unexpected = hf.load_state_dict(export_state_dict(model, plan), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ExportError(f"the export's tensors do not match {CLASSES[plan.fmt]} (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}): a bug in factorlab.export")
    hf.tie_weights()
    hf.generation_config = copy.deepcopy(model.generation_config)
    return hf.eval().requires_grad_(False)


# ---------------------------------------------------------------- checks, sizes, FLOPs
def max_logit_diff(reference: nn.Module, exported: nn.Module, input_ids: torch.Tensor) -> float:
    """Max |logit difference| of two models on the same tokens (1, T)."""
    with torch.no_grad():
        return (reference(input_ids).logits.float() - exported(input_ids).logits.float()).abs().max().item()


def greedy_ids(model: nn.Module, input_ids: torch.Tensor, new_tokens: int = CHECK_NEW_TOKENS) -> list[int]:
    """The greedy continuation's token ids."""
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=model.generation_config.eos_token_id)
    return out[0, input_ids.shape[1]:].tolist()


def verify_export(reference: nn.Module, folder: Path, tokenizer, text: str, prompt: str) -> tuple[dict, nn.Module]:
    """Load an export folder with plain transformers (no remote code) and compare it with `reference` (the factorized
    model it was made from): max |logit difference| on `text`, and the greedy reply to the chat `prompt`.
    Returns (the check, the loaded model)."""
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(folder, dtype=next(reference.parameters()).dtype)
    ids = tokenizer(text, return_tensors="pt").input_ids
    chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]
    run_ids, export_ids = greedy_ids(reference, chat), greedy_ids(back, chat)
    with torch.no_grad():
        largest = reference(ids).logits.abs().max().item()
    return {"tokens": ids.shape[1], "max_abs_logit_diff": max_logit_diff(reference, back, ids), "max_abs_logit": largest,
            "loaded_class": type(back).__name__, "greedy_same": run_ids == export_ids, "prompt": prompt,
            "run_ids": run_ids, "export_ids": export_ids, "run_text": tokenizer.decode(run_ids),
            "export_text": tokenizer.decode(export_ids)}, back


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied tensors once


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameter tensors (what its safetensors file holds, less the header)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def export_flops(info: dict, plan: ExportPlan, seq_len: int) -> dict[str, float]:
    """Analytic FLOPs per token of the export as transformers computes it (padded shared neurons included)."""
    from .flops import flops_per_token

    out = flops_per_token(info, seq_len)
    h, inter = info["hidden_size"], info["intermediate_size"]
    dense_layer = 3 * 2 * h * inter
    sparse_layer = 3 * 2 * h * (plan.shared_size + plan.experts_per_token * plan.expert_size)
    gate = 2 * h if plan.fmt == "qwen2_moe" else 0  # qwen2_moe's shared-expert gate
    if plan.fmt == "granitemoeshared":  # every layer is sparse there
        out["ffn"] = float(info["num_layers"] * sparse_layer)
        out["router"] = float(info["num_layers"] * 2 * h * plan.num_experts)
    else:
        out["ffn"] = float(len(plan.dense_layers) * dense_layer + len(plan.moe_layers) * sparse_layer)
        out["router"] = float(len(plan.moe_layers) * (2 * h * plan.num_experts + gate))
    out["total"] = sum(v for k, v in out.items() if k != "total")
    return out


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(folder).glob(pattern))


def check_folder(folder: Path) -> None:
    """The export folder holds weights as safetensors only (nothing that unpickles)."""
    pickled = [p.name for p in Path(folder).iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    if pickled or not any(Path(folder).glob("*.safetensors")):
        raise ExportError(f"{folder} must hold safetensors weights only (found {pickled or 'no safetensors'})")


def replace_folder(tmp: Path, target: Path) -> None:
    """Move a finished export into place (an older export there is replaced; any other folder is kept)."""
    if target.exists() and any(target.iterdir()) and not (target / "config.json").exists():
        raise ExportError(f"{target} holds files but no model: factorlab replaces only an empty folder or an "
                          "earlier export; choose a new folder")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


# ---------------------------------------------------------------- the model card
def model_card(s: dict) -> str:
    """The export's README.md: what it is, how exact, the run's recipe and measured scores, FLOPs, sizes, how it
    was made. s: the summary export_run returns."""
    plan, check, k = s["plan"], s["check"], s["plan"]["top_k"]
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [moe, factorlab, " +
             plan["fmt"] + "]"] + ([f"base_model: {s['base_model']}"] if s.get("base_model") else []) + ["---", ""]
    exact = ("**Exact**: it computes the factorlab run" if plan["exact"] else
             f"**Approximate**: the run uses per-token K; this is its fixed K={k}")
    base = s.get("base_model") or s["model"]
    lines = front + [
        f"# {s['run']} ({CLASSES[plan['fmt']]}, K={k})", "",
        f"A factorized mixture-of-experts version of `{base}` made by factorlab from the run `{s['run']}`. It "
        "loads with plain transformers, no custom code:", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(FOLDER_OR_REPO)  # no trust_remote_code",
        "tokenizer = AutoTokenizer.from_pretrained(FOLDER_OR_REPO)  # chat template included", "```", "",
        "## How exact", "", f"{exact}. Routing: {plan['routing']}.", "",
        f"* Max |logit difference| against the factorlab model at K={k} on a fixed {check['tokens']}-token sample, "
        f"loaded back by `AutoModelForCausalLM.from_pretrained` (fp32): **{check['max_abs_logit_diff']:.2e}** "
        f"(largest logit {check['max_abs_logit']:.1f}).",
        f"* Greedy generation after a chat prompt ({len(check['export_ids'])} new tokens): "
        f"{'the same text' if check['greedy_same'] else 'DIFFERENT text'} as the factorlab model."]
    lines += [f"* {note[0].upper() + note[1:]}." for note in plan["notes"]]
    if s.get("approximation"):
        a = s["approximation"]
        lines += ["", f"Measured on {a['tokens']} held-out tokens (the run's held-out text), against the dense model:", "",
                  "| model | perplexity | top-1 agreement with dense | KL to dense |", "|---|---|---|---|",
                  f"| dense | {a['dense_perplexity']:.2f} | 1 | 0 |",
                  f"| the run (per-token K, mean {k}) | {a['run']['perplexity']:.2f} | {a['run']['agreement']:.3f} | "
                  f"{a['run']['kl']:.3f} |",
                  f"| this export (top-{k}) | {a['export']['perplexity']:.2f} | {a['export']['agreement']:.3f} | "
                  f"{a['export']['kl']:.3f} |", "",
                  f"The export agrees with the run's top-1 next token on {100 * a['vs_run']['agreement']:.1f}% of "
                  f"those tokens (KL run -> export {a['vs_run']['kl']:.3f})."]
    f, size = s["flops"], s["size"]
    lines += ["", "## Compute and size", "",
              f"Analytic FLOPs per token at {f['seq_len']} tokens of context (matrix products, as transformers computes "
              "this export):", "", "| | GFLOPs / token | FFN GFLOPs / token |", "|---|---|---|",
              f"| dense `{base}` | {f['dense']['total'] / 1e9:.3f} | {f['dense']['ffn'] / 1e9:.3f} |",
              f"| this export | {f['export']['total'] / 1e9:.3f} | {f['export']['ffn'] / 1e9:.3f} |",
              f"| the factorlab run at K={k} | {f['run']['total'] / 1e9:.3f} | {f['run']['ffn'] / 1e9:.3f} |", "",
              f"Parameters: {size['export_parameters']:,} (dense {size['dense_parameters']:,}); safetensors "
              f"{size['export_bytes'] / 2**20:,.1f} MiB (dense fp32 tensors {size['dense_bytes'] / 2**20:,.1f} MiB)."]
    lines += ["", "## Measured scores of the run", ""] + _scores(s["metrics"], k, plan["exact"])
    recipe = s["recipe"]
    lines += ["", "## Recipe", "", f"factorlab preset: `{s['preset'] or 'custom'}`.", "", "| setting | value |",
              "|---|---|"] + [f"| {key} | `{value}` |" for key, value in recipe.items()]
    lines += ["", "## How it was made", "",
              f"`python -m factorlab train {s['run']}` (the recipe above), then `{s['command']}`; factorlab "
              f"{s['versions']['factorlab']}, transformers {s['versions']['transformers']}, torch "
              f"{s['versions']['torch']}, {s['created']}. factorlab permutes and cuts each FFN into experts "
              "(weights unchanged), trains a router per layer with PAR and refits the experts' down projections by "
              "least squares against the dense FFN."]
    return "\n".join(lines) + "\n"


def _scores(metrics: dict, k: int, exact: bool) -> list[str]:
    """The run's stored held-out and benchmark scores at K, as card lines."""
    who = "this model" if exact else "the run (per-token K), not this export"
    out = []
    held = (metrics.get("heldout") or {}).get(str(k))
    if held:
        out += [f"Held-out text ({held['tokens']} tokens, {who}): perplexity {held['perplexity']:.2f} (dense "
                f"{held['dense_perplexity']:.2f}), top-1 agreement with dense {held['agreement']:.3f}, KL "
                f"{held['kl']:.3f}.", ""]
    tasks = (metrics.get("eval") or {}).get("tasks") or {}
    rows = [(name, t) for name, t in sorted(tasks.items()) if str(k) in t.get("k", {})]
    if rows:
        out += [f"Benchmarks scored as lm-evaluation-harness does ({who}):", "",
                "| task | items | metric | dense | factorized |", "|---|---|---|---|---|"]
        for name, t in rows:
            metric = t.get("main_metric", "acc")
            out.append(f"| {name} | {t['dense'].get('n')} | {metric} | {t['dense'][metric]:.3f} | "
                       f"{t['k'][str(k)][metric]:.3f} |")
    return out or ["No scores stored with the run (`python -m factorlab eval RUN` adds benchmark scores)."]


def zip_folder(folder: Path, target: Path) -> Path:
    """A folder as one uncompressed zip (safetensors barely compress), written through a temporary file."""
    import os
    import zipfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder))
    tmp.replace(target)
    return target


# ---------------------------------------------------------------- the Hub
def check_repo_id(repo_id: str) -> None:
    """A Hub repository id is owner/name (letters, digits, '-', '_', '.')."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", repo_id or ""):
        raise ExportError(f"--push-to-hub {repo_id!r}: write the Hub repository as owner/name, e.g. me/smollm2-moe")


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an export folder to a Hub model repository (created if missing); returns its URL."""
    check_repo_id(repo_id)
    if not hub_reachable():
        raise ExportError(f"The Hugging Face Hub cannot be reached (offline?), so nothing was pushed; the export is "
                          f"in {folder}: push it later with `hf upload {repo_id} {folder}`.")
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="factorlab export")
    return f"https://huggingface.co/{repo_id}"


__all__ = ["FORMATS", "CLASSES", "ExportError", "ExportPlan", "plan_export", "fix_k", "check_source", "export_config",
           "routed_tensors", "export_state_dict", "build_export", "max_logit_diff", "greedy_ids", "verify_export", "parameter_count",
           "tensor_bytes", "export_flops", "folder_bytes", "check_folder", "replace_folder", "zip_folder", "model_card",
           "check_repo_id", "push_to_hub"]
