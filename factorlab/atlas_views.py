"""The expert atlas as the lab shows it: figures, tables and HTML from a stored atlas (factorlab.atlas).

Plain data in, plotly figures / rows / HTML out; nothing here runs a model, so a redraw costs only the
drawing. Domains get one categorical colour each; experts keep the lab's expert colours (viz).
"""
from __future__ import annotations

import html

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from .viz import _layout, empty_figure, expert_colors

VOCAB_COLUMNS = ["token", "lift", "routed here", "in corpus"]
LENS_COLUMNS = ["rank", "promotes", "logit", "promotes more than the layer's other experts", "logit − layer mean"]
RANKING_COLUMNS = ["rank", "layer", "removed", "Δ loss (all)", "± s.e.", "share of tokens", "most affected domain"]


def domain_colors(atlas: dict) -> dict[str, str]:
    palette = qualitative.Set2
    return {d["name"]: palette[i % len(palette)] for i, d in enumerate(atlas["domains"])}


def expert_entry(atlas: dict, layer: int, expert: int) -> dict:
    """One expert's stored numbers; a ValueError names the layers and experts there are."""
    data = atlas["layers_data"].get(str(layer))
    if data is None:
        raise ValueError(f"layer {layer} is not factorized in this run: choose one of "
                         f"{', '.join(map(str, atlas['layers']))}")
    if not 0 <= expert < len(data["experts"]):
        raise ValueError(f"expert {expert} does not exist: this run has experts 0..{len(data['experts']) - 1}")
    return data["experts"][expert]


def _delta(a: dict | None) -> float:
    return a["all"]["delta"] if a else 0.0


def overview_figure(atlas: dict) -> go.Figure:
    """Every expert (and shared block) of every layer: colour = its most over-represented domain, size =
    the loss increase when it is removed."""
    colors = domain_colors(atlas)
    n = atlas["num_experts"]
    cells = []  # (layer, column, domain or None, delta, hover)
    for layer in atlas["layers"]:
        data = atlas["layers_data"][str(layer)]
        for e in data["experts"]:
            over = e["over"].get(e["top_domain"]) if e["top_domain"] else None
            cells.append((layer, e["expert"], e["top_domain"], _delta(e["ablation"]),
                          f"layer {layer}, expert {e['expert']}<br>{e['share']:.1%} of tokens"
                          + (f"<br>most over-represented: {e['top_domain']} (×{over:.2f})" if over else "")
                          + f"<br>Δ loss when removed: {_delta(e['ablation']):+.4f} nats/token"))
        if data["shared"]["ablation"]:
            cells.append((layer, n, None, _delta(data["shared"]["ablation"]),
                          f"layer {layer}, shared block ({data['shared']['size']} neurons, every token)<br>"
                          f"Δ loss when removed: {_delta(data['shared']['ablation']):+.4f} nats/token"))
    top = max([abs(c[3]) for c in cells if c[1] < n] or [1e-9]) or 1e-9
    fig = go.Figure()
    for name in [*colors, None]:
        group = [c for c in cells if c[2] == name]
        if not group:
            continue
        fig.add_trace(go.Scatter(
            x=[c[1] for c in group], y=[c[0] for c in group], mode="markers", name=name or "shared block",
            marker=dict(color=colors.get(name, "#999"), size=[6 + 30 * min(1.0, max(c[3], 0) / top) for c in group],
                        line=dict(color="#333", width=0.5), symbol="circle" if name else "square"),
            customdata=[[c[0], c[1]] for c in group], text=[c[4] for c in group],
            hovertemplate="%{text}<extra></extra>"))
    fig.update_xaxes(tickmode="array", tickvals=list(range(n + 1)), ticktext=[*map(str, range(n)), "shared"],
                     title="expert", range=[-0.6, n + 0.6])
    fig.update_yaxes(autorange="reversed", title="layer", dtick=1)
    return _layout(fig, "layer overview: colour = most over-represented domain, size = Δ loss when removed "
                        "(experts scaled to the largest expert; shared blocks capped at that size)",
                   max(420, 120 + 17 * len(atlas["layers"])), legend=dict(orientation="h", y=1.02, yanchor="bottom",
                                                                        x=1, xanchor="right"))


