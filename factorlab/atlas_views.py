"""The expert atlas as the lab shows it: figures, tables and HTML from a stored atlas (factorlab.atlas).

Plain data in, plotly figures / rows / HTML out; nothing here runs a model, so a redraw costs only the
drawing. Domains get one categorical colour each; experts keep the lab's expert colours (viz).
"""
from __future__ import annotations

import functools
import html

import plotly.graph_objects as go
import plotly.io as pio
from plotly.colors import qualitative

from .viz import FONT, empty_figure, expert_colors

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


def _figure(data: list[dict], title: str, height: int, **layout) -> go.Figure:
    """A figure from plain trace and layout dicts, not validated by plotly (validation costs 100-250 ms a
    figure on a busy 2-core machine; these dicts are written for plotly.js directly)."""
    base = {"title": {"text": title, "x": 0.01, "font": {"size": 14}}, "height": height, "font": FONT,
            "margin": {"l": 60, "r": 20, "t": 50, "b": 50}, "template": _template()}
    return go.Figure({"data": data, "layout": {**base, **layout}}, _validate=False)


@functools.cache
def _template() -> dict:
    return pio.templates["plotly_white"].to_plotly_json()


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
    top = {shared: max([c[3] for c in cells if (c[1] == n) == shared] + [1e-9]) for shared in (False, True)}
    traces = []
    for name in [*colors, None]:
        group = [c for c in cells if c[2] == name]
        if group:
            traces.append({
                "type": "scatter", "x": [c[1] for c in group], "y": [c[0] for c in group], "mode": "markers",
                "name": name or "shared block", "text": [c[4] for c in group],
                "hovertemplate": "%{text}<extra></extra>",
                "marker": {"color": colors.get(name, "#999"), "symbol": "circle" if name else "square",
                           "size": [5 + 13 * max(c[3], 0) / top[c[1] == n] for c in group],
                           "line": {"color": "#333", "width": 0.5}}})
    return _figure(traces, "layer overview: colour = most over-represented domain, size = Δ loss without it "
                           f"(experts: max {top[False]:+.3f}; shared blocks, own scale: max {top[True]:+.3f} nats/token)",
                   max(420, 120 + 17 * len(atlas["layers"])),
                   xaxis={"tickmode": "array", "tickvals": list(range(n + 1)), "range": [-0.6, n + 0.6],
                          "ticktext": [*map(str, range(n)), "shared"], "title": {"text": "expert"}},
                   yaxis={"range": [max(atlas["layers"]) + 0.7, min(atlas["layers"]) - 0.7], "title": {"text": "layer"},
                          "dtick": 1},
                   legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"})


def domain_figure(atlas: dict, layer: int, expert: int) -> go.Figure:
    """The share of each domain's tokens this expert runs on, beside its share of all tokens."""
    e = expert_entry(atlas, layer, expert)
    colors = domain_colors(atlas)
    names = list(e["domains"])
    bar = {"type": "bar", "x": names, "y": [e["domains"][d] for d in names],
           "marker": {"color": [colors[d] for d in names]}, "textposition": "outside",
           "text": [f"×{e['over'][d]:.2f}" if e["over"][d] is not None else "" for d in names],
           "hovertemplate": "%{x}: %{y:.1%} of its tokens<extra></extra>"}
    return _figure([bar], f"layer {layer}, expert {expert}: domains (label = over-representation)", 330,
                   showlegend=False, yaxis={"tickformat": ".0%", "range": [0, 1.08],
                                            "title": {"text": "tokens that run this expert"}},
                   shapes=[{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": e["share"], "y1": e["share"],
                            "line": {"color": "#333", "dash": "dash"}}],
                   annotations=[{"text": f"all tokens: {e['share']:.1%}", "xref": "paper", "x": 0, "y": e["share"],
                                 "yanchor": "bottom", "xanchor": "left", "showarrow": False}])


def ablation_figure(atlas: dict, layer: int) -> go.Figure:
    """Δ loss per domain when each expert (or the shared block) of a layer is removed, with standard errors."""
    data = atlas["layers_data"].get(str(layer))
    if data is None:
        return empty_figure(f"layer {layer} is not factorized in this run")
    targets = [(f"expert {e['expert']}", e["ablation"]) for e in data["experts"]]
    if data["shared"]["ablation"]:
        targets.append(("shared block", data["shared"]["ablation"]))
    traces = [{"type": "bar", "name": d, "x": [t for t, _ in targets], "y": [a[d]["delta"] for _, a in targets],
               "marker": {"color": c}, "hovertemplate": f"{d}<br>%{{x}}: %{{y:+.4f}} nats/token<extra></extra>",
               "error_y": {"type": "data", "array": [a[d]["stderr"] or 0 for _, a in targets], "thickness": 1}}
              for d, c in domain_colors(atlas).items()]
    return _figure(traces, f"layer {layer}: what the model loses without each expert (held-out text, ± s.e.)", 360,
                   barmode="group", yaxis={"title": {"text": "Δ next-token loss (nats/token)"}},
                   legend={"orientation": "h", "y": -0.2})


def pair_figure(atlas: dict, layer: int) -> go.Figure:
    """Co-activation P(column runs | row runs) and weight-space similarity of the layer's experts."""
    data = atlas["layers_data"].get(str(layer))
    if data is None:
        return empty_figure(f"layer {layer} is not factorized in this run")
    labels = [f"e{e}" for e in range(len(data["experts"]))]
    traces = [{"type": "heatmap", "z": z, "x": labels, "y": labels, "colorscale": scale, "zmin": 0, "zmax": 1,
               "showscale": False, "text": [[f"{v:.2f}" for v in r] for r in z], "texttemplate": "%{text}",
               "xaxis": xa, "yaxis": ya, "hovertemplate": "%{y} → %{x}: %{z:.3f}<extra></extra>"}
              for z, scale, xa, ya in ((data["coactivation"], [[0, "#f7fbff"], [1, "#08519c"]], "x", "y"),
                                       (data["similarity"], [[0, "#fcfbfd"], [1, "#54278f"]], "x2", "y2"))]
    note = (f"{data['mean_active']:.2f} experts per token on average, {data['none_share']:.1%} of tokens run none; "
            "random 16-dim subspaces overlap ~16/hidden")
    titles = [{"text": t, "x": x, "y": 1.0, "xref": "paper", "yref": "paper", "showarrow": False, "yanchor": "bottom",
               "xanchor": "center",
               "font": {"size": 12}} for t, x in (("P(column runs | row runs)", 0.2), ("output-subspace overlap", 0.8))]
    return _figure(traces, f"layer {layer}: which experts run together, and how alike their weights are", 380,
                   xaxis={"domain": [0, 0.42]}, xaxis2={"domain": [0.58, 1], "anchor": "y2"},
                   yaxis={"autorange": "reversed"}, yaxis2={"anchor": "x2", "autorange": "reversed"},
                   annotations=[*titles, {"text": note, "x": 0.5, "y": -0.2, "xref": "paper", "yref": "paper",
                                          "showarrow": False, "font": {"size": 11}}])


def specialisation_figure(atlas: dict) -> go.Figure:
    """I(domain; top-1 expert) per layer for the run's router and the untrained router of the same partition."""
    spec = atlas["specialisation"]
    routers = [k for k in spec if isinstance(spec[k], dict) and "mi_by_layer" in spec[k]]
    styles = [{"color": "#f58518", "width": 3}, {"color": "#4c78a8", "width": 2, "dash": "dash"}]
    traces = [{"type": "scatter", "x": [str(i) for i in atlas["layers"]], "y": spec[r]["mi_by_layer"],
               "mode": "lines+markers", "line": styles[j % 2],
               "name": f"{r}: mean {spec[r]['mi_bits']:.3f} bits (95% CI {spec[r]['mi_ci95'][0]:.3f}–"
                       f"{spec[r]['mi_ci95'][1]:.3f})"} for j, r in enumerate(routers)]
    return _figure(traces, f"domain specialisation per layer (at most {spec['max_mi_bits']:.2f} bits)", 340,
                   yaxis={"title": {"text": "I(domain; top-1 expert), bits"}, "rangemode": "tozero"},
                   xaxis={"title": {"text": "layer"}, "type": "category"}, legend={"orientation": "h", "y": -0.3})


def share_cost_figure(atlas: dict) -> go.Figure:
    """Routing statistic vs causal cost: each expert's share of tokens against the loss increase without it."""
    traces = []
    for d, c in domain_colors(atlas).items():
        pts = [(e["share"], _delta(e["ablation"]), layer, e["expert"]) for layer in atlas["layers"]
               for e in atlas["layers_data"][str(layer)]["experts"] if e["top_domain"] == d]
        if pts:
            traces.append({"type": "scatter", "mode": "markers", "name": d, "x": [p[0] for p in pts],
                           "y": [p[1] for p in pts], "text": [f"layer {p[2]}, expert {p[3]}" for p in pts],
                           "marker": {"color": c, "size": 8, "line": {"color": "#333", "width": 0.5}},
                           "hovertemplate": "%{text}<br>share %{x:.1%}, Δ loss %{y:+.4f}<extra></extra>"})
    return _figure(traces, "many tokens ≠ much loss: share of tokens vs the cost of removing it (colour: top domain)",
                   340, xaxis={"title": {"text": "share of tokens that run the expert"}, "tickformat": ".0%"},
                   yaxis={"title": {"text": "Δ loss when removed (nats/token)"}},
                   legend={"orientation": "h", "y": -0.3})


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
             f"{_text(c['domain'])}</span> …{_text(c['left'])}<mark style='background:"
             f"{expert_colors(atlas['num_experts'])[expert]}55;font-weight:600'>{_text(c['token'])}</mark>"
             f"{_text(c['right'])}… <small>(p = {c['p']:.2f})</small></li>" for c in e["contexts"]]
    return (f"<div><b>Contexts</b> — tokens routed to layer {layer}'s expert {expert}, best router probability first, "
            f"one per token and text row, round-robin over the domains</div>"
            f"<ul class='fl-contexts' style='font-family:monospace'>{''.join(items)}</ul>")


