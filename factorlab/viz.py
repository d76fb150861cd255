"""Plotly figures and small HTML views for the lab: routing heatmaps, expert loads, losses, trade-offs.

Every function takes plain data (lists, dicts) and returns a figure or an HTML string; none
runs a model. Experts get one categorical colour each everywhere; probabilities a sequential scale.
"""
from __future__ import annotations

import colorsys
import html
import math
from typing import Sequence

import plotly.graph_objects as go
from plotly.colors import qualitative

COMPONENT_LABELS = {"attention_proj": "attention projections", "attention_scores": "attention scores",
                    "ffn": "FFN (experts)", "router": "router", "lm_head": "lm_head"}
COMPONENT_COLORS = {"attention_proj": "#4c78a8", "attention_scores": "#9ecae9", "ffn": "#f58518",
                    "router": "#e45756", "lm_head": "#72b7b2"}
LOSS_LABELS = {"route": "router loss (PAR)", "balance": "balance loss", "distill": "distillation MSE (after refit)",
               "distill_before": "distillation MSE (before refit)", "kl": "end-to-end KL"}
PROB_SCALE = "Viridis"
FONT = dict(family="Inter, system-ui, sans-serif", size=12)


def expert_colors(num_experts: int) -> list[str]:
    """One distinct colour per expert (Plotly's qualitative palettes, then evenly spaced hues)."""
    for palette in (qualitative.Plotly, qualitative.Dark24):
        if num_experts <= len(palette):
            return list(palette[:num_experts])
    return ["#%02x%02x%02x" % tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / num_experts, 0.65, 0.85))
            for i in range(num_experts)]


def _layout(fig: go.Figure, title: str, height: int, **kwargs) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.01, font=dict(size=14)), height=height, font=FONT,
                      margin=dict(l=60, r=20, t=50, b=50), template="plotly_white", **kwargs)
    return fig


def empty_figure(message: str, height: int = 300) -> go.Figure:
    """A blank figure that says why there is nothing to show yet."""
    fig = go.Figure()
    fig.add_annotation(text=html.escape(message), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14, color="#666"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, "", height)


def routing_heatmap(tokens: Sequence[str], layers: Sequence[int], top_k_index: dict[int, list[list[int]]],
                    probs: dict[int, list[list[float]]], num_experts: int, expert: int | None = None,
                    title: str = "") -> go.Figure:
    """Tokens (x) by layers (y), coloured by top-1 expert (categorical) or by P(expert) (sequential).

    top_k_index[layer] holds each token's chosen experts, best first (K of them, or 0..N with per-token
    K); probs[layer] is (T, N) router probabilities.
    """
    colors = expert_colors(num_experts)
    hover = [[_cell_hover(tokens[t], t, layer, top_k_index[layer][t], probs[layer][t]) for t in range(len(tokens))]
             for layer in layers]
    x = list(range(len(tokens)))
    if expert is None:
        # a token that runs no routed expert (per-token K) is left blank
        z = [[top_k_index[layer][t][0] if len(top_k_index[layer][t]) else None for t in x] for layer in layers]
        scale = [[v, colors[i]] for i in range(num_experts) for v in (i / num_experts, (i + 1) / num_experts)]
        trace = go.Heatmap(z=z, x=x, y=list(range(len(layers))), colorscale=scale, zmin=-0.5, zmax=num_experts - 0.5,
                           showscale=False, customdata=hover, hovertemplate="%{customdata}<extra></extra>", xgap=1,
                           ygap=1)
    else:
        z = [[probs[layer][t][expert] for t in x] for layer in layers]
        trace = go.Heatmap(z=z, x=x, y=list(range(len(layers))), colorscale=PROB_SCALE, zmin=0, zmax=1,
                           colorbar=dict(title=dict(text=f"P(expert {expert})"), thickness=12),
                           customdata=hover, hovertemplate="%{customdata}<extra></extra>", xgap=1, ygap=1)
    fig = go.Figure(trace)
    if expert is None:  # a legend entry per expert (heatmaps have none of their own)
        for i, c in enumerate(colors):
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"expert {i}",
                                     marker=dict(size=12, symbol="square", color=c)))
    fig.update_xaxes(tickmode="array", tickvals=x, ticktext=[_tick(t) for t in tokens], tickangle=-60,
                     showgrid=False, title="token")
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(layers))), ticktext=[str(i) for i in layers],
                     autorange="reversed", showgrid=False, title="layer")
    height = max(320, 150 + 16 * len(layers))
    return _layout(fig, title or ("top-1 expert per token and layer" if expert is None
                                  else f"router probability of expert {expert}"), height,
                   legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))