def domain_figure(atlas: dict, layer: int, expert: int) -> go.Figure:
    """The share of each domain's tokens this expert runs on, beside its share of all tokens."""
    e = expert_entry(atlas, layer, expert)
    colors = domain_colors(atlas)
    names = list(e["domains"])
    fig = go.Figure(go.Bar(x=names, y=[e["domains"][d] for d in names], marker_color=[colors[d] for d in names],
                           text=[f"×{e['over'][d]:.2f}" if e["over"][d] is not None else "" for d in names],
                           textposition="outside", hovertemplate="%{x}: %{y:.1%} of its tokens<extra></extra>",
                           name="share of the domain's tokens"))
    fig.add_hline(y=e["share"], line=dict(color="#333", dash="dash"),
                  annotation_text=f"all tokens: {e['share']:.1%}", annotation_position="top left")
    fig.update_yaxes(tickformat=".0%", title="tokens that run this expert", range=[0, 1.08])
    return _layout(fig, f"layer {layer}, expert {expert}: domains (label = over-representation)", 330,
                   showlegend=False)


def ablation_figure(atlas: dict, layer: int) -> go.Figure:
    """Δ loss per domain when each expert (or the shared block) of a layer is removed, with standard errors."""
    data = atlas["layers_data"].get(str(layer))
    if data is None:
        return empty_figure(f"layer {layer} is not factorized in this run")
    colors = domain_colors(atlas)
    targets = [(f"expert {e['expert']}", e["ablation"]) for e in data["experts"]]
    if data["shared"]["ablation"]:
        targets.append(("shared block", data["shared"]["ablation"]))
    fig = go.Figure([go.Bar(x=[t for t, _ in targets], y=[a[d]["delta"] for _, a in targets], name=d,
                            marker_color=colors[d],
                            error_y=dict(type="data", array=[a[d]["stderr"] or 0 for _, a in targets], thickness=1),
                            hovertemplate=f"{d}<br>%{{x}}: %{{y:+.4f}} nats/token<extra></extra>")
                     for d in colors])
    fig.update_layout(barmode="group")
    fig.update_yaxes(title="Δ next-token loss (nats/token)")
    return _layout(fig, f"layer {layer}: what the model loses without each expert (held-out text, ± s.e.)", 360,
                   legend=dict(orientation="h", y=-0.2))