def _text(piece: str) -> str:
    """A snippet of text for one line of HTML: escaped, line breaks shown as ⏎."""
    return html.escape(piece).replace("\n", "⏎")


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
    spec_text = (" Domain specialisation I(domain; top-1 expert), mean over layers: "
                 + "; ".join(f"{k} {v['mi_bits']:.3f} bits (95% CI {v['mi_ci95'][0]:.3f}–{v['mi_ci95'][1]:.3f}; "
                             f"{v.get('mi_null_bits', float('nan')):.3f} with domains shuffled between rows)"
                             for k, v in spec.items() if isinstance(v, dict) and "mi_bits" in v and k != "difference")
                 + (f"; difference {diff['mi_bits']:+.3f} (95% CI {diff['mi_ci95'][0]:+.3f}–{diff['mi_ci95'][1]:+.3f})."
                    if diff else "."))
    return (f"Atlas of `{atlas['run']}`: {len(atlas['layers'])} factorized layers × {atlas['num_experts']} experts"
            f"{' + a shared block' if atlas['shared_size'] else ''}. Corpus (held-out text): {doms}. Computed in "
            f"**{t['seconds'] + t.get('setup_seconds', 0):.0f} s** ({t['ablation_forwards']} ablations) on "
            f"{t['threads']} threads, load average {t['load_average_before'][0]:.1f} before.{spec_text}")