def _tick(token: str) -> str:
    text = token.replace("\n", "⏎").replace(" ", "·")
    return text if len(text) <= 10 else text[:9] + "…"


def _cell_hover(token: str, position: int, layer: int, chosen: Sequence[int], probs: Sequence[float]) -> str:
    experts = ", ".join(f"{e} ({probs[e]:.2f})" for e in chosen) or "none (the shared neurons only)"
    top = sorted(range(len(probs)), key=lambda e: -probs[e])[:4]
    best = " ".join(f"{e}:{probs[e]:.2f}" for e in top)
    return (f"token <b>{html.escape(repr(token), quote=False)}</b> (#{position})<br>layer {layer}<br>"
            f"chosen experts: {experts}<br>top probabilities: {best}")


def load_figure(loads: dict[int, Sequence[float]], num_experts: int, title: str = "") -> go.Figure:
    """Share of (token, slot) assignments each expert receives, stacked per layer."""
    colors = expert_colors(num_experts)
    layers = sorted(loads)
    fig = go.Figure([go.Bar(x=[str(i) for i in layers], y=[loads[i][e] for i in layers], name=f"expert {e}",
                            marker_color=colors[e],
                            hovertemplate=f"layer %{{x}}<br>expert {e}: %{{y:.1%}}<extra></extra>")
                     for e in range(num_experts)])
    fig.update_layout(barmode="stack")
    fig.update_yaxes(tickformat=".0%", range=[0, 1], title="share of assignments")
    fig.update_xaxes(title="layer", type="category")
    return _layout(fig, title or "expert load per layer (an even split is 1/N each)", 340,
                   legend=dict(orientation="h", y=-0.25))


def entropy_figure(layers: Sequence[int], series: dict[str, Sequence[float]], title: str = "") -> go.Figure:
    """Normalised load entropy per layer for several models: 1 = tokens spread evenly, 0 = collapse."""
    styles = [dict(color="#f58518", width=3), dict(color="#4c78a8", width=2, dash="dash")]
    fig = go.Figure([go.Scatter(x=[str(i) for i in layers], y=list(values), name=name, mode="lines+markers",
                                line=styles[j % len(styles)],
                                hovertemplate=f"{name}<br>layer %{{x}}: %{{y:.3f}}<extra></extra>")
                     for j, (name, values) in enumerate(series.items())])
    fig.update_yaxes(range=[0, 1.05], title="load entropy / log N")
    fig.update_xaxes(title="layer", type="category")
    return _layout(fig, title or "does routing collapse? load entropy per layer", 320,
                   legend=dict(orientation="h", y=-0.3))