def pair_figure(atlas: dict, layer: int) -> go.Figure:
    """Co-activation P(column runs | row runs) and weight-space similarity of the layer's experts."""
    data = atlas["layers_data"].get(str(layer))
    if data is None:
        return empty_figure(f"layer {layer} is not factorized in this run")
    n = len(data["experts"])
    labels = [f"e{e}" for e in range(n)]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.15,
                        subplot_titles=("co-activation: P(column runs | row runs)",
                                        "weight space: output-subspace overlap"))
    for col, z, scale in ((1, data["coactivation"], "Blues"), (2, data["similarity"], "Purples")):
        fig.add_trace(go.Heatmap(z=z, x=labels, y=labels, colorscale=scale, zmin=0, zmax=1, showscale=False,
                                 text=[[f"{v:.2f}" for v in r] for r in z], texttemplate="%{text}",
                                 hovertemplate="%{y} → %{x}: %{z:.3f}<extra></extra>"), row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    rank_note = ("random 16-dimensional subspaces overlap by about 16/hidden; "
                 f"{data['mean_active']:.2f} experts run per token on average, {data['none_share']:.1%} of tokens "
                 "run none")
    return _layout(fig, f"layer {layer}: which experts run together, and how alike their weights are", 360,
                   annotations=[*fig.layout.annotations, dict(text=rank_note, x=0.5, y=-0.18, xref="paper",
                                                              yref="paper", showarrow=False, font=dict(size=11))])


def specialisation_figure(atlas: dict) -> go.Figure:
    """I(domain; top-1 expert) per layer for the run's router and the untrained router of the same partition."""
    spec = atlas["specialisation"]
    routers = [k for k in spec if isinstance(spec[k], dict) and "mi_by_layer" in spec[k]]
    styles = [dict(color="#f58518", width=3), dict(color="#4c78a8", width=2, dash="dash")]
    fig = go.Figure([go.Scatter(x=[str(i) for i in atlas["layers"]], y=spec[r]["mi_by_layer"], mode="lines+markers",
                                name=f"{r}: mean {spec[r]['mi_bits']:.3f} bits (95% CI {spec[r]['mi_ci95'][0]:.3f}–"
                                     f"{spec[r]['mi_ci95'][1]:.3f})", line=styles[j % 2])
                     for j, r in enumerate(routers)])
    fig.update_yaxes(title="I(domain; top-1 expert), bits", rangemode="tozero")
    fig.update_xaxes(title="layer", type="category")
    return _layout(fig, f"domain specialisation per layer (at most {spec['max_mi_bits']:.2f} bits)", 340,
                   legend=dict(orientation="h", y=-0.3))


def share_cost_figure(atlas: dict) -> go.Figure:
    """Routing statistic vs causal cost: each expert's share of tokens against the loss increase without it."""
    colors = domain_colors(atlas)
    fig = go.Figure()
    for d in colors:
        pts = [(e["share"], _delta(e["ablation"]), layer, e["expert"]) for layer in atlas["layers"]
               for e in atlas["layers_data"][str(layer)]["experts"] if e["top_domain"] == d]
        if pts:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers", name=d,
                                     marker=dict(color=colors[d], size=8, line=dict(color="#333", width=0.5)),
                                     text=[f"layer {p[2]}, expert {p[3]}" for p in pts],
                                     hovertemplate="%{text}<br>share %{x:.1%}, Δ loss %{y:+.4f}<extra></extra>"))
    fig.update_xaxes(title="share of tokens that run the expert", tickformat=".0%")
    fig.update_yaxes(title="Δ loss when removed (nats/token)")
    return _layout(fig, "many tokens ≠ much loss: share of tokens vs the cost of removing it (colour: top domain)",
                   340, legend=dict(orientation="h", y=-0.3))


# ---------------------------------------------------------------- tables and HTML
def vocab_rows(atlas: dict, layer: int, expert: int) -> list[list]:
    return [[repr(v["token"]), v["lift"], v["count"], v["total"]] for v in expert_entry(atlas, layer, expert)["vocab"]]


def lens_rows(atlas: dict, layer: int, expert: int) -> list[list]:
    lens = expert_entry(atlas, layer, expert)["lens"]
    return [[i + 1, repr(a["token"]), a["logit"], repr(b["token"]), b["logit"]]
            for i, (a, b) in enumerate(zip(lens["promotes"], lens["distinctive"]))]


def ranking_rows(atlas: dict, top: int = 20) -> list[list]:
    """The experts and shared blocks whose removal costs the most, across layers."""
    rows = []
    for rank, r in enumerate(atlas["ranking"][:top], 1):
        data = atlas["layers_data"][str(r["layer"])]
        share = "every token" if r["target"] == "shared" else f"{data['experts'][int(r['target'])]['share']:.1%}"
        worst = max(r["domains"], key=r["domains"].get)
        rows.append([rank, r["layer"], "shared block" if r["target"] == "shared" else f"expert {r['target']}",
                     round(r["delta"], 4), round(r["stderr"] or 0, 4), share,
                     f"{worst} ({r['domains'][worst]:+.4f})"])
    return rows


