"""The Chat tab's streaming, as the lab shows it: both replies side by side with their measured stats.

Plain Python (no Gradio): app.py wires these to the Chat tab's events.
"""
from __future__ import annotations

from . import lab, viz
from .chat import Sampling, shown_text, side_by_side, stream_reply, to_messages


def stats_html(label: str, step, ffn: float, dense_ffn: float, heldout: dict | None = None, chat_note: str = "") -> str:
    """One model's line under its reply: tokens, measured tokens/s and prefill, active FFN GFLOPs, held-out fidelity."""
    rate = f"{step.tokens_per_s:.1f} tokens/s" if step.tokens_per_s else "… tokens/s"
    share = f" ({ffn / dense_ffn:.0%} of dense)" if ffn != dense_ffn else ""
    fidelity = (f" · held-out text: top-1 agreement with dense <b>{heldout['agreement']:.0%}</b>, perplexity "
                f"{heldout['perplexity']:.1f} (dense {heldout['dense_perplexity']:.1f})" if heldout else "")
    chat_note = f"<br>{chat_note}" if chat_note else ""
    return (f"<div class='fl-stats'><b>{label}</b> · {step.new_tokens} tokens · {rate} · prefill "
            f"{step.prefill_s:.2f} s · active FFN <b>{ffn:.3f}</b> GFLOPs/token{share}{fidelity}{chat_note}</div>")


def stream_both(dense_history, moe_history, message, settings: dict):
    """Stream both replies; settings: the chat controls by name (app.py's chat_settings), seed already chosen.
    Yields (message box, dense history, factorized history, dense stats, factorized stats, coloured tokens)."""
    run, k, colour, layer = settings["run"], settings["k"], settings["colour"], settings["layer"]
    max_new = lab._int(settings["max_new"], "max new tokens")
    lab.check_chat(message, [to_messages(dense_history), to_messages(moe_history)], max_new)
    sampling = Sampling(lab._float(settings["temperature"], "temperature"), lab._float(settings["top_p"], "top-p"),
                        max_new, lab._int(settings["seed"], "seed"))
    user = {"role": "user", "content": message}
    dense_history = [*dense_history, user, {"role": "assistant", "content": ""}]
    moe_history = [*moe_history, user, {"role": "assistant", "content": ""}]
    shape = lab.run_shape(run) if run else None
    model = shape["model"] if shape else "default"
    dense_ffn = lab.dense_ffn_gflops(model)
    left = stream_reply(lab.dense_handle(model), to_messages(dense_history[:-1]), sampling)
    if shape:
        k = max(1, min(int(k), shape["num_experts"]))
        moe_ffn = lab.ffn_gflops(run, k)[1]
        heldout = lab.heldout_at(run, k)  # measured when the run was saved, at this K
        chat_note = lab.chat_fidelity_text(run, k)
        right = stream_reply(lab.run_handle(run), to_messages(moe_history[:-1]), sampling, top_k=k,
                             trace=bool(colour))
    else:
        right = iter(())
        moe_history[-1]["content"] = lab.no_run_note()
    for d, m in side_by_side(left, right):
        dense_history[-1]["content"] = shown_text(d)
        stats_moe, tokens = "", ""
        if shape:
            moe_history[-1]["content"] = shown_text(m)
            stats_moe = stats_html(f"factorized K={k} of {shape['num_experts']}", m, moe_ffn, dense_ffn, heldout,
                               chat_note)
            if colour and layer is not None:
                tokens = viz.tokens_html(m.pieces, m.experts, int(layer), shape["num_experts"])
        yield "", dense_history, moe_history, stats_html("dense", d, dense_ffn, dense_ffn), stats_moe, tokens


def last_user(history: list) -> int | None:
    """Index of the last user message in a chatbot history."""
    users = [i for i, m in enumerate(history) if (m.get("role") if isinstance(m, dict) else None) == "user"]
    return users[-1] if users else None