def loss_figure(records: Sequence[dict], title: str = "") -> go.Figure:
    """Training losses against the trainer's step (log scale); records carry `step` and `losses`."""
    series: dict[str, tuple[list, list]] = {}
    for rec in records:
        for key, value in (rec.get("losses") or {}).items():
            if key in LOSS_LABELS and value is not None and math.isfinite(value) and value > 0:
                xs, ys = series.setdefault(key, ([], []))
                xs.append(rec.get("step"))
                ys.append(value)
    if not series:
        return empty_figure("losses appear here while a training job runs", 300)
    fig = go.Figure([go.Scatter(x=xs, y=ys, name=LOSS_LABELS[key], mode="lines+markers")
                     for key, (xs, ys) in series.items()])
    fig.update_yaxes(type="log", title="loss")
    fig.update_xaxes(title="training step (one per layer and phase)")
    return _layout(fig, title or "training losses", 320, legend=dict(orientation="h", y=-0.3))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (lower) and score (higher), by cost."""
    front, best = [], -math.inf
    for cost, score in sorted(points, key=lambda p: (p[0], -p[1])):
        if score > best:
            front.append((cost, score))
            best = score
    return front


def _error(point: dict, side: int) -> float:
    """Error bar length below (side 0) or above (side 1) a point's score: its interval, else its stderr."""
    if point.get("interval"):
        return abs(point["interval"][side] - point["score"])
    return point.get("stderr") or 0


def tradeoff_figure(points: Sequence[dict], current_k: int | None, metric: str, title: str = "",
                    x_title: str = "GFLOPs per token (analytic)") -> go.Figure:
    """Score vs cost per token: dense, every measured K, the Pareto line, the current K highlighted.

    points: {"label", "k" (None for dense), "x" (the cost; default "gflops"), "score", "stderr" (or None) or
    "interval" ([low, high], drawn instead),
    optionally "limit" (the lowest cost that K could reach: drawn as an open marker joined to it)}.
    """
    if not points:
        return empty_figure("no stored results for this run and task yet: run the evaluations", 380)
    cost = [p.get("x", p.get("gflops")) for p in points]
    front = pareto_front(list(zip(cost, [p["score"] for p in points])))
    fig = go.Figure(go.Scatter(x=[c for c, _ in front], y=[s for _, s in front], mode="lines", name="Pareto front",
                               line=dict(color="#bbb", width=2, dash="dot"), hoverinfo="skip"))
    limited = [(p, c) for p, c in zip(points, cost) if p.get("limit") is not None]
    if limited:
        xs, ys = [], []
        for p, c in limited:
            xs += [p["limit"], c, None]
            ys += [p["score"], p["score"], None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color="#9ecae1", width=1), hoverinfo="skip",
                                 showlegend=False))
        fig.add_trace(go.Scatter(
            x=[p["limit"] for p, _ in limited], y=[p["score"] for p, _ in limited], mode="markers",
            marker=dict(color="#4c78a8", symbol="circle-open", size=11), name="limit (FLOPs bound)",
            text=[p["label"] for p, _ in limited],
            hovertemplate="%{text} limit: %{x:.3f}<extra></extra>"))
    for group, style in (("dense", dict(color="#333", symbol="diamond", size=13)),
                         ("K", dict(color="#4c78a8", symbol="circle", size=11)),
                         ("current", dict(color="#f58518", symbol="star", size=20, line=dict(color="#333", width=1)))):
        chosen = [(p, c) for p, c in zip(points, cost) if _group(p, current_k) == group]
        if not chosen:
            continue
        fig.add_trace(go.Scatter(
            x=[c for _, c in chosen], y=[p["score"] for p, _ in chosen], mode="markers+text", marker=style,
            text=[p["label"] for p, _ in chosen], textposition="top center",
            error_y=dict(type="data", array=[_error(p, 1) for p, _ in chosen],
                         arrayminus=[_error(p, 0) for p, _ in chosen], visible=True, thickness=1),
            cliponaxis=False,
            name={"dense": "dense", "K": "factorized (K experts)", "current": f"current K={current_k}"}[group],
            hovertemplate="%{text}<br>%{x:.3f} " + x_title + "<br>" + metric + ": %{y:.3f}<extra></extra>"))
    fig.update_xaxes(title=x_title)
    fig.update_yaxes(title=metric)
    return _layout(fig, title or f"{metric} vs compute", 400, legend=dict(orientation="h", y=-0.25))


def _group(point: dict, current_k: int | None) -> str:
    if point["k"] is None:
        return "dense"
    return "current" if point["k"] == current_k else "K"