def contexts_html(atlas: dict, layer: int, expert: int) -> str:
    """Example contexts, the routed token highlighted, with their domain and router probability."""
    colors = domain_colors(atlas)
    e = expert_entry(atlas, layer, expert)
    if not e["contexts"]:
        return "<div class='fl-note'>No token of the corpus runs this expert.</div>"
    items = [f"<li><span class='fl-key' style='background:{colors.get(c['domain'], '#999')}'>"
             f"{html.escape(c['domain'])}</span> …{html.escape(c['left'])}<mark style='background:"
             f"{expert_colors(atlas['num_experts'])[expert]}55;font-weight:600'>{html.escape(c['token'])}</mark>"
             f"{html.escape(c['right'])}… <small>(p = {c['p']:.2f})</small></li>" for c in e["contexts"]]
    return f"<ul class='fl-contexts' style='font-family:monospace;white-space:pre-wrap'>{''.join(items)}</ul>"


def expert_markdown(atlas: dict, layer: int, expert: int) -> str:
    """What the numbers say about one expert, in words, each with what it measures."""
    e = expert_entry(atlas, layer, expert)
    data = atlas["layers_data"][str(layer)]
    a = e["ablation"]["all"]
    worst = max((d for d in e["ablation"] if d != "all"), key=lambda d: e["ablation"][d]["delta"])
    over = f"**{e['top_domain']}** (×{e['over'][e['top_domain']]:.2f} its overall share)" if e["top_domain"] else "none"
    norm = e["norm"]
    norms = (f"Its output norm on its tokens: **{norm['output']:.2f}**; the dense FFN's output norm on the same "
             f"tokens: {norm['dense_ffn_routed']:.2f} (all tokens: {data['dense_ffn_all']:.2f})."
             if norm["output"] is not None else "No token of the corpus runs it.")
    return (f"**Layer {layer}, expert {expert}** runs on **{e['share']:.1%}** of the corpus's tokens; most "
            f"over-represented domain: {over}.\n\n"
            f"**Removing it** changes next-token loss by **{a['delta']:+.4f}** ± {a['stderr'] or 0:.4f} nats/token "
            f"over all domains ({a['tokens']} held-out tokens); most for **{worst}** "
            f"({e['ablation'][worst]['delta']:+.4f}). {norms}")


def atlas_markdown(atlas: dict) -> str:
    """How this atlas was computed: corpus, tokens, time, load, and the specialisation result."""
    t = atlas["timing"]
    doms = ", ".join(f"{d['name']} ({d['tokens']:,} tokens, {d['ablation_tokens']} for ablations)"
                     for d in atlas["domains"])
    spec = atlas["specialisation"]
    diff = spec.get("difference")
    spec_text = (f" Domain specialisation I(domain; top-1 expert), mean over layers: "
                 + "; ".join(f"{k} {v['mi_bits']:.3f} bits (95% CI {v['mi_ci95'][0]:.3f}–{v['mi_ci95'][1]:.3f}; "
                             f"{v.get('mi_null_bits', float('nan')):.3f} with domains shuffled between rows)"
                             for k, v in spec.items() if isinstance(v, dict) and "mi_bits" in v and k != "difference")
                 + (f"; difference {diff['mi_bits']:+.3f} (95% CI {diff['mi_ci95'][0]:+.3f}–{diff['mi_ci95'][1]:+.3f})."
                    if diff else "."))
    return (f"Atlas of `{atlas['run']}`: {len(atlas['layers'])} factorized layers × {atlas['num_experts']} experts"
            f"{' + a shared block' if atlas['shared_size'] else ''}. Corpus (held-out text): {doms}. Computed in "
            f"**{t['seconds'] + t.get('setup_seconds', 0):.0f} s** ({t['ablation_forwards']} ablations) on "
            f"{t['threads']} threads, load average {t['load_average_before'][0]:.1f} before.{spec_text}")