def flops_figure(rows: dict[str, dict[str, float]], seq_len: int, title: str = "") -> go.Figure:
    """GFLOPs per token split by component, one stacked bar per model (dense, the chosen K)."""
    labels = list(rows)
    fig = go.Figure([go.Bar(x=labels, y=[rows[m][c] / 1e9 for m in labels], name=COMPONENT_LABELS[c],
                            marker_color=COMPONENT_COLORS[c],
                            hovertemplate=f"{COMPONENT_LABELS[c]}: %{{y:.4f}} GFLOPs<extra>%{{x}}</extra>")
                     for c in COMPONENT_LABELS])
    dense_total = rows[labels[0]]["total"]
    for m in labels:
        fig.add_annotation(x=m, y=rows[m]["total"] / 1e9, text=f"{rows[m]['total'] / dense_total:.0%} of dense",
                           showarrow=False, yshift=10)
    fig.update_layout(barmode="stack")
    fig.update_yaxes(title="GFLOPs per token")
    return _layout(fig, title or f"FLOPs per token at sequence length {seq_len}", 380,
                   legend=dict(orientation="h", y=-0.2))


# ---------------------------------------------------------------- HTML views

def progress_html(view: dict | None) -> str:
    """The active job as a progress bar with its numbers; view is factorlab.lab_jobs.job_view()."""
    if not view:
        return ("<div class='fl-job fl-idle'>No job yet. Start one in “Factorize &amp; train” "
                "or “Trade-offs”.</div>")
    fraction = view.get("fraction")
    width = 100 * (fraction if fraction is not None else (1.0 if view["state"] == "done" else 0.0))
    cells = [(label, value) for label, value in (
        ("step", view.get("step_text")), ("tokens/s", view.get("rate_text")), ("elapsed", view.get("elapsed_text")),
        ("ETA", view.get("eta_text"))) if value]
    numbers = " · ".join(f"{label} <b>{html.escape(str(value))}</b>" for label, value in cells)
    message = html.escape(view.get("message") or "")
    error = f"<div class='fl-error'>{html.escape(view['error'])}</div>" if view.get("error") else ""
    note = f"<div class='fl-note'>{html.escape(view['note'])}</div>" if view.get("note") else ""
    return (f"<div class='fl-job fl-{view['state']}'>"
            f"<div class='fl-job-head'><b>{html.escape(view['kind'])}</b> “{html.escape(view['name'])}” — "
            f"<span class='fl-state'>{view['state']}</span>"
            f"{' · ' + html.escape(view['phase']) if view.get('phase') else ''}</div>"
            f"<div class='fl-bar'><div class='fl-fill' style='width:{width:.1f}%'></div></div>"
            f"<div class='fl-numbers'>{numbers}</div><div class='fl-message'>{message}</div>{note}{error}</div>")


def tokens_html(pieces: Sequence[str], experts: Sequence[dict[int, list[int]]], layer: int | None,
                num_experts: int) -> str:
    """The reply's tokens, each on the colour of its top-1 expert at `layer` (hover: its top-K)."""
    if not pieces or layer is None:
        return ""
    colors = expert_colors(num_experts)
    spans = []
    for piece, routing in zip(pieces, experts):
        chosen = routing.get(layer)
        if not chosen:
            spans.append(html.escape(piece))
            continue
        spans.append(f"<span class='fl-tok' style='background:{colors[chosen[0]]}40;border-bottom:3px solid "
                     f"{colors[chosen[0]]}' title='layer {layer}: experts {', '.join(map(str, chosen))}'>"
                     f"{html.escape(piece)}</span>")
    legend = " ".join(f"<span class='fl-key' style='background:{c}'>{i}</span>" for i, c in enumerate(colors))
    return (f"<div class='fl-tokens'>{''.join(spans)}</div>"
            f"<div class='fl-legend'>top-1 expert at layer {layer}: {legend}</div>")
